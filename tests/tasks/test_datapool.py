import json
import multiprocessing
import os
import socket
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lightly.utils.io import load_embeddings

from tasks.datapool import (
    CSV_FILE,
    HISTORY_DIR,
    LOCK_FILE,
    LOCK_STALE_SECONDS,
    POOL_FILE,
    DatapoolError,
    PoolLock,
    check_compatible,
    commit,
    history,
    merge,
    pool_schema,
    processed_keys,
    read_pool,
    run_rows,
    sampled_rows,
)

MODEL = "efficientnet-lite0|imagenet|input_size=64"


def _rows(run: str, names: list[str], statuses: list[str], dim: int = 3, source: str = "/data") -> pa.Table:
    rng = np.random.default_rng(len(names))
    embeddings = [rng.normal(size=dim).astype(np.float32).tolist() if s == "sampled" else None for s in statuses]
    return pa.Table.from_pydict(
        {
            "source": [source] * len(names),
            "filename": names,
            "file": names,
            "label": [0] * len(names),
            "size": [10] * len(names),
            "version": ["1.0"] * len(names),
            "content_hash": [f"h{n}" for n in names],
            "status": statuses,
            "run": [run] * len(names),
            "embedding": embeddings,
        },
        schema=pool_schema(dim, MODEL),
    )


def test_commit_grows_the_pool_keeps_history_and_writes_lightly_csv(tmp_path):
    pool = tmp_path / "pool"
    commit(pool, _rows("r1", ["a.jpg", "b.jpg"], ["sampled", "removed"]), keep_history=True)
    second = merge(read_pool(pool), _rows("r2", ["c.jpg"], ["sampled"]))
    commit(pool, second, keep_history=True)
    state = read_pool(pool)
    assert state.column("filename").to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert len(list((pool / HISTORY_DIR).iterdir())) == 1
    vectors, _, names = load_embeddings(str(pool / CSV_FILE))
    assert list(names) == ["a.jpg", "c.jpg"] and vectors.shape == (2, 3)
    assert history(pool) == [{"run": "r1", "n_samples": 1}, {"run": "r2", "n_samples": 1}]


def test_keep_history_false_leaves_no_history(tmp_path):
    pool = tmp_path / "pool"
    commit(pool, _rows("r1", ["a.jpg"], ["sampled"]), keep_history=False)
    commit(pool, _rows("r2", ["a.jpg"], ["sampled"]), keep_history=False)
    assert not (pool / HISTORY_DIR).exists()


def test_reprocessed_files_replace_their_old_rows():
    old = _rows("r1", ["a.jpg", "b.jpg"], ["sampled", "removed"])
    merged = merge(old, _rows("r2", ["b.jpg"], ["sampled"]))
    assert list(zip(merged.column("filename").to_pylist(), merged.column("run").to_pylist())) == [
        ("a.jpg", "r1"),
        ("b.jpg", "r2"),
    ]
    assert len(sampled_rows(merged)) == 2


def test_processed_keys_are_per_source():
    table = pa.concat_tables(
        [_rows("r1", ["a.jpg"], ["removed"]), _rows("r1", ["z.jpg"], ["removed"], source="/other")]
    )
    assert processed_keys(table, "/data") == {("a.jpg", 10, "1.0")}
    assert processed_keys(None, "/data") == set()


def test_run_rows_record_status_identity_and_sampled_embeddings():
    samples = pa.Table.from_pydict(
        {
            "filename": ["a.jpg", "v-1-mp4.png", "b.jpg", "c.jpg"],
            "label": [0, 1, 0, 0],
            "status": ["ok", "ok", "duplicate", "corrupt"],
        },
        schema=pa.schema([("filename", pa.string()), ("label", pa.int32()), ("status", pa.string())]),
    )
    files = {
        "a.jpg": ("a.jpg", 5, "1.0"),
        "v-1-mp4.png": ("v.mp4", 99, "2.0"),
        "b.jpg": ("b.jpg", 5, "1.0"),
        "c.jpg": ("c.jpg", 0, "1.0"),
    }
    rows = run_rows("/data", samples, files, {"a.jpg": "h1"}, {"v-1-mp4.png": np.ones(3, np.float32)}, "r1", 3, MODEL)
    assert rows.column("status").to_pylist() == ["removed", "sampled", "duplicate", "corrupt"]
    assert rows.column("embedding").to_pylist()[:2] == [None, [1.0, 1.0, 1.0]]
    assert processed_keys(rows, "/data") == {
        ("a.jpg", 5, "1.0"),
        ("v.mp4", 99, "2.0"),
        ("b.jpg", 5, "1.0"),
        ("c.jpg", 0, "1.0"),
    }


def test_dimension_and_model_mismatch_stop_with_a_message(tmp_path):
    table = _rows("r1", ["a.jpg"], ["sampled"])
    check_compatible(table, 3, MODEL, tmp_path)
    with pytest.raises(DatapoolError, match="holds 3-dimensional embeddings but this run makes 32-dimensional"):
        check_compatible(table, 32, MODEL, tmp_path)
    with pytest.raises(DatapoolError, match="was built with model"):
        check_compatible(table, 3, "resnet-18|random-seed-1|input_size=64", tmp_path)


def test_a_half_written_commit_leaves_the_previous_state(tmp_path):
    pool = tmp_path / "pool"
    commit(pool, _rows("r1", ["a.jpg"], ["sampled"]), keep_history=True)
    (pool / f".{POOL_FILE}.999.tmp").write_bytes(b"PAR1 half written")  # what a kill mid-write leaves
    assert read_pool(pool).column("filename").to_pylist() == ["a.jpg"]


def _hold_lock(pool, ready, release, options):
    with PoolLock(pool, **options):
        ready.set()
        release.wait(30)


def _lock_holder(pool, **options):
    """A process holding the pool's lock (PoolLock options), and the event that releases it."""
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(pool, ready, release, options))
    holder.start()
    assert ready.wait(60)
    return holder, release


def test_lock_excludes_a_second_run_and_survives_a_crashed_holder(tmp_path):
    pool = tmp_path / "pool"
    holder, _ = _lock_holder(pool)
    with pytest.raises(DatapoolError, match=f"in use by process {holder.pid}"):
        with PoolLock(pool):
            pass
    holder.kill()  # a crash: the lock file stays behind
    holder.join()
    assert (pool / LOCK_FILE).exists()
    with PoolLock(pool):
        assert json.loads((pool / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (pool / LOCK_FILE).exists()


def _lock_record(host: str, refreshed_ago: float) -> str:
    refreshed = datetime.now(UTC) - timedelta(seconds=refreshed_ago)
    return json.dumps({"host": host, "pid": 1, "token": "theirs", "since": "then", "refreshed": refreshed.isoformat()})


def test_a_lock_from_another_host_is_taken_over_once_its_refreshes_stop(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    lock = pool / LOCK_FILE
    lock.write_text(_lock_record("elsewhere", refreshed_ago=LOCK_STALE_SECONDS - 60))
    with pytest.raises(DatapoolError, match="in use by process 1 on elsewhere"):
        PoolLock(pool).__enter__()
    lock.write_text(_lock_record("elsewhere", refreshed_ago=LOCK_STALE_SECONDS + 60))
    with PoolLock(pool):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    # a record without its refresh time is judged by the file's
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(DatapoolError, match="in use"):
        PoolLock(pool).__enter__()
    old = time.time() - LOCK_STALE_SECONDS - 60
    os.utime(lock, (old, old))
    with PoolLock(pool):
        pass
    assert not lock.exists()


def test_a_holder_keeps_its_lock_fresh_for_as_long_as_it_runs(tmp_path):
    pool = tmp_path / "pool"
    holder, release = _lock_holder(pool, stale_after=1.0, refresh=0.1)
    try:
        taken = json.loads((pool / LOCK_FILE).read_text())
        time.sleep(2.5)  # more than twice stale_after: only the refreshes keep it
        with pytest.raises(DatapoolError, match=f"in use by process {holder.pid}"):
            PoolLock(pool, stale_after=1.0).__enter__()
        now = json.loads((pool / LOCK_FILE).read_text())
        assert now["since"] == taken["since"] and now["refreshed"] > taken["refreshed"]
    finally:
        release.set()
        holder.join(60)
    assert not (pool / LOCK_FILE).exists()


def test_a_holder_that_stalled_loses_its_lock_and_leaves_the_new_one(tmp_path):
    pool = tmp_path / "pool"
    stalled = PoolLock(pool, stale_after=0.5, refresh=3600).__enter__()  # never refreshes in this test
    time.sleep(0.7)
    with PoolLock(pool, stale_after=0.5) as successor:
        with pytest.raises(DatapoolError, match="no longer holds its lock"):
            stalled.check()
        stalled.__exit__(None, None, None)
        assert json.loads((pool / LOCK_FILE).read_text())["token"] == successor.token
        successor.check()
    assert not (pool / LOCK_FILE).exists()


def test_a_schema_1_pool_reads_with_its_modification_times_as_versions(tmp_path):
    current = _rows("r1", ["a.jpg", "b.jpg"], ["sampled", "removed"])
    mtime = 1732180000.123456
    fields = [pa.field("mtime", pa.float64()) if f.name == "version" else f for f in current.schema]
    meta = {**current.schema.metadata, b"thresher.schema_version": b"1"}
    old = current.set_column(current.schema.get_field_index("version"), "mtime", pa.array([mtime, mtime]))
    (tmp_path / "pool").mkdir()
    pq.write_table(old.cast(pa.schema(fields, metadata=meta)), tmp_path / "pool" / POOL_FILE)
    pool = read_pool(tmp_path / "pool")
    assert pool.schema == pool_schema(3, MODEL)
    # exactly what listing now records for a local file with that modification time
    assert processed_keys(pool, "/data") == {("a.jpg", 10, repr(mtime)), ("b.jpg", 10, repr(mtime))}
    assert pool.column("embedding").to_pylist() == current.column("embedding").to_pylist()


def test_a_schema_2_pool_reads_with_its_embeddings_and_is_rewritten_without_values_for_unsampled_rows(tmp_path):
    current = _rows("r1", ["a.jpg", "b.jpg", "c.jpg"], ["removed", "sampled", "removed"])
    fields = [pa.field("embedding", pa.list_(pa.float32(), 3)) if f.name == "embedding" else f for f in current.schema]
    meta = {**current.schema.metadata, b"thresher.schema_version": b"2"}
    (tmp_path / "pool").mkdir()
    pq.write_table(current.cast(pa.schema(fields, metadata=meta)), tmp_path / "pool" / POOL_FILE)
    pool = read_pool(tmp_path / "pool")
    assert pool.schema == pool_schema(3, MODEL)
    assert pool.column("embedding").to_pylist() == current.column("embedding").to_pylist()
    commit(tmp_path / "pool", pool, keep_history=False)
    # a fixed-size list holds 3 values for every row; the pool now holds them for the sampled row alone
    assert sum(len(chunk.values) for chunk in read_pool(tmp_path / "pool").column("embedding").chunks) == 3
