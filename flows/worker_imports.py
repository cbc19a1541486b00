"""What the server the local Dask workers fork from imports before it forks any
(flows/worker_server.py).

A worker started afresh imported Dask, Prefect, the stages' modules, torch and timm (with torch's
compiler stack, which torchvision loads) before its first image: about 7 s of CPU per worker, on
every run, while the run's own process needed the cores to start. The server imports them once,
from the moment the command starts; each worker it forks has them, and starts in a fraction of a
second. Nothing here starts a thread or a CUDA context: neither would survive the fork.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import importlib.util
import os
from pathlib import Path

import dask
import yaml

from flows.worker_server import LEFT_OUT_OF_WORKER_ENVIRON

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

modules = {name: importlib.import_module(name) for name in WORKER_MODULES}
atexit.register(modules["flows.worker_setup"].quiet_exit)  # the server's exit, as a worker's
# What was imported lasts the workers' lives: left out of their collector's passes, and the pages
# that hold it stay shared with this server.
gc.freeze()
