"""Imports that last a process's life, kept out of the garbage collector's way.

A worker imports torch and timm for the stages, and umap and matplotlib for the report: about a
million objects that live as long as it does. Each full collection walks every object it tracks,
so with them tracked it took 0.5 s, and a run made one or two per worker. `frozen_imports` runs
the imports with the collector off (its passes over the growing heap found little to free: 14,000
of the 840,000 objects of a worker's stage imports, which now stay) and then freezes the
collector's view of the process, so that it never walks them again; in a process forked
afterwards, their pages stay shared. Whatever else the process holds then is frozen too: a run's
own process unfreezes all at the run's end (flows/curate.py: frozen_modules).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_imports() -> Iterator[None]:
    """The collector off for the block (which imports), then everything it tracks frozen."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
