"""A corpus of hostile inputs, generated: broken and unusual images, awkward names and
filesystem traps. `hostile_images` writes it and says what the pipeline must make of each file.

    >>> expected = hostile_images(tmp / "in")
    >>> expected["broken/zero.jpg"]
    'empty file'
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.images import picture, save

# expected[filename] is None for a file that must be usable, else a fragment of its corrupt reason.
Expected = dict[str, "str | None"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR chunk declaring width x height (8-bit RGB), and nothing else."""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def truncations(root: Path, seed: int = 11) -> Expected:
    """A JPEG and a PNG cut at several offsets: inside the header, inside the data, just before the end."""
    expected: Expected = {}
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
        data = save(picture(seed, (120, 90)), root / f"tmp.{ext}", format=fmt).read_bytes()
        (root / f"tmp.{ext}").unlink()
        for cut in (8, 64, len(data) // 2, len(data) - 16):
            name = f"broken/truncated_{cut}.{ext}"
            (root / name).write_bytes(data[:cut])
            expected[name] = ""  # any reason: the decoder's words differ by offset
        if fmt == "PNG":  # cut inside its trailer (IDAT checksum, IEND), it still holds every pixel: usable
            expected[f"broken/truncated_{len(data) - 16}.png"] = None
    return expected


def broken_images(root: Path) -> Expected:
    (root / "broken").mkdir(parents=True, exist_ok=True)
    expected: Expected = truncations(root)
    (root / "broken/zero.jpg").write_bytes(b"")
    expected["broken/zero.jpg"] = "empty file"
    rng = np.random.default_rng(3)
    for ext in ("jpg", "png", "webp"):
        (root / f"broken/random.{ext}").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        expected[f"broken/random.{ext}"] = "not a recognised image format"
    save(picture(4), root / "broken/png_named.jpg", format="PNG")
    expected["broken/png_named.jpg"] = "wrong extension"
    (root / "broken/header_only.png").write_bytes(png_header(64, 64))
    expected["broken/header_only.png"] = "header is cut short"
    # A decompression bomb: 10^10 pixels declared, a few bytes of compressed rows given.
    (root / "broken/bomb.png").write_bytes(
        png_header(100_000, 100_000) + png_chunk(b"IDAT", zlib.compress(bytes(4096))) + png_chunk(b"IEND", b"")
    )
    expected["broken/bomb.png"] = "decompression bomb"
    return expected


def unusual_images(root: Path) -> Expected:
    """Valid images that stress the decoder: sizes, colour modes, animation, EXIF rotation."""
    names = {
        "unusual/one_pixel.png": Image.new("RGB", (1, 1), (200, 10, 10)),
        "unusual/strip_100000x1.png": Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), 391)[:100_000][None, :]),
        "unusual/sixteen_bit.png": Image.fromarray((np.arange(64 * 48, dtype=np.uint16) * 20).reshape(48, 64)),
        "unusual/cmyk.jpg": picture(5).convert("CMYK"),
        "unusual/palette_transparent.png": picture(6).convert("P", palette=Image.Palette.ADAPTIVE),
    }
    for name, image in names.items():
        options = {"transparency": 0} if name.endswith("palette_transparent.png") else {}
        save(image, root / name, **options)
    frames = [picture(7 + i) for i in range(3)]
    for ext in ("gif", "webp"):
        save(frames[0], root / f"unusual/animated.{ext}", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    save(picture(8, (96, 64)), root / "unusual/exif_rotated.jpg", format="JPEG", exif=exif.tobytes())
    return {
        name: None for name in [*names, "unusual/animated.gif", "unusual/animated.webp", "unusual/exif_rotated.jpg"]
    }


def awkward_names(root: Path) -> Expected:
    """Valid images whose names or places are hard on tools: spaces, unicode, line breaks, leading
    dashes, a 250-byte name, a folder 40 levels deep."""
    names = [
        "names/with space.jpg",
        "names/ünïcødé 画像.jpg",
        "names/line\nbreak.jpg",
        "names/-leading-dash.jpg",
        "names/--.jpg",
        f"names/{'l' * 246}.jpg",
        "/".join(["deep", *(f"d{i}" for i in range(40)), "img.jpg"]),
    ]
    for i, name in enumerate(names):
        save(picture(20 + i), root / name, format="JPEG", quality=90)
    return dict.fromkeys(names)


def filesystem_traps(root: Path, outside: Path) -> Expected:
    """Symlink loops, symlinks out of input_dir, a dangling symlink and a FIFO with an image name.

    Only the FIFO is listed (it is a directory entry that looks like an image); symlinks that
    loop, dangle or leave input_dir are not files of the dataset and are skipped with a warning."""
    traps = root / "traps"
    traps.mkdir(parents=True, exist_ok=True)
    save(picture(40), outside / "secret.jpg", format="JPEG")
    (traps / "outside.jpg").symlink_to(outside / "secret.jpg")
    (traps / "outside_dir").symlink_to(outside, target_is_directory=True)
    (traps / "self_loop.jpg").symlink_to("self_loop.jpg")
    (traps / "loop_a.jpg").symlink_to("loop_b.jpg")
    (traps / "loop_b.jpg").symlink_to("loop_a.jpg")
    (traps / "dir_loop").symlink_to(".", target_is_directory=True)
    (traps / "dangling.jpg").symlink_to("missing.jpg")
    os.mkfifo(traps / "pipe.jpg")
    return {"traps/pipe.jpg": "not a regular file"}


def hostile_images(root: Path, outside: Path) -> Expected:
    """Write the whole image corpus under root (and a target outside it); every listed file's fate."""
    save(picture(1), root / "plain.jpg", format="JPEG")
    return {
        "plain.jpg": None,
        **broken_images(root),
        **unusual_images(root),
        **awkward_names(root),
        **filesystem_traps(root, outside),
    }
