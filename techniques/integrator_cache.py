"""pyFAI integrators kept by geometry, lent to one thread at a time.

Building an integrator's sparse matrix costs ~1 s for a Pilatus 1M; a worker keeps the
integrators of the last few geometries it integrated with (:class:`IntegratorCache`).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from pyFAI.integrator.azimuthal import AzimuthalIntegrator

from calypso.techniques.diffraction import SETUP_LOCK, Geometry, make_integrator


class IntegratorCache:
    """Integrators kept by geometry, so a worker builds pyFAI's sparse matrix once.

    An integrator is lent to one thread at a time (:meth:`borrow`): pyFAI's integrators
    are not safe to share between threads (and their set-up not safe in two threads at
    once: see ``SETUP_LOCK``). Two threads integrating with one
    ``AzimuthalIntegrator`` at once gave wrong patterns, and once a crash in ``free``
    (pyFAI 2026.9, ``bbox,csr,cython``); with one integrator each, their patterns are
    the serial ones, and pyFAI's kernels release the GIL, so threads scale. A thread that
    finds every integrator of its geometry lent builds one more, as pyFAI's ``copy.copy``
    of a lent one: its pixel positions shared (read only), its own sparse matrix; set up
    in ~0.3 s instead of ~1.1 s (a Pilatus 1M), mostly holding the GIL.

    Parameters
    ----------
    size : int
        Number of geometries kept; the least recently used is dropped first.

    Examples
    --------
    >>> cache = IntegratorCache()
    >>> with cache.borrow(geometry) as integrator:  # doctest: +SKIP
    ...     result = integrate_frames(frames, integrator, npt=1000)
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._idle: OrderedDict[str, list[AzimuthalIntegrator]] = OrderedDict()
        self._lent: dict[str, list[AzimuthalIntegrator]] = {}
        self._lock = threading.Lock()
        self.built = 0
        self.copied = 0  # of those built, copies of a lent one

    @contextmanager
    def borrow(self, geometry: Geometry) -> Iterator[AzimuthalIntegrator]:
        """An integrator for ``geometry``, this thread's alone until the block ends."""
        key = geometry.key()
        with self._lock:
            idle = self._idle.get(key)
            integrator = idle.pop() if idle else None
            lent = self._lent.get(key, [])
            model = lent[-1] if lent and integrator is None else None
        if integrator is None:
            if model is not None:
                with SETUP_LOCK:  # the model is not halfway through its own set-up
                    integrator = copy.copy(model)
            else:
                integrator = make_integrator(geometry)
            with self._lock:
                self.built += 1
                self.copied += model is not None
        with self._lock:
            self._lent.setdefault(key, []).append(integrator)
        try:
            yield integrator
        finally:
            with self._lock:  # the most recently used geometry last
                lent = [other for other in self._lent[key] if other is not integrator]  # all ==
                if lent:
                    self._lent[key] = lent
                else:
                    del self._lent[key]
                self._idle.setdefault(key, []).append(integrator)
                self._idle.move_to_end(key)
                while len(self._idle) > self.size:
                    self._idle.popitem(last=False)
