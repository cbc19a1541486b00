"""The image formats Thresher reads: every format Pillow opens, HEIF (phones' HEIC photos) included.

Pillow reads HEIF through the pillow-heif plugin, which this module registers when it is imported
(about 40 ms, once per process). Listing and decoding import it, so the flow process and every Dask
worker that decodes (workers import tasks.decoding to run its tasks) read the same formats.

    >>> sorted({".heic", ".mpo", ".avif", ".pdf"} & readable_extensions())
    ['.avif', '.heic', '.mpo']
    >>> extension_fits("MPO", ".jpg"), extension_fits("HEIF", ".avif")
    (True, False)
"""

from __future__ import annotations

import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()

# Content formats that may rightly carry another format's extension: a camera's MPO is a JPEG with
# more pictures after the first (Pillow's JPEG opener returns it as MPO, and an MPO of one picture as
# JPEG), and an AVIF is a HEIF whose pictures are AV1.
FORMAT_ALIASES = {"MPO": {"JPEG"}, "JPEG": {"MPO"}, "AVIF": {"HEIF"}}


def readable_extensions() -> frozenset[str]:
    """The lower-cased extensions of the formats Pillow opens: those with an opener of their own, and
    those that another format's opener returns (.mpo); not the formats Pillow only writes (.pdf)."""
    extensions = Image.registered_extensions()  # loads every Pillow plugin first, once per process
    opened = set(Image.OPEN)
    return frozenset(
        extension.lower()
        for extension, image_format in extensions.items()
        if image_format in opened or any(image_format in FORMAT_ALIASES.get(other, ()) for other in opened)
    )


def extension_fits(content_format: str | None, extension: str) -> bool:
    """Whether content of `content_format` (Pillow's name, e.g. 'JPEG') may carry `extension` (e.g.
    '.jpg'); an extension that Pillow does not know is not judged."""
    expected = Image.registered_extensions().get(extension.lower())
    return expected is None or expected == content_format or expected in FORMAT_ALIASES.get(content_format or "", ())
