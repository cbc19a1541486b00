"""End-to-end: datapool growth across runs, incremental processing, the shard cache, the lock,
and a run killed mid-way, through the CLI on a real Prefect server and Dask cluster."""

import json
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

from flows.cli import main
from tasks.datapool import CSV_FILE, HISTORY_DIR, LOCK_FILE, POOL_FILE, PoolLock
from tests.images import picture, save

pytestmark = pytest.mark.usefixtures("prefect_server")


def _images(root: Path, seeds: range) -> None:
    for seed in seeds:
        save(picture(seed), root / f"img_{seed:03d}.jpg", format="JPEG", quality=92)


def _run(dask_address: str, tmp_path: Path, run: str, *overrides: str) -> int:
    return main(
        [
            "run",
            f"dask.address={dask_address}",
            f"input_dir={tmp_path / 'in'}",
            f"output_dir={tmp_path / 'out'}",
            f"shared_dir={tmp_path / 'shared'}",
            f"run_directory={run}",
            *overrides,
        ]
    )


def _report(tmp_path: Path, run: str) -> dict:
    return json.loads((tmp_path / "out" / run / "report.json").read_text())


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_pool_grows_across_runs_with_min_distance_over_the_union(tmp_path, dask_address):
    (tmp_path / "shared").mkdir()
    _images(tmp_path / "in", range(0, 10))
    pool_args = ("datapool.name=pool", "stopping_condition.min_distance=0.3")
    assert _run(dask_address, tmp_path, "r1", *pool_args) == 0
    first = _lines(tmp_path / "out" / "r1" / "filenames" / "sampled_filenames.txt")
    assert first

    _images(tmp_path / "in", range(10, 16))
    assert _run(dask_address, tmp_path, "r2", *pool_args) == 0
    report = _report(tmp_path, "r2")
    assert report["counts"]["n_skipped_processed"] == 10 and report["counts"]["n_input_files"] == 6
    second = _lines(tmp_path / "out" / "r2" / "filenames" / "sampled_filenames.txt")
    assert not set(second) & set(first) and set(second) <= {f"img_{i:03d}.jpg" for i in range(10, 16)}

    pool_dir = tmp_path / "shared" / "pool"
    state = pq.read_table(pool_dir / POOL_FILE)
    sampled = state.filter(state.column("status").to_numpy(zero_copy_only=False) == "sampled")
    assert sorted(sampled.column("filename").to_pylist()) == sorted(first + second)
    assert sorted(state.column("filename").to_pylist()) == [f"img_{i:03d}.jpg" for i in range(16)]
    vectors = np.array(sampled.column("embedding").to_pylist(), dtype=np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    distances = np.linalg.norm(unit[:, None] - unit[None], axis=-1)[np.triu_indices(len(unit), 1)]
    assert distances.min() >= 0.3 - 1e-5
    assert len(list((pool_dir / HISTORY_DIR).iterdir())) == 1
    assert len(_lines(pool_dir / CSV_FILE)) == 1 + len(first) + len(second)
    assert [row["n_samples"] for row in report["datapool_history"]] == [len(first), len(second)]
    assert not (pool_dir / LOCK_FILE).exists()

    # nothing new: nothing to process, the pool stays as it is
    assert _run(dask_address, tmp_path, "r3", *pool_args) == 0
    assert _report(tmp_path, "r3")["counts"]["n_input_files"] == 0
    # process_all reprocesses every file against the pool
    assert _run(dask_address, tmp_path, "r4", *pool_args, "datasource.process_all=True") == 0
    assert _report(tmp_path, "r4")["counts"]["n_input_files"] == 16


def test_keep_history_false_and_model_mismatch(tmp_path, dask_address, capsys):
    (tmp_path / "shared").mkdir()
    _images(tmp_path / "in", range(30, 36))
    args = ("datapool.name=p", "datapool.keep_history=False", "stopping_condition.n_samples=2")
    assert _run(dask_address, tmp_path, "a", *args) == 0
    _images(tmp_path / "in", range(36, 38))
    assert _run(dask_address, tmp_path, "b", *args) == 0
    assert not (tmp_path / "shared" / "p" / HISTORY_DIR).exists()
    before = (tmp_path / "shared" / "p" / POOL_FILE).read_bytes()

    capsys.readouterr()
    code = _run(dask_address, tmp_path, "c", *args, "lightly.model.name=resnet-18", "lightly.model.num_ftrs=16")
    assert code == 1
    assert "holds 1280-dimensional embeddings but this run makes 16-dimensional ones" in capsys.readouterr().err
    assert (tmp_path / "shared" / "p" / POOL_FILE).read_bytes() == before
    assert not (tmp_path / "out" / "c" / "intermediate" / "samples.parquet").exists()  # stopped before any work


def test_a_second_run_on_a_pool_in_use_stops_with_a_message(tmp_path, dask_address, capsys):
    (tmp_path / "shared").mkdir()
    _images(tmp_path / "in", range(40, 44))
    with PoolLock(tmp_path / "shared" / "busy"):
        assert _run(dask_address, tmp_path, "x", "datapool.name=busy", "stopping_condition.n_samples=2") == 1
    assert f"is in use by process {os.getpid()}" in capsys.readouterr().err


def _take_over_when_locked(lock: Path, done: threading.Event) -> None:
    """What a second run does with a stale lock, once this run's lock appears."""
    while not lock.exists():
        if done.wait(0.01):
            return  # the run ended without taking its lock: the test's assertions say so
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 7, "token": "theirs", "since": "now", "refreshed": "now"}))


def test_a_run_that_lost_its_lock_does_not_write_the_pool(tmp_path, dask_address, capsys):
    (tmp_path / "shared").mkdir()
    _images(tmp_path / "in", range(44, 48))
    lock, done = tmp_path / "shared" / "taken" / LOCK_FILE, threading.Event()
    thief = threading.Thread(target=_take_over_when_locked, args=(lock, done))
    thief.start()
    try:
        assert _run(dask_address, tmp_path, "x", "datapool.name=taken", "stopping_condition.n_samples=2") == 1
    finally:
        done.set()
        thief.join()
    assert "this run no longer holds its lock" in capsys.readouterr().err
    assert not (tmp_path / "shared" / "taken" / POOL_FILE).exists()
    assert json.loads(lock.read_text())["token"] == "theirs"  # the other run's lock is left alone
    assert (tmp_path / "out" / "x" / "filenames" / "sampled_filenames.txt").exists()


def _cache_files(cache: Path) -> dict[str, float]:
    return {str(p.relative_to(cache)): p.stat().st_mtime for p in cache.rglob("*.parquet")}


def _in(files: dict[str, float], stage: str) -> dict[str, float]:
    return {k: v for k, v in files.items() if k.startswith(f"{stage}/")}


def test_reruns_reuse_cached_shards_and_recompute_only_what_changed(tmp_path, dask_address):
    (tmp_path / "shared").mkdir()
    _images(tmp_path / "in", range(50, 62))
    cache = tmp_path / "shared" / ".thresher-cache"
    assert _run(dask_address, tmp_path, "first", "stopping_condition.n_samples=4") == 0
    first = _cache_files(cache)
    assert _in(first, "check-embed") and not _in(first, "check") and not _in(first, "embed")  # one pass

    assert _run(dask_address, tmp_path, "same", "stopping_condition.n_samples=4") == 0
    assert _cache_files(cache) == first
    stages = {row["stage"]: row for row in _report(tmp_path, "same")["stages"]}
    assert stages["check_and_embed"]["cached_shards"] == len(first)
    assert _lines(tmp_path / "out" / "same" / "filenames" / "sampled_filenames.txt") == _lines(
        tmp_path / "out" / "first" / "filenames" / "sampled_filenames.txt"
    )

    # input size changes the embeddings: the pass is made again, and the first run's pieces stay
    resized = "lightly.collate.input_size=32"
    assert _run(dask_address, tmp_path, "resized", "stopping_condition.n_samples=4", resized) == 0
    after = _cache_files(cache)
    assert _in(after, "check-embed").items() >= first.items() and len(after) == 2 * len(first)

    # without the full decode, the check (a hash) and the embedding are two stages, cached apart:
    # input size changes the embeddings, not the check, so only embedding is recomputed
    no_decode = "enable_corruptness_check=False"
    assert _run(dask_address, tmp_path, "hashed", "stopping_condition.n_samples=4", no_decode) == 0
    hashed = _cache_files(cache)
    assert _in(hashed, "check") and _in(hashed, "embed")
    assert _run(dask_address, tmp_path, "hashed-resized", "stopping_condition.n_samples=4", no_decode, resized) == 0
    last = _cache_files(cache)
    assert _in(last, "check") == _in(hashed, "check")
    assert len(_in(last, "embed")) == 2 * len(_in(hashed, "embed"))


def test_a_killed_run_leaves_the_pool_intact_and_the_next_run_completes(tmp_path, prefect_server):
    (tmp_path / "shared").mkdir()
    _images(tmp_path / "in", range(70, 74))
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        f"input_dir={tmp_path / 'in'}",
        f"output_dir={tmp_path / 'out'}",
        f"shared_dir={tmp_path / 'shared'}",
        "datapool.name=pool",
        "stopping_condition.n_samples=2",
        "dask.cluster=local-threads",
        "dask.shard_size=2",
    ]
    assert subprocess.run([*command, "run_directory=one"], env=env, capture_output=True, timeout=600).returncode == 0
    pool_file = tmp_path / "shared" / "pool" / POOL_FILE
    before = pool_file.read_bytes()

    _images(tmp_path / "in", range(74, 90))
    embed_dir = tmp_path / "shared" / ".thresher-cache" / "check-embed"
    done_before = len(list(embed_dir.glob("*.parquet")))
    process = subprocess.Popen(
        [*command, "run_directory=two"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(embed_dir.glob("*.parquet"))) == done_before:
        time.sleep(0.1)  # kill in the middle of embedding: after its first shard
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert pool_file.read_bytes() == before
    assert (tmp_path / "shared" / "pool" / LOCK_FILE).exists()  # left by the killed run

    result = subprocess.run([*command, "run_directory=three"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    state = pq.read_table(pool_file)
    assert sorted(set(state.column("filename").to_pylist())) == [f"img_{i:03d}.jpg" for i in range(70, 90)]
    assert len(_lines(tmp_path / "out" / "three" / "filenames" / "sampled_filenames.txt")) == 2
