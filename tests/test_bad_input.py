"""Raw data checked before it is trusted (issue #22, item 3), and bad resources refused.

Each test builds a bad input in ``tmp_path`` from the real data or the sample data, runs
``calypso run`` on it (in this process where the input is refused before Prefect and Dask
start) and checks what the user gets: a non-zero exit status, one line naming the file and
what was expected, the raw files unchanged, and nothing that looks complete (no output
published, no catalogue record).

Before these checks: an int32 virtual dataset over float32 frames read NaN as -2147483648;
larger Lima frames were read from the wrong region; a mask masking every pixel gave every
bin 0; a CBF whose header disagreed with its binary gave 3,096 spots instead of 301, and
a negative wavelength a d_min of -10.6 Å; two projections made a volume; a NaN energy, a
non-ASCII CBF header and a bad memory limit gave tracebacks; a full disk during the NeXus
write crashed with a segmentation fault (exit status 139).

Disk full and read-only folders are real: small tmpfs mounts in a private mount namespace
(``unshare -m``, root only; skipped elsewhere). A file system that is too small is refused
before the run, so the full disk *during* the NeXus write is met through a per-process file
size limit (``RLIMIT_FSIZE``: the kernel refuses the write with EFBIG, through the same
path as ENOSPC) in a ``calypso run`` process, and through a real full tmpfs in a small
writer process.
"""

from __future__ import annotations

import bz2
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.flows.cli import main
from calypso.registry import SQLiteCatalogue

MX_IMAGE = "mx/thau_3_2_0001.cbf.bz2"


# -- helpers --------------------------------------------------------------------------


def calypso(capsys, *arguments: object) -> tuple[int, str]:
    """``calypso ARGUMENTS`` in this process: exit status and standard error."""
    capsys.readouterr()
    code = main([str(a) for a in arguments])
    return code, capsys.readouterr().err


def hashes(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (files or folders)."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*")))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def assert_refused(code: int, err: str, status: int, *fragments: str) -> None:
    assert code == status, err
    assert err.startswith("calypso: error: ") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def assert_nothing_published(output: Path, catalogue: Path) -> None:
    assert not output.exists() or not any(output.iterdir()), sorted(output.rglob("*"))
    assert not catalogue.exists() or SQLiteCatalogue(catalogue).list() == []


@pytest.fixture
def refused(capsys, catalogue_path, tmp_path):
    """Run ``calypso run TECHNIQUE INPUT ARGS --output OUT`` on ``INPUT`` and check that it
    is refused with ``status`` and ``fragments``, leaving the input and outputs alone."""

    def check(technique: str, source: Path, *args: object, status: int, fragments: tuple):
        before = hashes(source)
        output = tmp_path / "out"
        code, err = calypso(capsys, "run", technique, source, *args, "--output", output)
        assert_refused(code, err, status, *fragments)
        assert hashes(source) == before
        assert_nothing_published(output, catalogue_path)
        return err

    return check


# -- virtual datasets over Lima files that do not match ------------------------------


@pytest.fixture
def bliss_copy(diffraction_sample, tmp_path):
    """A private copy of the sample diffraction dataset (12 int32 frames in 3 Lima files)."""
    raw = diffraction_sample.dataset
    target = tmp_path / "visitor" / raw.raw_dataset_dir.relative_to(raw.root)
    shutil.copytree(raw.raw_dataset_dir, target)
    return target


def rewrite_lima(dataset: Path, change) -> Path:
    lima = dataset / "scan0001" / "pilatus1m_0000.h5"
    with h5py.File(lima, "r") as h5:
        frames = h5["/entry_0000/measurement/data"][()]
    lima.unlink()
    with h5py.File(lima, "w") as h5:
        h5["/entry_0000/measurement/data"] = change(frames)
    return lima


def with_nan(frames: np.ndarray) -> np.ndarray:
    data = frames.astype(np.float32)
    data[:, 100:110, 200:210] = np.nan  # a Lima file of float32, as after a correction
    data[:, 300, 300] = np.inf
    return data


def larger(frames: np.ndarray) -> np.ndarray:
    data = np.zeros((frames.shape[0], 1100, 1000), frames.dtype)
    data[:, 20:1063, 10:991] = frames
    return data


LIMA_CHANGES = {
    "float32 frames with NaN": (with_nan, "holds float32 values but the virtual dataset is int32"),
    "larger frames": (larger, "holds frames of 1100 x 1000 pixels but the virtual dataset maps"),
    "smaller frames": (
        lambda frames: frames[:, :1000, :900],
        "holds frames of 1000 x 900 pixels but the virtual dataset maps 1043 x 981",
    ),
}


@pytest.mark.parametrize("case", list(LIMA_CHANGES))
def test_virtual_dataset_not_matching_its_lima_file(case, bliss_copy, diffraction_sample, refused):
    change, message = LIMA_CHANGES[case]
    lima = rewrite_lima(bliss_copy, change)
    poni = diffraction_sample.calibration["poni"]
    refused(
        "diffraction",
        bliss_copy,
        "--set",
        f"poni={poni}",
        status=3,
        fragments=(f"{lima}::/entry_0000/measurement/data {message}", "rewrite the virtual"),
    )


# -- masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("inverted", [False, True], ids=["every pixel", "inverted"])
def test_a_mask_that_leaves_too_few_pixels(inverted, diffraction_sample, tmp_path, refused):
    import fabio

    gaps = fabio.open(str(diffraction_sample.calibration["mask"])).data
    mask = tmp_path / "mask.npy"
    # The sample's gap mask with the other convention (non-zero = valid) keeps only the gaps.
    np.save(mask, (gaps == 0) if inverted else np.ones_like(gaps))
    kept = int(np.count_nonzero(gaps)) if inverted else 0
    left = f"{kept} of {gaps.size} pixels ({kept / gaps.size:.1%})"
    poni = diffraction_sample.calibration["poni"]
    refused(
        "diffraction",
        diffraction_sample.raw_dataset_dir,
        *("--set", f"poni={poni}", "--set", f"mask={mask}"),
        status=2,
        fragments=(f"mask {mask}: it leaves {left} unmasked", "min_unmasked_fraction=0.1"),
    )


def test_a_calibration_of_another_detector(test_data, tmp_path, refused):
    """pyFAI itself stops on it with "Mask shape matches" (a traceback before this check)."""
    poni = tmp_path / "pilatus6m.poni"
    poni.write_text(
        "poni_version: 2\nDetector: Pilatus6M\nDetector_config: {}\nDistance: 0.3\n"
        "Poni1: 0.2\nPoni2: 0.2\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1e-10\n"
    )
    image = tmp_path / "CeO2_Pilatus1M.tif"
    shutil.copyfile(test_data / "xrd" / "CeO2_Pilatus1M.tif", image)
    refused(
        "diffraction", image, "--set", f"poni={poni}", "--set", "rotate=90",
        status=2,
        fragments=(
            f"PONI file {poni} is for a Pilatus6M of 2527 x 2463 pixels, but the frames of",
            "are 981 x 1043 after rotate=90: give the calibration made for this detector",
        ),
    )  # fmt: skip


def test_masks_in_use_pass_and_the_threshold_is_a_parameter(diffraction_sample, tmp_path):
    import fabio

    from calypso.tasks.plans.diffraction import make_integration_plan
    from calypso.techniques.diffraction import DiffractionParameters

    calibration = diffraction_sample.calibration
    raw = str(diffraction_sample.raw_dataset_dir)
    plan = make_integration_plan(
        raw, DiffractionParameters(poni=str(calibration["poni"]), mask=str(calibration["mask"]))
    )
    assert plan.n_frames == 12
    gaps_only = tmp_path / "inverted.npy"
    np.save(gaps_only, fabio.open(str(calibration["mask"])).data == 0)
    parameters = DiffractionParameters(
        poni=str(calibration["poni"]), mask=str(gaps_only), min_unmasked_fraction=0.05
    )
    assert make_integration_plan(raw, parameters, output_dir=str(tmp_path / "out")).n_frames == 12


# -- MX images: header against binary, physical geometry ------------------------------


@pytest.fixture(scope="module")
def cbf_bytes(test_data) -> bytes:
    return bz2.decompress((test_data / MX_IMAGE).read_bytes())


CBF_CHANGES = {
    "fastest dimension off by one": (
        b"X-Binary-Size-Fastest-Dimension: 2463",
        b"X-Binary-Size-Fastest-Dimension: 2462",
        "dimensions 2527 x 2462 (X-Binary-Size-Second/Fastest-Dimension) make 6221474 pixels "
        "but X-Binary-Number-of-Elements says 6224001",
    ),
    "dimensions and count both off": (
        b"X-Binary-Number-of-Elements: 6224001\r\nX-Binary-Size-Fastest-Dimension: 2463",
        b"X-Binary-Number-of-Elements: 6221474\r\nX-Binary-Size-Fastest-Dimension: 2462",
        "announces 2527 x 2462 = 6221474 pixels but the binary holds 6224001 values",
    ),
    "negative wavelength": (
        b"Wavelength 0.96859 A",
        b"Wavelength -0.96859 A",
        "the file gives wavelength_a = -0.96859, which is not physical",
    ),
    "zero distance": (
        b"Detector_distance 0.35100 m",
        b"Detector_distance 0.00000 m",
        "the file gives distance_m = 0.0, which is not physical",
    ),
    "non-UTF-8 header": (
        b"Comment: Mini kappa",
        b"Comment: Mini k\xe4ppa",
        "the CBF header is not text (byte 0xe4 on line 23 is neither ASCII nor UTF-8)",
    ),
    "truncated": (None, None, "the binary holds 3113197 of the 6224107 bytes"),
}


@pytest.mark.parametrize("case", list(CBF_CHANGES))
def test_a_cbf_image_that_cannot_be_trusted(case, cbf_bytes, tmp_path, refused):
    old, new, message = CBF_CHANGES[case]
    image = tmp_path / "thau_3_2_0001.cbf"
    changed = cbf_bytes.replace(old, new, 1) if old else cbf_bytes[: len(cbf_bytes) // 2]
    assert changed != cbf_bytes
    image.write_bytes(changed)
    refused("mx", image, status=3, fragments=(f"{image}: ", message))


def test_an_mx_mask_of_every_pixel(test_data, tmp_path, refused):
    mask = tmp_path / "mask.npy"
    np.save(mask, np.ones((2527, 2463), np.int8))
    refused(
        "mx",
        test_data / MX_IMAGE,
        *("--set", f"mask={mask}"),
        status=2,
        fragments=(f"mask {mask}: it leaves 0 of 6224001 pixels (0.0%) unmasked",),
    )


# -- tomography: too few projections ------------------------------------------------


@pytest.mark.parametrize("kept", [2, 16])
def test_too_few_projections_for_the_volume(kept, test_data, tmp_path, refused):
    """tomopy's tooth (181 projections over 179 degrees, 640 columns) thinned out; the
    centre given, so nothing else stops the reconstruction."""
    scan = tmp_path / f"tooth_{kept}.h5"
    with h5py.File(test_data / "tomo" / "tooth.h5", "r") as tooth, h5py.File(scan, "w") as out:
        chosen = np.linspace(0, 180, kept).round().astype(int)
        for name in ("data_white", "data_dark"):
            out[f"exchange/{name}"] = tooth[f"exchange/{name}"][()]
        out["exchange/data"] = tooth["exchange/data"][()][chosen]
        out["exchange/theta"] = tooth["exchange/theta"][()][chosen]
    step = 179 / (kept - 1)
    refused(
        "tomography",
        scan,
        *("--set", "center_of_rotation=296"),
        status=3,
        fragments=(
            f"{scan}: {kept} projections over 179.0 degrees, {step:.3g} degrees apart",
            "at most 2.86 degrees apart (64 over this range)",
            "min_projections=N",
        ),
    )


# -- spectroscopy: a NaN in the energy ------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_energy(value, test_data, tmp_path, refused):
    lines = (test_data / "xas" / "co_metal_rt.xdi").read_text().splitlines(keepends=True)
    rows = [i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")]
    first = lines[rows[200]].split()[0]
    lines[rows[200]] = lines[rows[200]].replace(first, value, 1)
    spectrum = tmp_path / "co_metal_rt.xdi"
    spectrum.write_text("".join(lines))
    refused(
        "spectroscopy",
        spectrum,
        status=3,
        fragments=(
            f"{spectrum}: the energy column 'energy' is NaN or infinite at 1 of its 418 values "
            "(first at point 201)",
        ),
    )


# -- settings ----------------------------------------------------------------------


def test_a_bad_worker_memory_limit(diffraction_sample, monkeypatch, refused):
    monkeypatch.setenv("CALYPSO_EXECUTOR__MEMORY_LIMIT", "lots")
    refused(
        "diffraction",
        diffraction_sample.raw_dataset_dir,
        status=2,
        fragments=("executor.memory_limit", "'lots' is not a worker memory limit", "'4GB'"),
    )


# -- output folders: read-only, full ---------------------------------------------


def private_mounts() -> bool:
    """Whether this process may mount a tmpfs in a mount namespace of its own."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(
    not private_mounts(), reason="needs root and unshare to mount a small tmpfs privately"
)


def in_private_mounts(mounts: dict[Path, str], script: str, **kwargs) -> subprocess.Popen:
    """Run Python ``script`` with a tmpfs (its mount options) on each folder of ``mounts``,
    in a mount namespace of its own: the mounts vanish with the process."""
    for folder in mounts:
        folder.mkdir(parents=True, exist_ok=True)
    setup = " && ".join(f"mount -t tmpfs -o {o} tmpfs {f}" for f, o in mounts.items())
    command = f'{setup} && exec "$0" -c "$1"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", command, sys.executable, textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


@needs_mounts
def test_read_only_and_full_output_folders_are_refused_before_the_run(
    diffraction_sample, tmp_path, catalogue_path
):
    raw, calibration = diffraction_sample.raw_dataset_dir, diffraction_sample.calibration
    read_only, full = tmp_path / "read_only", tmp_path / "full"
    before = hashes(raw)
    result = in_private_mounts(
        {read_only: "ro,size=1m", full: "size=1m"},
        f"""
        from calypso.flows.cli import main
        for output in ({str(read_only / "out")!r}, {str(full / "out")!r}):
            arguments = ["run", "diffraction", {str(raw)!r}, "--output", output]
            print(main([*arguments, "--set", "poni={calibration["poni"]}"]), flush=True)
        """,
    )
    assert result.stdout.split() == ["4", "4"], result.stderr
    first, second = result.stderr.splitlines()
    assert first == (
        f"calypso: error: cannot write the results in {read_only / 'out'}: the file system is "
        f"read-only in {read_only}; choose a folder you can write to (--output DIR)"
    )
    assert second.startswith(
        f"calypso: error: cannot write the results in {full / 'out'}: its file system has "
        "1.0 MiB free and this run needs about 8.2 MiB (results and their part files)"
    )
    assert hashes(raw) == before
    assert not catalogue_path.exists() or SQLiteCatalogue(catalogue_path).list() == []


@needs_mounts
def test_a_disk_that_fills_during_the_nexus_write(tmp_path):
    """A real ENOSPC inside HDF5: one OutputError, exit 4, no crash in HDF5's exit handler
    (exit 139 before), nothing published, no temporary left."""
    disk = tmp_path / "disk"
    result = in_private_mounts(
        {disk: "size=256k"},
        f"""
        import sys
        from pathlib import Path
        import h5py, numpy as np
        from calypso.errors import CalypsoError
        from calypso.tasks.writers.nexus import atomic_outputs
        final = Path({str(disk / "result.h5")!r})
        try:  # as the diffraction writer: the NeXus file open while the text pattern is written
            with atomic_outputs(final.with_suffix(".xy"), final) as (text, nexus):
                with h5py.File(nexus, "w") as h5:
                    h5["entry/intensity"] = np.random.rand(8, 1000)
                    np.savetxt(text, np.random.rand(20000, 3))
        except CalypsoError as exc:
            print(f"calypso: error: {{exc}}", file=sys.stderr)
            sys.exit(exc.exit_code)
        """,
    )
    assert result.returncode == 4, result.stderr[-3000:]
    assert result.stderr == (
        f"calypso: error: cannot write the results in {disk}: the disk is full (No space left "
        "on device); the results were not published: free some space or choose another output "
        "folder (--output DIR), then run again\n"
    )


def test_a_file_size_limit_met_by_calypso_run(
    diffraction_sample, tmp_path, catalogue_path, scheduler
):
    """``calypso run`` whose NeXus file outgrows the process's file size limit (EFBIG, as a
    full disk): the part files fit, the NeXus file does not."""
    raw, calibration = diffraction_sample.raw_dataset_dir, diffraction_sample.calibration
    output = tmp_path / "out"
    before = hashes(raw)
    limit = 1_000_000  # bytes: a part file (4 frames) is 0.8 MB, the NeXus file over 2 MB

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [
            *(sys.executable, "-m", "calypso.flows.cli", "run", "diffraction", str(raw)),
            *("--set", f"poni={calibration['poni']}", "--set", f"mask={calibration['mask']}"),
            *("--set", "npt=20000", "--set", "chunk_size=4"),
            *("--output", str(output)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
        env={
            **os.environ,
            "CALYPSO_CATALOGUE__PATH": str(catalogue_path),
            # the part files are written by the session's worker (no limit), the NeXus
            # file by the command (limited)
            "CALYPSO_EXECUTOR__KIND": "address",
            "CALYPSO_EXECUTOR__ADDRESS": scheduler,
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",  # the CLI's own default
        },
    )
    assert result.returncode == 4, result.stderr[-3000:]
    assert result.stderr == (
        f"calypso: error: cannot write the results in {output}: a file would be larger than "
        "this process or file system allows (File too large); the results were not "
        "published: free some space or choose another output folder (--output DIR), then run "
        "again\n"
    )
    assert hashes(raw) == before
    published = [p for p in output.rglob("*") if ".calypso-partial-" not in str(p)]
    assert published == []
    records = SQLiteCatalogue(catalogue_path).list()
    assert [r.status for r in records] == ["failed"]  # a record of the failure, no result
