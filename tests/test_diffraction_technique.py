"""The science of the diffraction technique, without Prefect or files."""

import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pyFAI.integrator.azimuthal import AzimuthalIntegrator

from calypso.errors import ParameterError
from calypso.techniques.diffraction import (
    DiffractionExecution,
    DiffractionParameters,
    DiffractionScience,
    DiffractionSource,
    Geometry,
    integrate_frames,
    make_integrator,
    orient,
    oriented_shape,
)
from calypso.techniques.integrator_cache import IntegratorCache

GEOMETRY = Geometry(
    dist=0.1,
    poni1=0.01,
    poni2=0.012,
    rot1=0.01,
    wavelength=1e-10,
    detector="Detector",
    detector_config={"pixel1": 1e-4, "pixel2": 1e-4, "max_shape": [200, 240]},
)


def rings(shape=(200, 240), seed=0, frames=3):
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape)
    r = np.hypot(y - 100, x - 120)
    base = 50 + 400 * np.exp(-(((r % 30) - 15) ** 2) / 4)
    return rng.poisson(base, size=(frames, *shape)).astype(np.int32)


def test_orient_flips_then_rotates():
    image = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(orient(image, "ud"), image[::-1])
    np.testing.assert_array_equal(orient(image, "lr"), image[:, ::-1])
    np.testing.assert_array_equal(orient(image, "udlr"), image[::-1, ::-1])
    np.testing.assert_array_equal(orient(image, None, 90), np.rot90(image))
    np.testing.assert_array_equal(orient(image, "ud", 270), np.rot90(image[::-1], 3))
    stack = np.stack([image, image + 10])
    assert orient(stack, "ud", 90).shape == (2, 3, 2) == oriented_shape(stack.shape, 90)
    assert orient(image) is image


def test_equals_a_direct_pyfai_integration():
    frames = rings()
    mask = np.zeros(frames.shape[1:], np.int8)
    mask[:, :5] = 1
    monitor = np.array([1.0e5, 0.9e5, 1.1e5])
    ours = integrate_frames(
        frames,
        make_integrator(GEOMETRY),
        npt=300,
        unit="2th_deg",
        flip="ud",
        polarization_factor=0.95,
        mask=mask,
        monitor=monitor,
        monitor_reference=1e5,
    )
    direct = AzimuthalIntegrator().set_config(GEOMETRY.as_pyfai_config())
    for index, frame in enumerate(frames):
        expected = direct.integrate1d(
            np.flipud(frame),
            300,
            unit="2th_deg",
            method=("bbox", "csr", "cython"),
            mask=np.flipud(mask),
            error_model="poisson",
            polarization_factor=0.95,
            normalization_factor=monitor[index] / 1e5,
        )
        np.testing.assert_allclose(ours.intensity[index], expected.intensity, rtol=1e-6)
        np.testing.assert_allclose(ours.errors[index], expected.sigma, rtol=1e-6)
        np.testing.assert_allclose(ours.radial, expected.radial, rtol=1e-12)
    # the monitor really scales: frame 1 had 10% less beam
    assert ours.intensity.shape == (3, 300)


def test_frames_may_be_streamed_one_at_a_time():
    frames = rings(frames=2)
    integrator = make_integrator(GEOMETRY)
    whole = integrate_frames(frames, integrator, npt=100)
    streamed = integrate_frames(iter(list(frames)), integrator, npt=100)
    np.testing.assert_array_equal(whole.intensity, streamed.intensity)


def test_cake_integration_has_azimuthal_axis():
    result = integrate_frames(
        rings(frames=1), make_integrator(GEOMETRY), npt=100, npt_azim=36, error_model=None
    )
    assert result.intensity.shape == (1, 36, 100)
    assert result.azimuthal.shape == (36,) and result.errors is None


def test_integrator_is_built_once_per_geometry():
    cache = IntegratorCache(size=2)
    with cache.borrow(GEOMETRY) as first:
        pass
    with cache.borrow(Geometry(**GEOMETRY.model_dump())) as again:
        assert again is first
    other = GEOMETRY.model_copy(update={"dist": 0.2})
    with cache.borrow(other) as second:
        assert second is not first
    assert cache.built == 2
    for dist in (0.3, 0.4):  # two more geometries: the least recently used goes
        with cache.borrow(GEOMETRY.model_copy(update={"dist": dist})):
            pass
    with cache.borrow(GEOMETRY) as rebuilt:
        assert rebuilt is not first and cache.built == 5


def threads_case(frames: int) -> tuple[IntegratorCache, Geometry, np.ndarray]:
    """An empty integrator cache, a 600 x 640 detector's geometry and ``frames`` of rings."""
    shape = (600, 640)
    geometry = GEOMETRY.model_copy(
        update={"detector_config": {"pixel1": 1e-4, "pixel2": 1e-4, "max_shape": list(shape)}}
    )
    return IntegratorCache(), geometry, rings(shape=shape, frames=frames)


def test_threads_integrate_with_integrators_of_their_own():
    # pyFAI's integrators are not safe to share: two threads integrating with one at once
    # gave wrong patterns. A borrowed integrator is one thread's until it is returned. And
    # their set-up runs numexpr programs shared by the process, which two threads running
    # at once corrupt the heap with when numexpr runs serially (as with OMP_NUM_THREADS=1):
    # one thread at a time sets up (SETUP_LOCK).
    import numexpr

    cache, geometry, frames = threads_case(frames=3)
    units = ["q_nm^-1", "2th_deg", "q_A^-1", "r_mm", "2th_rad"]  # a set-up for each
    alone = make_integrator(geometry)
    serial = {u: integrate_frames(frames, alone, npt=500, unit=u) for u in units}
    start = threading.Barrier(2)

    def integrate(_: int):
        with cache.borrow(geometry) as integrator:
            start.wait()  # both threads hold an integrator at once
            results = {u: integrate_frames(frames, integrator, npt=500, unit=u) for u in units}
            return integrator, results

    threads = numexpr.set_num_threads(1)
    try:
        with ThreadPoolExecutor(2) as pool:
            (first, ours), (second, theirs) = pool.map(integrate, range(2))
    finally:
        numexpr.set_num_threads(threads)
    assert first is not second and cache.built == 2
    for results in (ours, theirs):
        for unit, result in results.items():
            np.testing.assert_array_equal(result.intensity, serial[unit].intensity)
            np.testing.assert_array_equal(result.errors, serial[unit].errors)
    with cache.borrow(geometry) as again:  # returned: kept for the next task
        assert again in (first, second) and cache.built == 2


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="unknown radial unit"):
        DiffractionParameters(unit="furlongs")
    with pytest.raises(ValueError, match="either 'poni' or 'geometry'"):
        DiffractionParameters(poni="a.poni", geometry=GEOMETRY)
    assert DiffractionParameters(method="csr").method == ("bbox", "csr", "cython")
    assert DiffractionParameters(method="full_histogram_cython").method == (
        "full",
        "histogram",
        "cython",
    )
    with pytest.raises(ParameterError, match="mask has shape"):
        integrate_frames(rings(frames=1), make_integrator(GEOMETRY), mask=np.zeros((10, 10)))
    with pytest.raises(ParameterError, match="monitor 'mon' is 0.0"):
        integrate_frames(
            rings(frames=1),
            make_integrator(GEOMETRY),
            monitor=np.zeros(1),
            monitor_name="mon",
        )


def test_keyword_defaults_are_the_parameter_defaults():
    fields = DiffractionScience.model_fields
    keywords = inspect.signature(integrate_frames).parameters
    shared = [name for name in keywords if name in fields]
    assert len(shared) == 14
    for name in shared:
        assert keywords[name].default == fields[name].default, name


def test_parameters_are_grouped_and_paths_are_marked():
    assert DiffractionParameters.path_fields() == ["poni", "mask", "dark", "flat"]
    assert DiffractionParameters.glob_fields() == []
    groups = [DiffractionSource, DiffractionScience, DiffractionExecution]
    assert [n for g in groups for n in g.model_fields] == list(DiffractionParameters.model_fields)
    assert DiffractionSource.path_fields() == DiffractionParameters.path_fields()
    assert DiffractionScience.path_fields() == DiffractionExecution.path_fields() == []


def test_a_thread_finding_the_integrator_lent_copies_its_set_up():
    # The second thread's integrator is a shallow copy of the first's, made once the first
    # has set up: it shares the pixel positions (read only) and builds a sparse matrix of
    # its own; both integrate at once and give the serial patterns.
    cache, geometry, frames = threads_case(frames=4)
    serial = integrate_frames(frames, make_integrator(geometry), npt=500)
    set_up, copied = threading.Event(), threading.Event()

    def first() -> tuple:
        with cache.borrow(geometry) as integrator:
            integrate_frames(frames[:1], integrator, npt=500)
            set_up.set()
            copied.wait(60)
            return integrator, integrate_frames(frames, integrator, npt=500)

    def second() -> tuple:
        set_up.wait(60)
        with cache.borrow(geometry) as integrator:
            copied.set()
            return integrator, integrate_frames(frames, integrator, npt=500)

    with ThreadPoolExecutor(2) as pool:
        ours, theirs = pool.submit(first), pool.submit(second)
        (one, mine), (other, yours) = ours.result(), theirs.result()
    assert other is not one and other == one  # the same geometry, another object
    assert cache.built == 2 and cache.copied == 1
    assert other.engines is not one.engines  # a sparse matrix of its own
    for result in (mine, yours):
        np.testing.assert_array_equal(result.intensity, serial.intensity)
        np.testing.assert_array_equal(result.errors, serial.errors)
    with cache.borrow(geometry) as again, cache.borrow(geometry) as too:
        assert {id(again), id(too)} == {id(one), id(other)}  # both kept, neither copied
    assert cache.built == 2
