from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tasks.backbones import load_backbone
from tasks.decoding import check_files
from tasks.dedup import classify
from tasks.dumping import dump_names, dump_shard
from tasks.embedding import embed_sources
from tasks.listing import InputFile, list_images
from tasks.sharding import frame_ranges, split_points, video_shards
from tasks.video.frames import frame_name, read_frames
from tasks.video.probe import VIDEO_SCHEMA, probe_row
from tasks.video.quality import corruption_score
from tasks.video.sequences import frame_infos, sequence_information, sequences, video_timelines
from tests.options import check_options, embed_options
from tests.videos import FORMATS, frames, garbled, has_encoder, truncated, write_video

SOURCE = frames(23)


def _probe(root: Path, use_frame_count_metadata: bool = False) -> pa.Table:
    files = list_images(root)
    return pa.Table.from_pylist([probe_row(root, f, use_frame_count_metadata) for f in files], schema=VIDEO_SCHEMA)


def _index(name: str) -> int:
    return int(name.rsplit("-", 2)[1])


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """One clip per available codec/container, a truncated and a garbled one, in two folders."""
    root = tmp_path_factory.mktemp("videos")
    for ext, codec in FORMATS:
        if has_encoder(codec):
            write_video(root / "clips" / f"{codec}.{ext}", SOURCE, codec=codec)
    truncated(root / "broken" / "cut.mp4", SOURCE)
    garbled(root / "broken" / "noise.avi", SOURCE, at=0.3, length=500)
    return root


def test_frame_names_follow_lightly():
    assert frame_name("my_video.mp4", 153, 200) == "my_video-153-mp4.png"
    assert frame_name("sub/my_video.mp4", 7, 1200) == "sub/my_video-0007-mp4.png"
    assert frame_name("a.b.avi", 0, 9) == "a.b-0-avi.png"


def test_listing_finds_videos_and_labels_them_by_video_index(tmp_path):
    write_video(tmp_path / "b.mpeg", SOURCE[:3], codec="mpeg1video")
    write_video(tmp_path / "sub" / "a.mp4", SOURCE[:3])
    Image.fromarray(SOURCE[0]).save(tmp_path / "photo.png")
    files = list_images(tmp_path)
    assert [(f.filename, f.label) for f in files] == [("b.mpeg", 0), ("photo.png", 0), ("sub/a.mp4", 1)]


def test_probe_counts_frames_and_reports_unopenable_videos(library):
    videos = {v["filename"]: v for v in _probe(library).to_pylist()}
    assert videos["broken/cut.mp4"]["error"].startswith("cannot be opened")
    for name, video in videos.items():
        if name != "broken/cut.mp4":
            assert video["error"] is None and len(video["pts"]) == 23, name
            assert video["keyframes"][0] == 0


def test_frame_count_metadata_matches_demuxing_where_the_container_has_it(library):
    exact = {v["filename"]: v["pts"] for v in _probe(library).to_pylist()}
    trusted = {v["filename"]: v["pts"] for v in _probe(library, use_frame_count_metadata=True).to_pylist()}
    assert trusted["clips/mpeg4.mp4"] == exact["clips/mpeg4.mp4"]


def test_ranges_start_at_keyframes_and_cover_every_frame_once():
    assert split_points(23, [0, 5, 10, 15, 20], 7) == [0, 10, 15]
    assert split_points(10, [], 4) == [0, 4, 8]
    assert split_points(10, [0], 4) == [0]


def test_every_frame_decodes_to_its_source_in_every_format_with_seeking(library):
    videos = _probe(library)
    ranges = [r for r in frame_ranges(videos, size=6) if r.file.filename.startswith("clips/")]
    assert any(r.indices[0] > 0 for r in ranges)  # ranges after the first seek
    rows = check_files(library, ranges, check_options())
    assert rows.column("error").null_count == len(rows) == 23 * len({r.file.filename for r in ranges})
    for name, pixels in read_frames(library, ranges, lambda f: f.to_ndarray(format="rgb24")):
        error = np.abs(pixels.astype(int) - SOURCE[_index(name)]).mean()
        assert error < 8, (name, error)  # neighbouring source frames differ by ~60


def test_garbled_frames_are_corrupt_and_the_rest_are_not(library):
    videos = _probe(library)
    ranges = [r for r in frame_ranges(videos, size=256) if r.file.filename == "broken/noise.avi"]
    rows = check_files(library, ranges, check_options(corruption_threshold=0.1)).to_pylist()
    corrupt = [r["filename"] for r in rows if r["error"]]
    assert 1 <= len(corrupt) <= 8 and corrupt[0] != "broken/noise-00-avi.png"
    assert all("corruption score" in r["error"] or "decoded" in r["error"] for r in rows if r["error"])


def test_corruption_score_is_low_for_clean_frames_and_high_for_block_damage():
    clean = frames(1, size=(128, 96))[0].mean(axis=2)
    assert corruption_score(clean) == 0.0
    damaged = clean.copy()
    damaged[48:, 64:] = np.roll(damaged, 40, axis=1)[48:, 64:] + 60  # blocks pasted from elsewhere
    assert corruption_score(damaged) > 0.1


def test_identical_frames_are_exact_duplicates(tmp_path):
    frozen = [SOURCE[0]] * 3 + [SOURCE[1]]
    write_video(tmp_path / "frozen.mp4", frozen, gop=1)
    videos = _probe(tmp_path)
    samples = classify(check_files(tmp_path, frame_ranges(videos, 256), check_options()), True).to_pylist()
    assert [s["status"] for s in samples] == ["ok", "duplicate", "duplicate", "ok"]
    assert samples[1]["duplicate_of"] == "frozen-0-mp4.png"


def test_dumped_frames_equal_their_source_frames(library, tmp_path):
    videos = _probe(library)
    keep = {frame_name("clips/mpeg4.avi", i, 23) for i in (3, 17)}
    [ranges] = video_shards(videos, shard_size=256, n_workers=1, keep=keep)

    def dump_frames(out_dir, spec, fmt):
        return dump_shard.fn(library, ranges, dump_names(sorted(keep), fmt), out_dir, spec, fmt, 10**6)

    assert dump_frames(tmp_path, -1, "png") == {}
    for index in (3, 17):
        dumped = np.asarray(Image.open(tmp_path / "clips" / f"mpeg4-{index:02d}-avi.png"))
        assert np.abs(dumped.astype(int) - SOURCE[index]).mean() < 8
    dump_frames(tmp_path / "small", 24, "jpg")
    assert Image.open(tmp_path / "small" / "clips" / "mpeg4-03-avi.jpg").size == (32, 24)


def test_embedding_frames_streams_them_resized(library):
    videos = _probe(library)
    [ranges] = video_shards(videos, 256, 1, keep={frame_name("clips/mpeg4.mp4", i, 23) for i in range(4)})
    model = load_backbone("resnet-18", 8, None, 1, "cpu")
    names, vectors, errors, _ = embed_sources(library, ranges, model, embed_options(input_size=32, batch_size=3))
    assert names == [frame_name("clips/mpeg4.mp4", i, 23) for i in range(4)]
    assert vectors.shape == (4, 8) and errors == [None] * 4


def test_sequences_are_whole_runs_of_consecutive_frames(library):
    videos = _probe(library)
    infos = frame_infos(videos)
    names = [frame_name("clips/mpeg4.mp4", i, 23) for i in range(23) if i != 5]
    chunks = sequences(names, infos, 4)
    assert [[_index(names[r]) for r in chunk] for chunk in chunks] == [
        [0, 1, 2, 3],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
        [16, 17, 18, 19],
    ]
    [entry] = sequence_information([names[r] for r in chunks[1]], infos, 4)
    assert entry["video_name"] == "clips/mpeg4.mp4" and entry["frame_indices"] == [8, 9, 10, 11]
    assert entry["frame_timestamps_sec"] == pytest.approx([0.32, 0.36, 0.40, 0.44])
    assert entry["frame_timestamps_pts"] == [infos[n].pts for n in entry["frame_names"]]


def test_timelines_list_selected_seconds_per_video(library):
    videos = _probe(library)
    timelines = video_timelines(videos, [frame_name("clips/mpeg4.mp4", 10, 23), frame_name("clips/mpeg4.mp4", 0, 23)])
    assert timelines["clips/mpeg4.mp4"] == pytest.approx([0.0, 0.4])
    assert "broken/cut.mp4" not in timelines and timelines["clips/mpeg4.avi"] == []


def test_a_frame_range_of_an_input_file_is_one_check_row_per_frame(tmp_path):
    if not has_encoder("libvpx"):
        pytest.skip("no VP8 encoder")
    write_video(tmp_path / "v.webm", SOURCE[:4], codec="libvpx")
    videos = _probe(tmp_path)
    image = InputFile("x.png", 0, 1, "0.0")
    Image.fromarray(SOURCE[0]).save(tmp_path / "x.png")
    rows = check_files(tmp_path, [image, *frame_ranges(videos, 256)], check_options()).column("filename").to_pylist()
    assert rows == ["x.png"] + [f"v-{i}-webm.png" for i in range(4)]
