"""Distances between embeddings in tiles: the expansion ‖x‖² − 2x·c + ‖c‖² by GEMM, exact near 0.

The expansion cancels catastrophically near 0, so entries within `error_guard` of 0 are
recomputed from direct differences. Every temporary is bounded by TILE_ELEMENTS, so no N x N
(or N x M) matrix ever exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tasks.selection.backends import Array, Backend

# Row x column elements of one distance tile: bounds the temporaries of every chunked product.
TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Points:
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


def squared_norms(bk: Backend, data: Array) -> Array:
    out = bk.empty(len(data), "float32")
    step = max(1, TILE_ELEMENTS // max(1, data.shape[1]))
    for a in range(0, len(data), step):
        block = bk.f32(data[a : a + step])
        out[a : a + step] = (block * block).sum(1)
    return out


def with_norms(bk: Backend, data: Array) -> Points:
    return Points(data, squared_norms(bk, data))


def sqdist_tile(bk: Backend, x: Array, x_sqn: Array, c: Array, c_sqn: Array, guard: float) -> Array:
    """Squared distances (len(x), len(c)) by GEMM; entries <= guard recomputed exactly."""
    tile = x_sqn[:, None] - 2.0 * (x @ c.T) + c_sqn[None, :]
    rows, cols = bk.nonzero(tile <= guard)
    step = max(1, TILE_ELEMENTS // max(1, x.shape[1]))
    for a in range(0, len(rows), step):
        r, k = rows[a : a + step], cols[a : a + step]
        diff = x[r] - c[k]
        tile[r, k] = (diff * diff).sum(1)
    return tile


def min_sqdist(bk: Backend, points: Points, centers: Points, guard: float) -> Array:
    """Squared distance of each point to its nearest center, never as a full (N x M) matrix."""
    out = bk.full(len(points), math.inf)
    c_step = max(1, min(len(centers), 1024))
    r_step = max(1, TILE_ELEMENTS // c_step)
    for a in range(0, len(points), r_step):
        x, x_sqn = points.block(bk, a, a + r_step)
        for b in range(0, len(centers), c_step):
            c, c_sqn = centers.block(bk, b, b + c_step)
            bk.minimum(out[a : a + r_step], bk.rowmin(sqdist_tile(bk, x, x_sqn, c, c_sqn, guard)))
    return out


def error_guard(bk: Backend, d: int, max_sqnorm: float, storage: str) -> float:
    """Bound on the expansion's absolute error in a squared distance.

    A float32 dot product of length d errs by at most ~d·eps·‖x‖‖c‖ and the norms likewise,
    so below this a squared distance cannot be told from 0 or from min_distance² without a
    direct recomputation. Half-precision storage adds the rounding of the product itself.
    """
    eps = float(np.finfo(np.float32).eps) * d
    eps += {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}[storage]
    eps += bk.matmul_eps()
    return 4.0 * eps * max(max_sqnorm, np.finfo(np.float32).tiny)
