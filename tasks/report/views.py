"""The report's 2-D views of the embeddings: a uniform sample of this run's samples and the
datapool's as scatter points, their PCA, and UMAPs at a few neighbourhood sizes that run on an
executor while the rest of the report is computed (`start_views`)."""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import xxhash
from upath import UPath

from tasks.gathering import load_embeddings
from tasks.imports import frozen_imports
from tasks.report.cache import ReportCache, content_key
from tasks.report.numbers import squared_distances
from tasks.report.settings import CONTINUE_EPOCHS, GROUPS, InProcess, ReportSettings

KNN_BLOCK = 1_024  # rows of the UMAP's exact kNN per distance block (20 MB at UMAP_POINTS)
SCATTER_POINTS = 20_000
UMAP_POINTS = 5_000  # UMAP on more is not feasible within the report's time budget
UMAP_NEIGHBOURS = (5, 15, 50)
UMAP_EPOCHS = 200
# Where numba keeps UMAP's compiled functions between runs, unless NUMBA_CACHE_DIR says otherwise.
NUMBA_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "thresher" / "numba"


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
        d2 = squared_distances(x[block], sq[block], x, sq)
        d2[np.arange(len(d2)), np.arange(block.start, block.stop)] = -1.0  # self first, even beside a duplicate
        near = np.argpartition(d2, k - 1, axis=1)[:, :k]
        near = np.take_along_axis(near, np.argsort(np.take_along_axis(d2, near, 1), axis=1), 1)
        index[block] = near
        distances[block] = np.sqrt(np.maximum(np.take_along_axis(d2, near, 1), 0.0))
    return index, distances


def umap_2d(
    points: np.ndarray,
    k: int,
    seed: int,
    pca: np.ndarray,
    previous: np.ndarray | None = None,
    knn: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """UMAP of the points from their PCA (`pca_2d(points)`), which every k shares, or continuing
    `previous`, an earlier layout's place of each point (NaN for a point new to it). `knn`: the
    points' `_knn` for k or more neighbours, if it was searched already.

    PCA initialisation: the spectral one solves an eigenproblem per connected component, seconds on
    clustered data. UMAP's own init="pca" would compute the same PCA again for every k; as it does,
    the start gets noise of 1e-4 of its scale, which keeps an axis without spread from dividing by
    zero when UMAP rescales it."""
    umap = import_umap()
    # UMAP's notes on our settings (n_jobs with a seed; no search index for transforming new points,
    # which the report never does) are dropped for good: a catch_warnings block is not thread-safe,
    # and a worker with two threads runs two UMAPs at once.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"umap\.")
    # Contiguous, as `_knn` gives them: a strided view would have numba compile umap's functions again.
    index, distances = _knn(points, k) if knn is None else (np.ascontiguousarray(a[:, :k]) for a in knn)
    if previous is None:
        scale = float(np.abs(pca).max()) or 1.0
        start, epochs = 10.0 * pca / scale + np.random.default_rng(seed).normal(0.0, 1e-4, pca.shape), UMAP_EPOCHS
    else:
        start, epochs = continued_start(previous, index), CONTINUE_EPOCHS
    model = umap.UMAP(
        n_neighbors=k,
        random_state=seed,
        n_jobs=1,
        n_epochs=epochs,
        init=start.astype(np.float32),
        precomputed_knn=(index, distances),
    )
    return model.fit_transform(points).astype(np.float32)


def umaps_2d(
    points: np.ndarray,
    neighbours: dict[str, int],
    seed: int,
    pca: np.ndarray,
    previous: dict[str, np.ndarray],
    nearest: int,
) -> dict[str, np.ndarray]:
    """`umap_2d` of the points for each view at its k, one after another, each continuing its
    `previous` layout if it has one. One nearest-neighbour search for all, of the `nearest` (the
    largest k of all views, so that the views come out the same however they are grouped): a k's
    nearest neighbours are the first k of more, and the search took a third of a UMAP's time at
    4,000 x 1,280."""
    knn = _knn(points, nearest)
    return {view: umap_2d(points, k, seed, pca, previous.get(view), knn) for view, k in neighbours.items()}


_UMAP_IMPORT = threading.Lock()


@functools.cache
def import_umap() -> ModuleType:
    """umap, with its compiled functions kept on disk across runs (in NUMBA_CACHE_DIR, NUMBA_CACHE
    unless set). numba compiles them at their first call in every process, 10 to 15 s of a small
    run's report, and umap marks one of them for caching. Imported here, not at the top: its import
    (numba, pynndescent) costs seconds that every stage would pay. It lasts the process's life, so it
    is kept out of the garbage collector's way (tasks/imports.py): in a process like a run's worker,
    importing it and the plots' matplotlib took 1.45 to 1.51 s so, against 1.67 to 1.84 s."""
    # Under a lock: a worker with two threads may run two UMAPs at once, and one thread's loop would
    # meet umap's modules while the other thread's import is still filling them.
    with _UMAP_IMPORT, frozen_imports():
        os.environ.setdefault("NUMBA_CACHE_DIR", str(NUMBA_CACHE))  # numba reads it when first imported
        import umap
        from numba.core.dispatcher import Dispatcher

        # Copies, as Python's docs advise: another thread's imports (a report plot's, a task's) can
        # add modules while this loops, and list() over the live dict raised "dictionary changed
        # size during iteration" in a run.
        for name, module in sys.modules.copy().items():
            if name.startswith("umap."):
                for value in vars(module).copy().values():
                    if isinstance(value, Dispatcher):
                        value.enable_caching()
    return umap


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


@dataclass(frozen=True)
class PendingViews:
    """The 2-D views of the scatter points while their UMAPs run on the executor; `result()` waits
    for them and stores new projections in the cache, and the UMAPs as the dataset's latest layout."""

    n_points: int
    umap_points: int
    neighbours: dict[str, tuple[int, int]]  # view key -> (k asked for, k used)
    xy: dict[str, np.ndarray]  # the PCA, or every view when they came from the cache
    continued: dict[str, int]  # view key -> points that kept their place from the previous layout
    cache: ReportCache
    key: str | None = (
        None  # the content key to store new projections under; None when they came from the cache or there is none
    )
    layout: str | None = None  # the name of the dataset's latest layout in the cache
    ids: np.ndarray | None = None  # point_ids of the UMAP points
    umaps: tuple[Future, ...] = ()  # the running `umaps_2d` tasks

    def result(self) -> list[dict]:
        xy = dict(self.xy)
        for umaps in self.umaps:
            xy |= umaps.result()
        if self.key is not None:
            self.cache.store_arrays(
                self.key, xy | {"continued": np.array([self.continued[v] for v in self.neighbours])}
            )
        if self.layout is not None and self.neighbours:
            self.cache.store_arrays(self.layout, {"ids": self.ids} | {view: xy[view] for view in self.neighbours})
        return ([{"key": "pca", "title": "PCA", "n_points": self.n_points, "xy": xy["pca"]}] if xy else []) + [
            {
                "key": key,
                "title": f"UMAP, k = {k}" + (f" ({used} used)" if used < k else ""),
                "n_points": self.umap_points,
                "continued_points": self.continued[key],
                "xy": xy[key],
            }
            for key, (k, used) in self.neighbours.items()
        ]


def start_embedding_views(
    points: np.ndarray,
    seed: int,
    cache: ReportCache = ReportCache(),
    executor: Executor = InProcess(),
    dataset: str = "",
    spread: bool = False,
) -> PendingViews:
    """PCA of the scatter points, and UMAP at each k of UMAP_NEIGHBOURS on their first UMAP_POINTS
    started on `executor`; from the cache when it holds the projections of the same points.

    The UMAPs run in one task, one after another: its worker imports umap once (numba, pynndescent,
    scikit-learn: 2 s of CPU), where a task per view paid that in two or three workers of a new
    cluster while the report's numbers needed the same cores (a cold 4,000-photo run's report took
    0.6 s longer on 2 cores). With `spread`, for a warm cluster whose workers keep umap imported
    from run to run, they run side by side, a task per view.

    With a cache, each UMAP continues the latest layout of `dataset` (see
    ReportCache.previous_layout), so that successive runs over a growing dataset show it alike, at a
    quarter of the cost."""
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
    xy = {"pca": pca_2d(points)}
    layout = content_key("layout", dataset, seed) if cache.root and neighbours else None
    ids = point_ids(points[:umap_n]) if layout else None
    previous = cache.previous_layout(layout, ids) if layout else {}
    start = xy["pca"] if umap_n == n else pca_2d(points[:umap_n])
    used = {view: k for view, (_, k) in neighbours.items()}
    groups = [{view: k} for view, k in used.items()] if spread else [used]
    umaps = tuple(
        executor.submit(
            umaps_2d,
            points[:umap_n],
            group,
            seed,
            start,
            {v: previous[v] for v in group if v in previous},
            max(used.values()),
        )
        for group in groups
        if group
    )
    continued = {
        view: int(np.count_nonzero(~np.isnan(previous[view][:, 0]))) if view in previous else 0 for view in neighbours
    }
    return PendingViews(n, umap_n, neighbours, xy, continued, cache, key, layout, ids, umaps)


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


def start_views(
    vectors: np.ndarray,
    settings: ReportSettings,
    datapool_embeddings_path: UPath | None = None,
    cache_dir: UPath | None = None,
    executor: Executor = InProcess(),
    spread: bool = False,
) -> StartedViews | None:
    """Start the projections of the views of this run's samples (`vectors`, normalized as the
    report's numbers are) among the datapool's, on `executor` (`spread`: see start_embedding_views).
    They need only the embeddings, so a flow starts them before it selects. None for a run with no
    samples of its own (nothing new for the datapool): it has nothing to show there."""
    if not len(vectors):
        return None
    datapool = load_embeddings(datapool_embeddings_path, settings.normalize)[2] if datapool_embeddings_path else None
    rows, points = scatter_points(vectors, datapool, settings.seed)
    n_total = len(vectors) + (len(datapool) if datapool is not None else 0)
    del datapool  # the views need only the points
    return StartedViews(
        rows,
        len(vectors),
        n_total,
        start_embedding_views(
            points, settings.seed, ReportCache.under(cache_dir), executor, settings.input_dir, spread
        ),
    )
