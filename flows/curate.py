"""The `curate` flow: list, decode and check, deduplicate, embed, gather, select, write, report.

Stages map over shards of files on Dask workers (a local cluster by default, or `dask.address`).
Tasks pass paths and small manifests; every shard result is a Parquet file under
`<run>/intermediate/`, and the outputs follow the Lightly Worker's run-directory layout.
"""

from __future__ import annotations

import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from prefect import flow, get_run_logger, task, unmapped
from prefect.futures import PrefectFuture, as_completed
from prefect_dask import DaskTaskRunner
from tqdm import tqdm

from flows.config import ThresherConfig, dump_config, overrides_of
from tasks.decoding import CheckOptions, check_shard
from tasks.dedup import classify
from tasks.dumping import dump_names, dump_shard
from tasks.embedding import EmbedOptions, ModelSpec, embed_shard
from tasks.gathering import from_embeddings_csv, gather_embeddings, GATHERED_NAME
from tasks.listing import list_datasource, read_relevant_filenames, shard
from tasks.outputs import write_outputs
from tasks.report import write_report
from tasks.selection import select_samples, selected_filenames
from tasks.storage import read_parquet, write_parquet, write_text


def task_runner(config: ThresherConfig) -> DaskTaskRunner:
    """A runner on the configured cluster: an existing scheduler, or a local cluster sized to the machine."""
    if config.dask.address:
        return DaskTaskRunner(address=config.dask.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": worker_count(config),
            "threads_per_worker": config.dask.threads_per_worker,
            "processes": True,
            "dashboard_address": None,
        }
    )


def worker_count(config: ThresherConfig) -> int:
    if config.dask.n_workers:
        return config.dask.n_workers
    return max(1, (os.cpu_count() or 1) // config.dask.threads_per_worker)


def run_directory(config: ThresherConfig, started: datetime) -> Path:
    name = config.run_directory or started.strftime("%Y-%m-%d_%H-%M-%S")
    return Path(config.output_dir) / name


def track(futures: list[PrefectFuture], stage: str, sizes: list[int], timings: dict) -> list[Any]:
    """Wait for a stage's futures with a progress bar in images/s; results in submission order."""
    start = time.perf_counter()
    index = {id(f): i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    with tqdm(total=sum(sizes), desc=f"{stage:<12}", unit="img", unit_scale=False, dynamic_ncols=True) as bar:
        for future in as_completed(futures):
            i = index[id(future)]
            results[i] = future.result()
            bar.update(sizes[i])
    _timed(timings, stage, sum(sizes), start)
    return results


@task(name="classify-samples")
def classify_samples(check_paths: list[str], remove_exact_duplicates: bool, out_path: str) -> str:
    write_parquet(classify(read_parquet([Path(p) for p in check_paths]), remove_exact_duplicates), Path(out_path))
    return out_path


def _timed(timings: dict, stage: str, items: int, start: float) -> None:
    seconds = time.perf_counter() - start
    timings[stage] = {"seconds": round(seconds, 3), "items": items,
                      "items_per_second": round(items / seconds, 2) if seconds > 0 else None}


@flow(name="curate")
def curate(config: ThresherConfig) -> dict:
    """Curate `config.input_dir` into `<output_dir>/<run_directory>/`; returns the counts."""
    logger = get_run_logger()
    started = datetime.now(timezone.utc)
    run_dir = run_directory(config, started)
    work = run_dir / "intermediate"
    work.mkdir(parents=True, exist_ok=True)
    write_text(dump_config(config), run_dir / "config" / "config.yaml")
    write_text("".join(f"- {item}\n" for item in overrides_of(config)), run_dir / "config" / "overrides.yaml")
    logger.info("Run directory: %s", run_dir)
    timings: dict[str, dict] = {}
    n_workers = worker_count(config)
    samples_path = str(work / "samples.parquet")

    if config.embeddings:
        start = time.perf_counter()
        samples, embeddings = from_embeddings_csv(config.shared_path(config.embeddings, "embeddings"))
        write_parquet(samples, Path(samples_path))
        write_parquet(embeddings, work / GATHERED_NAME)
        embeddings_path = str(work / GATHERED_NAME)
        n_input = len(samples)
        _timed(timings, "read-embeddings", n_input, start)
    else:
        start = time.perf_counter()
        relevant = None
        if config.relevant_filenames_file:
            relevant = read_relevant_filenames(config.shared_path(config.relevant_filenames_file,
                                                                  "relevant_filenames_file"))
        files = list_datasource(config.input_dir, relevant)
        n_input = len(files)
        _timed(timings, "list", n_input, start)

        shards = shard(files, config.dask.shard_size, n_workers)
        options = CheckOptions(
            full_decode=config.enable_corruptness_check,
            max_pixels=config.corruptness_check.max_pixels,
            allow_extension_mismatch=config.corruptness_check.allow_extension_mismatch,
        )
        check_futures = check_shard.map(
            unmapped(config.input_dir), shards, unmapped(options),
            [str(work / "check" / f"shard-{i:05d}.parquet") for i in range(len(shards))],
        )
        check_paths = track(check_futures, "check", [len(s) for s in shards], timings)

        start = time.perf_counter()
        classify_samples(check_paths, config.remove_exact_duplicates, samples_path)
        samples = read_parquet([Path(samples_path)])
        _timed(timings, "dedup", n_input, start)
        ok = samples.filter(pc.equal(samples.column("status"), "ok"))
        ok_files = list(zip(ok.column("filename").to_pylist(), ok.column("label").to_pylist()))

        threads = config.dask.threads_per_worker
        embed_options = EmbedOptions(
            input_size=config.lightly.collate.input_size,
            batch_size=config.lightly.loader.batch_size,
            num_threads=threads if config.lightly.loader.num_workers == -1 else max(1, config.lightly.loader.num_workers),
            torch_threads=threads,
            precision=config.lightly.trainer.precision,
            max_pixels=config.corruptness_check.max_pixels,
        )
        spec = ModelSpec(
            name=config.lightly.model.name,
            num_ftrs=config.lightly.model.num_ftrs,
            checkpoint=str(config.shared_path(config.checkpoint, "checkpoint")) if config.checkpoint else "",
            seed=config.lightly.seed,
        )
        embed_shards = shard(ok_files, config.dask.shard_size, n_workers)
        embed_futures = embed_shard.map(
            unmapped(config.input_dir), embed_shards, unmapped(spec), unmapped(embed_options),
            [str(work / "embed" / f"shard-{i:05d}.parquet") for i in range(len(embed_shards))],
        )
        embedded = track(embed_futures, "embed", [len(s) for s in embed_shards], timings)
        compute = sum(e["compute_seconds"] for e in embedded)
        total = sum(e["seconds"] for e in embedded)
        timings["embed"]["compute_efficiency"] = round(compute / total, 3) if total else None

        start = time.perf_counter()
        gathered = gather_embeddings(samples_path, [e["path"] for e in embedded], str(work))
        embeddings_path = gathered["path"]
        _timed(timings, "gather", gathered["n"], start)

    start = time.perf_counter()
    selection = select_samples(
        embeddings_path, config.method, config.stopping_condition.n_samples,
        config.stopping_condition.min_distance, config.normalize_embeddings, config.lightly.seed,
        config.selection.device, str(work / "selection.parquet"),
    )
    _timed(timings, "select", selection["n_candidates"], start)
    selection_path = selection["path"]

    start = time.perf_counter()
    counts = write_outputs(str(run_dir), samples_path, embeddings_path, selection_path,
                           config.normalize_embeddings, config.dump_sampled_embeddings)
    _timed(timings, "write", n_input, start)

    if config.dump_dataset:
        names = sorted(dump_names(selected_filenames(Path(selection_path)), config.output_image_format).items())
        size = math.ceil(len(names) / max(n_workers, 1)) if names else 1
        groups = [names[i : i + size] for i in range(0, len(names), size)]
        dump_futures = dump_shard.map(
            unmapped(config.input_dir), groups, unmapped(str(run_dir / "data" / "sampled")),
            unmapped(config.output_image_size), unmapped(config.output_image_format), unmapped(config.corruptness_check.max_pixels),
        )
        track(dump_futures, "dump", [len(g) for g in groups], timings)

    finished = datetime.now(timezone.utc)
    counts = {"n_input_files": n_input, **{f"n_{name}": value for name, value in counts.items()}}
    job = {"started": started.isoformat(), "finished": finished.isoformat(),
           "duration_seconds": round((finished - started).total_seconds(), 3), "run_directory": str(run_dir)}
    start = time.perf_counter()
    write_report(str(run_dir), embeddings_path, selection_path, config.normalize_embeddings, job, counts, timings,
                 selection, config.model_dump(mode="json", exclude={"token"}), config.memory_requirement_in_GB)
    logger.info(
        "Done: %d files -> %d sampled, %d removed, %d duplicate, %d corrupt. Results in %s",
        n_input, counts["n_sampled"], counts["n_removed"], counts["n_duplicate"], counts["n_corrupt"], run_dir,
    )
    return {**counts, "run_directory": str(run_dir)}


def run(config: ThresherConfig) -> dict:
    """Run the flow on the cluster the config names."""
    return curate.with_options(task_runner=task_runner(config))(config)
