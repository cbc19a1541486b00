import gc
import os
import sys

import dask
import pytest
from distributed import Worker

from flows.cluster import PROFILE_SETTING, WORKER_SETUP, cluster_plan, load_cluster_spec
from flows.entry import starts_own_workers
from flows.overrides import parse_overrides
from flows.validation import validate_config
from flows.worker_server import WORKER_IMPORTS, start_worker_server


def test_local_spec_is_one_single_threaded_process_per_core():
    spec = load_cluster_spec("local", n_workers=0, threads_per_worker=0)
    assert spec["cluster_class"] == "distributed.LocalCluster"
    assert spec["cluster_kwargs"] == {"processes": True, "threads_per_worker": 1, "n_workers": os.cpu_count()}


def test_threads_spec_and_overrides():
    spec = load_cluster_spec("local-threads", n_workers=0, threads_per_worker=0)
    assert spec["cluster_kwargs"] == {"processes": False, "threads_per_worker": os.cpu_count(), "n_workers": 1}
    assert load_cluster_spec("local", n_workers=3, threads_per_worker=2)["cluster_kwargs"]["n_workers"] == 3


def test_spec_from_a_path_and_unknown_names(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("cluster_class: distributed.LocalCluster\ncluster_kwargs: {processes: true, n_workers: 5}\n")
    assert load_cluster_spec(str(path), 0, 0)["cluster_kwargs"]["n_workers"] == 5
    with pytest.raises(FileNotFoundError, match="use one of local, local-threads"):
        load_cluster_spec("nope", 0, 0)


def test_only_the_processes_of_a_local_cluster_spec_are_the_runs_own_to_replace(tmp_path):
    def own(*overrides: str) -> bool:
        keys = [f"input_dir={tmp_path}", f"output_dir={tmp_path}", "stopping_condition.n_samples=1", *overrides]
        return cluster_plan(validate_config(parse_overrides(keys))).own_workers

    assert own() and own("dask.cluster=local", "dask.n_workers=1")
    assert not own("dask.cluster=local-threads")
    spec = tmp_path / "spec.yaml"
    spec.write_text("cluster_class: distributed.SpecCluster\ncluster_kwargs: {processes: true, n_workers: 2}\n")
    assert not own(f"dask.cluster={spec}")


def test_the_fast_exit_preload_goes_to_worker_processes_only_and_keeps_the_users_preloads(tmp_path):
    def preloads(*overrides: str) -> list[str]:
        keys = [f"input_dir={tmp_path}", f"output_dir={tmp_path}", "stopping_condition.n_samples=1", *overrides]
        cluster_plan(validate_config(parse_overrides(keys))).task_runner()
        return dask.config.get("distributed.worker.preload")

    # The service workers' preload (infra/dask.yaml, which a run in the image reads too) is not the
    # workers' of a run: they fork from a server that imported the stages.
    with dask.config.set({"distributed.worker.preload": ["users.own", WORKER_IMPORTS]}):
        assert preloads() == ["users.own", WORKER_SETUP]
        assert preloads() == ["users.own", WORKER_SETUP]  # set once however many runs
        # The workers of local-threads are the run's own process, whose stderr must stay.
        assert preloads("dask.cluster=local-threads") == ["users.own"]


def worker_state(dask_worker: Worker) -> tuple[bool, str | None, str | None, bool]:
    print("a worker's log line", file=sys.stderr, flush=True)
    # The stages' modules, frozen out of the collector's passes, which run again (tasks/imports.py);
    # not the report's libraries, which only its tasks import.
    frozen = gc.get_freeze_count() > 100_000 and gc.isenabled()
    imported = "timm" in sys.modules and "tasks.one_pass" in sys.modules and "umap" not in sys.modules and frozen
    profiled = "profile" in dask_worker.periodic_callbacks  # Client.run passes the worker by name
    return imported, os.environ.get("THRESHER_TEST_LATE"), os.environ.get("MALLOC_TRIM_THRESHOLD_"), profiled


def test_own_workers_fork_from_a_server_that_has_imported_their_stages(tmp_path, monkeypatch, capfd):
    keys = [f"input_dir={tmp_path}", f"output_dir={tmp_path}", "stopping_condition.n_samples=1", "dask.n_workers=1"]
    plan = cluster_plan(validate_config(parse_overrides(keys)))
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv(PROFILE_SETTING, raising=False)
    start_worker_server()  # as the command starts: before the environment below is set
    monkeypatch.setenv("THRESHER_TEST_LATE", "set")
    with dask.config.set({"distributed.worker.profile.enabled": True}), plan.task_runner() as runner:
        # A worker started afresh would import torch and timm only for its first model; neither the
        # worker nor the server it forks from has the malloc trimming that Dask's nannies set, and
        # the worker runs without Dask's profiler.
        assert list(runner.client.run(worker_state).values()) == [(True, "set", None, False)]
    # What the workers write to stderr reaches this process's stderr (a run's log file).
    assert "a worker's log line" in capfd.readouterr().err


def test_own_workers_keep_dasks_profiler_when_its_variable_asks_for_it(tmp_path, monkeypatch):
    keys = [f"input_dir={tmp_path}", f"output_dir={tmp_path}", "stopping_condition.n_samples=1", "dask.n_workers=1"]
    plan = cluster_plan(validate_config(parse_overrides(keys)))
    monkeypatch.setenv(PROFILE_SETTING, "True")  # as dask read it, here set directly
    with dask.config.set({"distributed.worker.profile.enabled": True}), plan.task_runner() as runner:
        assert [state[3] for state in runner.client.run(worker_state).values()] == [True]


def test_the_command_starts_the_worker_server_only_for_a_run_on_its_own_workers():
    def own(*overrides: str) -> bool:
        return starts_own_workers(["run", "input_dir=in", *overrides])

    assert own() and own("dask.n_workers=2") and own("dask.address=") and own("dask.address=''")
    assert not own("dask.address=tcp://scheduler:8786") and not own(" dask.address =tcp://scheduler:8786")
    # The last of a key wins, as in the run's config.
    assert own("dask.address=tcp://scheduler:8786", "dask.address=")
    assert not own("dask.address=", "dask.address=tcp://scheduler:8786")
    # Overrides read as the config reads them name the same cluster.
    for overrides in (["dask.address=tcp://scheduler:8786", "dask.address="], [" dask.address =tcp://s:1"]):
        address = parse_overrides(overrides).get("dask", {}).get("address", "")
        assert own(*overrides) == (not address)
    assert not starts_own_workers(["server", "stop"]) and not starts_own_workers([])
