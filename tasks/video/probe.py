"""Probing videos: each frame's timestamp and the keyframes, read from the container's packets.

`probe` reads only the packets (nothing is decoded), so a video of any length costs little
memory; a video that cannot be used at all (unopenable, no video stream, no frames, stalled) gets
one row with the reason, which the check reports under the video's name.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from fractions import Fraction

import av
import pyarrow as pa
from prefect import task
from upath import UPath

from tasks.decoding import check_row
from tasks.listing import InputFile
from tasks.storage import decoder_source, read_parquet, write_parquet
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


class CorruptVideo(Exception):
    """A video that cannot be used at all; the message is the reason shown to the user."""


def probe(
    path: UPath, use_frame_count_metadata: bool = False, timeout: float | None = None
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
    row = {
        "filename": file.filename,
        "label": file.label,
        "size": file.size,
        "version": file.version,
        "time_base": None,
        "pts": None,
        "keyframes": None,
        "error": None,
    }
    try:
        pts, keyframes, time_base = probe(input_dir / file.filename, use_frame_count_metadata, timeout)
    except CorruptVideo as error:
        row["error"] = str(error)
        return row
    row.update(time_base=f"{time_base.numerator}/{time_base.denominator}", pts=pts, keyframes=keyframes)
    return row


@task(name="probe-videos", retries=2, retry_delay_seconds=1)
def probe_videos(
    input_dir: UPath, files: list[InputFile], use_frame_count_metadata: bool, timeout: float | None, out_path: UPath
) -> UPath:
    rows = [probe_row(input_dir, f, use_frame_count_metadata, timeout) for f in files]
    return write_parquet(pa.Table.from_pylist(rows, schema=VIDEO_SCHEMA), out_path)


def read_videos(paths: list[UPath]) -> pa.Table:
    return read_parquet(paths) if paths else VIDEO_SCHEMA.empty_table()


def corrupt_video_rows(videos: pa.Table) -> list[dict]:
    """Check rows (decoding.CHECK_SCHEMA) for the videos that cannot be used, named by the video."""
    return [
        check_row(InputFile(v["filename"], v["label"], v["size"], v["version"]), v["filename"], error=v["error"])
        for v in videos.to_pylist()
        if v["error"] is not None
    ]
