"""The service topology without Docker: a real `prefect server`, a `dask scheduler` with two
`dask worker` processes, a process work pool and worker, the deployments of
`deployments/prefect.yaml`, and runs started with `prefect deployment run --param ...`; the
services read infra/dask.yaml, as the image's do."""

import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from distributed import Client

from tests.images import picture, save

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up within {timeout} s")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    api_port, scheduler_port = _free_port(), _free_port()
    api = f"http://127.0.0.1:{api_port}/api"
    scheduler = f"tcp://127.0.0.1:{scheduler_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_EXTRA_LOGGERS="tasks,flows",
        THRESHER_HOME=str(ROOT),
        THRESHER_DASK_ADDRESS=scheduler,
        DASK_CONFIG=str(ROOT / "infra" / "dask.yaml"),  # as the image has it in /etc/dask
    )
    logs = open(root / "services.log", "w")
    processes = [
        subprocess.Popen(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(api_port)],
            env=env,
            stdout=logs,
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [
                BIN / "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(scheduler_port),
                "--dashboard-address",
                ":0",
            ],
            env=env,
            stdout=logs,
            stderr=subprocess.STDOUT,
        ),
    ]
    processes += [
        subprocess.Popen(
            [BIN / "dask", "worker", scheduler, "--nthreads", "1", "--dashboard-address", ":0"],
            env=env,
            stdout=logs,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    try:
        _wait(lambda: _healthy(f"{api}/health"), "prefect server")
        for command in (
            ["work-pool", "create", "thresher", "--type", "process"],
            ["--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "adhoc"],
        ):
            result = subprocess.run(
                [BIN / "prefect", *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
            )
            assert result.returncode == 0, result.stdout + result.stderr
        processes.append(
            subprocess.Popen(
                [BIN / "prefect", "worker", "start", "--pool", "thresher"],
                env=env,
                cwd=ROOT,
                stdout=logs,
                stderr=subprocess.STDOUT,
            )
        )
        yield {"env": env, "api": api, "root": root}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        logs.close()


def test_the_services_workers_preload_their_libraries_frozen_without_dasks_profiler_and_malloc_trimming(service):
    def state(dask_worker) -> tuple[bool, str | None, bool]:  # Client.run passes the worker by name
        # The stages' and the report's libraries imported before the first task, and frozen out of
        # the collector's passes, which run again (flows/worker_imports.py).
        imported = all(name in sys.modules for name in ("timm", "tasks.one_pass", "matplotlib", "umap"))
        frozen = imported and gc.get_freeze_count() > 100_000 and gc.isenabled()
        return "profile" in dask_worker.periodic_callbacks, os.environ.get("MALLOC_TRIM_THRESHOLD_"), frozen

    with Client(service["env"]["THRESHER_DASK_ADDRESS"], timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        assert list(client.run(state).values()) == [(False, None, True)] * 2


def _deployment_run(service, *params: str) -> dict:
    """`prefect deployment run curate/adhoc --param ...`, then wait for the flow run to end."""
    command = [BIN / "prefect", "deployment", "run", "curate/adhoc"]
    for param in params:
        command += ["--param", param]
    result = subprocess.run(command, env=service["env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout).group(1)
    state: dict = {}

    def finished() -> bool:
        state.update(httpx.get(f"{service['api']}/flow_runs/{run_id}", timeout=10).json())
        return state.get("state_type") in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

    _wait(finished, f"flow run {run_id}", timeout=900)
    return state


def _wait_for_logs(service, check, what: str, query: dict | None = None) -> None:
    """Wait until the server's logs (filtered by `query`) satisfy `check`. A process ships its log
    lines in batches, so its last ones may reach the server after the run's final state."""
    _wait(
        lambda: check(httpx.post(f"{service['api']}/logs/filter", timeout=10, json=query or {}).json()),
        what,
        timeout=60,
    )


def test_deployment_runs_with_parameters_artifacts_and_incremental_reruns(service):
    root = service["root"]
    for seed in range(8):
        save(picture(seed), root / "in" / f"img_{seed}.jpg", format="JPEG")
    common = [
        f"input_dir={root / 'in'}",
        f"output_dir={root / 'out'}",
        f"shared_dir={root / 'shared'}",
        'datapool={"name": "pool"}',
    ]
    (root / "shared").mkdir()
    state = _deployment_run(service, *common, "run_directory=first", 'stopping_condition={"n_samples": 3}')
    assert state["state_type"] == "COMPLETED", state.get("state", {}).get("message")
    sampled = (root / "out" / "first" / "filenames" / "sampled_filenames.txt").read_text().split()
    assert len(sampled) == 3

    artifacts = httpx.post(f"{service['api']}/artifacts/filter", timeout=10, json={}).json()
    kinds = {a["type"] for a in artifacts}
    assert {"progress", "markdown", "table"} <= kinds, kinds
    assert any(a["type"] == "progress" and a["data"] == 100.0 for a in artifacts)
    _wait_for_logs(
        service,
        lambda logs: any(entry["task_run_id"] and entry["name"] == "prefect.task_runs" for entry in logs),
        "task run logs from the Dask workers",
    )

    if shutil.which("chromium"):
        _check_flow_run_page(service, state)

    for seed in range(8, 10):
        save(picture(seed), root / "in" / f"img_{seed}.jpg", format="JPEG")
    state = _deployment_run(service, *common, "run_directory=second", 'stopping_condition={"n_samples": 1}')
    assert state["state_type"] == "COMPLETED", state.get("state", {}).get("message")
    report = json.loads((root / "out" / "second" / "report.json").read_text())
    assert report["counts"]["n_skipped_processed"] == 8 and report["counts"]["n_input_files"] == 2


CHROMIUM = [
    "chromium",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
    "--virtual-time-budget=20000",
]


def _check_flow_run_page(service, state: dict) -> None:
    """The run's page in the Prefect UI, rendered by headless Chromium, shows the run's name; the
    screenshot is kept beside the test's files (docs/prefect-ui-flow-run.png is one)."""
    url = service["api"].removesuffix("/api") + f"/runs/flow-run/{state['id']}"
    profile = service["root"] / "chromium-profile"
    dom = subprocess.run(
        [*CHROMIUM, f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True, text=True, timeout=180
    )
    assert state["name"] in dom.stdout, dom.stderr[-2000:]
    shot = service["root"] / "flow-run.png"
    subprocess.run(
        [*CHROMIUM, f"--user-data-dir={profile}", f"--screenshot={shot}", url], capture_output=True, timeout=180
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_parameters_fail_with_the_config_message(service):
    root = service["root"]
    state = _deployment_run(
        service, f"input_dir={root}", f"output_dir={root / 'out'}", 'stopping_condition={"n_sampels": 3}'
    )
    assert state["state_type"] == "FAILED"

    def names_the_key(logs: list[dict]) -> bool:
        text = " ".join(entry["message"] for entry in logs)
        return "stopping_condition.n_sampels" in text and "Extra inputs are not permitted" in text

    _wait_for_logs(
        service,
        names_the_key,
        "the configuration error in the flow run's logs",
        {"logs": {"flow_run_id": {"any_": [state["id"]]}}},
    )
