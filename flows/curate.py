"""The `curate` flow: list, decode and check, deduplicate, embed, gather, select, write, report.

`curate` takes the keys of `thresher run` as its parameters (see `flow_signature`), validates
them with the same checks and messages as the command line, and runs `pipeline` on the Dask
cluster they name. Stages map over shards of files on the workers; tasks pass paths and small
manifests; shard results are content-addressed Parquet files in the cache, so a rerun skips
what it has done before; the outputs follow the Lightly Worker's run-directory layout.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import dask
from distributed import Client, LocalCluster
from distributed.utils import import_term
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect_dask import DaskTaskRunner
from tqdm import tqdm
from upath import UPath

from flows.clusters import load_cluster_spec
from flows.config import ThresherConfig, dump_config, flow_signature, overrides_of, validate_config
from tasks.caching import cache_path
from tasks.datapool import (
    PoolLock, check_compatible, commit, history, merge, processed_keys, read_pool, run_rows, sampled_embeddings,
)
from tasks.decoding import CheckOptions, check_pieces, check_table
from tasks.dedup import classify
from tasks.dumping import dump_names, dump_shard
from tasks.embedding import EmbedOptions, ModelSpec, embed_pieces
from tasks.embeddings_csv import read_embeddings_csv
from tasks.gathering import GATHERED_NAME, from_embeddings_csv, gather_embeddings, load_embeddings
from tasks.listing import InputFile, is_video, list_datasource, read_relevant_filenames
from tasks.outputs import write_outputs
from tasks.report.build import write_report
from tasks.report.settings import ReportInputs
from tasks.report.views import StartedViews, start_views
from tasks.selection.tasks import SelectOptions, select_samples, select_sequences, selected_filenames
from tasks.sharding import Source, count_samples, describe_shard, pack_pieces, plan_pieces, stable_shards, video_shards
from tasks.storage import describe, existing_names, read_parquet, remove_partial_files, write_parquet, write_text
from tasks.video.frames import FrameRange
from tasks.video.probe import corrupt_video_rows, probe_videos, read_videos
from tasks.video.sequences import frame_infos, write_video_outputs


def task_runner(config: ThresherConfig) -> DaskTaskRunner:
    """A runner on an existing scheduler, or on the local cluster spec sized to this machine."""
    if config.dask.address:
        return DaskTaskRunner(address=config.dask.address)
    return DaskTaskRunner(**load_cluster_spec(config.dask.cluster, config.dask.n_workers, config.dask.threads_per_worker))


@dataclass(frozen=True)
class Cluster:
    slots: int  # task slots (threads over all workers), for sizing shards so every slot gets work
    gpu: bool  # some worker offers the GPU resource: GPU stages ask for it, so they run only there
    own_workers: bool  # the processes of a LocalCluster this run starts, and may replace


def cluster_info(config: ThresherConfig) -> Cluster:
    if config.dask.address:
        with Client(config.dask.address, timeout="30s") as client:
            workers = client.scheduler_info()["workers"].values()
            return Cluster(max(1, sum(w["nthreads"] for w in workers)),
                           any("GPU" in w.get("resources", {}) for w in workers), own_workers=False)
    spec = load_cluster_spec(config.dask.cluster, config.dask.n_workers, config.dask.threads_per_worker)
    kwargs = spec["cluster_kwargs"]
    local = issubclass(import_term(spec.get("cluster_class", "distributed.LocalCluster")), LocalCluster)
    return Cluster(kwargs["n_workers"] * kwargs["threads_per_worker"], "GPU" in kwargs.get("resources", {}),
                   own_workers=local and kwargs.get("processes", True))


def replace_workers(client: Client, timeout: float = 300) -> None:
    """Close the workers of the client's local cluster, then start as many new ones. Scaling is the
    path Dask's own adaptive clusters take; a nanny restart (`Client.restart`) can lose a worker in
    a race (dask/distributed#7312)."""
    cluster = client.cluster
    workers = len(cluster.worker_spec)
    deadline = time.monotonic() + timeout
    cluster.scale(0)
    # The new workers take the old ones' names, so they are asked for only once those are gone.
    while client.scheduler_info()["workers"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {workers} Dask workers did not close within {timeout:.0f} s")
        time.sleep(0.1)
    cluster.scale(workers)
    client.wait_for_workers(workers, timeout=max(1.0, deadline - time.monotonic()))


class ClusterExecutor(Executor):
    """The flow's Dask cluster as an executor of plain functions (the report's UMAPs and plots).
    The task runner starts its cluster on first use, so a run with nothing to submit starts none."""

    def __init__(self, task_runner: DaskTaskRunner) -> None:
        self.task_runner = task_runner

    @functools.cached_property
    def cluster(self) -> Executor:
        return self.task_runner.client.get_executor(pure=False)

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        # A UMAP takes its points along (up to UMAP_POINTS embeddings, 25 MB at d = 1280), by design.
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": "64MB"}):
            return self.cluster.submit(fn, *args, **kwargs)


def _timed(timings: dict, stage: str, items: int, start: float) -> None:
    seconds = time.perf_counter() - start
    timings[stage] = {"seconds": round(seconds, 3), "items": items,
                      "items_per_second": round(items / seconds, 2) if seconds > 0 else None}


# The UI's progress bars are updated at most this often: an update is a call to the API, and a
# stage of many small shards would otherwise make one per shard.
PROGRESS_SECONDS = 1.0


def track(futures: list[PrefectFuture], stage: str, shards: list[list], timings: dict) -> list[Any]:
    """Wait for a stage's futures, with a progress bar in images/s in the terminal and a progress
    artifact in the Prefect UI; results in submission order. A shard that failed after its
    retries stops the run with a message naming its files."""
    start = time.perf_counter()
    if not futures:  # everything cached or nothing to do: no progress to show
        _timed(timings, stage, 0, start)
        return []
    sizes = [count_samples(s) for s in shards]
    index = {id(f): i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    artifact = create_progress_artifact(0.0, description=f"{stage}: {sum(sizes)} samples in {len(shards)} shards")
    shown = time.monotonic()
    with tqdm(total=sum(sizes), desc=f"{stage:<8}", unit="img", dynamic_ncols=True) as bar:
        for done, future in enumerate(as_completed(futures), start=1):
            i = index[id(future)]
            try:
                results[i] = future.result()
            except Exception as error:
                raise RuntimeError(f"{stage} failed for shard {i} ({describe_shard(shards[i])}): {error}") from error
            bar.update(sizes[i])
            if done == len(futures) or time.monotonic() - shown >= PROGRESS_SECONDS:
                update_progress_artifact(artifact, 100.0 * done / len(futures))
                shown = time.monotonic()
    _timed(timings, stage, sum(sizes), start)
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


@task(name="classify-samples")
def classify_samples(check_paths: list[UPath], remove_exact_duplicates: bool, out_path: UPath) -> UPath:
    return write_parquet(classify(read_parquet(check_paths), remove_exact_duplicates), out_path)


def model_spec(config: ThresherConfig) -> ModelSpec:
    return ModelSpec(
        name=config.lightly.model.name,
        num_ftrs=config.lightly.model.num_ftrs,
        checkpoint=config.shared_path(config.checkpoint, "checkpoint") if config.checkpoint else None,
        seed=config.lightly.seed,
    )


def select_options(config: ThresherConfig) -> SelectOptions:
    stop = config.stopping_condition
    return SelectOptions(
        method=config.method,
        n_samples=stop.samples,
        min_distance=stop.radius,
        normalize=config.normalize_embeddings,
        seed=config.lightly.seed,
        device=config.selection.device,
        sequence_length=config.selected_sequence_length,
    )


def embedding_identity(config: ThresherConfig) -> tuple[int, str]:
    """(dimension, model) of this run's embeddings, known before any work."""
    if config.embeddings:
        _, vectors, _ = read_embeddings_csv(config.shared_path(config.embeddings, "embeddings"))
        return vectors.shape[1], "embeddings-file"
    spec = model_spec(config)
    return spec.dim, spec.identity(config.lightly.collate.input_size)


@flow(name="curate-pipeline")
def pipeline(config: ThresherConfig) -> dict:
    """Curate `config.input_dir` into `<output_dir>/<run_directory>/`; returns the counts."""
    logger = get_run_logger()
    started = datetime.now(timezone.utc)
    run_dir = config.location(config.output_dir) / (config.run_directory or started.strftime("%Y-%m-%d_%H-%M-%S"))
    work = run_dir / "intermediate"
    write_text(dump_config(config), run_dir / "config" / "config.yaml")
    write_text("".join(f"- {item}\n" for item in overrides_of(config)), run_dir / "config" / "overrides.yaml")
    logger.info("Run directory: %s", describe(run_dir))
    pool_dir = config.pool_dir()
    swept = remove_partial_files(run_dir, recursive=True) + sum(
        remove_partial_files(folder) for folder in (config.cache_path() / "check", config.cache_path() / "embed", pool_dir)
        if folder)
    if swept:
        logger.info("Removed %d partial files that killed runs had left.", swept)

    with PoolLock(pool_dir) if pool_dir else nullcontext() as lock:
        dim, model = embedding_identity(config)
        pool = read_pool(pool_dir) if pool_dir else None
        check_compatible(pool, dim, model, pool_dir)
        stages = Stages(config, run_dir, work, cluster_info(config), dim)
        if config.embeddings:
            stages.read_embeddings()
        else:
            stages.process_files(pool)
        stages.select(pool)
        stages.write()
        if pool_dir and config.datasource.enable_datapool_update:
            stages.update_pool(lock, pool, model)
        counts = stages.report(started, pool_dir)
    logger.info(
        "Done: %d files -> %d sampled, %d removed, %d duplicate, %d corrupt. Results in %s",
        counts["n_input_files"], counts["n_sampled"], counts["n_removed"], counts["n_duplicate"],
        counts["n_corrupt"], describe(run_dir),
    )
    return {**counts, "run_directory": describe(run_dir)}


class Stages:
    """The pipeline's stages in order, sharing the run's paths and timings."""

    def __init__(self, config: ThresherConfig, run_dir: UPath, work: UPath, cluster: Cluster, dim: int) -> None:
        self.config, self.run_dir, self.work, self.cluster, self.dim = config, run_dir, work, cluster, dim
        self.slots = cluster.slots
        self.input = config.location(config.input_dir)
        self.source = describe(self.input)
        self.cache = config.cache_path()
        self.timings: dict[str, dict] = {}
        self.samples_path = work / "samples.parquet"
        self.videos_path = work / "videos.parquet"
        self.embeddings_path = work / GATHERED_NAME
        self.selection_path = work / "selection.parquet"
        self.centers_path: UPath | None = None  # the datapool's selected samples, when there are any
        self.selection: dict = {}
        self.timelines: dict[str, list[float]] = {}
        self.identities: dict[str, tuple[str, int, str]] = {}  # sample -> (input file, size, version)
        self.check_paths: list[UPath] = []
        self.counts: dict[str, int] = {"n_skipped_processed": 0}
        self.spec = model_spec(config)  # training replaces its checkpoint with the trained one
        self.replacing: Future | None = None  # the workers' replacement after embedding, while it runs
        self.views: StartedViews | None = None  # the report's views, when they were started before selection
        self.executor = ClusterExecutor(FlowRunContext.get().task_runner)  # for the report's UMAPs and plots
        self.report_config = config.model_dump(mode="json", exclude={"token"})
        write_parquet(read_videos([]), self.videos_path)

    def read_embeddings(self) -> None:
        start = time.perf_counter()
        samples, embeddings = from_embeddings_csv(self.config.shared_path(self.config.embeddings, "embeddings"))
        write_parquet(samples, self.samples_path)
        write_parquet(embeddings, self.embeddings_path)
        self.counts["n_input_files"] = len(samples)
        _timed(self.timings, "read-embeddings", len(samples), start)

    def process_files(self, pool: pa.Table | None) -> None:
        config = self.config
        start = time.perf_counter()
        relevant = None
        if config.relevant_filenames_file:
            relevant = read_relevant_filenames(config.shared_path(config.relevant_filenames_file, "relevant_filenames_file"))
        files = list_datasource(self.input, relevant)
        if pool is not None and not config.datasource.process_all:
            done = processed_keys(pool, self.source)
            new = [f for f in files if (f.filename, f.size, f.version) not in done]
            self.counts["n_skipped_processed"] = len(files) - len(new)
            get_run_logger().info("Datapool: %d files are new, %d were processed by earlier runs.",
                                  len(new), len(files) - len(new))
            files = new
        self.counts["n_input_files"] = len(files)
        _timed(self.timings, "list", len(files), start)
        probed = self.probe([f for f in files if is_video(f.filename)])
        images = [f for f in files if not is_video(f.filename)]
        # A sample's input file: an image is its own; a frame's is its video (also for unusable videos).
        by_name = {f.filename: (f.filename, f.size, f.version) for f in files}
        self.identities = {f.filename: by_name[f.filename] for f in images}
        self.identities.update({row["filename"]: by_name[row["filename"]] for row in corrupt_video_rows(probed)})
        self.identities.update({name: by_name[info.video] for name, info in frame_infos(probed).items()})
        self.check(images, probed)
        ok_images, frame_shards = self.deduplicate(probed)
        if config.enable_training:
            self.train(ok_images, frame_shards)
        self.embed(ok_images, frame_shards)

    def probe(self, videos: list[InputFile]) -> pa.Table:
        groups = stable_shards(videos, lambda f: f.filename, self.config.dask.shard_size, self.slots)
        futures = probe_videos.with_options(retries=self.config.dask.retries).map(
            unmapped(self.input), groups, unmapped(self.config.datasource.use_frame_count_metadata),
            unmapped(self.config.corruptness_check.decode_timeout),
            [self.work / "probe" / f"shard-{i:05d}.parquet" for i in range(len(groups))],
        )
        probed = read_videos(track(futures, "probe", groups, self.timings))
        write_parquet(probed, self.videos_path)
        return probed

    def check(self, images: list[InputFile], probed: pa.Table) -> None:
        config = self.config
        options = CheckOptions(
            full_decode=config.enable_corruptness_check,
            max_pixels=config.corruptness_check.max_pixels,
            allow_extension_mismatch=config.corruptness_check.allow_extension_mismatch,
            corruption_threshold=config.corruptness_check.corruption_threshold,
            decode_timeout=config.corruptness_check.decode_timeout,
        )
        shards: list[list[Source]] = stable_shards(images, lambda f: f.filename, config.dask.shard_size, self.slots)
        shards += video_shards(probed, config.dask.shard_size, self.slots)
        paths, batches = self.pieces("check", options, shards)
        futures = check_pieces.with_options(retries=config.dask.retries).map(
            unmapped(self.input), batches.pieces, unmapped(options), batches.paths)
        track(futures, "check", batches.shards(), self.timings)
        self.timings["check"]["cached_shards"] = batches.cached
        corrupt_videos = write_parquet(check_table(corrupt_video_rows(probed)), self.work / "check-videos.parquet")
        self.check_paths = [corrupt_videos, *paths]

    def deduplicate(self, probed: pa.Table) -> tuple[list[InputFile], list[list[FrameRange]]]:
        start = time.perf_counter()
        classify_samples(self.check_paths, self.config.remove_exact_duplicates, self.samples_path)
        samples = read_parquet([self.samples_path])
        _timed(self.timings, "dedup", len(samples), start)
        ok = samples.filter(pc.equal(samples.column("status"), "ok"))
        names = set(ok.column("filename").to_pylist())
        frame_shards = video_shards(probed, self.config.dask.shard_size, self.slots, keep=names)
        frames = {name for group in frame_shards for rng in group for name in rng.names()}
        ok_images = [InputFile(n, label, *self.identities[n][1:]) for n, label
                     in zip(ok.column("filename").to_pylist(), ok.column("label").to_pylist()) if n not in frames]
        return ok_images, frame_shards

    def train(self, ok_images: list[InputFile], frame_shards: list[list[FrameRange]]) -> None:
        """Fine-tune the backbone with SimCLR. It runs in the flow's process, not on a Dask worker:
        workers cannot start the data-loading processes lightly.loader.num_workers asks for."""
        # Imported here: lightly loads torchvision (see tasks/embedding.py), which only training needs.
        from tasks.training import Augmentations, TrainOptions, train_model

        lightly = self.config.lightly
        options = TrainOptions(
            max_epochs=lightly.trainer.max_epochs, batch_size=lightly.loader.batch_size,
            shuffle=lightly.loader.shuffle, drop_last=lightly.loader.drop_last,
            num_workers=lightly.loader.num_workers, use_gpu=lightly.trainer.gpus > 0,
            precision=lightly.trainer.precision, lr=lightly.optimizer.lr,
            weight_decay=lightly.optimizer.weight_decay, temperature=lightly.criterion.temperature,
            memory_bank_size=lightly.criterion.memory_bank_size, out_dim=lightly.model.out_dim,
            max_pixels=self.config.corruptness_check.max_pixels,
            # lightly's own transform ignores kernel_size (it blurs with Pillow by sigmas)
            augment=Augmentations(**lightly.collate.model_dump(exclude={"kernel_size"})),
        )
        start = time.perf_counter()
        ranges = [rng for group in frame_shards for rng in group]
        checkpoint = train_model(self.input, [f.filename for f in ok_images], self.spec, options,
                                 self.run_dir, frames=ranges)
        self.spec = dataclasses.replace(self.spec, checkpoint=checkpoint)
        _timed(self.timings, "train", len(ok_images) + count_samples(ranges), start)

    def embed(self, ok_images: list[InputFile], frame_shards: list[list[FrameRange]]) -> None:
        config = self.config
        threads = load_cluster_spec(config.dask.cluster, config.dask.n_workers,
                                    config.dask.threads_per_worker)["cluster_kwargs"]["threads_per_worker"]
        options = EmbedOptions(
            input_size=config.lightly.collate.input_size,
            batch_size=config.lightly.loader.batch_size,
            num_threads=threads if config.lightly.loader.num_workers == -1 else max(1, config.lightly.loader.num_workers),
            torch_threads=threads,
            precision=config.lightly.trainer.precision,
            max_pixels=config.corruptness_check.max_pixels,
            decode_timeout=config.corruptness_check.decode_timeout,
        )
        spec = self.spec
        # What changes the embeddings: the model, input size, precision and decoding limit (not batching).
        key_params = (spec.identity(options.input_size), options.input_size, options.precision, options.max_pixels)
        image_shards = stable_shards(ok_images, lambda f: f.filename, config.dask.shard_size, self.slots)
        paths, batches = self.pieces("embed", key_params, [*image_shards, *frame_shards])
        # On a cluster with GPU workers, embedding runs only there (one task per GPU at a time).
        with dask.annotate(resources={"GPU": 1}) if self.cluster.gpu else nullcontext():
            futures = embed_pieces.with_options(retries=config.dask.retries).map(
                unmapped(self.input), batches.pieces, unmapped(spec), unmapped(options), batches.paths)
        embedded = track(futures, "embed", batches.shards(), self.timings)
        del futures  # their keys are released: the workers replaced below hold nothing the flow still wants
        compute = sum(e["compute_seconds"] for e in embedded)
        total = sum(e["seconds"] for e in embedded)
        self.timings["embed"]["compute_efficiency"] = round(compute / total, 3) if total else None
        self.timings["embed"]["cached_shards"] = batches.cached
        if batches.pieces and self.cluster.own_workers:
            self.start_replacing_workers()
        start = time.perf_counter()
        gathered = gather_embeddings(self.samples_path, paths, self.embeddings_path, self.dim)
        _timed(self.timings, "gather", gathered, start)

    def start_replacing_workers(self) -> None:
        """Replace this run's worker processes with new ones in the background, while the flow gathers,
        selects and writes. Embedding leaves each worker holding torch, the model and its allocator's
        high-water mark (about 1 GB of RSS on CPU, a CUDA context on a GPU); the later stages need
        none of it, and a new worker starts at under 100 MB. The workers of a cluster given by
        address are not ours: a service keeps them warm for its next run."""
        client = FlowRunContext.get().task_runner.client
        workers = len(client.cluster.worker_spec)
        get_run_logger().info("Replacing the %d workers to free the model's memory (the flow goes on meanwhile).", workers)
        background = ThreadPoolExecutor(1, thread_name_prefix="replace-workers")
        self.replacing = background.submit(replace_workers, client)
        background.shutdown(wait=False)
        self.timings["embed"]["workers_replaced"] = workers

    def workers_ready(self) -> None:
        """Wait for the workers replaced after embedding before the cluster runs anything else."""
        if self.replacing is not None:
            self.replacing.result()
            self.replacing = None

    def pieces(self, stage: str, params: Any, shards: list[list[Source]]) -> tuple[list[UPath], Batches]:
        """The shards as pieces (see plan_pieces): every piece's result file in the cache, in order, and
        the pieces to compute, grouped into batches of about dask.shard_size samples (see pack_pieces).
        One listing of the cache folder tells what is there."""
        plan = plan_pieces(stage, self.source, params, shards, existing_names(self.cache / stage) if shards else set(),
                           self.slots)
        pieces = [(shard[piece.start : piece.stop], cache_path(self.cache, stage, piece.key), piece.cached)
                  for shard, shard_plan in zip(shards, plan) for piece in shard_plan]
        todo = [(items, path) for items, path, cached in pieces if not cached]
        groups = pack_pieces([count_samples(items) for items, _ in todo], self.slots, self.config.dask.shard_size)
        batches = Batches([[todo[i][0] for i in group] for group in groups],
                          [[todo[i][1] for i in group] for group in groups], cached=len(pieces) - len(todo))
        return [path for _, path, _ in pieces], batches

    def select(self, pool: pa.Table | None) -> None:
        config = self.config
        centers = sampled_embeddings(pool) if pool is not None else None
        if centers is not None and len(centers):
            self.centers_path = write_parquet(centers, self.work / "datapool-centers.parquet")
        self.start_views()
        start = time.perf_counter()
        options = select_options(config)
        if options.sequence_length > 1:
            self.selection = select_sequences(self.embeddings_path, self.videos_path, options, self.selection_path)
        else:
            self.selection = select_samples(self.embeddings_path, options, self.selection_path, self.centers_path)
        _timed(self.timings, "select", self.selection["n_candidates"], start)

    def start_views(self) -> None:
        """Start the report's projections on the cluster: they need only the embeddings, so they run
        while the flow selects, writes and updates the pool. Not while this run's workers are being
        replaced: the report starts them then, on the new ones."""
        if self.replacing is None:
            vectors = load_embeddings(self.embeddings_path, self.config.normalize_embeddings)[2]
            self.views = start_views(vectors, self.report_config, self.centers_path, self.cache, self.executor)

    def write(self) -> None:
        config, selection_path = self.config, self.selection_path
        start = time.perf_counter()
        lists = write_outputs(self.run_dir, self.samples_path, self.embeddings_path, selection_path,
                              config.normalize_embeddings, config.dump_sampled_embeddings)
        self.counts.update({f"n_{name}": value for name, value in lists.items()})
        self.timelines = write_video_outputs(self.run_dir, self.videos_path, selection_path,
                                             config.selected_sequence_length)
        _timed(self.timings, "write", self.counts["n_input_files"], start)
        if config.dump_dataset:
            self.dump(selected_filenames(selection_path))

    def dump(self, selected: list[str]) -> None:
        config = self.config
        self.workers_ready()
        frame_groups = video_shards(read_videos([self.videos_path]), config.dask.shard_size, self.slots,
                                    set(selected))
        frames = {name for group in frame_groups for rng in group for name in rng.names()}
        samples = read_parquet([self.samples_path])
        labels = dict(zip(samples.column("filename").to_pylist(), samples.column("label").to_pylist()))
        # Without a listing (embeddings from a file) an image's size and version are not known; dumping needs neither.
        images = [InputFile(name, labels[name], *self.identities.get(name, (name, 0, ""))[1:])
                  for name in sorted(set(selected) - frames)]
        groups = [*stable_shards(images, lambda f: f.filename, config.dask.shard_size, self.slots), *frame_groups]
        outputs = dump_names(selected, config.output_image_format)
        futures = dump_shard.with_options(retries=config.dask.retries).map(
            unmapped(self.input), groups, [{n: outputs[n] for s in group for n in s.names()} for group in groups],
            unmapped(self.run_dir / "data" / "sampled"),
            unmapped(config.output_image_size), unmapped(config.output_image_format),
            unmapped(config.corruptness_check.max_pixels),
        )
        failed = {name: reason for shard in track(futures, "dump", groups, self.timings) for name, reason in shard.items()}
        self.counts["n_dump_failed"] = len(failed)
        if failed:
            shown = "; ".join(f"{name}: {reason}" for name, reason in sorted(failed.items())[:5])
            get_run_logger().warning("%d selected files could not be dumped to data/sampled (changed or deleted since "
                                     "they were checked): %s", len(failed), shown)

    def update_pool(self, lock: PoolLock, pool: pa.Table | None, model: str) -> None:
        start = time.perf_counter()
        samples = read_parquet([self.samples_path])
        check = read_parquet(self.check_paths) if self.check_paths else None
        hashes = dict(zip(check.column("filename").to_pylist(), check.column("content_hash").to_pylist())) if check else {}
        chosen = set(selected_filenames(self.selection_path))
        names, _, vectors = load_embeddings(self.embeddings_path, normalize=False)
        sampled = {name: vector for name, vector in zip(names, vectors) if name in chosen}
        identities = self.identities or {n: (n, 0, "") for n in samples.column("filename").to_pylist()}
        rows = run_rows(self.source, samples, identities, hashes, sampled, self.run_dir.name, self.dim, model)
        merged = merge(pool, rows)
        lock.check()  # the last moment before the pool is written
        commit(lock.pool_dir, merged, self.config.datapool.keep_history)
        _timed(self.timings, "datapool", len(rows), start)

    def report(self, started: datetime, pool_dir: UPath | None) -> dict[str, int]:
        config = self.config
        self.workers_ready()
        finished = datetime.now(timezone.utc)
        job = {"started": started.isoformat(), "finished": finished.isoformat(),
               "duration_seconds": round((finished - started).total_seconds(), 3), "run_directory": describe(self.run_dir)}
        inputs = ReportInputs(
            self.run_dir, self.samples_path, self.embeddings_path, self.selection_path, job, self.counts,
            self.timings, self.selection, self.report_config,
            self.timelines if config.show_video_sampling_timeline and self.timelines else None,
            history(pool_dir) if pool_dir else None, self.centers_path, self.cache,
        )
        write_report(inputs, self.executor, self.views)
        return self.counts


def _curate(**parameters: Any) -> dict:
    """Validate the parameters (the same checks and messages as `thresher run`), then run the
    pipeline on the Dask cluster they name."""
    config = validate_config(parameters)
    # The modules a run uses are imported by now: some 600,000 objects that live as long as the
    # process. Frozen for the run, a full garbage collection no longer walks them; one took 0.45 s on
    # 2 cores, and a run made one to four (weasyprint and fontTools allocate many objects). Unfrozen
    # at its end, so that what runs leave behind, and the process's exit, are collected as before.
    gc.freeze()
    try:
        # The pipeline runs in this flow's process and thread, whose heartbeats already tell the server
        # that it is alive. A second heartbeat thread would cost every run up to a second at its end:
        # Prefect joins the thread, which wakes once a second.
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            return pipeline.with_options(task_runner=task_runner(config))(config)
    finally:
        gc.unfreeze()


_curate.__signature__ = flow_signature()  # type: ignore[attr-defined]
# Parameters are validated by the config object, so errors read the same here as in the CLI.
curate = flow(name="curate", validate_parameters=False)(_curate)


def run(config: ThresherConfig) -> dict:
    """Run the flow with a validated config (the CLI's entry)."""
    return curate(**config.model_dump())
