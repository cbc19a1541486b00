import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFilter

from tasks.decoding import CHECK_SCHEMA, check_files
from tasks.dedup import classify
from tasks.image_metadata import LIGHTLY_METADATA, METRICS_SCHEMA, sample_metadata
from tasks.listing import InputFile
from tasks.sharding import frame_ranges
from tasks.video.probe import VIDEO_SCHEMA, probe_row
from tests.images import picture, save, truncated
from tests.options import check_options
from tests.videos import frames, write_video


def _checked(root: Path, names: list[str], **options) -> list[dict]:
    files = [InputFile(name, 0, (root / name).stat().st_size, "0.0") for name in names]
    return check_files(root, files, check_options(**options)).to_pylist()


def test_a_blurred_copy_is_clearly_less_sharp(tmp_path):
    original = picture(1, (192, 160))
    save(original, tmp_path / "sharp.png")
    save(original.filter(ImageFilter.GaussianBlur(2)), tmp_path / "blurred.png")
    sharp, blurred = _checked(tmp_path, ["sharp.png", "blurred.png"])
    assert blurred["sharpness"] < 0.1 * sharp["sharpness"]  # 0.04 of it


def test_flat_and_pure_colour_images(tmp_path):
    save(Image.new("RGB", (64, 48), (128, 128, 128)), tmp_path / "grey.png")
    save(Image.new("RGB", (64, 48), (255, 0, 0)), tmp_path / "red.png")
    grey, red = _checked(tmp_path, ["grey.png", "red.png"])
    assert grey["contrast"] == 0 and grey["sharpness"] == 0 and grey["snr"] == math.inf
    assert (grey["mean_red"], grey["mean_green"], grey["mean_blue"]) == (128, 128, 128)
    assert (red["mean_red"], red["mean_green"], red["mean_blue"]) == (255, 0, 0)


def test_contrast_is_the_grey_standard_deviation_over_255(tmp_path):
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, 32:] = 255  # half black, half white: grey mean and standard deviation 127.5
    save(Image.fromarray(pixels), tmp_path / "stripes.png")
    [row] = _checked(tmp_path, ["stripes.png"])
    assert row["contrast"] == pytest.approx(0.5)
    assert row["snr"] == pytest.approx(1.0)


def test_corrupt_and_undecoded_images_have_no_metadata(tmp_path):
    truncated(tmp_path / "cut.jpg")
    save(picture(2), tmp_path / "fine.png")
    cut, fine = _checked(tmp_path, ["cut.jpg", "fine.png"])
    assert cut["error"] and all(cut[name] is None for name in METRICS_SCHEMA.names)
    assert all(fine[name] is not None for name in METRICS_SCHEMA.names)
    [undecoded] = _checked(tmp_path, ["fine.png"], full_decode=False)
    assert all(undecoded[name] is None for name in METRICS_SCHEMA.names)


def test_video_frames_get_the_metadata_of_their_pictures(tmp_path):
    source = frames(3, size=(128, 96))
    write_video(tmp_path / "v.mp4", source)
    save(Image.fromarray(source[0]), tmp_path / "first.png")
    videos = pa.Table.from_pylist([probe_row(tmp_path, InputFile("v.mp4", 0, 1, "0.0"), False)], schema=VIDEO_SCHEMA)
    rows = check_files(tmp_path, frame_ranges(videos, 256), check_options()).to_pylist()
    assert len(rows) == 3 and all(row["error"] is None for row in rows)
    assert all(row[name] is not None for row in rows for name in METRICS_SCHEMA.names)
    [image] = _checked(tmp_path, ["first.png"])
    for name in ("mean_red", "mean_green", "mean_blue"):  # the codec changes colours a little
        assert rows[0][name] == pytest.approx(image[name], abs=6)
    assert rows[0]["contrast"] == pytest.approx(image["contrast"], rel=0.1)  # FFmpeg's gray8 is full range
    assert rows[0]["sharpness"] > 0


def test_samples_keep_the_metadata_and_sample_metadata_reads_it(tmp_path):
    save(picture(3), tmp_path / "a.png")
    truncated(tmp_path / "b.jpg")
    checked = check_files(
        tmp_path, [InputFile(n, 0, (tmp_path / n).stat().st_size, "0.0") for n in ("a.png", "b.jpg")], check_options()
    )
    samples = classify(checked, remove_exact_duplicates=True)
    assert samples.column("sharpness").equals(checked.column("sharpness"))
    sharpness = sample_metadata(samples, "lightly.sharpness")
    assert sharpness.dtype == np.float64 and sharpness[0] > 0 and np.isnan(sharpness[1])
    width = sample_metadata(samples, "lightly.width")
    assert width[0] == 96 and np.isnan(width[1])
    assert sample_metadata(samples, "lightly.sizeInBytes")[0] == (tmp_path / "a.png").stat().st_size
    assert set(LIGHTLY_METADATA.values()) <= set(samples.column_names)


def test_an_unknown_key_names_the_known_ones():
    samples = pa.Table.from_pylist([], schema=CHECK_SCHEMA)
    with pytest.raises(ValueError, match=r"'lightly\.blurriness'.*lightly\.sharpness, lightly\.snr"):
        sample_metadata(samples, "lightly.blurriness")
