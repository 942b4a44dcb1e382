"""Benchmark: `calypso export` to a local S3 server versus s3fs's own recursive upload.

    python tests/benchmarks/bench_export.py [--gigabytes 2] [--repeat 2]

1. Writes result-like files (incompressible): a few large volumes, tens of slab
   files and many small patterns, ``--gigabytes`` in all.
2. Starts moto's standalone S3 server on loopback (the same server as the tests).
3. Alternates, ``--repeat`` times: the baseline, s3fs alone doing what
   `aws s3 cp --recursive` does (``S3FileSystem.put(dir, uri, recursive=True)``,
   s3fs defaults, in this process), and the `calypso export` command as a
   subprocess (checksums, resume check, metadata, manifest, catalogue record,
   Python start-up included). Each upload goes to a fresh, empty prefix; the
   bucket is emptied between runs.
4. Prints MB/s of each, the ratio export/baseline per run and the median, and
   the export command's peak memory.

The machine is shared and noisy, and the S3 server runs on the same two cores:
compare the ratios printed in one run, not absolute speeds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import free_port, isolated_environment, scratch_folder, time_command, wait_for_http

BUCKET = "benchmark"


def write_results(folder: Path, gigabytes: float, seed: int = 0) -> int:
    """Volumes (1/2 of the bytes, 256 MB each), slabs (1/4, 8 MB), patterns (1/4, 512 kB)."""
    rng = np.random.default_rng(seed)
    total = int(gigabytes * 2**30)
    layout = [("volume", 256 * 2**20, total // 2), ("slab", 8 * 2**20, total // 4)]
    layout.append(("pattern", 512 * 2**10, total - sum(share for _, _, share in layout)))
    written = 0
    for name, size, share in layout:
        (folder / f"{name}s").mkdir(parents=True, exist_ok=True)
        for index in range(max(1, share // size)):
            (folder / f"{name}s" / f"{name}_{index:05d}.dat").write_bytes(rng.bytes(size))
            written += size
    return written


def start_s3(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(work / "moto.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        env=dict(os.environ, TMPDIR=str(work)),  # large objects spill to disk here
    )
    wait_for_http(f"{endpoint}/moto-api/", timeout=60, process=server)
    return server, endpoint


def s3fs_alone(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(
        key="benchmark",
        secret="benchmark",
        endpoint_url=endpoint,
        client_kwargs={"region_name": "us-east-1"},
        skip_instance_cache=True,
    )


def baseline(source: Path, endpoint: str, prefix: str) -> float:
    fs = s3fs_alone(endpoint)
    began = time.perf_counter()
    fs.put(str(source) + "/", f"{BUCKET}/{prefix}/", recursive=True)
    return time.perf_counter() - began


def calypso_export(source: Path, endpoint: str, prefix: str, env: dict[str, str]):
    command = [
        sys.executable, "-m", "calypso.flows.cli", "export", str(source),
        "--to", f"s3://{BUCKET}/{prefix}", "--json",
    ]  # fmt: skip
    return time_command(command, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    work = scratch_folder("calypso-bench-export-")
    source = work / "PROCESSED_DATA" / "sample" / "sample_0001" / "tomography"
    size = write_results(source, args.gigabytes)
    files = sum(1 for p in source.rglob("*") if p.is_file())
    print(f"{size / 2**30:.2f} GiB in {files} files under {source}")
    server, endpoint = start_s3(work)
    env = isolated_environment(work) | {
        "CALYPSO_EXPORT__ENDPOINT_URL": endpoint,
        "CALYPSO_EXPORT__REGION": "us-east-1",
        "CALYPSO_EXPORT__ACCESS_KEY_ID": "benchmark",
        "CALYPSO_EXPORT__SECRET_ACCESS_KEY": "benchmark",
    }
    fs = s3fs_alone(endpoint)
    fs.call_s3("create_bucket", Bucket=BUCKET)
    megabytes = size / 1e6
    ratios, rows = [], []
    try:
        for run in range(args.repeat):
            base_s = baseline(source, endpoint, f"baseline-{run}")
            fs.rm(f"{BUCKET}/baseline-{run}", recursive=True)
            export_s, summary, peak = calypso_export(source, endpoint, f"calypso-{run}", env)
            assert summary["uploaded"] == files, summary
            fs.rm(f"{BUCKET}/calypso-{run}", recursive=True)
            ratio = base_s / export_s
            ratios.append(ratio)
            rows.append((run, megabytes / base_s, megabytes / export_s, ratio, peak / 2**30))
            print(
                f"run {run}: s3fs put --recursive {megabytes / base_s:7.1f} MB/s | "
                f"calypso export {megabytes / export_s:7.1f} MB/s (inside: "
                f"{summary['megabytes_per_s'] * 1.048576:.1f}) | ratio {ratio:.2f} | "
                f"export peak RSS {peak / 2**30:.2f} GiB",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"median ratio calypso export / s3fs alone: {median(ratios):.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()
