"""Object stores for the tests: real protocol servers on loopback, each in a process of its own so
that Dask workers and subprocesses reach them as they would reach a cloud.

- S3: moto's server (`python -m moto.server`).
- GCS: gcp-storage-emulator, in memory.
- Azure Blob: Azurite from npm; the tests that need it are skipped where it is not installed.
- S3 again, through `FaultProxy`, which answers every Nth request with a 503 SlowDown, a 500 or a
  dropped connection.

A test asks for a fresh bucket by fixture name and gets a `Store`:

    def test_roundtrip(s3_store, tmp_path):
        (tmp_path / "a.txt").write_text("hi")
        root = s3_store.upload(tmp_path)          # UPath("s3://thresher-…", endpoint_url=…)
        assert (root / "a.txt").read_text() == "hi"

`Store.storage_options` holds what reaches the server (its endpoint) and never a secret;
credentials are environment variables (`Store.env`) that the standard credential chains read.
The server fixtures set them in this process's environment for the session, so code here and
processes started later see them; workers already running get them with `export_env`.
"""

from __future__ import annotations

import http.client
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import pytest
from upath import UPath

REPO = Path(__file__).resolve().parent.parent

# gcsfs >= 2026 first asks a gRPC control API for each bucket's layout, which the emulator does not
# serve: every call then waits out a 60 s retry. The switch is read when gcsfs is imported, so it is
# set here, before any test imports it, and is inherited by the processes the tests start.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "thresher-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "thresher-test-secret-access-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Without it botocore looking for credentials would ask the EC2 metadata address, off loopback.
    "AWS_EC2_METADATA_DISABLED": "true",
}
GCS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_INSTALL = "npm install --prefix .ci --no-audit --no-fund azurite@3"


@dataclass(frozen=True)
class Store:
    """One bucket (S3, GCS) or container (Azure) on a test server.

    `url` is the bucket's root ("s3://thresher-1a2b"), `storage_options` what fsspec needs to reach
    the server, `env` the credentials as environment variables."""

    protocol: str
    url: str
    storage_options: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem(self.protocol, **self.storage_options)

    def path(self, *parts: str) -> UPath:
        return UPath(self.url, **self.storage_options).joinpath(*parts)

    def upload(self, folder: Path, prefix: str = "") -> UPath:
        """Copies every file under `folder` to `prefix` in the bucket; returns the prefix's path."""
        root = self.path(prefix) if prefix else self.path()
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        self.fs.put(
            [str(p) for p in files], [f"{root.path.rstrip('/')}/{p.relative_to(folder).as_posix()}" for p in files]
        )
        return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(command: Callable[[int], list[str]], log: Path, timeout: float = 30) -> Iterator[str]:
    """Runs `command(port)` until the context ends, yielding its endpoint once it answers HTTP.
    The process leads its own process group, which is killed whole at the end."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command(port), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while not answers(endpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{command(port)[:3]} did not start; its log ({log}):\n{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.05)
        yield endpoint
    finally:
        with suppress(ProcessLookupError):  # the group is gone when the server died by itself
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def answers(endpoint: str) -> bool:
    """Whether an HTTP server answers at `endpoint`, whatever the status (and ignoring any proxy)."""
    connection = http.client.HTTPConnection(endpoint.removeprefix("http://"), timeout=1)
    try:
        connection.request("GET", "/")
        connection.getresponse()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
    return True


def azurite_binary() -> str | None:
    """Where Azurite's blob server is: $THRESHER_AZURITE, then .ci/node_modules, then PATH."""
    if os.environ.get("THRESHER_AZURITE"):
        return os.environ["THRESHER_AZURITE"]
    local = REPO / ".ci" / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if local.exists() else shutil.which("azurite-blob")


def azurite_connection_string(endpoint: str, key: str = AZURITE_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
        f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )


def export_env(dask_address: str, env: dict[str, str]) -> None:
    """Sets `env` in the workers of a running Dask cluster (workers copy the environment only when
    they start, so those started before a server fixture lack its credentials)."""
    from distributed import Client

    with Client(dask_address) as client:
        # A lambda, pickled by value: `os.environ.update` would pickle a copy of this process's environ.
        client.run(lambda: os.environ.update(env))


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield


def fresh_bucket(protocol: str, endpoint_options: dict[str, Any], env: dict[str, str]) -> Store:
    bucket = f"thresher-{uuid.uuid4().hex[:12]}"
    store = Store(protocol, f"{protocol}://{bucket}", endpoint_options, env)
    store.fs.mkdir(bucket)
    return store


# --- S3 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with (
        environment(S3_ENV),
        serve(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log) as endpoint,
    ):
        yield endpoint


@pytest.fixture
def s3_store(s3_endpoint) -> Store:
    return fresh_bucket("s3", {"endpoint_url": s3_endpoint}, S3_ENV)


# --- GCS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("gcs") / "gcp-storage-emulator.log"
    with (
        environment(GCS_ENV),
        serve(
            lambda port: [
                sys.executable,
                "-m",
                "gcp_storage_emulator",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--in-memory",
            ],
            log,
        ) as endpoint,
    ):
        yield endpoint


@pytest.fixture
def gcs_store(gcs_endpoint) -> Store:
    # token="anon": the emulator checks no credentials, and without it google-auth would look for
    # some, up to the GCE metadata server.
    return fresh_bucket("gs", {"endpoint_url": gcs_endpoint, "token": "anon"}, GCS_ENV)


# --- Azure Blob -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def azurite_endpoint(tmp_path_factory) -> Iterator[str]:
    binary = azurite_binary()
    if binary is None:
        pytest.skip(f"Azurite is not installed: `{AZURITE_INSTALL}` (or set THRESHER_AZURITE to azurite-blob)")
    log = tmp_path_factory.mktemp("azurite") / "azurite.log"

    def command(port: int) -> list[str]:
        # --disableTelemetry: Azurite otherwise reports usage over the network.
        return [
            binary,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ]

    with serve(command, log) as endpoint, environment(azure_env(endpoint)):
        yield endpoint


def azure_env(endpoint: str) -> dict[str, str]:
    return {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(endpoint)}


@pytest.fixture
def azure_store(azurite_endpoint) -> Store:
    # adlfs reads the connection string (endpoint, account and key) from the environment: no options.
    return fresh_bucket("az", {}, azure_env(azurite_endpoint))


# --- S3 with faults -------------------------------------------------------------------------------

FAULTS = ("slowdown", "internal", "drop")
S3_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
# Headers about one connection, not the message (Expect: the proxy has already read the body).
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade", "expect"}


class FaultProxy(ThreadingHTTPServer):
    """An HTTP proxy to `upstream` that answers every `every`-th request with the next of `faults`
    instead of forwarding it: "slowdown" (503 SlowDown, S3's throttling answer), "internal"
    (500 InternalError) or "drop" (the connection closes with no answer)."""

    daemon_threads = True

    def __init__(self, upstream: str, every: int = 3, faults: tuple[str, ...] = FAULTS):
        assert every >= 2 and set(faults) <= set(FAULTS), (every, faults)
        super().__init__(("127.0.0.1", 0), ForwardOrFail)
        self.upstream = upstream.removeprefix("http://")
        self.every = every
        self.requests = 0
        self.injected: list[str] = []
        self._next_fault = itertools.cycle(faults)
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fault_for_next_request(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.requests % self.every:
                return None
            fault = next(self._next_fault)
            self.injected.append(fault)
            return fault


class ForwardOrFail(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients expect of S3
    server: FaultProxy

    def relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fault = self.server.fault_for_next_request()
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif fault:
            status, code, message = S3_ERRORS[fault]
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>thresher-fault</RequestId></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(b"" if self.command == "HEAD" else payload)
        else:
            self.forward(body)

    def forward(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            # A HEAD answer keeps the object's length; anything else carries the body read here.
            length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(payload))
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the counts on the server say what happened."""


@contextmanager
def running(proxy: FaultProxy) -> Iterator[FaultProxy]:
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join()


@pytest.fixture
def s3_fault_proxy(s3_endpoint) -> Iterator[FaultProxy]:
    """Every third request to the S3 server fails, in turn with each of FAULTS."""
    with running(FaultProxy(s3_endpoint)) as proxy:
        yield proxy


@pytest.fixture
def flaky_s3_store(s3_store, s3_fault_proxy) -> Store:
    """`s3_store`'s bucket, reached through `s3_fault_proxy`."""
    return Store("s3", s3_store.url, {"endpoint_url": s3_fault_proxy.endpoint}, s3_store.env)
