"""The Dask cluster of a run: its spec, the plan the stages size their work by, and its workers.

Local cluster specs are YAML data files in `flows/clusters/`: `dask.cluster=local` (the default)
names `flows/clusters/local.yaml`; a path to a YAML file of the same shape works too.
`dask.address` uses an existing scheduler instead, and `dask.n_workers` /
`dask.threads_per_worker` override a local spec's sizes. `cluster_plan` reads all of this once,
before the run starts: the entry that starts the pipeline builds its task runner from the plan,
and the pipeline takes the plan as a parameter.

    >>> spec = load_cluster_spec("local", n_workers=0, threads_per_worker=1)
    >>> spec["cluster_kwargs"]["n_workers"] >= 1
    True
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import yaml
from distributed import Client, LocalCluster
from distributed.utils import import_term
from prefect_dask import DaskTaskRunner

from flows.config import ThresherConfig
from flows.worker_server import LEFT_OUT_OF_WORKER_ENVIRON, WORKER_IMPORTS, start_worker_server

SPEC_DIR = Path(__file__).parent / "clusters"
WORKER_SETUP = "flows.worker_setup"  # the preload module of the workers a run starts


def spec_path(name: str) -> Path:
    builtin = SPEC_DIR / f"{name}.yaml"
    path = builtin if builtin.exists() else Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"dask.cluster={name!r}: no such spec; use one of {known} or a path to a YAML file.")
    return path


def load_cluster_spec(name: str, n_workers: int, threads_per_worker: int) -> dict[str, Any]:
    """DaskTaskRunner keyword arguments for a local cluster spec, sized for this machine."""
    spec = yaml.safe_load(spec_path(name).read_text()) or {}
    kwargs = dict(spec.get("cluster_kwargs") or {})
    cores = os.cpu_count() or 1
    processes = kwargs.get("processes", True)
    threads = threads_per_worker or kwargs.get("threads_per_worker") or (1 if processes else cores)
    kwargs["threads_per_worker"] = threads
    kwargs["n_workers"] = n_workers or kwargs.get("n_workers") or (max(1, cores // threads) if processes else 1)
    return {**spec, "cluster_kwargs": kwargs}


# Dask's statistical profiler (the dashboard's Profile page) walks the stack of each thread that
# runs a task every 10 ms, and holds the GIL while it does. Off, the workers of a run's own cluster
# spent 4 to 16% less CPU on checking and embedding 4,000 photos, and the stage took 5 to 18% less
# time (5 runs each, alternating). A user who wants the page sets this variable to True.
PROFILE_SETTING = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"


@dataclass(frozen=True)
class ClusterPlan:
    """The cluster a run uses, worked out once before the run starts."""

    runner: dict[str, Any]  # DaskTaskRunner keyword arguments
    slots: int  # task slots (threads over all workers), for sizing shards so every slot gets work
    gpu: bool  # some worker offers the GPU resource: GPU stages ask for it, so they run only there
    own_workers: bool  # the processes of a LocalCluster this run starts, and may replace
    threads: int  # threads per worker of the local spec: torch's intra-op threads when embedding

    def task_runner(self) -> DaskTaskRunner:
        """A runner on the existing scheduler, or on the local cluster spec sized to this machine."""
        # The workers go without some of the environment Dask's nannies give them (see
        # LEFT_OUT_OF_WORKER_ENVIRON). The worker processes this run starts end fast
        # (flows/worker_setup.py); never the run's own process, which holds the workers of
        # dask.cluster=local-threads. Nor do they preload the service workers' imports (a setting of
        # infra/dask.yaml): they have what the server imported, and the report's libraries would
        # delay their start.
        preload = [
            name
            for name in dask.config.get("distributed.worker.preload", [])
            if name not in (WORKER_SETUP, WORKER_IMPORTS)
        ]
        dask.config.set(
            {
                **{f"distributed.nanny.pre-spawn-environ.{name}": None for name in LEFT_OUT_OF_WORKER_ENVIRON},
                "distributed.worker.preload": [*preload, WORKER_SETUP] if self.own_workers else preload,
            }
        )
        if not self.own_workers:
            return DaskTaskRunner(**self.runner)
        # Forked from a server that has imported what they run, the workers start in a fraction of
        # a second, not seconds (flows/worker_server.py). They get this process's environment as
        # it is now, as started ones would (credentials a storage option names, the Prefect API),
        # not the server's, which is the environment of the command's start.
        dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
        if PROFILE_SETTING not in os.environ:
            dask.config.set({"distributed.worker.profile.enabled": False})  # see PROFILE_SETTING
        start_worker_server()
        kwargs = self.runner["cluster_kwargs"]
        env = {**os.environ, **(kwargs.get("env") or {})}
        return DaskTaskRunner(**{**self.runner, "cluster_kwargs": {**kwargs, "env": env}})


def cluster_plan(config: ThresherConfig) -> ClusterPlan:
    spec = load_cluster_spec(config.dask.cluster, config.dask.n_workers, config.dask.threads_per_worker)
    kwargs = spec["cluster_kwargs"]
    threads = kwargs["threads_per_worker"]
    if config.dask.address:
        with Client(config.dask.address, timeout="30s") as client:
            workers = client.scheduler_info()["workers"].values()
            slots = max(1, sum(w["nthreads"] for w in workers))
            gpu = any("GPU" in w.get("resources", {}) for w in workers)
        return ClusterPlan({"address": config.dask.address}, slots, gpu, own_workers=False, threads=threads)
    local = issubclass(import_term(spec.get("cluster_class", "distributed.LocalCluster")), LocalCluster)
    return ClusterPlan(
        spec,
        kwargs["n_workers"] * threads,
        "GPU" in kwargs.get("resources", {}),
        own_workers=local and kwargs.get("processes", True),
        threads=threads,
    )


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


def start_replacing_workers(client: Client) -> Future:
    """Replace the workers (see replace_workers) in a background thread, while the flow goes on."""
    background = ThreadPoolExecutor(1, thread_name_prefix="replace-workers")
    replacing = background.submit(replace_workers, client)
    background.shutdown(wait=False)
    return replacing


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
