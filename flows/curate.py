"""The `curate` flow: list, decode and check, deduplicate, embed, gather, select, write, report.

`pipeline` is the run, a straight script of stages (`flows/stages.py`): each stage's result goes
to the next as a value, so a stage can be moved or skipped by reading `pipeline` alone. Stages
map over shards of files on the workers; tasks pass paths and small manifests; shard results are
content-addressed Parquet files in the cache, so a rerun skips what it has done before; the
outputs follow the Lightly Worker's run-directory layout.

`thresher run` validates its config and starts `pipeline` itself (flows/cli.py). Deployments
start `curate`, which takes the keys of `thresher run` as its parameters (see `flow_signature`),
validates them with the same checks and messages as the command line, and starts `pipeline` on
the Dask cluster they name.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.cluster import ClusterPlan, cluster_plan
from flows.config import ThresherConfig
from flows.options import embeds_while_checking, model_spec
from flows.overrides import flow_signature
from flows.run import RunLog, start_run
from flows.stages import (
    Checked,
    check,
    datapool_centers,
    deduplicate,
    dump,
    embed,
    embedding_model,
    free_workers,
    gather,
    import_report_libraries,
    list_files,
    probe,
    read_embeddings,
    report,
    sample_identities,
    select,
    start_report_views,
    train,
    update_pool,
    warm_up,
    write,
)
from flows.validation import validate_config
from tasks.datapool import PoolLock, check_compatible, read_pool
from tasks.storage import describe


@flow(name="curate-pipeline")
def pipeline(config: ThresherConfig, plan: ClusterPlan, started: datetime | None = None) -> dict:
    """Curate `config.input_dir` into `<output_dir>/<run_directory>/` on the cluster of `plan`;
    returns the counts. `started` names the run directory by default (the command line knows it
    before the flow starts, to write its log there)."""
    started = started or datetime.now(UTC)
    run, log = start_run(config, plan, started), RunLog()
    import_report_libraries()
    with PoolLock(run.pool_dir) if run.pool_dir else nullcontext() as lock, log.progress:
        model = embedding_model(config)
        pool = read_pool(run.pool_dir) if run.pool_dir else None
        check_compatible(pool, model.dim, model.name, run.pool_dir)
        checked, identities, replacing = Checked([], None), {}, None
        if config.embeddings:
            read_embeddings(run, log)
        else:
            spec = model_spec(config)
            if not config.enable_training:  # training makes the model that embeds
                warm_up(run, log, spec)
            files = list_files(run, log, pool)
            probed = probe(run, log, files)
            identities = sample_identities(files, probed)
            checked = check(run, log, files, probed, spec if embeds_while_checking(config) else None)
            usable = deduplicate(run, log, checked.paths, probed, identities)
            if config.enable_training:
                spec = train(run, log, usable, spec)
            embedded = embed(run, log, usable, spec, checked)
            replacing = free_workers(run, log, embedded, usable.count())
            gather(run, log, embedded, model.dim)
        centers = datapool_centers(run, pool)
        selection = select(run, log, centers)
        views = start_report_views(run, centers, replacing)
        timelines = write(run, log)
        if config.dump_dataset:
            dump(run, log, identities, replacing)
        if run.pool_dir and config.datasource.enable_datapool_update:
            update_pool(run, log, lock, pool, checked.paths, identities, model)
        report(run, log, started, selection, timelines, centers, views, replacing)
    counts = log.counts
    get_run_logger().info(
        "Done: %d files -> %d sampled, %d removed, %d duplicate, %d corrupt. Results in %s",
        counts["n_input_files"],
        counts["n_sampled"],
        counts["n_removed"],
        counts["n_duplicate"],
        counts["n_corrupt"],
        describe(run.run_dir),
    )
    return {**counts, "run_directory": describe(run.run_dir)}


@contextmanager
def no_heartbeats() -> Iterator[None]:
    """The pipeline's flow run sends no heartbeats. Heartbeats let a Prefect server mark a run whose
    process died unseen as crashed. A run from the command line is watched by whoever started it,
    so it sends them only when PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set; in a deployment run the
    pipeline runs in the `curate` flow's process and thread, whose heartbeats already tell the
    server that it is alive. Each flow run's heartbeat thread also costs it up to a second at its
    end: Prefect joins the thread, which wakes once a second."""
    if FlowRunContext.get() is None and "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@contextmanager
def frozen_modules() -> Iterator[None]:
    """The modules a run uses are imported by now: some 600,000 objects that live as long as the
    process. Frozen for the run, a full garbage collection no longer walks them, and a run makes
    several (weasyprint and fontTools allocate many objects). Unfrozen at its end, so that what
    runs leave behind, and the process's exit, are collected as before."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _curate(**parameters: Any) -> dict:
    """Validate the parameters (the same checks and messages as `thresher run`), then run the
    pipeline on the Dask cluster they name.

    Why two flows: a flow's task runner is set before its run starts, and here it depends on the
    parameters (`dask.address`, `dask.cluster`). So the deployments' entry is this flow, which
    runs on no cluster, and starts `pipeline` as a subflow on the runner its parameters name; the
    command line knows its config before any flow starts and starts `pipeline` itself."""
    config = validate_config(parameters)
    plan = cluster_plan(config)
    with no_heartbeats(), frozen_modules():
        return pipeline.with_options(task_runner=plan.task_runner())(config, plan)


_curate.__signature__ = flow_signature()  # type: ignore[attr-defined]
# Parameters are validated by the config object, so errors read the same here as in the CLI.
curate = flow(name="curate", validate_parameters=False)(_curate)
