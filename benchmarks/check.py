"""Check stage: how long `check_files` (decode, hash, image metadata) takes per image, in one
process, on the bundled example images and on a synthetic set of 640x480 JPEGs; what the image
metadata (tasks/image_metadata.py) adds to it; and what a thread per decode for its time limit
(`tasks.timeouts.within` outside `ahead`, as every decode ran before) would add.

    .venv/bin/python -m benchmarks.check [--n 200] [--repeat 15]

Prints, per set, the best of `repeat` timings of one `check_files` call over the whole set (the
best, since the work is fixed and the rest is noise from other processes): as it runs, without the
metadata (its functions replaced by no-ops), and with a thread per decode (the files checked one
after another in the caller's thread, each decode handed to a thread of its own). The variants
alternate so that all meet the same load. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from upath import UPath

from tasks import decoding
from tasks.listing import list_images
from tests.images import picture, save
from tests.options import check_options


@contextmanager
def replaced(name: str, stand_in: Callable) -> Iterator[None]:
    """tasks.decoding's `name` replaced by `stand_in` meanwhile."""
    measured = getattr(decoding, name)
    setattr(decoding, name, stand_in)
    try:
        yield
    finally:
        setattr(decoding, name, measured)


def one_after_another(function: Callable, items: list, threads: int, most: int) -> Iterator:
    """`tasks.timeouts.ahead` without its threads: each `within` then hands its decode to a thread
    of its own, as every decode ran before."""
    return (function(item) for item in items)


VARIANTS: dict[str, Callable[[], AbstractContextManager]] = {
    "as it runs": nullcontext,
    "without the metadata": lambda: replaced("image_metadata", lambda image: {}),
    "a thread per decode": lambda: replaced("ahead", one_after_another),
}


def best_seconds(root: Path, repeat: int) -> tuple[int, dict[str, float]]:
    """(files, each variant's best seconds)."""
    files = list_images(UPath(root))
    options = check_options()
    timings: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(repeat):
        for name, variant in VARIANTS.items():
            with variant():
                start = time.perf_counter()
                decoding.check_files(UPath(root), files, options)
                timings[name].append(time.perf_counter() - start)
    return len(files), {name: min(seconds) for name, seconds in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200, help="synthetic 640x480 JPEGs")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.n):
            save(picture(i, (640, 480)), Path(folder) / f"img_{i:04d}.jpg", quality=90)
        for name, root in (("examples/images", Path("examples/images")), (f"{args.n} x 640x480 JPEG", Path(folder))):
            count, best = best_seconds(root, args.repeat)
            now = best["as it runs"]
            print(f"{name}: {count} files, {1000 * now / count:.2f} ms/file as it runs")
            for variant, seconds in best.items():
                if variant != "as it runs":
                    print(f"  {variant}: {1000 * seconds / count:.2f} ms/file (as it runs takes x{now / seconds:.3f})")


if __name__ == "__main__":
    main()
