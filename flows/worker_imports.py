"""What a Dask worker imports before its first task. The server the workers of a run fork from
imports this module before it forks any (flows/worker_server.py); the service's workers preload it
(infra/dask.yaml), and also import the report's libraries (`dask_setup`).

A worker started afresh imported Dask, Prefect, the stages' modules, torch and timm (with torch's
compiler stack, which torchvision loads) before its first image: about 7 s of CPU per worker, on
every run, while the run's own process needed the cores to start. The server imports them once,
from the moment the command starts; each worker it forks has them, and starts in a fraction of a
second. Nothing here starts a thread or a CUDA context: neither would survive the fork.

The imports run with the garbage collector off, and its view of them is then frozen
(tasks/imports.py). The server's imports took 3.4 to 3.9 s so, against 4.6 to 5.0 s with the
collector's passes; a service worker, which lives for many runs, no longer walks them in every full
collection (0.5 s, once or twice per worker in a run that added 200 files to a datapool).
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import yaml

from flows.worker_server import LEFT_OUT_OF_WORKER_ENVIRON
from tasks.imports import frozen_imports

if TYPE_CHECKING:
    from distributed import Worker

# The environment each nanny sets before it starts a worker (see distributed.Nanny), set here
# before the imports below: a forked worker has the server's environment, and libraries such as
# OpenBLAS read theirs as they load. Dask's defaults for it are read as `import distributed` reads
# them, which would load numpy first. (The nannies also set a string hash seed, so that the
# workers agree: forked from one server, they share its seed.)
dask.config.update_defaults(
    yaml.safe_load((Path(importlib.util.find_spec("distributed").origin).parent / "distributed.yaml").read_text())
)
os.environ.update(
    {
        key: str(value)
        for key, value in dask.config.get("distributed.nanny.pre-spawn-environ").items()
        if value and key not in LEFT_OUT_OF_WORKER_ENVIRON
    }
)

WORKER_MODULES = (
    "distributed",
    "flows.worker_setup",  # the workers' Dask preload
    "tasks.one_pass",  # the check and embed stages
    "tasks.embedding",
    "tasks.backbones",  # torch
    "timm",  # the default backbone's definition
)


with frozen_imports():
    for name in WORKER_MODULES:
        importlib.import_module(name)
# The process's exit (the server's, a service worker's) as a run's workers' (flows/worker_setup.py).
atexit.register(sys.modules["flows.worker_setup"].quiet_exit)


def dask_setup(worker: Worker) -> None:
    """A service worker's preload: the report's libraries too (the plots' matplotlib, the views'
    umap). The workers a run starts leave them to the report's tasks: imported in the server, they
    would delay every run's first image."""
    from tasks.report.views import import_umap

    with frozen_imports():
        importlib.import_module("tasks.report.plots")
    import_umap()  # frozen as it imports
