"""Reading and writing run files so that a killed run never leaves a half-written file behind."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_path(path: Path) -> Path:
    """A sibling temporary name, unique per writing thread; renaming it onto `path` is atomic on one
    filesystem. The name is cut so that the temporary name of a 255-byte name still fits."""
    return path.with_name(f".{path.name[:100]}.{os.getpid()}-{threading.get_ident()}.tmp")


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path to write `path` through: renamed onto it when the block succeeds, removed
    when the block fails (a full disk, say), so no partial file is left under either name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(table: pa.Table, path: Path) -> Path:
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_text(text: str, path: Path) -> Path:
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def read_parquet(paths: list[Path]) -> pa.Table:
    """Concatenate shard tables in the given order."""
    return pa.concat_tables([pq.read_table(p) for p in paths])
