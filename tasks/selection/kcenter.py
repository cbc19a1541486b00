"""Select a diverse subset of embeddings: k-center greedy ("coreset") or seeded random.

k-center greedy (farthest-point sampling) picks, at each step, the row farthest from every
center chosen so far (the datapool of earlier runs included) and stops at a sample count, at a
minimum distance, or at whichever comes first. Pure computation on arrays: the Parquet tables
and the Prefect tasks are in `tasks.selection.tasks`.

Example:
    >>> import numpy as np
    >>> from tasks.selection.kcenter import select
    >>> x = np.array([[0, 0], [0, 1], [5, 5], [0, 0]], dtype=np.float32)
    >>> r = select(x, "coreset", n_samples=3, min_distance=0.5, seed=0)
    >>> r.indices.tolist(), [round(float(v), 2) for v in r.distances]
    ([3, 2, 1], [inf, 7.07, 1.0])

Cost: each greedy step reads the embedding matrix once (the GEMV expansion
‖x‖² − 2x·c + ‖c‖²), so a step is bound by memory bandwidth; the working state is O(N) float32.
The expansion cancels catastrophically near 0, so distances within `guard` of 0 or of
`min_distance` are recomputed from direct differences: duplicates and the stop are exact.
Elsewhere a reported squared distance may carry the expansion's error (at most `guard`, about
4·d·eps·max‖x‖²), which never changes which side of `min_distance` a pick falls on.

The greedy loop is written once against the small `Backend` interface (`tasks.selection.backends`),
checks the stop condition only every `Backend.check_every` steps (no host sync per step on a GPU)
and rolls back exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tasks.selection.backends import Array, Backend, resolve_backend

# Row x column elements of one distance tile: bounds the temporaries of every chunked product.
TILE_ELEMENTS = 1 << 22
# Fraction of the free memory a plan may use: leaves room for allocator slack.
MEMORY_HEADROOM = 0.8
# Per-row bytes of working state during greedy: squared norms, min-distance, product buffer.
STATE_BYTES_PER_ROW = 12


@dataclass(frozen=True)
class SelectionResult:
    """Selected rows in selection order and, for each, its distance to the earlier centers.

    `distances[j]` is the Euclidean distance of pick j to the nearest of the initial centers
    and picks 0..j-1; it is +inf for the first pick when there are no initial centers.
    """

    indices: np.ndarray
    distances: np.ndarray


# --------------------------------------------------------------------------- distances


@dataclass(frozen=True)
class _Points:
    """Rows of a device matrix (all, or those in `rows`) with their squared norms."""

    data: Array
    sqn: Array
    rows: Array | None = None

    def __len__(self) -> int:
        return len(self.data) if self.rows is None else len(self.rows)

    def block(self, bk: Backend, a: int, b: int) -> tuple[Array, Array]:
        if self.rows is None:
            return bk.f32(self.data[a:b]), self.sqn[a:b]
        idx = self.rows[a:b]
        return bk.f32(self.data[idx]), self.sqn[idx]


def _squared_norms(bk: Backend, data: Array) -> Array:
    out = bk.empty(len(data), "float32")
    step = max(1, TILE_ELEMENTS // max(1, data.shape[1]))
    for a in range(0, len(data), step):
        block = bk.f32(data[a : a + step])
        out[a : a + step] = (block * block).sum(1)
    return out


def _points(bk: Backend, data: Array) -> _Points:
    return _Points(data, _squared_norms(bk, data))


def _sqdist_tile(bk: Backend, x: Array, x_sqn: Array, c: Array, c_sqn: Array, guard: float) -> Array:
    """Squared distances (len(x), len(c)) by GEMM; entries <= guard recomputed exactly."""
    tile = x_sqn[:, None] - 2.0 * (x @ c.T) + c_sqn[None, :]
    rows, cols = bk.nonzero(tile <= guard)
    step = max(1, TILE_ELEMENTS // max(1, x.shape[1]))
    for a in range(0, len(rows), step):
        r, k = rows[a : a + step], cols[a : a + step]
        diff = x[r] - c[k]
        tile[r, k] = (diff * diff).sum(1)
    return tile


def _min_sqdist(bk: Backend, points: _Points, centers: _Points, guard: float) -> Array:
    """Squared distance of each point to its nearest center, never as a full (N x M) matrix."""
    out = bk.full(len(points), math.inf)
    c_step = max(1, min(len(centers), 1024))
    r_step = max(1, TILE_ELEMENTS // c_step)
    for a in range(0, len(points), r_step):
        x, x_sqn = points.block(bk, a, a + r_step)
        for b in range(0, len(centers), c_step):
            c, c_sqn = centers.block(bk, b, b + c_step)
            bk.minimum(out[a : a + r_step], bk.rowmin(_sqdist_tile(bk, x, x_sqn, c, c_sqn, guard)))
    return out


def _guard(bk: Backend, d: int, max_sqnorm: float, storage: str) -> float:
    """Bound on the expansion's absolute error in a squared distance.

    A float32 dot product of length d errs by at most ~d·eps·‖x‖‖c‖ and the norms likewise,
    so below this a squared distance cannot be told from 0 or from min_distance² without a
    direct recomputation. Half-precision storage adds the rounding of the product itself.
    """
    eps = float(np.finfo(np.float32).eps) * d
    eps += {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}[storage]
    eps += bk.matmul_eps()
    return 4.0 * eps * max(max_sqnorm, np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------- greedy


@dataclass
class _GreedyState:
    """Device-side state of one greedy run; `mind` holds squared distances, -1 once picked."""

    bk: Backend
    x: _Points
    initial: _Points | None
    mind: Array
    buf: Array
    guard: float
    exact: bool = False  # after the first pick within `guard` of 0: every update is exact

    def update(self, i: Array) -> None:
        """Add row i (a (1,)-index on the device) as a center, without a host sync."""
        bk, x = self.bk, self.x
        if self.exact:
            bk.minimum(self.mind, _min_sqdist(bk, x, _Points(x.data, x.sqn, i), self.guard))
        else:
            # -2c is exact in floating point and saves a pass over the N-vector.
            bk.matvec(x.data, x.data[i][0] * -2, self.buf)
            self.buf += x.sqn
            self.buf += x.sqn[i]
            bk.minimum(self.mind, self.buf)
        self.mind[i] = -1.0

    def run(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """`steps` greedy picks on the device; the host sees them only at the end."""
        bk = self.bk
        picks, gaps = bk.empty(steps, "int64"), bk.empty(steps, "float32")
        for s in range(steps):
            i = bk.argmax(self.mind)
            picks[s : s + 1] = i
            gaps[s : s + 1] = self.mind[i]
            self.update(i)
        return bk.to_host(picks), bk.to_host(gaps)

    def centers(self, picked: list[int]) -> list[_Points]:
        chosen = [_Points(self.x.data, self.x.sqn, self.bk.index(picked))] if picked else []
        return ([self.initial] if self.initial is not None else []) + chosen

    def exact_sqdist(self, row: int, picked: list[int]) -> float:
        """Direct (not expanded) squared distance of one row to all earlier centers."""
        one = _Points(self.x.data, self.x.sqn, self.bk.index([row]))
        return min(float(self.bk.to_host(_min_sqdist(self.bk, one, c, math.inf))[0]) for c in self.centers(picked))

    def make_exact(self, picked: list[int]) -> None:
        """Roll back to just after `picked` and from then on keep near-0 distances exact."""
        self.mind = self.bk.full(len(self.x), math.inf)
        for c in self.centers(picked):
            self.bk.minimum(self.mind, _min_sqdist(self.bk, self.x, c, self.guard))
        self.mind[self.bk.index(picked)] = -1.0
        self.exact = True


def _greedy(
    bk: Backend,
    x: _Points,
    initial: _Points | None,
    first: int | None,  # forced first pick; None when there are initial centers
    n_samples: int | None,
    min_distance: float | None,
    guard: float,
) -> SelectionResult:
    """k-center greedy with checks every `bk.check_every` steps and an exact roll-back."""
    n = len(x)
    limit = n if n_samples is None else min(n_samples, n)
    md2 = None if min_distance is None else min_distance * min_distance
    mind = bk.full(n, math.inf) if initial is None else _min_sqdist(bk, x, initial, guard)
    state = _GreedyState(bk, x, initial, mind, bk.empty(n, "float32"), guard)
    picked: list[int] = []
    dists: list[float] = []
    if initial is None and limit > 0:
        picked, dists = [first], [math.inf]
        state.update(bk.index([first]))
    while len(picked) < limit:
        steps = 1 if state.exact else min(bk.check_every, limit - len(picked))
        picks, gaps = state.run(steps)
        for row, gap in zip(picks.tolist(), gaps.tolist()):
            if md2 is not None and gap < md2 - guard:
                return _result(picked, dists)  # surely closer than min_distance: stop
            if gap <= guard and not state.exact:
                # Near 0 the expansion may have picked the wrong row: redo this step exactly.
                state.make_exact(picked)
                break
            if md2 is not None and gap < md2 + guard:
                gap = gap if gap <= guard else state.exact_sqdist(row, picked)
                if gap < md2:
                    return _result(picked, dists)
            picked.append(row)
            dists.append(math.sqrt(max(gap, 0.0)))
    return _result(picked, dists)


def _result(picked: list[int], dists: list[float]) -> SelectionResult:
    return SelectionResult(np.asarray(picked, dtype=np.int64), np.asarray(dists, dtype=np.float32))


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


def _device_points(bk: Backend, embeddings: np.ndarray, storage: str) -> tuple[_Points, str]:
    if storage == "float16":
        storage = _storage_dtype(bk, storage, _max_abs(embeddings))
    # Norms of the stored (possibly rounded) values, so that a row's self-distance is 0.
    points = _points(bk, bk.from_host(embeddings, storage))
    if not bool(np.isfinite(bk.to_host(points.sqn)).all()):
        raise ValueError("embeddings contain NaN or inf (or values too large for float32)")
    return points, storage


def _prepare(
    bk: Backend, embeddings: np.ndarray, initial_centers: np.ndarray | None, storage: str
) -> tuple[_Points, _Points | None, float]:
    """The rows and the initial centers (None when there are none) on the device, stored alike,
    with the `_guard` of both."""
    x, storage = _device_points(bk, embeddings, storage)
    max_sqn = float(bk.to_host(x.sqn.max()))
    initial = None
    if initial_centers is not None and len(initial_centers):
        initial = _points(bk, bk.from_host(initial_centers, storage))
        max_sqn = max(max_sqn, float(bk.to_host(initial.sqn.max())))
    return x, initial, _guard(bk, embeddings.shape[1], max_sqn, storage)


# --------------------------------------------------------------------------- strategies


def coreset(
    embeddings: np.ndarray,
    n_samples: int | None,
    min_distance: float | None,
    initial_centers: np.ndarray | None = None,
    seed: int = 0,
    backend: Backend | None = None,
    storage: str | None = None,
) -> SelectionResult:
    """k-center greedy on one device, or in two rounds when the matrix does not fit there.

    `storage` forces the on-device dtype ('float32', 'float16', 'bfloat16'); by default the
    plan from the free memory decides, and a plan with several shards runs `coreset_two_round`.
    """
    bk = backend or resolve_backend()
    n, d = embeddings.shape
    if storage is None:
        zero_copy = not bk.is_gpu and embeddings.dtype == np.float32 and embeddings.flags.c_contiguous
        plan = plan_storage(n, d, bk.free_bytes(), copies_matrix=not zero_copy, half_allowed=bk.is_gpu)
        if plan.n_shards > 1:
            return coreset_two_round(
                embeddings, n_samples, min_distance, plan.n_shards, initial_centers, seed, bk, plan.storage
            )
        storage = plan.storage
    if n == 0 or n_samples == 0:
        return _result([], [])
    x, initial, guard = _prepare(bk, embeddings, initial_centers, storage)
    first = None if initial is not None else int(np.random.default_rng(seed).integers(n))
    return _greedy(bk, x, initial, first, n_samples, min_distance, guard)


def coreset_two_round(
    embeddings: np.ndarray,
    n_samples: int | None,
    min_distance: float | None,
    n_shards: int,
    initial_centers: np.ndarray | None = None,
    seed: int = 0,
    backend: Backend | None = None,
    storage: str = "float32",
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
    2·min_distance of a pick. Reported distances are exact for the returned picks.
    """
    bk = backend or resolve_backend()
    n = len(embeddings)
    bounds = np.linspace(0, n, n_shards + 1).astype(int)
    union: list[np.ndarray] = []
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        shard_seed = int(np.random.SeedSequence([seed, j]).generate_state(1)[0])
        shard = coreset(embeddings[a:b], n_samples, min_distance, initial_centers, shard_seed, bk, storage)
        union.append(shard.indices + a)
    rows = np.sort(np.concatenate(union)) if union else np.empty(0, dtype=np.int64)
    final = coreset(embeddings[rows], n_samples, min_distance, initial_centers, seed, bk, storage)
    return SelectionResult(rows[final.indices], final.distances)


def random_subset(
    embeddings: np.ndarray, n_samples: int | None, initial_centers: np.ndarray | None = None, seed: int = 0,
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
        return _result([], [])
    x, initial, guard = _prepare(bk, embeddings, initial_centers, "float32")
    return _result(picks.tolist(), _pick_distances(bk, x, initial, picks, guard).tolist())


def _pick_distances(bk: Backend, x: _Points, initial: _Points | None, picks: np.ndarray, guard: float) -> np.ndarray:
    """Distance of each pick to the initial centers and the picks before it."""
    out = np.empty(len(picks), dtype=np.float32)
    block = max(1, min(1024, len(picks)))
    for a in range(0, len(picks), block):
        rows = _Points(x.data, x.sqn, bk.index(picks[a : a + block]))
        earlier = [initial] if initial is not None else []
        earlier += [_Points(x.data, x.sqn, bk.index(picks[:a]))] if a else []
        best = bk.full(len(rows), math.inf)
        for centers in earlier:
            bk.minimum(best, _min_sqdist(bk, rows, centers, guard))
        r, r_sqn = rows.block(bk, 0, len(rows))
        within = bk.to_host(_sqdist_tile(bk, r, r_sqn, r, r_sqn, guard))
        within[np.triu_indices(len(rows))] = np.inf  # only picks made before count
        out[a : a + block] = np.sqrt(np.minimum(bk.to_host(best), within.min(axis=1)))
    return out


METHODS = ("coreset", "random")


def _check_embeddings(embeddings: np.ndarray, initial_centers: np.ndarray | None) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, d) array; got shape {embeddings.shape}")
    if initial_centers is not None and (initial_centers.ndim != 2 or initial_centers.shape[1] != embeddings.shape[1]):
        raise ValueError(f"initial_centers must be an (M, {embeddings.shape[1]}) array like the embeddings; "
                         f"got shape {initial_centers.shape}")


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
    return coreset(embeddings, n_samples, min_distance, initial_centers, seed, backend)
