"""Benchmark k-center greedy per step against the memory-bandwidth bound and the naive loop.

Each case runs in its own subprocess, so its peak RSS is its own. A case times a fixed number of
greedy steps (not a full run), the machine's read bandwidth on the same matrix, and the
straightforward `np.linalg.norm(X - c, axis=1)` step on the same data. It also times the same
steps through selection_config's combination (tasks/selection/strategies.py): a lone DIVERSITY
strategy (`cfg/kc`: its time over plain k-center's, which must stay within 1.10), and DIVERSITY
with WEIGHTS and a BALANCE over 10 classes (`+W+B ms`), which reweighs every row after each pick.

    python benchmarks/selection.py                       # N in 1e4,1e5,1e6 x d in 128,512, CPU
    python benchmarks/selection.py --sizes 1e5 --dims 512 --steps 30 --backends cpu,cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.selection.backends import Backend, TorchBackend, resolve_backend  # noqa: E402
from tasks.selection.methods import coreset  # noqa: E402
from tasks.selection.strategies import Planned, Scored, combine  # noqa: E402


def make_embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit-norm float32 rows, filled in chunks so no float64 temporary inflates the peak RSS."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 4096):
        block = rng.standard_normal((min(4096, n - a), d), dtype=np.float32)
        out[a : a + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def read_bandwidth(x: np.ndarray, repeats: int = 5) -> float:
    """Best GB/s of summing the matrix on all cores (np.sum releases the GIL)."""
    parts = np.array_split(x.reshape(-1).view(np.float64), os.cpu_count() or 1)
    best = np.inf
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def seconds_per_step(x: np.ndarray, steps: int, backend: Backend, plan: list[Planned] | None = None) -> float:
    """Greedy time per step: (k picks − 1 pick) / (k − 1), which cancels the O(N·d) setup; with
    `plan`, the steps of selection_config's combination of those strategies."""

    def run(k: int) -> float:
        start = time.perf_counter()
        if plan is None:
            coreset(x, k, None, None, 0, backend)
        else:
            combine(x, plan, k, None, None, 0, backend.name if backend.is_gpu else "cpu")
        return time.perf_counter() - start

    run(2)  # warm-up: BLAS threads, allocator, GPU context
    return (run(steps + 1) - run(1)) / steps


def strategy_plans(n: int) -> tuple[list[Planned], list[Planned]]:
    """A lone DIVERSITY, and DIVERSITY with WEIGHTS on random scores and a BALANCE over 10 classes."""
    rng = np.random.default_rng(1)
    classes = np.eye(10)[rng.integers(0, 10, n)]
    balance = Planned("BALANCE", 1.0, Scored(classes=classes, class_names=tuple("abcdefghij")),
                      {"distribution": "UNIFORM", "target": None})  # fmt: skip
    weights = Planned("WEIGHTS", 1.0, Scored(values=rng.random(n)))
    return [Planned("DIVERSITY", 1.0)], [Planned("DIVERSITY", 1.0), weights, balance]


def naive_seconds_per_step(x: np.ndarray, steps: int) -> float:
    mind = np.full(len(x), np.inf, dtype=np.float32)
    i = 0
    start = time.perf_counter()
    for _ in range(steps):
        mind = np.minimum(mind, np.linalg.norm(x - x[i], axis=1))
        i = int(mind.argmax())
    return (time.perf_counter() - start) / steps


def backend_for(name: str) -> Backend:
    if name == "torch-cuda":
        return TorchBackend("cuda")
    return resolve_backend(name)


def run_case(n: int, d: int, steps: int, ref_steps: int, backend_name: str) -> dict:
    x = make_embeddings(n, d)
    backend = backend_for(backend_name)
    bandwidth = read_bandwidth(x)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step = seconds_per_step(x, steps, backend)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    alone, mixed = strategy_plans(n)
    # The ratio of two equal codes is noise unless both are timed alike: best of three, in turn.
    plain, configured = np.inf, np.inf
    for _ in range(3):
        plain = min(plain, seconds_per_step(x, steps, backend))
        configured = min(configured, seconds_per_step(x, steps, backend, alone))
    combined = seconds_per_step(x, steps, backend, mixed)
    step_bytes = x.nbytes + 12 * n  # matrix, plus min-distance read/write and norms
    naive = naive_seconds_per_step(x, ref_steps) if ref_steps and not backend.is_gpu else None
    return {
        "backend": backend.name + ("" if backend.is_gpu else "-cpu"),
        "n": n,
        "d": d,
        "ms_per_step": step * 1e3,
        "gb_per_s": step_bytes / step / 1e9,
        "read_gb_per_s": bandwidth,
        "x_bound": step / (step_bytes / bandwidth / 1e9),
        "naive_ms_per_step": None if naive is None else naive * 1e3,
        "speedup": None if naive is None else naive / step,
        "config_over_kcenter": configured / plain,
        "combined_ms_per_step": combined * 1e3,
        "matrix_mib": x.nbytes / 2**20,
        "peak_over_matrix": (x.nbytes + max(0, peak_rss - base_rss)) / x.nbytes,
    }


def format_row(r: dict) -> str:
    naive = "-" if r["naive_ms_per_step"] is None else f"{r['naive_ms_per_step']:9.1f}"
    speedup = "-" if r["speedup"] is None else f"{r['speedup']:6.1f}x"
    return (
        f"{r['backend']:>10} {r['n']:>9,} {r['d']:>4} {r['ms_per_step']:9.2f} {r['gb_per_s']:7.1f} "
        f"{r['read_gb_per_s']:7.1f} {r['x_bound']:6.2f} {naive:>9} {speedup:>7} "
        f"{r['matrix_mib']:8.0f} {r['peak_over_matrix']:6.2f} {r['config_over_kcenter']:6.2f} "
        f"{r['combined_ms_per_step']:9.2f}"
    )


HEADER = (
    f"{'backend':>10} {'N':>9} {'d':>4} {'ms/step':>9} {'GB/s':>7} {'read':>7} {'xbound':>6} "
    f"{'naive ms':>9} {'speedup':>7} {'X MiB':>8} {'peak/X':>6} {'cfg/kc':>6} {'+W+B ms':>9}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated N values")
    parser.add_argument("--dims", default="128,512", help="comma-separated d values")
    parser.add_argument("--steps", type=int, default=50, help="greedy steps timed per case")
    parser.add_argument("--ref-steps", type=int, default=3, help="naive steps timed (0: skip)")
    parser.add_argument(
        "--backends",
        default="cpu",
        help="comma-separated: cpu, cuda (CuPy, else torch), torch-cuda; GPU ones are skipped when no GPU is visible",
    )
    parser.add_argument("--case", nargs=3, metavar=("N", "D", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        n, d, name = args.case
        print(json.dumps(run_case(int(n), int(d), args.steps, args.ref_steps, name)))
        return
    print(
        f"{os.cpu_count()} cores; {args.steps} greedy steps per case; "
        "GB/s = (N·d·4 + 12·N) bytes per step / time; read = all-core np.sum bandwidth; "
        "xbound = time / bandwidth bound; peak/X = (X + extra peak RSS of greedy) / X"
    )
    print(HEADER)
    for name in args.backends.split(","):
        if name != "cpu" and not resolve_backend("auto").is_gpu:
            print(f"{name:>10}: no GPU visible, skipped")
            continue
        for n in (int(float(v)) for v in args.sizes.split(",")):
            for d in (int(v) for v in args.dims.split(",")):
                cmd = [
                    sys.executable,
                    __file__,
                    "--case",
                    str(n),
                    str(d),
                    name,
                    "--steps",
                    str(args.steps),
                    "--ref-steps",
                    str(args.ref_steps),
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                print(format_row(json.loads(out.splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
