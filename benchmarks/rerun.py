"""Rerun cost: the first run over N images, an unchanged rerun, and a run after adding 10% new files,
with a datapool (only new files are processed) and without one (the shard cache skips old work).

Runs against a warm local Dask cluster and one Prefect server, as a deployed service does, so the
figures compare the runs' own work, not process start-up. The workers get the service's Dask
settings (infra/dask.yaml, which the image installs): with Dask's defaults instead (malloc
trimming, statistical profiler), in 3 alternating invocations of 2,000 images and three +10%
runs each, the first run took 1.12 to 1.33 times as long and the +10% runs 1.05 to 1.07 times
(their mean). The same file has them preload the stages' and the report's libraries, kept out of
the garbage collector's passes (flows/worker_imports.py): in two invocations alternating with two of
222debb, which had not, the +10% runs took 2.6 and 2.9 s against 3.4 and 4.3 s, and the unchanged
ones 0.8 s against 1.2 and 1.5 s (with fontTools below 4.68 as well, see pyproject.toml).
Prints wall times and ratios, and per run the part before the report
(report.json's job duration) and the rest: the report and the flow's own overhead.

Two parts of that overhead were measured so, and are why flows/curate.py runs the pipeline as it
does: with a flow run heartbeat thread, the start and end of a run adding 220 files to a datapool
took 0.4 to 0.7 s, and 0.1 s without (`no_heartbeats`); with the run's modules not frozen out of
garbage collection, one full collection took 0.45 s on 2 cores, and a run made one to four
(`frozen_modules`).

The default images are small (96x80) synthetic JPEGs, which make decoding and embedding, and so
the first run, cheaper than photos; --image-size 640x480 measures camera-sized ones.

    uv run python benchmarks/rerun.py --n 2000 [--repeat 3]
    uv run python benchmarks/rerun.py --n 2000 --image-size 640x480

--repeat runs each mode's scenario that many times, alternating the modes, each from a new
folder, and prints the median ratios: on a noisy machine one +10% run varied by 0.5 s.

Measured for the piece size (tasks/sharding.py, MIN_PIECE): a Prefect task costs about 0.25 s of
CPU of its own, the time of 20 to 30 small images; on 2 slots, runs adding 200 to 220 files took
1.5 s less in 3 to 5 pieces than in 5 to 6 (the mean of 4 runs each).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dask
from distributed import LocalCluster
from prefect.testing.utilities import prefect_test_harness

import flows  # noqa: F401  (Prefect settings before Prefect is imported)
from flows.cli import main
from tests.images import picture, save

SERVICE_DASK_CONFIG = Path(__file__).resolve().parents[1] / "infra" / "dask.yaml"


def make_images(root: Path, seeds: range, size: tuple[int, int]) -> None:
    for seed in seeds:
        save(picture(seed, size), root / f"img_{seed:06d}.jpg", format="JPEG", quality=90)


def timed_run(address: str, root: Path, run: str, *extra: str) -> dict[str, float]:
    """Wall seconds of one run, and of its part before the report."""
    start = time.perf_counter()
    code = main(
        [
            "run",
            f"dask.address={address}",
            f"input_dir={root / 'in'}",
            f"output_dir={root / 'out'}",
            f"shared_dir={root / 'shared'}",
            f"run_directory={run}",
            "stopping_condition.n_samples=0.1",
            *extra,
        ]
    )
    assert code == 0, f"run {run} failed"
    wall = time.perf_counter() - start
    report = json.loads((root / "out" / run / "report.json").read_text())
    return {"wall": wall, "before_report": report["job"]["duration_seconds"]}


def scenario(address: str, root: Path, n: int, size: tuple[int, int], extra: tuple[str, ...]) -> dict[str, dict]:
    shutil.rmtree(root, ignore_errors=True)
    (root / "shared").mkdir(parents=True)
    make_images(root / "in", range(n), size)
    first = timed_run(address, root, "first", *extra)
    unchanged = timed_run(address, root, "unchanged", *extra)
    make_images(root / "in", range(n, n + n // 10), size)
    grown = timed_run(address, root, "grown", *extra)
    return {"first": first, "unchanged": unchanged, "grown": grown}


def image_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def ratio(times: dict[str, dict], run: str) -> float:
    """A rerun's wall time as a share of the first run's, in one scenario's `times`."""
    return times[run]["wall"] / times["first"]["wall"]


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--image-size", type=image_size, default=(96, 80), help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--repeat", type=int, default=1, help="scenarios of each mode, from a new folder each time")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="thresher-rerun-"))
    # merged into the settings, as Dask merges the files of /etc/dask
    dask.config.update(dask.config.config, dask.config.collect([SERVICE_DASK_CONFIG], env={}))
    modes = {"datapool": ("datapool.name=pool",), "cache only": ()}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    with (
        prefect_test_harness(server_startup_timeout=120),
        LocalCluster(
            n_workers=os.cpu_count(), threads_per_worker=1, dashboard_address=":0", silence_logs=logging.WARNING
        ) as cluster,
    ):
        # one throw-away run warms the workers (torch import, model load) and this process (report)
        scenario(cluster.scheduler_address, workdir / "warm-up", 20, args.image_size, ())
        for _ in range(args.repeat):
            for mode, extra in modes.items():
                results[mode].append(
                    scenario(cluster.scheduler_address, workdir / mode, args.n, args.image_size, extra)
                )
    shutil.rmtree(workdir, ignore_errors=True)
    width, height = args.image_size
    print(f"\nN={args.n} images of {width}x{height}, {os.cpu_count()} cores, warm cluster")
    print(f"{'mode':<12}{'first s':>10}{'unchanged s':>13}{'ratio':>8}{'+10% s':>10}{'ratio':>8}")
    for mode, runs in results.items():
        for t in runs:
            print(
                f"{mode:<12}{t['first']['wall']:>10.1f}{t['unchanged']['wall']:>13.1f}{ratio(t, 'unchanged'):>8.2f}"
                f"{t['grown']['wall']:>10.1f}{ratio(t, 'grown'):>8.2f}"
            )
        if len(runs) > 1:
            medians = {run: statistics.median(ratio(t, run) for t in runs) for run in ("unchanged", "grown")}
            print(f"{mode + ' median':<35}{medians['unchanged']:>8.2f}{'':>10}{medians['grown']:>8.2f}")
    print("targets: unchanged < 0.10, +10% < 0.25 of the first run")
    print("\nseconds before the report / report and flow overhead")
    for mode, runs in results.items():
        for t in runs:
            print(
                f"{mode:<12}"
                + "".join(
                    f"{run:>11} {t[run]['before_report']:5.1f} / {t[run]['wall'] - t[run]['before_report']:4.1f}"
                    for run in ("first", "unchanged", "grown")
                )
            )


if __name__ == "__main__":
    main_benchmark()
