"""Reading and writing run files so that a killed run never leaves a half-written file behind."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_path(path: Path) -> Path:
    """A sibling temporary name; renaming it onto `path` is atomic on one filesystem."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_parquet(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_text(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_parquet(paths: list[Path]) -> pa.Table:
    """Concatenate shard tables in the given order."""
    return pa.concat_tables([pq.read_table(p) for p in paths])
