"""The combination of strategies (the Lightly Worker's `selection_config`), on arrays.

THRESHOLD strategies filter the candidates first. The others each give every candidate a score >= 0,
and the selection is greedy, one sample at a time, maximising the product of the scores raised to
their strengths. WEIGHTS, SIMILARITY and TYPICALITY scores are fixed; DIVERSITY's (the distance to
the selection, datapool included) and BALANCE's (how much the sample's classes are still missing
from the target) change after every pick. Fixed scores are scaled to (0, 1] first, so that a
strength weighs strategies against each other whatever the units of their inputs.

A product with one DIVERSITY strategy of strength s is maximised by the row that maximises
distance² x (product of the others)^(2/s): the weighted k-center greedy of `tasks.selection.greedy`,
whose cost per pick is k-center's. DIVERSITY alone is plain k-center greedy, as fast as before.

    >>> import numpy as np
    >>> x = np.array([[0.0, 0.0], [0.0, 0.1], [3.0, 0.0], [3.0, 0.1]], dtype=np.float32)
    >>> score = Scored(values=np.array([1.0, 4.0, 2.0, 3.0]))
    >>> plan = [Planned("WEIGHTS", 1.0, score)]
    >>> combine(x, plan, 2, None, None, seed=0)[0].indices.tolist()
    [1, 3]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.selection.backends import resolve_backend
from tasks.selection.greedy import SelectionResult, result
from tasks.selection.methods import coreset
from tasks.selection.typicality import typicality

# The smallest fixed score: a sample with the lowest input value (or none) can still be picked when
# nothing better is left, and a negative strength never divides by zero.
FLOOR = 1e-6
# A class already at or above its target keeps this much of BALANCE's score, so that the selection
# can still go on once every target is met.
SATISFIED = 1e-3

OPERATIONS = {
    "BIGGER": np.greater,
    "BIGGER_EQUAL": np.greater_equal,
    "SMALLER": np.less,
    "SMALLER_EQUAL": np.less_equal,
}


@dataclass(frozen=True)
class Scored:
    """A strategy's input for every candidate: `values` (N,) for scalar inputs (NaN: none), `classes`
    (N, C) for class distributions with the class names, or `query` rows for SIMILARITY."""

    values: np.ndarray | None = None
    classes: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    query: np.ndarray | None = None


@dataclass(frozen=True)
class Planned:
    """One strategy with its resolved input: `kind` is the strategy type, `options` its other keys."""

    kind: str
    strength: float
    input: Scored = field(default_factory=Scored)
    options: dict = field(default_factory=dict)


def threshold_mask(plan: list[Planned], n: int) -> np.ndarray:
    """The candidates that pass every THRESHOLD; a sample without a value fails."""
    keep = np.ones(n, dtype=bool)
    for step in plan:
        if step.kind == "THRESHOLD":
            values = step.input.values
            with np.errstate(invalid="ignore"):
                keep &= OPERATIONS[step.options["operation"]](values, step.options["threshold"]) & ~np.isnan(values)
    return keep


def scaled(values: np.ndarray, missing: float = FLOOR) -> np.ndarray:
    """Scalar values mapped to [FLOOR, 1]: divided by the largest when none is negative (a score
    twice as high weighs twice as much), else by their range among the candidates. A missing value
    scores `missing`: FLOOR, or 1 under a negative strength, where the lowest scores weigh most.

    >>> scaled(np.array([2.0, 4.0, np.nan, 3.0])).tolist()
    [0.5, 1.0, 1e-06, 0.75]
    >>> scaled(np.array([-1.0, 1.0, 0.0])).tolist()
    [1e-06, 1.0, 0.5]
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.full(len(values), missing)
    low, high = float(finite.min()), float(finite.max())
    if high <= 0 or high == low:
        out = np.ones(len(values))
    else:
        out = values / high if low >= 0 else (values - low) / (high - low)
    return np.where(np.isfinite(values), np.clip(out, FLOOR, 1.0), missing)


def similarity(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Each row's cosine similarity to its most similar query row, mapped from [-1, 1] to [0, 1]."""
    if len(query) == 0:
        return np.ones(len(vectors))
    unit = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    step = max(1, 2**24 // max(1, len(unit)))
    best = np.empty(len(vectors))
    for a in range(0, len(vectors), step):
        block = vectors[a : a + step]
        norms = np.maximum(np.linalg.norm(block, axis=1), 1e-12)
        best[a : a + step] = (block @ unit.T).max(axis=1) / norms
    return (1.0 + np.clip(best, -1.0, 1.0)) / 2.0


def fixed_scores(step: Planned, vectors: np.ndarray, seed: int, device: str) -> np.ndarray | None:
    """A fixed strategy's scores in [FLOOR, 1] (None for DIVERSITY, BALANCE and THRESHOLD)."""
    if step.kind == "WEIGHTS":
        return scaled(step.input.values, FLOOR if step.strength >= 0 else 1.0)
    if step.kind == "SIMILARITY":
        return np.maximum(similarity(vectors, step.input.query), FLOOR)
    if step.kind == "TYPICALITY":
        dense = typicality(resolve_backend(device), vectors, k=step.options["num_nearest_neighbors"], seed=seed)
        return dense / dense.max()
    return None


class Balancer:
    """BALANCE: the share of each class still missing from the target, weighed by each sample's classes.

    A sample's score is its class distribution dotted with the classes' deficits (target share minus
    selected share, at least SATISFIED), raised to the strength; it changes after every pick. It also
    carries the stopping conditions that depend on the picks (WEIGHTS' max sum, TYPICALITY's minimum)."""

    def __init__(self, plan: list[Planned], typical: dict[int, np.ndarray], exponent: float) -> None:
        self.balances = [step for step in plan if step.kind == "BALANCE"]
        self.targets = [target_shares(step) for step in self.balances]
        self.classes = [np.nan_to_num(step.input.classes) for step in self.balances]
        self.sums = [
            (np.nan_to_num(s.input.values), s.options["stopping_condition_max_sum"])
            for s in plan
            if s.kind == "WEIGHTS" and s.options.get("stopping_condition_max_sum") is not None
        ]
        self.total = [0.0] * len(self.sums)
        self.minimum_typicality = [
            (typical[i], plan[i].options["stopping_condition_minimum_typicality"])
            for i in typical
            if plan[i].options.get("stopping_condition_minimum_typicality")
        ]
        self.exponent = exponent  # 2 / DIVERSITY's strength, or 1 without DIVERSITY

    def accepts(self, row: int) -> bool:
        if any(float(values[row]) < minimum for values, minimum in self.minimum_typicality):
            return False
        if any(total + values[row] > limit for total, (values, limit) in zip(self.total, self.sums)):
            return False
        self.total = [total + values[row] for total, (values, _) in zip(self.total, self.sums)]
        return True

    def factor(self, picked: list[int]) -> np.ndarray | None:
        if not self.balances:
            return None
        out = None
        for step, target, classes in zip(self.balances, self.targets, self.classes):
            have = classes[picked].sum(axis=0)
            share = have / max(float(have.sum()), 1e-12)
            deficit = np.maximum(target - share, SATISFIED)
            score = np.maximum(classes @ deficit, FLOOR) ** (step.strength * self.exponent)
            out = score if out is None else out * score
        return out


def target_shares(step: Planned) -> np.ndarray:
    """BALANCE's target share of each class: as given (the rest of 1 spread evenly over the classes
    it does not name), uniform, or the input's own distribution."""
    names, classes = step.input.class_names, np.nan_to_num(step.input.classes)
    distribution = step.options["distribution"]
    if distribution == "UNIFORM":
        return np.full(len(names), 1.0 / max(1, len(names)))
    if distribution == "INPUT":
        total = classes.sum(axis=0)
        return total / max(float(total.sum()), 1e-12)
    target = step.options["target"]
    shares = np.array([target.get(name, np.nan) for name in names], dtype=np.float64)
    unnamed = np.isnan(shares)
    shares[unnamed] = (1.0 - sum(target.values())) / unnamed.sum() if unnamed.any() else 0.0
    return shares


def combine(
    vectors: np.ndarray,
    plan: list[Planned],
    n_samples: int | None,
    min_distance: float | None,
    initial_centers: np.ndarray | None,
    seed: int = 0,
    device: str = "auto",
) -> tuple[SelectionResult, dict[int, np.ndarray]]:
    """Select by the strategies of `plan` from the rows of `vectors` (see the module doc); `min_distance`
    is DIVERSITY's stopping_condition_minimum_distance, `initial_centers` the datapool's rows.
    Also returns the fixed scores of plan's steps by index, for every row (NaN: removed by a threshold)."""
    keep = np.flatnonzero(threshold_mask(plan, len(vectors)))
    steps = [i for i, step in enumerate(plan) if step.kind != "THRESHOLD"]
    plan = [subset(plan[i], keep) for i in steps]
    # Without a threshold that removed something, the caller's matrix is used as it is, not copied.
    x = np.ascontiguousarray(vectors if len(keep) == len(vectors) else vectors[keep], dtype=np.float32)
    if len(x) == 0 or n_samples == 0:
        return result([], [], []), {}
    diversity = [step for step in plan if step.kind == "DIVERSITY"]
    exponent = 2.0 / diversity[0].strength if diversity else 1.0
    fixed = {i: fixed_scores(step, x, seed, device) for i, step in enumerate(plan)}
    log_weight = sum(
        (plan[i].strength * exponent * np.log(score) for i, score in fixed.items() if score is not None),
        start=np.zeros(len(x)),
    )
    typical = {i: fixed[i] for i, step in enumerate(plan) if step.kind == "TYPICALITY"}
    steering = Balancer(plan, typical, exponent)
    plain = not steering.balances and not steering.sums and not steering.minimum_typicality
    weights = None if plain and not np.any(log_weight) else np.exp(log_weight - log_weight.max())
    picks = coreset(
        x,
        n_samples,
        min_distance,
        initial_centers,
        seed,
        resolve_backend(device),
        weights=weights,
        distance=bool(diversity),
        steering=None if plain else steering,
    )
    scores = {}
    for i, score in fixed.items():
        if score is not None:
            scores[steps[i]] = np.full(len(vectors), np.nan)
            scores[steps[i]][keep] = score
    return SelectionResult(keep[picks.indices], picks.distances, picks.radii), scores


def explain(plan: list[Planned], scores: dict[int, np.ndarray], picked: np.ndarray, bins: int = 20) -> list[dict]:
    """What each strategy did, for the report: how many candidates each THRESHOLD removed, BALANCE's
    class shares before and after against its target, and the other inputs' distributions (a
    histogram over the candidates and the selection, with their means)."""
    out = []
    for i, step in enumerate(plan):
        entry: dict = {"type": step.kind, "strength": step.strength}
        values = step.input.values if step.input.values is not None else scores.get(i)
        if step.kind == "THRESHOLD":
            entry["n_removed"] = int(len(values) - threshold_mask([step], len(values)).sum())
        if step.kind == "BALANCE":
            classes = np.nan_to_num(step.input.classes)
            entry["classes"] = list(step.input.class_names)
            entry["target"] = target_shares(step).round(4).tolist()
            for name, rows in (("before", slice(None)), ("after", picked)):
                total = classes[rows].sum(axis=0)
                entry[name] = (total / max(float(total.sum()), 1e-12)).round(4).tolist()
        elif values is not None:
            entry |= distribution(values, picked, bins) or {}
        out.append(entry)
    return out


def distribution(values: np.ndarray, picked: np.ndarray, bins: int = 20) -> dict | None:
    """A histogram of the finite `values` over all rows and over the `picked` ones, with their means;
    None when no value is finite."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return None
    edges = np.linspace(finite.min(), finite.max(), bins + 1)
    chosen = values[picked][np.isfinite(values[picked])]
    return {
        "histogram": {
            "edges": edges.tolist(),
            "before": np.histogram(finite, edges)[0].tolist(),
            "after": np.histogram(chosen, edges)[0].tolist(),
        },
        "mean_before": float(finite.mean()),
        "mean_after": float(chosen.mean()) if chosen.size else None,
    }


def subset(step: Planned, rows: np.ndarray) -> Planned:
    """The strategy with its input restricted to `rows` (the candidates that passed the thresholds)."""
    scored = step.input
    return Planned(
        step.kind,
        step.strength,
        Scored(
            None if scored.values is None else scored.values[rows],
            None if scored.classes is None else scored.classes[rows],
            scored.class_names,
            scored.query,
        ),
        step.options,
    )
