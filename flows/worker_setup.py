"""A Dask preload module for the workers of the local clusters a run starts (flows/cluster.py).

At its end, a worker freezes the garbage collector's view of its objects: torch, timm and the
report's libraries leave millions of them, and walking them all once more at the process's exit
took 1 to 2 s of every run's end (the nannies wait for their workers to exit). The operating
system frees the memory either way.
"""

from __future__ import annotations

import gc
import os
import sys

from distributed import Worker


def dask_teardown(worker: Worker) -> None:
    gc.freeze()
    quiet_exit()


def quiet_exit() -> None:
    """Send what a process exiting now writes to stderr nowhere. What the exit leaves unfreed,
    triton's bindings (imported with torch's compiler by torchvision) report as "leaked" on stderr,
    which reaches the run's log: a false alarm there."""
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
