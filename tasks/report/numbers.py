"""The report's numbers: distance and nearest-neighbour statistics before and after selection,
example pairs, file lists, savings, stage timings and the machine.

Pairwise distances are exact while the full distance matrix fits in `memory_requirement_in_GB`
and there are at most EXACT_PAIRS pairs; beyond that they are estimated from independent random
pairs (a sample of m pairs bounds the CDF error by sqrt(ln(2/0.05) / 2m) with 95% confidence,
DKW-Massart), and the report says so. Nearest-neighbour distances are exact up to NN_QUERIES
samples and estimated from that many random samples (each against the whole set) beyond.

    >>> round(pairwise_stats(np.eye(3, dtype=np.float32), memory_gb=1.0)["min"], 4)
    1.4142
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.report.settings import LIST_LIMIT, ReportSettings
from tasks.selection.backends import nvidia_driver_present
from tasks.selection.strategies import distribution

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


def squared_distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """The len(a) x len(b) squared distances from the expansion |a|^2 - 2 a.b + |b|^2 in the
    inputs' precision (a_sq, b_sq: the rows' squared norms), clamped at 0; it errs most near 0."""
    d2 = a @ b.T
    d2 *= -2.0
    d2 += a_sq[:, None]
    d2 += b_sq[None, :]
    return np.maximum(d2, 0.0, out=d2)


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
    radius = max(
        float(np.linalg.norm(vectors[start : start + ROW_BLOCK] - centre, axis=1).max())
        for start in range(0, len(vectors), ROW_BLOCK)
    )
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
        "min": float(low),
        "mean": total / pairs,
        "max": float(high),
        "n_pairs": int(pairs),
        "exact": exact,
        "cdf_error_95": None if exact else round(_dkw_error(pairs), 6),
        "histogram": histogram(fine, upper, min(HISTOGRAM_BINS, max(10, round(2 * math.sqrt(pairs))))),
    }


def nearest_neighbours(
    vectors: np.ndarray, query_rows: np.ndarray, pool_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
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
        "min": float(d.min()),
        "median": float(np.median(d)),
        "mean": float(d.mean()),
        "max": float(d.max()),
        "n_queries": int(len(queries)),
        "exact": len(queries) == len(rows),
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
    vectors: np.ndarray,
    filenames: list[str],
    selected_rows: np.ndarray,
    removed_rows: np.ndarray,
    n: int,
    seed: int,
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


# The check stage's image measures shown in the report: column, label, and whether to show log10.
IMAGE_MEASURES = (
    ("sharpness", "log10 sharpness", True),
    ("contrast", "RMS contrast", False),
    ("brightness", "mean of R, G, B", False),
    ("size", "log10 file bytes", True),
)


def image_measures(samples: pa.Table, filenames: list[str], selected: np.ndarray) -> list[dict]:
    """The distributions of the check stage's measures (tasks/image_metadata.py) over the candidates
    and the selection; empty when the run has none (embeddings from a file, no full decode)."""
    if "sharpness" not in samples.column_names:
        return []
    row = {name: i for i, name in enumerate(samples.column("filename").to_pylist())}
    rows = pa.array([row.get(name) for name in filenames], pa.int64())
    table = samples.take(rows)

    def column(name: str) -> np.ndarray:
        return pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)

    columns = {"brightness": (column("mean_red") + column("mean_green") + column("mean_blue")) / 3}
    out = []
    for key, label, log in IMAGE_MEASURES:
        values = columns[key] if key in columns else column(key)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(values > 0, np.log10(values), np.nan)
        shown = distribution(values, np.flatnonzero(selected))
        if shown is not None:
            out.append({"key": key, "input": label, **shown})
    return out


def file_lists(samples: pa.Table) -> dict:
    """The first corrupt files with their reasons and the largest exact-duplicate groups."""
    status = samples.column("status")
    corrupt = samples.filter(pc.equal(status, "corrupt"))
    duplicates = samples.filter(pc.equal(status, "duplicate"))
    groups: dict[str, list[str]] = {}
    for name, kept in zip(duplicates.column("filename").to_pylist(), duplicates.column("duplicate_of").to_pylist()):
        groups.setdefault(kept, []).append(name)
    ranked = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return {
        "n_samples": len(samples),
        "corrupt": [
            {"filename": f, "reason": r}
            for f, r in zip(
                corrupt.column("filename").to_pylist()[:LIST_LIMIT], corrupt.column("reason").to_pylist()[:LIST_LIMIT]
            )
        ],
        "n_corrupt": len(corrupt),
        "duplicate_groups": [
            {"kept": kept, "duplicates": names, "n_files": len(names) + 1} for kept, names in ranked[:LIST_LIMIT]
        ],
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
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "versions": {name: metadata.version(name) for name in ("thresher", "torch", "prefect", "dask")},
    }


def _gpu_name() -> str | None:
    if not nvidia_driver_present():
        return None  # and torch, which this process need not load otherwise, is not imported (seconds)
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _cpu_model() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def selection_numbers(
    vectors: np.ndarray, filenames: list[str], selected: np.ndarray, settings: ReportSettings
) -> dict:
    """The distance statistics before and after selection, and the example pairs."""
    rows, others = np.flatnonzero(selected), np.flatnonzero(~selected)
    return {
        "distances": distance_statistics(vectors, rows, settings.memory_gb, settings.seed),
        "example_pairs": example_pairs(vectors, filenames, rows, others, settings.n_example_images, settings.seed),
    }
