"""Video decoding: our decode stage against a plain single-threaded PyAV loop, and peak memory
as a video grows.

    .venv/bin/python -m benchmarks.video [--frames 300] [--workers 2]

Generates a 1080p H.264 video (GOP 60, ~8 Mbit/s) with moving content. The baseline decodes it
with PyAV's default single thread and converts every frame to RGB, as a naive loader does. Our
stage cuts the video into keyframe-aligned frame ranges, decodes them in `--workers` processes
with threaded decoding, and resizes each frame for the embedder in the decoder's scaler. Memory
is the peak RSS of a fresh process streaming all frames of an N- and a 2N-frame video.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np
import pyarrow as pa

from tasks.listing import InputFile
from tasks.sharding import video_shards
from tasks.video.frames import embedder_input, read_frames
from tasks.video.probe import VIDEO_SCHEMA, probe_row


def write_1080p(path: Path, n_frames: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1080 // 8, 1920 // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        stream.bit_rate, stream.gop_size = 8_000_000, 60
        stream.options = {"preset": "veryfast", "sliced-threads": "0"}
        for i in range(n_frames):
            image = np.roll(base, (4 * i, 7 * i), axis=(0, 1))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def baseline(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(frame.to_ndarray(format="rgb24").size > 0 for frame in container.decode(video=0))


def videos_table(path: Path) -> pa.Table:
    file = InputFile(path.name, 0, path.stat().st_size, repr(path.stat().st_mtime))
    return pa.Table.from_pylist([probe_row(path.parent, file, False)], schema=VIDEO_SCHEMA)


def decode_shard(root: Path, shard: list) -> int:
    return sum(not isinstance(x, str) for _, x in read_frames(root, shard, lambda frame: embedder_input(frame, 64)))


def ours(path: Path, workers: int) -> tuple[int, float]:
    """Frames decoded and seconds, timed on warm worker processes as the flow's Dask workers are."""
    shards = video_shards(videos_table(path), shard_size=10**9, n_workers=workers)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(abs, range(workers)))  # start the workers and import this module there
        return timed(lambda: sum(pool.map(decode_shard, [path.parent] * len(shards), shards)))


def timed(fn, *args) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn(*args)
    return n, time.perf_counter() - start


def peak_rss_mib(path: Path) -> float:
    """Peak RSS of a fresh process that streams every frame of `path` through the decode stage."""
    code = (
        "import resource, sys; from pathlib import Path; from benchmarks.video import decode_shard, videos_table, "
        "video_shards; p = Path(sys.argv[1]); [decode_shard(p.parent, s) for s in "
        "video_shards(videos_table(p), 10**9, 1)]; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        video = write_1080p(Path(tmp) / "long.mp4", args.frames)
        n_base, t_base = timed(baseline, video)
        n_ours, t_ours = ours(video, args.workers)
        assert n_base == n_ours == args.frames, (n_base, n_ours)
        print(f"1080p H.264, {args.frames} frames, GOP 60:")
        print(f"  single-threaded PyAV + rgb24: {n_base / t_base:7.1f} frames/s")
        print(f"  our decode stage ({args.workers} workers): {n_ours / t_ours:7.1f} frames/s")
        print(f"  ratio: {t_base / t_ours:.2f}x")
        short = write_1080p(Path(tmp) / "half.mp4", args.frames // 2)
        small, large = peak_rss_mib(short), peak_rss_mib(video)
        print(
            f"peak RSS streaming {args.frames // 2} frames: {small:.0f} MiB; {args.frames} frames: {large:.0f} MiB; "
            f"ratio {large / small:.2f} (2x length)"
        )


if __name__ == "__main__":
    main()
