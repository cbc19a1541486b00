"""Stage 8 (dump_dataset=True): copy the selected images to data/sampled/, resized and re-encoded.

`output_image_size`: -1 keeps the size, x makes the shortest edge x (aspect kept), [h, w] resizes
to exactly h x w. Images are decoded with the same decoder as the check, so EXIF rotation and
colour modes come out as they were embedded. Video frames are decoded frame-accurately from their
video (seek to the keyframe before, decode forward to the frame's timestamp).
"""

from __future__ import annotations

from pathlib import PurePosixPath

from PIL import Image
from prefect import task
from upath import UPath

from tasks.decoding import CorruptImage, open_image
from tasks.sharding import Source
from tasks.storage import atomic_target
from tasks.video.frames import frame_image

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}


def target_size(size: tuple[int, int], spec: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(width, height) of a dumped image of `size` = (width, height)."""
    width, height = size
    if isinstance(spec, int):
        if spec == -1:
            return size
        scale = spec / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))
    out_h, out_w = spec
    return out_w, out_h


def dump_names(filenames: list[str], fmt: str) -> dict[str, str]:
    """Output path per input file: the extension becomes `fmt`; where two files would then collide
    (a.jpg and a.png), the later keeps its old extension in the name (a_png.<fmt>)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for filename in sorted(filenames):
        path = PurePosixPath(filename)
        name = str(path.with_suffix(f".{fmt}"))
        if name in taken:
            name = str(path.with_name(f"{path.stem}_{path.suffix.lstrip('.')}.{fmt}"))
        taken.add(name)
        names[filename] = name
    return names


def _image(data: bytes, max_pixels: int) -> Image.Image | str:
    try:
        return open_image(data, max_pixels)
    except CorruptImage as error:
        return str(error)


def save_image(image: Image.Image, target: UPath, spec: int | tuple[int, int], fmt: str) -> None:
    size = target_size(image.size, spec)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    options = {"quality": 95} if PIL_FORMATS[fmt] in {"JPEG", "WEBP"} else {}
    with atomic_target(target) as tmp:
        image.save(tmp, format=PIL_FORMATS[fmt], **options)


@task(name="dump-shard", retries=2, retry_delay_seconds=1)
def dump_shard(
    input_dir: UPath,
    sources: list[Source],
    outputs: dict[str, str],
    out_dir: UPath,
    spec: int | tuple[int, int],
    fmt: str,
    max_pixels: int,
) -> dict[str, str]:
    """Dump one shard, each sample to out_dir / outputs[its name] (see dump_names); returns
    {sample: reason} for selected samples that cannot be read now (deleted or changed since they
    were checked): the others are still dumped and the run goes on."""
    failed = {}
    for source in sources:
        for name, image in source.read(input_dir, lambda data: _image(data, max_pixels), frame_image):
            if isinstance(image, str):
                failed[name] = image
            else:
                save_image(image, out_dir / outputs[name], spec, fmt)
    return failed
