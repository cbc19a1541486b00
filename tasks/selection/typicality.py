"""TYPICALITY: how dense the embedding space is around each sample.

A sample's typicality is the inverse of its mean distance to its k nearest neighbours, as in
TypiClust (Hacohen, Dekel & Weinshall, "Active learning on a budget", ICML 2022, k = 20).
Typical samples sit where most samples (and most future test cases) lie; the least typical are
outliers: odd crops, blank frames, glitches.

Exact neighbours cost O(N²·d): hours at N = 10^6 on 2 cores. Each row's neighbours are therefore
searched among a seeded reference sample of at most `reference` rows, which bounds the cost to
O(N·m·d) in GEMM tiles on the selection's backends, and leaves the result exact whenever N <= m.
Against a sample, the k-th neighbour sits at the population's (k·N/m)-th: the same density seen at
a coarser scale, which orders dense and sparse regions alike. `benchmarks/selection_quality.py`
measures the rank correlation with exact neighbours and the effect on the selection.

    >>> import numpy as np
    >>> from tasks.selection.backends import resolve_backend
    >>> x = np.array([[0.0], [0.1], [0.2], [5.0]], dtype=np.float32)
    >>> t = typicality(resolve_backend("cpu"), x, k=2)
    >>> int(t.argmax()), int(t.argmin())
    (1, 3)
"""

from __future__ import annotations

import numpy as np

from tasks.selection.backends import Backend
from tasks.selection.distances import TILE_ELEMENTS, error_guard, sqdist_tile, squared_norms

NEIGHBOURS = 20  # TypiClust's k
# At most this many reference rows. A coarser density scale selected as well as exact neighbours or
# better on the labelled sets of benchmarks/selection_quality.py, and at N = 10^6, d = 1280 it costs
# 2.6·10^12 flops, the time of a few dozen k-center steps over the same matrix.
REFERENCE_ROWS = 1_000


def typicality(
    bk: Backend, embeddings: np.ndarray, k: int = NEIGHBOURS, reference: int = REFERENCE_ROWS, seed: int = 0
) -> np.ndarray:
    """Each row's typicality, 1 / mean distance to its k nearest other rows among a seeded reference
    sample of `reference` rows (all rows when there are no more), as float64 on the host.

    The matrix crosses to the device a tile at a time, so it need not fit there. A row with k exact
    duplicates gets the typicality of a mean distance of 1e-12, not an infinite one."""
    n = len(embeddings)
    m = min(n, reference)
    k = min(k, m - 1)
    if k < 1:
        return np.ones(n)
    rows = np.arange(n) if m == n else np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
    position = np.full(n, -1, dtype=np.int64)  # each row's column among the references, -1 if none
    position[rows] = np.arange(m)
    refs = bk.from_host(embeddings[rows])
    refs_sqn = squared_norms(bk, refs)
    max_sqn = float(bk.to_host(refs_sqn.max()))
    out = np.empty(n)
    step = max(1, TILE_ELEMENTS // m)
    for a in range(0, n, step):
        block = bk.from_host(embeddings[a : a + step])
        block_sqn = squared_norms(bk, block)
        guard = error_guard(bk, embeddings.shape[1], max(max_sqn, float(bk.to_host(block_sqn.max()))), "float32")
        tile = sqdist_tile(bk, block, block_sqn, refs, refs_sqn, guard)
        own = np.flatnonzero(position[a : a + step] >= 0)
        if len(own):  # a reference row is not its own neighbour
            tile[bk.index(own), bk.index(position[a + own])] = np.inf
        nearest = bk.to_host(bk.row_smallest(tile, k)).astype(np.float64)
        out[a : a + step] = np.sqrt(np.maximum(nearest, 0)).mean(axis=1)
    return 1.0 / np.maximum(out, 1e-12)
