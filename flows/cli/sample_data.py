"""``calypso sample-data`` writes realistic raw data; ``calypso demo`` writes and reduces it."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from calypso.errors import ParameterError
from calypso.flows.api import build_parameters, run_technique
from calypso.flows.builtin.diffraction import demo_settings
from calypso.flows.cli.common import print_summary
from calypso.flows.techniques import TECHNIQUES, load
from calypso.settings import CalypsoSettings, load_settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser(
        "sample-data", help="write realistic sample raw data (options: per technique)"
    )
    kinds = sample.add_subparsers(title="techniques", metavar="TECHNIQUE", required=True)
    for technique in TECHNIQUES.values():
        if technique.sample_at is None:
            continue
        parser = kinds.add_parser(technique.name, help=technique.description)
        parser.add_argument("directory", help="root folder (like /data/visitor)")
        for option in technique.sample_options:
            parser.add_argument(*option.flags, **option.settings)
        parser.add_argument("--seed", type=int, default=0)
        parser.set_defaults(handler=command_sample_data, technique=technique.name)

    demo = commands.add_parser("demo", help="generate sample data and reduce it")
    demo.add_argument("--directory", default="demo-data", help="where to put the demo data")
    demo.add_argument("--frames", type=int, default=100)
    demo.set_defaults(handler=command_demo)


def command_sample_data(args: argparse.Namespace) -> int:
    """The technique's sample-data writer (its descriptor's), with its own options."""
    technique = TECHNIQUES[args.technique]
    options = {
        option.flags[0].lstrip("-").replace("-", "_"): None for option in technique.sample_options
    }
    options = {name: getattr(args, name) for name in options}
    root = Path(args.directory)
    if root.exists() and not root.is_dir():
        raise ParameterError(f"{root} is a file: give a folder to write the sample data under")
    print(load(technique.sample_at)(root, seed=args.seed, **options))
    return 0


def _reduce(
    technique: str, raw_dir: Path, settings: CalypsoSettings, assignments: list[str] | None = None
) -> dict[str, Any]:
    """Run a technique's flow with default parameters (plus ``assignments``) and print it."""
    parameters = build_parameters(technique, assignments or [], None)
    summary = run_technique(technique, str(raw_dir), parameters, None, None, settings)
    print_summary(summary)
    return summary


# What calypso demo writes at the top of its folder: the samples' proposal, and the
# tomography sample's ground truth beside it.
DEMO_FOLDERS = frozenset({"ih0001", "tomography_ground_truth.h5", "mx_ground_truth.h5"})


def command_demo(args: argparse.Namespace) -> int:
    from calypso.flows.samples.diffraction import write_diffraction_sample
    from calypso.flows.samples.mx import write_mx_sample
    from calypso.flows.samples.spectroscopy import write_spectroscopy_sample
    from calypso.flows.samples.tomography import write_tomography_sample

    root = Path(args.directory).absolute()
    settings = load_settings()
    from calypso.flows.runtime import prepare_environment

    prepare_environment(settings)
    if root.exists():
        # Only what an earlier demo wrote there is replaced: never a folder of the user's.
        written = {p.name for p in root.iterdir()} <= DEMO_FOLDERS if root.is_dir() else False
        if not written:
            raise ParameterError(
                f"--directory {root} exists and holds what calypso demo did not write: "
                "give a new folder (or the one an earlier demo wrote)"
            )
        shutil.rmtree(root)
        # Their records went with them: the new results go where the old ones were.
        from calypso.registry import open_catalogue
        from calypso.registry.catalogue import embedded
        from calypso.registry.versions import removed_with

        removed_with(embedded(open_catalogue(settings)), root, "calypso demo wrote it again")
    print(f"Writing {args.frames} Pilatus 1M frames of CeO2 in the ESRF layout under {root} ...")
    sample = write_diffraction_sample(root, frames=args.frames)
    print(f"raw dataset: {sample.raw_dataset_dir}")
    settings_text = demo_settings(sample.calibration)
    print("Reducing it with the diffraction flow on a local Dask cluster under Prefect ...")
    summary = _reduce("diffraction", sample.raw_dataset_dir, settings, settings_text)
    print(
        f"The result: {summary['outputs'][0].split('::')[0]} (open it with h5py, in the "
        "portal, or with `silx view`, which needs a Qt binding: pip install PyQt5)"
    )

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
