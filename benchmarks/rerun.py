"""Rerun cost: the first run over N images, an unchanged rerun, and a run after adding 10% new files,
with a datapool (only new files are processed) and without one (the shard cache skips old work).

Runs against a warm local Dask cluster and one Prefect server, as a deployed service does, so the
figures compare the runs' own work, not process start-up. Prints wall times and ratios.

    uv run python benchmarks/rerun.py --n 2000
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import flows  # noqa: F401  (Prefect settings before Prefect is imported)
from distributed import LocalCluster
from prefect.testing.utilities import prefect_test_harness

from flows.cli import main, quiet_console
from tests.images import picture, save


def make_images(root: Path, seeds: range) -> None:
    for seed in seeds:
        save(picture(seed), root / f"img_{seed:06d}.jpg", format="JPEG", quality=90)


def timed_run(address: str, root: Path, run: str, *extra: str) -> float:
    start = time.perf_counter()
    code = main(["run", f"dask.address={address}", f"input_dir={root / 'in'}", f"output_dir={root / 'out'}",
                 f"shared_dir={root / 'shared'}", f"run_directory={run}", "stopping_condition.n_samples=0.1", *extra])
    assert code == 0, f"run {run} failed"
    return time.perf_counter() - start


def scenario(address: str, root: Path, n: int, extra: tuple[str, ...]) -> dict[str, float]:
    shutil.rmtree(root, ignore_errors=True)
    (root / "shared").mkdir(parents=True)
    make_images(root / "in", range(n))
    first = timed_run(address, root, "first", *extra)
    unchanged = timed_run(address, root, "unchanged", *extra)
    make_images(root / "in", range(n, n + n // 10))
    grown = timed_run(address, root, "grown", *extra)
    return {"first": first, "unchanged": unchanged, "grown": grown}


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    quiet_console()
    workdir = Path(tempfile.mkdtemp(prefix="thresher-rerun-"))
    with prefect_test_harness(server_startup_timeout=120), LocalCluster(
        n_workers=os.cpu_count(), threads_per_worker=1, dashboard_address=":0", silence_logs=logging.WARNING
    ) as cluster:
        # one throw-away run warms the workers (torch import, model load) and this process (report)
        scenario(cluster.scheduler_address, workdir / "warm-up", 20, ())
        results = {
            "datapool": scenario(cluster.scheduler_address, workdir / "pool", args.n, ("datapool.name=pool",)),
            "cache only": scenario(cluster.scheduler_address, workdir / "cache", args.n, ()),
        }
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nN={args.n} images, {os.cpu_count()} cores, warm cluster")
    print(f"{'mode':<12}{'first s':>10}{'unchanged s':>13}{'ratio':>8}{'+10% s':>10}{'ratio':>8}")
    for mode, t in results.items():
        print(f"{mode:<12}{t['first']:>10.1f}{t['unchanged']:>13.1f}{t['unchanged'] / t['first']:>8.2f}"
              f"{t['grown']:>10.1f}{t['grown'] / t['first']:>8.2f}")
    print("targets: unchanged < 0.10, +10% < 0.25 of the first run")


if __name__ == "__main__":
    main_benchmark()
