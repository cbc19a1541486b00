"""Listing: how fast one recursive listing of an S3 bucket with many small objects runs, against
moto's S3 server on loopback; with --local, of a local folder of as many empty files.

    .venv/bin/python -m benchmarks.listing [--n 100000] [--local]

Starts moto's server in a process of its own with a bucket of n one-byte objects under nested
prefixes (part_XXX/shard_X/img_XXXXXX.jpg), then times `list_objects` alone: one paginated
listing of the whole bucket, with details. Prints the seconds and objects/s. Not part of the test
suite.

The objects are put into moto's in-memory backend directly, in the server's process, before it
listens: 100,000 take seconds that way, minutes through the S3 API (about 200 PUTs/s on two
cores); to moto the two are the same objects.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tasks.listing import InputFile, list_images
from tasks.storage import location
from tests.objectstores import S3_ENV, serve

BUCKET = "listing"


def list_objects(url: str, storage_options: dict) -> list[InputFile]:
    """The listing under measure: the pipeline's listing stage (one paginated listing, names, sizes, ETags)."""
    return list_images(location(url, {"s3": storage_options}))


def key(i: int) -> str:
    return f"part_{i // 1000:03d}/shard_{i // 100 % 10}/img_{i:06d}.jpg"


def serve_filled_bucket(port: int, n: int) -> None:
    """Runs in the server's process (`--serve PORT`): fills the bucket, then serves until killed."""
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import main as moto_server

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, S3_ENV["AWS_DEFAULT_REGION"])
    for i in range(n):
        backend.put_object(BUCKET, key(i), b"x")
    moto_server(["-H", "127.0.0.1", "-p", str(port)])


def list_local_folder(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            path = Path(tmp) / key(i)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        started, cpu = time.perf_counter(), time.process_time()
        listing = list_images(location(tmp))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert len(listing) == n, (len(listing), n)
    print(f"listed {n:,} local files in {seconds:.2f} s: {n / seconds:,.0f} files/s ({cpu:.2f} s of CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="objects in the bucket")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--local", action="store_true", help="list a local folder instead of a bucket")
    args = parser.parse_args()
    if args.serve:
        serve_filled_bucket(args.serve, args.n)
        return
    if args.local:
        list_local_folder(args.n)
        return

    os.environ.update(S3_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()

        def command(port: int) -> list[str]:
            return [sys.executable, "-m", "benchmarks.listing", "--serve", str(port), "--n", str(args.n)]

        with serve(command, Path(tmp) / "moto.log", timeout=300) as endpoint:
            print(f"moto up with {args.n:,} objects in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            started, cpu = time.perf_counter(), time.process_time()
            listing = list_objects(f"s3://{BUCKET}", {"endpoint_url": endpoint})
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert len(listing) == args.n, (len(listing), args.n)
    # moto scans the whole bucket for each page of 1,000 keys, so at large n its time dominates:
    # the CPU time of this process is the listing's own cost.
    print(
        f"listed {args.n:,} objects in {seconds:.2f} s: {args.n / seconds:,.0f} objects/s "
        f"({cpu:.2f} s of CPU in this process)"
    )


if __name__ == "__main__":
    main()
