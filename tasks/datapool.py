"""The datapool: a dataset that grows across runs (`datapool.name=NAME` in `shared_dir/NAME/`).

The whole state of a pool is one Parquet table, `datapool.parquet`: one row per file any run has
processed (its source folder, name, size, modification time, content hash, status and run), with
the embedding of every selected row. The embedding dimension and the model that made them are in
the table's metadata, so a run with another model stops before any work. One file makes a commit
one atomic rename: a run killed at any point leaves the previous pool intact.

    shared_dir/NAME/
      datapool.parquet        the state (primary)
      datapool_latest.csv     the selected samples in the lightly embeddings format
      history/<time>.parquet  every earlier state (unless datapool.keep_history=False)
      .lock                   held by the run that is using the pool

    >>> pool = read_pool(location("shared/my_pool"))      # None for a new pool
    >>> check_compatible(pool, dim=1280, model="efficientnet-lite0|imagenet|input_size=64", path=...)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from upath import UPath

from tasks.embeddings_csv import write_embeddings_csv
from tasks.gathering import embedding_matrix
from tasks.storage import (
    ROW_GROUP_ROWS,
    StorageError,
    atomic_target,
    create_exclusive,
    describe,
    is_local,
    local_version,
    parquet_options,
    process_exists,
    read_bytes,
    read_table,
    write_text,
)

POOL_FILE = "datapool.parquet"
CSV_FILE = "datapool_latest.csv"
HISTORY_DIR = "history"
LOCK_FILE = ".lock"
# 2: a file's identity is its version string (modification time, ETag or generation) instead of a float mtime.
# 3: embeddings are variable-size lists: a fixed-size list column holds a vector's worth of values for
#    every row, sampled or not, so a pool of 10^6 files with 10^5 sampled (d = 1280) took 5.3 GB in
#    memory instead of 0.5 GB (its file, which stores no values for nulls, is the same).
SCHEMA_VERSION = "3"
# A run refreshes its lock every LOCK_REFRESH_SECONDS; one not refreshed for LOCK_STALE_SECONDS was
# left by a crashed run, and the next run takes it over.
LOCK_REFRESH_SECONDS = 30.0
LOCK_STALE_SECONDS = 600.0

log = logging.getLogger(__name__)


class DatapoolError(RuntimeError):
    """The pool cannot be used as asked; the message says why and what to do."""


def pool_schema(dim: int, model: str) -> pa.Schema:
    return pa.schema(
        [
            ("source", pa.string()),  # the input_dir the file was listed in
            ("filename", pa.string()),  # the sample, relative to source (a frame name for videos)
            ("file", pa.string()),  # the input file it came from (the image itself, or the video)
            ("label", pa.int32()),
            ("size", pa.int64()),  # of the file
            ("version", pa.string()),  # of the file: modification time, ETag or generation
            ("content_hash", pa.string()),
            ("status", pa.string()),  # sampled | removed | duplicate | corrupt
            ("run", pa.string()),
            ("embedding", pa.large_list(pa.float32())),  # null unless sampled; `dim` values when sampled
        ],
        metadata={
            "thresher.embedding_dim": str(dim),
            "thresher.model": model,
            "thresher.schema_version": SCHEMA_VERSION,
        },
    )


def read_pool(pool_dir: UPath) -> pa.Table | None:
    path = pool_dir / POOL_FILE
    if not path.exists():
        return None
    try:
        table = read_table(path)
    except Exception as error:  # a pool is never half-written by us; say what to restore from
        raise DatapoolError(
            f"datapool {describe(path)} cannot be read ({error}); "
            f"restore a state from {describe(pool_dir / HISTORY_DIR)}."
        ) from None
    return upgrade(table)


def upgrade(table: pa.Table) -> pa.Table:
    """A pool written by an earlier schema version, in the current one. Version 1 recorded local
    files' float modification time, which is exactly the version string a local file has now;
    versions 1 and 2 stored embeddings as fixed-size lists."""
    version = (table.schema.metadata or {}).get(b"thresher.schema_version")
    if version == SCHEMA_VERSION.encode():
        return table
    dim, model = pool_identity(table)
    if version == b"1":
        versions = pa.array(
            [None if t is None else local_version(t) for t in table.column("mtime").to_pylist()], pa.string()
        )
        table = table.set_column(table.schema.get_field_index("mtime"), "version", versions)
    return table.cast(pool_schema(dim, model))


def pool_identity(table: pa.Table) -> tuple[int, str]:
    meta = table.schema.metadata or {}
    return int(meta[b"thresher.embedding_dim"]), meta[b"thresher.model"].decode()


def check_compatible(table: pa.Table | None, dim: int, model: str, path: UPath) -> None:
    """Stop before any work when the pool's embeddings were made differently."""
    if table is None:
        return
    pool_dim, pool_model = pool_identity(table)
    if pool_dim != dim:
        raise DatapoolError(
            f"datapool {describe(path)} holds {pool_dim}-dimensional embeddings but this run makes "
            f"{dim}-dimensional ones; the dimension of a datapool cannot change: "
            "use the same lightly.model settings or a new datapool.name."
        )
    if pool_model != model:
        raise DatapoolError(
            f"datapool {describe(path)} was built with model {pool_model!r} but this run uses {model!r}; embeddings of "
            "different models are not comparable: use the same model, checkpoint and input size, or a new "
            "datapool.name."
        )


def processed_keys(table: pa.Table | None, source: str) -> set[tuple[str, int, str]]:
    """(file, size, version) of every input file of `source` an earlier run processed."""
    if table is None:
        return set()
    # The identity columns alone are filtered: filtering the table would copy every embedding.
    rows = table.select(["source", "file", "size", "version"])
    rows = rows.filter(pc.equal(rows.column("source"), source))
    return set(
        zip(rows.column("file").to_pylist(), rows.column("size").to_pylist(), rows.column("version").to_pylist())
    )


def sampled_rows(table: pa.Table | None) -> pa.Table | None:
    if table is None:
        return None
    return table.filter(pc.equal(table.column("status"), "sampled"))


def sampled_embeddings(table: pa.Table) -> pa.Table:
    """The pool's sampled rows in the gathered-embeddings format (filename, label, fixed-size
    embedding): selection's initial centers, the report's datapool points, datapool_latest.csv."""
    dim = pool_identity(table)[0]
    sampled = sampled_rows(table)
    chunks = [pc.list_flatten(chunk).to_numpy(zero_copy_only=False) for chunk in sampled.column("embedding").chunks]
    flat = np.concatenate(chunks) if chunks else np.empty(0, np.float32)
    return pa.table(
        {
            "filename": sampled.column("filename"),
            "label": sampled.column("label"),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
        }
    )


def run_rows(
    source: str,
    samples: pa.Table,
    files: dict[str, tuple[str, int, str]],
    hashes: dict[str, str],
    sampled: dict[str, np.ndarray],
    run: str,
    dim: int,
    model: str,
) -> pa.Table:
    """This run's pool rows: one per sample, with its status and, if sampled, its embedding.

    files maps a sample to (input file, size, version); hashes a sample to its content hash."""
    names = samples.column("filename").to_pylist()
    statuses = samples.column("status").to_pylist()
    status = ["sampled" if n in sampled else "removed" if s == "ok" else s for n, s in zip(names, statuses)]
    chosen = np.fromiter((n in sampled for n in names), bool, len(names))
    vectors = np.asarray([sampled[n] for n in names if n in sampled], np.float32).reshape(-1, dim)
    embedding = embedding_column(chosen, vectors)
    return pa.Table.from_arrays(
        [
            pa.array([source] * len(names), pa.string()),
            pa.array(names, pa.string()),
            pa.array([files[n][0] for n in names], pa.string()),
            samples.column("label"),
            pa.array([files[n][1] for n in names], pa.int64()),
            pa.array([files[n][2] for n in names], pa.string()),
            pa.array([hashes.get(n) for n in names], pa.string()),
            pa.array(status, pa.string()),
            pa.array([run] * len(names), pa.string()),
            embedding,
        ],
        schema=pool_schema(dim, model),
    )


def embedding_column(chosen: np.ndarray, vectors: np.ndarray) -> pa.LargeListArray:
    """The pool's embedding column: the rows of `vectors` (m, d), in order, at the m rows where
    `chosen` is true; null, with no values, at the others."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(chosen * vectors.shape[1])]), pa.int64())
    return pa.LargeListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)), mask=pa.array(~chosen))


def merge(old: pa.Table | None, new: pa.Table) -> pa.Table:
    """The next state: this run's rows replace earlier rows of the same (source, filename)."""
    if old is None:
        return new
    replaced = pc.is_in(sample_keys(old), value_set=sample_keys(new))
    if pc.any(replaced).as_py():  # only then: a filter copies every kept row's embedding
        old = old.filter(pc.invert(replaced))
    return pa.concat_tables([old.cast(new.schema), new])


def sample_keys(table: pa.Table) -> pa.Array:
    """(source, filename) of each row as one string (paths hold no NUL), for Arrow's hashed lookups."""
    return pc.binary_join_element_wise(table.column("source"), table.column("filename"), "\0")


def commit(pool_dir: UPath, table: pa.Table, keep_history: bool) -> None:
    """Make `table` the pool's state: archive the current state, then one atomic rename (or one
    object upload)."""
    current = pool_dir / POOL_FILE
    if current.exists() and keep_history:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%S.%fZ")
        archive = pool_dir / HISTORY_DIR / f"datapool_{stamp}.parquet"
        if is_local(pool_dir):
            archive.parent.mkdir(parents=True, exist_ok=True)
            os.link(current, archive)  # a hard link: no copy
        else:
            pool_dir.fs.copy(current.path, archive.path)  # copied inside the store
    with atomic_target(current) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, **parquet_options(table.schema))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    write_latest_csv(pool_dir, table)


def write_latest_csv(pool_dir: UPath, table: pa.Table) -> None:
    """datapool_latest.csv (lightly's format), derived from the state, so it can always be rebuilt."""
    sampled = sampled_embeddings(table)
    write_embeddings_csv(
        pool_dir / CSV_FILE,
        sampled.column("filename").to_pylist(),
        embedding_matrix(sampled),
        sampled.column("label").to_pylist(),
    )


def history(pool_dir: UPath) -> list[dict]:
    """Samples selected per run, from the current state (for the report's growth plot)."""
    path = pool_dir / POOL_FILE
    if not path.exists():
        return []
    table = read_table(path, columns=["status", "run"])  # not the embeddings, nearly all of the file
    counts = Counter(sampled_rows(table).column("run").to_pylist())
    return [{"run": run, "n_samples": counts[run]} for run in sorted(counts)]


@dataclass
class PoolLock:
    """An exclusive lock on a pool that survives a crashed holder, on any host or container.

    The lock file names its holder (host, pid and a token of its own) and when the holder last
    refreshed it: a thread rewrites it every `refresh` seconds while the holder runs. A lock not
    refreshed for `stale_after` seconds is stale (its holder died, wherever it ran), and so is one
    whose holder's process is gone from this host; a stale lock is taken over, a live one stops the
    second run with a clear message. A run may hold the pool for hours, so the lock's age says
    nothing; and a holder on another host, or in a container whose host name and pid the next one
    repeats, is told alive by its refreshes alone. A holder that stalled past `stale_after` (a
    suspended machine) can lose the lock: `check()` before writing the pool tells it so, and it
    leaves the new holder's lock alone."""

    pool_dir: UPath
    stale_after: float = LOCK_STALE_SECONDS
    refresh: float = LOCK_REFRESH_SECONDS
    token: str = field(default_factory=lambda: secrets.token_hex(8), init=False)
    since: str = field(default="", init=False)  # when the lock was taken
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _refresher: threading.Thread | None = field(default=None, init=False, repr=False)

    @property
    def path(self) -> UPath:
        return self.pool_dir / LOCK_FILE

    def __enter__(self) -> PoolLock:
        self.since = datetime.now(UTC).isoformat()
        for _ in range(2):
            if create_exclusive(self.path, self._record()):
                self._refresher = threading.Thread(target=self._keep_fresh, name="datapool-lock", daemon=True)
                self._refresher.start()
                return self
            text, holder = self._holder()
            if not self._is_stale(holder):
                raise DatapoolError(
                    f"datapool {describe(self.pool_dir)} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('since')}; wait for that run to finish (a crashed "
                    f"run's lock is taken over {self.stale_after:.0f} s after its last refresh), or remove "
                    f"{describe(self.path)} if you are sure."
                )
            # Only the stale lock that was read: a run that took it over meanwhile keeps its own.
            if self._holder()[0] == text:
                self.path.unlink(missing_ok=True)
        raise DatapoolError(f"datapool {describe(self.pool_dir)}: could not take the lock {describe(self.path)}.")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        if self._holder()[1].get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise DatapoolError when another run has taken the lock over: this one must not write the pool."""
        holder = self._holder()[1]
        if holder.get("token") != self.token:
            now = f"names process {holder.get('pid')} on {holder.get('host')}" if holder else "is gone"
            raise DatapoolError(
                f"datapool {describe(self.pool_dir)}: this run no longer holds its lock ({describe(self.path)} {now}); "
                f"a lock not refreshed for {self.stale_after:.0f} s is taken over (was this machine suspended?). The "
                "pool was not updated; this run's own outputs are complete, and the next run adds its files to "
                "the pool."
            )

    def _record(self) -> str:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "since": self.since,
                "refreshed": datetime.now(UTC).isoformat(),
            }
        )

    def _keep_fresh(self) -> None:
        while not self._stop.wait(self.refresh):
            try:
                if self._holder()[1].get("token") != self.token:
                    return  # taken over: check() says so before the pool is written
                write_text(self._record(), self.path)
            except (OSError, StorageError) as error:  # a store's hiccup: the next refresh tries again
                log.warning("Could not refresh the datapool lock %s: %s", describe(self.path), error)

    def _holder(self) -> tuple[str | None, dict]:
        """The lock file's text and record; (None, {}) when there is none, {} when unreadable."""
        try:
            data = read_bytes(self.path)
        except FileNotFoundError:
            return None, {}
        text = data.decode(errors="replace")
        try:
            record = json.loads(text)
        except ValueError:
            return text, {}
        return text, record if isinstance(record, dict) else {}

    def _refreshed_ago(self, holder: dict) -> float:
        """Seconds since the holder last refreshed the lock (by its record, else by the file's time)."""
        try:
            return time.time() - datetime.fromisoformat(holder["refreshed"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return time.time() - self.path.stat().st_mtime

    def _is_stale(self, holder: dict) -> bool:
        try:
            ago = self._refreshed_ago(holder)
        except FileNotFoundError:
            return True
        if not holder:  # unreadable: stale unless its writer may still be filling it in
            return ago > 5
        if ago > self.stale_after:
            return True
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not process_exists(pid)
