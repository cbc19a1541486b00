"""Does the selection beat random? Linear-probe accuracy of each method on labelled sets made offline.

Each set's images are embedded with Thresher's default model (EfficientNet-Lite0 at 64 px, as
`thresher run` does). For each budget (a share of the set), a method selects that many samples on
the L2-normalised embeddings; a logistic regression trained on their labels is scored on all the
other samples. Random is the mean of the seeds, and so is every method that draws (coreset's
first pick, typicality's reference sample). A second table gives each selection's covering
radius (the largest distance of a sample to its nearest selected one). `--timing` times the
default against k-center at N = 10^5 and 10^6 (d = 1280, k = 0.2% of N).

The sets, four kinds, all made from what installed packages ship:
- digits: scikit-learn's 1,797 handwritten digits (8x8, 10 classes, balanced), scaled up;
- glyphs: 3,000 renders of 10 letters in matplotlib's bundled fonts, rotated, coloured and noisy,
  with long-tailed class frequencies (785 of the commonest, 61 of the rarest);
- photos: 3,000 random crops of 16 public-domain photos shipped with scikit-image (class = photo),
  long-tailed (494 to 40), brightness and contrast jittered;
- video: 40 clips panning and zooming over 10 of those photos, encoded to H.264 and decoded back:
  3,786 frames, labelled by photo, highly redundant, as camera footage is.

Besides the methods Thresher ships (typical_coreset, the default; coreset; random; the default at
other typicality strengths), the table measures the candidates studied for the default, written
here: TypiClust (k-means into k clusters, the most typical sample of each; Hacohen et al. 2022),
k-means medoids, and k-center after dropping the 10% least typical samples.

    uv run python benchmarks/selection_quality.py                    # all sets, 5 seeds
    uv run python benchmarks/selection_quality.py --sets digits --seeds 3
    uv run python benchmarks/selection_quality.py --timing --sets none
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.selection.backends import resolve_backend  # noqa: E402
from tasks.selection.methods import coreset, random_subset, select, typicality_weights  # noqa: E402
from tasks.selection.typicality import typicality  # noqa: E402

CPU = resolve_backend("cpu")
BUDGETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "brick",
    "grass",
    "gravel",
    "coins",
    "retina",
    "hubble_deep_field",
    "horse",
    "moon",
    "page",
    "text",
    "immunohistochemistry",
)


# --------------------------------------------------------------------------- the sets


def digits(rng: np.random.Generator) -> tuple[list[Image.Image], np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = [
        Image.fromarray((a / 16 * 255).astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR)
        for a in data.images
    ]
    return [im.convert("RGB") for im in images], data.target


def glyphs(rng: np.random.Generator, n: int = 3000, letters: str = "ABCDEFGHJK") -> tuple[list, np.ndarray]:
    import matplotlib

    fonts = sorted(
        str(p) for p in (Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf") if "Display" not in p.name
    )
    labels = rng.choice(len(letters), size=n, p=_long_tail(len(letters), 0.75))
    images = []
    for label in labels:
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        image = Image.new("RGB", (96, 96), background)
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(40, 80)))
        where = (48 + int(rng.integers(-12, 13)), 48 + int(rng.integers(-12, 13)))
        ImageDraw.Draw(image).text(
            where, letters[label], fill=tuple(255 - v for v in background), font=font, anchor="mm"
        )
        image = image.rotate(float(rng.uniform(-30, 30)), fillcolor=background)
        noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 25), (96, 96, 3))
        images.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return images, labels


def photos(rng: np.random.Generator, n: int = 3000) -> tuple[list, np.ndarray]:
    sources = [_photo(name) for name in PHOTOS]
    labels = rng.choice(len(sources), size=n, p=_long_tail(len(sources), 0.85))
    images = []
    for label in labels:
        crop = _crop(sources[label], rng.uniform(0.15, 0.7), rng.uniform(0, 1, 2))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        jittered = np.asarray(crop, np.float32) * rng.uniform(0.6, 1.4) + rng.uniform(-30, 30)
        images.append(Image.fromarray(np.clip(jittered, 0, 255).astype(np.uint8)))
    return images, labels


def video(rng: np.random.Generator, clips: int = 40) -> tuple[list, np.ndarray]:
    import av

    sources = [_photo(name) for name in PHOTOS[:10]]
    images, labels = [], []
    for _ in range(clips):
        label = int(rng.integers(len(sources)))
        scales, start, end = rng.uniform(0.2, 0.6, 2), rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
        path = np.linspace(0, 1, int(rng.integers(20, 150)))
        frames = [
            _crop(sources[label], scales[0] + (scales[1] - scales[0]) * t, start + (end - start) * t) for t in path
        ]
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width = stream.height = 96
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                out.mux(stream.encode(av.VideoFrame.from_image(frame)))
            out.mux(stream.encode())
        buffer.seek(0)
        with av.open(buffer) as decoded:
            clip = [frame.to_image() for frame in decoded.decode(video=0)]
        images += clip
        labels += [label] * len(clip)
    return images, np.array(labels)


def _long_tail(classes: int, ratio: float) -> np.ndarray:
    p = ratio ** np.arange(classes)
    return p / p.sum()


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _crop(image: Image.Image, scale: float, corner: np.ndarray) -> Image.Image:
    width, height = image.size
    w, h = int(width * scale), int(height * scale)
    x, y = int(corner[0] * (width - w)), int(corner[1] * (height - h))
    return image.crop((x, y, x + w, y + h)).resize((96, 96), Image.Resampling.BILINEAR)


SETS = {"digits": digits, "glyphs": glyphs, "photos": photos, "video": video}


def embed(images: list[Image.Image]) -> np.ndarray:
    """The default model's embeddings at the default input size, as `thresher run` computes them."""
    import torch

    from tasks.backbones import IMAGENET_MEAN, IMAGENET_STD, load_backbone
    from tasks.embedding import preprocess

    model = load_backbone("efficientnet-lite0", 32, None, 1, "cpu")
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for a in range(0, len(images), 64):
        batch = torch.from_numpy(np.stack([preprocess(im, 64) for im in images[a : a + 64]])).float() / 255
        with torch.inference_mode():
            out.append(model((batch - mean) / std).numpy())
    return np.concatenate(out).astype(np.float32)


def load_set(name: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    path = cache / f"{name}.npz"
    if not path.exists():
        images, labels = SETS[name](np.random.default_rng(0))
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=embed(images), y=np.asarray(labels))
    data = np.load(path)
    x = data["x"]
    return x / np.linalg.norm(x, axis=1, keepdims=True), data["y"]


# --------------------------------------------------------------------------- the methods


def _typicality_of(x: np.ndarray) -> np.ndarray:
    return typicality(CPU, x, reference=len(x))


def typiclust(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    clusters = KMeans(k, n_init=1, random_state=seed, max_iter=50).fit_predict(x)
    picks = []
    for c in np.argsort(-np.bincount(clusters, minlength=k)):
        members = np.flatnonzero(clusters == c)
        if len(members):
            local = typicality(CPU, x[members], k=min(20, len(members) - 1) or 1)
            picks.append(members[np.argmax(local)])
    return np.array(picks)


def kmeans_medoids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    centers = KMeans(k, n_init=1, random_state=seed, max_iter=50).fit(x).cluster_centers_
    return np.unique(np.argmin(((centers[:, None] - x[None]) ** 2).sum(2), axis=1))


def kcenter_without_outliers(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    t = _typicality_of(x)
    keep = np.flatnonzero(t >= np.quantile(t, 0.1))
    return keep[coreset(x[keep], k, None, seed=seed).indices]


METHODS = {
    "random": lambda x, k, s: random_subset(x, k, seed=s).indices,
    "typical_coreset": lambda x, k, s: select(x, "typical_coreset", k, None, seed=s, device="cpu").indices,
    "coreset": lambda x, k, s: coreset(x, k, None, seed=s).indices,
    "typical_0.25": lambda x, k, s: coreset(x, k, None, seed=s, weights=typicality_weights(CPU, x, s, 0.25)).indices,
    "typical_1": lambda x, k, s: coreset(x, k, None, seed=s, weights=typicality_weights(CPU, x, s, 1.0)).indices,
    "typiclust": typiclust,
    "kmeans_medoids": kmeans_medoids,
    "kcenter_no_outl": kcenter_without_outliers,
}


# --------------------------------------------------------------------------- measures


def probe_accuracy(x: np.ndarray, y: np.ndarray, picked: np.ndarray) -> float:
    """Accuracy on the unselected samples of a logistic regression trained on the selected ones."""
    from sklearn.linear_model import LogisticRegression

    rest = np.setdiff1d(np.arange(len(x)), picked)
    if len(np.unique(y[picked])) < 2:
        return float(np.mean(y[rest] == y[picked][0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(C=10.0, max_iter=300).fit(x[picked], y[picked])
    return float(model.score(x[rest], y[rest]))


def covering_radius(x: np.ndarray, picked: np.ndarray) -> float:
    sq = (x * x).sum(1)
    gaps = sq[:, None] - 2 * x @ x[picked].T + sq[picked][None]
    return float(np.sqrt(max(gaps.min(axis=1).max(), 0.0)))


def evaluate(x: np.ndarray, y: np.ndarray, methods: list[str], seeds: int) -> dict:
    table = {}
    for method in methods:
        rows = []
        for share in BUDGETS:
            k = max(2, round(share * len(x)))
            picks = [METHODS[method](x, k, seed) for seed in range(seeds)]
            accuracy = [probe_accuracy(x, y, p) for p in picks]
            rows.append((np.mean(accuracy), np.std(accuracy), np.mean([covering_radius(x, p) for p in picks])))
        table[method] = rows
    return table


def print_set(name: str, x: np.ndarray, table: dict, seconds: float) -> None:
    exact = _typicality_of(x)
    from scipy.stats import spearmanr

    default = typicality(CPU, x)
    print(
        f"\n== {name}: {len(x)} samples, {seconds:.0f} s; typicality against {min(len(x), 1000)} reference rows "
        f"vs exact neighbours: Spearman {spearmanr(exact, default).statistic:.3f}"
    )
    header = " ".join(f"{b * 100:>11.1f}%" for b in BUDGETS)
    print(f"probe accuracy, mean ± std over seeds     {header}   gain vs random: mean / min (points)")
    base = np.array([row[0] for row in table["random"]])
    for method, rows in table.items():
        means = np.array([row[0] for row in rows])
        cells = " ".join(f"{m:.3f}±{s:.3f}" for m, s, _ in rows)
        gain = means - base
        print(f"{method:>16} {cells}   {100 * gain.mean():+5.1f} / {100 * gain.min():+5.1f}")
    print(f"covering radius                  {header}")
    for method, rows in table.items():
        print(f"{method:>16} " + " ".join(f"{r:>12.3f}" for _, _, r in rows))


# --------------------------------------------------------------------------- timing


def timing(sizes: list[int], share: float, d: int = 1280) -> None:
    """Wall time of the default and of k-center for the same N, d and k, each run once."""
    print(f"\n== time, d = {d}, k = {share * 100:g}% of N (CPU)")
    for n in sizes:
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(64, d)).astype(np.float32)
        x = np.empty((n, d), np.float32)
        for a in range(0, n, 10_000):  # in chunks: no float64 copy of the whole matrix
            block = centers[rng.integers(64, size=len(x[a : a + 10_000]))]
            block += rng.standard_normal(block.shape, dtype=np.float32) * 0.5
            x[a : a + 10_000] = block / np.linalg.norm(block, axis=1, keepdims=True)
        k = round(share * n)
        start = time.perf_counter()
        select(x, "coreset", k, None, device="cpu")
        plain = time.perf_counter() - start
        start = time.perf_counter()
        typicality(CPU, x)
        weights = time.perf_counter() - start
        start = time.perf_counter()
        select(x, "typical_coreset", k, None, device="cpu")
        typical = time.perf_counter() - start
        print(
            f"N = {n:>9,}  k = {k:>5}: coreset {plain:7.1f} s, typical_coreset {typical:7.1f} s "
            f"(typicality {weights:.1f} s): ratio {typical / plain:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated, or 'none'")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("/tmp/thresher-selection-quality"),
        help="where the embedded sets are kept between runs",
    )
    parser.add_argument("--timing", action="store_true", help="also time the methods at --sizes")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--share", type=float, default=0.002, help="k as a share of N, for --timing")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    for name in [] if args.sets == "none" else args.sets.split(","):
        x, y = load_set(name, args.cache)
        start = time.perf_counter()
        # One BLAS thread: the probe's many small fits run several times faster than on contended threads.
        with threadpool_limits(1):
            table = evaluate(x, y, ["random", *[m for m in args.methods.split(",") if m != "random"]], args.seeds)
        print_set(name, x, table, time.perf_counter() - start)
    if args.timing:
        timing([int(float(s)) for s in args.sizes.split(",")], args.share)


if __name__ == "__main__":
    main()
