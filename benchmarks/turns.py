"""Decoding and the model on one core, taking turns or not (tasks/embedding.py: Turns).

Makes N ImageNet-size photos (benchmarks/throughput.py), then checks and embeds them in one
process pinned to one core, as a worker of the local cluster has one, with torch on one thread:
with the turns, and with the model's turn made a no-op (the decoding thread then decodes while the
model computes, and the system slices the core between them). The two take turns `rounds` times.
Prints each variant's wall and model seconds and its median images/s. Not part of the test suite.

    uv run python -m benchmarks.turns [--n 1000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.throughput import make_photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_photos(root, args.n, os.cpu_count() or 1)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # after the photos, made on all cores

        import torch
        from upath import UPath

        from tasks.backbones import load_backbone
        from tasks.embedding import Turns
        from tasks.listing import InputFile
        from tasks.one_pass import check_and_embed
        from tests.options import check_options, embed_options

        torch.set_num_threads(1)
        files = [InputFile(str(p.relative_to(root)), 0, p.stat().st_size, "0.0") for p in paths]
        model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
        taking_turns = Turns.computing
        variants = {"turns": taking_turns, "shared core": contextlib.contextmanager(lambda _: (yield))}

        def run(variant: str) -> tuple[float, float]:
            Turns.computing = variants[variant]
            start = time.perf_counter()
            model_seconds = check_and_embed(UPath(root), files, model, check_options(), embed_options())[1]
            return time.perf_counter() - start, model_seconds

        try:
            for variant in variants:  # warm-up
                run(variant)
            timings: dict[str, list[tuple[float, float]]] = {variant: [] for variant in variants}
            for _ in range(args.rounds):
                for variant in variants:
                    timings[variant].append(run(variant))
        finally:
            Turns.computing = taking_turns
    print(f"{args.n} photos 500x375, one core, {args.rounds} rounds")
    for variant, done in timings.items():
        walls, models = [w for w, _ in done], [m for _, m in done]
        print(
            f"{variant:<12} wall {min(walls):.2f}-{max(walls):.2f} s, model {min(models):.2f}-{max(models):.2f} s, "
            f"median {args.n / statistics.median(walls):.1f} images/s"
        )


if __name__ == "__main__":
    main()
