import itertools

import numpy as np
import pytest
from scipy.spatial.distance import cdist

import tasks.report.quality
from tasks.report.advice import calibrate_min_distance, how_many, lower_bounds
from tasks.report.quality import RunSelection, label_free, probe_budget, probe_comparison, rerun
from tasks.selection.methods import select
from tasks.selection.tasks import SelectOptions


def covering_radii(x: np.ndarray, rows: np.ndarray, centers: np.ndarray | None = None) -> np.ndarray:
    """Brute force: the covering radius of the candidates after each pick (datapool centers count as picked)."""
    nearest = np.full(len(x), np.inf) if centers is None else cdist(x, centers).min(axis=1)
    radii = []
    for row in rows:
        nearest = np.minimum(nearest, cdist(x, x[row : row + 1])[:, 0])
        radii.append(nearest.max())
    return np.array(radii, np.float32)


def pick_distances(x: np.ndarray, rows: np.ndarray, centers: np.ndarray | None = None) -> np.ndarray:
    """Brute force: each pick's distance to the datapool and the picks before it."""
    earlier = [x[rows[:j]] for j in range(len(rows))]
    pool = [e if centers is None else np.vstack([e, centers]) for e in earlier]
    return np.array([cdist(x[r : r + 1], p).min() if len(p) else np.inf for r, p in zip(rows, pool)], np.float32)


def optimal_radius(x: np.ndarray, k: int) -> float:
    """Brute force over every selection of k candidates."""
    return min(cdist(x, x[list(rows)]).min(axis=1).max() for rows in itertools.combinations(range(len(x)), k))


def clusters(sizes: list[int], d: int = 8, spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d)) * 3
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return (centres[labels] + spread * rng.normal(size=(len(labels), d))).astype(np.float32), labels


def test_a_selection_with_one_sample_per_class_beats_random_picks_of_imbalanced_classes():
    x, labels = clusters([500] + [20] * 9)
    one_each = np.array([np.flatnonzero(labels == c)[0] for c in range(10)])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    result = probe_budget(unit, labels, one_each, np.arange(len(x)), seed=0)
    # random picks of 10 come mostly from the large class and miss most small ones
    assert result["selection"] == 1.0 and result["n_samples"] == 10 and len(result["random"]) == 5
    assert max(result["random"]) < 0.95 and result["random_std"] > 0
    assert result["gain_points"] == pytest.approx(100 * (1.0 - np.mean(result["random"])), abs=0.01)
    assert result["gain_points"] > 5


def test_the_probe_runs_at_smaller_budgets_as_prefixes_and_at_larger_ones_by_selecting_again():
    x, labels = clusters([120, 120, 120], d=6, spread=1.0, seed=1)
    run = RunSelection(SelectOptions("coreset", 10, None, True, 3, "cpu", 1), None)
    chosen = select(x, "coreset", 40, None, seed=3).indices
    comparison = probe_comparison(x, labels, chosen, run)
    budgets = [(b["n_samples"], b["source"]) for b in comparison["budgets"]]
    assert budgets == [(5, "prefix"), (10, "prefix"), (20, "prefix"), (40, "run"), (80, "re-run"), (160, "re-run")]
    assert comparison["n_classes"] == 3 and comparison["eval_exact"] and comparison["n_eval"] == len(x)
    assert all(0.0 <= b["selection"] <= 1.0 and len(b["random"]) == 5 for b in comparison["budgets"])


@pytest.mark.parametrize("method", ["coreset", "typical_coreset"])
@pytest.mark.parametrize("datapool", [False, True])
def test_the_larger_budgets_go_on_from_the_run_s_picks_and_equal_a_selection_afresh(method, datapool, monkeypatch):
    x, _ = clusters([150, 150, 150], d=6, spread=1.0, seed=2)
    centers = x[::50] + 0.5 if datapool else None
    chosen = select(x, method, 40, None, centers, seed=3).indices
    run = RunSelection(SelectOptions(method, 40, None, True, 3, "cpu", 1), centers)
    asked, original = [], tasks.report.quality.select
    monkeypatch.setattr(
        tasks.report.quality, "select", lambda v, m, n, *rest: asked.append(n) or original(v, m, n, *rest)
    )
    picks = rerun(x, chosen, [80, 160], run)
    afresh = select(x, method, 160, None, centers, seed=3).indices
    assert asked == [120]  # only the picks beyond the run's 40
    np.testing.assert_array_equal(picks[160], afresh)
    np.testing.assert_array_equal(picks[80], afresh[:80])


@pytest.mark.parametrize("seed", range(4))
def test_the_certified_bound_lies_below_the_best_possible_radius_and_is_half_the_greedy_radius(seed):
    x = np.random.default_rng(seed).normal(size=(9, 3)).astype(np.float32)
    for k in (2, 3):
        greedy = select(x, "coreset", k, None, seed=seed).indices
        radius = covering_radii(x, greedy)
        bound = lower_bounds(pick_distances(x, greedy), radius)
        best = optimal_radius(x, k)
        assert bound[-1] <= best + 1e-6 <= radius[-1] + 2e-6 and radius[-1] <= 2 * best + 1e-5
        np.testing.assert_allclose(bound, radius / 2, rtol=1e-6)  # pure k-center: r / 2 after every pick
        # any selection order, a random one too, gives a valid (if weaker) bound
        other = np.random.default_rng(seed).permutation(len(x))[:k]
        assert lower_bounds(pick_distances(x, other), covering_radii(x, other))[-1] <= best + 1e-6


def test_with_a_datapool_the_bound_stays_below_the_achieved_radius():
    rng = np.random.default_rng(5)
    x, pool = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(20, 8)).astype(np.float32)
    picks = select(x, "coreset", 25, None, initial_centers=pool, seed=0).indices
    radius, distances = covering_radii(x, picks, pool), pick_distances(x, picks, pool)
    advice = how_many(distances, radius)
    assert advice["k"] == 25 and advice["lower_bound"] <= advice["radius"] == pytest.approx(float(radius[-1]))
    assert advice["separation"] == pytest.approx(float(distances.min()))
    assert np.all(np.array(advice["curve"]["lower_bound"]) <= np.array(advice["curve"]["radius"]))
    assert how_many(distances, None) is None  # no radii (method=random): no curve


def test_the_radius_curve_flattens_once_the_clusters_are_covered():
    x, _ = clusters([200] * 6, d=32, spread=0.05, seed=2)
    picks = select(x, "coreset", 300, None, seed=0).indices
    advice = how_many(pick_distances(x, picks), covering_radii(x, picks))
    # six far-apart clusters: the radius falls steeply until each has a pick, slowly inside them
    assert advice["suggested_n_samples"] is not None and 6 <= advice["suggested_n_samples"] <= 16
    steep = how_many(pick_distances(x, picks[:5]), covering_radii(x, picks[:5]))
    assert steep["suggested_n_samples"] is None  # still covering clusters at the end: no suggestion
    assert advice["curve"]["n_selected"][0] == 1 and advice["curve"]["n_selected"][-1] == 300


def test_the_suggested_min_distance_separates_near_duplicates_from_ordinary_neighbours():
    rng = np.random.default_rng(6)
    base = rng.normal(size=(200, 32)).astype(np.float32)
    twins = base[:80] + 1e-3 * rng.normal(size=(80, 32)).astype(np.float32)
    x = np.vstack([base, twins])
    names = [f"f{i}" for i in range(len(x))]
    calibration = calibrate_min_distance(x, names, seed=0)
    full = cdist(x, x)
    np.fill_diagonal(full, np.inf)
    nn = full.min(axis=1)
    duplicates, ordinary = np.r_[nn[:80], nn[200:]], nn[80:200]
    assert calibration["rule"] == "otsu" and calibration["otsu_effectiveness"] >= 0.8 and calibration["exact"]
    assert duplicates.max() < calibration["suggested_min_distance"] < ordinary.min()
    assert nn.min() <= calibration["suggested_min_distance"] <= nn.max()
    assert calibration["nn_median"] == pytest.approx(np.median(nn), rel=1e-5)
    assert calibration["share_below"] == pytest.approx(160 / 280)
    below, above = calibration["pairs_below"], calibration["pairs_above"]
    assert len(below) == len(above) == 2
    assert all(p["distance"] < calibration["suggested_min_distance"] <= q["distance"] for p in below for q in above)


def test_without_near_duplicates_the_suggestion_is_a_low_quantile_within_the_range():
    x = np.random.default_rng(7).normal(size=(400, 16)).astype(np.float32)
    calibration = calibrate_min_distance(x, [str(i) for i in range(400)], seed=0)
    full = cdist(x, x)
    np.fill_diagonal(full, np.inf)
    nn = full.min(axis=1)
    assert calibration["rule"] == "quantile" and calibration["otsu_effectiveness"] < 0.8
    assert calibration["suggested_min_distance"] == pytest.approx(np.quantile(nn, 0.05), rel=1e-5)
    assert nn.min() <= calibration["suggested_min_distance"] <= nn.max()
    assert calibrate_min_distance(x[:2], ["a", "b"], seed=0) is None


def test_the_label_free_measures_match_brute_force():
    x, _ = clusters([150, 30, 20], d=5, spread=0.5, seed=3)
    full = cdist(x, x)
    np.fill_diagonal(full, np.inf)
    reference = np.sort(full, axis=1)[:, :20].mean(axis=1)

    chosen = np.array([0, 160, 190, 5])
    tau = float(np.median(full.min(axis=1)))
    measures = label_free(x, chosen, None, tau, seed=0)
    nearest = cdist(x, x[chosen]).min(axis=1)
    dense = np.argsort(-1 / reference, kind="stable")[:20]
    assert measures["exact"] and measures["n_queries"] == len(x) and measures["n_dense"] == 20
    assert measures["selection"]["covering_radius"] == pytest.approx(nearest.max(), rel=1e-4)
    assert measures["selection"]["mean_distance"] == pytest.approx(nearest.mean(), rel=1e-4, abs=1e-5)
    assert measures["selection"]["dense_covered"] == pytest.approx(np.mean(nearest[dense] <= tau))
    assert set(measures["random_mean"]) == set(measures["random_std"]) == set(measures["selection"])
