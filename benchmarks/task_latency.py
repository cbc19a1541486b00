"""How long a batch task waits between its submission and its first line, on Thresher's local
cluster, with its files passed as a list (as before tasks/sharding.py's `Batch`) or as a `Batch`,
with and without a Prefect cache key (the batch tasks have none: Thresher caches each piece's
file itself).

Prefect walks a task's lists, dicts and dataclasses element by element: on the flow's side for
futures, on the worker's for the task's inputs and its cache key. A `Batch` is one value to it.
The variants alternate, one task at a time, after one warm-up task per worker, so that each meets
the same load; prints each variant's seconds from submission to the task's first line.

    uv run python -m benchmarks.task_latency [--files 2000] [--repeat 6]
"""

from __future__ import annotations

import argparse
import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.testing.utilities import prefect_test_harness
from upath import UPath

import flows  # noqa: F401  (Prefect settings before Prefect is imported)
from flows.cluster import cluster_plan
from flows.config import ThresherConfig
from tasks.listing import InputFile
from tasks.sharding import Batch
from tests.options import check_options, embed_options


def waited(pieces: object, check: object, embed: object, out_paths: list[UPath], submitted: float) -> float:
    """Seconds since `submitted`, on the worker (one machine: one clock)."""
    return time.time() - submitted


VARIANTS = {
    "list, cache key": (task(waited), list),
    "list, no cache key": (task(waited, cache_policy=NO_CACHE), list),
    "Batch, cache key": (task(waited), Batch),
    "Batch, no cache key": (task(waited, cache_policy=NO_CACHE), Batch),
}


def measure(n_files: int, repeat: int) -> dict[str, list[float]]:
    files = [InputFile(f"000/photo_{i:06d}.jpg", 0, 30000, "1764000000.0") for i in range(n_files)]
    pieces = [files[i : i + 250] for i in range(0, n_files, 250)]
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}

    def submit(name: str) -> float:
        latency_task, wrap = VARIANTS[name]
        paths = [UPath(f"/tmp/{i}.parquet") for i in range(len(pieces))]
        return latency_task.submit(wrap(pieces), check_options(), embed_options(), paths, time.time()).result()

    @flow(task_runner=cluster_plan(ThresherConfig(input_dir="in", output_dir="out")).task_runner())
    def latencies() -> None:
        first, _ = VARIANTS["list, cache key"]
        for warming in [first.submit([], None, None, [], time.time()) for _ in range(2)]:  # each worker's first
            warming.result()
        for _ in range(repeat):
            for name in VARIANTS:
                seconds[name].append(submit(name))

    latencies()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()
    with prefect_test_harness(server_startup_timeout=120):
        seconds = measure(args.files, args.repeat)
    print(f"\nseconds from a task's submission to its first line, {args.files} files a task")
    for name, values in seconds.items():
        print(
            f"{name:<22}" + " ".join(f"{v:6.3f}" for v in values) + f"   median {sorted(values)[len(values) // 2]:.3f}"
        )


if __name__ == "__main__":
    main()
