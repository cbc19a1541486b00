"""Does the selection beat chance on this data? The report's "selection_quality" numbers: a linear
probe and label-free measures, each against seeded random subsets of the same size, and the
`how_many` and `min_distance` advice of `tasks.report.advice`.

Linear probe, when the candidates carry at least two distinct labels (the input's top-level
folders; a video's frames carry its index among the videos): a logistic regression (scikit-learn;
PROBE_C = 10, as unit-length features need weak regularisation for the weights to reach the class
margins; balanced class weights, so that the uneven class counts of a small training set do not
decide through the intercept; the newton-cg solver, which reached a tighter optimum in a third to a
sixth of lbfgs's time on 1280-d float32 embeddings) on the L2-normalised embeddings is fitted on
the selected samples and on each of PROBE_SEEDS uniform random subsets of the same size, and scored
on the evaluation samples outside its training set. The evaluation samples are all candidates, or a
seeded sample of EVAL_ROWS of them at scale. A training set of one class predicts that class.
Budgets: the run's k, the prefixes k/8, k/4 and k/2 of the selection order (what a smaller
`n_samples` would have picked for a greedy method), and 2k and 4k (at most N/2) from selecting more
with the run's method, seed and `min_distance` (the datapool counting as selected; a greedy method
goes on from the run's picks), when that is cheap (N x their sum x d <= RERUN_COST) and the run
selected single samples, not video sequences. The probe trains on this run's samples only, not on
the datapool's.

Label-free measures, for the selection and the same random subsets, each with the datapool's
samples counted as selected: over query samples (all candidates, or a seeded sample of at most
EVAL_ROWS, fewer when the selection is so large that one set would cost more than SET_COST
multiply-adds), the covering radius (the largest distance of a query to its nearest selected
sample; on a sample of queries, a lower bound of the true one), the mean distance to the nearest
selected sample, and the share of dense regions covered: of the DENSE_SHARE most typical queries
(`tasks.selection.typicality`, among the queries), the share whose nearest selected sample
lies within the median nearest-neighbour distance of all samples (from the samples of the
min_distance calibration).

Distances are those of the selection (embeddings normalised as the run normalised them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits
from upath import UPath

from tasks.report.advice import calibrate_min_distance, how_many
from tasks.report.numbers import squared_distances
from tasks.selection.backends import resolve_backend
from tasks.selection.methods import select
from tasks.selection.tasks import SelectOptions
from tasks.selection.typicality import REFERENCE_ROWS, typicality
from tasks.storage import read_table

PROBE_SEEDS = 5
EVAL_ROWS = 20_000
SMALLER_DIVISORS = (8, 4, 2)
LARGER_FACTORS = (2, 4)
# Multiply-adds of the re-runs for the larger budgets: k-center greedy reads the N x d matrix once
# per pick, so 5e10 is about half a minute on two cores.
RERUN_COST = 5e10
PROBE_C = 10.0
PROBE_MAX_ITER = 1_000
DENSE_SHARE = 0.10
SET_COST = 2e11  # multiply-adds of the query distances to one compared set
MIN_QUERIES = 1_000
QUERY_BLOCK, POOL_BLOCK = 1_024, 8_192  # a distance block is 32 MB of float32


@dataclass(frozen=True)
class RunSelection:
    """How the run selected, to select again with more samples, and the datapool's samples that
    counted as selected (None without)."""

    options: SelectOptions
    centers: np.ndarray | None


@dataclass(frozen=True)
class Picks:
    """The selection table as rows of the candidates in selection order, with each pick's
    `distance` and, when the table has it for every pick, its `radius` (None otherwise)."""

    rows: np.ndarray
    distances: np.ndarray
    radius: np.ndarray | None

    @classmethod
    def read(cls, path: UPath, filenames: list[str]) -> Picks:
        table = read_table(path)
        row = {name: i for i, name in enumerate(filenames)}
        rows = np.fromiter((row[name] for name in table.column("filename").to_pylist()), np.int64, table.num_rows)
        distances = table.column("distance").to_numpy(zero_copy_only=False).astype(np.float32)
        radius = table.column("radius") if "radius" in table.column_names else None
        if radius is not None and (radius.null_count or not len(radius)):
            radius = None  # a selection without radii (method=random)
        return cls(rows, distances, None if radius is None else radius.to_numpy().astype(np.float32))


def _random_rows(n: int, size: int, seed: int, draw: int) -> np.ndarray:
    """Random subset `draw` of `size` rows: the same for the probe and the label-free measures."""
    return np.random.default_rng([seed, size, draw]).choice(n, size, replace=False)


def _sample(n: int, size: int, seed: int, stream: int) -> np.ndarray:
    return np.arange(n) if size >= n else np.sort(np.random.default_rng([seed, stream]).choice(n, size, replace=False))


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def probe_accuracy(unit: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Accuracy on the `test` rows of a logistic regression fitted on the `train` rows of `unit`
    (the L2-normalised embeddings); a training set of one class predicts that class."""
    # Imported here: scikit-learn costs a second to import, which only a labelled report pays.
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(labels[train])
    if len(classes) == 1:
        return float(np.mean(labels[test] == classes[0]))
    # One BLAS thread: the fits are small, and on a busy machine threads contend (25x slower on two cores).
    with threadpool_limits(1):
        model = LogisticRegression(C=PROBE_C, class_weight="balanced", max_iter=PROBE_MAX_ITER, solver="newton-cg")
        model.fit(unit[train], labels[train])
        return float(model.score(unit[test], labels[test]))


def _spread(values: list[float]) -> tuple[float, float]:
    return round(float(np.mean(values)), 4), round(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 4)


def probe_budget(
    unit: np.ndarray, labels: np.ndarray, chosen: np.ndarray, eval_rows: np.ndarray, seed: int
) -> dict | None:
    """The probe trained on the `chosen` rows of `unit` (the L2-normalised embeddings) and on
    PROBE_SEEDS random subsets of their size, each scored on the `eval_rows` outside its training
    set; None when no evaluation row is left."""
    n = len(unit)
    subsets = [_random_rows(n, len(chosen), seed, draw) for draw in range(PROBE_SEEDS)]
    tests = [np.setdiff1d(eval_rows, rows) for rows in (chosen, *subsets)]
    if any(len(test) == 0 for test in tests):
        return None
    selection = probe_accuracy(unit, labels, chosen, tests[0])
    random = [probe_accuracy(unit, labels, rows, test) for rows, test in zip(subsets, tests[1:])]
    mean, std = _spread(random)
    return {
        "n_samples": int(len(chosen)),
        "selection": round(selection, 4),
        "random_mean": mean,
        "random_std": std,
        "random": [round(value, 4) for value in random],
        "gain_points": round(100 * (selection - mean), 2) + 0.0,
    }  # + 0.0: no -0.0


def probe_budgets(k: int, n: int, d: int, sequences: bool) -> tuple[list[int], list[int]]:
    """The smaller budgets (prefixes of the selection) and the larger ones (re-runs).

    >>> probe_budgets(80, 1000, 16, sequences=False)
    ([10, 20, 40], [160, 320])
    >>> probe_budgets(80, 200, 16, sequences=False), probe_budgets(80, 10**6, 1280, sequences=False)[1]
    (([10, 20, 40], [100]), [])
    """
    smaller = sorted({k // divisor for divisor in SMALLER_DIVISORS if 2 <= k // divisor < k})
    larger = sorted({min(k * factor, n // 2) for factor in LARGER_FACTORS} - set(range(k + 1)))
    if sequences or n * sum(larger) * d > RERUN_COST:
        larger = []
    return smaller, larger


def rerun(vectors: np.ndarray, chosen: np.ndarray, budgets: list[int], run: RunSelection) -> dict[int, np.ndarray]:
    """The run's method selecting the largest budget, once: a greedy selection of any smaller size
    is a prefix of it (and a prefix of a random subset is a random subset). A greedy method
    continues from the run's picks (`chosen`), which it would pick first again, so only the picks
    beyond them are computed: at 4,000 x 1,280 and twice the run's 1,200, 0.63 s instead of 1.0 to
    1.2 s, the same rows. A budget that `min_distance` stops short of is left out, and all are for
    a selection by strategies (selecting again would read their inputs again)."""
    if not budgets or run.options.form is not None:
        return {}
    options, largest = run.options, max(budgets)
    if options.method == "random":
        picks = select(vectors, "random", largest, None, run.centers, options.seed, options.device).indices
    else:
        earlier = vectors[chosen] if run.centers is None else np.vstack([run.centers, vectors[chosen]])
        more = select(
            vectors, options.method, largest - len(chosen), options.min_distance, earlier, options.seed, options.device
        ).indices
        picks = np.concatenate([chosen, more])
    return {budget: picks[:budget] for budget in budgets if budget <= len(picks)}


def probe_comparison(vectors: np.ndarray, labels: np.ndarray, chosen: np.ndarray, run: RunSelection) -> dict:
    """The probe at the run's budget, the smaller and the larger ones (see the module doc)."""
    n, d = vectors.shape
    smaller, larger = probe_budgets(len(chosen), n, d, run.options.sequence_length > 1)
    eval_rows = _sample(n, EVAL_ROWS, run.options.seed, 1)
    trained = [(budget, chosen[:budget], "prefix") for budget in smaller] + [(len(chosen), chosen, "run")]
    trained += [(budget, rows, "re-run") for budget, rows in rerun(vectors, chosen, larger, run).items()]
    unit = _unit(vectors)  # once, not for every fit and score: 0.25-0.4 s of 4 s at 4,000 x 1,280
    budgets = []
    for _, rows, source in trained:
        result = probe_budget(unit, labels, rows, eval_rows, run.options.seed)
        if result is not None:
            budgets.append(result | {"source": source})
    return {
        "n_classes": int(len(np.unique(labels))),
        "n_eval": int(len(eval_rows)),
        "eval_exact": len(eval_rows) == n,
        "seeds": PROBE_SEEDS,
        "budgets": budgets,
    }


def _blocks(queries: np.ndarray, pool: np.ndarray, reduce: Callable[[np.ndarray, slice], None]) -> None:
    """Squared distances (expanded in float32, clamped at 0) of every query block to the whole
    pool, one (QUERY_BLOCK x pool) block at a time, handed to reduce(block, query slice)."""
    q_sq, p_sq = np.einsum("ij,ij->i", queries, queries), np.einsum("ij,ij->i", pool, pool)
    for start in range(0, len(queries), QUERY_BLOCK):
        rows = slice(start, min(len(queries), start + QUERY_BLOCK))
        reduce(squared_distances(queries[rows], q_sq[rows], pool, p_sq), rows)


def nearest_distances(queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Distance from each query to its nearest pool vector (itself, at 0, when it is in the pool)."""
    best = np.full(len(queries), np.inf, np.float32)

    def keep(block: np.ndarray, rows: slice) -> None:
        np.minimum(best[rows], block.min(axis=1), out=best[rows])

    for start in range(0, len(pool), POOL_BLOCK):
        _blocks(queries, pool[start : start + POOL_BLOCK], keep)
    return np.sqrt(best)


def label_free(
    vectors: np.ndarray, chosen: np.ndarray, centers: np.ndarray | None, dense_radius: float, seed: int
) -> dict:
    """Covering radius, mean distance to the nearest selected sample and share of dense regions
    covered, for the selection and the random subsets of its size (see the module doc)."""
    n, d = vectors.shape
    pool_size = len(chosen) + (0 if centers is None else len(centers))
    queries = _sample(n, int(min(EVAL_ROWS, max(MIN_QUERIES, SET_COST // (pool_size * d)))), seed, 2)
    typical = typicality(resolve_backend("cpu"), vectors[queries], seed=seed)
    dense = np.argsort(-typical, kind="stable")[: max(1, math.ceil(DENSE_SHARE * len(queries)))]

    def measures(rows: np.ndarray) -> dict:
        pool = vectors[rows] if centers is None else np.vstack([vectors[rows], centers])
        distance = nearest_distances(vectors[queries], pool)
        return {
            "covering_radius": float(distance.max()),
            "mean_distance": float(distance.mean()),
            "dense_covered": float(np.mean(distance[dense] <= dense_radius)),
        }

    random = [measures(_random_rows(n, len(chosen), seed, draw)) for draw in range(PROBE_SEEDS)]
    spread = {key: _spread([values[key] for values in random]) for key in random[0]}
    return {
        "n_queries": int(len(queries)),
        "exact": len(queries) == n,
        "n_dense": int(len(dense)),
        "dense_radius": dense_radius,
        "typicality_reference": min(len(queries), REFERENCE_ROWS),
        "seeds": PROBE_SEEDS,
        "selection": measures(chosen),
        "random_mean": {key: mean for key, (mean, _) in spread.items()},
        "random_std": {key: std for key, (_, std) in spread.items()},
    }


def selection_quality(
    vectors: np.ndarray, filenames: list[str], labels: np.ndarray, picks: Picks, run: RunSelection
) -> dict:
    """The report's "selection_quality": the probe (None without labels), the label-free measures,
    how many to label, and the calibrated min_distance (each None when the data are too few)."""
    labelled = len(np.unique(labels)) >= 2
    calibration = calibrate_min_distance(vectors, filenames, run.options.seed)
    probe = probe_comparison(vectors, labels, picks.rows, run) if labelled and len(picks.rows) else None
    measured = 0 < len(picks.rows) < len(vectors) and calibration is not None
    return {
        "labelled": bool(labelled),
        "probe": probe,
        "label_free": (
            label_free(vectors, picks.rows, run.centers, calibration["nn_median"], run.options.seed)
            if measured
            else None
        ),
        "how_many": how_many(picks.distances, picks.radius) if run.options.sequence_length == 1 else None,
        "min_distance": calibration,
    }
