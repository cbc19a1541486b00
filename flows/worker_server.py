"""The server the local Dask workers of a run fork from: a process that has imported what they run
(flows/worker_imports.py), started as the `thresher` command starts (flows/entry.py), so that its
imports overlap the command's own.

Light on purpose: the command imports this module before anything else.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.forkserver
import os
import threading

WORKER_IMPORTS = "flows.worker_imports"

# Dask's nannies give their workers MALLOC_TRIM_THRESHOLD_, which turns glibc's adaptive mmap
# threshold off: every large buffer (a decoded photo, a batch's activations) is then mapped and
# unmapped anew. Its page faults took 38% of the CPU and halved the one pass's images/s (check and
# embed, 500x375 JPEGs, 2 cores), so the workers a run starts, and the server they fork from, go
# without it (flows/cluster.py, flows/worker_imports.py).
LEFT_OUT_OF_WORKER_ENVIRON = ("MALLOC_TRIM_THRESHOLD_",)


@functools.cache  # once per process
def start_worker_server() -> None:
    """Start the server in the background. It lasts as long as this process: the workers of every
    run in it, and those that replace a run's workers, fork from it. Dask forks them from it when
    `distributed.worker.multiprocessing-method` is forkserver (flows/cluster.py)."""
    # "__main__": the program's main module, which each worker would otherwise import anew.
    multiprocessing.get_context("forkserver").set_forkserver_preload(["__main__", WORKER_IMPORTS])
    # The workers write their logs to stderr, which they have from the server: a pipe, copied to
    # wherever this process's stderr goes when they write (the run's log file; flows/cli.py).
    read, write = os.pipe()
    own = os.dup(2)
    os.dup2(write, 2)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.dup2(own, 2)
        os.close(own)
        os.close(write)
    threading.Thread(target=_copy_to_stderr, args=(read,), name="worker-stderr", daemon=True).start()


def _copy_to_stderr(read: int) -> None:
    while chunk := os.read(read, 1 << 16):
        while chunk:
            chunk = chunk[os.write(2, chunk) :]
    os.close(read)
