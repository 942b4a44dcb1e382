"""Which task results are kept, so a retried flow run recomputes only unfinished chunks.

A chunk task's result (the path of the part file it wrote and a few numbers) is
cached under a key made of its inputs (the chunk, the parameters, the part
folder, which is named after the flow run) and its source code, and persisted
to Prefect's result storage (``PREFECT_LOCAL_STORAGE_PATH``, which Calypso sets
from ``CALYPSO_SERVE__RESULT_STORAGE``, default ``<home>/results``). A retry of
the same flow run finds the chunks that finished; a new run, other parameters
or changed code compute again.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE

CHUNK_TASK: dict[str, Any] = {"cache_policy": INPUTS + TASK_SOURCE, "persist_result": True}
