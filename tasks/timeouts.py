"""Time limits for decoders: image and video decoding run C code that Python cannot interrupt, so
a decoder stuck on a hostile file is left in a daemon thread and the caller moves on. The pixel
limit bounds what such a thread can hold.

Two ways to leave a stuck decoder behind. `within` runs each decode in a thread of its own and
waits for it; `ahead` runs the whole per-file work in threads that decode in place, and the
caller, which waits for their results anyway, also watches each decode's clock. The second spares
two hand-overs between threads per image: on 2 cores, check + embed of 1,000 photos ran at 1.08x
to 1.10x the images/s of threads that each handed their decodes to a `within` thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# How often a caller of `ahead` looks at the clock of a decode that has not yet started.
POLL_SECONDS = 0.1


@dataclass
class _Clock:
    """What an `ahead` thread is timing: the deadline of the `within` it is in (None outside one)."""

    deadline: float | None = None
    seconds: float = 0.0  # its limit
    left_behind: bool = False  # the caller gave up on the thread's item and went on without it


class _Watched(threading.local):
    clock: _Clock | None = None  # set in `ahead`'s threads: their `within` runs in place
    expired: float | None = None  # set while an overrun item is made again: its `within` gives up at once


_watched = _Watched()


def within(seconds: float | None, work: Callable[[], T]) -> T:
    """work(), or TimeoutError after `seconds` (None waits forever). An overrunning call is left to
    finish in its daemon thread. In an `ahead` thread, work() runs in that thread, on a clock that
    the caller of `ahead` watches."""
    if seconds is None:
        return work()
    if _watched.expired is not None:
        raise TimeoutError(f"gave up after {_watched.expired:g} s")
    clock = _watched.clock
    if clock is not None:
        clock.seconds, clock.deadline = seconds, time.monotonic() + seconds
        try:
            return work()
        finally:
            clock.deadline = None
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as error:  # re-raised in the caller's thread
            outcome.append((False, error))

    thread = threading.Thread(target=run, name="thresher-decode", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"gave up after {seconds:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def ahead(function: Callable[[T], R], items: Sequence[T], threads: int, most: int) -> Iterator[R]:
    """function(item) for each item, in order, made by `threads` daemon threads at most `most` items
    ahead of the caller; an exception is raised where its item's result would be.

    A `within` in function runs in place, in its thread. When one overruns its limit, the caller
    leaves that thread behind (it drops its result, if it ever has one, and stops), starts another
    in its place, and makes the item again itself with that `within` raising TimeoutError at once:
    the item gets the result function gives a timed-out decode, and the other items go on."""
    lock = threading.Condition()
    results: dict[int, tuple[bool, object]] = {}
    clocks: dict[int, _Clock] = {}  # the clock of the thread making each item, until it is taken
    made, taken, stopped = 0, 0, False  # items handed to the threads; items taken by the caller

    def serve(clock: _Clock) -> None:
        nonlocal made
        _watched.clock = clock
        while True:
            with lock:
                while not (stopped or made >= len(items) or made < taken + most):
                    lock.wait()
                if stopped or made >= len(items):
                    return
                index, made = made, made + 1
                clocks[index] = clock
            try:
                outcome: tuple[bool, object] = (True, function(items[index]))
            except BaseException as error:  # re-raised in the caller's thread
                outcome = (False, error)
            with lock:
                if clock.left_behind:
                    return
                results[index] = outcome
                lock.notify_all()

    def start() -> None:
        threading.Thread(target=serve, args=(_Clock(),), name="thresher-decode", daemon=True).start()

    def wait(index: int) -> tuple[bool, object] | _Clock:
        """Item `index`'s outcome, or the clock of its thread once its `within` has overrun."""
        while index not in results:
            clock = clocks.get(index)
            deadline = None if clock is None else clock.deadline
            if deadline is None:
                lock.wait(POLL_SECONDS)  # a `within` may start meanwhile: look at its clock then
            elif (left := deadline - time.monotonic()) > 0:
                lock.wait(left)
            else:
                clock.left_behind = True
                return clock
        return results.pop(index)

    for _ in range(max(1, threads)):
        start()
    try:
        for index, item in enumerate(items):
            with lock:
                outcome = wait(index)
                clocks.pop(index, None)
                taken += 1
                lock.notify_all()
            if isinstance(outcome, _Clock):
                start()
                _watched.expired = outcome.seconds
                try:
                    outcome = (True, function(item))
                except BaseException as error:
                    outcome = (False, error)
                finally:
                    _watched.expired = None
            ok, value = outcome
            if not ok:
                raise value
            yield value
    finally:
        with lock:
            stopped = True
            lock.notify_all()


def progressing(items: Generator[T, None, None], seconds: float | None) -> Iterator[T]:
    """The items, or TimeoutError when the next one takes longer than `seconds` to come (None waits
    forever): a time limit per video frame, where one for the whole video would have to allow for
    its length.

    `items` runs in a daemon thread, one item ahead of the caller, from start to end: a generator
    that opens and closes a file does both there. When the caller stops early or gives up, the
    thread stops at its next item and closes `items`; a thread stuck in C is left there."""
    if seconds is None:
        yield from items
        return
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stopped = threading.Event()

    def hand(entry: tuple) -> bool:
        """Put `entry` for the caller; False when the caller has stopped taking."""
        while not stopped.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand(("item", item)):
                    return
            hand(("end", None))
        except BaseException as error:  # re-raised in the caller's thread
            hand(("error", error))
        finally:
            items.close()

    threading.Thread(target=produce, name="thresher-decode", daemon=True).start()
    try:
        while True:
            try:
                kind, value = handoff.get(timeout=seconds)
            except queue.Empty:
                raise TimeoutError(f"nothing decoded for {seconds:g} s") from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stopped.set()
