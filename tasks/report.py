"""Stage 9: the run report (`report.json`): job information, counts, stage timings and the
pairwise-distance statistics of the embeddings before and after selection.

Distances are exact while the full distance matrix fits in `memory_requirement_in_GB`;
beyond that they are estimated from independent random pairs (a sample of m pairs bounds the
CDF error by sqrt(ln(2/0.05) / 2m) with 95% confidence, DKW-Massart), and the report says so.

    >>> pairwise_stats(np.eye(3, dtype=np.float32), memory_gb=1.0)["min"]
    1.4142135
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from prefect import task

from tasks.gathering import load_embeddings
from tasks.selection import selected_filenames
from tasks.storage import write_text

SCHEMA_VERSION = 1
SAMPLED_PAIRS = 2_000_000
BLOCK = 2048


def _exact_pair_distances(vectors: np.ndarray):
    """Distances of all pairs i < j, block by block (float64 expansion, so no N x N matrix at once)."""
    x = vectors.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    for start in range(0, len(x), BLOCK):
        block = x[start : start + BLOCK]
        d2 = sq[start : start + BLOCK, None] + sq[None, :] - 2.0 * block @ x.T
        rows, cols = np.triu_indices(len(block), k=1, m=len(x) - start)
        yield np.sqrt(np.maximum(d2[:, start:][rows, cols], 0.0))


def _sampled_pair_distances(vectors: np.ndarray, pairs: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(vectors)
    i = rng.integers(0, n, size=pairs)
    j = rng.integers(0, n - 1, size=pairs)
    j += j >= i  # uniform over j != i
    out = np.empty(pairs, dtype=np.float64)
    for start in range(0, pairs, 65536):
        a, b = i[start : start + 65536], j[start : start + 65536]
        out[start : start + 65536] = np.linalg.norm(vectors[a].astype(np.float64) - vectors[b], axis=1)
    return out


def pairwise_stats(vectors: np.ndarray, memory_gb: float, seed: int = 0) -> dict | None:
    """min / mean / max pairwise distance, exact when an N x N float32 matrix fits in memory_gb."""
    n = len(vectors)
    if n < 2:
        return None
    total_pairs = n * (n - 1) // 2
    if n * n * 4 <= memory_gb * 1e9:
        blocks = [d for d in _exact_pair_distances(vectors) if d.size]
        low, high = min(d.min() for d in blocks), max(d.max() for d in blocks)
        mean = sum(float(d.sum()) for d in blocks) / total_pairs
        exact, pairs = True, total_pairs
    else:
        pairs = min(SAMPLED_PAIRS, total_pairs)
        distances = _sampled_pair_distances(vectors, pairs, seed)
        low, high, mean = distances.min(), distances.max(), distances.mean()
        exact = False
    return {"min": float(low), "mean": float(mean), "max": float(high), "n_pairs": int(pairs), "exact": exact}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {name: metadata.version(name) for name in ("thresher", "torch", "prefect", "dask")},
    }


def build_report(
    job: dict, counts: dict, stages: dict, selection: dict, vectors: np.ndarray, selected_mask: np.ndarray,
    config: dict, memory_gb: float,
) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "job": {**job, "machine": machine()},
        "counts": counts,
        "stages": stages,
        "selection": selection,
        "distances": {
            "before": pairwise_stats(vectors, memory_gb),
            "after": pairwise_stats(vectors[selected_mask], memory_gb),
        },
        "config": config,
    }


@task(name="report")
def write_report(
    run_dir: str, embeddings_path: str, selection_path: str, normalize: bool,
    job: dict, counts: dict, stages: dict, selection: dict, config: dict, memory_gb: float,
) -> str:
    filenames, _, vectors = load_embeddings(Path(embeddings_path), normalize=normalize)
    chosen = set(selected_filenames(Path(selection_path)))
    mask = np.array([f in chosen for f in filenames], dtype=bool)
    report = build_report(job, counts, stages, selection, vectors, mask, config, memory_gb)
    path = Path(run_dir) / "report.json"
    write_text(json.dumps(report, indent=2, ensure_ascii=False), path)
    return str(path)
