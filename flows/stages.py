"""The curate pipeline's stages, in pipeline order. Each takes what it needs and returns its result.

A stage is wiring: it cuts its input into shards, maps a task of `tasks/` over them on the Dask
cluster, waits for them with a progress bar, and returns the paths or tables that the next stage
takes (`flows/curate.py: pipeline` passes them on). All that stages share is the frozen `Run`
(the run's config, paths and cluster plan) and the `RunLog` of timings and counts that
report.json shows.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import dask
import pyarrow as pa
import pyarrow.compute as pc
from distributed import fire_and_forget
from prefect import Task, get_run_logger, unmapped
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from upath import UPath

from flows.cluster import ClusterExecutor, start_replacing_workers
from flows.config import ThresherConfig
from flows.options import (
    check_options,
    embed_options,
    model_spec,
    report_config,
    report_settings,
    select_options,
    train_options,
)
from flows.run import Batches, Finished, Run, RunLog, finishing, in_turn, pieces, track
from tasks.datapool import PoolLock, commit, history, merge, processed_keys, run_rows, sampled_embeddings
from tasks.decoding import check_params, check_pieces, check_table, read_checks
from tasks.dedup import classify_samples
from tasks.dumping import dump_names, dump_shard
from tasks.embedding import embed_pieces, warm_model
from tasks.embeddings_csv import read_embeddings_csv
from tasks.gathering import from_embeddings_csv, gather_embeddings, load_embeddings
from tasks.imports import frozen_imports
from tasks.listing import InputFile, is_video, list_datasource, read_relevant_filenames
from tasks.models import EmbedOptions, ModelSpec
from tasks.one_pass import check_embed_pieces
from tasks.outputs import write_outputs
from tasks.report.settings import ReportInputs
from tasks.report.views import StartedViews, start_views
from tasks.selection.inputs import RunTables
from tasks.selection.tasks import select_samples, select_sequences, selected_filenames
from tasks.sharding import Batch, Source, count_samples, stable_shards, video_shards
from tasks.storage import describe, read_parquet, write_parquet
from tasks.video.frames import FrameRange
from tasks.video.probe import corrupt_video_rows, probe_videos, read_videos
from tasks.video.sequences import frame_infos, write_video_outputs

Identities = dict[str, tuple[str, int, str]]  # sample -> its input file's (name, size, version)


class EmbeddingModel(NamedTuple):
    """What this run's embeddings are: their dimension, and the model that makes them."""

    dim: int
    name: str


def embedding_model(config: ThresherConfig) -> EmbeddingModel:
    """Known before any work, so that a datapool can refuse a run whose embeddings it cannot hold."""
    if config.embeddings:
        _, vectors, _ = read_embeddings_csv(config.shared_path(config.embeddings, "embeddings"))
        return EmbeddingModel(vectors.shape[1], "embeddings-file")
    spec = model_spec(config)
    return EmbeddingModel(spec.dim, spec.identity(config.lightly.collate.input_size))


def read_embeddings(run: Run, log: RunLog) -> None:
    """The samples and embeddings of an embeddings file, instead of listing, checking and embedding."""
    start = log.start("read-embeddings")
    samples, embeddings = from_embeddings_csv(run.config.shared_path(run.config.embeddings, "embeddings"))
    write_parquet(samples, run.samples_path)
    write_parquet(embeddings, run.embeddings_path)
    write_parquet(read_videos([]), run.videos_path)  # no videos
    log.counts["n_input_files"] = len(samples)
    log.timed("read-embeddings", len(samples), start)


# What the report imports in the flow's process: matplotlib (tasks/report/build.py), the probe's
# scikit-learn (tasks/report/quality.py) and weasyprint (tasks/report/render.py).
REPORT_LIBRARIES = ("tasks.report.build", "sklearn.linear_model", "weasyprint")


def import_report_libraries() -> None:
    """Import the report's libraries in a thread, from the run's start: 2 to 4 s of this process's
    time, spent while it waits (for its workers to start, then to check and embed) rather than in
    the report, which every run ends with. The report imports them as before; a module this thread
    is still importing makes it wait. They last the process's life (tasks/imports.py)."""

    def load() -> None:
        with frozen_imports():
            for name in REPORT_LIBRARIES:
                importlib.import_module(name)

    threading.Thread(target=load, name="report-imports", daemon=True).start()


def warm_up(run: Run, log: RunLog, spec: ModelSpec) -> None:
    """Start the cluster and load the model on each worker that embeds, while the flow lists and
    probes the input (minutes for a large bucket): otherwise the first embedding task on each
    worker would import torch and build the model (seconds) when its files are ready. The loads
    need no waiting for: a worker runs its first embedding task after its load."""
    start = log.start("start_cluster")
    client = FlowRunContext.get().task_runner.client  # the task runner starts its cluster on first use
    threads = embed_options(run.config, run.plan.threads).torch_threads
    workers = client.scheduler_info()["workers"]
    for address, worker in workers.items():
        if not run.plan.gpu or "GPU" in worker.get("resources", {}):
            # fire_and_forget: a load runs to its end though no one holds its future
            fire_and_forget(client.submit(warm_model, spec, threads, workers=[address], pure=False))
    log.timed("start_cluster", len(workers), start)


def list_files(run: Run, log: RunLog, pool: pa.Table | None) -> list[InputFile]:
    """The input files; with a datapool, only those no earlier run processed (unless process_all)."""
    config = run.config
    start = log.start("list")
    relevant = None
    if config.relevant_filenames_file:
        path = config.shared_path(config.relevant_filenames_file, "relevant_filenames_file")
        relevant = read_relevant_filenames(path)
    listing = list_datasource(run.input, relevant)
    files = listing.files
    log.not_images = listing.not_images
    if pool is not None and not config.datasource.process_all:
        done = processed_keys(pool, run.source)
        new = [f for f in files if (f.filename, f.size, f.version) not in done]
        log.counts["n_skipped_processed"] = len(files) - len(new)
        get_run_logger().info(
            "Datapool: %d files are new, %d were processed by earlier runs.", len(new), len(files) - len(new)
        )
        files = new
    log.counts["n_input_files"] = len(files)
    log.timed("list", len(files), start)
    return files


def probe(run: Run, log: RunLog, files: list[InputFile]) -> pa.Table:
    """The videos among the files, probed: one VIDEO_SCHEMA row each, also written to videos.parquet."""
    config = run.config
    start = log.start("probe")
    videos = [f for f in files if is_video(f.filename)]
    groups = stable_shards(videos, lambda f: f.filename, config.dask.shard_size, run.plan.slots)
    futures = probe_videos.with_options(retries=config.dask.retries).map(
        unmapped(run.input),
        groups,
        unmapped(config.datasource.use_frame_count_metadata),
        unmapped(config.corruptness_check.decode_timeout),
        [run.work / "probe" / f"shard-{i:05d}.parquet" for i in range(len(groups))],
    )
    probed = read_videos(track(finishing(futures), "probe", groups, log, start))
    write_parquet(probed, run.videos_path)
    return probed


def sample_identities(files: list[InputFile], probed: pa.Table) -> Identities:
    """Each sample's input file: an image is its own; a frame's is its video (also for unusable videos)."""
    by_name = {f.filename: (f.filename, f.size, f.version) for f in files}
    identities = {f.filename: by_name[f.filename] for f in files if not is_video(f.filename)}
    identities.update({row["filename"]: by_name[row["filename"]] for row in corrupt_video_rows(probed)})
    identities.update({name: by_name[info.video] for name, info in frame_infos(probed).items()})
    return identities


@dataclass(frozen=True)
class Embedded:
    paths: list[UPath]  # every piece's embeddings, in the order of the usable samples
    computed: bool  # some pieces were computed, on this run's workers (the others were cached)
    stage: str  # the stage that embedded them, as report.json names it


@dataclass(frozen=True)
class Checked:
    paths: list[UPath]  # the check tables: the unusable videos' rows, then every piece's
    embedded: Embedded | None  # the pieces' embeddings, when the check made them (tasks/one_pass.py)


def check(run: Run, log: RunLog, files: list[InputFile], probed: pa.Table, spec: ModelSpec | None) -> Checked:
    """Decode and hash every image and video frame, and embed them in the same pass when given the
    model's `spec` (see embeds_while_checking)."""
    config = run.config
    stage = "check" if spec is None else "check_and_embed"
    start = log.start(stage)
    options = check_options(config)
    images = [f for f in files if not is_video(f.filename)]
    shards: list[list[Source]] = stable_shards(images, lambda f: f.filename, config.dask.shard_size, run.plan.slots)
    shards += video_shards(probed, config.dask.shard_size, run.plan.slots)
    corrupt_videos = write_parquet(check_table(corrupt_video_rows(probed)), run.work / "check-videos.parquet")
    if spec is None:
        paths, batches = pieces(run, "check", check_params(options), shards)
        tasks = batch_tasks(run, check_pieces, batches, input_dir=run.input, options=options)
        track(tasks, stage, batches.shards(), log, start)
        log.timings[stage]["cached_shards"] = batches.cached
        return Checked([corrupt_videos, *paths], None)
    embedding = embed_options(config, run.plan.threads)
    params = (check_params(options), embed_key(spec, embedding))
    paths, batches = pieces(run, "check-embed", params, shards)
    tasks = batch_tasks(
        run, check_embed_pieces, batches, gpu=True, input_dir=run.input, spec=spec, check=options, embed=embedding
    )
    return Checked([corrupt_videos, *paths], Embedded(paths, embedded_pieces(tasks, stage, batches, log, start), stage))


def embed_key(spec: ModelSpec, options: EmbedOptions) -> tuple:
    """What changes the embeddings: the model, input size, precision and decoding (not batching)."""
    identity = spec.identity(options.input_size)
    return identity, options.input_size, options.precision, options.max_pixels, options.full_decode


def on_gpu(run: Run) -> AbstractContextManager:
    """On a cluster with GPU workers, embedding runs only there (one task per GPU at a time)."""
    return dask.annotate(resources={"GPU": 1}) if run.plan.gpu else nullcontext()


def batch_tasks(run: Run, task: Task, batches: Batches, gpu: bool = False, **fixed: Any) -> Finished:
    """One `task(pieces=, out_paths=, **fixed)` per batch, submitted in turn (see in_turn), on
    the GPU workers where `gpu` and there are any (on_gpu)."""
    task = task.with_options(retries=run.config.dask.retries)

    def submit(i: int) -> PrefectFuture:
        with on_gpu(run) if gpu else nullcontext():
            return task.submit(pieces=Batch(batches.pieces[i]), out_paths=batches.paths[i], **fixed)

    return in_turn(submit, len(batches.pieces), run.plan.slots)


def embedded_pieces(tasks: Finished, stage: str, batches: Batches, log: RunLog, start: float) -> bool:
    """Wait for a stage that embeds (track logs its compute efficiency; none when all was cached).
    Whether it computed any piece. The futures die with their stage's call, so the workers replaced
    after embedding hold nothing that the flow still wants."""
    track(tasks, stage, batches.shards(), log, start)
    log.timings[stage].setdefault("compute_efficiency", None)
    log.timings[stage]["cached_shards"] = batches.cached
    return bool(batches.pieces)


@dataclass(frozen=True)
class Usable:
    """The samples that passed the check and are no duplicates: what training and embedding read."""

    images: list[InputFile]
    frames: list[list[FrameRange]]  # video frames, as shards of frame ranges

    def count(self) -> int:
        return len(self.images) + count_samples([rng for group in self.frames for rng in group])


def deduplicate(run: Run, log: RunLog, checked: list[UPath], probed: pa.Table, identities: Identities) -> Usable:
    """Classify every sample as ok, corrupt or duplicate (samples.parquet); returns the ok ones."""
    start = log.start("dedup")
    classify_samples(checked, run.config.remove_exact_duplicates, run.samples_path)
    samples = read_parquet([run.samples_path])
    log.timed("dedup", len(samples), start)
    ok = samples.filter(pc.equal(samples.column("status"), "ok"))
    names = set(ok.column("filename").to_pylist())
    frame_shards = video_shards(probed, run.config.dask.shard_size, run.plan.slots, keep=names)
    frames = {name for group in frame_shards for rng in group for name in rng.names()}
    images = [
        InputFile(n, label, *identities[n][1:])
        for n, label in zip(ok.column("filename").to_pylist(), ok.column("label").to_pylist())
        if n not in frames
    ]
    return Usable(images, frame_shards)


def train(run: Run, log: RunLog, usable: Usable, spec: ModelSpec) -> ModelSpec:
    """Fine-tune the backbone with SimCLR; returns the spec with the trained checkpoint. It runs in
    the flow's process, not on a Dask worker: workers cannot start the data-loading processes
    lightly.loader.num_workers asks for."""
    # Imported here: lightly loads torchvision, which only training needs.
    from tasks.training import train_model

    start = log.start("train")
    ranges = [rng for group in usable.frames for rng in group]
    checkpoint = train_model(
        run.input, [f.filename for f in usable.images], spec, train_options(run.config), run.run_dir, frames=ranges
    )
    log.timed("train", usable.count(), start)
    return dataclasses.replace(spec, checkpoint=checkpoint)


def embed(run: Run, log: RunLog, usable: Usable, spec: ModelSpec, checked: Checked) -> Embedded:
    """Embed the usable samples, unless the check has embedded them."""
    if checked.embedded is not None:
        return checked.embedded
    config = run.config
    start = log.start("embed")
    options = embed_options(config, run.plan.threads)
    image_shards = stable_shards(usable.images, lambda f: f.filename, config.dask.shard_size, run.plan.slots)
    paths, batches = pieces(run, "embed", embed_key(spec, options), [*image_shards, *usable.frames])
    tasks = batch_tasks(run, embed_pieces, batches, gpu=True, input_dir=run.input, spec=spec, options=options)
    return Embedded(paths, embedded_pieces(tasks, "embed", batches, log, start), "embed")


def free_workers(run: Run, log: RunLog, embedded: Embedded, samples: int) -> Future | None:
    """Replace this run's worker processes with new ones in the background, while the flow gathers,
    selects and writes; returns the replacement while it runs. Embedding leaves each worker holding
    torch, the model and its allocator's high-water mark (about 1 GB of RSS on CPU, a CUDA context
    on a GPU); the later stages need none of it, and a new worker starts at under 100 MB. It pays
    only in a run whose later stages need that memory (dask.replace_workers_after): new workers
    take seconds to start, which a small run would wait for. The workers of a cluster given by
    address are not ours: a service keeps them warm for its next run."""
    if not (embedded.computed and run.plan.own_workers and samples >= run.config.dask.replace_workers_after):
        return None
    client = FlowRunContext.get().task_runner.client
    workers = len(client.cluster.worker_spec)
    get_run_logger().info("Replacing the %d workers to free the model's memory (the flow goes on meanwhile).", workers)
    log.timings[embedded.stage]["workers_replaced"] = workers
    return start_replacing_workers(client)


def workers_ready(replacing: Future | None) -> None:
    """Wait for the workers replaced after embedding before the cluster runs anything else."""
    if replacing is not None:
        replacing.result()


def gather(run: Run, log: RunLog, embedded: Embedded, dim: int) -> None:
    start = log.start("gather")
    gathered = gather_embeddings(run.samples_path, embedded.paths, run.embeddings_path, dim)
    log.timed("gather", gathered, start)


def datapool_centers(run: Run, pool: pa.Table | None) -> UPath | None:
    """The datapool's selected samples, which selection starts from, when there are any."""
    centers = sampled_embeddings(pool) if pool is not None else None
    if centers is not None and len(centers):
        return write_parquet(centers, run.work / "datapool-centers.parquet")
    return None


def cluster_executor() -> ClusterExecutor:
    """The flow's cluster, for the report's UMAPs and plots."""
    return ClusterExecutor(FlowRunContext.get().task_runner)


def start_report_views(run: Run, centers: UPath | None, replacing: Future | None) -> StartedViews | None:
    """Start the report's projections on the cluster: they need only the embeddings, so they run
    while the flow writes, updates the pool and computes the report's numbers. Not during the
    selection: its BLAS threads and the projections on the same cores slowed it 5 to 20 times at
    4,000 samples on two cores. Not while this run's workers are being replaced: the report starts
    them then, on the new ones. On a run's own new workers the UMAPs run in one task, on a warm
    cluster's side by side (see tasks.report.views.start_embedding_views)."""
    if replacing is not None:
        return None
    vectors = load_embeddings(run.embeddings_path, run.config.normalize_embeddings)[2]
    settings = report_settings(run.config)
    return start_views(vectors, settings, centers, run.cache, cluster_executor(), spread=not run.plan.own_workers)


def select(run: Run, log: RunLog, centers: UPath | None) -> dict:
    start = log.start("select")
    options = select_options(run.config)
    if options.sequence_length > 1:
        selection = select_sequences(run.embeddings_path, run.videos_path, options, run.selection_path)
    else:
        tables = RunTables(
            samples=None if run.config.embeddings else run.samples_path,
            videos=run.videos_path,
            scores=run.run_dir / "data" / "active_learning_scores.parquet",
        )
        selection = select_samples(run.embeddings_path, options, run.selection_path, centers, tables)
    log.timed("select", selection["n_candidates"], start)
    return selection


def write(run: Run, log: RunLog) -> dict[str, list[float]]:
    """The filename lists, CSVs and video outputs; returns the selected frames' timelines per video."""
    config = run.config
    start = log.start("write")
    lists = write_outputs(
        run.run_dir,
        run.samples_path,
        run.embeddings_path,
        run.selection_path,
        config.normalize_embeddings,
        config.dump_sampled_embeddings,
    )
    log.counts.update({f"n_{name}": value for name, value in lists.items()})
    timelines = write_video_outputs(run.run_dir, run.videos_path, run.selection_path, config.selected_sequence_length)
    log.timed("write", log.counts["n_input_files"], start)
    return timelines


def dump(run: Run, log: RunLog, identities: Identities, replacing: Future | None) -> None:
    """Copy the selected images and frames to data/sampled/."""
    config = run.config
    selected = selected_filenames(run.selection_path)
    workers_ready(replacing)
    start = log.start("dump")
    frame_groups = video_shards(read_videos([run.videos_path]), config.dask.shard_size, run.plan.slots, set(selected))
    frames = {name for group in frame_groups for rng in group for name in rng.names()}
    samples = read_parquet([run.samples_path])
    labels = dict(zip(samples.column("filename").to_pylist(), samples.column("label").to_pylist()))
    # Without a listing (embeddings from a file) an image's size and version are not known; dumping needs neither.
    images = [
        InputFile(name, labels[name], *identities.get(name, (name, 0, ""))[1:])
        for name in sorted(set(selected) - frames)
    ]
    groups = [*stable_shards(images, lambda f: f.filename, config.dask.shard_size, run.plan.slots), *frame_groups]
    outputs = dump_names(selected, config.output_image_format)
    futures = dump_shard.with_options(retries=config.dask.retries).map(
        unmapped(run.input),
        groups,
        [{n: outputs[n] for s in group for n in s.names()} for group in groups],
        unmapped(run.run_dir / "data" / "sampled"),
        unmapped(config.output_image_size),
        unmapped(config.output_image_format),
        unmapped(config.corruptness_check.max_pixels),
    )
    shards = track(finishing(futures), "dump", groups, log, start)
    failed = {name: reason for shard in shards for name, reason in shard.items()}
    log.counts["n_dump_failed"] = len(failed)
    if failed:
        shown = "; ".join(f"{name}: {reason}" for name, reason in sorted(failed.items())[:5])
        get_run_logger().warning(
            "%d selected files could not be dumped to data/sampled (changed or deleted since they were checked): %s",
            len(failed),
            shown,
        )


def update_pool(
    run: Run,
    log: RunLog,
    lock: PoolLock,
    pool: pa.Table | None,
    checked: list[UPath],
    identities: Identities,
    model: EmbeddingModel,
) -> None:
    """Merge this run's files and selection into the datapool and commit it."""
    start = log.start("datapool")
    samples = read_parquet([run.samples_path])
    check = read_checks(checked) if checked else None
    hashes = dict(zip(check.column("filename").to_pylist(), check.column("content_hash").to_pylist())) if check else {}
    chosen = set(selected_filenames(run.selection_path))
    names, _, vectors = load_embeddings(run.embeddings_path, normalize=False)
    sampled = {name: vector for name, vector in zip(names, vectors) if name in chosen}
    identities = identities or {n: (n, 0, "") for n in samples.column("filename").to_pylist()}
    rows = run_rows(run.source, samples, identities, hashes, sampled, run.run_dir.name, model.dim, model.name)
    merged = merge(pool, rows)
    lock.check()  # the last moment before the pool is written
    commit(lock.pool_dir, merged, run.config.datapool.keep_history)
    log.timed("datapool", len(rows), start)


def report(
    run: Run,
    log: RunLog,
    started: datetime,
    selection: dict,
    timelines: dict[str, list[float]],
    centers: UPath | None,
    views: StartedViews | None,
    replacing: Future | None,
) -> None:
    from tasks.report.build import write_report  # imported here: matplotlib and weasyprint, for the report only

    config = run.config
    log.start("report")
    workers_ready(replacing)
    finished = datetime.now(UTC)
    job = {
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "duration_seconds": round((finished - started).total_seconds(), 3),
        "run_directory": describe(run.run_dir),
    }
    inputs = ReportInputs(
        run.run_dir,
        run.samples_path,
        run.embeddings_path,
        run.selection_path,
        job,
        log.counts,
        log.timings,
        selection,
        report_config(config),
        report_settings(config),
        timelines if config.show_video_sampling_timeline and timelines else None,
        history(run.pool_dir) if run.pool_dir else None,
        centers,
        run.cache,
        log.not_images,
    )
    write_report(inputs, cluster_executor(), views)
