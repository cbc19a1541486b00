"""Tests of tasks/selection/ against brute-force references, on every backend that runs on CPU.

The torch backend runs on a CPU device here: it drives the same batched, roll-back greedy loop
that a CUDA GPU runs, including half-precision storage.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tasks.selection.backends import ArrayModuleBackend, TorchBackend
from tasks.selection.methods import Plan, coreset, coreset_two_round, plan_storage, random_subset, select
from tasks.selection.tasks import SelectOptions
from tasks.selection.typicality import typicality

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

torch = pytest.importorskip("torch")

# (backend, storage): check_every=1 and 3 force the roll-back paths on tiny inputs.
BACKENDS = {
    "numpy-1": (ArrayModuleBackend(np, check_every=1), "float32"),
    "numpy-3": (ArrayModuleBackend(np, check_every=3), "float32"),
    "numpy-64": (ArrayModuleBackend(np), "float32"),
    "torch-3": (TorchBackend("cpu", check_every=3), "float32"),
    "torch-f16": (TorchBackend("cpu", check_every=3), "float16"),
    "torch-bf16": (TorchBackend("cpu", check_every=2), "bfloat16"),
}


def reference(
    x: np.ndarray, n: int | None, md: float | None, centers: np.ndarray | None, seed: int
) -> tuple[list[int], list[float]]:
    """Textbook farthest-point sampling in float64 with direct distances."""
    x = x.astype(np.float64)
    limit = len(x) if n is None else min(n, len(x))
    mind = np.full(len(x), np.inf)
    for c in [] if centers is None else centers.astype(np.float64):
        mind = np.minimum(mind, np.linalg.norm(x - c, axis=1))
    picked: list[int] = []
    dists: list[float] = []
    while len(picked) < limit:
        if not picked and centers is None:
            i = int(np.random.default_rng(seed).integers(len(x)))
        else:
            candidates = mind.copy()
            candidates[picked] = -np.inf
            i = int(np.argmax(candidates))
            if md is not None and candidates[i] < md:
                break
        picked.append(i)
        dists.append(float(mind[i]))
        mind = np.minimum(mind, np.linalg.norm(x - x[i], axis=1))
    return picked, dists


def covering_radius(x: np.ndarray, centers: np.ndarray) -> float:
    gaps = np.linalg.norm(x[:, None, :] - centers[None, :, :], axis=2)
    return float(gaps.min(axis=1).max())


def optimal_radius(x: np.ndarray, k: int) -> float:
    return min(covering_radius(x, x[list(c)]) for c in itertools.combinations(range(len(x)), k))


@st.composite
def grid_problems(draw: st.DrawFn) -> tuple:
    """Points on a half-integer grid: float32 arithmetic is exact there, ties and duplicates
    are frequent, and every non-zero squared distance is at least 0.25."""
    d = draw(st.integers(1, 4))
    n = draw(st.integers(1, 18))
    x = draw(arrays(np.int8, (n, d), elements=st.integers(-3, 3))).astype(np.float32) / 2
    m = draw(st.integers(0, 4))
    centers = draw(arrays(np.int8, (m, d), elements=st.integers(-3, 3))).astype(np.float32) / 2
    n_samples = draw(st.none() | st.integers(0, n + 2))
    md = draw(
        st.sampled_from([None, 0.0, 0.5, 1.0, 1.5, 2.0])
        if n_samples is not None
        else st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0])
    )
    return x, n_samples, md, centers if m else None, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("name", BACKENDS)
@FAST
@given(problem=grid_problems())
def test_coreset_equals_brute_force(name: str, problem: tuple) -> None:
    x, n_samples, md, centers, seed = problem
    backend, storage = BACKENDS[name]
    got = coreset(x, n_samples, md, centers, seed, backend, storage)
    want_idx, want_dist = reference(x, n_samples, md, centers, seed)
    assert got.indices.dtype == np.int64 and got.distances.dtype == np.float32
    assert got.indices.tolist() == want_idx
    np.testing.assert_allclose(got.distances, want_dist, rtol=1e-6, atol=1e-6)


@FAST
@given(
    x=arrays(np.float64, st.tuples(st.integers(2, 7), st.integers(1, 3)), elements=st.floats(-10, 10, width=32)),
    k=st.integers(1, 3),
    seed=st.integers(0, 100),
)
def test_covering_radius_at_most_twice_optimal(x: np.ndarray, k: int, seed: int) -> None:
    k = min(k, len(x))
    picks = select(x.astype(np.float32), "coreset", k, None, seed=seed, device="cpu").indices
    optimum = optimal_radius(x, k)
    assert covering_radius(x, x[picks]) <= 2 * optimum + 1e-4
    two_round = coreset_two_round(x.astype(np.float32), k, None, 2, seed=seed)
    assert covering_radius(x, x[two_round.indices]) <= 4 * optimum + 1e-4


def near_duplicates(seed: int, n: int, d: int, scale: float) -> np.ndarray:
    """Clusters of exact and near copies (down to 1e-6 apart) that the expansion cannot
    tell apart in float32 without the exact recomputation."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(max(1, n // 4), d)) * scale
    rows = base[rng.integers(len(base), size=n)]
    noise = rng.normal(size=(n, d)) * rng.choice([0.0, 1e-6, 1e-3, 1e-1], size=(n, 1)) * scale
    return (rows + noise).astype(np.float32)


@pytest.mark.parametrize("name", ["numpy-3", "torch-3"])
@FAST
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 60),
    d=st.sampled_from([3, 64, 300]),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    md_scale=st.floats(0.0, 2.0),
    n_initial=st.integers(0, 3),
)
def test_min_distance_honoured_and_covering(
    name: str, seed: int, n: int, d: int, scale: float, md_scale: float, n_initial: int
) -> None:
    backend, storage = BACKENDS[name]
    x = near_duplicates(seed, n, d, scale)
    centers = x[:n_initial] + np.float32(0)  # exact copies of rows: those rows are never picked
    n_initial = len(centers)  # fewer than asked when n is small
    md = md_scale * scale
    got = coreset(x, None, md, centers if n_initial else None, seed, backend, storage)
    chosen = np.concatenate([centers, x[got.indices]]).astype(np.float64)
    pairwise = np.linalg.norm(chosen[:, None] - chosen[None, :], axis=2)
    pairwise[np.tril_indices(len(chosen))] = np.inf
    assert pairwise[:, n_initial:].min(initial=np.inf) >= md - 1e-5
    rest = np.setdiff1d(np.arange(n), got.indices)
    if len(chosen) and len(rest):
        assert covering_radius(x[rest].astype(np.float64), chosen) < md + 1e-5
    earlier = [
        np.linalg.norm(chosen[: n_initial + j] - chosen[n_initial + j], axis=1).min(initial=np.inf)
        for j in range(len(got.indices))
    ]
    # Away from 0 and min_distance, a reported squared distance may carry the expansion's error.
    expansion_error = 4 * d * np.finfo(np.float32).eps * (np.linalg.norm(x, axis=1) ** 2).max()
    np.testing.assert_allclose(got.distances**2.0, np.square(earlier), rtol=1e-5, atol=expansion_error)


@pytest.mark.parametrize("name", ["numpy-64", "torch-3", "torch-f16"])
def test_exact_duplicates_never_both_selected(name: str) -> None:
    backend, storage = BACKENDS[name]
    rng = np.random.default_rng(7)
    distinct = rng.normal(size=(50, 256)).astype(np.float32) * 20  # large norms: big cancellation
    x = distinct[rng.integers(50, size=400)]
    got = coreset(x, None, 1e-6, distinct[:5], 3, backend, storage)
    rows = {x[i].tobytes() for i in got.indices}
    assert len(rows) == len(got.indices) == 45
    assert not rows & {c.tobytes() for c in distinct[:5]}
    assert (got.distances > 1).all()


def test_asking_for_more_than_distinct_points_picks_duplicates_last() -> None:
    x = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)
    got = select(x, "coreset", 6, None, seed=0, device="cpu")  # seed 0 starts at row 5
    assert got.indices.tolist() == [5, 0, 2, 1, 3, 4]
    np.testing.assert_allclose(got.distances, [np.inf, math.sqrt(2), math.sqrt(2), 0, 0, 0])


def test_caller_arrays_untouched_and_any_layout_accepted() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    centers = rng.normal(size=(3, 16)).astype(np.float32)
    x_before, centers_before = x.copy(), centers.copy()
    want = select(x, "coreset", 20, 0.1, centers, seed=4, device="cpu")
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(centers, centers_before)
    fortran = select(np.asfortranarray(x.astype(np.float64)), "coreset", 20, 0.1, centers, 4, "cpu")
    np.testing.assert_array_equal(fortran.indices, want.indices)


def test_random_is_seeded_and_reports_distances() -> None:
    x = near_duplicates(0, 300, 8, 1.0)
    centers = x[:2] + 1
    a = select(x, "random", 40, None, centers, seed=5, device="cpu")
    b = random_subset(x, 40, centers, 5, TorchBackend("cpu"))
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices.tolist() == np.random.default_rng(5).choice(300, 40, replace=False).tolist()
    chosen = np.concatenate([centers, x[a.indices]]).astype(np.float64)
    want = [np.linalg.norm(chosen[: 2 + j] - chosen[2 + j], axis=1).min() for j in range(40)]
    np.testing.assert_allclose(a.distances, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.distances, a.distances, rtol=1e-5, atol=1e-5)
    assert select(x, "random", 1, None, seed=0, device="cpu").distances.tolist() == [np.inf]
    assert len(random_subset(x, None).indices) == 300


def test_two_round_runs_automatically_when_memory_is_short() -> None:
    class SmallMachine(ArrayModuleBackend):
        def free_bytes(self) -> int:
            return 80 * 2**20  # a float64 input (needs a float32 copy) of 1e5 x 64 does not fit

    x = np.random.default_rng(2).normal(size=(100_000, 64))
    plan = plan_storage(len(x), 64, SmallMachine(np).free_bytes(), copies_matrix=True, half_allowed=False)
    assert plan.n_shards > 1
    auto = coreset(x, 30, None, None, 1, SmallMachine(np))
    explicit = coreset_two_round(x, 30, None, plan.n_shards, None, 1, ArrayModuleBackend(np))
    assert auto.indices.tolist() == explicit.indices.tolist()
    assert len(set(auto.indices.tolist())) == 30


def test_two_round_keeps_min_distance() -> None:
    x = near_duplicates(3, 500, 8, 1.0)
    got = coreset_two_round(x, None, 0.5, 4, x[:1] + 0, seed=2)
    chosen = np.concatenate([x[:1], x[got.indices]]).astype(np.float64)
    pairwise = np.linalg.norm(chosen[:, None] - chosen[None, :], axis=2)
    assert pairwise[np.triu_indices(len(chosen), 1)].min() >= 0.5 - 1e-5
    assert covering_radius(x.astype(np.float64), chosen) < 2 * 0.5 + 1e-5


@pytest.mark.parametrize(
    ("free", "copies", "half", "want"),
    [
        (8 * 2**30, False, False, Plan("float32", 1)),
        (2**29, False, False, Plan("float32", 1)),  # read in place: only O(N) state is needed
        (2**29, True, False, Plan("float32", 3)),
        (400 * 2**20, True, True, Plan("float16", 1)),
        (100 * 2**20, True, True, Plan("float16", 9)),
    ],
)
def test_plan_storage(free: int, copies: bool, half: bool, want: Plan) -> None:
    assert plan_storage(10**6, 128, free, copies_matrix=copies, half_allowed=half) == want


@pytest.mark.parametrize(
    ("value", "total", "want"),
    [
        (None, 10, None),
        (0, 10, 0),
        (3, 10, 3),
        (50, 10, 10),
        (0.25, 10, 2),
        (1.0, 7, 7),
        (0.5, 3, 2),
        (1e-9, 10, 0),
        (np.int64(4), 10, 4),
    ],
)
def test_count(value: int | float | None, total: int, want: int | None) -> None:
    assert SelectOptions("coreset", value, None, True, 1, "cpu", 1).count(total) == want


X = np.eye(4, dtype=np.float32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: select(X, "kmeans", 2, None), r"unknown selection method 'kmeans'.*coreset"),
        (lambda: select(X, "coreset", 2, None, device="tpu"), r"device must be.*'tpu'"),
        (lambda: select(X[0], "coreset", 2, None), r"2-D"),
        (lambda: select(X, "coreset", 2, None, np.ones((2, 3))), r"initial_centers.*\(M, 4\)"),
        (lambda: select(X * np.nan, "coreset", 2, None, device="cpu"), r"NaN"),
    ],
)
def test_errors_name_the_setting(call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        select(X, "coreset", 2, None, device="cuda")


def test_empty_inputs() -> None:
    for method in ("coreset", "random"):
        got = select(np.empty((0, 4), np.float32), method, 5, None, device="cpu")
        assert got.indices.shape == got.distances.shape == (0,)
        assert len(select(X, method, 0, None, device="cpu").indices) == 0


def weighted_reference(
    x: np.ndarray, w: np.ndarray, n: int | None, md: float | None, centers: np.ndarray | None
) -> list[int]:
    """Greedy argmax of squared distance x weight in float64, with direct distances: candidates
    closer than md are out; once all distances are 0, the heaviest unpicked row."""
    x = x.astype(np.float64)
    limit = len(x) if n is None else min(n, len(x))
    mind = np.full(len(x), np.inf)  # squared distances: exact on the grid, so ties break alike
    for c in [] if centers is None else centers.astype(np.float64):
        mind = np.minimum(mind, ((x - c) ** 2).sum(axis=1))
    picked: list[int] = []
    while len(picked) < limit:
        if not picked and centers is None:
            i = int(np.argmax(w))
        else:
            score = np.where(mind < (-1 if md is None else md**2), -1.0, mind * w)
            score[picked] = -1.0
            i = int(np.argmax(score))
            if score[i] <= 0:
                if md is not None:
                    break
                rest = w.copy()
                rest[picked] = -1.0
                i = int(np.argmax(rest))
                if rest[i] <= 0:
                    break
        picked.append(i)
        mind = np.minimum(mind, ((x - x[i]) ** 2).sum(axis=1))
    return picked


@pytest.mark.parametrize("name", BACKENDS)
@FAST
@given(problem=grid_problems(), data=st.data())
def test_weighted_coreset_equals_brute_force(name: str, problem: tuple, data: st.DataObject) -> None:
    x, n_samples, md, centers, seed = problem
    # Powers of two keep every product exact, so ties break alike.
    w = 2.0 ** -np.array(data.draw(st.lists(st.integers(0, 3), min_size=len(x), max_size=len(x))), np.float32)
    given_weights = w.copy()
    backend, storage = BACKENDS[name]
    got = coreset(x, n_samples, md, centers, seed, backend, storage, weights=w)
    assert (w == given_weights).all()  # the caller's weights are never modified
    assert got.indices.tolist() == weighted_reference(x, w, n_samples, md, centers)
    picks = x[got.indices].astype(np.float64)
    pool = np.empty((0, x.shape[1])) if centers is None else centers.astype(np.float64)

    def gap(rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:  # each row's distance to the chosen
        if not len(chosen):
            return np.full(len(rows), np.inf)
        return np.linalg.norm(rows[:, None] - chosen[None], axis=2).min(axis=1)

    want = [gap(picks[j : j + 1], np.concatenate([pool, picks[:j]]))[0] for j in range(len(picks))]
    np.testing.assert_allclose(got.distances, want, rtol=1e-6, atol=1e-6)
    radii = [gap(x.astype(np.float64), np.concatenate([pool, picks[: j + 1]])).max() for j in range(len(picks))]
    np.testing.assert_allclose(got.radii, radii, rtol=1e-5, atol=1e-5)


@FAST
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 60),
    md=st.sampled_from([None, 0.3, 0.8]),
    m=st.integers(0, 3),
    k=st.integers(1, 70),
)
def test_typical_coreset_honours_min_distance_and_the_datapool(
    seed: int, n: int, md: float | None, m: int, k: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    x[rng.integers(n, size=n // 4)] = x[0]  # duplicates
    centers = rng.normal(size=(m, 3)).astype(np.float32) if m else None
    got = select(x, "typical_coreset", k, md, centers, seed, "cpu")
    again = select(x, "typical_coreset", k, md, centers, seed, "cpu")
    assert got.indices.tolist() == again.indices.tolist()  # deterministic for a seed
    picks = x[got.indices].astype(np.float64)
    assert len(set(got.indices.tolist())) == len(got.indices) <= min(k, n)
    if md is not None:
        pairs = np.linalg.norm(picks[:, None] - picks[None], axis=2)[np.triu_indices(len(picks), 1)]
        assert (pairs >= md - 1e-6).all()
        if centers is not None:
            assert (np.linalg.norm(picks[:, None] - centers[None], axis=2) >= md - 1e-6).all()
        if len(picks) < k:  # stopped by distance: every row is within md of the selection
            every = picks if centers is None else np.concatenate([picks, centers.astype(np.float64)])
            assert np.linalg.norm(x[:, None] - every[None], axis=2).min(1).max() < md + 1e-6
    elif centers is None:
        assert len(picks) == min(k, n)


def test_typicality_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    dist = np.linalg.norm(x[:, None].astype(np.float64) - x[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    want = 1 / np.sort(dist, axis=1)[:, :20].mean(1)
    for backend, _ in BACKENDS.values():
        np.testing.assert_allclose(typicality(backend, x), want, rtol=1e-4)
    # Against a reference sample: the neighbours among those rows only (a row is not its own).
    rows = np.sort(np.random.default_rng(0).choice(300, 100, replace=False))
    sub = dist[:, rows]
    np.testing.assert_allclose(
        typicality(BACKENDS["numpy-64"][0], x, k=5, reference=100, seed=0),
        1 / np.sort(sub, axis=1)[:, :5].mean(1),
        rtol=1e-4,
    )


def test_typical_coreset_prefers_the_typical_sample_among_equally_far_ones() -> None:
    # A dense cluster and one far outlier: k-center's second pick is the outlier; the default covers the
    # cluster first.
    rng = np.random.default_rng(0)
    cluster = rng.normal(scale=0.5, size=(200, 2))
    x = np.concatenate([cluster, [[3.0, 0.0]]]).astype(np.float32)
    typical = select(x, "typical_coreset", 3, None, None, 0, "cpu").indices
    spread = select(x, "coreset", 3, None, None, 0, "cpu").indices
    assert spread[1] == 200 and 200 not in typical
    assert np.linalg.norm(x[typical[0]] - cluster.mean(0)) < 0.3  # the first pick is the most typical
