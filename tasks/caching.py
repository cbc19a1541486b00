"""Content-addressed results for the expensive shard tasks (decode/check, embed).

A shard's output file is named by a hash of everything that determines it: the stage, the code
version, the input folder, the parameters that change the result, and the identity (name, size,
modification time) of every file in the shard. A rerun with the same inputs finds the file and
skips the work; changing a parameter that matters (input size, model) changes the key of only
the stages that depend on it. Files are written atomically, so a file that exists is complete.

Why not Prefect's result cache alone: its cache record and the Parquet file it points to could
disagree when either is deleted; a content-addressed file is its own cache record.

Shard boundaries are content-defined (a cut after every file whose name hashes to 0 modulo the
target size), so adding files to a folder changes only the shards they fall into. A shard is
computed and stored in pieces (`plan_pieces`): the runs of its files that earlier results cover
are reused, so the last shard of a folder that grows at its end (files named by time) is not
computed again whole every run; the new files are cut into pieces for every task slot.

    >>> key = shard_key("check", "/data", CheckOptions(), files)
    >>> cache_path(location("shared/.thresher-cache"), "check", key)
    PosixUPath('.../check/3f2a....parquet')
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, TypeVar

import xxhash
from upath import UPath

# Part of every key: a new release recomputes rather than trusting results of older code.
CODE_VERSION = metadata.version("thresher")

T = TypeVar("T")


# New files are cut into pieces of at most max(MIN_PIECE, an equal share per task slot). One piece
# a slot, not more: a Prefect task costs about 0.25 s of CPU of its own (its context serialized in
# the flow, its settings rebuilt and its client made on the worker), the time of 20 to 30 small
# images; on 2 slots, runs adding 200 to 220 files took 1.5 s less in 3 to 5 pieces than in 5 to 6
# (the mean of 4 runs each). Fewer files than MIN_PIECE are never split.
MIN_PIECE = 32


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


@dataclass(frozen=True)
class Piece:
    """Items [start, stop) of a shard, the content key of their result, and whether it is cached."""

    start: int
    stop: int
    key: str
    cached: bool


def _longest_cached(header: xxhash.xxh3_128, items: list[Any], start: int, present: set[str]) -> Piece | None:
    """The longest run of items from `start` whose result is in `present` (file names), if any."""
    digest, found = header.copy(), None
    for stop in range(start + 1, len(items) + 1):
        digest.update(repr(items[stop - 1]).encode())
        key = digest.hexdigest()
        if f"{key}.parquet" in present:
            found = Piece(start, stop, key, True)
    return found


def plan_pieces(stage: str, source: str, params: Any, shards: list[list[Any]], present: set[str],
                slots: int) -> list[list[Piece]]:
    """Each shard as pieces, in order: a shard whose result is cached is one piece; otherwise the
    longest runs of its items from its start with a cached result, one after another, and the
    items left are new pieces. Each shard's new items are cut into the fewest pieces of equal size
    up to max(MIN_PIECE, an equal share of all new items for each of the `slots`), so
    that a run with few new files, which fall into few shards, still gives every task slot work.
    `present` names the cached files."""
    header = _header(stage, source, params)
    reused: list[list[Piece]] = []
    for shard in shards:
        key = shard_key(stage, source, params, shard)
        if f"{key}.parquet" in present:  # the common case first, with one hash of the shard
            reused.append([Piece(0, len(shard), key, True)])
            continue
        pieces: list[Piece] = []
        # An empty cache (a first run) has no runs to find: no hash per file.
        while present and (start := pieces[-1].stop if pieces else 0) < len(shard) and (
                piece := _longest_cached(header, shard, start, present)):
            pieces.append(piece)
        reused.append(pieces)
    rest = [len(shard) - (pieces[-1].stop if pieces else 0) for shard, pieces in zip(shards, reused)]
    size = max(MIN_PIECE, math.ceil(sum(rest) / max(slots, 1)))
    for shard, pieces, left in zip(shards, reused, rest):
        parts = math.ceil(left / size)
        cuts = [len(shard) - left + left * i // parts for i in range(parts + 1)] if parts else []
        pieces += [Piece(a, b, shard_key(stage, source, params, shard[a:b]), False) for a, b in zip(cuts, cuts[1:])]
    return reused


def pack(sizes: list[int], slots: int, target: int) -> list[list[int]]:
    """The pieces of `sizes` (their items) grouped into tasks, as indices in order: one task per
    slot, or more so that a task holds about `target` items; the largest pieces are placed first,
    each into the task with the fewest items so far. The pieces of a run with few new files lie in
    several shards and are small; one task each would pay Prefect's per-task cost many times.

    >>> pack([23, 77, 77, 41, 2], slots=2, target=256)
    [[1, 3], [0, 2, 4]]
    """
    tasks = min(len(sizes), max(slots, math.ceil(sum(sizes) / max(target, 1))))
    groups: list[list[int]] = [[] for _ in range(tasks)]
    loads = [(0, task) for task in range(tasks)]
    for piece in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        load, task = heapq.heappop(loads)
        groups[task].append(piece)
        heapq.heappush(loads, (load + sizes[piece], task))
    return [sorted(group) for group in groups]


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
