"""Memory at the end of a run: gathering and writing the run's embeddings hold a shard or a block of
them at a time, and loading them holds one copy, so the last stages of a long run need no more
memory than the matrix itself.

Each stage runs in a fresh Python process on a small and a large run; its peak resident memory
is compared with the resident memory just before the call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.dedup import ok_samples
from tasks.gathering import embedding_schema
from tasks.selection.tasks import selection_table

N, DIM, SHARDS, SMALL = 48_000, 512, 12, 3
MATRIX_BYTES = N * DIM * 4  # 98 MB


def names(rows: range) -> list[str]:
    return [f"img_{i:06d}.jpg" for i in rows]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Embedding shards of N samples (every 1,000th failed to decode), the gathered table, the
    samples table and a selection of 1% of the samples."""
    root = tmp_path_factory.mktemp("memory")
    rng = np.random.default_rng(0)
    per_shard = N // SHARDS
    for k in range(SHARDS):
        rows = range(k * per_shard, (k + 1) * per_shard)
        vectors = rng.normal(size=(per_shard, DIM)).astype(np.float32)
        failed = [i % 1000 == 0 for i in rows]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM, mask=pa.array(failed))
        pq.write_table(
            pa.Table.from_arrays(
                [
                    pa.array(names(rows)),
                    pa.array([0] * per_shard, pa.int32()),
                    embedding,
                    pa.array(["broken" if f else None for f in failed], pa.string()),
                ],
                schema=embedding_schema(DIM),
            ),
            root / f"shard-{k:05d}.parquet",
        )
    pq.write_table(ok_samples(pa.array(names(range(N))), pa.array([0] * N, pa.int32())), root / "samples.parquet")
    chosen = names(range(1, N, 100))
    pq.write_table(selection_table(chosen, np.ones(len(chosen), np.float32), None), root / "selection.parquet")
    return root


def stage_code(stage: str, run: Path, shards: int) -> tuple[str, str]:
    """(the code that prepares a stage, the stage's call) for a run of the first `shards` shards."""
    table = f"Path('{run}/{shards}.parquet')"
    gather = (
        f"gather_embeddings.fn(Path('{run}/samples.parquet'), "
        f"sorted(Path('{run}').glob('shard-*.parquet'))[:{shards}], {table}, {DIM})"
    )
    if stage == "gather":
        return "", gather
    if stage == "load":
        return gather, f"load_embeddings({table}, normalize=True)"
    return gather, (
        f"write_outputs.fn(Path('{run}/out-{shards}'), Path('{run}/samples.parquet'), {table}, "
        f"Path('{run}/selection.parquet'), normalize=False, dump_sampled_embeddings=True)"
    )


def growth_per_matrix(stage: str, run: Path) -> float:
    """How much more a stage's peak memory grows on all SHARDS shards than on the first SMALL, per
    byte of embeddings more, measured in a fresh process. The stage first runs on one shard, so
    that what it allocates once (Arrow's thread pools and per-thread heaps, lazy imports: some
    60 MB) is in the baseline; the difference of the two runs cancels what is left of it."""

    lines = [
        "import ctypes",
        "import pyarrow",
        "from pathlib import Path",
        "from tasks.gathering import gather_embeddings, load_embeddings",
        "from tasks.outputs import write_outputs",
        "def memory(key): "
        "return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) * 1024",
        *stage_code(stage, run, 1),
    ]
    for shards in (SMALL, SHARDS):
        prepare, call = stage_code(stage, run, shards)
        lines += [
            prepare,
            # Memory the allocators hold free would hide part of a run's growth, so it is returned first.
            "pyarrow.default_memory_pool().release_unused(); ctypes.CDLL('libc.so.6').malloc_trim(0)",
            "open('/proc/self/clear_refs', 'w').write('5')  # resets the peak (VmHWM) to the current size",
            "before = memory('VmRSS:')",
            f"result = {call}",
            "del result",
            "print(memory('VmHWM:') - before)",
        ]
    done = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    small, whole = map(int, done.stdout.split()[-2:])
    return (whole - small) / (MATRIX_BYTES * (SHARDS - SMALL) / SHARDS)


def test_gathering_holds_one_shard_not_the_run(run: Path) -> None:
    assert growth_per_matrix("gather", run) < 0.6
    samples = pq.read_table(run / "samples.parquet").to_pydict()
    corrupt = {n for n, s in zip(samples["filename"], samples["status"]) if s == "corrupt"}
    assert corrupt == set(names(range(0, N, 1000)))


def test_loading_the_embeddings_costs_one_matrix(run: Path) -> None:
    assert 0.5 < growth_per_matrix("load", run) < 2


def test_writing_the_outputs_holds_blocks_not_the_matrix(run: Path) -> None:
    assert growth_per_matrix("outputs", run) < 0.5
    data = run / f"out-{SHARDS}" / "data"
    assert sum(1 for _ in (data / "embeddings.csv").open()) == N - N // 1000 + 1
    assert sum(1 for _ in (data / "selected_embeddings.csv").open()) == len(range(1, N, 100)) + 1
