"""Datapool bookkeeping at scale: what a nightly run spends on its pool besides its new files.

    .venv/bin/python -m benchmarks.datapool [--n 1000000] [--sampled 100000] [--new 10000] [--dim 1280]

Writes a pool of --n processed files with --sampled of them selected (random embeddings), then
times the pool steps of one run that adds --new files (a tenth of them selected): reading the
pool, the processed-file keys that decide what is new, the initial centers for selection, the
merge, the commit (Parquet state, history link, datapool_latest.csv) and the report's per-run
history. Prints seconds per step and the memory that reading the pool took. Not part of the test
suite.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import psutil
import pyarrow as pa

from tasks.datapool import (
    POOL_FILE,
    commit,
    embedding_column,
    history,
    merge,
    pool_schema,
    processed_keys,
    read_pool,
    sampled_embeddings,
)
from tasks.storage import location

SOURCE = "/data/frames"


def pool_rows(first: int, n: int, n_sampled: int, dim: int, run: str, rng: np.random.Generator) -> pa.Table:
    names = [f"part_{i // 1000:04d}/img_{i:08d}.jpg" for i in range(first, first + n)]
    chosen = np.zeros(n, bool)
    chosen[rng.choice(n, n_sampled, replace=False)] = True
    embedding = embedding_column(chosen, rng.standard_normal((n_sampled, dim), dtype=np.float32))
    columns = {
        "source": pa.array([SOURCE] * n),
        "filename": pa.array(names),
        "file": pa.array(names),
        "label": pa.array(np.zeros(n, np.int32)),
        "size": pa.array(np.full(n, 120_000, np.int64)),
        "version": pa.array([repr(1.7e9 + i) for i in range(first, first + n)]),
        "content_hash": pa.array([f"{i:032x}" for i in range(first, first + n)]),
        "status": pa.array(np.where(chosen, "sampled", "removed").tolist()),
        "run": pa.array([run] * n),
        "embedding": embedding,
    }
    return pa.Table.from_pydict(columns, schema=pool_schema(dim, "benchmark-model"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="files the pool has processed")
    parser.add_argument("--sampled", type=int, default=100_000, help="of them selected")
    parser.add_argument("--new", type=int, default=10_000, help="files the run adds")
    parser.add_argument("--dim", type=int, default=1280)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        pool_dir = location(tmp) / "pool"
        commit(pool_dir, pool_rows(0, args.n, args.sampled, args.dim, "earlier", rng), keep_history=True)
        new = pool_rows(args.n, args.new, args.new // 10, args.dim, "tonight", rng)
        size_mb = (pool_dir / POOL_FILE).stat().st_size / 1e6
        seconds: dict[str, float] = {}

        def timed(step: str, work):
            started = time.perf_counter()
            result = work()
            seconds[step] = time.perf_counter() - started
            return result

        rss = psutil.Process().memory_info().rss
        pool = timed("read", lambda: read_pool(pool_dir))
        read_gb = (psutil.Process().memory_info().rss - rss) / 1e9
        timed("processed keys", lambda: processed_keys(pool, SOURCE))
        timed("centers", lambda: sampled_embeddings(pool))
        state = timed("merge", lambda: merge(pool, new))
        timed("commit", lambda: commit(pool_dir, state, keep_history=True))
        timed("history", lambda: history(pool_dir))
    print(
        f"pool of {args.n:,} files ({args.sampled:,} selected, d = {args.dim}), {size_mb:,.0f} MB; "
        f"a run adding {args.new:,}"
    )
    print(
        "  ".join(f"{step} {value:.2f} s" for step, value in seconds.items()) + f"  total {sum(seconds.values()):.2f} s"
    )
    print(f"reading the pool took {read_gb:.2f} GB of memory ({pool.nbytes / 1e9:.2f} GB of Arrow buffers)")


if __name__ == "__main__":
    main()
