"""A replayed scan published on Bliss's data-stream server (blissdata), as Bliss publishes
it: the scan's info, one Lima stream with the files' names and ``last_index_saved`` (a
scan with a detector), one stream a counter (a number a point; a row a point for a
map's 2D counters, as Bliss's 1D detectors: MCAs, spectra), ``end_reason``. Used by the
acquisition simulator (:mod:`calypso.flows.samples.acquisition_simulator`) beside the files
it writes.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import h5py
import numpy as np

from calypso.tasks.raw.data_policy import RawDataset
from calypso.tasks.raw.lima_saving import LIMA_DATASET

if TYPE_CHECKING:
    from calypso.flows.samples.acquisition_simulator import RecordedScan


class BlissPublisher:
    """The scan on Bliss's data-stream server, as Bliss publishes it."""

    def __init__(
        self,
        url: str,
        recorded: RecordedScan,
        raw: RawDataset,
        template: str,
        n_frames: int,
        per_file: int,
    ) -> None:
        from blissdata.redis_engine.store import DataStore
        from blissdata.streams.default import Stream
        from blissdata.streams.lima import LimaStream

        self.store = DataStore(url)
        identity = {
            "name": recorded.title.split()[0] if recorded.title else "scan",
            "number": recorded.number,
            "data_policy": "ESRF",
            "path": str(raw.raw_file),
        }
        info = {"npoints": n_frames, "filename": str(raw.raw_file), "title": recorded.title}
        self.scan = self.store.create_scan(identity, info=info)
        self.lima = None
        self.counters: dict = {}

        def declare() -> None:
            if recorded.detector:
                with h5py.File(recorded.frames[0][0], "r") as h5:
                    source = h5[recorded.frames[0][1]]
                    shape, dtype = source.shape[1:], source.dtype
                suffix = template.rsplit(".", 1)[-1]
                saving = {
                    "file_path": template,
                    "data_path": LIMA_DATASET,
                    "file_format": {"h5": "hdf5", "tiff": "tiff"}.get(suffix, suffix),
                    "file_offset": 0,
                    "frames_per_file": per_file,
                }
                image = LimaStream.make_definition(
                    f"{recorded.detector}:image", dtype, shape,
                    f"id00/limaccds/{recorded.detector}", 10, n_frames, 0, saving,
                )  # fmt: skip
                self.lima = self.scan.create_stream(image)
            self.counters = {
                name: self.scan.create_stream(
                    Stream.make_definition(f"simulator:{name}", "float64", values.shape[1:])
                )
                for name, values in recorded.counters.items()
            }
            self.scan.prepare()
            self.scan.start()

        # A server gone as the scan is declared (a reader saw it created): the files are
        # written all the same, as when it goes later.
        self._publish(declare)

    gone = False  # the server stopped answering: the files go on being written

    def frame(self, index: int, points: dict[str, np.ndarray]) -> None:
        def send() -> None:
            # Counters first: a reader that waits for them then finds the frame's point.
            for name, value in points.items():
                self.counters[name].send(np.asarray(value, dtype=np.float64))
            if self.lima is not None:
                self.lima.send({"last_index": index, "last_index_saved": index})

        self._publish(send)

    def end(self, reason: str) -> None:
        def close() -> None:
            self.scan.stop()
            self.scan.info["end_reason"] = reason
            self.scan.close()
            self.store._redis.connection_pool.disconnect()

        self._publish(close)

    def _publish(self, action) -> None:
        import redis

        if self.gone:
            return
        try:
            # blissdata sends from threads of its own, whose errors never come back here,
            # and waits for them when the scan stops: ask the server first.
            self.store._redis.ping()
            action()
        except redis.exceptions.RedisError as exc:
            self.gone = True
            print(f"blissdata server gone ({exc}): writing the files only", file=sys.stderr)
