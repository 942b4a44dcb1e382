"""``calypso automations``: the Prefect automation that tells someone when a run ends.

The automation is a template, ``deploy/automations/run-finished.yaml`` (Prefect 3's own
format, which ``prefect automation create --from-file`` reads too); its one field,
``${NOTIFICATION_BLOCK_ID}``, is the notification block the facility created. ``install``
fills it in from the block's type and name, checks the result as Prefect would, and
creates the automation, or replaces the one of the same name (installing twice leaves
one).
"""

from __future__ import annotations

import argparse
import json
import os
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calypso.errors import ConfigurationError
from calypso.settings import load_settings

if TYPE_CHECKING:
    from prefect.events.schemas.automations import AutomationCore

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "automations" / "run-finished.yaml"
FIELD = "NOTIFICATION_BLOCK_ID"


def add_commands(commands: argparse._SubParsersAction) -> None:
    automations = commands.add_parser(
        "automations", help="Prefect automations: notify someone when a run fails or completes"
    )
    actions = automations.add_subparsers(title="automations commands", metavar="ACTION")
    install = actions.add_parser(
        "install",
        help="install (or replace) the automation of a template, notifying through a block",
    )
    install.add_argument(
        "--block",
        required=True,
        metavar="TYPE/NAME",
        help="the notification block to send with, created first (e.g. "
        "custom-webhook/calypso-notify, mattermost-webhook/beamline-staff)",
    )
    install.add_argument(
        "--template", type=Path, default=TEMPLATE, help=f"automation template (default {TEMPLATE})"
    )
    install.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the filled-in automation as JSON (for `prefect automation create "
        "--from-json`) instead of installing it",
    )
    install.set_defaults(handler=command_automations_install)


def command_automations_install(args: argparse.Namespace) -> int:
    from calypso.flows.runtime import check_prefect_api, prepare_environment

    prepare_environment(load_settings())  # before Prefect reads its settings (the secret)
    from prefect.client.orchestration import get_client

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigurationError(
            "calypso automations installs on a Prefect server: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api, where `calypso server` listens)"
        )
    check_prefect_api()
    with get_client(sync_client=True) as client:
        block_id = notification_block(client, args.block)
        automation = from_template(args.template, block_id)
        if args.print_only:
            print(json.dumps(automation.model_dump(mode="json"), indent=2))
            return 0
        same = client.read_automations_by_name(automation.name)
        if same:
            client.update_automation(same[0].id, automation)
            for duplicate in same[1:]:  # left by hand-made copies: one notification a run
                client.delete_automation(duplicate.id)
            automation_id, verb = same[0].id, "replaced"
        else:
            automation_id, verb = client.create_automation(automation), "created"
    print(
        f"{verb} automation {automation.name!r} ({automation_id}): it notifies through "
        f"{args.block} when a flow run tagged calypso ends"
    )
    return 0


def notification_block(client: Any, block: str) -> str:
    """The id of block ``TYPE/NAME``, which must be able to send notifications."""
    from prefect.exceptions import ObjectNotFound

    kind, _, name = block.partition("/")
    if not (kind and name):
        raise ConfigurationError(
            f"--block {block!r}: give the block's type and name, e.g. custom-webhook/calypso-notify"
        )
    try:
        document = client.read_block_document_by_name(name=name, block_type_slug=kind)
    except ObjectNotFound:
        raise ConfigurationError(
            f"the Prefect server has no block {block}: create the notification block first "
            "(Prefect UI, Blocks; or in Python, docs/operations/automation.md)"
        ) from None
    capabilities = document.block_schema.capabilities if document.block_schema else []
    if "notify" not in capabilities:
        raise ConfigurationError(
            f"the block {block} cannot send notifications: use a notification block "
            "(custom-webhook, mattermost-webhook, slack-webhook, sendgrid-email ...)"
        )
    return str(document.id)


def from_template(path: Path, block_id: str) -> AutomationCore:
    """The automation of template ``path`` notifying through block ``block_id``, checked."""
    import yaml
    from prefect.events.schemas.automations import AutomationCore
    from pydantic import ValidationError

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the automation template {path}: {exc}") from None
    # ${...} fields only: Prefect's own {{ }} templating is left for the server.
    data = yaml.safe_load(string.Template(text).safe_substitute({FIELD: block_id}))
    try:
        return AutomationCore.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigurationError(
            f"{path} is not a Prefect automation: {where}: {first['msg']}"
        ) from None
