"""The selection methods on arrays: typicality-weighted coverage (the default), k-center greedy
("coreset") and seeded random, with the memory plan that places the matrix on the device.

Pure computation on arrays: the Parquet tables and the Prefect tasks are in `tasks.selection.tasks`;
the greedy loops in `tasks.selection.greedy`.

Example:
    >>> import numpy as np
    >>> from tasks.selection.methods import select
    >>> x = np.array([[0, 0], [0, 1], [5, 5], [0, 0]], dtype=np.float32)
    >>> r = select(x, "coreset", n_samples=3, min_distance=0.5, seed=0)
    >>> r.indices.tolist(), [round(float(v), 2) for v in r.distances]
    ([3, 2, 1], [inf, 7.07, 1.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tasks.selection.backends import Backend, resolve_backend
from tasks.selection.distances import TILE_ELEMENTS, Points, error_guard, min_sqdist, sqdist_tile, with_norms
from tasks.selection.greedy import GreedyState, SelectionResult, Steering, kcenter_greedy, result, weighted_greedy
from tasks.selection.typicality import typicality

# Typicality's exponent in the default method's score: chosen on the labelled sets of
# benchmarks/selection_quality.py (0.5 beat 0.25, 0.75, 1 and 2 on average over them).
TYPICALITY_STRENGTH = 0.5
# Fraction of the free memory a plan may use: leaves room for allocator slack.
MEMORY_HEADROOM = 0.8
# Per-row bytes of working state during greedy: squared norms, min-distance, product buffer.
STATE_BYTES_PER_ROW = 12


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    """Where the matrix lives: its storage dtype on the device and how many shards."""

    storage: str
    n_shards: int


def plan_storage(n: int, d: int, free_bytes: int, *, copies_matrix: bool, half_allowed: bool) -> Plan:
    """Pick float32 if the matrix fits, else half precision (GPU), else shards that fit.

    `copies_matrix` is False when the backend reads the caller's float32 array in place.

    >>> plan_storage(10**6, 128, 8 * 2**30, copies_matrix=True, half_allowed=True)
    Plan(storage='float32', n_shards=1)
    >>> plan_storage(10**6, 128, 2**29, copies_matrix=True, half_allowed=False)
    Plan(storage='float32', n_shards=3)
    """
    budget = MEMORY_HEADROOM * free_bytes - TILE_ELEMENTS * 4 * 3
    for storage, itemsize in (("float32", 4), ("float16", 2)):
        if storage == "float16" and not half_allowed:
            continue
        per_row = d * itemsize * copies_matrix + STATE_BYTES_PER_ROW
        if n * per_row <= budget:
            return Plan(storage, 1)
    itemsize = 2 if half_allowed else 4
    per_row = d * itemsize + STATE_BYTES_PER_ROW
    # One more shard than the bare quotient: round two must fit beside nothing else.
    return Plan("float16" if half_allowed else "float32", math.ceil(n * per_row / budget) + 1)


def _storage_dtype(bk: Backend, storage: str, max_abs: float) -> str:
    # float16 keeps more mantissa bits for normalised embeddings; bfloat16 when values overflow.
    if storage != "float16" or max_abs < 6e4:
        return storage
    if not bk.has_bfloat16:
        raise ValueError(
            f"embeddings reach {max_abs:.3g}, beyond float16, and do not fit on the GPU in "
            "float32: L2-normalise them, or install torch without CuPy for bfloat16 storage"
        )
    return "bfloat16"


def _max_abs(embeddings: np.ndarray) -> float:
    step = max(1, TILE_ELEMENTS // max(1, embeddings.shape[1]))
    blocks = range(0, len(embeddings), step)
    return max(float(np.abs(embeddings[a : a + step]).max()) for a in blocks)


def _device_points(bk: Backend, embeddings: np.ndarray, storage: str) -> tuple[Points, str]:
    if storage == "float16":
        storage = _storage_dtype(bk, storage, _max_abs(embeddings))
    # Norms of the stored (possibly rounded) values, so that a row's self-distance is 0.
    points = with_norms(bk, bk.from_host(embeddings, storage))
    if not bool(np.isfinite(bk.to_host(points.sqn)).all()):
        raise ValueError("embeddings contain NaN or inf (or values too large for float32)")
    return points, storage


def _prepare(
    bk: Backend, embeddings: np.ndarray, initial_centers: np.ndarray | None, storage: str
) -> tuple[Points, Points | None, float]:
    """The rows and the initial centers (None when there are none) on the device, stored alike,
    with the `error_guard` of both."""
    x, storage = _device_points(bk, embeddings, storage)
    max_sqn = float(bk.to_host(x.sqn.max()))
    initial = None
    if initial_centers is not None and len(initial_centers):
        initial = with_norms(bk, bk.from_host(initial_centers, storage))
        max_sqn = max(max_sqn, float(bk.to_host(initial.sqn.max())))
    return x, initial, error_guard(bk, embeddings.shape[1], max_sqn, storage)


# --------------------------------------------------------------------------- strategies


def coreset(
    embeddings: np.ndarray,
    n_samples: int | None,
    min_distance: float | None,
    initial_centers: np.ndarray | None = None,
    seed: int = 0,
    backend: Backend | None = None,
    storage: str | None = None,
    weights: np.ndarray | None = None,
    distance: bool = True,
    steering: Steering | None = None,
) -> SelectionResult:
    """k-center greedy on one device, or in two rounds when the matrix does not fit there.

    `storage` forces the on-device dtype ('float32', 'float16', 'bfloat16'); by default the
    plan from the free memory decides, and a plan with several shards runs `coreset_two_round`.
    With `weights` (one > 0 per row), each step maximises distance² x weight instead
    (`greedy.weighted_greedy`), starting from the heaviest row; without `distance`, the weight
    alone. `steering` (BALANCE, stopping conditions on the picks) needs one device.
    """
    bk = backend or resolve_backend()
    n, d = embeddings.shape
    if storage is None:
        zero_copy = not bk.is_gpu and embeddings.dtype == np.float32 and embeddings.flags.c_contiguous
        plan = plan_storage(n, d, bk.free_bytes(), copies_matrix=not zero_copy, half_allowed=bk.is_gpu)
        if plan.n_shards > 1:
            if steering is not None or not distance:
                raise ValueError(
                    f"{n} x {d} embeddings do not fit in the selection device's free memory, which BALANCE, "
                    "WEIGHTS' stopping_condition_max_sum, TYPICALITY's stopping_condition_minimum_typicality and "
                    "selections without DIVERSITY need; select on a machine with more memory, or without them"
                )
            return coreset_two_round(
                embeddings, n_samples, min_distance, plan.n_shards, initial_centers, seed, bk, plan.storage, weights
            )
        storage = plan.storage
    if n == 0 or n_samples == 0:
        return result([], [], [])
    x, initial, guard = _prepare(bk, embeddings, initial_centers, storage)
    if weights is None and distance and steering is None:
        first = None if initial is not None else int(np.random.default_rng(seed).integers(n))
        return kcenter_greedy(bk, x, initial, first, n_samples, min_distance, guard)
    weights = np.ones(n, np.float32) if weights is None else weights
    factor = steering.factor([]) if steering is not None else None
    first = None if initial is not None and distance else int(np.argmax(weights * (1 if factor is None else factor)))
    state = GreedyState.start(bk, x, initial, guard)
    # A copy, also on the CPU: the greedy zeroes the weights of rows it finds too close.
    device_weights = bk.from_host(weights.astype(np.float32))
    return weighted_greedy(state, device_weights, first, n_samples, min_distance, distance, steering)


def coreset_two_round(
    embeddings: np.ndarray,
    n_samples: int | None,
    min_distance: float | None,
    n_shards: int,
    initial_centers: np.ndarray | None = None,
    seed: int = 0,
    backend: Backend | None = None,
    storage: str = "float32",
    weights: np.ndarray | None = None,
) -> SelectionResult:
    """Two-round k-center for N too large for one device: greedy per shard, then on the union.

    Round one runs k-center greedy with the same stopping condition on each of `n_shards`
    contiguous row ranges; round two runs it again over the union of their picks. With a count
    limit k this is a 4-approximation of the optimal covering radius, against 2 for sequential
    greedy (Malkomes et al., NeurIPS 2015; Ceccarello, Pietracaprina & Pucci, "Solving k-center
    clustering (with outliers) in MapReduce and streaming, almost as accurately as
    sequentially", arXiv:1802.09205, show that taking more than k per shard brings it to 2+ε
    in low doubling dimension). With `min_distance` the picks still keep min_distance between
    each other and from the initial centers (round two enforces it); every row is then within
    2·min_distance of a pick. Reported distances are exact for the returned picks; covering radii
    are not known (round two sees only the union).
    """
    bk = backend or resolve_backend()
    n = len(embeddings)
    bounds = np.linspace(0, n, n_shards + 1).astype(int)
    union: list[np.ndarray] = []
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        shard_seed = int(np.random.SeedSequence([seed, j]).generate_state(1)[0])
        shard = coreset(
            embeddings[a:b],
            n_samples,
            min_distance,
            initial_centers,
            shard_seed,
            bk,
            storage,
            None if weights is None else weights[a:b],
        )
        union.append(shard.indices + a)
    rows = np.sort(np.concatenate(union)) if union else np.empty(0, dtype=np.int64)
    final = coreset(
        embeddings[rows],
        n_samples,
        min_distance,
        initial_centers,
        seed,
        bk,
        storage,
        None if weights is None else weights[rows],
    )
    return SelectionResult(rows[final.indices], final.distances)


def typicality_weights(
    bk: Backend, embeddings: np.ndarray, seed: int = 0, strength: float = TYPICALITY_STRENGTH
) -> np.ndarray:
    """The weights of the default method, typical_coreset: coverage that respects density. With them,
    `coreset` picks at each step the row that maximises distance to the selection x typicality^strength
    (`tasks.selection.typicality`); the first pick is the most typical row.

    Pure k-center greedy spends its budget on the farthest, least typical samples (outliers, odd
    crops, blank frames) and under-samples the dense regions where most test cases lie; at small
    budgets the most typical samples teach a model most (TypiClust, ProbCover). The product keeps
    the picks spread out and, among candidates about equally far, takes the typical one.
    `benchmarks/selection_quality.py` compares it with k-center, random and the strengths around the
    default on labelled sets.
    """
    weights = typicality(bk, embeddings, seed=seed) ** (2 * strength)  # they weigh squared distances
    return weights / weights.max()


def random_subset(
    embeddings: np.ndarray,
    n_samples: int | None,
    initial_centers: np.ndarray | None = None,
    seed: int = 0,
    backend: Backend | None = None,
) -> SelectionResult:
    """Uniform sample without replacement from np.random.default_rng(seed); it has no `min_distance`.

    Distances cost O(k·(M + k)·d) in GEMM tiles, far below greedy's O(k·N·d).
    """
    bk = backend or resolve_backend()
    n = len(embeddings)
    size = n if n_samples is None else min(n_samples, n)
    picks = np.random.default_rng(seed).choice(n, size=size, replace=False)
    if len(picks) == 0:
        return result([], [])
    x, initial, guard = _prepare(bk, embeddings, initial_centers, "float32")
    return SelectionResult(picks.astype(np.int64), _pick_distances(bk, x, initial, picks, guard))


def _pick_distances(bk: Backend, x: Points, initial: Points | None, picks: np.ndarray, guard: float) -> np.ndarray:
    """Distance of each pick to the initial centers and the picks before it."""
    out = np.empty(len(picks), dtype=np.float32)
    block = max(1, min(1024, len(picks)))
    for a in range(0, len(picks), block):
        rows = Points(x.data, x.sqn, bk.index(picks[a : a + block]))
        earlier = [initial] if initial is not None else []
        earlier += [Points(x.data, x.sqn, bk.index(picks[:a]))] if a else []
        best = bk.full(len(rows), math.inf)
        for centers in earlier:
            bk.minimum(best, min_sqdist(bk, rows, centers, guard))
        r, r_sqn = rows.block(bk, 0, len(rows))
        within = bk.to_host(sqdist_tile(bk, r, r_sqn, r, r_sqn, guard))
        within[np.triu_indices(len(rows))] = np.inf  # only picks made before count
        out[a : a + block] = np.sqrt(np.minimum(bk.to_host(best), within.min(axis=1)))
    return out


METHODS = ("typical_coreset", "coreset", "random")


def _check_embeddings(embeddings: np.ndarray, initial_centers: np.ndarray | None) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, d) array; got shape {embeddings.shape}")
    if initial_centers is not None and (initial_centers.ndim != 2 or initial_centers.shape[1] != embeddings.shape[1]):
        raise ValueError(
            f"initial_centers must be an (M, {embeddings.shape[1]}) array like the embeddings; "
            f"got shape {initial_centers.shape}"
        )


def select(
    embeddings: np.ndarray,
    method: str,
    n_samples: int | None,
    min_distance: float | None,
    initial_centers: np.ndarray | None = None,
    seed: int = 0,
    device: str = "auto",
) -> SelectionResult:
    """Run the selection strategy `method` under the stopping condition; see the module doc.

    The caller's arrays are never modified. `n_samples` is a row count (None: no count limit),
    `min_distance` None when there is none; the config makes sure that at least one is set.
    """
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {list(METHODS)}")
    assert n_samples is not None or min_distance is not None, "the selection would never stop"
    assert n_samples is None or n_samples >= 0, n_samples
    assert min_distance is None or (math.isfinite(min_distance) and min_distance >= 0), min_distance
    _check_embeddings(embeddings, initial_centers)
    backend = resolve_backend(device)
    if method == "random":
        assert min_distance is None, "random selection ignores distances (the config rejects min_distance)"
        return random_subset(embeddings, n_samples, initial_centers, seed, backend)
    typical = method == "typical_coreset" and len(embeddings)
    weights = typicality_weights(backend, embeddings, seed) if typical else None
    return coreset(embeddings, n_samples, min_distance, initial_centers, seed, backend, weights=weights)
