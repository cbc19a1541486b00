"""Advice from the selection: how many samples are worth labelling (`how_many`) and which
`stopping_condition.min_distance` suits this model on this data (`calibrate_min_distance`).

How many: the covering radius after each pick (the selection table's `radius`, which k-center
greedy knows at every step) against the number selected. The curve flattens at the smallest k
from which on every doubling of the selection shrinks the radius by less than FLAT_DECREASE
(r(2k') > (1 - FLAT_DECREASE) r(k') for every k' >= k with 2k' within the selection): beyond it,
picks refine regions that are covered already. That k is the suggested `n_samples`; none when the
radius still falls faster at the end of the selection (select more to find it). Evenly spread
samples of intrinsic dimension m shrink the radius by 2^(-1/m) per doubling, so the curve of data
below about 7 dimensions never flattens by this rule; image embeddings have many more.

Certified bound: if k picks are pairwise at least δ apart and one more sample lies at distance r
from all of them, these k + 1 samples are pairwise at least min(δ, r) apart, so any k centres
leave two of them to one centre and no selection of k samples covers the candidates with a
radius below min(δ, r) / 2. Each pick's `distance` is its distance to every earlier pick (and to
the datapool, whose samples then cannot cover any of the k + 1 within that radius either), so δ
is the smallest finite `distance` and r the final `radius`. For k-center greedy the distances
never increase and r is at most the last one, so the bound is r / 2: the greedy radius is within
a factor 2 of the best possible.

Calibrated min_distance: the nearest-neighbour distances of NN_QUERIES seeded samples (all, for
fewer samples), each against every sample. Otsu's threshold on their logarithms (each class at
least MIN_CLASS_SHARE of them) separates near-duplicates from ordinary neighbours when the split
is clearly bimodal: its effectiveness (between-class over total variance) is at least
BIMODAL_EFFECTIVENESS, where one normal distribution gives 2/π ≈ 0.64 and a uniform one 0.75.
The threshold is then the geometric mean of the two values either side of the split. Otherwise
the suggestion falls back to the FALLBACK_QUANTILE quantile of the distances: a `min_distance`
that only the closest 5% of neighbours fall below. Exact duplicates (distance 0) count as the
smallest positive distance found, halved.
"""

from __future__ import annotations

import math

import numpy as np

from tasks.report.numbers import NN_QUERIES, nearest_neighbours

FLAT_DECREASE = 0.10
CURVE_POINTS = 300  # points of the radius curve kept in report.json
MIN_CLASS_SHARE = 0.02
BIMODAL_EFFECTIVENESS = 0.8
FALLBACK_QUANTILE = 0.05
CALIBRATION_PAIRS = 2  # pairs shown either side of the suggested min_distance
HISTOGRAM_BINS = 40


def flattening(radius: np.ndarray) -> int | None:
    """The number selected from which on every doubling shrinks the radius by less than
    FLAT_DECREASE; `radius[j]` is the covering radius after j + 1 picks.

    >>> flattening(np.array([8.0, 4.0, 2.0, 1.95, 1.9, 1.9, 1.85, 1.85]))
    3
    >>> flattening(np.array([8.0, 4.0, 2.0, 1.0])) is None
    True
    """
    ks = np.arange(1, len(radius) // 2 + 1)
    before, after = radius[ks - 1].astype(np.float64), radius[2 * ks - 1].astype(np.float64)
    flat = np.where(before > 0, after / np.where(before > 0, before, 1.0), 1.0) > 1.0 - FLAT_DECREASE
    steep = np.flatnonzero(~flat)
    first = steep[-1] + 1 if len(steep) else 0
    return int(ks[first]) if first < len(ks) else None


def lower_bounds(distances: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """The certified lower bound min(δ, r) / 2 after each pick (see the module doc).

    >>> lower_bounds(np.array([np.inf, 4.0, 3.0]), np.array([5.0, 3.5, 2.5])).tolist()
    [2.5, 1.75, 1.25]
    """
    separation = np.minimum.accumulate(distances.astype(np.float64))
    return np.minimum(separation, radius.astype(np.float64)) / 2


def _curve_points(k: int) -> np.ndarray:
    """At most CURVE_POINTS numbers selected from 1 to k, evenly spread on a log scale."""
    return np.unique(np.geomspace(1, k, min(k, CURVE_POINTS)).round().astype(np.int64))


def how_many(distances: np.ndarray, radius: np.ndarray | None) -> dict | None:
    """The radius curve with its certified lower bound, and the suggested `n_samples` (where the
    curve flattens). None without radii (method=random)."""
    if radius is None or not len(radius):
        return None
    bounds = lower_bounds(distances, radius)
    shown = _curve_points(len(radius))
    finite = distances[np.isfinite(distances)]
    return {
        "curve": {
            "n_selected": shown.tolist(),
            "radius": [float(radius[k - 1]) for k in shown],
            "lower_bound": [float(bounds[k - 1]) for k in shown],
        },
        "k": int(len(radius)),
        "radius": float(radius[-1]),
        "separation": float(finite.min()) if len(finite) else None,
        "lower_bound": float(bounds[-1]),
        "flat_decrease": FLAT_DECREASE,
        "suggested_n_samples": flattening(radius),
    }


def otsu(values: np.ndarray) -> tuple[int | None, float]:
    """Otsu's split of sorted `values` into values[:i] and values[i:] (each at least
    MIN_CLASS_SHARE of them): i, and its effectiveness (between-class over total variance).

    >>> otsu(np.array([0.0, 0.1, 0.2, 5.0, 5.1, 5.2]))[0]
    3
    """
    n = len(values)
    smallest = max(1, math.ceil(MIN_CLASS_SHARE * n))
    total = float(np.var(values))
    if n < 2 * smallest or total <= 0:
        return None, 0.0
    i = np.arange(smallest, n - smallest + 1)
    head = np.cumsum(values, dtype=np.float64)[i - 1]
    low, high = head / i, (values.sum(dtype=np.float64) - head) / (n - i)
    between = (i / n) * (1 - i / n) * (low - high) ** 2
    best = int(np.argmax(between))
    return int(i[best]), float(between[best] / total)


def _threshold_pairs(
    queries: np.ndarray, nearest: np.ndarray, distances: np.ndarray, threshold: float, filenames: list[str]
) -> tuple[list[dict], list[dict]]:
    """The CALIBRATION_PAIRS nearest-neighbour pairs closest below the threshold and above it,
    each pair once, from the closest to the farthest."""
    sides: tuple[list[dict], list[dict]] = ([], [])
    seen = set()
    for i in np.argsort(np.abs(np.log(np.maximum(distances, 1e-12) / threshold)), kind="stable"):
        pair = frozenset((int(queries[i]), int(nearest[i])))
        side = sides[0] if distances[i] < threshold else sides[1]
        if pair in seen or len(side) == CALIBRATION_PAIRS:
            continue
        seen.add(pair)
        side.append({"first": filenames[queries[i]], "second": filenames[nearest[i]], "distance": float(distances[i])})
    return sorted(sides[0], key=lambda p: p["distance"]), sorted(sides[1], key=lambda p: p["distance"])


def _log_histogram(distances: np.ndarray, floor: float) -> dict:
    logs = np.log10(np.maximum(distances, floor))
    counts, edges = np.histogram(logs, bins=min(HISTOGRAM_BINS, max(5, len(logs) // 10)))
    return {"edges": [round(float(10**e), 8) for e in edges], "counts": [int(c) for c in counts]}


def calibrate_min_distance(vectors: np.ndarray, filenames: list[str], seed: int) -> dict | None:
    """The suggested `min_distance` with the rule that gave it, the nearest-neighbour distances it
    comes from (summary and log-scale histogram) and the pairs either side of it; None for fewer
    than three samples, or when every sample has an identical twin."""
    n = len(vectors)
    if n < 3:
        return None
    rng = np.random.default_rng([seed, 4])
    queries = np.arange(n) if n <= NN_QUERIES else np.sort(rng.choice(n, NN_QUERIES, replace=False))
    nearest, distances = nearest_neighbours(vectors, queries, np.arange(n))
    positive = distances[distances > 0]
    if not len(positive):
        return None
    floor = float(positive.min()) / 2
    logs = np.sort(np.log(np.maximum(distances, floor)))
    split, effectiveness = otsu(logs)
    bimodal = split is not None and effectiveness >= BIMODAL_EFFECTIVENESS
    threshold = (
        math.exp((logs[split - 1] + logs[split]) / 2)
        if bimodal
        else float(np.quantile(np.maximum(distances, floor), FALLBACK_QUANTILE))
    )
    below, above = _threshold_pairs(queries, nearest, distances, threshold, filenames)
    return {
        "suggested_min_distance": float(threshold),
        "rule": "otsu" if bimodal else "quantile",
        "otsu_effectiveness": round(effectiveness, 4),
        "fallback_quantile": FALLBACK_QUANTILE,
        "n_queries": int(len(queries)),
        "exact": len(queries) == n,
        "nn_min": float(distances.min()),
        "nn_median": float(np.median(distances)),
        "nn_max": float(distances.max()),
        "share_below": float(np.mean(distances < threshold)),
        "histogram": _log_histogram(distances, floor),
        "pairs_below": below,
        "pairs_above": above,
    }
