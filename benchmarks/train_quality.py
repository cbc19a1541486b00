"""Does a short SimCLR training make embeddings more useful? k-NN accuracy on a real labelled set.

The set is scikit-learn's bundled handwritten digits (8x8 greyscale scans, 10 classes), upsampled
to PNG files. The labels are never used in training: the backbone is trained with
`tasks.training.train` on the images alone, starting from lightly.seed's random initialisation,
one epoch at a time (each resumed from the previous epoch's checkpoint), and after every epoch
the images are embedded with `tasks.embedding` and a 5-nearest-neighbour classifier (cosine, the
selection's normalised space) is scored by 5-fold cross-validation. Epoch "-" is the random
initialisation itself, the baseline to beat.

    python benchmarks/train_quality.py                    # 600 digits, resnet-18, 32 px, 6 epochs
    python benchmarks/train_quality.py --n 1797 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.backbones import load_backbone  # noqa: E402
from tasks.embedding import embed_sources
from tasks.listing import InputFile  # noqa: E402
from tasks.models import ModelSpec  # noqa: E402
from tasks.training import train  # noqa: E402
from tests.options import augmentations, embed_options, train_options  # noqa: E402


def write_digits(root: Path, n: int, size: int) -> tuple[list[Path], np.ndarray]:
    digits = load_digits()
    root.mkdir(parents=True)
    order = np.random.default_rng(0).permutation(len(digits.images))[:n]
    paths = []
    for i in order:
        grey = (digits.images[i] * (255 / 16)).astype(np.uint8)
        path = root / f"digit_{i:04d}.png"
        Image.fromarray(grey, "L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(path)
        paths.append(path)
    return paths, digits.target[order]


def knn_accuracy(paths: list[Path], labels: np.ndarray, spec: ModelSpec, size: int) -> float:
    model = load_backbone(spec.name, spec.num_ftrs, spec.checkpoint, spec.seed, "cpu")
    files = [InputFile(p.name, 0, p.stat().st_size, "") for p in paths]
    _, vectors, _, _ = embed_sources(paths[0].parent, files, model, embed_options(input_size=size, batch_size=64))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return float(cross_val_score(KNeighborsClassifier(5), vectors, labels, cv=5).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=600, help="digits used (at most 1797)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--model", default="resnet-18")
    parser.add_argument("--size", type=int, default=32, help="lightly.collate.input_size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.3)
    args = parser.parse_args()
    # Digits are centred, upright and grey: flips, colour jitter and small crops would change what
    # they show, so the augmentations keep to scale, blur and position, as one would set them for
    # such data through lightly.collate.*.
    augment = augmentations(input_size=args.size, min_scale=0.5, hf_prob=0.0, cj_prob=0.0, random_gray_scale=0.0)
    options = train_options(max_epochs=1, batch_size=args.batch_size, lr=args.lr, num_workers=0, augment=augment)
    with tempfile.TemporaryDirectory() as root:
        paths, labels = write_digits(Path(root) / "digits", args.n, args.size)
        spec = ModelSpec(args.model, 32, None, 1)
        print(
            json.dumps({"epoch": "-", "knn_accuracy": round(knn_accuracy(paths, labels, spec, args.size), 4)}),
            flush=True,
        )
        for epoch in range(args.epochs):
            start = time.perf_counter()
            checkpoint = train(paths, spec, options, Path(root) / "run")
            spec = ModelSpec(args.model, 32, checkpoint, 1)
            accuracy = knn_accuracy(paths, labels, spec, args.size)
            print(
                json.dumps(
                    {
                        "epoch": epoch,
                        "knn_accuracy": round(accuracy, 4),
                        "train_s": round(time.perf_counter() - start, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
