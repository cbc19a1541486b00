"""The curate flow end to end on a folder of small videos (frames as samples)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from flows.cli import main
from tests.videos import frames, garbled, truncated, write_video

SOURCE = frames(12)
WALK = frames(12, first_seed=100)


def _run(tmp_path: Path, dask_address: str, name: str, *overrides: str) -> Path:
    assert (
        main(
            [
                "run",
                f"input_dir={tmp_path / 'in'}",
                f"output_dir={tmp_path / 'out'}",
                f"run_directory={name}",
                "lightly.model.name=resnet-18",
                "lightly.collate.input_size=32",
                f"dask.address={dask_address}",
                *overrides,
            ]
        )
        == 0
    )
    return tmp_path / "out" / name


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_videos_curate_to_frames_with_corrupt_duplicates_dumps_and_sequences(tmp_path, dask_address):
    root = tmp_path / "in"
    write_video(root / "cam.mp4", SOURCE[:6] + [SOURCE[5]] * 2 + SOURCE[6:], gop=1)  # a frozen camera: 2 duplicates
    write_video(root / "sub" / "walk.avi", WALK)
    truncated(root / "cut.mp4", SOURCE)

    run = _run(tmp_path, dask_address, "frames", "stopping_condition.n_samples=0.5", "dump_dataset=True")
    info = json.loads((run / "data" / "corruptness_check_information.json").read_text())
    assert list(info["corrupt_videos"]) == ["cut.mp4"] and info["corrupt_samples"] == {}
    assert _lines(run / "filenames" / "corrupt_filenames.txt") == ["cut.mp4"]
    assert _lines(run / "filenames" / "duplicate_filenames.txt") == ["cam-06-mp4.png", "cam-07-mp4.png"]
    sampled = _lines(run / "filenames" / "sampled_filenames.txt")
    assert len(sampled) == round(0.5 * 24) and all(n.endswith(("-mp4.png", "-avi.png")) for n in sampled)
    assert {
        p.relative_to(run / "data" / "sampled").as_posix() for p in (run / "data" / "sampled").rglob("*.png")
    } == set(sampled)
    walk = sorted(n for n in sampled if n.startswith("sub/"))[0]
    dumped = np.asarray(Image.open(run / "data" / "sampled" / walk))
    assert np.abs(dumped.astype(int) - WALK[int(walk.rsplit("-", 2)[1])]).mean() < 8
    timelines = json.loads((run / "report.json").read_text())["video_timelines"]
    assert set(timelines) == {"cam.mp4", "sub/walk.avi"} and sum(map(len, timelines.values())) == len(sampled)

    run = _run(tmp_path, dask_address, "sequences", "selected_sequence_length=4", "stopping_condition.n_samples=8")
    sequences = json.loads((run / "data" / "sequence_information.json").read_text())
    assert len(sequences) == 2 and len(_lines(run / "filenames" / "sampled_filenames.txt")) == 8
    for entry in sequences:
        assert len(entry["frame_names"]) == 4 and entry["frame_indices"][0] % 4 == 0
        assert np.all(np.diff(entry["frame_indices"]) == 1) and np.all(np.diff(entry["frame_timestamps_sec"]) > 0)


def test_garbled_video_frames_are_corrupt_samples(tmp_path, dask_address):
    garbled(tmp_path / "in" / "noise.avi", frames(23), at=0.3, length=500)
    run = _run(tmp_path, dask_address, "noise", "stopping_condition.n_samples=5")
    info = json.loads((run / "data" / "corruptness_check_information.json").read_text())
    assert info["corrupt_videos"] == {} and 1 <= len(info["corrupt_samples"]) <= 8
    assert all(name.startswith("noise-") for name in info["corrupt_samples"])
