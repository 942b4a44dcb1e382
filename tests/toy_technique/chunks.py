"""The toy technique's chunk task (what Dask workers import)."""

from __future__ import annotations

import h5py
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from toy_technique import frame_statistics


@task(name="measure_chunk", cache_policy=NO_CACHE)
def measure_chunk(plan, first: int, stop: int) -> tuple[int, np.ndarray]:
    with h5py.File(plan.input, "r") as h5:
        frames = h5[plan.parameters.dataset][first:stop]
    return first, frame_statistics(frames, threshold=plan.parameters.threshold)
