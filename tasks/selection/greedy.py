"""The greedy core: k-center greedy (farthest-point sampling) and its weighted form, on any backend.

k-center greedy picks, at each step, the row farthest from every center chosen so far (the
datapool of earlier runs included) and stops at a sample count, at a minimum distance, or at
whichever comes first.

Cost: each greedy step reads the embedding matrix once (the GEMV expansion
‖x‖² − 2x·c + ‖c‖²), so a step is bound by memory bandwidth; the working state is O(N) float32.
The expansion cancels catastrophically near 0, so distances within `guard` of 0 or of
`min_distance` are recomputed from direct differences: duplicates and the stop are exact.
Elsewhere a reported squared distance may carry the expansion's error (at most `guard`, about
4·d·eps·max‖x‖²), which never changes which side of `min_distance` a pick falls on.

The loop is written once against the small `Backend` interface (`tasks.selection.backends`),
checks the stop condition only every `Backend.check_every` steps (no host sync per step on a GPU)
and rolls back exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tasks.selection.backends import Array, Backend
from tasks.selection.distances import Points, min_sqdist


@dataclass(frozen=True)
class SelectionResult:
    """Selected rows in selection order and, for each, its distance to the earlier centers.

    `distances[j]` is the Euclidean distance of pick j to the nearest of the initial centers
    and picks 0..j-1; it is +inf for the first pick when there are no initial centers.
    `radii[j]`, for the greedy methods, is the covering radius once pick j is made: the largest
    distance of a row to its nearest pick or initial center (None for random subsets).
    """

    indices: np.ndarray
    distances: np.ndarray
    radii: np.ndarray | None = None


@dataclass
class GreedyState:
    """Device-side state of one greedy run; `mind` holds squared distances, -1 once picked."""

    bk: Backend
    x: Points
    initial: Points | None
    mind: Array
    buf: Array
    guard: float
    exact: bool = False  # after the first pick within `guard` of 0: every update is exact

    @classmethod
    def start(cls, bk: Backend, x: Points, initial: Points | None, guard: float) -> GreedyState:
        """The state before the first pick: every row's distance to the initial centers (inf without)."""
        mind = bk.full(len(x), math.inf) if initial is None else min_sqdist(bk, x, initial, guard)
        return cls(bk, x, initial, mind, bk.empty(len(x), "float32"), guard)

    def radius(self) -> Array:
        """The squared covering radius, as a (1,)-array on the device (picked rows hold -1)."""
        return self.mind[self.bk.argmax(self.mind)]

    def update(self, i: Array) -> None:
        """Add row i (a (1,)-index on the device) as a center, without a host sync."""
        bk, x = self.bk, self.x
        if self.exact:
            bk.minimum(self.mind, min_sqdist(bk, x, Points(x.data, x.sqn, i), self.guard))
        else:
            # -2c is exact in floating point and saves a pass over the N-vector.
            bk.matvec(x.data, x.data[i][0] * -2, self.buf)
            self.buf += x.sqn
            self.buf += x.sqn[i]
            bk.minimum(self.mind, self.buf)
        self.mind[i] = -1.0

    def run(self, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`steps` greedy picks on the device, with their squared distances and the squared covering
        radius after each; the host sees them only at the end."""
        bk = self.bk
        picks, gaps, radii = bk.empty(steps, "int64"), bk.empty(steps, "float32"), bk.empty(steps, "float32")
        for s in range(steps):
            i = bk.argmax(self.mind)
            picks[s : s + 1] = i
            gaps[s : s + 1] = self.mind[i]
            self.update(i)
            radii[s : s + 1] = self.radius()
        return bk.to_host(picks), bk.to_host(gaps), bk.to_host(radii)

    def centers(self, picked: list[int]) -> list[Points]:
        chosen = [Points(self.x.data, self.x.sqn, self.bk.index(picked))] if picked else []
        return ([self.initial] if self.initial is not None else []) + chosen

    def exact_sqdist(self, row: int, picked: list[int]) -> float:
        """Direct (not expanded) squared distance of one row to all earlier centers."""
        one = Points(self.x.data, self.x.sqn, self.bk.index([row]))
        return min(float(self.bk.to_host(min_sqdist(self.bk, one, c, math.inf))[0]) for c in self.centers(picked))

    def make_exact(self, picked: list[int]) -> None:
        """Roll back to just after `picked` and from then on keep near-0 distances exact."""
        self.mind = self.bk.full(len(self.x), math.inf)
        for c in self.centers(picked):
            self.bk.minimum(self.mind, min_sqdist(self.bk, self.x, c, self.guard))
        self.mind[self.bk.index(picked)] = -1.0
        self.exact = True


def kcenter_greedy(
    bk: Backend,
    x: Points,
    initial: Points | None,
    first: int | None,  # forced first pick; None when there are initial centers
    n_samples: int | None,
    min_distance: float | None,
    guard: float,
) -> SelectionResult:
    """k-center greedy with checks every `bk.check_every` steps and an exact roll-back."""
    n = len(x)
    limit = n if n_samples is None else min(n_samples, n)
    md2 = None if min_distance is None else min_distance * min_distance
    state = GreedyState.start(bk, x, initial, guard)
    picked: list[int] = []
    dists: list[float] = []
    radii: list[float] = []
    if initial is None and limit > 0:
        picked, dists = [first], [math.inf]
        state.update(bk.index([first]))
        radii.append(float(bk.to_host(state.radius())[0]))
    while len(picked) < limit:
        steps = 1 if state.exact else min(bk.check_every, limit - len(picked))
        picks, gaps, after = state.run(steps)
        for row, gap, radius in zip(picks.tolist(), gaps.tolist(), after.tolist()):
            if md2 is not None and gap < md2 - guard:
                return result(picked, dists, radii)  # surely closer than min_distance: stop
            if gap <= guard and not state.exact:
                # Near 0 the expansion may have picked the wrong row: redo this step exactly.
                state.make_exact(picked)
                break
            if md2 is not None and gap < md2 + guard:
                gap = gap if gap <= guard else state.exact_sqdist(row, picked)
                if gap < md2:
                    return result(picked, dists, radii)
            picked.append(row)
            dists.append(gap)
            radii.append(radius)
    return result(picked, dists, radii)


def result(picked: list[int], sq_dists: list[float], sq_radii: list[float] | None = None) -> SelectionResult:
    """The picks, with their squared distances (and covering radii) as distances."""

    def root(values: list[float]) -> np.ndarray:
        return np.sqrt(np.maximum(np.asarray(values, dtype=np.float64), 0)).astype(np.float32)

    return SelectionResult(
        np.asarray(picked, dtype=np.int64), root(sq_dists), None if sq_radii is None else root(sq_radii)
    )


class Steering(Protocol):
    """What strategies other than distance and fixed weights do during a weighted greedy run."""

    def accepts(self, row: int) -> bool:
        """Whether `row` may be the next pick; False stops the selection (a stopping condition)."""
        ...

    def factor(self, picked: list[int]) -> np.ndarray | None:
        """Each row's weight factor (> 0) once `picked` are selected, or None if it is always 1 (BALANCE
        changes it after every pick)."""
        ...


def weighted_greedy(
    state: GreedyState,
    weights: Array,
    first: int | None,
    n_samples: int | None,
    min_distance: float | None,
    distance: bool = True,
    steering: Steering | None = None,
) -> SelectionResult:
    """Greedy picks maximising distance² x weight over the rows, with `weights` > 0 on the device.

    The Lightly Worker's greedy combination of strategies: each strategy's score raised to its
    strength, multiplied. `min_distance` keeps its exact meaning: a candidate surely closer than
    it to the selection is out of the running, one within the expansion's error bound of it is
    measured exactly when it comes up; the selection stops at the count or when no candidate is
    left. Without `distance` the picks maximise the weight alone (no DIVERSITY strategy), and
    their distances are still measured. `steering` may stop the selection and reweigh the rows
    after each pick. A step costs k-center's pass over the matrix plus a few passes over
    N-vectors, and one host synchronisation (microseconds on a GPU, against a pass over the matrix).
    """
    bk, n, guard = state.bk, len(state.x), state.guard
    limit = n if n_samples is None else min(n_samples, n)
    md2 = None if min_distance is None else min_distance * min_distance
    score = bk.empty(n, "float32")
    picked: list[int] = []
    dists: list[float] = []
    radii: list[float] = []

    def steer() -> Array:
        """The weights as steering reweighs them once `picked` are selected."""
        factor = steering.factor(picked) if steering else None
        return weights if factor is None else weights * bk.from_host(factor.astype(np.float32))

    def pick(i: Array, row: int, gap: float) -> None:
        nonlocal steered
        picked.append(row)
        dists.append(gap)
        state.update(i)
        radii.append(float(bk.to_host(state.radius())[0]))
        steered = steer()

    steered = steer()
    if first is not None and limit > 0 and (steering is None or steering.accepts(first)):
        pick(bk.index([first]), first, math.inf)
    while len(picked) < limit:
        i = _largest(state, steered, md2, score, distance)
        if i is None:
            if md2 is not None or not distance:
                break  # every row is picked, closer than min_distance or weighs nothing
            if not state.exact:
                state.make_exact(picked)  # what is left duplicates the picks, up to the expansion's error
                continue
            # Every row left duplicates a pick: the heaviest, as k-center greedy takes duplicates in turn.
            i = _largest(state, steered, None, score, distance=False)
            if i is None:
                break
        row, gap = int(bk.to_host(i)[0]), float(bk.to_host(state.mind[i])[0])
        if distance and gap <= guard and not state.exact:
            state.make_exact(picked)  # near 0 the expansion cannot order the candidates
            continue
        if md2 is not None and gap < md2 + guard and (gap if state.exact else state.exact_sqdist(row, picked)) < md2:
            weights[i] = 0.0  # closer than min_distance after all: never a candidate again
            steered[i] = 0.0
            continue
        if steering is not None and not steering.accepts(row):
            break
        pick(i, row, gap)
    return result(picked, dists, radii)


def _largest(
    state: GreedyState, weights: Array, md2: float | None, score: Array, distance: bool = True
) -> Array | None:
    """The unpicked row of the largest distance² x weight (of the largest weight, without `distance`), not
    surely closer than min_distance; None when no such row scores above 0."""
    bk, mind = state.bk, state.mind
    score[:] = weights
    if distance:
        score *= mind
    if md2 is not None:
        score[mind < md2 - state.guard] = -1.0
    score[mind == -1.0] = -1.0  # picked
    i = bk.argmax(score)
    return i if float(bk.to_host(score[i])[0]) > 0 else None
