"""The local Prefect server that `thresher run` shares across runs when no `PREFECT_API_URL` is set.

Starting a Prefect server costs seconds (its first start also migrates its database), so the first
run starts one in the background and the next runs reuse it; it serves the UI too. It is Prefect's
own `prefect server start`, in a session of its own so that it outlives the run, on a free port of
127.0.0.1. Its state (URL and process) is a JSON file under PREFECT_HOME, next to its log; a file
lock makes two runs that start together share one server. `thresher server stop` stops it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

START_SECONDS = 90.0  # a first start migrates the database: up to half a minute on a busy 2-core machine


class ServerError(RuntimeError):
    """The local server could not be started or did not become healthy."""


@dataclass(frozen=True)
class ServerState:
    url: str  # e.g. http://127.0.0.1:8123; its API is at <url>/api, a flow run's page at <url>/runs/flow-run/<id>
    pid: int
    started: float  # the process's creation time: a reused pid is not taken for the server

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def server_dir() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()) / "thresher-server"


def state_path() -> Path:
    return server_dir() / "server.json"


def log_path() -> Path:
    return server_dir() / "server.log"


def read_state() -> ServerState | None:
    try:
        return ServerState(**json.loads(state_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def healthy(state: ServerState, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{state.api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def alive(state: ServerState) -> bool:
    """The recorded process still runs, and is the one that was started (not a reused pid)."""
    try:
        return abs(psutil.Process(state.pid).create_time() - state.started) < 1.0
    except psutil.Error:
        return False


@contextmanager
def locked() -> Iterator[None]:
    """Held while a server is checked and started, so that runs starting together start one."""
    server_dir().mkdir(parents=True, exist_ok=True)
    with open(server_dir() / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(timeout: float) -> ServerState:
    """Start `prefect server start` detached, with its output in log_path(), and wait until it is healthy."""
    from prefect.settings import get_current_settings

    port = free_port()
    # The settings in force (PREFECT_HOME, its database), as SubprocessASGIServer passes them; not
    # the API's, which is what this server becomes.
    settings = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
    env = {key: value for key, value in settings.items() if not key.startswith("PREFECT_API_")}
    with open(log_path(), "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            # Its services record the runs' task runs from their events, for the UI; no schedules
            # run here (deployments report to their own server), so neither does the scheduler.
            + ["--no-scheduler", "--no-late-runs", "--analytics-off"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # not stopped with the run, nor by a Ctrl-C in its terminal
        )
    state = ServerState(f"http://127.0.0.1:{port}", process.pid, psutil.Process(process.pid).create_time())
    deadline = time.monotonic() + timeout
    while not healthy(state):
        if process.poll() is not None:
            raise ServerError(f"the server exited with code {process.returncode}; see {log_path()}")
        if time.monotonic() > deadline:
            stop(state)
            raise ServerError(f"the server was not healthy within {timeout:.0f} s; see {log_path()}")
        time.sleep(0.2)
    state_path().write_text(json.dumps(asdict(state)))
    return state


def shared_server(timeout: float = START_SECONDS) -> tuple[ServerState, bool]:
    """The running local server, or a new one; and whether it was started now."""
    with locked():
        state = read_state()
        if state and healthy(state):
            return state, False
        if state and alive(state):  # running but not answering: replaced rather than waited for
            stop(state)
        return start_server(timeout), True


def stop(state: ServerState, timeout: float = 10.0) -> None:
    """Stop the server's process group (SIGTERM, then SIGKILL after `timeout` seconds)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(state):
            return
        os.killpg(state.pid, sig)
        try:
            psutil.Process(state.pid).wait(timeout)
        except psutil.TimeoutExpired:
            continue
        except psutil.NoSuchProcess:
            return


def stop_server() -> str:
    """`thresher server stop`: what it did, in a line."""
    with locked():
        state = read_state()
        state_path().unlink(missing_ok=True)
        if state is None or not alive(state):
            return "No local Prefect server is running."
        stop(state)
        return f"Stopped the local Prefect server at {state.url}."


def server_status() -> str:
    """`thresher server status`: where the server is and whether it answers, in a line."""
    state = read_state()
    if state is None or not alive(state):
        return "No local Prefect server is running; the next `thresher run` starts one."
    answer = "healthy" if healthy(state) else "not answering"
    return f"Local Prefect server at {state.url} (pid {state.pid}): {answer}. Log: {log_path()}"
