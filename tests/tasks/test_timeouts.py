import threading
import time

import pytest

from tasks.timeouts import progressing, within


def test_within_returns_the_result_or_gives_up():
    assert within(1.0, lambda: 7) == 7
    with pytest.raises(TimeoutError, match="gave up after 0.2 s"):
        within(0.2, lambda: time.sleep(5))
    with pytest.raises(ZeroDivisionError):
        within(1.0, lambda: 1 / 0)


def _stalls_at(n: int, release: threading.Event, closed: list):
    try:
        for i in range(10):
            if i == n:
                release.wait()
            yield i
    finally:
        closed.append(threading.current_thread().name)


def test_progressing_gives_the_items_until_one_takes_too_long():
    release, closed = threading.Event(), []
    seen = []
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="nothing decoded for 0.3 s"):
        for item in progressing(_stalls_at(3, release, closed), 0.3):
            seen.append(item)
    assert seen == [0, 1, 2] and time.monotonic() - start < 3
    release.set()  # the stuck producer wakes, sees the caller gone, and closes its generator in its own thread
    for _ in range(50):
        if closed:
            break
        time.sleep(0.1)
    assert closed == ["thresher-decode"]


def test_progressing_passes_everything_through_and_closes_early_stops():
    release, closed = threading.Event(), []
    release.set()
    assert list(progressing(_stalls_at(99, release, closed), 5.0)) == list(range(10))
    closed.clear()
    items = progressing(_stalls_at(99, release, closed), 5.0)
    assert next(items) == 0
    items.close()  # the caller stops early: the producer stops at its next item and closes
    for _ in range(50):
        if closed:
            break
        time.sleep(0.1)
    assert closed == ["thresher-decode"]
    assert list(progressing(_stalls_at(99, release, []), None)) == list(range(10))


def test_progressing_raises_the_producers_error_in_the_caller():
    def failing():
        yield 1
        raise ValueError("bad frame")

    items = progressing(failing(), 5.0)
    assert next(items) == 1
    with pytest.raises(ValueError, match="bad frame"):
        next(items)
