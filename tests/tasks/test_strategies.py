"""Tests of selection_config's strategies (tasks/selection/strategies.py) against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.selection.methods import select
from tasks.selection.strategies import FLOOR, Planned, Scored, combine, explain, scaled, similarity


def brute_force(x: np.ndarray, n: int, fixed: np.ndarray, s_div: float | None) -> list[int]:
    """The Worker's rule, literally: each pick maximises distance^s_div x the product of fixed scores."""
    picked: list[int] = []
    for _ in range(n):
        best, best_value = None, -np.inf
        for i in range(len(x)):
            if i in picked:
                continue
            value = fixed[i]
            if s_div is not None and picked:
                value *= min(float(np.linalg.norm(x[i] - x[j])) for j in picked) ** s_div
            if value > best_value:
                best, best_value = i, value
        picked.append(best)
    return picked


@pytest.fixture
def points() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(40, 5)).astype(np.float32)


@pytest.mark.parametrize("s_div, s_w", [(1.0, 1.0), (2.0, 0.5), (0.5, 3.0)])
def test_the_greedy_product_of_diversity_and_weights(points, s_div, s_w):
    values = np.random.default_rng(4).uniform(1, 10, len(points))
    plan = [Planned("DIVERSITY", s_div), Planned("WEIGHTS", s_w, Scored(values=values))]
    got = combine(points, plan, 8, None, None, device="cpu")[0].indices.tolist()
    assert got == brute_force(points, 8, scaled(values) ** s_w, s_div)


def test_weights_alone_take_the_heaviest(points):
    values = np.random.default_rng(5).uniform(size=len(points))
    got = combine(points, [Planned("WEIGHTS", 1.0, Scored(values=values))], 5, None, None, device="cpu")[0]
    assert got.indices.tolist() == np.argsort(-values)[:5].tolist()
    negative = combine(points, [Planned("WEIGHTS", -1.0, Scored(values=values))], 5, None, None, device="cpu")[0]
    assert negative.indices.tolist() == np.argsort(values)[:5].tolist()


def test_pure_diversity_is_kcenter(points):
    got = combine(points, [Planned("DIVERSITY", 1.0)], 10, None, None, seed=2, device="cpu")[0]
    want = select(points, "coreset", 10, None, None, seed=2, device="cpu")
    assert got.indices.tolist() == want.indices.tolist()


def test_thresholds_apply_first_and_missing_values_fail(points):
    values = np.arange(len(points), dtype=float)
    values[3] = np.nan
    plan = [
        Planned("THRESHOLD", 1.0, Scored(values=values), {"threshold": 10, "operation": "SMALLER_EQUAL"}),
        Planned("DIVERSITY", 1.0),
    ]
    picks, _ = combine(points, plan, 20, None, None, device="cpu")
    assert sorted(picks.indices.tolist()) == [i for i in range(11) if i != 3]
    assert explain(plan, {}, picks.indices)[0]["n_removed"] == len(points) - 10


def test_balance_reaches_its_target_when_the_pool_allows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    classes = np.zeros((200, 2))
    classes[:180, 0] = 1  # a 90/10 split
    classes[180:, 1] = 1
    balance = Planned(
        "BALANCE", 1.0, Scored(classes=classes, class_names=("a", "b")), {"distribution": "UNIFORM", "target": None}
    )
    picks, _ = combine(x, [Planned("DIVERSITY", 1.0), balance], 40, None, None, device="cpu")
    share = classes[picks.indices].mean(axis=0)
    assert abs(share[1] - 0.5) <= 0.05
    shown = explain([Planned("DIVERSITY", 1.0), balance], {}, picks.indices)[1]
    assert shown["before"] == [0.9, 0.1] and abs(shown["after"][1] - 0.5) <= 0.05


def test_balance_follows_a_given_target():
    x = np.random.default_rng(1).normal(size=(300, 3)).astype(np.float32)
    classes = np.eye(3)[np.arange(300) % 3]
    balance = Planned(
        "BALANCE",
        1.0,
        Scored(classes=classes, class_names=("a", "b", "c")),
        {"distribution": "TARGET", "target": {"a": 0.2, "b": 0.5}},
    )
    picks, _ = combine(x, [balance], 100, None, None, device="cpu")
    assert np.bincount(np.argmax(classes[picks.indices], axis=1)).tolist() == [20, 50, 30]


def test_similarity_ranks_by_cosine_to_the_nearest_query_row():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0], [0.5, 0.5]], dtype=np.float32)
    query = np.array([[1.0, 0.0]])
    assert np.argsort(-similarity(x, query)).tolist() == [0, 1, 4, 2, 3]
    picks, _ = combine(x, [Planned("SIMILARITY", 1.0, Scored(query=query))], 3, None, None, device="cpu")
    assert picks.indices.tolist() == [0, 1, 4]


def test_typicality_picks_the_dense_region_first_and_negative_strength_the_outliers():
    rng = np.random.default_rng(2)
    dense = rng.normal(scale=0.05, size=(50, 2))
    outliers = rng.uniform(3, 6, size=(5, 2)) * rng.choice([-1, 1], size=(5, 2))
    x = np.vstack([dense, outliers]).astype(np.float32)
    typical = Planned("TYPICALITY", 1.0, options={"num_nearest_neighbors": 5})
    picks, _ = combine(x, [typical], 5, None, None, device="cpu")
    assert max(picks.indices) < 50
    atypical = Planned("TYPICALITY", -1.0, options={"num_nearest_neighbors": 5})
    picks, _ = combine(x, [atypical], 5, None, None, device="cpu")
    assert sorted(picks.indices.tolist()) == list(range(50, 55))


def test_stopping_conditions_on_the_picks(points):
    values = np.ones(len(points))
    plan = [Planned("WEIGHTS", 1.0, Scored(values=values), {"stopping_condition_max_sum": 7.5})]
    assert len(combine(points, plan, None, None, None, device="cpu")[0].indices) == 7
    picks, _ = combine(points, [Planned("DIVERSITY", 1.0)], None, 2.5, None, device="cpu")
    chosen = points[picks.indices]
    gaps = np.linalg.norm(chosen[:, None] - chosen[None], axis=-1)[np.triu_indices(len(chosen), 1)]
    assert gaps.min() >= 2.5


def test_the_datapool_counts_as_selected(points):
    picks, _ = combine(points, [Planned("DIVERSITY", 1.0)], None, 1.0, points[:1], device="cpu")
    assert 0 not in picks.indices.tolist()
    assert np.linalg.norm(points[picks.indices] - points[0], axis=1).min() >= 1.0


def test_scaled_keeps_ratios_and_gives_missing_values_the_floor():
    assert scaled(np.array([1.0, 2.0, np.nan])).tolist() == [0.5, 1.0, FLOOR]
