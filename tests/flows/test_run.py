import threading
import time

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.run import in_turn

EVENTS: list[tuple[str, int]] = []
LOCK = threading.Lock()


@task
def sleep_then_return(i: int, seconds: float) -> int:
    with LOCK:
        EVENTS.append(("start", i))
    time.sleep(seconds)
    with LOCK:
        EVENTS.append(("end", i))
    return i


def test_batches_are_submitted_in_turn_in_their_order(prefect_server):
    # The runner has more threads than the run has slots: submitted at once, all five would run together.
    seconds = [2.0, 0.2, 0.2, 0.2, 0.2]

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=5))
    def batches() -> list[tuple[int, int]]:
        finished = in_turn(lambda i: sleep_then_return.submit(i, seconds[i]), len(seconds), slots=2)
        return [(i, future.result()) for i, future in finished]

    EVENTS.clear()
    finished = batches()
    assert sorted(finished) == [(i, i) for i in range(5)]
    starts = [i for kind, i in EVENTS if kind == "start"]
    assert sorted(starts[:2]) == [0, 1] and starts[2:] == [2, 3, 4]  # the first two were submitted together
    running = 0
    for kind, _ in EVENTS:
        running += 1 if kind == "start" else -1
        assert running <= 2
    assert finished[-1][0] == 0  # the long first task ends last: the other slot took the rest meanwhile
