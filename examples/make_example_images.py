"""Regenerate examples/images/ from public-domain and CC0 photos shipped with scikit-image.

Two labelled subfolders of small JPEG crops (several crops per photo, so the set has near
duplicates for the selection to thin out), one exact duplicate and one truncated (corrupt) file.
The committed images were made by this script; it needs the dev dependencies:

    uv run python examples/make_example_images.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

OUT = Path(__file__).parent / "images"
PHOTOS = {
    "objects": ["astronaut", "chelsea", "coffee", "rocket", "camera"],
    "textures": ["brick", "grass", "gravel", "coins", "retina", "hubble_deep_field"],
}
CROPS_PER_PHOTO = 4
SIZE = 160


def crops(image: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    width, height = image.size
    out = []
    for _ in range(CROPS_PER_PHOTO):
        scale = rng.uniform(0.55, 0.9)
        w, h = int(width * scale), int(height * scale)
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = image.crop((x, y, x + w, y + h))
        crop.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS)
        out.append(crop)
    return out


def main() -> None:
    rng = np.random.default_rng(7)
    shutil.rmtree(OUT, ignore_errors=True)
    for folder, names in PHOTOS.items():
        (OUT / folder).mkdir(parents=True)
        for name in names:
            image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            for i, crop in enumerate(crops(image, rng)):
                crop.save(OUT / folder / f"{name}_{i:02d}.jpg", quality=88)
    shutil.copyfile(OUT / "objects" / "chelsea_00.jpg", OUT / "objects" / "chelsea_00_copy.jpg")
    data = (OUT / "textures" / "brick_00.jpg").read_bytes()
    (OUT / "textures" / "brick_truncated.jpg").write_bytes(data[: len(data) // 3])


if __name__ == "__main__":
    main()
