"""Check stage: how long `check_files` (decode, hash, image metadata) takes per image, in one
process, on the bundled example images and on a synthetic set of 640x480 JPEGs, and what the
image metadata (tasks/image_metadata.py) adds to it.

    .venv/bin/python -m benchmarks.check [--n 200] [--repeat 15]

Prints, per set, the best of `repeat` timings of one `check_files` call over the whole set (the
best, since the work is fixed and the rest is noise from other processes), with the metadata and
without it (its functions replaced by no-ops), the two runs alternating so that both meet the same
load. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from upath import UPath

from tasks import decoding
from tasks.listing import list_images
from tests.images import picture, save
from tests.options import check_options


def best_seconds(root: Path, repeat: int) -> tuple[int, float, float]:
    """(files, best seconds with the image metadata, best seconds without)."""
    files = list_images(UPath(root))
    options = check_options()
    measured = decoding.image_metadata
    timings: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeat):
        for with_metadata in (True, False):
            if not with_metadata:
                decoding.image_metadata = lambda image: {}
            start = time.perf_counter()
            decoding.check_files(UPath(root), files, options)
            timings[with_metadata].append(time.perf_counter() - start)
            decoding.image_metadata = measured
    return len(files), min(timings[True]), min(timings[False])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200, help="synthetic 640x480 JPEGs")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.n):
            save(picture(i, (640, 480)), Path(folder) / f"img_{i:04d}.jpg", quality=90)
        for name, root in (("examples/images", Path("examples/images")), (f"{args.n} x 640x480 JPEG", Path(folder))):
            count, seconds, without = best_seconds(root, args.repeat)
            print(
                f"{name}: {count} files, {1000 * seconds / count:.2f} ms/file, without the metadata "
                f"{1000 * without / count:.2f} ms/file: x{seconds / without:.3f}"
            )


if __name__ == "__main__":
    main()
