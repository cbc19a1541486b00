"""Check stage: how long `check_files` (decode, hash, image metadata) takes per image, in one
process, on the bundled example images and on a synthetic set of 640x480 JPEGs.

    .venv/bin/python -m benchmarks.check [--n 200] [--repeat 5]

Prints, per set, the best of `repeat` timings of one `check_files` call over the whole set (the
best, since the work is fixed and the rest is noise from other processes). Not part of the test
suite.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from upath import UPath

from tasks.decoding import check_files
from tasks.listing import list_images
from tests.images import picture, save
from tests.options import check_options


def best_seconds(root: Path, repeat: int) -> tuple[int, float]:
    files = list_images(UPath(root))
    options = check_options()
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        check_files(UPath(root), files, options)
        timings.append(time.perf_counter() - start)
    return len(files), min(timings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200, help="synthetic 640x480 JPEGs")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.n):
            save(picture(i, (640, 480)), Path(folder) / f"img_{i:04d}.jpg", quality=90)
        for name, root in (("examples/images", Path("examples/images")), (f"{args.n} x 640x480 JPEG", Path(folder))):
            count, seconds = best_seconds(root, args.repeat)
            print(f"{name}: {count} files, {seconds:.3f} s, {1000 * seconds / count:.2f} ms/file")


if __name__ == "__main__":
    main()
