"""Benchmark report generation (numbers, plots, HTML, PDF) on synthetic embeddings.

Writes a run's intermediate tables for N clustered unit-norm embeddings of dimension d (30% of
them selected, 0.1% exact duplicates, 0.01% corrupt), then times `build_report` in a subprocess
so its peak RSS is its own. The input images do not exist, so the report draws no thumbnails;
everything else (pairwise and nearest-neighbour statistics, PCA, UMAP, plots, PDF) runs in full.

    python benchmarks/report.py                  # N = 1e6, d = 128
    python benchmarks/report.py --n 1e5 --dim 512

Figures behind choices in tasks/report/ (measured when they were made):
- A continued UMAP (settings.CONTINUE_EPOCHS): on 2,200 clustered points after 2,000, 50 epochs
  from the previous layout kept the trustworthiness of a fresh 200-epoch layout (0.988) in a
  quarter of the time, and moved the old points 8x less.
- plots.plot_pair composes the two images with Pillow: a matplotlib figure of two images took 70 ms.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.config import ThresherConfig  # noqa: E402
from tasks.dedup import SAMPLES_SCHEMA  # noqa: E402
from tasks.selection.tasks import selection_table  # noqa: E402

CHUNK = 100_000


def write_run(work: Path, n: int, dim: int, seed: int = 0) -> None:
    """samples, embeddings and selection tables of a run of n samples, written a chunk at a time."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((100, dim), dtype=np.float32)
    names = np.array([f"images/{i:07d}.jpg" for i in range(n)], dtype=object)
    schema = pa.schema([("filename", pa.string()), ("label", pa.int32()), ("embedding", pa.list_(pa.float32(), dim))])
    with pq.ParquetWriter(work / "embeddings.parquet", schema) as writer:
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            block = centres[rng.integers(0, len(centres), count)] + 0.6 * rng.standard_normal(
                (count, dim), dtype=np.float32
            )
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            writer.write_table(
                pa.table(
                    {
                        "filename": pa.array(names[start : start + count], pa.string()),
                        "label": pa.array(np.zeros(count, np.int32)),
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim),
                    },
                    schema=schema,
                )
            )
    n_duplicates, n_corrupt = n // 1000, n // 10_000
    extra = [f"copies/{i:07d}.jpg" for i in range(n_duplicates)] + [f"broken/{i:07d}.jpg" for i in range(n_corrupt)]
    status = ["ok"] * n + ["duplicate"] * n_duplicates + ["corrupt"] * n_corrupt
    columns = {
        "filename": list(names) + extra,
        "label": np.zeros(n + len(extra), np.int32),
        "status": status,
        "reason": [None] * (n + n_duplicates) + ["decoding failed: image file is truncated"] * n_corrupt,
        "duplicate_of": [None] * n + [names[i] for i in range(n_duplicates)] + [None] * n_corrupt,
    }
    # The images do not exist, so their measures (size, width, sharpness...) are unknown.
    unknown = {field.name: pa.nulls(len(status), field.type) for field in SAMPLES_SCHEMA if field.name not in columns}
    pq.write_table(pa.table(columns | unknown, schema=SAMPLES_SCHEMA), work / "samples.parquet")
    chosen = rng.choice(n, int(0.3 * n), replace=False)
    pq.write_table(
        selection_table(names[chosen].tolist(), np.full(len(chosen), np.nan, np.float32), None),
        work / "selection.parquet",
    )


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def child(work: Path) -> None:
    """Time one report in this process and print its figures as JSON."""
    from flows.options import report_config, report_settings
    from tasks.report.build import build_report
    from tasks.report.settings import ReportInputs

    imported = peak_rss_gb()
    counts = {
        name: pq.read_metadata(work / f"{table}.parquet").num_rows
        for name, table in (("n_input_files", "samples"), ("n_sampled", "selection"))
    }
    n_ok = pq.read_metadata(work / "embeddings.parquet").num_rows
    counts |= {"n_duplicate": n_ok // 1000, "n_corrupt": n_ok // 10_000, "n_removed": n_ok - counts["n_sampled"]}
    thresher_config = ThresherConfig(input_dir=str(work / "images"), output_dir=str(work))
    config = report_config(thresher_config)
    job = {"started": "", "finished": "", "duration_seconds": 0.0, "run_directory": str(work)}
    selection = {
        "method": "random",
        "n_candidates": n_ok,
        "n_selected": counts["n_sampled"],
        "n_samples_target": None,
        "min_distance": None,
        "stopped_by": "n_samples",
        "last_pick_distance": None,
    }
    start = time.perf_counter()
    build_report(
        ReportInputs(
            work,
            work / "samples.parquet",
            work / "embeddings.parquet",
            work / "selection.parquet",
            job,
            counts,
            {},
            selection,
            config,
            report_settings(thresher_config),
        )
    )
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_gb": peak_rss_gb(),
                "rss_after_imports_gb": imported,
                "memory_requirement_in_GB": config["memory_requirement_in_GB"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=float, default=1e6)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    n = int(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        write_run(work, n, args.dim)
        print(f"wrote a synthetic run of N={n:,}, d={args.dim} in {time.perf_counter() - start:.1f} s")
        result = subprocess.run([sys.executable, __file__, "--child", str(work)], capture_output=True, text=True)
        if result.returncode:
            sys.exit(result.stderr)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"report for N={n:,}, d={args.dim}: {figures['seconds']:.1f} s, peak RSS {figures['peak_rss_gb']:.2f} GB "
            f"({figures['rss_after_imports_gb']:.2f} GB after imports; "
            f"memory_requirement_in_GB={figures['memory_requirement_in_GB']:g})"
        )
        print("files:", ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(work.glob("report.*"))))


if __name__ == "__main__":
    main()
