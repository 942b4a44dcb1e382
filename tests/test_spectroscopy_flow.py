"""The spectroscopy flow end to end: Prefect server, local Dask cluster, NeXus, XDI, catalogue."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.flows.cli import main
from calypso.flows.samples.spectroscopy import (
    FE_K_EDGE_EV,
    write_spectroscopy_map_sample,
    write_spectroscopy_sample,
)
from calypso.registry import SQLiteCatalogue
from calypso.techniques.spectroscopy import SpectroscopyParameters
from tests.clusters import run_flow as run_on_shared_cluster

# In-process `calypso run` commands use the session's cluster (tests/clusters.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_shared_cluster")]


def run_flow(input_path, parameters, workers=2, output=None):
    return run_on_shared_cluster("spectroscopy", input_path, parameters, workers, output)


def nexus_file(summary) -> Path:
    return Path(summary["outputs"][0].split("::")[0])


@pytest.fixture(scope="module")
def repeats(tmp_path_factory, catalogue, test_data):
    """Three Fe foil scans (from the real Fe spectrum) with a miscalibrated monochromator."""
    dataset = write_spectroscopy_sample(tmp_path_factory.mktemp("visitor"), repeats=3, seed=2)
    summary = run_flow(dataset.raw_dataset_dir, SpectroscopyParameters(), workers=2)
    return dataset, summary


@pytest.fixture(scope="module")
def mapping(tmp_path_factory, catalogue, test_data):
    """A mapping scan of 600 spectra reduced twice: 1 worker in batches of 70, 2 workers."""
    dataset = write_spectroscopy_map_sample(tmp_path_factory.mktemp("visitor"), 600, seed=4)
    small = run_flow(
        dataset.raw_dataset_dir,
        SpectroscopyParameters(batch_size=70),
        workers=1,
        output=str(tmp_path_factory.mktemp("small_batches")),
    )
    default = run_flow(dataset.raw_dataset_dir, SpectroscopyParameters(), workers=2)
    return dataset, small, default


def test_repeats_are_calibrated_merged_and_written(repeats):
    dataset, summary = repeats
    assert summary["count"] == 3 and summary["merged"]
    assert summary["calibration"] == {"element": "Fe", "edge": "K", "reference_e0": FE_K_EDGE_EV}
    output = nexus_file(summary)
    assert output.parent == (
        dataset.session_dir / "PROCESSED_DATA" / "Fe_foil" / "Fe_foil_0001" / "spectroscopy"
    )
    with h5py.File(output, "r") as h5:
        assert h5.attrs["default"] == "merged"
        for entry in ("1.1", "2.1", "3.1", "merged"):
            process = h5[entry]["xas"]
            assert process.attrs["NX_class"] == "NXprocess"
            # The foil and the sample are the same Fe metal: after calibration the
            # sample's edge sits on the tabulated Fe K edge, whatever the mono said.
            assert process["fit/e0"][()] == pytest.approx(FE_K_EDGE_EV, abs=0.3)
            for name, signal, axis, units in (
                ("mu", "mu", "energy", "eV"),
                ("normalized", "norm", "energy", "eV"),
                ("flattened", "flat", "energy", "eV"),
                ("chi", "chi", "k", "1/angstrom"),
                ("chir", "chir_magnitude", "r", "angstrom"),
            ):
                group = process[name]
                assert group.attrs["NX_class"] == "NXdata"
                assert group.attrs["signal"] == signal and list(group.attrs["axes"]) == [axis]
                assert group[axis].attrs["units"] == units
                assert np.isfinite(group[signal][()]).mean() > 0.95
        for entry in ("1.1", "2.1", "3.1"):
            # the real foil's edge is ~1 eV below the table; the mono read 2.5 eV high
            assert h5[entry]["xas/fit/energy_shift"][()] == pytest.approx(-1.5, abs=0.5)
            assert h5[entry]["instrument"].file.filename  # external link to the raw scan resolves
        merged = h5["merged/xas"]
        # Its repeats were calibrated before the merge: their shift, not 0 ("not
        # calibrated", as an Athena user read the merged XDI).
        shifts = [h5[entry]["xas/fit/energy_shift"][()] for entry in ("1.1", "2.1", "3.1")]
        assert merged["fit/energy_shift"][()] == pytest.approx(np.median(shifts))
        assert merged["mu/mu_errors"].shape == merged["mu/mu"].shape
        assert merged["fit/merge_weights"][()].sum() == pytest.approx(1.0)
        # |chi(R)| of Fe metal (bcc): the first shell peak at 2.0-2.3 Å (not phase-corrected)
        r, chir = merged["chir/r"][()], merged["chir/chir_magnitude"][()]
        assert 1.7 < r[np.argmax(chir)] < 2.5
        configuration = merged["configuration/data"][()].decode()
        assert '"rbkg": 1.0' in configuration


def test_xdi_files_read_back_in_larch(repeats):
    larch_io = pytest.importorskip("larch.io")
    _, summary = repeats
    folder = nexus_file(summary).parent
    files = sorted(folder.glob("*.xdi"))
    assert [f.name for f in files] == [
        "Fe_foil_0001_1_1.xdi",
        "Fe_foil_0001_2_1.xdi",
        "Fe_foil_0001_3_1.xdi",
        "Fe_foil_0001_merged.xdi",
    ]
    group = larch_io.read_xdi(str(files[-1]))
    assert group.array_labels[:4] == ["energy", "mu", "norm", "flat"]
    assert group.attrs["element"]["symbol"] == "Fe"
    from larch.xafs import pre_edge

    pre_edge(group)
    assert group.e0 == pytest.approx(FE_K_EDGE_EV, abs=0.5)
    png = folder / "Fe_foil_0001.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_do_not_depend_on_batches_or_workers(mapping):
    _, small, default = mapping
    assert small["tasks"] == 9 and default["count"] == 600
    with h5py.File(nexus_file(small), "r") as a, h5py.File(nexus_file(default), "r") as b:
        for path in ("1.1/xas/normalized/norm", "1.1/xas/fit/e0", "1.1/xas/fit/edge_step"):
            np.testing.assert_allclose(a[path][()], b[path][()], atol=2e-3, err_msg=path)
        chi_a, chi_b = a["1.1/xas/chi/chi"][()], b["1.1/xas/chi/chi"][()]
        n = min(chi_a.shape[1], chi_b.shape[1])
        k = a["1.1/xas/chi/k"][:n]
        inside = (k > 2) & (k < 12)
        for row in range(0, 600, 97):
            correlation = np.corrcoef(chi_a[row, :n][inside], chi_b[row, :n][inside])[0, 1]
            assert correlation > 0.99, row
        assert a["1.1/xas/normalized/norm"].shape == (600, a["1.1/xas/normalized/energy"].size)


def test_a_batch_does_not_grow_with_the_map():
    """A worker holds ~20 kB a spectrum of its batch while reducing it: batches of a fixed
    size keep its memory the same for a map of 10^4 spectra and one of 10^6."""
    from calypso.tasks.plans.spectroscopy import MAX_BATCH, default_batch_size

    for workers in (1, 2, 8):
        sizes = {default_batch_size(n, workers) for n in (4 * workers * MAX_BATCH, 10**5, 10**6)}
        assert sizes == {MAX_BATCH}, workers
    assert default_batch_size(600, 2) == 200  # small maps: at least two batches a worker


def test_the_map_shows_the_mixture(mapping):
    """Each map point mixes Fe metal and Fe2O3: E0 moves between the two compounds' edges."""
    _, _, default = mapping
    with h5py.File(nexus_file(default), "r") as h5:
        e0 = h5["1.1/xas/fit/e0"][()]
    assert e0.shape == (600,)
    assert np.percentile(e0, 5) < 7115 and np.percentile(e0, 95) > 7115
    assert np.all((e0 > 7105) & (e0 < 7135))


def test_a_map_scanned_an_energy_at_a_time_gives_the_same_result(mapping, tmp_path_factory):
    """The same map written an energy point a row (2D counters energy x spectrum, as a map
    scanned one energy at a time records it): read transposed, every number is the same."""
    from tests.test_live_flow import datasets

    _, _, default = mapping
    root = tmp_path_factory.mktemp("visitor")
    dataset = write_spectroscopy_map_sample(root, 600, seed=4, energy_rows=True)
    with h5py.File(dataset.raw_file, "r") as h5:
        assert h5["1.1/measurement/it"].shape == (415, 600)  # an energy point a row
    summary = run_flow(dataset.raw_dataset_dir, SpectroscopyParameters(), workers=2)
    assert summary["count"] == 600 and summary["tasks"] == default["tasks"]
    transposed = datasets(str(nexus_file(summary)))
    spectra_rows = datasets(str(nexus_file(default)))
    assert transposed.keys() == spectra_rows.keys()
    different = [name for name in transposed if transposed[name] != spectra_rows[name]]
    assert sorted(different) == ["1.1/end_time", "1.1/start_time"]  # when each was scanned
    assert any("/xas/normalized/norm" in name for name in transposed)


def test_runs_are_in_the_catalogue(repeats, catalogue):
    _, summary = repeats
    record = SQLiteCatalogue(catalogue).get(summary["catalogue_id"])
    assert record.technique == "spectroscopy" and record.status == "completed"
    assert record.frames == 3 and record.outputs == summary["outputs"]


def test_real_repeats_from_text_files_merge(test_data, tmp_path, capsys, catalogue):
    """The five real Fe XANES repeats (fluorescence, XDI-style text) through the CLI."""
    code = main(
        [
            "run",
            "spectroscopy",
            str(test_data / "xas" / "fexafs"),
            "--set",
            "mode=fluorescence",
            "--set",
            'fluorescence=["Sum_Fe_Ka"]',
            "--set",
            "i0=I0",
            "--set",
            "exafs=false",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "5 spectra" in out
    with h5py.File(tmp_path / "out" / "fexafs.h5", "r") as h5:
        assert set(h5) == {
            "fexanes_a",
            "fexanes_b",
            "fexanes_c",
            "fexanes_d",
            "fexanes_e",
            "merged",
        }
        assert "chi" not in h5["merged/xas"]
        assert 7110 < h5["merged/xas/fit/e0"][()] < 7125


def test_one_spectrum_runs_without_importing_dask(test_data, tmp_path, catalogue):
    """A few spectra run in the command's own threads: the command imports neither Dask's
    ``distributed`` nor ``prefect_dask`` (the flows' default task runner is built when a
    run uses it, and the result storage block is loaded by its own class, not after
    Prefect imports every installed collection): ~0.45 s of a one-spectrum command."""
    script = (
        "import sys\n"
        "from calypso.flows.cli import main\n"
        "code = main(['run', 'spectroscopy', sys.argv[1], '--output', sys.argv[2], '--json'])\n"
        "loaded = [m for m in ('distributed', 'prefect_dask') if m in sys.modules]\n"
        "print('loaded:', *loaded, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    spectrum = str(test_data / "xas" / "fe_metal_rt.xdi")
    command = [sys.executable, "-c", script, spectrum, str(tmp_path / "out")]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = json.loads(ran.stdout)
    assert summary["count"] == 1 and summary["tasks"] == 1
    assert (tmp_path / "out" / "fe_metal_rt.h5").is_file()
    assert ran.stderr.splitlines()[-1] == "loaded:", ran.stderr[-3000:]


def write_bad(folder: Path, name: str, header: str, rows: np.ndarray) -> Path:
    path = folder / name
    np.savetxt(path, rows, header=header, fmt="%.6f")
    return path


@pytest.fixture
def fe_columns(test_data):
    from calypso.tasks.raw.spectra import read_text_spectrum

    table = read_text_spectrum(test_data / "xas" / "fe_metal_rt.xdi")
    energy, mu = table.columns["energy"], table.columns["mutrans"]
    i0 = np.full(energy.size, 1e6)
    return energy, i0, i0 * np.exp(-mu)


def test_bad_input_is_refused_naming_the_file(fe_columns, tmp_path, capsys, catalogue):
    energy, i0, it = fe_columns
    bad = tmp_path / "bad"
    bad.mkdir()
    # An energy column is also found by its values, and a falling energy is turned
    # round: so "no energy" is a file without one, and a shuffled energy is refused.
    shuffled = energy.copy()
    shuffled[100], shuffled[101] = shuffled[101], shuffled[100]
    cases = {
        "no energy column": (
            write_bad(bad, "a.dat", "time i0 it", np.column_stack([0 * energy + 1, i0, it])),
            "no energy column",
        ),
        "non-monotonic energy": (
            write_bad(bad, "b.dat", "energy i0 it", np.column_stack([shuffled, i0, it])),
            "not strictly increasing",
        ),
        "edge not covered": (
            write_bad(
                bad,
                "c.dat",
                "energy i0 it",
                np.column_stack([energy, i0, it])[energy > 7260],
            ),
            "does not cover the edge",
        ),
        "all-zero I0": (
            write_bad(bad, "d.dat", "energy i0 it", np.column_stack([energy, 0 * i0, it])),
            "I0 (i0) is zero everywhere",
        ),
    }
    for case, (path, message) in cases.items():
        out_dir = tmp_path / f"out-{path.stem}"
        code = main(["run", "spectroscopy", str(path), "--output", str(out_dir)])
        _, err = capsys.readouterr()
        assert code == 3, (case, err)
        assert str(path) in err and message in err, (case, err)
        assert not out_dir.exists() or not any(out_dir.iterdir()), case


def test_a_spectrums_few_dropouts_are_left_out_as_larch_does(
    fe_columns, tmp_path, capsys, catalogue
):
    """It read zero at two points of 348 (a detector dropout): mu(E) is not finite there.
    Larch's pre_edge drops such points; so does the run, saying so, and the rest is reduced
    as the spectrum without them. Many such points (a sample no beam gets through) are
    still refused (tests/test_xas_formats.py: APS12BM)."""
    energy, i0, it = fe_columns
    dropped = it.copy()
    dropped[[150, 260]] = 0.0
    path = write_bad(
        tmp_path, "dropouts.dat", "energy i0 it", np.column_stack([energy, i0, dropped])
    )
    clean = write_bad(tmp_path, "clean.dat", "energy i0 it", np.column_stack([energy, i0, it]))
    keep = np.ones(energy.size, dtype=bool)
    keep[[150, 260]] = False
    without = write_bad(
        tmp_path, "without.dat", "energy i0 it", np.column_stack([energy, i0, it])[keep]
    )
    results = {}
    for source in (path, without, clean):
        out = tmp_path / f"out-{source.stem}"
        code = main(["run", "spectroscopy", str(source), "--output", str(out), "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        results[source.stem] = (json.loads(captured.out), next(out.glob("*.h5")))
    summary, result = results["dropouts"]
    figures = summary["key_figures"]["dropouts"]
    assert figures["points_left_out"] == 2 and "dropout" in figures["warning"], figures
    with h5py.File(result) as h5, h5py.File(results["without"][1]) as alone:
        process = next(h5[entry]["xas"] for entry in h5 if "xas" in h5[entry])
        reference = next(alone[entry]["xas"] for entry in alone if "xas" in alone[entry])
        assert np.allclose(process["fit/points_left_out"][()], energy[[150, 260]])
        for name in ("mu/mu", "normalized/norm", "chi/chi"):
            assert np.array_equal(process[name][()], reference[name][()]), name
    assert "points_left_out" not in json.dumps(results["clean"][0])


def test_a_bliss_scan_without_energy_is_refused(tmp_path, capsys, catalogue, test_data):
    dataset = write_spectroscopy_sample(tmp_path, repeats=1)
    raw = dataset.raw_file
    before = raw.read_bytes()
    copy = tmp_path / "copy"
    shutil.copytree(dataset.raw_dataset_dir, copy / dataset.raw_dataset_dir.relative_to(tmp_path))
    target = copy / dataset.raw_file.relative_to(tmp_path)
    with h5py.File(target, "a") as h5:
        del h5["1.1/measurement/energy"]
    code = main(["run", "spectroscopy", str(target.parent)])
    _, err = capsys.readouterr()
    assert code == 3 and "no scan has an energy counter" in err and str(target) in err
    assert raw.read_bytes() == before


def test_a_maps_spectra_off_the_sample_are_left_out_not_fatal(tmp_path_factory):
    """A map's pixels off the sample (no edge: its first ones, and a whole batch of them)
    and one where the beam was lost (I0 zero at a point) are left out, their results NaN
    and flagged; the run says how many and why, and every other spectrum is reduced as it
    would be without them: bit for bit in the batches without such pixels."""
    from calypso.tasks.raw.absorption import absorption
    from calypso.tasks.raw.spectra import read_bliss_counters
    from calypso.techniques import spectroscopy as xas

    clean = write_spectroscopy_map_sample(tmp_path_factory.mktemp("visitor"), 120, seed=4)
    spotted = write_spectroscopy_map_sample(tmp_path_factory.mktemp("visitor"), 120, seed=4)
    off_sample, beam_lost = [0, 3, *range(40, 60)], 77  # batches of 20: 40-59 all off
    with h5py.File(spotted.raw_file, "a") as h5:
        counters = h5["1.1/measurement"]
        i0, it = counters["i0"][()], counters["it"][()]
        noise = np.random.default_rng(0).normal(1.0, 0.002, it[off_sample].shape)
        it[off_sample] = i0[off_sample] * 0.9 * noise  # air: no edge
        i0[beam_lost, 200] = it[beam_lost, 201] = 0.0  # the reference foil's signal too
        counters["it"][...], counters["i0"][...] = it, i0
    parameters = SpectroscopyParameters(batch_size=20)
    summary = run_flow(spotted.raw_dataset_dir, parameters, workers=2)
    reference = run_flow(clean.raw_dataset_dir, parameters, workers=2)

    assert summary["count"] == 120 and summary["tasks"] == 6
    said = summary["key_figures"]["1.1"]["warning"]
    assert "23 of 120 spectra could not be reduced" in said, said
    assert "22 no absorption edge" in said and "1 mu(E) not finite" in said, said
    left_out = np.zeros(120, dtype=bool)
    left_out[[*off_sample, beam_lost]] = True
    with h5py.File(nexus_file(summary)) as a, h5py.File(nexus_file(reference)) as b:
        xas_a, xas_b = a["1.1/xas"], b["1.1/xas"]
        assert np.array_equal(xas_a["fit/skipped"][()], left_out)
        for name in ("normalized/norm", "chi/chi", "chir/chir_magnitude", "fit/e0", "mu/pre_edge"):
            assert np.isnan(xas_a[name][()][left_out]).all(), name
        assert np.isfinite(xas_a["mu/mu"][()][off_sample]).all()  # as measured
        untouched = np.r_[20:40, 80:120]  # batches without such pixels: as before
        for name in ("normalized/norm", "flattened/flat", "chi/chi", "fit/e0", "fit/edge_step"):
            same = np.array_equal(xas_a[name][()][untouched], xas_b[name][()][untouched], True)
            assert same, name  # (chi(k) NaN beyond a batch's reach)
        # The others of the beam-lost pixel's batch are calibrated on their foil as before.
        batch = [row for row in range(60, 80) if row != beam_lost]
        shift = xas_a["fit/energy_shift"][()]
        assert np.array_equal(shift[batch], xas_b["fit/energy_shift"][()][batch])
        assert np.all(shift[batch] != 0)
        # A batch with pixels left out: the others reduced as a batch of them alone.
        kept = [row for row in range(20) if row not in off_sample]
        data = absorption(read_bliss_counters(spotted.raw_file, 1, 0, 20), parameters)
        alone = xas.reduce_spectra(
            data.energy, data.mu[kept], mu_reference=data.mu_reference[kept],
            reference_e0=summary["calibration"]["reference_e0"],
        )  # fmt: skip
        assert np.array_equal(xas_a["fit/e0"][kept], alone.normalization.e0)
        assert np.array_equal(xas_a["normalized/norm"][kept], alone.normalization.norm)
