"""What the embedding model is (ModelSpec) and how a worker runs it (EmbedOptions).

Apart from the model itself (tasks/embedding.py), so that the flow's process, which plans a run and
checks a datapool against the model's embedding size and name, does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash
from upath import UPath

from tasks.storage import read_bytes

EFFICIENTNET_DIM = 1280


@dataclass(frozen=True)
class EmbedOptions:
    """The config's keys that embedding reads, and the worker's threads (see flows/options.py)."""

    input_size: int
    batch_size: int
    num_threads: int  # decoding threads
    torch_threads: int
    precision: int
    max_pixels: int
    decode_timeout: float  # seconds per image or video frame
    full_decode: bool  # or let the decoder scale an image down towards input_size (see decoding.decode)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_ftrs: int
    checkpoint: UPath | None
    seed: int

    @property
    def dim(self) -> int:
        """Embedding size, known before any image is read (the datapool checks it up front)."""
        return EFFICIENTNET_DIM if self.name == "efficientnet-lite0" else self.num_ftrs

    def identity(self, input_size: int) -> str:
        """What determines the embeddings: the backbone, its weights and the input size."""
        if self.checkpoint:
            weights = "checkpoint-" + xxhash.xxh3_128_hexdigest(read_bytes(self.checkpoint))[:16]
        else:
            weights = "imagenet" if self.name == "efficientnet-lite0" else f"random-seed-{self.seed}"
        return f"{self.name}|{weights}|input_size={input_size}"
