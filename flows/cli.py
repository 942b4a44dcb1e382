"""The ``calypso`` command line.

Every error Calypso anticipates is a :class:`~calypso.errors.CalypsoError`:
the CLI prints its message (no traceback) and exits non-zero.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from calypso.errors import CalypsoError, ConfigurationError, ParameterError
from calypso.flows.techniques import TECHNIQUES as TECHNIQUE_TABLE
from calypso.settings import CalypsoSettings, load_settings

TECHNIQUES = tuple(TECHNIQUE_TABLE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except CalypsoError as exc:
        print(f"calypso: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("calypso: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` or a pager that quit
        sys.stderr.close()
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calypso", description="Synchrotron data reduction flows (Prefect + Dask)."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", help="reduce a raw dataset with a technique flow")
    run.add_argument("technique", choices=TECHNIQUES)
    run.add_argument("input", help="raw dataset folder (ESRF layout), Bliss file or image file(s)")
    run.add_argument(
        "--scan",
        type=int,
        action="append",
        dest="scans",
        metavar="N",
        help="scan number to reduce (repeatable; default: every scan)",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a parameter (see `calypso parameters TECHNIQUE`)",
    )
    run.add_argument("--params", metavar="FILE", help="parameters from a JSON or YAML file")
    run.add_argument(
        "--output",
        metavar="DIR",
        help="output folder (default: the dataset's PROCESSED_DATA folder)",
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local Dask worker processes (default: one per core)",
    )
    run.add_argument(
        "--export-to",
        metavar="URI",
        help="then export the results under this prefix (s3://bucket/prefix, a folder ...)",
    )
    run.add_argument("--json", action="store_true", help="print a machine-readable summary")
    run.add_argument("-v", "--verbose", action="store_true", help="show Prefect and Dask logs")
    run.set_defaults(handler=command_run)

    export = commands.add_parser(
        "export", help="copy a processed dataset to object storage (S3, ...), resumable"
    )
    export.add_argument("source", help="processed dataset folder, or its catalogue id")
    export.add_argument(
        "--to",
        metavar="URI",
        help="s3://bucket/prefix or any fsspec URL or folder (default: settings' "
        "export.default_target, then <home>/export/<folder name>)",
    )
    export.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="only files matching this shell pattern (repeatable), e.g. '*.h5'",
    )
    export.add_argument(
        "--verify", action="store_true", help="read every object back and check its SHA-256"
    )
    export.add_argument("--json", action="store_true", help="print a machine-readable summary")
    export.set_defaults(handler=command_export)

    params = commands.add_parser("parameters", help="list a technique's parameters")
    params.add_argument("technique", choices=TECHNIQUES)
    params.add_argument("--json", action="store_true", help="print the JSON schema")
    params.set_defaults(handler=command_parameters)

    sample = commands.add_parser("sample-data", help="write realistic sample raw data")
    sample.add_argument("technique", choices=TECHNIQUES)
    sample.add_argument("directory", help="root folder (like /data/visitor)")
    sample.add_argument("--frames", type=int, default=100, help="diffraction: frames in the scan")
    sample.add_argument(
        "--repeats", type=int, default=3, help="spectroscopy: repeated scans of a foil"
    )
    sample.add_argument(
        "--spectra",
        type=int,
        default=0,
        help="spectroscopy: write a mapping scan of N spectra instead of repeated scans",
    )
    sample.add_argument(
        "--size",
        type=int,
        nargs=3,
        metavar=("ROWS", "COLUMNS", "PROJECTIONS"),
        default=(32, 192, 360),
        help="tomography: detector rows and columns, and projections over 180 degrees",
    )
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=command_sample_data)

    demo = commands.add_parser("demo", help="generate sample data and reduce it")
    demo.add_argument("--directory", default="demo-data", help="where to put the demo data")
    demo.add_argument("--frames", type=int, default=100)
    demo.set_defaults(handler=command_demo)

    server = commands.add_parser("server", help="start a local Prefect server with its UI")
    server.add_argument("--host", help="address to listen on (default: settings, 127.0.0.1)")
    server.add_argument("--port", type=int, help="port (default: settings, 4200)")
    server.set_defaults(handler=command_server)

    serve = commands.add_parser(
        "serve", help="serve one Prefect deployment per technique, triggered by acquisitions"
    )
    serve.add_argument(
        "--technique",
        action="append",
        choices=TECHNIQUES,
        dest="techniques",
        help="serve only this technique (repeatable; default: all)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="show Prefect and Dask logs")
    serve.set_defaults(handler=command_serve)

    watch = commands.add_parser(
        "watch", help="follow RAW_DATA trees and announce every finished scan to Prefect"
    )
    watch.add_argument("roots", nargs="+", metavar="ROOT", help="e.g. /data/visitor")
    watch.add_argument("--once", action="store_true", help="one pass, then exit")
    watch.add_argument("--interval", type=float, metavar="S", help="seconds between polls")
    watch.set_defaults(handler=command_watch)

    flows = commands.add_parser("flows", help="user flows: check, save, list, show, diff, run")
    flow_commands = flows.add_subparsers(title="flow commands", metavar="ACTION")
    tasks = flow_commands.add_parser("tasks", help="the steps a user flow may use")
    tasks.set_defaults(handler=command_flows_tasks)
    export_flow = flow_commands.add_parser("export", help="a built-in flow as a specification")
    export_flow.add_argument("technique", choices=TECHNIQUES)
    export_flow.set_defaults(handler=command_flows_export)
    check_flow = flow_commands.add_parser("check", help="check a specification file")
    check_flow.add_argument("file")
    check_flow.set_defaults(handler=command_flows_check)
    save = flow_commands.add_parser("save", help="store a new version of a flow")
    save.add_argument("file")
    save.add_argument("--name", required=True)
    save.add_argument("--proposal", help="the proposal it belongs to (its data only)")
    save.add_argument("--description", default="")
    save.set_defaults(handler=command_flows_save)
    listing_flows = flow_commands.add_parser("list", help="saved flows and their versions")
    listing_flows.set_defaults(handler=command_flows_list)
    show_flow = flow_commands.add_parser("show", help="a saved flow's specification")
    show_flow.add_argument("reference", metavar="NAME[@VERSION]")
    show_flow.set_defaults(handler=command_flows_show)
    diff = flow_commands.add_parser("diff", help="what changed between two versions")
    diff.add_argument("first", metavar="NAME@V1")
    diff.add_argument("second", metavar="NAME@V2")
    diff.set_defaults(handler=command_flows_diff)
    run_flow = flow_commands.add_parser("run", help="run a saved flow on a raw dataset")
    run_flow.add_argument("reference", metavar="NAME[@VERSION]")
    run_flow.add_argument("input", help="raw dataset folder (inside the flow's proposal)")
    run_flow.add_argument("--scan", type=int, action="append", dest="scans", metavar="N")
    run_flow.add_argument("--output", metavar="DIR", help="inside the proposal")
    run_flow.add_argument("--workers", type=int, metavar="N")
    run_flow.add_argument("--json", action="store_true")
    run_flow.set_defaults(handler=command_flows_run)
    delete = flow_commands.add_parser("delete", help="delete a saved flow (every version)")
    delete.add_argument("name")
    delete.set_defaults(handler=command_flows_delete)

    cluster = commands.add_parser(
        "cluster", help="a long-lived Dask cluster (OpenStack VMs) that flow runs use by address"
    )
    cluster_commands = cluster.add_subparsers(title="cluster commands", metavar="ACTION")
    up = cluster_commands.add_parser("up", help="start it and keep it (Ctrl-C stops it)")
    up.add_argument("provider", choices=["openstack"])
    up.set_defaults(handler=command_cluster_up)
    status = cluster_commands.add_parser("status", help="its address and workers")
    status.set_defaults(handler=command_cluster_status)
    down = cluster_commands.add_parser("down", help="stop it and its VMs")
    down.set_defaults(handler=command_cluster_down)

    catalogue = commands.add_parser("catalogue", help="the catalogue of processed datasets")
    catalogue_commands = catalogue.add_subparsers(title="catalogue commands", metavar="ACTION")
    listing = catalogue_commands.add_parser("list", help="list processed datasets")
    listing.add_argument("--technique", choices=TECHNIQUES)
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    listing.add_argument(
        "--pending", action="store_true", help="registrations waiting for delivery to ICAT"
    )
    listing.set_defaults(handler=command_catalogue_list)
    flush = catalogue_commands.add_parser("flush", help="deliver pending ICAT registrations")
    flush.set_defaults(handler=command_catalogue_flush)
    check = catalogue_commands.add_parser(
        "check", help="is the ICAT broker reachable, its queue consumed, ICAT+ up?"
    )
    check.set_defaults(handler=command_catalogue_check)
    show = catalogue_commands.add_parser("show", help="show one processed dataset")
    show.add_argument("id", type=int)
    show.set_defaults(handler=command_catalogue_show)
    return parser


# -- parameters -------------------------------------------------------------


def parameter_model(technique: str) -> type[BaseModel]:
    return TECHNIQUE_TABLE[technique].parameters()


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parameters(
    technique: str, assignments: list[str], params_file: str | None = None
) -> BaseModel:
    """The technique's parameter model from a file and ``NAME=VALUE`` assignments."""
    model = parameter_model(technique)
    values: dict[str, Any] = {}
    if params_file:
        values.update(_read_params_file(Path(params_file)))
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"--set {assignment!r}: expected NAME=VALUE, e.g. --set npt=2000")
        values[name.strip()] = _parse_value(text.strip())
    unknown = [name for name in values if name not in model.model_fields]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, model.model_fields, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParameterError(
            f"unknown {technique} parameter {', '.join(hints)}; known parameters: "
            f"{', '.join(model.model_fields)} (`calypso parameters {technique}` explains them)"
        )
    try:
        return model(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        )
        source = f" in {params_file}" if params_file else ""
        raise ParameterError(f"invalid {technique} parameters{source}: {problems}") from None


def _read_params_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParameterError(f"parameter file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ParameterError(f"parameter file {path} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"parameter file {path} must hold a mapping of NAME: VALUE")
    return data


def command_parameters(args: argparse.Namespace) -> int:
    model = parameter_model(args.technique)
    if args.json:
        print(json.dumps(model.model_json_schema(), indent=2))
        return 0
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        print(f"{name:22s} default={default!r}\n    {field.description or ''}")
    return 0


# -- run ----------------------------------------------------------------------


def command_run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.workers:
        overrides["executor"] = {"kind": "local", "n_workers": args.workers}
    settings = load_settings(**overrides) if overrides else load_settings()
    from calypso.flows.runtime import prepare_environment

    prepare_environment(settings, verbose=args.verbose)
    parameters = build_parameters(args.technique, args.set, args.params)
    summary = run_technique(
        args.technique,
        args.input,
        parameters,
        args.scans,
        args.output,
        settings,
        export_to=args.export_to,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


def run_technique(
    technique: str,
    input_path: str,
    parameters: BaseModel,
    scans: list[int] | None,
    output: str | None,
    settings: CalypsoSettings,
    export_to: str | None = None,
) -> dict[str, Any]:
    """Check the input, then run the technique's flow on the configured Dask cluster."""
    began = time.perf_counter()
    from calypso.executors import local_worker_count

    entry = TECHNIQUE_TABLE[technique]
    if settings.executor.preload == type(settings.executor)().preload:
        # Workers import this technique's code while they start, not another's.
        settings = settings.model_copy(
            update={
                "executor": settings.executor.model_copy(update={"preload": [entry.task_module]})
            }
        )
    # Check everything before Prefect or Dask start: bad input fails in a
    # second, with one message and nothing written.
    plan = entry.plan()(
        input_path, parameters, scans, output, settings, local_worker_count(settings.executor)
    )
    total = getattr(plan, entry.count_attribute)
    technique_flow = entry.flow()
    if export_to:
        from calypso.tasks.export import check_target_uri

        check_target_uri(export_to)
    summary = run_on_cluster(
        settings,
        total,
        entry.unit,
        lambda runner: technique_flow.with_options(task_runner=runner)(
            raw=input_path,
            parameters=parameters,
            scans=scans,
            output_dir=output,
            export_to=export_to,
        ),
    )
    summary["wall_s"] = round(time.perf_counter() - began, 3)
    return summary


def run_on_cluster(settings: CalypsoSettings, total: int, unit: str, call) -> Any:
    """``call(task_runner)`` with a Prefect API up, on the Dask cluster the settings name
    (a local one boots while Prefect starts), a progress bar counting ``unit``."""
    from calypso.executors import boot_local_cluster, build_task_runner
    from calypso.flows.progress import listening
    from calypso.flows.runtime import check_prefect_api, prefect_api

    check_prefect_api()
    booting = boot_local_cluster(settings.executor)
    with ExitStack() as stack:
        if booting is not None:  # closed even if the Prefect API never comes up
            stack.callback(_close_cluster, booting)
        stack.enter_context(prefect_api())
        if booting is not None:  # ... and normally before the API goes: workers flush logs to it
            stack.callback(_close_cluster, booting)
        bar = stack.enter_context(closing(_Bar(total, unit)))
        stack.enter_context(listening(bar.update_to))
        runner = build_task_runner(settings.executor, cluster=booting.result() if booting else None)
        return call(runner)


def _close_cluster(booting) -> None:
    booting.result().close()  # closing twice is harmless


class _Bar:
    def __init__(self, total: int, unit: str, scale: bool = False) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            unit=unit,
            unit_scale=scale,
            unit_divisor=1024 if scale else 1000,
            file=sys.stderr,
            disable=None,
            leave=False,
        )

    def update_to(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def print_summary(summary: dict[str, Any]) -> None:
    timings = summary["timings_s"]
    unit = summary["unit"]
    print(
        f"{summary['technique']}: {summary['count']} {unit} in {summary['tasks']} tasks, "
        f"flow {timings['total']:.1f} s ({summary['per_s']:.1f} {unit}/s), "
        f"command {summary['wall_s']:.1f} s"
    )
    print(f"results in {summary['processed_dataset_dir']}")
    for url in summary["outputs"]:
        print(f"  {url}")
    print(
        f"catalogue id {summary['catalogue_id']} (calypso catalogue show {summary['catalogue_id']})"
    )
    if summary.get("export"):
        print_export(summary["export"])
    for warning in summary.get("warnings", []):
        print(f"calypso: warning: {warning}", file=sys.stderr)


def print_export(export: dict[str, Any]) -> None:
    print(
        f"exported {export['files']} files ({export['bytes'] / 2**20:.1f} MiB) to "
        f"{export['uri']}: {export['uploaded']} sent, {export['already_there']} already there"
        f" ({export['megabytes_per_s']:.1f} MiB/s){', verified' if export['verified'] else ''}"
    )
    print(f"manifest: {export['manifest']}")
    for warning in export.get("warnings", []):
        print(f"calypso: warning: {warning}", file=sys.stderr)


# -- export -------------------------------------------------------------------


def command_export(args: argparse.Namespace) -> int:
    from calypso.tasks.export import (
        dataset_to_export,
        export_dataset,
        export_summary,
        record_export,
    )

    settings = load_settings()
    source, record_id = dataset_to_export(args.source, settings)
    target = args.to or f"{settings.export_target.rstrip('/')}/{source.name}"
    bar = _Bar(0, "B", scale=True)
    try:
        report = export_dataset(
            source, target, settings, args.include, args.verify, progress=bar.update_to
        )
    finally:
        bar.close()
    summary = export_summary(report, record_export(report, record_id, settings))
    if args.json:
        print(json.dumps(summary | {"source": str(source), "catalogue_id": record_id}, indent=2))
    else:
        print_export(summary)
    return 0


# -- sample data and demo -----------------------------------------------------


def command_sample_data(args: argparse.Namespace) -> int:
    if args.technique == "spectroscopy":
        return _sample_spectroscopy(args)
    if args.technique == "tomography":
        return _sample_tomography(args)
    if args.technique == "mx":
        return _sample_mx(args)
    from calypso.tasks.sample_data import write_diffraction_sample

    if args.frames < 1:
        raise ParameterError("--frames must be at least 1")
    sample = write_diffraction_sample(Path(args.directory), frames=args.frames, seed=args.seed)
    print(f"raw dataset: {sample.raw_dataset_dir}")
    for name, path in sample.calibration.items():
        print(f"{name}: {path}")
    print(
        "reduce it with:\n  calypso run diffraction "
        f"{sample.raw_dataset_dir} {' '.join(_diffraction_demo_settings(sample))}"
    )
    return 0


def _sample_spectroscopy(args: argparse.Namespace) -> int:
    from calypso.tasks.sample_spectroscopy import (
        reference_spectrum,
        write_spectroscopy_map_sample,
        write_spectroscopy_sample,
    )

    if args.spectra < 0 or args.repeats < 1:
        raise ParameterError("--spectra must be >= 0 and --repeats >= 1")
    if args.spectra:
        dataset = write_spectroscopy_map_sample(Path(args.directory), args.spectra, seed=args.seed)
    else:
        dataset = write_spectroscopy_sample(Path(args.directory), args.repeats, seed=args.seed)
    print(f"raw dataset: {dataset.raw_dataset_dir} (from {reference_spectrum().source})")
    print(f"reduce it with:\n  calypso run spectroscopy {dataset.raw_dataset_dir}")
    return 0


def _sample_tomography(args: argparse.Namespace) -> int:
    from calypso.tasks.sample_tomography import write_tomography_sample

    rows, columns, projections = args.size
    if rows < 1 or columns < 32 or projections < 10:
        raise ParameterError("--size: at least 1 row, 32 columns and 10 projections")
    sample = write_tomography_sample(
        Path(args.directory), rows=rows, columns=columns, projections=projections, seed=args.seed
    )
    print(f"raw dataset: {sample.raw_dataset_dir}")
    print(
        f"ground truth: {sample.ground_truth} (true centre of rotation "
        f"{sample.geometry.center_of_rotation:.2f} px)"
    )
    print(
        f"reduce it with:\n  calypso run tomography {sample.raw_dataset_dir}\n"
        f"or look first:\n  calypso run tomography {sample.raw_dataset_dir} --set mode=preview"
    )
    return 0


def _sample_mx(args: argparse.Namespace) -> int:
    from calypso.tasks.sample_mx import write_mx_sample

    sample = write_mx_sample(Path(args.directory), seed=args.seed)
    print(f"raw dataset: {sample.raw_dataset_dir}")
    print(f"mask: {sample.mask}")
    print(
        f"ground truth: {sample.ground_truth} (grid {sample.grid[0]}x{sample.grid[1]}, "
        f"crystal centred in cell row {sample.crystal_cell[0]}, column {sample.crystal_cell[1]})"
    )
    print(f"reduce it with:\n  calypso run mx {sample.raw_dataset_dir} --set mask={sample.mask}")
    return 0


def _diffraction_demo_settings(sample) -> list[str]:
    return [
        f"--set poni={sample.calibration['poni']}",
        f"--set mask={sample.calibration['mask']}",
        "--set monitor=mon",
        "--set monitor_reference=1e5",
        "--set unit=2th_deg",
    ]


def _reduce(
    technique: str, raw_dir: Path, settings: CalypsoSettings, assignments: list[str] | None = None
) -> dict[str, Any]:
    """Run a technique's flow with default parameters (plus ``assignments``) and print it."""
    parameters = build_parameters(technique, assignments or [], None)
    summary = run_technique(technique, str(raw_dir), parameters, None, None, settings)
    print_summary(summary)
    return summary


def command_demo(args: argparse.Namespace) -> int:
    from calypso.tasks.sample_data import write_diffraction_sample
    from calypso.tasks.sample_mx import write_mx_sample
    from calypso.tasks.sample_spectroscopy import write_spectroscopy_sample
    from calypso.tasks.sample_tomography import write_tomography_sample

    root = Path(args.directory).absolute()
    settings = load_settings()
    from calypso.flows.runtime import prepare_environment

    prepare_environment(settings)
    if root.exists():
        shutil.rmtree(root)
    print(f"Writing {args.frames} Pilatus 1M frames of CeO2 in the ESRF layout under {root} ...")
    sample = write_diffraction_sample(root, frames=args.frames)
    print(f"raw dataset: {sample.raw_dataset_dir}")
    settings_text = [s.split(" ", 1)[1] for s in _diffraction_demo_settings(sample)]
    print("Reducing it with the diffraction flow on a local Dask cluster under Prefect ...")
    summary = _reduce("diffraction", sample.raw_dataset_dir, settings, settings_text)
    print("Look at the result with: silx view " + summary["outputs"][0].split("::")[0])

    print("\nWriting 3 XAS scans of an Fe foil (transmission, reference foil channel) ...")
    xas_dataset = write_spectroscopy_sample(root, repeats=3)
    print(f"raw dataset: {xas_dataset.raw_dataset_dir}")
    print("Reducing them with the spectroscopy flow (calibrate, merge, normalise, EXAFS) ...")
    summary = _reduce("spectroscopy", xas_dataset.raw_dataset_dir, settings)
    print(f"Quick look: {summary['png']}")

    print("\nWriting a tomography scan of a 3D phantom (darks, flats, 360 projections) ...")
    tomo_sample = write_tomography_sample(root)
    print(f"raw dataset: {tomo_sample.raw_dataset_dir}")
    print("Reconstructing it with the tomography flow (flat field, rings, axis, FBP) ...")
    summary = _reduce("tomography", tomo_sample.raw_dataset_dir, settings)
    print(
        f"centre of rotation {summary['center_of_rotation']:.2f} px "
        f"(true {tomo_sample.geometry.center_of_rotation:.2f}); quick look: {summary['png']}"
    )

    print("\nWriting a 5x7 MX grid scan of thaumatin stills (Eiger-like, ice in 2 frames) ...")
    mx_sample = write_mx_sample(root)
    print(f"raw dataset: {mx_sample.raw_dataset_dir}")
    print("Finding spots, hits and the centring position with the MX flow ...")
    summary = _reduce("mx", mx_sample.raw_dataset_dir, settings, [f"mask={mx_sample.mask}"])
    scan = summary["report"]["scans"][0]
    best = scan["best_position"]
    print(
        f"hit rate {scan['hit_rate']:.0%}, ice rings on {scan['ice_ring_images']} images; "
        f"centre on grid cell row {best['row']}, column {best['column']} (the crystal is in "
        f"row {mx_sample.crystal_cell[0]}, column {mx_sample.crystal_cell[1]}); "
        f"quick look: {summary['png']}"
    )
    return 0


# -- server and catalogue ---------------------------------------------------


def command_server(args: argparse.Namespace) -> int:
    settings = load_settings()
    host = args.host or settings.server.host
    port = args.port or settings.server.port
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_UI_API_URL", f"http://{host}:{port}/api")
    prefect = Path(sys.executable).with_name("prefect")
    command = [
        str(prefect) if prefect.exists() else "prefect",
        "server",
        "start",
        "--host",
        host,
        "--port",
        str(port),
    ]
    print(
        f"Prefect server and UI on http://{host}:{port} (Ctrl-C stops it); point runs at it with\n"
        f"  export PREFECT_API_URL=http://{host}:{port}/api",
        flush=True,
    )
    os.execvpe(command[0], command, env)
    return 0  # not reached


def command_serve(args: argparse.Namespace) -> int:
    from calypso.flows.runtime import prepare_environment
    from calypso.flows.serve import serve

    settings = load_settings()
    prepare_environment(settings, verbose=args.verbose)
    # Flow runs log to the Prefect UI; this console says what serve itself does.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    _log_to_stderr()
    serve(settings, args.techniques)
    return 0


def command_watch(args: argparse.Namespace) -> int:
    from calypso.flows.runtime import check_prefect_api, prepare_environment
    from calypso.flows.watch import Watcher

    settings = load_settings()
    if args.interval:
        settings = settings.model_copy(
            update={"watch": settings.watch.model_copy(update={"interval_s": args.interval})}
        )
    prepare_environment(settings)
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise ConfigurationError(
            "calypso watch posts events to a Prefect server: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api, where `calypso server` listens)"
        )
    check_prefect_api()
    roots = [Path(root).absolute() for root in args.roots]
    missing = [str(root) for root in roots if not root.is_dir()]
    if missing:
        raise ConfigurationError(f"cannot watch {', '.join(missing)}: not a folder")
    if not settings.watch.beamlines:
        raise ConfigurationError(
            "no beamline rules: set CALYPSO_WATCH__BEAMLINES (or [watch.beamlines] in the "
            "config file) to say which technique reduces which scans (see README 'Triggers')"
        )
    _log_to_stderr()
    Watcher(roots, settings, api).run(once=args.once)
    return 0


# -- user flows ---------------------------------------------------------------


def _saved_flows():
    from calypso.registry.saved_flows import SavedFlows

    return SavedFlows(load_settings().catalogue_path)


def _user():
    import getpass

    from calypso.registry.saved_flows import User

    settings = load_settings()
    return User(name=settings.user.name or getpass.getuser(), proposals=settings.user.proposals)


def _read_specification(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ParameterError(f"cannot read the flow specification {path}: {exc}") from None


def command_flows_tasks(args: argparse.Namespace) -> int:
    from calypso.flows.steps import STEPS

    for step in STEPS.values():
        inputs = ", ".join(f"{port}: {kind}" for port, kind in step.inputs.items()) or "-"
        parameters = f" + {step.technique} parameters" if step.takes_parameters else ""
        print(f"{step.name:30s} ({inputs}{parameters}) -> {step.output}\n    {step.description}")
    return 0


def command_flows_export(args: argparse.Namespace) -> int:
    from calypso.flows.user_flows import export_specification

    print(export_specification(args.technique), end="")
    return 0


def command_flows_check(args: argparse.Namespace) -> int:
    from calypso.flows.user_flows import check_specification

    spec = check_specification(_read_specification(args.file), args.file)
    variants = len(spec.variants()) if spec.sweep else 1
    print(f"{args.file}: valid {spec.technique} flow, steps {' -> '.join(spec.order)}", end="")
    print(f"; sweep of {variants} variants" if spec.sweep else "")
    return 0


def command_flows_save(args: argparse.Namespace) -> int:
    from calypso.flows.user_flows import check_specification

    text = _read_specification(args.file)
    spec = check_specification(text, args.file)
    saved = _saved_flows().save(
        args.name, text, spec.technique, _user(), args.proposal, args.description
    )
    print(
        f"saved {saved.label} ({saved.technique}, owner {saved.owner}, proposal {saved.proposal})"
    )
    return 0


def command_flows_list(args: argparse.Namespace) -> int:
    flows = _saved_flows().list()
    if not flows:
        print("no saved flows (`calypso flows save FILE --name NAME`)")
    for flow in flows:
        print(
            f"{flow.label:24s} {flow.technique:12s} {flow.owner:10s} {flow.proposal or '-':8s} "
            f"{flow.created}  {flow.description}"
        )
    return 0


def _get_saved(reference: str):
    from calypso.registry.saved_flows import parse_reference

    return _saved_flows().get(*parse_reference(reference))


def command_flows_show(args: argparse.Namespace) -> int:
    flow = _get_saved(args.reference)
    print(
        f"# {flow.label}: {flow.technique}, owner {flow.owner}, proposal {flow.proposal}, "
        f"saved {flow.created} with Calypso {flow.calypso_version}\n# {flow.description}"
    )
    print(flow.specification, end="")
    return 0


def command_flows_diff(args: argparse.Namespace) -> int:
    first, second = _get_saved(args.first), _get_saved(args.second)
    lines = difflib.unified_diff(
        first.specification.splitlines(keepends=True),
        second.specification.splitlines(keepends=True),
        fromfile=first.label,
        tofile=second.label,
    )
    sys.stdout.writelines(lines)
    return 0


def command_flows_delete(args: argparse.Namespace) -> int:
    count = _saved_flows().delete(args.name, _user())
    print(f"deleted {args.name} ({count} versions; kept for the provenance of results)")
    return 0


def command_flows_run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    from calypso.flows.runtime import prepare_environment
    from calypso.flows.user_flows import check_specification, confine, default_output, user_flow

    overrides: dict[str, Any] = {}
    if args.workers:
        overrides["executor"] = {"kind": "local", "n_workers": args.workers}
    settings = load_settings(**overrides) if overrides else load_settings()
    prepare_environment(settings)
    flow = _get_saved(args.reference)
    spec = check_specification(flow.specification, flow.label)
    raw = str(Path(args.input).absolute())
    confine(raw, args.output, spec, flow.proposal, settings.data_roots)
    output = args.output or default_output(raw, spec.technique, flow.name, flow.version)
    modules = [TECHNIQUE_TABLE[spec.technique].task_module]
    settings = settings.model_copy(
        update={"executor": settings.executor.model_copy(update={"preload": modules})}
    )
    result = run_on_cluster(
        settings,
        len(spec.variants()),
        "variants",
        lambda runner: user_flow.with_options(task_runner=runner)(
            name=flow.name,
            version=flow.version,
            specification=flow.specification,
            raw=raw,
            scans=args.scans,
            output_dir=output,
        ),
    )
    result["wall_s"] = round(time.perf_counter() - began, 3)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    for variant in result["variants"]:
        sweep = ", ".join(f"{k}={v}" for k, v in variant.get("sweep", {}).items())
        print(
            f"{flow.label}{' [' + sweep + ']' if sweep else ''}: {variant['processed_dataset_dir']}"
        )
        for url in variant["outputs"]:
            print(f"  {url}")
    return 0


def command_cluster_up(args: argparse.Namespace) -> int:
    from calypso.executors.openstack import cluster_up

    settings = load_settings()
    cluster_up(settings, [technique.task_module for technique in TECHNIQUE_TABLE.values()])
    return 0


def command_cluster_status(args: argparse.Namespace) -> int:
    from calypso.executors.openstack import running_cluster_address

    address = running_cluster_address(load_settings())
    from distributed import Client

    try:
        with Client(address, timeout=10) as client:
            workers = client.scheduler_info()["workers"]
    except OSError as exc:
        raise ConfigurationError(f"the cluster at {address} does not answer: {exc}") from None
    print(f"OpenStack Dask cluster at {address}: {len(workers)} workers")
    for name, worker in sorted(workers.items()):
        print(f"  {name}  {worker.get('nthreads')} threads")
    return 0


def command_cluster_down(args: argparse.Namespace) -> int:
    from calypso.executors.openstack import cluster_down

    print(cluster_down(load_settings()))
    return 0


def _log_to_stderr() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    calypso_logger = logging.getLogger("calypso")
    calypso_logger.addHandler(handler)
    calypso_logger.setLevel(logging.INFO)
    calypso_logger.propagate = False  # Prefect's console handler would print it again


def _icat_catalogue():
    from calypso.registry import open_catalogue
    from calypso.registry.icat import IcatCatalogue

    catalogue = open_catalogue(load_settings())
    if not isinstance(catalogue, IcatCatalogue):
        raise ConfigurationError(
            "the catalogue backend is 'sqlite', which delivers nothing: set "
            "CALYPSO_CATALOGUE__BACKEND=icat and CALYPSO_CATALOGUE__ICAT__METADATA_URLS"
        )
    return catalogue


def command_catalogue_flush(args: argparse.Namespace) -> int:
    report = _icat_catalogue().flush(release_stale=True)
    print(
        f"delivered {len(report.delivered)} registration(s) to ICAT; {len(report.pending)} pending"
    )
    if report.error:
        print(f"calypso: error: delivery stopped: {report.error}", file=sys.stderr)
        return 5
    return 0


def command_catalogue_check(args: argparse.Namespace) -> int:
    results = _icat_catalogue().check()
    for component, ok, message in results:
        print(f"{component:9s} {'ok' if ok else 'FAILED':7s} {message}")
    return 0 if all(ok for _, ok, _ in results) else 5


def command_catalogue_list(args: argparse.Namespace) -> int:
    from calypso.registry import open_catalogue

    if args.pending:
        entries = _icat_catalogue().local.outbox("pending")
        if args.json:
            print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        for entry in [] if args.json else entries:
            what = entry.payload.get("path") or entry.payload.get("metadata_name")
            print(
                f"record {entry.record_id} ({entry.destination}): {what} "
                f"(attempts {entry.attempts}; {entry.last_error or 'not tried'})"
            )
        if not entries and not args.json:
            print("nothing is waiting for ICAT")
        return 0
    records = open_catalogue(load_settings()).list(args.technique, args.limit)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return 0
    if not records:
        print("the catalogue is empty")
        return 0
    print(f"{'id':>5}  {'status':9}  {'technique':12} {'finished':25} raw dataset -> processed")
    for r in records:
        print(
            f"{r.id:>5}  {r.status:9}  {r.technique:12} {r.finished or '':25} "
            f"{r.raw_dataset} -> {r.processed_path}"
        )
    return 0


def command_catalogue_show(args: argparse.Namespace) -> int:
    from calypso.registry import open_catalogue

    catalogue = open_catalogue(load_settings())
    record = catalogue.get(args.id)
    exports = getattr(catalogue, "local", catalogue).exports(record_id=args.id)
    shown = record.model_dump(mode="json") | {
        "exports": [e.model_dump(mode="json", exclude={"record_id"}) for e in exports]
    }
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
