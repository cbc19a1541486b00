"""Soak: one long run over many small generated images and one long video, with the memory of
the whole run (the CLI, its Prefect server and every Dask worker) sampled over time.

    .venv/bin/python -m benchmarks.soak [--n 100000] [--video-frames 3000] [--interval 2]

Memory is flat when the peak RSS of the last quarter of the run is within 1.2x the peak of the
first quarter (which includes start-up: workers importing torch, the model loading). Prints the
figures and exits 1 when memory is not flat or the run fails. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from tests.videos import frames, write_video

FLATNESS_LIMIT = 1.2


def write_images(root: Path, n: int, per_folder: int = 1000) -> None:
    """n distinct 32x32 JPEGs, `per_folder` to a labelled subfolder: a few random tiles shifted per
    image, with the index in the corner pixel (the shifts repeat after 16,384), so making 100,000
    takes seconds rather than minutes."""
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        folder = root / f"part_{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        pixels = np.roll(tiles[i % 16], (i // 16 % 32, i // 512 % 32), axis=(0, 1))
        pixels[:4, :4] = [i % 256, i // 256 % 256, i // 65536 % 256]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        (folder / f"img_{i:06d}.jpg").write_bytes(buffer.getvalue())


ROLES = ("total", "flow", "server", "workers")


def role(member: psutil.Process, root: psutil.Process) -> str:
    """The flow's own process, its Prefect server, or a Dask worker (everything else it started)."""
    if member.pid == root.pid:
        return "flow"
    return "server" if "uvicorn" in " ".join(member.cmdline()) else "workers"


def tree_rss(root: psutil.Process) -> dict[str, int]:
    """Resident memory in bytes of a process and all its descendants, in total and by role."""
    rss = dict.fromkeys(ROLES, 0)
    for member in [root, *root.children(recursive=True)]:
        try:
            size = member.memory_info().rss
            rss[role(member, root)] += size
        except psutil.Error:  # ended between listing and reading
            continue
        rss["total"] += size
    return rss


def sample_rss(command: list[str], interval: float, log: Path) -> tuple[int, list[tuple[float, dict[str, int]]]]:
    """Run command, sampling its tree's RSS every `interval` seconds; (exit code, [(seconds, rss by role)])."""
    samples = []
    start = time.monotonic()
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        while child.poll() is None:
            samples.append((time.monotonic() - start, tree_rss(watched)))
            time.sleep(interval)
    return child.returncode, samples


def peak(samples: list[tuple[float, dict[str, int]]], name: str, start: float, stop: float) -> int:
    """Peak RSS of a role between two fractions of the run's duration."""
    end = samples[-1][0]
    return max((rss[name] for t, rss in samples if start * end <= t <= stop * end), default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="generated images")
    parser.add_argument("--video-frames", type=int, default=3000, help="frames of the one long video (25 fps)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for thresher run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_images(root / "in", args.n)
        write_video(root / "in" / "long.mp4", frames(args.video_frames), gop=25)
        print(f"generated {args.n} images and a {args.video_frames}-frame video in {time.perf_counter() - start:.0f} s")
        command = [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            f"input_dir={root / 'in'}",
            f"output_dir={root / 'out'}",
            f"shared_dir={root}",
            "run_directory=soak",
            "stopping_condition.n_samples=0.01",
            "lightly.collate.input_size=32",
            *args.overrides,
        ]
        code, samples = sample_rss(command, args.interval, root / "run.log")
        if code != 0:
            print((root / "run.log").read_text()[-3000:])
            print(f"FAILED: exit code {code}")
            return 1
        counts = json.loads((root / "out" / "soak" / "report.json").read_text())["counts"]
        duration = samples[-1][0]
        n_samples = args.n + args.video_frames
        print(
            f"run: {duration:.0f} s for {n_samples} samples ({n_samples / duration:.0f}/s), {len(samples)} RSS samples"
        )
        print(f"counts: {counts}")
        print("peak RSS (MiB) by tenth of the run:")
        for name in ROLES:
            print(
                f"  {name:<8}"
                + " ".join(f"{peak(samples, name, k / 10, (k + 1) / 10) / 2**20:6.0f}" for k in range(10))
            )
        first, last = peak(samples, "total", 0, 0.25), peak(samples, "total", 0.75, 1)
        print(
            f"peak RSS of the whole run: first quarter {first / 2**20:.0f} MiB, last quarter {last / 2**20:.0f} MiB, "
            f"ratio {last / first:.3f} (limit {FLATNESS_LIMIT})"
        )
        flat = last <= FLATNESS_LIMIT * first
        print("memory flat" if flat else "MEMORY GREW")
        return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
