"""Hostile video inputs: a run over broken and unusual videos finishes, lists each unusable video
or frame with its reason, and uses every frame that can be decoded."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import tasks.video.frames
import tasks.video.probe
from flows.cli import main
from tasks.decoding import check_files
from tasks.listing import InputFile
from tasks.sharding import frame_ranges
from tasks.video.frames import embedder_input, frame_image, read_frames
from tasks.video.probe import VIDEO_SCHEMA, probe_row
from tests.options import check_options
from tests.videos import audio_only, frames, garbled, rotated, truncated, write_video


def video_corpus(root: Path) -> dict[str, str | None]:
    """Write the videos; expected[name] is None for a video whose every frame is usable, "frames"
    for one with some corrupt frames, else a fragment of the reason the whole video is unusable."""
    write_video(root / "good.mp4", frames(6))
    write_video(root / "variable_rate.mp4", frames(6, first_seed=10), pts=[0, 1, 2, 7, 8, 20])
    rotated(root / "rotated.mp4", frames(6, first_seed=20))
    truncated(root / "truncated_header.mp4", frames(6, first_seed=30), keep=0.02)
    write_video(root / "zero_frames.mp4", [])
    audio_only(root / "audio_only.mp4")
    garbled(root / "garbled.avi", frames(23, first_seed=40), at=0.3, length=500)
    (root / "empty.mkv").write_bytes(b"")
    return {
        "good.mp4": None,
        "variable_rate.mp4": None,
        "rotated.mp4": None,
        "truncated_header.mp4": "",
        "zero_frames.mp4": "",
        "audio_only.mp4": "has no video stream",
        "garbled.avi": "frames",
        "empty.mkv": "cannot be opened",
    }


@pytest.mark.usefixtures("prefect_server")
def test_run_over_hostile_videos(tmp_path, dask_address):
    expected = video_corpus(tmp_path / "in")
    assert (
        main(
            [
                "run",
                f"input_dir={tmp_path / 'in'}",
                f"output_dir={tmp_path / 'out'}",
                "run_directory=r",
                "lightly.model.name=resnet-18",
                "lightly.collate.input_size=32",
                f"dask.address={dask_address}",
                "stopping_condition.n_samples=0.5",
                "dask.shard_size=8",
            ]
        )
        == 0
    )
    run = tmp_path / "out" / "r"
    info = json.loads((run / "data" / "corruptness_check_information.json").read_text())
    unusable = {name for name, reason in expected.items() if reason not in (None, "frames")}
    assert set(info["corrupt_videos"]) == unusable
    for name in unusable:
        assert expected[name] in info["corrupt_videos"][name]
    assert info["corrupt_samples"] and all(name.startswith("garbled-") for name in info["corrupt_samples"])
    listed = [
        line
        for kind in ("corrupt", "duplicate", "removed", "sampled")
        for line in (run / "filenames" / f"{kind}_filenames.txt").read_text().splitlines()
    ]
    assert len(listed) == len(set(listed)) == len(unusable) + 6 * 3 + 23
    for stem in ("good", "variable_rate", "rotated"):
        assert len([n for n in listed if n.startswith(f"{stem}-")]) == 6


def test_rotation_metadata_turns_frames_upright(tmp_path):
    source = frames(3)
    rotated(tmp_path / "phone.mp4", source)
    videos = pa.Table.from_pylist(
        [probe_row(tmp_path, InputFile("phone.mp4", 0, 1, "0.0"), False)], schema=VIDEO_SCHEMA
    )
    ranges = frame_ranges(videos, size=8)
    images = [np.asarray(image) for _, image in read_frames(tmp_path, ranges, frame_image)]
    for image, expected in zip(images, source, strict=True):
        assert image.shape == (64, 48, 3)  # stored 64 wide, shown 48 wide
        assert np.abs(image.astype(int) - np.rot90(expected, -1)).mean() < 8
    upright_input = [x for _, x in read_frames(tmp_path, ranges, lambda frame: embedder_input(frame, 16))]
    assert all(x.shape == (3, 16, 16) for x in upright_input)


def _stall(monkeypatch, module, name: str, at: int, release: threading.Event) -> None:
    """module.<name>, a generator over one video, stopped before its item `at` for stuck.mp4 until
    `release` is set: a decoder stuck in C, as it looks from Python."""
    real = getattr(module, name)

    def stalling(path, *args):
        for i, item in enumerate(real(path, *args)):
            if path.name == "stuck.mp4" and i == at:
                release.wait()
            yield item

    monkeypatch.setattr(module, name, stalling)


def test_a_frame_that_never_decodes_times_out_and_the_other_frames_and_videos_go_on(tmp_path, monkeypatch):
    write_video(tmp_path / "stuck.mp4", frames(6))
    write_video(tmp_path / "good.mp4", frames(6, first_seed=10))
    videos = pa.Table.from_pylist(
        [probe_row(tmp_path, InputFile(name, 0, 1, "0.0"), False) for name in ("stuck.mp4", "good.mp4")],
        schema=VIDEO_SCHEMA,
    )
    release = threading.Event()
    _stall(monkeypatch, tasks.video.frames, "decode_frames", 2, release)
    start = time.monotonic()
    options = check_options(full_decode=False, decode_timeout=0.5)  # no corruption threshold
    rows = check_files(tmp_path, frame_ranges(videos, size=8), options).to_pylist()
    elapsed = time.monotonic() - start
    release.set()
    errors = {row["filename"]: row["error"] for row in rows}
    assert sorted(errors) == [f"{stem}-{i}-mp4.png" for stem in ("good", "stuck") for i in range(6)]
    assert [errors[f"stuck-{i}-mp4.png"] for i in range(2)] == [None, None]
    assert all("decoding timed out" in errors[f"stuck-{i}-mp4.png"] for i in range(2, 6))
    assert all(errors[f"good-{i}-mp4.png"] is None for i in range(6))
    assert elapsed < 10


def test_a_video_whose_probing_stalls_is_corrupt_and_probing_goes_on(tmp_path, monkeypatch):
    write_video(tmp_path / "stuck.mp4", frames(6))
    write_video(tmp_path / "good.mp4", frames(6, first_seed=10), pts=[0, 1, 2, 7, 8, 20])
    files = {name: InputFile(name, 0, 1, "0.0") for name in ("stuck.mp4", "good.mp4")}
    release = threading.Event()
    untimed = probe_row(tmp_path, files["good.mp4"], False)
    _stall(monkeypatch, tasks.video.probe, "_probe_items", 1, release)  # after the header
    start = time.monotonic()
    stuck, good = (probe_row(tmp_path, files[name], False, timeout=0.5) for name in ("stuck.mp4", "good.mp4"))
    elapsed = time.monotonic() - start
    release.set()
    assert "probing timed out" in stuck["error"] and stuck["pts"] is None
    assert good == untimed and good["error"] is None and len(good["pts"]) == 6
    assert elapsed < 10
