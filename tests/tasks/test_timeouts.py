import threading
import time

import pytest

from tasks.timeouts import ahead, progressing, within


def test_within_returns_the_result_or_gives_up():
    assert within(1.0, lambda: 7) == 7
    with pytest.raises(TimeoutError, match="gave up after 0.2 s"):
        within(0.2, lambda: time.sleep(5))
    with pytest.raises(ZeroDivisionError):
        within(1.0, lambda: 1 / 0)


def _decode(item: int, stuck: threading.Event) -> str:
    """What a check makes of item: its decode (within a second) stalls on item 3 until `stuck` is set."""
    try:
        return within(1.0, lambda: stuck.wait() and f"late {item}" if item == 3 else f"decoded {item}")
    except TimeoutError as error:
        return f"{item}: {error}"


def _decoders_left(before: set[threading.Thread]) -> list[threading.Thread]:
    """The decoding threads started since `before` that are still alive after up to 2.5 s."""
    for _ in range(50):
        left = [t for t in threading.enumerate() if t.name == "thresher-decode" and t not in before]
        if not left:
            break
        time.sleep(0.05)
    return left


def test_ahead_gives_each_result_in_order_and_stays_at_most_so_far_ahead():
    made, taken = [], []

    def note(item: int) -> int:
        made.append(item)
        assert len(made) - len(taken) <= 4  # the caller has taken all but at most 4 of the items made
        return item * item

    for result in ahead(note, list(range(40)), threads=3, most=4):
        taken.append(result)
        time.sleep(0.002)
    assert taken == [i * i for i in range(40)] and sorted(made) == list(range(40))


def test_ahead_decodes_in_its_threads_and_leaves_a_stalled_decode_behind():
    stuck, before = threading.Event(), set(threading.enumerate())
    start = time.monotonic()
    results = list(ahead(lambda item: _decode(item, stuck), list(range(8)), threads=2, most=4))
    elapsed = time.monotonic() - start
    stuck.set()  # the stalled thread wakes; its late result is dropped
    # Item 3 is made again with its decode giving up at once; the others go on, on a new thread.
    assert results == [f"decoded {i}" for i in range(3)] + ["3: gave up after 1 s"] + [
        f"decoded {i}" for i in range(4, 8)
    ]
    assert 1.0 <= elapsed < 3.0
    assert _decoders_left(before) == []  # each thread stops once the items are made, the stalled one once it wakes


def test_ahead_raises_an_error_at_its_item_and_stops_its_threads_when_the_caller_stops():
    def fail_at_2(item: int) -> int:
        if item == 2:
            raise ValueError("bad file")
        return item

    before = set(threading.enumerate())
    results = ahead(fail_at_2, list(range(100)), threads=2, most=3)
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ValueError, match="bad file"):
        next(results)
    assert _decoders_left(before) == []


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
