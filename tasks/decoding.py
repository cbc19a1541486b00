"""Stage 2: decode every image, check it for corruption and hash its bytes.

Every format Pillow opens is read, HEIC and the other HEIF photos through pillow-heif, whose opener
importing `tasks.image_formats` registers in this process. A file is corrupt when it cannot be fully
decoded: empty, truncated, not an image, a decompression bomb (declared size above
`corruptness_check.max_pixels`, rejected before any pixel is decoded), or content whose format does
not fit its extension (`tasks.image_formats.extension_fits`). The reason is kept for
`data/corruptness_check_information.json`. The same decoder (`open_image`) feeds the embedder,
so what passes the check is exactly what gets embedded. The decoded pixels also give each sample
the Lightly Worker's image metadata (sharpness, snr, colour means, contrast:
`tasks/image_metadata.py`). Shards may also hold video frame ranges, whose frames are checked one
by one (pixel hash and corruption score: `tasks/video/quality.py`).

    >>> files = [InputFile("objects/chelsea_00.jpg", 0, 1, "0.0")]
    >>> options = CheckOptions(full_decode=True, max_pixels=10**8, allow_extension_mismatch=False,
    ...                        corruption_threshold=0.1, decode_timeout=10.0)
    >>> check_files(UPath("examples/images"), files, options).column("error").to_pylist()
    [None]
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash
from PIL import Image, ImageFile, ImageOps
from prefect import task
from prefect.cache_policies import NO_CACHE
from upath import UPath

from tasks.image_formats import extension_fits
from tasks.image_metadata import METRICS_SCHEMA, image_metadata
from tasks.listing import InputFile
from tasks.sharding import Batch, Source
from tasks.storage import read_table, write_parquet
from tasks.timeouts import ahead, within
from tasks.video.quality import check_frame

# Pillow's own bomb check uses a fixed global limit; ours is the configurable max_pixels, checked
# from the header before decoding, so Pillow's is switched off in the processes that decode.
Image.MAX_IMAGE_PIXELS = None

# Sources a check reads ahead of making their rows.
CHECKS_AHEAD = 8

CHECK_SCHEMA = pa.schema(
    [
        ("filename", pa.string()),
        ("label", pa.int32()),
        ("size", pa.int64()),
        ("version", pa.string()),
        ("content_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
        *METRICS_SCHEMA,
    ]
)


@dataclass(frozen=True)
class CheckOptions:
    """`corruptness_check.*` and `enable_corruptness_check` (see flows/options.py)."""

    full_decode: bool
    max_pixels: int
    allow_extension_mismatch: bool
    corruption_threshold: float  # video frames only
    decode_timeout: float  # seconds per image or video frame


class CorruptImage(Exception):
    """An image that cannot be used; the message is the reason shown to the user."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without losing the picture: 16-bit and float images are
    scaled (a plain convert clips them to white) and transparent pixels are put on white."""
    if image.mode in {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}:
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            top = max(float(values.max(initial=0)), 1e-12)
        grey = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in {"RGBA", "LA", "PA", "La", "RGBa"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # a convert to its own mode copies


def decode(image: Image.Image, least_size: int | None = None) -> Image.Image:
    """The opened image's pixels, upright, in RGB. With `least_size`, the decoder may scale the
    image down while decoding (a JPEG's DCT scaling, by 1/2 to 1/8) as long as both sides stay at
    least that large: several times less work for a model input much smaller than the image."""
    # Importing weasyprint (the report) makes Pillow accept truncated files process-wide; here a
    # truncated file must stay corrupt, whatever was imported before.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if least_size is not None:
        image.draft("RGB", (least_size, least_size))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # in place: otherwise an upright image is copied
    return to_rgb(image)


def open_image(
    data: bytes,
    max_pixels: int,
    extension: str | None = None,
    timeout: float | None = None,
    least_size: int | None = None,
) -> Image.Image:
    """Decode image bytes to upright RGB; raises CorruptImage with the reason.

    `extension` (e.g. '.jpg'), when given, must match the decoded format. Decoding that takes
    longer than `timeout` seconds is given up as corrupt. The decode is full unless `least_size`
    lets the decoder scale down (see `decode`)."""
    if not data:
        raise CorruptImage("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise CorruptImage("not a recognised image format, or its header is cut short") from None
    except Exception as error:  # Pillow raises many types on broken headers
        raise CorruptImage(f"unreadable header: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise CorruptImage(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
            f"corruptness_check.max_pixels={max_pixels}"
        )
    if extension is not None and not extension_fits(image.format, extension):
        raise CorruptImage(f"wrong extension: content is {image.format}, extension is {extension}")
    try:
        return within(timeout, lambda: decode(image, least_size))
    except TimeoutError as error:
        raise CorruptImage(f"decoding timed out: {error} (corruptness_check.decode_timeout)") from None
    except Exception as error:
        raise CorruptImage(f"decoding failed: {error}") from None


def check_params(options: CheckOptions) -> tuple:
    """What the check's cache key holds besides the files: the options and the table's columns, so
    that a table cached before a column was added is never read as one that has it."""
    return options, tuple(f"{field.name}:{field.type}" for field in CHECK_SCHEMA)


def check_row(file: InputFile, name: str, **found) -> dict:
    """One CHECK_SCHEMA row: sample `name` of the input `file` (the image itself, a frame of the
    video, or the video that cannot be used) and what the check found (content_hash, width,
    height, error and the image metadata; what is missing is null)."""
    assert found.keys() <= set(CHECK_SCHEMA.names), found.keys()
    return {"filename": name, "label": file.label, "size": file.size, "version": file.version, **found}


def inspect_image(data: bytes, extension: str | None, options: CheckOptions) -> tuple[dict, Image.Image | None]:
    """What the check finds in an image's bytes (check_row's fields): their hash and, with
    full_decode, the outcome of a full decode; and the decoded image, if it was decoded."""
    found: dict = {"content_hash": xxhash.xxh3_128_hexdigest(data)}
    image = None
    if options.full_decode:
        try:
            image = open_image(data, options.max_pixels, extension, options.decode_timeout)
            found["width"], found["height"] = image.size
            found |= image_metadata(image)
        except CorruptImage as error:
            found["error"] = str(error)
    elif not data:
        found["error"] = "empty file (0 bytes)"
    return found, image


def check_image(data: bytes, extension: str | None, options: CheckOptions) -> dict:
    return inspect_image(data, extension, options)[0]


def source_extension(source: Source, options: CheckOptions) -> str | None:
    """The extension a source's image content must match, unless mismatches are allowed."""
    return None if options.allow_extension_mismatch else Path(source.origin.filename).suffix


def found_row(source: Source, name: str, found: dict | str) -> dict:
    """check_row of what the check found for sample `name`, or of the reason it could not be read."""
    return check_row(source.origin, name, **({"error": found} if isinstance(found, str) else found))


def check_files(input_dir: UPath, sources: list[Source], options: CheckOptions) -> pa.Table:
    """One CHECK_SCHEMA row per sample of the sources, in order."""
    threshold = check_threshold(options)

    def read(source: Source) -> Iterable[tuple[str, dict | str]]:
        return source.read(
            input_dir,
            functools.partial(check_image, extension=source_extension(source, options), options=options),
            functools.partial(check_frame, threshold=threshold),
            options.decode_timeout,
        )

    # One thread reads and decodes the next files while this one makes the rows (and a range's frames).
    with closing(ahead(read, sources, threads=1, most=CHECKS_AHEAD)) as read_sources:  # closed, its thread stops
        found = zip(sources, read_sources)
        return check_table([found_row(source, name, fields) for source, samples in found for name, fields in samples])


def check_threshold(options: CheckOptions) -> float | None:
    """The corruption score above which a video frame is corrupt, when the check decodes fully."""
    return options.corruption_threshold if options.full_decode else None


def check_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CHECK_SCHEMA)


def read_checks(paths: list[UPath]) -> pa.Table:
    """The check tables' rows, in order; only the check's columns, of tables that may hold more
    (a piece checked and embedded in one pass also holds its embeddings: tasks/one_pass.py)."""
    return pa.concat_tables([read_table(path, columns=CHECK_SCHEMA.names) for path in paths])


@task(name="decode-check", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def check_pieces(input_dir: UPath, pieces: Batch, options: CheckOptions, out_paths: list[UPath]) -> list[UPath]:
    """Check each piece of sources into its own Parquet file (see tasks/sharding.py)."""
    return [write_parquet(check_files(input_dir, files, options), out) for files, out in zip(pieces, out_paths)]
