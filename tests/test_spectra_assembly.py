"""A map's batches go to the writer as they finish (issue #18): the result is the same
whatever order they come in, and the stream of results reports progress once each."""

from __future__ import annotations

import random
import time

import h5py
import numpy as np
import pytest
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from calypso.flows.samples.spectroscopy import write_spectroscopy_map_sample
from calypso.tasks.plans.spectroscopy import make_spectroscopy_plan
from calypso.tasks.progress import AsTheyFinish, listening
from calypso.tasks.spectroscopy import reduce_spectra_batch, write_spectroscopy_nexus
from calypso.techniques.spectroscopy import SpectroscopyParameters


def contents(path) -> dict[str, tuple]:
    """Every dataset (values, dtype) and every attribute of a NeXus file, but its dates."""
    found: dict[str, tuple] = {}
    with h5py.File(path, "r") as h5:

        def visit(name: str, node) -> None:
            attributes = {key: np.asarray(value).tolist() for key, value in node.attrs.items()}
            if isinstance(node, h5py.Dataset) and not name.endswith("/date"):
                found[name] = (node[()], node.dtype, attributes)
            else:
                found[name] = (None, None, attributes)

        h5.visititems(visit)
    return found


@pytest.mark.parametrize("off_sample", [(), (*range(50), 120)], ids=["all_on", "first_batch_off"])
def test_batches_finishing_in_any_order_give_the_same_result(off_sample, tmp_path, catalogue):
    """Also when the first batch is off the sample whole (its results NaN): the result is
    laid out from the first batch with spectra reduced, once every batch before it came."""
    dataset = write_spectroscopy_map_sample(tmp_path / "visitor", 230, seed=6)
    if off_sample:
        with h5py.File(dataset.raw_file, "a") as h5:
            counters = h5["1.1/measurement"]
            it = counters["it"][()]
            it[list(off_sample)] = counters["i0"][list(off_sample)] * 0.9  # air: no edge
            counters["it"][...] = it
    parameters = SpectroscopyParameters(batch_size=50)
    written = {}
    for order in ("submitted", "shuffled", "first last"):
        plan = make_spectroscopy_plan(
            str(dataset.raw_dataset_dir), parameters, output_dir=str(tmp_path / order)
        )
        reference = plan.calibration.reference_e0 if plan.calibration else None
        parts = tmp_path / f"parts-{order}"
        parts.mkdir()
        batches = [
            reduce_spectra_batch.fn(batch, parameters, reference, str(parts))
            for batch in plan.batches()
        ]
        assert len(batches) == 5
        if order == "shuffled":
            random.Random(1).shuffle(batches)
        elif order == "first last":  # the batch that lays the result out comes last
            batches = batches[1:] + batches[:1]
        summary = write_spectroscopy_nexus.fn(plan, batches, {"flow_run_id": "test"})
        written[order] = contents(summary["outputs"][0].split("::")[0])
    reference = written["submitted"]
    assert reference["1.1/xas/normalized/norm"][0].shape == (230, 415)
    left_out = np.isin(np.arange(230), off_sample)
    assert np.isnan(reference["1.1/xas/normalized/norm"][0][left_out]).all()
    assert np.isfinite(reference["1.1/xas/normalized/norm"][0][~left_out]).all()
    if off_sample:
        assert np.array_equal(reference["1.1/xas/fit/skipped"][0], left_out)
    assert reference["1.1/xas/chi/chi"][0].shape[0] == 230
    for order in ("shuffled", "first last"):
        assert written[order].keys() == reference.keys(), order
        for name, (values, dtype, attributes) in reference.items():
            other_values, other_dtype, other_attributes = written[order][name]
            assert other_dtype == dtype and other_attributes == attributes, (order, name)
            if values is not None:
                np.testing.assert_array_equal(other_values, values, err_msg=f"{order}: {name}")


def test_results_come_as_they_finish_with_their_progress():
    seen: list[tuple[int, int]] = []
    told: list[list[float]] = []

    @task
    def wait(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=3))
    def three() -> list[float]:
        futures = [wait.submit(s) for s in (0.6, 0.05, 0.3)]
        stream = AsTheyFinish(futures, 3, "waiting", lambda r: 1, finished=told.append)
        assert len(stream) == 3
        first = list(stream)
        assert list(stream) == first  # again: the finished ones
        return first

    with listening(lambda done, total: seen.append((done, total))):
        results = three()
    assert results == [0.05, 0.3, 0.6]
    assert told == [[0.05, 0.3, 0.6]]  # once
    assert seen[-3:] == [(1, 3), (2, 3), (3, 3)]
