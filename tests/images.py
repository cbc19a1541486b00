"""Real image files for tests, made with Pillow: textured photos-like images that a CNN tells
apart, plus the broken and unusual files the pipeline must handle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A smooth random colour field with stripes: distinct per seed, similar for near seeds' crops."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.3), rng.uniform(0.02, 0.3), rng.uniform(0, 6.3)
        channels.append(127 + 120 * np.sin(fx * x + fy * y + phase))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def truncated(path: Path, seed: int = 0) -> Path:
    save(picture(seed), path, format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def dataset(root: Path, per_label: int = 6) -> dict[str, list[str]]:
    """Two labelled subfolders, one exact duplicate, one truncated and one empty file.

    Returns the filenames that must end up in each category."""
    names: dict[str, list[str]] = {"good": [], "duplicate": [], "corrupt": []}
    for label, folder in enumerate(["cats", "dogs"]):
        for i in range(per_label):
            name = f"{folder}/img_{i:02d}.jpg"
            save(picture(100 * label + i), root / name, format="JPEG", quality=92)
            names["good"].append(name)
    (root / "dogs/img_00_copy.jpg").write_bytes((root / "dogs/img_00.jpg").read_bytes())
    names["duplicate"].append("dogs/img_00_copy.jpg")
    truncated(root / "cats/broken.jpg", seed=7)
    (root / "dogs/empty.png").write_bytes(b"")
    names["corrupt"] += ["cats/broken.jpg", "dogs/empty.png"]
    return names


def camera_and_phone_files(root: Path, seed: int = 0) -> Image.Image:
    """The same picture as a PNG, a camera's MPO (a second picture after it), a phone's HEIC (named
    as iPhones name it, upper case), an AVIF, and a HEIC stored on its side whose EXIF orientation
    turns it upright. Returns the picture."""
    import tasks.image_formats  # noqa: F401  (registers pillow-heif, which also saves HEIF)

    image = picture(seed, (96, 64))
    save(image, root / "photo.png")
    save(image, root / "camera.mpo", format="MPO", save_all=True, append_images=[picture(seed + 1, (96, 64))])
    save(image, root / "IMG_0001.HEIC", format="HEIF", quality=95)
    save(image, root / "photo.avif", format="AVIF", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display; pillow-heif reads it from bytes only
    on_its_side = image.transpose(Image.Transpose.ROTATE_90)
    save(on_its_side, root / "turned.heic", format="HEIF", quality=95, exif=exif.tobytes())
    return image
