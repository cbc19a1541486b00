"""Content-addressed results for the expensive shard tasks (decode/check, embed).

A shard's output file is named by a hash of everything that determines it: the stage, the code
version, the input folder, the parameters that change the result, and the identity (name, size,
modification time) of every file in the shard. A rerun with the same inputs finds the file and
skips the work; changing a parameter that matters (input size, model) changes the key of only
the stages that depend on it. Files are written atomically, so a file that exists is complete.

Why not Prefect's result cache alone: its cache record and the Parquet file it points to could
disagree when either is deleted; a content-addressed file is its own cache record.

Shard boundaries are content-defined (a cut after every file whose name hashes to 0 modulo the
target size), so adding files to a folder changes only the shards they fall into.

    >>> key = shard_key("check", "/data", CheckOptions(), files)
    >>> cache_path(location("shared/.thresher-cache"), "check", key)
    PosixUPath('.../check/3f2a....parquet')
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any, Callable, TypeVar

import xxhash
from upath import UPath

# Part of every key: a new release recomputes rather than trusting results of older code.
CODE_VERSION = metadata.version("thresher")

T = TypeVar("T")


def shard_key(stage: str, source: str, params: Any, shard: list[Any]) -> str:
    """Hash of what determines a shard's result; params and shard items must have stable reprs
    (frozen dataclasses, tuples, numbers and strings)."""
    digest = xxhash.xxh3_128()
    digest.update(repr((CODE_VERSION, stage, source, params)).encode())
    for item in shard:
        digest.update(repr(item).encode())
    return digest.hexdigest()


def cache_path(cache_dir: UPath, stage: str, key: str) -> UPath:
    return cache_dir / stage / f"{key}.parquet"


def stable_shards(items: list[T], name: Callable[[T], str], shard_size: int, n_workers: int) -> list[list[T]]:
    """Cut items into shards averaging `target` items, at content-defined points, at most 2x target.

    target is shard_size, or less for small inputs so that every worker gets work."""
    if not items:
        return []
    target = max(1, min(shard_size, math.ceil(len(items) / max(n_workers, 1))))
    shards: list[list[T]] = [[]]
    for item in items:
        current = shards[-1]
        current.append(item)
        if len(current) >= 2 * target or (target > 1 and xxhash.xxh64_intdigest(name(item).encode()) % target == 0):
            shards.append([])
    return [s for s in shards if s]
