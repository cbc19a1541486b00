"""Time limits for decoders: image and video decoding run C code that Python cannot interrupt, so
a decoder stuck on a hostile file is left in a daemon thread and the caller moves on. The pixel
limit bounds what such a thread can hold."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

T = TypeVar("T")


def within(seconds: float | None, work: Callable[[], T]) -> T:
    """work(), or TimeoutError after `seconds` (None waits forever). An overrunning call is left to
    finish in its daemon thread."""
    if seconds is None:
        return work()
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
