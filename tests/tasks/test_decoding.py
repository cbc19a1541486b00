import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.decoding import CorruptImage, check_files, open_image, to_rgb
from tasks.listing import InputFile
from tests.images import camera_and_phone_files, picture, save, truncated
from tests.options import check_options


def _bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _check(tmp_path: Path, name: str, **options) -> dict:
    path = tmp_path / name
    return check_files(
        tmp_path, [InputFile(name, 0, path.stat().st_size, "0.0")], check_options(**options)
    ).to_pylist()[0]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"\x00garbage" * 50, "not a recognised image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a recognised image format"),
    ],
)
def test_broken_bytes_are_corrupt_with_reason(tmp_path, content, reason):
    (tmp_path / "x.png").write_bytes(content)
    row = _check(tmp_path, "x.png")
    assert reason in row["error"]


def test_truncated_jpeg_fails_full_decode_but_passes_without_it(tmp_path):
    truncated(tmp_path / "t.jpg")
    assert "decoding failed" in _check(tmp_path, "t.jpg")["error"]
    assert _check(tmp_path, "t.jpg", full_decode=False)["error"] is None


def test_header_only_png_is_corrupt(tmp_path):
    (tmp_path / "h.png").write_bytes(_bytes(picture(1), "PNG")[:33])  # signature + IHDR, no pixels
    assert _check(tmp_path, "h.png")["error"] == "not a recognised image format, or its header is cut short"


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    save(picture(1, (40, 30)), tmp_path / "big.png")
    row = _check(tmp_path, "big.png", max_pixels=1000)
    assert row["error"].startswith("decompression bomb: 40x30 = 1200 pixels")


def test_wrong_extension_is_corrupt_unless_allowed(tmp_path):
    (tmp_path / "really_png.jpg").write_bytes(_bytes(picture(2), "PNG"))
    assert _check(tmp_path, "really_png.jpg")["error"] == "wrong extension: content is PNG, extension is .jpg"
    row = _check(tmp_path, "really_png.jpg", allow_extension_mismatch=True)
    assert row["error"] is None and (row["width"], row["height"]) == (96, 80)


def test_equal_bytes_hash_equal_and_different_bytes_differ(tmp_path):
    data = _bytes(picture(3), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data)
    (tmp_path / "c.png").write_bytes(_bytes(picture(4), "PNG"))
    files = [InputFile(n, 0, 1, "0.0") for n in ("a.png", "b.png", "c.png")]
    hashes = check_files(tmp_path, files, check_options()).column("content_hash").to_pylist()
    assert hashes[0] == hashes[1] != hashes[2]


def test_unreadable_file_reports_reason(tmp_path):
    row = check_files(tmp_path, [InputFile("gone.jpg", 0, 1, "0.0")], check_options()).to_pylist()[0]
    assert row["error"].startswith("unreadable")


def test_exif_orientation_is_applied():
    image = picture(5, (60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = open_image(_bytes(image, "JPEG", exif=exif), max_pixels=10**8)
    assert decoded.size == (20, 60)


def test_palette_transparency_goes_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    rgb = open_image(_bytes(image, "PNG", transparency=0), max_pixels=100)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 8, dtype=np.uint16).reshape(8, 64)
    rgb = open_image(_bytes(Image.fromarray(values), "PNG"), max_pixels=10**6)
    pixels = np.asarray(rgb)[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255 and 100 < pixels.mean() < 155


def test_cmyk_and_alpha_become_rgb():
    cmyk = Image.new("CMYK", (5, 5), (0, 255, 255, 0))  # red in CMYK
    assert open_image(_bytes(cmyk, "JPEG"), max_pixels=100).getpixel((2, 2))[0] > 200
    rgba = Image.new("RGBA", (3, 3), (10, 200, 10, 255))
    assert to_rgb(rgba).getpixel((1, 1)) == (10, 200, 10)


def test_open_image_raises_corrupt_image_for_truncated(tmp_path):
    with pytest.raises(CorruptImage, match="decoding failed"):
        open_image(truncated(tmp_path / "t.jpg").read_bytes(), max_pixels=10**8)


def test_camera_and_phone_formats_pass_the_check_and_decode_upright_like_the_png(tmp_path):
    image = camera_and_phone_files(tmp_path)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["IMG_0001.HEIC", "camera.mpo", "photo.avif", "photo.png", "turned.heic"]
    files = [InputFile(name, 0, (tmp_path / name).stat().st_size, "0.0") for name in names]
    rows = check_files(tmp_path, files, check_options()).to_pylist()
    assert [(row["error"], row["width"], row["height"]) for row in rows] == [(None, 96, 64)] * 5
    reference = np.asarray(image, np.float32)
    for name in names:
        decoded = open_image((tmp_path / name).read_bytes(), max_pixels=10**8)
        assert decoded.mode == "RGB" and decoded.size == image.size, name
        # Lossy coding smooths the picture's pixel noise (sigma 8) away; a wrong picture differs by ~100.
        assert np.abs(np.asarray(decoded, np.float32) - reference).mean() < 12, name


@pytest.mark.parametrize(
    "saved_as, name, error",
    [
        ("HEIF", "phone.avif", "wrong extension: content is HEIF, extension is .avif"),
        ("AVIF", "photo.heif", None),  # an AVIF is a HEIF of AV1 pictures
        ("AVIF", "photo.hif", None),
        ("MPO", "camera.jpg", None),  # cameras' JPEGs often carry an MPO preview
        ("JPEG", "single.mpo", None),
        ("PNG", "photo.heic", "wrong extension: content is PNG, extension is .heic"),
    ],
)
def test_the_extension_check_knows_heif_avif_and_mpo(tmp_path, saved_as, name, error):
    options = {"save_all": True, "append_images": [picture(4)]} if saved_as == "MPO" else {}
    save(picture(3), tmp_path / name, format=saved_as, **options)
    assert _check(tmp_path, name)["error"] == error


def test_a_process_that_imports_only_decoding_reads_heic(tmp_path):
    """Dask workers import tasks.decoding to run its tasks, and nothing else of ours."""
    camera_and_phone_files(tmp_path)
    path = tmp_path / "turned.heic"
    code = f"from tasks.decoding import open_image; print(open_image(open({str(path)!r}, 'rb').read(), 10**8).size)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "(96, 64)", result.stdout + result.stderr
