"""The local Prefect server that runs share (flows/server.py), started for real in a PREFECT_HOME
of the test's own and stopped at its end."""

import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context

import httpx
import psutil
from prefect import flow, task

from flows.cli import prefect_api
from flows.server import healthy, log_path, read_state, server_status, shared_server, stop_server


def test_runs_share_one_server_until_it_is_stopped(prefect_home):
    # Two runs that start together: one starts the server, the other waits for it and reuses it.
    # (Each thread runs in a copy of this context, which holds the test's PREFECT_HOME.)
    with ThreadPoolExecutor(2) as pool:
        contexts = [copy_context() for _ in range(2)]
        (first, started_a), (second, started_b) = pool.map(lambda context: context.run(shared_server), contexts)
    assert first == second and sorted([started_a, started_b]) == [False, True]
    assert read_state() == first and healthy(first)
    assert "<html" in httpx.get(first.url, timeout=10).text  # the UI is served too
    assert shared_server() == (first, False)
    assert "healthy" in server_status()

    with prefect_api() as ui:  # a run without PREFECT_API_URL reports to it, and so do its workers
        from prefect.settings import PREFECT_API_URL

        assert ui == first.url and PREFECT_API_URL.value() == first.api_url
        # and its UI shows each run's tasks: the server records them from the runs' events
        flow_run = one_task_flow(return_state=True).state_details.flow_run_id
        assert recorded_task_runs(first.api_url, str(flow_run)) == ["double-it"]

    assert stop_server() == f"Stopped the local Prefect server at {first.url}."
    assert not psutil.pid_exists(first.pid) and read_state() is None
    assert "No local Prefect server is running" in server_status()


def test_a_run_falls_back_to_a_temporary_server_when_none_can_start(prefect_server, prefect_home, capsys):
    log_path().mkdir(parents=True)  # the server's log cannot be opened: it cannot start
    with prefect_api() as ui:
        from prefect.settings import PREFECT_API_URL

        assert ui is None and healthy_api(PREFECT_API_URL.value()) and PREFECT_API_URL.value() != prefect_server
    # Prefect's own temporary server of this process (the test harness's) is not the one stopped
    assert healthy_api(prefect_server)
    out = capsys.readouterr().out
    assert "this run starts a temporary one" in out and str(log_path()) in out
    assert read_state() is None


@task(name="double-it")
def double(value: int) -> int:
    return 2 * value


@flow
def one_task_flow() -> int:
    return double(21)


def recorded_task_runs(api_url: str, flow_run: str, timeout: float = 30) -> list[str]:
    """The names of the flow run's task runs once the server has recorded any (it does so from the
    run's events, asynchronously), or none after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = httpx.post(f"{api_url}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run]}}}).json()
        if found or time.monotonic() > deadline:
            return sorted(run["name"].rsplit("-", 1)[0] for run in found)
        time.sleep(0.5)


def healthy_api(api_url: str) -> bool:
    return httpx.get(f"{api_url}/health", timeout=10).status_code == 200
