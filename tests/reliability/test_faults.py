"""Faults: a run killed (SIGKILL) at each stage, a Dask worker killed mid-run, and a full disk
while writing outputs. Each time the next run completes with the outputs of an undisturbed run,
and nothing half-written is left where a later run would trust it."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from dask.utils import key_split
from distributed import Client

from flows.cli import main
from tasks import embeddings_csv
from tasks.embeddings_csv import read_embeddings_csv
from tests.images import dataset

pytestmark = pytest.mark.usefixtures("prefect_server")

LISTS = ("corrupt", "duplicate", "removed", "sampled")
OPTIONS = ["stopping_condition.n_samples=0.5", "dask.shard_size=2", "run_directory=run"]


def outputs(run: Path) -> tuple[dict[str, list[str]], list[str], np.ndarray]:
    """What a run decided: its filename lists and its embeddings."""
    lists = {name: (run / "filenames" / f"{name}_filenames.txt").read_text().splitlines() for name in LISTS}
    names, vectors, _ = read_embeddings_csv(run / "data" / "embeddings.csv")
    return lists, names, vectors


def assert_same_outputs(run: Path, clean: Path) -> None:
    lists, names, vectors = outputs(run)
    clean_lists, clean_names, clean_vectors = outputs(clean)
    assert lists == clean_lists and names == clean_names
    np.testing.assert_allclose(vectors, clean_vectors, atol=1e-4)  # the two runs may use different torch threads
    assert (run / "report.json").is_file()


def nothing_half_written(*roots: Path) -> None:
    """Every Parquet file a run left can be read whole; temporary files are the only leftovers of a kill."""
    for root in roots:
        for path in root.rglob("*.parquet"):
            pq.read_table(path)


def wait_for(condition, process: subprocess.Popen | None = None, log: Path | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "marker never appeared"
        assert process is None or process.poll() is None, log.read_text()[-3000:] if log else "the run ended"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, dask_address):
    """An undisturbed run over the dataset that the fault tests disturb."""
    root = tmp_path_factory.mktemp("faults")
    dataset(root / "in", per_label=5)
    assert (
        main(
            [
                "run",
                f"dask.address={dask_address}",
                f"input_dir={root / 'in'}",
                f"output_dir={root / 'clean'}",
                f"shared_dir={root / 'clean-shared'}",
                *OPTIONS,
            ]
        )
        == 0
    )
    return root / "in", root / "clean" / "run"


def test_a_run_killed_at_each_stage_resumes_to_the_clean_result(clean_run, tmp_path, prefect_home):
    source, clean = clean_run
    shared, out = tmp_path / "shared", tmp_path / "out"
    shared.mkdir()
    cache, run = shared / ".thresher-cache", out / "run"
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        f"input_dir={source}",
        f"output_dir={out}",
        f"shared_dir={shared}",
        "dask.cluster=local-threads",
        *OPTIONS,
    ]
    # The runs report to the shared local Prefect server, as a user's do: started by the first run in
    # the test's own Prefect home, it outlives the killed runs (flows/server.py) and stops with the test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(prefect_home)
    # Each run resumes the one killed before it: while checking and embedding, while writing outputs.
    markers = {
        "check-embed": lambda: any((cache / "check-embed").glob("*.parquet")),
        "write": lambda: (run / "filenames").exists(),
    }
    for stage, marker in markers.items():
        log = tmp_path / f"killed-in-{stage}.log"
        with log.open("w") as output:
            # A process group of its own: the kill takes the whole run, not the shared server.
            process = subprocess.Popen(
                command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_for(marker, process, log)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        nothing_half_written(shared, out)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_outputs(run, clean)
    left = [p for root in (shared, out) for p in root.rglob("*.tmp")]
    assert not left, f"the resumed run kept the killed runs' temporary files: {left}"


def test_a_worker_killed_mid_run_is_retried_to_the_same_result(clean_run, tmp_path, dask_address):
    source, clean = clean_run
    shared = tmp_path / "shared"
    killed: list[int] = []
    ended = threading.Event()

    def kill_a_busy_worker_once_embedding_starts(client: Client) -> None:
        wait_for(lambda: any((shared / ".thresher-cache" / "check-embed").glob("*.parquet")))
        # Until the run ends; the test fails below if no worker was busy with a shard meanwhile.
        while not ended.is_set():
            processing = client.processing().items()
            busy = [worker for worker, keys in processing if any(key_split(k) == "check_embed_pieces" for k in keys)]
            if busy:
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                os.kill(pid, signal.SIGKILL)  # mid-shard; the nanny starts a new worker process
                killed.append(pid)
                return
            time.sleep(0.01)

    run = [
        "run",
        f"dask.address={dask_address}",
        f"input_dir={source}",
        f"output_dir={tmp_path / 'out'}",
        f"shared_dir={shared}",
        *OPTIONS,
    ]
    # Connected before the run, and polling: the shard tasks of 13 files are short, and a client
    # that connected once the first result was written once found none left.
    with Client(dask_address) as client:
        killer = threading.Thread(target=kill_a_busy_worker_once_embedding_starts, args=(client,), daemon=True)
        killer.start()
        try:
            assert main(run) == 0
        finally:
            ended.set()
            killer.join(timeout=60)
    assert killed, "no worker was busy with a shard to kill"
    assert_same_outputs(tmp_path / "out" / "run", clean)


def test_disk_full_while_writing_outputs(clean_run, tmp_path, dask_address, monkeypatch, capsys):
    source, clean = clean_run
    real_csv_lines = embeddings_csv.csv_lines

    def fail(*args, **kwargs):  # the header is written by now: what a filling disk takes before it refuses
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run = [
        "run",
        f"dask.address={dask_address}",
        f"input_dir={source}",
        f"output_dir={tmp_path / 'out'}",
        f"shared_dir={tmp_path / 'shared'}",
        *OPTIONS,
    ]
    monkeypatch.setattr(embeddings_csv, "csv_lines", fail)
    assert main(run) == 1
    assert "No space left on device" in capsys.readouterr().err
    data = tmp_path / "out" / "run" / "data"
    assert not (data / "embeddings.csv").exists() and not (tmp_path / "out" / "run" / "report.json").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], "a partial temporary file was left"

    monkeypatch.setattr(embeddings_csv, "csv_lines", real_csv_lines)
    assert main(run) == 0
    assert_same_outputs(tmp_path / "out" / "run", clean)
