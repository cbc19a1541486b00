"""Video input: every frame of a video is a sample.

A frame is named as lightly names it, `<video path without extension>-<index>-<extension>.png`,
the index zero-padded to the number of digits of the video's frame count
(`sub/my_video-153-mp4.png`), so filename lists are stable and interchangeable with lightly's.

The pipeline never holds a video in memory. `probe` reads only the container's packets (no
decoding) to learn each frame's presentation timestamp (pts) and the keyframes; the flow then cuts
videos into `FrameRange`s that start at keyframes, so many workers decode one long video in
parallel and each seeks straight to its range. `decode_frames` streams one range with PyAV's
threaded decoder and gives every wanted frame exactly once, or None where it could not be
decoded; callers convert each frame as it comes out (hash, thumbnail for the embedder, image).

Corruption score of a decoded frame, in [0, 1]: 1 when the decoder flags the frame as corrupt
(it had to conceal a damaged packet); otherwise the fraction of 16x16 luma blocks whose border
to a neighbour is much sharper than their inside (`corruption_score`). Decoders hide lost data
by copying blocks from elsewhere, and errors propagate to the following frames through motion
compensation without any flag; both leave a grid of hard block edges that natural pictures and
ordinary compression do not have (clean frames score below 0.08, damaged ones 0.1 to 0.6 in the
tests). `corruptness_check.corruption_threshold` (default 0.1) applies to this score.

    >>> videos = read_videos([location("probe.parquet")])
    >>> rng = frame_ranges(videos, size=256)[0]
    >>> [(index, frame is not None) for index, frame in decode_frames(location("in") / rng.file.filename, rng)][:2]
    [(0, True), (1, True)]
"""

from __future__ import annotations

import bisect
import json
import itertools
import math
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import PurePosixPath

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from PIL import Image
from prefect import task
from upath import UPath

from tasks.listing import InputFile
from tasks.storage import decoder_source, read_parquet, write_parquet, write_text
from tasks.timeouts import progressing

# One row per listed video: its frames' pts in presentation order, or why it cannot be used.
VIDEO_SCHEMA = pa.schema(
    [
        ("filename", pa.string()),
        ("label", pa.int32()),
        ("size", pa.int64()),
        ("version", pa.string()),
        ("time_base", pa.string()),  # "num/den": seconds per pts unit
        ("pts", pa.list_(pa.int64())),
        ("keyframes", pa.list_(pa.int32())),  # frame indices that decoding can start from
        ("error", pa.string()),
    ]
)

# Packets handed from the probing thread at a time: one handoff per packet would cost more than the demuxing.
PROBE_BATCH = 1024
MACROBLOCK = 16
# A block edge counts as broken when it is this many times sharper than the block's inside, and
# at least EDGE_FLOOR grey levels sharper (flat blocks have tiny insides).
EDGE_RATIO = 3.0
EDGE_FLOOR = 8.0


class CorruptVideo(Exception):
    """A video that cannot be used at all; the message is the reason shown to the user."""


def frame_name(video: str, index: int, n_frames: int) -> str:
    """lightly's name of frame `index` of `video` (a posix path relative to input_dir).

    >>> frame_name("sub/my_video.mp4", 153, 1200)
    'sub/my_video-0153-mp4.png'
    """
    path = PurePosixPath(video)
    return f"{path.with_suffix('')}-{index:0{len(str(n_frames))}d}-{path.suffix.lstrip('.')}.png"


# --------------------------------------------------------------------------- probing


def probe(path: UPath, use_frame_count_metadata: bool = False, timeout: float | None = None
          ) -> tuple[list[int], list[int], Fraction]:
    """(pts of every frame in presentation order, keyframe indices, time base) of the first video stream.

    By default the packets are read (cheap: nothing is decoded) because containers' frame counts
    are often missing or wrong. With use_frame_count_metadata the header's count is trusted and
    the pts are spread evenly at the average frame rate (no keyframe information). A video that
    gives no packets for `timeout` seconds is corrupt."""
    with closing(progressing(_probe_items(path, use_frame_count_metadata), timeout)) as items:
        try:
            time_base, counted = next(items)
            if counted is not None:
                return counted, [], time_base
            timed = sorted(dict(packet for batch in items for packet in batch).items())
        except TimeoutError as error:
            raise CorruptVideo(f"probing timed out: {error} (corruptness_check.decode_timeout)") from None
    if not timed:
        raise CorruptVideo("contains no video frames")
    return [pts for pts, _ in timed], [i for i, (_, key) in enumerate(timed) if key], time_base


def _probe_items(path: UPath, use_frame_count_metadata: bool) -> Generator[tuple, None, None]:
    """What probe reads, in one thread from opening to closing: first (time base, the pts from the
    header's frame count, or None to read the packets), then batches of (pts, is keyframe), one
    batch a handoff rather than one packet."""
    with decoder_source(path) as source:
        try:
            container = av.open(source)
        except (av.FFmpegError, OSError) as error:
            raise CorruptVideo(f"cannot be opened: {getattr(error, 'strerror', None) or error}") from None
        with container:
            if not container.streams.video:
                raise CorruptVideo("has no video stream")
            stream = container.streams.video[0]
            time_base = stream.time_base or Fraction(1, 1)
            if use_frame_count_metadata and stream.frames > 0 and stream.average_rate:
                step = 1 / (stream.average_rate * time_base)
                start = stream.start_time or 0
                yield time_base, [start + round(i * step) for i in range(stream.frames)]
                return
            yield time_base, None
            batch = []
            try:
                for packet in container.demux(stream):
                    pts = packet.pts if packet.pts is not None else packet.dts
                    if packet.size and pts is not None:
                        batch.append((pts, packet.is_keyframe))
                    if len(batch) == PROBE_BATCH:
                        yield batch
                        batch = []
            except av.FFmpegError:
                pass  # unreadable past this point: the frames read so far are the video
            yield batch


def probe_row(input_dir: UPath, file: InputFile, use_frame_count_metadata: bool, timeout: float | None = None) -> dict:
    row = {"filename": file.filename, "label": file.label, "size": file.size, "version": file.version,
           "time_base": None, "pts": None, "keyframes": None, "error": None}
    try:
        pts, keyframes, time_base = probe(input_dir / file.filename, use_frame_count_metadata, timeout)
    except CorruptVideo as error:
        row["error"] = str(error)
        return row
    row.update(time_base=f"{time_base.numerator}/{time_base.denominator}", pts=pts, keyframes=keyframes)
    return row


@task(name="probe-videos", retries=2, retry_delay_seconds=1)
def probe_videos(input_dir: UPath, files: list[InputFile], use_frame_count_metadata: bool, timeout: float | None,
                 out_path: UPath) -> UPath:
    rows = [probe_row(input_dir, f, use_frame_count_metadata, timeout) for f in files]
    return write_parquet(pa.Table.from_pylist(rows, schema=VIDEO_SCHEMA), out_path)


def read_videos(paths: list[UPath]) -> pa.Table:
    return read_parquet(paths) if paths else VIDEO_SCHEMA.empty_table()


def corrupt_video_rows(videos: pa.Table) -> list[dict]:
    """Check rows (decoding.CHECK_SCHEMA) for the videos that cannot be used, named by the video."""
    return [{"filename": v["filename"], "label": v["label"], "size": v["size"], "version": v["version"],
             "content_hash": None, "width": None, "height": None, "error": v["error"]}
            for v in videos.to_pylist() if v["error"] is not None]


# --------------------------------------------------------------------------- frame ranges


@dataclass(frozen=True)
class FrameRange:
    """Frames of one video for one task: ascending indices with their pts. A decoded frame is a
    wanted one when its pts lies within half of `step` (the shortest frame interval, pts units)
    of the wanted pts, which also holds when the pts were estimated from metadata."""

    file: InputFile
    n_frames: int
    indices: tuple[int, ...]
    pts: tuple[int, ...]
    step: int

    def names(self) -> list[str]:
        return [frame_name(self.file.filename, i, self.n_frames) for i in self.indices]


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
    """Ranges of at most about `size` frames over the usable videos: every frame, or only the
    frames whose names are in `keep` (frames that passed the check, or that were selected)."""
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


def pack(ranges: list[FrameRange], size: int) -> list[list[FrameRange]]:
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


def video_shards(videos: pa.Table, shard_size: int, n_workers: int, keep: set[str] | None = None) -> list[list[FrameRange]]:
    """Shards for a mapped stage: at most shard_size frames each (fewer when that leaves a worker idle)."""
    total = len(keep) if keep is not None else sum(len(p) for p in videos.column("pts").to_pylist() if p)
    size = max(1, min(shard_size, math.ceil(total / max(n_workers, 1))))
    return pack(frame_ranges(videos, size, keep), size)


# --------------------------------------------------------------------------- decoding


def _decoded(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    """Frames in presentation order; a damaged packet loses its frames instead of ending the video."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError:  # the container is unreadable past here: drain what the decoder holds
            try:
                yield from stream.codec_context.decode(None)
            except av.FFmpegError:
                pass
            return
        try:
            frames = packet.decode()
        except av.FFmpegError:
            continue
        yield from frames


def decode_frames(path: UPath, rng: FrameRange) -> Iterator[tuple[int, av.VideoFrame | None]]:
    """Every wanted frame of `rng` once, in order: (index, frame), or (index, None) where the
    frame could not be decoded. Seeks to the keyframe at or before the range first."""
    with decoder_source(path) as source, av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: several times faster on long GOPs
        frames = _decoded(container, stream)
        if rng.indices[0] > 0:
            container.seek(rng.pts[0], stream=stream, backward=True)
            first = next(frames, None)
            if first is None or (first.pts is not None and _later(first.pts, rng.pts[0], rng.step)):
                # Some containers (MPEG-PS) seek past the target: decode from the start instead.
                container.seek(0, backward=True)
                frames = _decoded(container, stream)
            else:
                frames = itertools.chain([first], frames)
        yield from _match(frames, rng)


def _later(pts: int, target: int, step: int) -> bool:
    """Whether pts is past the frame at target (by half a frame or more)."""
    return 2 * (pts - target) >= step


def _match(frames: Iterator[av.VideoFrame], rng: FrameRange) -> Iterator[tuple[int, av.VideoFrame | None]]:
    position = 0
    for frame in frames:
        if frame.pts is None:
            continue
        while position < len(rng.pts) and _later(frame.pts, rng.pts[position], rng.step):
            yield rng.indices[position], None  # passed without being decoded
            position += 1
        if position == len(rng.pts):
            return
        if not _later(rng.pts[position], frame.pts, rng.step):
            yield rng.indices[position], frame
            position += 1
    for index in rng.indices[position:]:
        yield index, None


def read_frames(input_dir: UPath, ranges: list[FrameRange], convert: Callable[[av.VideoFrame], object],
                timeout: float | None = None) -> Iterator[tuple[str, object]]:
    """(frame name, convert(frame)) for every frame of the ranges, or (name, reason) where it failed.
    A range whose next frame takes longer than `timeout` seconds to decode is given up there."""
    for rng in ranges:
        names = rng.names()
        done = 0
        try:
            for _, frame in progressing(decode_frames(input_dir / rng.file.filename, rng), timeout):
                yield names[done], convert(frame) if frame is not None else "frame could not be decoded"
                done += 1
        except TimeoutError as error:
            for name in names[done:]:
                yield name, f"decoding timed out: {error} (corruptness_check.decode_timeout)"
        except (av.FFmpegError, OSError) as error:  # the video changed or vanished since probing
            for name in names[done:]:
                yield name, f"video unreadable: {error}"


# --------------------------------------------------------------------------- per-frame work


def corruption_score(luma: np.ndarray) -> float:
    """Fraction of 16x16 blocks whose edges are much sharper than their inside (see the module doc)."""
    h, w = (luma.shape[0] // MACROBLOCK) * MACROBLOCK, (luma.shape[1] // MACROBLOCK) * MACROBLOCK
    rows, cols = h // MACROBLOCK, w // MACROBLOCK
    if rows < 2 or cols < 2:
        return 0.0
    y = luma[:h, :w].astype(np.float32)
    dx = np.abs(np.diff(y, axis=1))  # dx[:, x] is the step between columns x and x + 1
    dy = np.abs(np.diff(y, axis=0))
    on_edge = np.arange(w - 1) % MACROBLOCK == MACROBLOCK - 1
    inside_x = np.where(on_edge[None, :], np.nan, dx)
    inside_y = np.where(on_edge[: h - 1, None], np.nan, dy)
    inside = (np.nanmean(np.pad(inside_x, ((0, 0), (0, 1)), constant_values=np.nan)
                         .reshape(rows, MACROBLOCK, cols, MACROBLOCK), axis=(1, 3))
              + np.nanmean(np.pad(inside_y, ((0, 1), (0, 0)), constant_values=np.nan)
                           .reshape(rows, MACROBLOCK, cols, MACROBLOCK), axis=(1, 3))) / 2
    vertical = dx[:, on_edge].reshape(rows, MACROBLOCK, cols - 1).mean(axis=1)  # between block columns
    horizontal = dy[on_edge[: h - 1], :].reshape(rows - 1, cols, MACROBLOCK).mean(axis=2)
    edges = np.zeros((rows, cols), np.float32)
    count = np.zeros((rows, cols), np.float32)
    for view, values in ((np.s_[:, 1:], vertical), (np.s_[:, :-1], vertical),
                         (np.s_[1:, :], horizontal), (np.s_[:-1, :], horizontal)):
        edges[view] += values
        count[view] += 1
    edges /= count
    return float((edges > np.maximum(EDGE_RATIO * inside, inside + EDGE_FLOOR)).mean())


def frame_score(frame: av.VideoFrame, luma: np.ndarray) -> float:
    return 1.0 if frame.is_corrupt else corruption_score(luma)


def _pixels(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray]:
    """(all pixels for hashing, the luma plane); 4:2:0 YUV is what nearly every video holds, so
    this is usually a copy without conversion."""
    if frame.width % 2 == 0 and frame.height % 2 == 0:
        yuv = frame.to_ndarray(format="yuv420p")
        return yuv, yuv[: frame.height]
    rgb = frame.to_ndarray(format="rgb24")
    return rgb, frame.to_ndarray(format="gray")


def check_row(file: InputFile, name: str, frame: av.VideoFrame | str, threshold: float | None) -> dict:
    """A decoding.CHECK_SCHEMA row for one frame: the hash of its decoded pixels (so identical
    frames, e.g. a frozen camera, are exact duplicates) and why it is corrupt, if it is. Without
    a threshold only frames that fail to decode are corrupt."""
    row = {"filename": name, "label": file.label, "size": file.size, "version": file.version,
           "content_hash": None, "width": None, "height": None, "error": None}
    if isinstance(frame, str):
        row["error"] = frame
        return row
    pixels, luma = _pixels(frame)
    row.update(content_hash=xxhash.xxh3_128_hexdigest(np.ascontiguousarray(pixels)),
               width=frame.width, height=frame.height)
    if threshold is not None:
        score = frame_score(frame, luma)
        if score > threshold:
            row["error"] = (f"corrupt frame: corruption score {score:.2f} > "
                            f"corruptness_check.corruption_threshold={threshold}")
    return row


def check_ranges(input_dir: UPath, ranges: list[FrameRange], threshold: float | None,
                 timeout: float | None = None) -> list[dict]:
    files = {name: rng.file for rng in ranges for name in rng.names()}
    return [check_row(files[name], name, result, threshold)
            for name, result in read_frames(input_dir, ranges, lambda frame: frame, timeout)]


def upright(frame: av.VideoFrame, pixels: np.ndarray) -> np.ndarray:
    """The frame's HWC pixels turned as its display matrix asks (phones record sideways and say
    so), as images are turned by their EXIF orientation."""
    return np.rot90(pixels, frame.rotation // 90) if frame.rotation else pixels


def frame_image(frame: av.VideoFrame) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(upright(frame, frame.to_ndarray(format="rgb24"))))


def embedder_input(frame: av.VideoFrame, input_size: int) -> np.ndarray:
    """uint8 CHW input_size x input_size RGB, resized by the decoder's scaler in the same pass as
    the colour conversion, so a full-size RGB frame is never made."""
    small = frame.reformat(width=input_size, height=input_size, format="rgb24", interpolation="BILINEAR")
    return upright(frame, small.to_ndarray()).transpose(2, 0, 1)


# --------------------------------------------------------------------------- sequences and timelines


@dataclass(frozen=True)
class FrameInfo:
    video: str
    index: int
    pts: int
    seconds: float


def frame_infos(videos: pa.Table) -> dict[str, FrameInfo]:
    """Frame name -> where the frame comes from, for every frame of the usable videos."""
    infos = {}
    for video in videos.filter(pc.is_null(videos.column("error"))).to_pylist():
        time_base = Fraction(video["time_base"])
        n = len(video["pts"])
        for index, pts in enumerate(video["pts"]):
            infos[frame_name(video["filename"], index, n)] = FrameInfo(video["filename"], index, pts,
                                                                     float(pts * time_base))
    return infos


def sequences(filenames: list[str], infos: dict[str, FrameInfo], length: int) -> list[list[int]]:
    """Row numbers of complete sequences: frames [k*length, (k+1)*length) of one video that are all
    among `filenames` (frames removed as corrupt or duplicate break their sequence)."""
    rows: dict[tuple[str, int], dict[int, int]] = {}
    for row, name in enumerate(filenames):
        info = infos.get(name)
        if info is not None:
            rows.setdefault((info.video, info.index // length), {})[info.index % length] = row
    return [[members[i] for i in range(length)] for _, members in sorted(rows.items()) if len(members) == length]


def sequence_information(selected: list[str], infos: dict[str, FrameInfo], length: int) -> list[dict]:
    """lightly's data/sequence_information.json entries for selected frames in sequence order."""
    entries = []
    for start in range(0, len(selected), length):
        frames = [infos[name] for name in selected[start : start + length]]
        entries.append({
            "video_name": frames[0].video,
            "frame_names": selected[start : start + length],
            "frame_timestamps_pts": [f.pts for f in frames],
            "frame_timestamps_sec": [f.seconds for f in frames],
            "frame_indices": [f.index for f in frames],
        })
    return entries


def video_timelines(videos: pa.Table, selected: list[str]) -> dict[str, list[float]]:
    """{video: sorted seconds of its selected frames} for every usable video, for the report."""
    infos = frame_infos(videos)
    timelines: dict[str, list[float]] = {
        name: [] for name, error in zip(videos.column("filename").to_pylist(), videos.column("error").to_pylist())
        if error is None
    }
    for name in selected:
        if name in infos:
            timelines[infos[name].video].append(infos[name].seconds)
    return {video: sorted(seconds) for video, seconds in timelines.items()}


@task(name="video-outputs")
def write_video_outputs(run_dir: UPath, videos_path: UPath, selection_path: UPath, sequence_length: int) -> dict:
    """data/sequence_information.json (sequence selection only); returns the per-video timelines
    of the selected frames for the report."""
    videos = read_videos([videos_path])
    selected = read_parquet([selection_path]).column("filename").to_pylist()
    if sequence_length > 1:
        entries = sequence_information(selected, frame_infos(videos), sequence_length)
        write_text(json.dumps(entries, indent=2, ensure_ascii=False), run_dir / "data" / "sequence_information.json")
    return video_timelines(videos, selected)


def count_samples(shard: list) -> int:
    """Samples in a shard of image files and frame ranges (for progress bars)."""
    return sum(len(item.indices) if isinstance(item, FrameRange) else 1 for item in shard)
