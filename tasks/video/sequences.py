"""Frames back to their videos: where each frame comes from, complete sequences for sequence
selection, lightly's data/sequence_information.json, and the report's per-video timelines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from upath import UPath

from tasks.storage import read_parquet, write_text
from tasks.video.frames import frame_name
from tasks.video.probe import read_videos


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
            infos[frame_name(video["filename"], index, n)] = FrameInfo(
                video["filename"], index, pts, float(pts * time_base)
            )
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
        entries.append(
            {
                "video_name": frames[0].video,
                "frame_names": selected[start : start + length],
                "frame_timestamps_pts": [f.pts for f in frames],
                "frame_timestamps_sec": [f.seconds for f in frames],
                "frame_indices": [f.index for f in frames],
            }
        )
    return entries


def video_timelines(videos: pa.Table, selected: list[str]) -> dict[str, list[float]]:
    """{video: sorted seconds of its selected frames} for every usable video, for the report."""
    infos = frame_infos(videos)
    timelines: dict[str, list[float]] = {
        name: []
        for name, error in zip(videos.column("filename").to_pylist(), videos.column("error").to_pylist())
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
