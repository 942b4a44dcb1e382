"""``deploy/prefect.yaml``, written from the technique descriptors: one deployment per
technique (its entry point, concurrency, tags and acquisition trigger), one per technique
fed live (``<technique>-live``, started at a scan's start: docs/live.md), and the
``saved-flow`` deployment. ``calypso deployments --write`` renews the file; a test
checks it is current."""

from __future__ import annotations

from pathlib import Path

from calypso.flows.online.acquisitions import LIVE_EVENT, live_deployment
from calypso.flows.techniques import TECHNIQUES, Technique

FILE = Path(__file__).resolve().parents[1] / "deploy" / "prefect.yaml"

_HEADER = """\
# Calypso's deployments for a Prefect work pool (an alternative to `calypso serve`,
# for facilities that run Prefect workers): one deployment per technique, each
# triggered by the acquisition events `calypso watch` posts, and a live one for each
# technique reduced while its scan runs (`<technique>-live`, triggered at scan start by
# `calypso watch --blissdata`; give the workers CALYPSO_WATCH__BLISSDATA_URL when the
# Bliss data server asks for a password).
#
#   prefect work-pool create calypso --type process
#   cd /opt/calypso && prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml
#   prefect worker start --pool calypso
#
# Flow runs then use the Dask cluster named by CALYPSO_EXECUTOR__KIND/ADDRESS
# (a long-lived scheduler, SLURM or OpenStack) in the worker's environment.
#
# Written by `calypso deployments --write` from the technique descriptors
# (calypso.flows.builtin): edit those, not this file.
name: calypso
prefect-version: 3.4.0

pull:
  - prefect.deployments.steps.set_working_directory:
      directory: /opt/calypso

definitions:
  work_pool: &pool
    name: calypso
    work_queue_name: default
  from_event: &from_event
    raw: "{{ event.payload.raw }}"
    scans:
      __prefect_kind: json
      value:
        __prefect_kind: jinja
        template: "{{ event.payload.scans | tojson }}"
    parameters:
      __prefect_kind: json
      value:
        __prefect_kind: jinja
        template: "{{ event.payload.parameters | tojson }}"
    trigger: "{{ event.payload.key }}"
  from_live_event: &from_live_event
    <<: *from_event
    source: "{{ event.payload.source }}"
    scan_key: "{{ event.payload.scan_key }}"

deployments:
"""

_SAVED_FLOW = """\
  # Every saved user flow, by name (the event's `flow`). `calypso serve` instead keeps one
  # deployment per saved flow, following the registry; use one way or the other, not both.
  - name: saved-flow
    entrypoint: flows/user_flows.py:saved_flow
    tags: [calypso, user-flow]
    concurrency_limit: {concurrency}
    work_pool: *pool
    triggers:
      - type: event
        enabled: true
        expect: [calypso.acquisition.completed]
        match: {{calypso.technique: saved-flow}}
        parameters:
          name:
            __prefect_kind: json
            value:
              __prefect_kind: jinja
              template: "{{{{ event.payload.flow | tojson }}}}"
          raw: "{{{{ event.payload.raw }}}}"
          scans:
            __prefect_kind: json
            value:
              __prefect_kind: jinja
              template: "{{{{ event.payload.scans | tojson }}}}"
          trigger: "{{{{ event.payload.key }}}}"
"""


def _entrypoint(technique: Technique) -> str:
    """``flows/diffraction.py:diffraction``: the flow's file, relative to the repository."""
    module, name = technique.flow_at.split(":")
    return f"{'/'.join(module.split('.')[1:])}.py:{name}"


def _deployment(technique: Technique) -> str:
    return f"""\
  - name: {technique.name}
    entrypoint: {_entrypoint(technique)}
    tags: [calypso, {technique.name}]
    concurrency_limit: {technique.concurrency}
    work_pool: *pool
    triggers:
      - type: event
        enabled: true
        expect: [calypso.acquisition.completed]
        match: {{calypso.technique: {technique.name}}}
        parameters: *from_event

"""


def _live_deployment(technique: Technique) -> str:
    """The deployment of ``technique``'s live flow (:mod:`calypso.flows.online.live_served`)."""
    return f"""\
  - name: {live_deployment(technique.name)}
    entrypoint: flows/online/live_served.py:{technique.name}_live
    tags: [calypso, {technique.name}, live]
    concurrency_limit: {technique.concurrency}
    work_pool: *pool
    triggers:
      - type: event
        enabled: true
        expect: [{LIVE_EVENT}]
        match: {{calypso.technique: {technique.name}}}
        parameters: *from_live_event

"""


def prefect_yaml() -> str:
    """The text of ``deploy/prefect.yaml`` for the techniques Calypso knows."""
    from calypso.flows.online.live_base import LIVE_TECHNIQUES
    from calypso.flows.online.serve import SAVED_FLOW_CONCURRENCY

    body = "".join(
        _deployment(technique)
        + (_live_deployment(technique) if technique.name in LIVE_TECHNIQUES else "")
        for technique in TECHNIQUES.values()
    )
    return _HEADER + body + _SAVED_FLOW.format(concurrency=SAVED_FLOW_CONCURRENCY)
