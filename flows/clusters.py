"""Dask cluster specifications, kept as YAML data files in `flows/clusters/`.

`dask.cluster=local` (the default) names `flows/clusters/local.yaml`; a path to a YAML file of the
same shape works too. `dask.address` uses an existing scheduler instead, and `dask.n_workers` /
`dask.threads_per_worker` override a local spec's sizes.

    >>> spec = load_cluster_spec("local", n_workers=0, threads_per_worker=1)
    >>> spec["cluster_kwargs"]["n_workers"] >= 1
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

SPEC_DIR = Path(__file__).parent / "clusters"


def spec_path(name: str) -> Path:
    builtin = SPEC_DIR / f"{name}.yaml"
    path = builtin if builtin.exists() else Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"dask.cluster={name!r}: no such spec; use one of {known} or a path to a YAML file.")
    return path


def load_cluster_spec(name: str, n_workers: int, threads_per_worker: int) -> dict[str, Any]:
    """DaskTaskRunner keyword arguments for a local cluster spec, sized for this machine."""
    spec = yaml.safe_load(spec_path(name).read_text()) or {}
    kwargs = dict(spec.get("cluster_kwargs") or {})
    cores = os.cpu_count() or 1
    processes = kwargs.get("processes", True)
    threads = threads_per_worker or kwargs.get("threads_per_worker") or (1 if processes else cores)
    kwargs["threads_per_worker"] = threads
    kwargs["n_workers"] = n_workers or kwargs.get("n_workers") or (max(1, cores // threads) if processes else 1)
    return {**spec, "cluster_kwargs": kwargs}
