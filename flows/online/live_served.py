"""Live runs that ``calypso serve`` starts at a scan's start (docs/live.md, "Started by
the service").

The flow ``<technique>-live`` (diffraction, MX) as a deployment serves it: the same live
reduction as ``calypso run TECHNIQUE --live`` (:func:`calypso.flows.online.live.
follow_and_reduce`), with the technique's parameter model as its form, confined as a
served run of the technique flow is, and fed by the scan the triggering event names
(``calypso.acquisition.started``: the blissdata server and the scan's key there). Its
``trigger`` is the processing key of the scan's completed event, so the live run and the
end-of-scan run claim the same key in the catalogue: one of them processes the scan.

The flows (``diffraction_live``, ``mx_live`` ...: one per technique fed live) are made when
first asked for, after ``calypso serve`` has pointed ``CALYPSO_EXECUTOR__*`` at the cluster
it keeps.
"""

from __future__ import annotations

from typing import Any

from calypso.flows.online.live_base import LIVE_TECHNIQUES
from calypso.flows.online.scan_starts import public_url
from calypso.settings import CalypsoSettings

# What a fork server imports for live runs besides the live flows' own modules: the
# blissdata client (a live run's first import of it costs ~1 s).
BLISSDATA_MODULES = ("redis", "blissdata.redis_engine.store", "blissdata.streams.lima")


def with_credentials(source: str, settings: CalypsoSettings) -> str:
    """The blissdata URL to connect to: the configured one (with its password) when the
    event names that server, else the event's own (``files`` stays ``files``)."""
    configured = settings.watch.blissdata_url
    if configured and source != "files" and public_url(configured) == public_url(source):
        return configured
    return source


def served_live_flow(technique: str, module: str) -> Any:
    """The Prefect flow ``<technique>-live`` of a deployment, in ``module``."""
    from prefect import flow

    from calypso.executors.flow_runner import flow_task_runner
    from calypso.flows.online.live import live_technique
    from calypso.flows.techniques import TECHNIQUES

    model = TECHNIQUES[technique].parameters()

    def run(
        raw: str,
        parameters: model | None = None,  # type: ignore[valid-type]
        scans: list[int] | None = None,
        output_dir: str | None = None,
        export_to: str | None = None,
        trigger: str | None = None,
        source: str = "files",
        scan_key: str | None = None,
    ) -> dict[str, Any]:
        from calypso.flows.online.live import follow_and_reduce
        from calypso.registry.access import served_run, service_identity
        from calypso.settings import load_settings

        settings = load_settings()
        chosen = parameters or model()
        if served_run():  # nobody checked it before: the service confines it (#20)
            from calypso.flows.api import confine_run

            confine_run(
                technique, raw, chosen, output_dir, settings, service_identity(settings),
                export_to,
            )  # fmt: skip
        live = {"source": with_credentials(source, settings), "key": scan_key}
        return follow_and_reduce(
            technique, raw, chosen, scans, output_dir, export_to, trigger, live=live
        )

    name = f"{technique}_live"
    run.__name__ = run.__qualname__ = name
    run.__module__ = module
    run.__doc__ = (
        f"{TECHNIQUES[technique].description} Live: follows the scan in progress (started "
        "at the scan's start by `calypso watch --blissdata`), gives the offline result."
    )
    run.__annotations__["parameters"] = model | None
    return flow(
        name=f"{technique}-live",
        persist_result=False,
        log_prints=True,
        task_runner=flow_task_runner([live_technique(technique).preload]),
    )(run)


def live_modules(techniques: list[str]) -> list[str]:
    """What a fork server imports so that live runs of ``techniques`` start warm."""
    from calypso.flows.techniques import imported_modules

    roots = {__name__, "calypso.flows.online.live"}
    roots |= {LIVE_TECHNIQUES[name].split(":")[0] for name in techniques}
    return [*imported_modules(frozenset(roots)), *BLISSDATA_MODULES]


def __getattr__(name: str) -> Any:
    """``<technique>_live``: the served live flow of each technique fed live, made when
    first asked for (serve, a deployment's entry point) and kept."""
    technique = name.removesuffix("_live")
    if not name.endswith("_live") or technique not in LIVE_TECHNIQUES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    made = globals()[name] = served_live_flow(technique, __name__)
    return made
