"""Stage 9: the run report: `report.json`, `report.html` (self-contained), `report.pdf` and `plots/*.png`,
with a summary published as Prefect artifacts.

The report shows what was kept, what was removed and why: job information and counts, estimated
savings, distance statistics before and after selection (against a random subset of the same
size as a baseline), distance histograms, 2-D views of the embeddings, retained images beside
their nearest removed neighbour, corrupt files and duplicate groups, and, when given, video
timelines and datapool growth. It is built in three steps that are tested on their own:
numbers (a JSON-ready dict) -> plots (PNG files drawn from the numbers and a few arrays) ->
HTML (a jinja2 template) -> PDF (weasyprint renders the same HTML). With a cache directory, the
slow results (distance numbers, 2-D projections, plots) are stored under a hash of their inputs
and reused by a later run whose inputs are the same (`ReportCache`); the UMAPs of a grown input
continue the previous report's layout, so successive reports show the data alike.

Pairwise distances are exact while the full distance matrix fits in `memory_requirement_in_GB`
and there are at most EXACT_PAIRS pairs; beyond that they are estimated from independent random
pairs (a sample of m pairs bounds the CDF error by sqrt(ln(2/0.05) / 2m) with 95% confidence,
DKW-Massart), and the report says so. Nearest-neighbour distances are exact up to NN_QUERIES
samples and estimated from that many random samples (each against the whole set) beyond.

    >>> round(pairwise_stats(np.eye(3, dtype=np.float32), memory_gb=1.0)["min"], 4)
    1.4142
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import platform
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, fields, is_dataclass
from importlib import metadata
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
import pyarrow.compute as pc
import xxhash
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from matplotlib.ticker import FuncFormatter, NullLocator
from PIL import Image, ImageDraw, ImageOps
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from upath import UPath

from tasks.caching import CODE_VERSION
from tasks.decoding import CorruptImage, open_image
from tasks.gathering import load_embeddings
from tasks.selection.tasks import selected_filenames
from tasks.storage import (
    atomic_target, describe, file_identity, is_local, location, read_bytes, read_parquet, write_text,
)

matplotlib.use("Agg")  # Dask workers have no display

SCHEMA_VERSION = 2
SAMPLED_PAIRS = 2_000_000
# Exact pairwise statistics cost O(N^2 d); past ~5e7 pairs (N ~ 1e4) they take longer than the
# report may, while 2e6 random pairs already pin the CDF to 1e-3.
EXACT_PAIRS = 50_000_000
EXACT_BLOCK_ELEMENTS = 1 << 22  # float64 distances per block of the exact computation (32 MB)
FINE_BINS = 16_384  # histogram resolution before trimming to the data's range
HISTOGRAM_BINS = 80
NN_QUERIES = 1_000
NN_BLOCK = 8_192
# Rows per block of the passes over all samples: a block's float64 temporaries stay near 100 MB at
# d = 1280, small beside the run's embeddings (500 MB at 100,000 samples).
ROW_BLOCK = 8_192
KNN_BLOCK = 1_024  # rows of the UMAP's exact kNN per distance block (20 MB at UMAP_POINTS)
SCATTER_POINTS = 20_000
UMAP_POINTS = 5_000  # UMAP on more is not feasible within the report's time budget
UMAP_NEIGHBOURS = (5, 15, 50)
UMAP_EPOCHS = 200
# A UMAP whose points were mostly in the dataset's previous layout starts from it and runs fewer
# epochs: on 2,200 clustered points after 2,000, 50 epochs kept the trustworthiness of a fresh
# 200-epoch layout (0.988) in a quarter of the time, and moved the old points 8x less.
CONTINUE_SHARE = 0.5
CONTINUE_EPOCHS = 50
LIST_LIMIT = 20  # corrupt files, duplicate groups and videos listed in the report
THUMBNAIL_PIXELS = 160
PAIR_FRAME, PAIR_GAP = 3, 16  # pixels around and between the two images of a pair
# Figure sizes in inches: the page shows half-width plots about 3.4 in wide, so 4.2 in keeps
# matplotlib's 10 pt text above 8 pt in print.
HALF_WIDTH, FULL_WIDTH, DPI = 4.2, 6.4, 110
OVERLAY_GRID = 4  # at most OVERLAY_GRID^2 thumbnails on a scatter plot
GROUPS = ("removed", "selected", "datapool")
COLOURS = {"removed": "#b0b0b0", "selected": "#e66100", "datapool": "#1f6fb4"}
ARTIFACT_PREFIX = "thresher-report"
TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class ReportSettings:
    """The configuration keys the report reads, in one place."""

    input_dir: str
    storage_options: dict
    normalize: bool
    memory_gb: float
    n_example_images: int
    max_pixels: int
    seed: int
    labeling_cost_per_image: float
    training_gpu_seconds_per_image: float
    gpu_power_watts: float
    grid_co2_kg_per_kwh: float

    @classmethod
    def from_config(cls, config: dict) -> ReportSettings:
        return cls(
            input_dir=config["input_dir"],
            storage_options=config["storage_options"],
            normalize=config["normalize_embeddings"],
            memory_gb=config["memory_requirement_in_GB"],
            n_example_images=config["n_example_images"],
            max_pixels=config["corruptness_check"]["max_pixels"],
            seed=config["lightly"]["seed"],
            **config["report"],
        )


# ----------------------------------------------------------------------------------------------
# Where the work runs: the UMAPs and plots are independent, so in a flow they run side by side on
# the Dask workers (idle by the time of the report); without a cluster, one after another here.


class InProcess(Executor):
    """Runs each call at once, in this process."""

    def submit(self, fn: Callable, /, *args: object, **kwargs: object) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:
            future.set_exception(error)
        return future


@dataclass(frozen=True)
class Plot:
    """One picture of the report: draw(*inputs, path) draws plots/<name>."""

    name: str
    draw: Callable[..., None]
    inputs: tuple


# ----------------------------------------------------------------------------------------------
# Reuse across runs

# Part of every key: results of other code are never reused. The module's own source is in it, as
# an edit to a plot changes its picture without changing the release.
CODE_IDENTITY = (CODE_VERSION, xxhash.xxh3_64_hexdigest(Path(__file__).read_bytes()),
                 *(metadata.version(name) for name in ("numpy", "scipy", "matplotlib", "umap-learn")))


def content_key(*parts: object) -> str:
    """A hash of `parts`: arrays by dtype, shape and bytes; dicts, lists, tuples and dataclasses
    item by item; previews by their files' identities; numbers, strings and None by type and repr.

    >>> content_key({"n": 1}, np.zeros(2)) == content_key({"n": 1}, np.zeros(2)) != content_key({"n": 2}, np.zeros(2))
    True
    """
    digest = xxhash.xxh3_128()

    def feed(value: object) -> None:
        if isinstance(value, np.ndarray):
            digest.update(f"array {value.dtype.str} {value.shape};".encode())
            digest.update(np.ascontiguousarray(value).data)
        elif isinstance(value, Thumbnails):
            feed(value.identity())
        elif is_dataclass(value):
            feed({field.name: getattr(value, field.name) for field in fields(value)})
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)};".encode())
            for item in value.items():
                feed(item)
        elif isinstance(value, (list, tuple)):  # alike, as a tuple comes back from JSON as a list
            digest.update(f"list {len(value)};".encode())
            if all(item is None or isinstance(item, str) for item in value):  # file names: one call, not 10^6
                digest.update(json.dumps(value, ensure_ascii=False).encode())
                return
            for item in value:
                feed(item)
        else:
            value = value.item() if isinstance(value, np.generic) else value
            assert value is None or isinstance(value, (bool, int, float, str)), f"no content key for {type(value)}"
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed((CODE_IDENTITY, parts))
    return digest.hexdigest()


@dataclass(frozen=True)
class ReportCache:
    """The report's slow results in `<cache_dir>/report/`, each named by a content key of what
    determines it: an unchanged rerun reuses the distance numbers, the 2-D projections and every
    plot, and an input that changed gets a new key and is computed. Like the shard cache
    (tasks/caching.py), a file is its own cache record and is written atomically, so a file that
    exists is complete. Without a root, everything is computed.

    It also keeps each input's latest UMAP layout (`previous_layout`), which the next report on a
    grown input continues instead of starting afresh."""

    root: UPath | None = None

    @classmethod
    def under(cls, cache_dir: UPath | None) -> ReportCache:
        """The report's cache in a run's cache directory (`cache_dir/report/`), or none without one."""
        return cls(cache_dir / "report" if cache_dir else None)

    def numbers(self, compute: Callable[[], dict], *key: object) -> dict:
        """compute(), or what it returned for an earlier call with an equal key (a JSON round trip
        keeps every number exact)."""
        if self.root is None:
            return compute()
        path = self.root / "numbers" / f"{content_key(*key)}.json"
        if path.exists():
            return json.loads(read_bytes(path))
        value = compute()
        write_text(json.dumps(value, allow_nan=False), path)
        return value

    def stored_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under `key` (a content key), or None."""
        path = self.root / "arrays" / f"{key}.npz" if self.root else None
        if path is None or not path.exists():
            return None
        with np.load(io.BytesIO(read_bytes(path))) as stored:
            return {name: stored[name] for name in stored.files}

    def previous_layout(self, name: str, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The place of each point (by point_ids) in every view of the layout stored under `name`,
        NaN for a point that was not in it; none when fewer than CONTINUE_SHARE of the points were,
        as a layout of mostly new points is better started afresh."""
        stored = self.stored_arrays(name)
        if stored is None:
            return {}
        kept = stored.pop("ids")
        order = np.argsort(kept)
        at = order[np.minimum(np.searchsorted(kept, ids, sorter=order), len(kept) - 1)]
        found = kept[at] == ids
        if found.mean() < CONTINUE_SHARE:
            return {}
        return {view: np.where(found[:, None], xy[at], np.nan).astype(np.float32) for view, xy in stored.items()}

    def store_arrays(self, key: str, value: dict[str, np.ndarray]) -> None:
        if self.root is not None:
            with atomic_target(self.root / "arrays" / f"{key}.npz") as tmp, tmp.open("wb") as file:
                np.savez(file, **value)

    def draw(self, plots: list[Plot], plots_dir: UPath, executor: Executor) -> list[Drawing]:
        """Every plot into plots_dir: a copy of the picture an earlier report drew from equal inputs,
        or started on `executor`, the plots side by side; `finish` waits for those."""
        drawing = []
        for plot in plots:
            stored = self.root / "plots" / f"{content_key(plot.draw.__name__, *plot.inputs)}.png" if self.root else None
            if stored is not None and stored.exists():
                copy(stored, plots_dir / plot.name)
            else:
                drawing.append(Drawing(executor.submit(plot.draw, *plot.inputs, plots_dir / plot.name), plot.name, stored))
        return drawing

    @staticmethod
    def finish(drawing: list[Drawing], plots_dir: UPath) -> None:
        """Wait for the plots being drawn and keep each for later reports."""
        for plot in drawing:
            plot.future.result()
            if plot.stored is not None:
                copy(plots_dir / plot.name, plot.stored)


@dataclass(frozen=True)
class Drawing:
    """A plot being drawn into plots/<name>, and where the cache keeps it (None without a cache)."""

    future: Future
    name: str
    stored: UPath | None


def copy(source: UPath, target: UPath) -> None:
    with atomic_target(target) as tmp:
        tmp.write_bytes(read_bytes(source))


# ----------------------------------------------------------------------------------------------
# Numbers


def _exact_pair_distances(vectors: np.ndarray) -> Iterator[np.ndarray]:
    """Distances of all pairs i < j, a block of rows at a time (float64 expansion, no N x N matrix)."""
    x = vectors.astype(np.float64)
    n = len(x)
    sq = np.einsum("ij,ij->i", x, x)
    rows = max(1, min(n, EXACT_BLOCK_ELEMENTS // n))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        d2 = sq[start:stop, None] + sq[None, start:] - 2.0 * x[start:stop] @ x[start:].T
        upper = np.triu_indices(stop - start, k=1)
        yield np.sqrt(np.maximum(d2[:, : stop - start][upper], 0.0))
        yield np.sqrt(np.maximum(d2[:, stop - start :], 0.0)).ravel()


def _sampled_pair_distances(vectors: np.ndarray, pairs: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(vectors)
    i = rng.integers(0, n, size=pairs)
    j = rng.integers(0, n - 1, size=pairs)
    j += j >= i  # uniform over j != i
    for start in range(0, pairs, ROW_BLOCK):
        a, b = i[start : start + ROW_BLOCK], j[start : start + ROW_BLOCK]
        yield np.linalg.norm(vectors[a] - vectors[b], axis=1).astype(np.float64)  # a direct difference is exact near 0


def _distance_bound(vectors: np.ndarray) -> float:
    """An upper bound of every pairwise distance (triangle inequality through the mean), so the
    histogram's bins are fixed before the single pass over the pairs."""
    centre = vectors.mean(axis=0, dtype=np.float64)
    radius = max(float(np.linalg.norm(vectors[start : start + ROW_BLOCK] - centre, axis=1).max())
                 for start in range(0, len(vectors), ROW_BLOCK))
    return 2.0 * radius if radius > 0 else 1.0


def histogram(fine: np.ndarray, upper: float, bins: int = HISTOGRAM_BINS) -> dict:
    """Trim fine counts over [0, upper) to their non-empty range and merge them into <= `bins` bins."""
    filled = np.flatnonzero(fine)
    low, high = int(filled[0]), int(filled[-1]) + 1
    factor = math.ceil((high - low) / bins)
    merged = np.pad(fine[low:high], (0, -(high - low) % factor)).reshape(-1, factor).sum(axis=1)
    width = upper / len(fine)
    edges = (low + factor * np.arange(len(merged) + 1)) * width
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in merged]}


def _dkw_error(pairs: int) -> float:
    """Half-width of the 95% confidence band of an empirical CDF of `pairs` samples (DKW-Massart)."""
    return math.sqrt(math.log(2 / 0.05) / (2 * pairs))


def pairwise_stats(vectors: np.ndarray, memory_gb: float, seed: int = 0) -> dict | None:
    """min / mean / max pairwise distance and their histogram: exact when an N x N float32 matrix
    fits in memory_gb and there are at most EXACT_PAIRS pairs, else from SAMPLED_PAIRS random pairs."""
    n = len(vectors)
    if n < 2:
        return None
    total_pairs = n * (n - 1) // 2
    exact = n * n * 4 <= memory_gb * 1e9 and total_pairs <= EXACT_PAIRS
    pairs = total_pairs if exact else min(SAMPLED_PAIRS, total_pairs)
    chunks = _exact_pair_distances(vectors) if exact else _sampled_pair_distances(vectors, pairs, seed)
    upper = _distance_bound(vectors)
    fine = np.zeros(FINE_BINS, np.int64)
    low, high, total = math.inf, -math.inf, 0.0
    for d in chunks:
        if not d.size:
            continue
        low, high, total = min(low, float(d.min())), max(high, float(d.max())), total + float(d.sum())
        fine += np.bincount(np.minimum((d * (FINE_BINS / upper)).astype(np.int64), FINE_BINS - 1), minlength=FINE_BINS)
    return {
        "min": float(low), "mean": total / pairs, "max": float(high), "n_pairs": int(pairs), "exact": exact,
        "cdf_error_95": None if exact else round(_dkw_error(pairs), 6),
        "histogram": histogram(fine, upper, min(HISTOGRAM_BINS, max(10, round(2 * math.sqrt(pairs))))),
    }


def nearest_neighbours(vectors: np.ndarray, query_rows: np.ndarray, pool_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the nearest row of the sorted `pool_rows` other than itself, and its distance.

    The search ranks a pool block at a time by |p|^2 - 2 q.p (|q - p|^2 less the query's constant
    |q|^2) in float32; the winner's distance is then recomputed from the difference, since the
    expansion errs most near zero (duplicates)."""
    assert np.all(np.diff(pool_rows) > 0), "pool rows must be sorted and unique"
    queries = vectors[query_rows]
    best = np.full(len(queries), np.inf, np.float32)
    best_row = np.full(len(queries), -1, np.int64)
    everyone = np.arange(len(queries))
    for start in range(0, len(pool_rows), NN_BLOCK):
        rows = pool_rows[start : start + NN_BLOCK]
        pool = vectors[rows]
        score = queries @ pool.T
        score *= -2.0
        score += np.einsum("ij,ij->i", pool, pool)[None, :]
        at = np.minimum(np.searchsorted(rows, query_rows), len(rows) - 1)
        itself = rows[at] == query_rows
        score[everyone[itself], at[itself]] = np.inf
        column = score.argmin(axis=1)
        value = score[everyone, column]
        better = value < best
        best[better], best_row[better] = value[better], rows[column[better]]
    assert np.all(best_row >= 0), "every query needs a pool row other than itself"
    distances = np.linalg.norm(queries.astype(np.float64) - vectors[best_row], axis=1)
    return best_row, distances


def _queries(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= NN_QUERIES else np.sort(rng.choice(rows, NN_QUERIES, replace=False))


def nn_stats(vectors: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> dict | None:
    """Distribution of the distance from a sample to its nearest other sample within `rows`."""
    if len(rows) < 2:
        return None
    queries = _queries(rows, rng)
    _, d = nearest_neighbours(vectors, queries, rows)
    counts, edges = np.histogram(d, bins=min(40, max(5, len(d) // 10)))
    return {
        "min": float(d.min()), "median": float(np.median(d)), "mean": float(d.mean()), "max": float(d.max()),
        "n_queries": int(len(queries)), "exact": len(queries) == len(rows),
        "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]},
    }


def distance_statistics(vectors: np.ndarray, selected_rows: np.ndarray, memory_gb: float, seed: int) -> dict:
    """Pairwise and nearest-neighbour statistics of all samples, the selection and a random subset
    of the selection's size (what selection by chance would give)."""
    rng = np.random.default_rng(seed)
    everyone = np.arange(len(vectors))
    baseline = np.sort(rng.choice(len(vectors), len(selected_rows), replace=False))
    sets = {"before": everyone, "after": selected_rows, "random": baseline}
    return {
        name: {
            "n_samples": int(len(rows)),
            "pairwise": pairwise_stats(vectors if rows is everyone else vectors[rows], memory_gb, seed),
            "nearest_neighbour": nn_stats(vectors, rows, rng),
        }
        for name, rows in sets.items()
    }


def example_pairs(
    vectors: np.ndarray, filenames: list[str], selected_rows: np.ndarray, removed_rows: np.ndarray, n: int, seed: int,
) -> list[dict]:
    """`n` retained samples beside their nearest removed one, spread evenly from the closest pair
    to the farthest, so both ends of the decision are visible."""
    if n == 0 or not len(selected_rows) or not len(removed_rows):
        return []
    queries = _queries(selected_rows, np.random.default_rng(seed))
    nearest, distances = nearest_neighbours(vectors, queries, removed_rows)
    order = np.argsort(distances, kind="stable")
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))]
    return [
        {"retained": filenames[queries[i]], "removed": filenames[nearest[i]], "distance": float(distances[i])}
        for i in picks
    ]


def file_lists(samples_path: UPath) -> dict:
    """The first corrupt files with their reasons and the largest exact-duplicate groups."""
    samples = read_parquet([samples_path])
    status = samples.column("status")
    corrupt = samples.filter(pc.equal(status, "corrupt"))
    duplicates = samples.filter(pc.equal(status, "duplicate"))
    groups: dict[str, list[str]] = {}
    for name, kept in zip(duplicates.column("filename").to_pylist(), duplicates.column("duplicate_of").to_pylist()):
        groups.setdefault(kept, []).append(name)
    ranked = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return {
        "n_samples": len(samples),
        "corrupt": [{"filename": f, "reason": r} for f, r in zip(corrupt.column("filename").to_pylist()[:LIST_LIMIT],
                                                                   corrupt.column("reason").to_pylist()[:LIST_LIMIT])],
        "n_corrupt": len(corrupt),
        "duplicate_groups": [{"kept": kept, "duplicates": names, "n_files": len(names) + 1}
                             for kept, names in ranked[:LIST_LIMIT]],
        "n_duplicate_groups": len(groups),
    }


def savings(counts: dict, settings: ReportSettings) -> dict:
    """What labelling and training the removed samples would have cost; corrupt files could not be
    labelled anyway, so they do not count."""
    not_labelled = counts["n_removed"] + counts["n_duplicate"]
    gpu_hours = not_labelled * settings.training_gpu_seconds_per_image / 3600
    energy_kwh = gpu_hours * settings.gpu_power_watts / 1000
    usable = not_labelled + counts["n_sampled"]
    return {
        "n_images_not_labelled": not_labelled,
        "dataset_reduction": round(not_labelled / usable, 4) if usable else 0.0,
        "labeling_cost_per_image_usd": settings.labeling_cost_per_image,
        "labeling_cost_saved_usd": round(not_labelled * settings.labeling_cost_per_image, 2),
        "labeling_cost_selected_usd": round(counts["n_sampled"] * settings.labeling_cost_per_image, 2),
        "training_gpu_seconds_per_image": settings.training_gpu_seconds_per_image,
        "training_gpu_hours_saved": round(gpu_hours, 3),
        "gpu_power_watts": settings.gpu_power_watts,
        "energy_saved_kwh": round(energy_kwh, 3),
        "grid_co2_kg_per_kwh": settings.grid_co2_kg_per_kwh,
        "co2_saved_kg": round(energy_kwh * settings.grid_co2_kg_per_kwh, 3),
    }


def stage_table(stages: dict) -> list[dict]:
    return [{"stage": name, **timing} for name, timing in stages.items()]


def machine() -> dict:
    # Imported here: the report's UMAPs and plots run on workers that need not load torch for them.
    import torch

    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {name: metadata.version(name) for name in ("thresher", "torch", "prefect", "dask")},
    }


def _cpu_model() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------
# 2-D views of the embeddings


@dataclass
class Scatter:
    """What the scatter plots show of their points (a uniform sample of this run's samples and the
    datapool's) beside the points' 2-D positions."""

    groups: np.ndarray  # index into GROUPS
    names: list[str | None]  # file of a point of this run, None for datapool points
    n_total: int


def scatter_points(vectors: np.ndarray, datapool: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most SCATTER_POINTS points in random order (so any prefix is a uniform sample too): their
    rows of [vectors; datapool], and their embeddings."""
    pool = datapool if datapool is not None else np.empty((0, vectors.shape[1]), np.float32)
    n_total = len(vectors) + len(pool)
    rows = np.random.default_rng(seed).permutation(n_total)[:SCATTER_POINTS]
    # Rows of [vectors; pool], this run's first as drawn, then the pool's, then shuffled again.
    rows = np.concatenate([rows[rows < len(vectors)], rows[rows >= len(vectors)]])
    rows = rows[np.random.default_rng(seed + 1).permutation(len(rows))]
    ours = rows < len(vectors)
    points = np.empty((len(rows), vectors.shape[1]), np.float32)  # filled in place: one copy of the points
    points[ours] = vectors[rows[ours]]
    points[~ours] = pool[rows[~ours] - len(vectors)]
    return rows, points


def pca_2d(points: np.ndarray) -> np.ndarray:
    """The points on their first two principal axes, each axis pointing towards its largest loading.

    ARPACK finds just the two leading singular vectors, as exactly as a full eigendecomposition of
    the d x d covariance but without its O(d^3) cost (seconds at d = 1280)."""
    from scipy.sparse.linalg import svds  # imported here, like umap: only a report with points needs it

    centred = np.subtract(points, points.mean(axis=0, dtype=np.float64), dtype=np.float64)  # no float64 copy first
    if not centred.any():  # one distinct point: no axes (and ARPACK cannot start)
        return np.zeros((len(points), 2), np.float32)
    if min(centred.shape) > 2:
        _, values, axes = svds(centred, k=2, random_state=0)
        axes = axes[np.argsort(values)[::-1]]
    else:  # ARPACK needs more rows and columns than axes
        axes = np.linalg.svd(centred, full_matrices=False)[2][:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    return (centred @ axes.T).astype(np.float32)


def _knn(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours (self first), from distances a block of rows at a time: UMAP's
    own search on < 4096 points calls a Python metric per pair, and above that compiles
    pynndescent, both far slower than this on <= UMAP_POINTS points."""
    x = points.astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x)
    index = np.empty((len(x), k), np.int64)
    distances = np.empty((len(x), k), np.float32)
    for start in range(0, len(x), KNN_BLOCK):
        block = slice(start, min(len(x), start + KNN_BLOCK))
        d2 = x[block] @ x.T
        d2 *= -2.0
        d2 += sq[block, None]
        d2 += sq[None, :]
        np.maximum(d2, 0.0, out=d2)
        d2[np.arange(len(d2)), np.arange(block.start, block.stop)] = -1.0  # self first, even beside a duplicate
        near = np.argpartition(d2, k - 1, axis=1)[:, :k]
        near = np.take_along_axis(near, np.argsort(np.take_along_axis(d2, near, 1), axis=1), 1)
        index[block] = near
        distances[block] = np.sqrt(np.maximum(np.take_along_axis(d2, near, 1), 0.0))
    return index, distances


def umap_2d(points: np.ndarray, k: int, seed: int, pca: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
    """UMAP of the points from their PCA (`pca_2d(points)`), which every k shares, or continuing
    `previous`, an earlier layout's place of each point (NaN for a point new to it).

    PCA initialisation: the spectral one solves an eigenproblem per connected component, seconds on
    clustered data. UMAP's own init="pca" would compute the same PCA again for every k; as it does,
    the start gets noise of 1e-4 of its scale, which keeps an axis without spread from dividing by
    zero when UMAP rescales it."""
    import umap  # imported here: its import (numba, pynndescent) costs seconds every stage would pay

    # UMAP's notes on our settings (n_jobs with a seed; no search index for transforming new points,
    # which the report never does) are dropped for good: a catch_warnings block is not thread-safe,
    # and a worker with two threads runs two UMAPs at once.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"umap\.")
    index, distances = _knn(points, k)
    if previous is None:
        scale = float(np.abs(pca).max()) or 1.0
        start, epochs = 10.0 * pca / scale + np.random.default_rng(seed).normal(0.0, 1e-4, pca.shape), UMAP_EPOCHS
    else:
        start, epochs = continued_start(previous, index), CONTINUE_EPOCHS
    model = umap.UMAP(n_neighbors=k, random_state=seed, n_jobs=1, n_epochs=epochs, init=start.astype(np.float32),
                      precomputed_knn=(index, distances))
    return model.fit_transform(points).astype(np.float32)


def continued_start(previous: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Start positions that continue an earlier layout: a point of it at its place there, a new point
    at the mean place of its nearest neighbours (`index`, k per point) that were in it, or of all
    points that were, when none of its neighbours was.

    >>> continued_start(np.array([[0.0, 0.0], [2.0, 4.0], [np.nan, np.nan]]), np.array([[0, 1], [1, 0], [2, 1]]))
    array([[0., 0.],
           [2., 4.],
           [2., 4.]])
    """
    known = ~np.isnan(previous[:, 0])
    near = known[index]
    places = np.where(near[..., None], previous[np.where(near, index, 0)], 0.0).sum(axis=1)
    count = near.sum(axis=1, keepdims=True)
    fallback = previous[known].mean(axis=0)
    return np.where(known[:, None], previous, np.where(count > 0, places / np.maximum(count, 1), fallback))


def point_ids(points: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each point's embedding: what finds a point again in an earlier layout."""
    return np.fromiter((xxhash.xxh3_64_intdigest(row) for row in np.ascontiguousarray(points)), np.uint64, len(points))


@dataclass
class PendingViews:
    """The 2-D views of the scatter points while their UMAPs run on the executor; `result()` waits
    for them and stores new projections in the cache, and the UMAPs as the dataset's latest layout."""

    n_points: int
    umap_points: int
    neighbours: dict[str, tuple[int, int]]  # view key -> (k asked for, k used)
    xy: dict[str, np.ndarray | Future]
    continued: dict[str, int]  # view key -> points that kept their place from the previous layout
    cache: ReportCache
    key: str | None = None  # the content key to store new projections under; None when they came from the cache or there is none
    layout: str | None = None  # the name of the dataset's latest layout in the cache
    ids: np.ndarray | None = None  # point_ids of the UMAP points

    def result(self) -> list[dict]:
        xy = {key: value.result() if isinstance(value, Future) else value for key, value in self.xy.items()}
        if self.key is not None:
            self.cache.store_arrays(self.key, xy | {"continued": np.array([self.continued[v] for v in self.neighbours])})
        if self.layout is not None and self.neighbours:
            self.cache.store_arrays(self.layout, {"ids": self.ids} | {view: xy[view] for view in self.neighbours})
        return ([{"key": "pca", "title": "PCA", "n_points": self.n_points, "xy": xy["pca"]}] if xy else []) + [
            {"key": key, "title": f"UMAP, k = {k}" + (f" ({used} used)" if used < k else ""),
             "n_points": self.umap_points, "continued_points": self.continued[key], "xy": xy[key]}
            for key, (k, used) in self.neighbours.items()
        ]


def start_embedding_views(points: np.ndarray, seed: int, cache: ReportCache = ReportCache(),
                          executor: Executor = InProcess(), dataset: str = "") -> PendingViews:
    """PCA of the scatter points, and UMAP at each k of UMAP_NEIGHBOURS on their first UMAP_POINTS
    started side by side on `executor`; from the cache when it holds the projections of the same
    points. With a cache, each UMAP continues the latest layout of `dataset` (see ReportCache.previous_layout),
    so that successive runs over a growing dataset show it alike, at a quarter of the cost."""
    n = len(points)
    umap_n = min(n, UMAP_POINTS)
    if n < 2:
        return PendingViews(n, umap_n, {}, {}, {}, cache)
    neighbours = {f"umap_k_{k}": (k, min(k, umap_n - 1)) for k in UMAP_NEIGHBOURS if min(k, umap_n - 1) >= 2}
    key = content_key("embedding views", points, seed) if cache.root else None  # no cache: no need to hash the points
    stored = cache.stored_arrays(key) if key else None
    if stored is not None:
        continued = dict(zip(neighbours, stored.pop("continued").tolist()))
        return PendingViews(n, umap_n, neighbours, stored, continued, cache)
    xy: dict[str, np.ndarray | Future] = {"pca": pca_2d(points)}
    layout = content_key("layout", dataset, seed) if cache.root and neighbours else None
    ids = point_ids(points[:umap_n]) if layout else None
    previous = cache.previous_layout(layout, ids) if layout else {}
    start = xy["pca"] if umap_n == n else pca_2d(points[:umap_n])
    for view, (_, used) in neighbours.items():
        xy[view] = executor.submit(umap_2d, points[:umap_n], used, seed, start, previous.get(view))
    continued = {view: int(np.count_nonzero(~np.isnan(previous[view][:, 0]))) if view in previous else 0
                 for view in neighbours}
    return PendingViews(n, umap_n, neighbours, xy, continued, cache, key, layout, ids)


@dataclass
class StartedViews:
    """The report's 2-D views while their projections run (see start_views): which samples are the
    points, as rows of [this run's samples; the datapool's], and the projections."""

    rows: np.ndarray
    n_run: int
    n_total: int
    pending: PendingViews

    def scatter(self, filenames: list[str], selected: np.ndarray) -> Scatter:
        """What the plots show of the points, once the selection is known."""
        ours = self.rows < self.n_run
        groups = np.full(len(self.rows), GROUPS.index("datapool"), np.int8)
        groups[ours] = selected[self.rows[ours]]
        return Scatter(groups, [filenames[i] if i < self.n_run else None for i in self.rows.tolist()], self.n_total)


def start_views(vectors: np.ndarray, config: dict, datapool_embeddings_path: UPath | None = None,
                cache_dir: UPath | None = None, executor: Executor = InProcess()) -> StartedViews | None:
    """Start the projections of the views of this run's samples (`vectors`, normalized as the
    report's numbers are) among the datapool's, on `executor`. They need only the embeddings, so a
    flow starts them before it selects. None for a run with no samples of its own (nothing new for
    the datapool): it has nothing to show there."""
    if not len(vectors):
        return None
    settings = ReportSettings.from_config(config)
    datapool = load_embeddings(datapool_embeddings_path, settings.normalize)[2] if datapool_embeddings_path else None
    rows, points = scatter_points(vectors, datapool, settings.seed)
    n_total = len(vectors) + (len(datapool) if datapool is not None else 0)
    del datapool  # the views need only the points
    return StartedViews(rows, len(vectors), n_total,
                        start_embedding_views(points, settings.seed, ReportCache.under(cache_dir), executor,
                                              settings.input_dir))


# ----------------------------------------------------------------------------------------------
# Plots


def _figure(width: float = HALF_WIDTH, height: float = 3.0) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return figure, figure.add_subplot()


def _save(figure: Figure, path: UPath) -> None:
    """The figure as an RGB PNG. One draw lays it out and renders it (savefig draws twice for its
    layout engine, the same picture); without the alpha channel weasyprint embeds the PNG as it is
    instead of splitting off an alpha mask."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")


def plot_distance_histogram(stats: dict, title: str, path: UPath) -> None:
    figure, ax = _figure()
    hist = stats["histogram"]
    ax.stairs(hist["counts"], hist["edges"], fill=True, color="#3b75af", alpha=0.85)
    ax.set_yscale("log")
    peak = max(hist["counts"])
    ax.set_ylim(0.5, 2.0 * peak**1.3)  # a quarter of the height above the peak, for the note at the top
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(NullLocator())  # minor ticks of a log axis cost more than the rest of the plot
    ax.set_xlabel("pairwise distance")
    ax.set_ylabel("pairs (log scale)")
    ax.set_title(title, fontsize=10)
    source = (f"exact: all {stats['n_pairs']:,} pairs" if stats["exact"] else
              f"estimate from {stats['n_pairs']:,} random pairs\n(CDF error < {stats['cdf_error_95']:.4f}, 95%)")
    ax.text(0.02, 0.97, source, transform=ax.transAxes, va="top", fontsize=8, color="#333")
    _save(figure, path)


def plot_nn_distances(statistics: dict, path: UPath) -> None:
    figure, ax = _figure(FULL_WIDTH * 0.75, 3.0)
    labels = {"before": "all samples", "after": "selected", "random": "random subset, same size"}
    for name, colour in zip(labels, ("#777777", COLOURS["selected"], "#1f6fb4")):
        stats = statistics[name]["nearest_neighbour"]
        if stats:
            hist = stats["histogram"]
            source = "exact" if stats["exact"] else f"{stats['n_queries']:,} random samples"
            ax.stairs(hist["counts"], hist["edges"], color=colour, linewidth=1.6, label=f"{labels[name]} ({source})")
    ax.set_xlabel("distance to the nearest other sample in the same set")
    ax.set_ylabel("samples")
    ax.set_title("Nearest-neighbour distances")
    ax.legend(fontsize=8)
    _save(figure, path)


def _thumbnail(input_dir: UPath, filename: str, max_pixels: int) -> Image.Image | None:
    """A small RGB preview, or None when the file cannot be read now (moved, a video frame, embeddings= input)."""
    try:
        image = open_image(read_bytes(input_dir / filename), max_pixels)
    except (OSError, CorruptImage):
        return None
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    return image


class Thumbnails:
    """Previews of some input files, each read when a plot first draws it. A plot's content key
    holds the files' identities (name, size, version, as the shard cache keys files), not their
    pixels, so a plot reused from the cache reads no image."""

    def __init__(self, input_dir: UPath, max_pixels: int, names: Iterable[str] = (),
                 loaded: dict[str, Image.Image | None] | None = None) -> None:
        self.input_dir, self.max_pixels, self.names = input_dir, max_pixels, sorted(set(names))
        self._loaded = {} if loaded is None else loaded

    def subset(self, names: Iterable[str]) -> Thumbnails:
        """The previews of `names`, sharing the ones read already."""
        return Thumbnails(self.input_dir, self.max_pixels, names, self._loaded)

    def identity(self) -> tuple:
        return describe(self.input_dir), self.max_pixels, [(name, file_identity(self.input_dir / name))
                                                           for name in self.names]

    def get(self, name: str) -> Image.Image | None:
        if name not in self._loaded:
            self._loaded[name] = _thumbnail(self.input_dir, name, self.max_pixels)
        return self._loaded[name]


def _overlay_points(xy: np.ndarray, scatter: Scatter) -> list[int]:
    """One selected point per cell of an OVERLAY_GRID x OVERLAY_GRID grid: the one nearest the cell's centre."""
    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    cells = np.minimum(((xy - low) / span * OVERLAY_GRID).astype(int), OVERLAY_GRID - 1)
    centres = low + (cells + 0.5) * span / OVERLAY_GRID
    offset = np.linalg.norm((xy - centres) / span, axis=1)
    chosen: dict[tuple[int, int], int] = {}
    for i in np.flatnonzero(scatter.groups[: len(xy)] == GROUPS.index("selected")):
        cell = (int(cells[i, 0]), int(cells[i, 1]))
        if cell not in chosen or offset[i] < offset[chosen[cell]]:
            chosen[cell] = int(i)
    return sorted(chosen.values())


def plot_scatter(view: dict, scatter: Scatter, thumbnails: Thumbnails | None, path: UPath) -> None:
    """Removed, datapool and selected points (selected on top); with `thumbnails`, images of
    selected samples drawn at their points."""
    figure, ax = _figure(HALF_WIDTH, 3.1)
    ax.margins(0.14)  # room for thumbnails at the edges
    xy = view["xy"]
    groups = scatter.groups[: len(xy)]
    for code, group in enumerate(GROUPS):
        mask = groups == code
        if mask.any():
            ax.scatter(xy[mask, 0], xy[mask, 1], s=4 if len(xy) > 2000 else 14, color=COLOURS[group],
                       label=f"{group} ({int(mask.sum()):,})", linewidths=0, rasterized=True)
    if thumbnails is not None:
        for i in _overlay_points(xy, scatter):
            image = thumbnails.get(scatter.names[i])
            if image is not None:
                box = OffsetImage(np.asarray(image), zoom=34 * DPI / 100 / max(image.size))
                ax.add_artist(AnnotationBbox(box, xy[i], frameon=True, pad=0.1,
                                             bboxprops={"edgecolor": COLOURS["selected"], "linewidth": 1}))
    shown = f"{len(xy):,} of {scatter.n_total:,} points" if len(xy) < scatter.n_total else f"{len(xy):,} points"
    ax.set_title(f"{view['title']} ({shown})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=2, loc="best")
    _save(figure, path)


def plot_pair(pair: dict, thumbnails: Thumbnails, path: UPath) -> None:
    """The retained image, framed in the colour of selected points, beside its removed neighbour,
    framed in the colour of removed ones. Composed with Pillow: the names and the distance are the
    figure's caption in the report, as text, and a matplotlib figure of two images took 70 ms."""
    cell = THUMBNAIL_PIXELS + 2 * PAIR_FRAME
    canvas = Image.new("RGB", (2 * cell + PAIR_GAP, cell), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (role, group) in enumerate((("retained", "selected"), ("removed", "removed"))):
        left = column * (cell + PAIR_GAP)
        image = thumbnails.get(pair[role])
        if image is None:
            draw.rectangle((left, 0, left + cell - 1, cell - 1), fill="#eeeeee")
            draw.text((left + cell / 2, cell / 2), "no preview", fill="#777777", anchor="mm")
            continue
        image = ImageOps.contain(image, (THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))  # small images are scaled up too
        x, y = left + (cell - image.width) // 2, (cell - image.height) // 2
        draw.rectangle((x - PAIR_FRAME, y - PAIR_FRAME, x + image.width + PAIR_FRAME - 1, y + image.height + PAIR_FRAME - 1),
                       fill=COLOURS[group])
        canvas.paste(image, (x, y))
    with atomic_target(path) as tmp:
        canvas.save(tmp, format="PNG")


def _shorten(name: str, width: int = 34) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def plot_video_timelines(timelines: dict[str, list[float]], path: UPath) -> None:
    shown = list(timelines.items())[:LIST_LIMIT]
    figure, ax = _figure(FULL_WIDTH, 1.0 + 0.32 * len(shown))
    for row, (_, seconds) in enumerate(shown):
        ax.plot(seconds, [row] * len(seconds), "|", markersize=11, color=COLOURS["selected"])
    ax.set_yticks(range(len(shown)), [_shorten(video, 28) for video, _ in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time in video (s)")
    ax.set_title("Selected frames per video")
    _save(figure, path)


def plot_datapool_growth(history: list[dict], path: UPath) -> None:
    figure, ax = _figure(FULL_WIDTH * 0.75, 3.2)
    runs = [entry["run"] for entry in history]
    added = np.array([entry["n_samples"] for entry in history])
    ax.bar(range(len(runs)), added, color=COLOURS["datapool"], label="added by the run")
    ax.plot(range(len(runs)), np.cumsum(added), "o-", color="#333", label="pool size")
    ax.set_xticks(range(len(runs)), [_shorten(r, 20) for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("samples")
    ax.set_title("Datapool growth")
    ax.legend(fontsize=8)
    _save(figure, path)


def _add(plots: list[Plot], key: str, draw: Callable[..., None], *inputs: object) -> str:
    plots.append(Plot(f"{key}.png", draw, inputs))
    return f"{key}.png"


def summary_plots(report: dict, previews: Thumbnails) -> tuple[dict, list[Plot]]:
    """The plots of the distances, the filter decisions, video timelines and datapool growth:
    {plot key: file name}, and what draws them."""
    plots: list[Plot] = []
    names: dict = {}
    for name in ("before", "after"):
        stats = report["distances"][name]["pairwise"]
        if stats:
            title = "Pairwise distances, all samples" if name == "before" else "Pairwise distances, selected samples"
            names[f"distance_distr_{name}"] = _add(plots, f"distance_distr_{name}", plot_distance_histogram, stats, title)
    if report["distances"]["before"]["nearest_neighbour"]:
        names["nn_distance_distr"] = _add(plots, "nn_distance_distr", plot_nn_distances, report["distances"])
    names["filter_decisions"] = [_add(plots, f"filter_decision_{i}", plot_pair, pair,
                                      previews.subset([pair["retained"], pair["removed"]]))
                                 for i, pair in enumerate(report["example_pairs"])]
    if report.get("video_timelines"):
        names["video_timelines"] = _add(plots, "video_timelines", plot_video_timelines, report["video_timelines"])
    if report.get("datapool_history"):
        names["datapool_growth"] = _add(plots, "datapool_growth", plot_datapool_growth, report["datapool_history"])
    return names, plots


def view_plots(views: list[dict], scatter: Scatter | None, previews: Thumbnails) -> tuple[dict, list[Plot]]:
    """Each 2-D view with thumbnails of selected samples and without: {plot key: file name}, and what draws them."""
    plots: list[Plot] = []
    names: dict = {}
    for view in views:
        assert scatter is not None, "views are drawn from scatter points"
        key = f"scatter_{view['key']}"
        shown = previews.subset(scatter.names[i] for i in _overlay_points(view["xy"], scatter))
        names[key] = _add(plots, key, plot_scatter, view, scatter, shown)
        names[f"{key}_no_overlay"] = _add(plots, f"{key}_no_overlay", plot_scatter, view, scatter, None)
    return names, plots


# ----------------------------------------------------------------------------------------------
# HTML and PDF


def _data_uri(path: UPath) -> str:
    return "data:image/png;base64," + base64.b64encode(read_bytes(path)).decode("ascii")


def _number(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def render_html(report: dict, plots_dir: UPath, embed: bool = True) -> str:
    """The report as one HTML page with every plot embedded, so the file can be mailed or archived
    alone; or, with embed=False, linking the plot files (for weasyprint, which then reads the PNGs
    instead of parsing megabytes of base64 first)."""
    return _templates().get_template("report.html.j2").render(
        report=report, css=(TEMPLATES / "report.css").read_text(encoding="utf-8"), list_limit=LIST_LIMIT,
        config_columns=config_columns(report["config"]),
        plot_source=(lambda name: _data_uri(plots_dir / name)) if embed else (lambda name: uri(plots_dir / name)),
    )


def config_columns(config: dict) -> tuple[str, str]:
    """The configuration as YAML in two halves, split at the top-level key nearest the middle line,
    for the report's two columns (CSS columns cost weasyprint trial layouts to balance them).

    >>> config_columns({"a": 1, "b": {"c": 2}, "d": 3})
    ('a: 1\\n', 'b:\\n  c: 2\\nd: 3\\n')
    """
    lines = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).splitlines(keepends=True)
    keys = [i for i, line in enumerate(lines) if not line.startswith((" ", "-"))]  # a top-level list's items start with "-"
    middle = min(keys, key=lambda i: abs(i - len(lines) / 2))
    return "".join(lines[:middle]), "".join(lines[middle:])


@functools.cache
def _templates() -> jinja2.Environment:
    """One environment per process, so the template is compiled once (it keeps compiled templates)."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["number"] = _number
    environment.filters["plot"] = jinja2.pass_context(lambda context, name: context["plot_source"](name))
    return environment


def write_pdf(html: str, path: UPath) -> None:
    import weasyprint  # imported here: it loads pango and fonts, which only this step needs

    with atomic_target(path) as tmp:
        weasyprint.HTML(string=html).write_pdf(tmp)


def uri(path: UPath) -> str:
    """A link to a report file: file:// for a local one, the bucket URL for an object."""
    return path.resolve().as_uri() if is_local(path) else describe(path)


# ----------------------------------------------------------------------------------------------
# The report


def selection_numbers(vectors: np.ndarray, filenames: list[str], selected: np.ndarray, settings: ReportSettings) -> dict:
    """The distance statistics before and after selection, and the example pairs."""
    rows, others = np.flatnonzero(selected), np.flatnonzero(~selected)
    return {"distances": distance_statistics(vectors, rows, settings.memory_gb, settings.seed),
            "example_pairs": example_pairs(vectors, filenames, rows, others, settings.n_example_images, settings.seed)}


def build_report(
    run_dir: UPath, samples_path: UPath, embeddings_path: UPath, selection_path: UPath, job: dict, counts: dict,
    stages: dict, selection: dict, config: dict, video_timelines: dict[str, list[float]] | None = None,
    datapool_history: list[dict] | None = None, datapool_embeddings_path: UPath | None = None,
    cache_dir: UPath | None = None, executor: Executor = InProcess(), started: StartedViews | None = None,
) -> dict:
    """Write report.json, report.html, report.pdf and plots/ into run_dir; returns the report.

    With `cache_dir`, results of an earlier report on the same data are reused from
    `cache_dir/report/` (see ReportCache). The UMAPs and plots run on `executor`; `started` are the
    views if start_views started them already, with the same embeddings and settings."""
    settings = ReportSettings.from_config(config)
    cache = ReportCache.under(cache_dir)
    filenames, _, vectors = load_embeddings(embeddings_path, normalize=settings.normalize)
    chosen = set(selected_filenames(selection_path))
    selected = np.fromiter((f in chosen for f in filenames), bool, count=len(filenames))

    # The views' UMAPs run while the distance numbers are computed here (a flow starts them earlier).
    started = started or start_views(vectors, config, datapool_embeddings_path, cache_dir, executor)
    scatter = started.scatter(filenames, selected) if started else None

    numbers = cache.numbers(functools.partial(selection_numbers, vectors, filenames, selected, settings),
                            "selection numbers", vectors, filenames, selected, settings.memory_gb, settings.seed,
                            settings.n_example_images)
    del vectors  # the run's matrix is freed before the plots
    report = {
        "schema_version": SCHEMA_VERSION,
        "job": {**job, "machine": machine()},
        "counts": counts,
        "stages": stage_table(stages),
        "selection": selection,
        "savings": savings(counts, settings),
        **numbers,
        "files": file_lists(samples_path),
        "video_timelines": video_timelines,
        "datapool_history": datapool_history,
        "config": config,
    }
    previews = Thumbnails(location(settings.input_dir, settings.storage_options), settings.max_pixels)
    plots_dir = run_dir / "plots"
    # The other plots are drawn while the UMAPs run, by the workers that the UMAPs leave idle.
    names, plots = summary_plots(report, previews)
    drawing = cache.draw(plots, plots_dir, executor)
    views = started.pending.result() if started else []
    report["embedding_views"] = {
        "n_points": len(scatter.groups) if scatter else 0, "n_total": scatter.n_total if scatter else 0,
        "n_datapool_points": int(np.sum(scatter.groups == GROUPS.index("datapool"))) if scatter else 0,
        "views": [{k: v for k, v in view.items() if k != "xy"} for view in views],
    }
    view_names, plots = view_plots(views, scatter, previews)
    drawing += cache.draw(plots, plots_dir, executor)
    cache.finish(drawing, plots_dir)
    report["plots"] = names | view_names
    write_text(render_html(report, run_dir / "plots"), run_dir / "report.html")
    # weasyprint reads local plot files faster than it parses their base64; objects are embedded.
    write_pdf(render_html(report, run_dir / "plots", embed=not is_local(run_dir)), run_dir / "report.pdf")
    write_text(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False), run_dir / "report.json")
    return report


def artifacts(report: dict, run_dir: UPath) -> dict:
    """The Prefect artifacts' contents: a markdown summary, a table of counts and a link to the report."""
    counts, distances, saved = report["counts"], report["distances"], report["savings"]
    rows = [
        ("pairwise min", "pairwise", "min"), ("pairwise mean", "pairwise", "mean"),
        ("nearest-neighbour median", "nearest_neighbour", "median"),
    ]
    lines = [f"| {label} | " + " | ".join(_number((distances[s][group] or {}).get(key)) for s in ("before", "after", "random")) + " |"
             for label, group, key in rows]
    markdown = "\n".join([
        f"# Thresher report: {run_dir.name}",
        f"{counts['n_input_files']:,} files seen: {counts['n_sampled']:,} selected, {counts['n_removed']:,} removed, "
        f"{counts['n_duplicate']:,} exact duplicates, {counts['n_corrupt']:,} corrupt.",
        f"Estimated savings: {saved['labeling_cost_saved_usd']:,.2f} USD of labelling "
        f"({saved['n_images_not_labelled']:,} images), {saved['training_gpu_hours_saved']:,.2f} GPU hours, "
        f"{saved['co2_saved_kg']:,.2f} kg CO2.",
        "", "| distance | all samples | selected | random subset |", "|---|---|---|---|", *lines,
        "", f"Full report: `{describe(run_dir / 'report.pdf')}`",
    ])
    return {
        "markdown": {"key": f"{ARTIFACT_PREFIX}-summary", "markdown": markdown, "description": "Thresher run summary"},
        "table": {"key": f"{ARTIFACT_PREFIX}-counts", "table": [{"count": k, "value": v} for k, v in counts.items()],
                  "description": "Files per outcome"},
        "link": {"key": f"{ARTIFACT_PREFIX}-pdf", "link": uri(run_dir / "report.pdf"),
                 "link_text": "report.pdf", "description": "The run's PDF report"},
    }


# No Prefect cache key: the report is never reused whole (its job section is new every run), and
# an executor cannot be hashed.
@task(name="report", cache_policy=NO_CACHE)
def write_report(
    run_dir: UPath, samples_path: UPath, embeddings_path: UPath, selection_path: UPath, job: dict, counts: dict,
    stages: dict, selection: dict, config: dict, video_timelines: dict[str, list[float]] | None = None,
    datapool_history: list[dict] | None = None, datapool_embeddings_path: UPath | None = None,
    cache_dir: UPath | None = None, executor: Executor = InProcess(), started: StartedViews | None = None,
) -> UPath:
    """The report files in run_dir and its summary as Prefect artifacts; returns the report.json path.

    `video_timelines` is {video: seconds of its selected frames}; `datapool_history` is
    [{"run": name, "n_samples": added}] in run order; `datapool_embeddings_path` is a table of the
    pool's earlier selections in the gathered-embeddings format (drawn as 'datapool' points);
    `cache_dir` holds results of earlier reports to reuse (see ReportCache); the UMAPs and plots
    run on `executor` (in a flow, the cluster's); `started` are views that start_views started."""
    report = build_report(
        run_dir, samples_path, embeddings_path, selection_path, job, counts, stages, selection, config,
        video_timelines, datapool_history, datapool_embeddings_path, cache_dir, executor, started,
    )
    published = artifacts(report, run_dir)
    create_markdown_artifact(**published["markdown"])
    create_table_artifact(**published["table"])
    create_link_artifact(**published["link"])
    return run_dir / "report.json"
