"""Content-addressed results for the expensive shard tasks (decode/check, embed).

A shard's output file is named by a hash of everything that determines it: the stage, the code
version, the input folder, the parameters that change the result, and the identity (name, size,
modification time) of every file in the shard. A rerun with the same inputs finds the file and
skips the work; changing a parameter that matters (input size, model) changes the key of only
the stages that depend on it. Files are written atomically, so a file that exists is complete.
How shards are cut, and stored in pieces, is `tasks/sharding.py`.

Why not Prefect's result cache alone: its cache record and the Parquet file it points to could
disagree when either is deleted; a content-addressed file is its own cache record.

    >>> key = shard_key("check", "/data", check_params(check_options(config)), files)
    >>> cache_path(location("shared/.thresher-cache"), "check", key)
    PosixUPath('.../check/3f2a....parquet')
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from typing import Any

import xxhash
from upath import UPath

# Part of every key: a new release recomputes rather than trusting results of older code.
CODE_VERSION = metadata.version("thresher")


def _header(stage: str, source: str, params: Any) -> xxhash.xxh3_128:
    digest = xxhash.xxh3_128()
    digest.update(repr((CODE_VERSION, stage, source, params)).encode())
    return digest


def shard_key(stage: str, source: str, params: Any, shard: list[Any]) -> str:
    """Hash of what determines a shard's result; params and shard items must have stable reprs
    (frozen dataclasses, tuples, numbers and strings)."""
    digest = _header(stage, source, params)
    for item in shard:
        digest.update(repr(item).encode())
    return digest.hexdigest()


def prefix_keys(stage: str, source: str, params: Any, items: list[Any]) -> Iterator[str]:
    """shard_key of items[:1], items[:2], ..., one hash update each."""
    digest = _header(stage, source, params)
    for item in items:
        digest.update(repr(item).encode())
        yield digest.hexdigest()


def cache_path(cache_dir: UPath, stage: str, key: str) -> UPath:
    return cache_dir / stage / f"{key}.parquet"
