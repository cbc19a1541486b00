"""How a stage's work is cut into parts, from the listed files to the tasks.

Glossary, from small to large:

- sample: one image, or one frame of a video; one row in the check and embedding tables.
- source (`Source`): a thing to decode into samples, with one interface for every medium: an
  image file (`tasks.listing.InputFile`, one sample) or a frame range.
- range (`tasks.video.frames.FrameRange`): frames of one video that start at a keyframe
  (`frame_ranges`), so that many workers decode one long video in parallel, each seeking straight
  to its own ranges.
- shard: the sources a stage caches as one unit. Images are cut at content-defined points
  (`stable_shards`: a cut after every file whose name hashes to 0 modulo the target size), so
  adding files to a folder changes only the shards they fall into; a video's ranges are grouped
  in order (`group_ranges`), so short videos share a shard.
- piece: a run of a shard's sources with one result file in the cache (`plan_pieces`): the runs
  of a shard that earlier results cover are reused, so the last shard of a folder that grows at
  its end (files named by time) is not computed again whole every run; the new sources are cut
  into pieces for every task slot.
- batch: the pieces one task computes (`pack_pieces`); the flow's `Batches`, and the `Batch` a
  task is given.

    >>> [len(shard) for shard in stable_shards(list("abcdefgh"), str, shard_size=4, n_workers=2)]
    [4, 1, 3]
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from dask.tokenize import tokenize
from upath import UPath

from tasks.caching import prefix_keys, shard_key
from tasks.listing import InputFile
from tasks.video.frames import FrameRange, frame_name

if TYPE_CHECKING:
    import av

T = TypeVar("T")

# New files are cut into pieces of at most max(MIN_PIECE, an equal share per task slot). One piece
# a slot, not more: a Prefect task has a fixed cost of its own (its context serialized in the
# flow, its settings rebuilt and its client made on the worker), the time of a few dozen small
# images (benchmarks/rerun.py). Fewer files than MIN_PIECE are never split.
MIN_PIECE = 32

# A task computes at most this many shards' worth of samples (`pack_pieces`): its share of a large
# run would otherwise be hours of work shown as one step of the progress display.
LARGEST_BATCH = 16


class Source(Protocol):
    """A thing to decode into samples: an image file (`InputFile`) or a video's frame range
    (`FrameRange`). Stages read every source alike and never ask which one it is."""

    @property
    def origin(self) -> InputFile:
        """The input file that is read: the image, or the video."""

    @property
    def label(self) -> int: ...

    @property
    def count(self) -> int:
        """Its samples."""

    def names(self) -> list[str]:
        """Its samples' names, in order."""

    def read(
        self,
        input_dir: UPath,
        image: Callable[[bytes], T],
        frame: Callable[[av.VideoFrame], T],
        timeout: float | None = None,
    ) -> Iterable[tuple[str, T | str]]:
        """(name, converted sample) for each of names(), in order, or (name, reason) for a sample that
        cannot be read: an image's bytes go through `image`, a decoded frame through `frame`. An image
        is read when read is called; a range's frames are decoded as they are iterated, each within
        `timeout` seconds (an image's converter applies its own)."""

    def key(self, stage: str) -> object:
        """What the source adds to the cache key of a stage's shard (tasks/caching.py); a stable repr."""


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


def split_points(n_frames: int, keyframes: list[int], size: int) -> list[int]:
    """Starts of ranges of about `size` frames, each moved forward to a keyframe so that no
    decoding is wasted before it (a video without keyframe information is cut anywhere).

    >>> split_points(10, [0, 4, 8], 3)
    [0, 4, 8]
    """
    starts = [0]
    for target in range(size, n_frames, size):
        start = target
        if keyframes:
            later = bisect.bisect_left(keyframes, target)
            if later == len(keyframes):
                break
            start = keyframes[later]
        if start > starts[-1]:
            starts.append(start)
    return starts


def frame_ranges(videos: pa.Table, size: int, keep: set[str] | None = None) -> list[FrameRange]:
    """Ranges of at most about `size` frames over the usable videos (tasks/video/probe.py's
    table): every frame, or only the frames whose names are in `keep` (frames that passed the
    check, or that were selected)."""
    ranges = []
    for video in videos.filter(pc.is_null(videos.column("error"))).to_pylist():
        file = InputFile(video["filename"], video["label"], video["size"], video["version"])
        pts = video["pts"]
        n = len(pts)
        step = int(np.min(np.diff(pts))) if n > 1 else 1
        starts = split_points(n, video["keyframes"], size) + [n]
        for start, stop in zip(starts, starts[1:]):
            indices = [i for i in range(start, stop) if keep is None or frame_name(file.filename, i, n) in keep]
            if indices:
                ranges.append(FrameRange(file, n, tuple(indices), tuple(pts[i] for i in indices), step))
    return ranges


def group_ranges(ranges: list[FrameRange], size: int) -> list[list[FrameRange]]:
    """Group consecutive ranges into shards of about `size` frames, so short videos share a task."""
    shards: list[list[FrameRange]] = []
    frames = size
    for rng in ranges:
        if frames >= size:
            shards.append([])
            frames = 0
        shards[-1].append(rng)
        frames += len(rng.indices)
    return shards


def video_shards(
    videos: pa.Table, shard_size: int, n_workers: int, keep: set[str] | None = None
) -> list[list[FrameRange]]:
    """Shards for a mapped stage: at most shard_size frames each (fewer when that leaves a worker idle)."""
    total = len(keep) if keep is not None else sum(len(p) for p in videos.column("pts").to_pylist() if p)
    size = max(1, min(shard_size, math.ceil(total / max(n_workers, 1))))
    return group_ranges(frame_ranges(videos, size, keep), size)


@dataclass(frozen=True)
class Piece:
    """Items [start, stop) of a shard, the content key of their result, and whether it is cached."""

    start: int
    stop: int
    key: str
    cached: bool


def _longest_cached(
    stage: str, source: str, params: Any, items: list[Any], start: int, present: set[str]
) -> Piece | None:
    """The longest run of items from `start` whose result is in `present` (file names), if any."""
    found = None
    for stop, key in enumerate(prefix_keys(stage, source, params, items[start:]), start=start + 1):
        if f"{key}.parquet" in present:
            found = Piece(start, stop, key, True)
    return found


def plan_pieces(
    stage: str, source: str, params: Any, shards: list[list[Source]], present: set[str], slots: int
) -> list[list[Piece]]:
    """Each shard as pieces, in order: a shard whose result is cached is one piece; otherwise the
    longest runs of its items from its start with a cached result, one after another, and the
    items left are new pieces. Each shard's new items are cut into the fewest pieces of equal size
    up to max(MIN_PIECE, an equal share of all new items for each of the `slots`), so
    that a run with few new files, which fall into few shards, still gives every task slot work.
    `present` names the cached files."""
    keyed = [[item.key(stage) for item in shard] for shard in shards]
    reused: list[list[Piece]] = []
    for shard in keyed:
        key = shard_key(stage, source, params, shard)
        if f"{key}.parquet" in present:  # the common case first, with one hash of the shard
            reused.append([Piece(0, len(shard), key, True)])
            continue
        pieces: list[Piece] = []
        # An empty cache (a first run) has no runs to find: no hash per file.
        while (
            present
            and (start := pieces[-1].stop if pieces else 0) < len(shard)
            and (piece := _longest_cached(stage, source, params, shard, start, present))
        ):
            pieces.append(piece)
        reused.append(pieces)
    rest = [len(shard) - (pieces[-1].stop if pieces else 0) for shard, pieces in zip(keyed, reused)]
    size = max(MIN_PIECE, math.ceil(sum(rest) / max(slots, 1)))
    for shard, pieces, left in zip(keyed, reused, rest):
        parts = math.ceil(left / size)
        cuts = [len(shard) - left + left * i // parts for i in range(parts + 1)] if parts else []
        pieces += [Piece(a, b, shard_key(stage, source, params, shard[a:b]), False) for a, b in zip(cuts, cuts[1:])]
    return reused


def pack_pieces(sizes: list[int], slots: int, shard_size: int) -> list[list[int]]:
    """The pieces of `sizes` (their samples) grouped into batches, one task each, as indices; the
    batches shrink, as guided scheduling hands out work. Each batch's share is the samples left
    over the `slots`: at least `shard_size` (or an equal share of all, where that leaves a slot
    idle), at most LARGEST_BATCH shards, and all that is left where less than half the least
    would be left over. It takes the largest pieces that fit its share (the largest piece left,
    when none fits). A task costs Prefect about 0.3 s of CPU of its own, in the flow and on its
    worker: the first batches are large, so that there are few tasks, and the last small, so that
    the workers finish together.

    >>> pack_pieces([23, 77, 77, 41, 2], slots=2, shard_size=256)
    [[0, 2, 4], [1, 3]]
    >>> [len(batch) for batch in pack_pieces([250] * 16, slots=2, shard_size=256)]
    [8, 4, 2, 1, 1]
    """
    total = sum(sizes)
    least = min(shard_size, math.ceil(total / max(slots, 1)))
    left = sorted((size, i) for i, size in enumerate(sizes))
    rest = total
    batches: list[list[int]] = []
    while left:
        share = min(LARGEST_BATCH * shard_size, max(least, math.ceil(rest / max(slots, 1))))
        if rest - share < least / 2:
            share = rest  # no batch of a few samples left over at the end
        batch, load = [], 0
        while left and (fits := bisect.bisect_right(left, (share - load, len(sizes)))):
            size, i = left.pop(fits - 1)
            batch.append(i)
            load += size
        if not batch:
            size, i = left.pop()
            batch.append(i)
            load += size
        batches.append(sorted(batch))
        rest -= load
    return batches


class Batch(Sequence[list[Source]]):
    """A batch's pieces, handed to its task as one value. Prefect walks a task's lists, tuples,
    dicts and dataclasses element by element, three times a task (for futures in them, the task's
    inputs and its cache key): 0.2 to 0.3 s of a 2-core machine for a task of 2,000 files. A value
    of a type it does not know it passes whole. Its own wrapper for this, `quote`, is a named
    tuple, which Dask's task arguments turn into a plain one."""

    def __init__(self, pieces: list[list[Source]]) -> None:
        self._pieces = pieces

    def __getitem__(self, index: int) -> list[Source]:
        return self._pieces[index]

    def __len__(self) -> int:
        return len(self._pieces)

    def __dask_tokenize__(self) -> tuple:
        return ("Batch", tokenize(self._pieces))


def count_samples(shard: list[Source]) -> int:
    """Samples in a shard (for progress bars)."""
    return sum(source.count for source in shard)


def describe_shard(shard: list[Source]) -> str:
    """'<n> samples from a, b, c and 4 more', naming the shard's input files (for error messages)."""
    names = [source.origin.filename for source in shard]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{count_samples(shard)} samples from {shown}"
