"""What the stages of one run share, and how they put their work on the cluster.

`Run` is frozen: the config, the run's folders and the cluster plan. `RunLog` collects each
stage's timing and the run's counts for report.json. `pieces` cuts a stage's shards into the
pieces the cache has and has not (see tasks/sharding.py), and `track` waits for a stage's tasks
on the run's progress display in the terminal and in the Prefect UI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from tqdm import tqdm
from upath import UPath

from flows.cluster import ClusterPlan
from flows.config import ThresherConfig
from flows.overrides import dump_config, overrides_of
from tasks.caching import cache_path
from tasks.gathering import GATHERED_NAME
from tasks.sharding import Source, count_samples, describe_shard, pack_pieces, plan_pieces
from tasks.storage import describe, existing_names, remove_partial_files, write_text


@dataclass(frozen=True)
class Run:
    """What every stage of one run reads: its config, where it reads and writes, and its cluster."""

    config: ThresherConfig
    plan: ClusterPlan
    run_dir: UPath
    input: UPath  # input_dir, as a path that carries its storage options
    cache: UPath
    pool_dir: UPath | None

    @property
    def source(self) -> str:
        return describe(self.input)

    @property
    def work(self) -> UPath:
        return self.run_dir / "intermediate"

    @property
    def samples_path(self) -> UPath:
        return self.work / "samples.parquet"

    @property
    def videos_path(self) -> UPath:
        return self.work / "videos.parquet"

    @property
    def embeddings_path(self) -> UPath:
        return self.work / GATHERED_NAME

    @property
    def selection_path(self) -> UPath:
        return self.work / "selection.parquet"


def run_directory(config: ThresherConfig, started: datetime) -> UPath:
    """`<output_dir>/<run_directory>`, by default named after when the run started."""
    return config.location(config.output_dir) / (config.run_directory or started.strftime("%Y-%m-%d_%H-%M-%S"))


def start_run(config: ThresherConfig, plan: ClusterPlan, started: datetime) -> Run:
    """The run's folders, with its config written into it and the partial files of killed runs removed."""
    logger = get_run_logger()
    run_dir = run_directory(config, started)
    write_text(dump_config(config), run_dir / "config" / "config.yaml")
    write_text("".join(f"- {item}\n" for item in overrides_of(config)), run_dir / "config" / "overrides.yaml")
    logger.info("Run directory: %s", describe(run_dir))
    run = Run(config, plan, run_dir, config.location(config.input_dir), config.cache_path(), config.pool_dir())
    caches = [run.cache / stage for stage in ("check", "check-embed", "embed")]
    swept = remove_partial_files(run_dir, recursive=True) + sum(
        remove_partial_files(folder) for folder in (*caches, run.pool_dir) if folder
    )
    if swept:
        logger.info("Removed %d partial files that killed runs had left.", swept)
    return run


class RunProgress:
    """The run's one progress display in the terminal, a line that follows the run: the stage
    running; for a stage over samples (`track`), also its done/total, samples/s, the time left and
    the compute efficiency. Closed, it leaves nothing: the lines after the run say what came of it."""

    COUNTED = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    UNCOUNTED = "{desc}"

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def show(self, stage: str, total: int | None = None) -> tqdm:
        """The display, now showing `stage`, counting to `total` samples when given."""
        description, form = f"{stage:<15} ", self.COUNTED if total else self.UNCOUNTED
        if self.bar is None:
            self.bar = tqdm(total=total, desc=description, bar_format=form, unit="img", dynamic_ncols=True, leave=False)
            return self.bar
        self.bar.bar_format = form
        self.bar.total = total  # reset() keeps the total it is given None for
        self.bar.set_description_str(description, refresh=False)
        self.bar.set_postfix_str("", refresh=False)
        self.bar.reset(total)  # and shows it, once
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass
class RunLog:
    """What the stages did: each stage's timing and figures, the run's counts, and the files of
    input_dir skipped as neither images nor videos, by extension; and the run's progress display."""

    timings: dict[str, dict] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"n_skipped_processed": 0})
    not_images: dict[str, int] = field(default_factory=dict)
    progress: RunProgress = field(default_factory=RunProgress)

    def start(self, stage: str) -> float:
        """Show the stage on the progress display; returns its start, for `timed`."""
        self.progress.show(stage)
        return time.perf_counter()

    def timed(self, stage: str, items: int, start: float) -> None:
        seconds = time.perf_counter() - start
        self.timings[stage] = {
            "seconds": round(seconds, 3),
            "items": items,
            "items_per_second": round(items / seconds, 2) if seconds > 0 else None,
        }


# The UI's progress bars are updated at most this often: an update is a call to the API, and a
# stage of many small shards would otherwise make one per shard.
PROGRESS_SECONDS = 1.0


@dataclass
class ComputeEfficiency:
    """The share of a stage's task time spent computing (in the model) rather than reading and
    decoding, as the Lightly Worker's progress bar shows it: near 1 the model is kept busy, near 0
    the stage waits on reads and decodes. On a CPU, whose cores the decoding threads and the model
    take turns on (tasks/embedding.py: Turns), it is the model's share of the per-image work: about
    0.4 for 500x375 JPEGs at input_size 64, whose decode takes longer than their embedding. Tasks
    that measure it return `seconds` and `compute_seconds`."""

    seconds: float = 0.0
    compute_seconds: float = 0.0

    def add(self, result: Any) -> bool:
        """Count a task's result; whether it measured its compute time."""
        if not (isinstance(result, dict) and "compute_seconds" in result):
            return False
        self.seconds += result["seconds"]
        self.compute_seconds += result["compute_seconds"]
        return True

    @property
    def value(self) -> float:
        return self.compute_seconds / self.seconds if self.seconds else 0.0


Finished = Iterator[tuple[int, PrefectFuture]]  # a stage's tasks as they finish: (index, future)


def finishing(futures: list[PrefectFuture]) -> Finished:
    """Tasks submitted at once, as they finish."""
    index = {id(f): i for i, f in enumerate(futures)}
    return ((index[id(future)], future) for future in as_completed(futures))


def in_turn(submit: Callable[[int], PrefectFuture], count: int, slots: int) -> Finished:
    """Tasks 0 to count - 1, submitted in that order as task slots free up (`submit(i)` submits
    task i), as they finish. Submitted at once, Dask would queue each on a worker: one could wait
    behind a larger task while another worker runs out of work, and guided scheduling's large
    tasks must run first (tasks/sharding.py: pack_pieces)."""
    pending = [(i, submit(i)) for i in range(min(slots, count))]
    submitted = len(pending)
    while pending:
        future = next(as_completed([f for _, f in pending]))
        i, _ = pending.pop(next(k for k, (_, f) in enumerate(pending) if f is future))
        if submitted < count:
            pending.append((submitted, submit(submitted)))
            submitted += 1
        yield i, future


def track(finished: Finished, stage: str, shards: list[list], log: RunLog, start: float) -> list[Any]:
    """Wait for a stage's tasks, one per shard, shown on the run's progress display (done/total,
    samples/s, the time left and the compute efficiency of the stages that measure it, also
    logged) and as a progress artifact in the Prefect UI; results in the shards' order. A shard
    that failed after its retries stops the run with a message naming its files. The stage's
    time counts from `start` (log.start, before its tasks were planned and submitted: the
    workers start on the first task while the flow submits the others)."""
    if not shards:  # everything cached or nothing to do: no progress to show
        log.timed(stage, 0, start)
        return []
    sizes = [count_samples(s) for s in shards]
    results: list[Any] = [None] * len(shards)
    artifact = create_progress_artifact(0.0, description=f"{stage}: {sum(sizes)} samples in {len(shards)} shards")
    shown = time.monotonic()
    efficiency = ComputeEfficiency()
    bar = log.progress.show(stage, sum(sizes))
    for done, (i, future) in enumerate(finished, start=1):
        try:
            results[i] = future.result()
        except Exception as error:
            raise RuntimeError(f"{stage} failed for shard {i} ({describe_shard(shards[i])}): {error}") from error
        if efficiency.add(results[i]):
            bar.set_postfix_str(f"compute efficiency {efficiency.value:.2f}", refresh=False)
        bar.update(sizes[i])
        if done == len(shards) or time.monotonic() - shown >= PROGRESS_SECONDS:
            update_progress_artifact(artifact, 100.0 * done / len(shards))
            shown = time.monotonic()
    log.timed(stage, sum(sizes), start)
    if efficiency.seconds:
        log.timings[stage]["compute_efficiency"] = round(efficiency.value, 3)
    return results


@dataclass(frozen=True)
class Batches:
    """A stage's pieces to compute, grouped into batches, one task each (see tasks/sharding.py)."""

    pieces: list[list[list[Source]]]  # each batch's pieces, as lists of sources
    paths: list[list[UPath]]  # each batch's pieces' result files in the cache
    cached: int  # pieces whose result the cache holds

    def shards(self) -> list[list[Source]]:
        """Each batch's sources as one shard (for its progress and its error message)."""
        return [[source for piece in batch for source in piece] for batch in self.pieces]


def pieces(run: Run, stage: str, params: Any, shards: list[list[Source]]) -> tuple[list[UPath], Batches]:
    """The shards as pieces (see plan_pieces): every piece's result file in the cache, in order, and
    the pieces to compute, grouped into batches, large ones first (see pack_pieces).
    One listing of the cache folder tells what is there."""
    slots = run.plan.slots
    plan = plan_pieces(stage, run.source, params, shards, existing_names(run.cache / stage) if shards else set(), slots)
    all_pieces = [
        (shard[piece.start : piece.stop], cache_path(run.cache, stage, piece.key), piece.cached)
        for shard, shard_plan in zip(shards, plan)
        for piece in shard_plan
    ]
    todo = [(items, path) for items, path, cached in all_pieces if not cached]
    groups = pack_pieces([count_samples(items) for items, _ in todo], slots, run.config.dask.shard_size)
    batches = Batches(
        [[todo[i][0] for i in group] for group in groups],
        [[todo[i][1] for i in group] for group in groups],
        cached=len(all_pieces) - len(todo),
    )
    return [path for _, path, _ in all_pieces], batches
