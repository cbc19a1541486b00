"""Benchmark SimCLR training throughput: images/s and compute efficiency per backbone, input size
and device, through the real `tasks.training.train` (JPEG decoding, augmentation, two views,
forward, backward, SGD step, checkpoint).

The input is 640x480 JPEGs made on the fly, so decoding costs what a camera-sized image costs.
A case trains one epoch of `--steps` + 1 batches; the first batch (warm-up, worker start) is not
counted. Compute efficiency is compute time / total time per batch, as in the progress bar: near
1 means the model is the bottleneck, near 0 that loading and augmenting images is.

    python benchmarks/train.py                                   # CPU (and CUDA when present)
    python benchmarks/train.py --models resnet-18 --sizes 64 --steps 10 --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.models import ModelSpec  # noqa: E402
from tasks.training import Step, train  # noqa: E402
from tests.images import picture, save  # noqa: E402
from tests.options import augmentations, train_options  # noqa: E402


def make_images(root: Path, n: int) -> list[Path]:
    return [
        save(picture(seed, (640, 480)), root / f"img_{seed:04d}.jpg", format="JPEG", quality=90) for seed in range(n)
    ]


def run_case(images: list[Path], model: str, size: int, device: str, args: argparse.Namespace) -> dict:
    steps: list[Step] = []
    options = train_options(
        max_epochs=1,
        batch_size=args.batch_size,
        num_workers=args.workers,
        use_gpu=device == "cuda",
        precision=args.precision,
        augment=augmentations(input_size=size),
    )
    n = args.batch_size * (args.steps + 1)
    paths = (images * (n // len(images) + 1))[:n]
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        train(paths, ModelSpec(model, 32, None, 1), options, Path(run_dir), steps.append)
        wall = time.perf_counter() - start
    timed = steps[1:]
    seconds = sum(s.seconds for s in timed)
    return {
        "model": model,
        "input_size": size,
        "device": device,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "precision": args.precision if device == "cuda" else 32,
        "images_per_s": round(sum(s.images for s in timed) / seconds, 1),
        "compute_efficiency": round(sum(s.compute_seconds for s in timed) / seconds, 3),
        "ms_per_step": round(1000 * seconds / len(timed), 1),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", default="efficientnet-lite0,resnet-18", help="comma-separated lightly.model.name")
    parser.add_argument("--sizes", default="64,224", help="comma-separated lightly.collate.input_size")
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case")
    parser.add_argument("--workers", type=int, default=-1, help="lightly.loader.num_workers (-1: one per core)")
    parser.add_argument("--precision", type=int, default=16, choices=(16, 32), help="applies on CUDA")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        images = make_images(Path(root), min(64, args.batch_size * (args.steps + 1)))
        for device in args.devices.split(","):
            for model in args.models.split(","):
                for size in map(int, args.sizes.split(",")):
                    print(json.dumps(run_case(images, model, size, device, args)), flush=True)


if __name__ == "__main__":
    main()
