"""Decoding frame ranges: a video's frames as samples, streamed.

A frame is named as lightly names it, `<video path without extension>-<index>-<extension>.png`,
the index zero-padded to the number of digits of the video's frame count
(`sub/my_video-153-mp4.png`), so filename lists are stable and interchangeable with lightly's.

`decode_frames` streams one range with PyAV's threaded decoder and gives every wanted frame
exactly once, or None where it could not be decoded; callers convert each frame as it comes out.

    >>> videos = read_videos([location("probe.parquet")])
    >>> rng = frame_ranges(videos, size=256)[0]
    >>> [(index, frame is not None) for index, frame in decode_frames(location("in") / rng.file.filename, rng)][:2]
    [(0, True), (1, True)]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import av
import numpy as np
from PIL import Image
from upath import UPath

from tasks.listing import InputFile
from tasks.storage import decoder_source
from tasks.timeouts import progressing


def frame_name(video: str, index: int, n_frames: int) -> str:
    """lightly's name of frame `index` of `video` (a posix path relative to input_dir).

    >>> frame_name("sub/my_video.mp4", 153, 1200)
    'sub/my_video-0153-mp4.png'
    """
    path = PurePosixPath(video)
    return f"{path.with_suffix('')}-{index:0{len(str(n_frames))}d}-{path.suffix.lstrip('.')}.png"


@dataclass(frozen=True)
class FrameRange:
    """Frames of one video for one task: ascending indices with their pts. A decoded frame is a
    wanted one when its pts lies within half of `step` (the shortest frame interval, pts units)
    of the wanted pts, which also holds when the pts were estimated from metadata.

    A `tasks.sharding.Source`: its samples are its frames."""

    file: InputFile
    n_frames: int
    indices: tuple[int, ...]
    pts: tuple[int, ...]
    step: int

    @property
    def origin(self) -> InputFile:
        return self.file

    @property
    def label(self) -> int:
        return self.file.label

    @property
    def count(self) -> int:
        return len(self.indices)

    def names(self) -> list[str]:
        return [frame_name(self.file.filename, i, self.n_frames) for i in self.indices]

    def read(
        self,
        input_dir: UPath,
        image: Callable[[bytes], Any],
        frame: Callable[[av.VideoFrame], Any],
        timeout: float | None = None,
    ) -> Iterator[tuple[str, Any]]:
        """(frame name, frame(decoded frame)) for every frame, or (name, reason); decoded as iterated."""
        return read_frames(input_dir, [self], frame, timeout)

    def key(self, stage: str) -> FrameRange:
        return self

    def __dask_tokenize__(self) -> tuple:  # see InputFile's
        return ("FrameRange", self.file.__dask_tokenize__(), self.n_frames, self.indices, self.pts, self.step)


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


def read_frames(
    input_dir: UPath, ranges: list[FrameRange], convert: Callable[[av.VideoFrame], object], timeout: float | None = None
) -> Iterator[tuple[str, object]]:
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
