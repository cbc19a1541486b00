"""Previews of input files for the plots: `Thumbnails`, read lazily and keyed by file identity."""

from __future__ import annotations

from collections.abc import Iterable

from PIL import Image
from upath import UPath

from tasks.decoding import CorruptImage, open_image
from tasks.storage import describe, file_identity, read_bytes

THUMBNAIL_PIXELS = 160


def _thumbnail(input_dir: UPath, filename: str, max_pixels: int) -> Image.Image | None:
    """A small RGB preview, or None when the file cannot be read now (moved, a video frame, embeddings= input)."""
    try:
        image = open_image(read_bytes(input_dir / filename), max_pixels)
    except (OSError, CorruptImage):
        return None
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    return image


class Thumbnails:
    """Previews of some input files, each read when a plot first draws it. A plot's content key
    holds the files' identities (name, size, version, as the shard cache keys files), not their
    pixels, so a plot reused from the cache reads no image."""

    def __init__(
        self,
        input_dir: UPath,
        max_pixels: int,
        names: Iterable[str] = (),
        loaded: dict[str, Image.Image | None] | None = None,
    ) -> None:
        self.input_dir, self.max_pixels, self.names = input_dir, max_pixels, sorted(set(names))
        self._loaded = {} if loaded is None else loaded

    def subset(self, names: Iterable[str]) -> Thumbnails:
        """The previews of `names`, sharing the ones read already."""
        return Thumbnails(self.input_dir, self.max_pixels, names, self._loaded)

    def identity(self) -> tuple:
        return (
            describe(self.input_dir),
            self.max_pixels,
            [(name, file_identity(self.input_dir / name)) for name in self.names],
        )

    def get(self, name: str) -> Image.Image | None:
        if name not in self._loaded:
            self._loaded[name] = _thumbnail(self.input_dir, name, self.max_pixels)
        return self._loaded[name]
