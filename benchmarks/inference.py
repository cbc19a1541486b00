"""CPU inference settings of the default model, measured against each other in one run.

One single-threaded process, as each worker of the local cluster embeds: EfficientNet-Lite0 at
input_size 64 on random inputs, per setting (batch size, memory format, bf16 autocast, a traced
and frozen graph, batch norms fused into the convolutions), the best of `rounds` timings of
`batches` batches, the settings taking turns so that all meet the same load; and each setting's
largest difference to the float32 embeddings.

    uv run python -m benchmarks.inference [--rounds 5] [--batches 20]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import numpy as np
import torch

from tasks.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone, fuse_batch_norms

Forward = Callable[[torch.Tensor], torch.Tensor]


def settings(model: torch.nn.Module, example: torch.Tensor) -> dict[str, Forward]:
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fused = fuse_batch_norms(copy.deepcopy(model))
    fused_last = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        traced = torch.jit.freeze(torch.jit.trace(model, example))

    def bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    return {
        "float32": model,
        "channels_last": lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)),
        "bf16 autocast": bf16,
        "traced+frozen": traced,
        "bn fused": fused,
        "fused+ch_last": lambda x: fused_last(x.contiguous(memory_format=torch.channels_last)),
    }


def inputs(batch: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)).float().div_(255)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_backbone("efficientnet-lite0", 32, 1).eval()
    for batch in (16, 32, 64):
        example = inputs(batch, args.size, 0)
        forwards = settings(model, example)
        with torch.inference_mode():
            reference = model(example)
            errors = {name: float((f(example) - reference).abs().max()) for name, f in forwards.items()}
            best = dict.fromkeys(forwards, float("inf"))
            for _ in range(args.rounds):
                for name, forward in forwards.items():
                    start = time.perf_counter()
                    for _ in range(args.batches):
                        forward(example)
                    best[name] = min(best[name], time.perf_counter() - start)
        base = best["float32"]
        for name in forwards:
            rate = batch * args.batches / best[name]
            print(
                f"batch {batch:3d}  {name:<14} {rate:7.1f} images/s  {base / best[name]:5.2f}x float32  "
                f"max |diff| {errors[name]:.1e}"
            )


if __name__ == "__main__":
    main()
