"""Stage 3: classify every checked file as ok, corrupt or exact duplicate.

Two files are exact duplicates when their bytes hash equal (xxh3-128). Of each group, the first
by sorted path is kept, so the outcome does not depend on listing or worker order. Corrupt files
are never duplicates of anything: each is reported with its own reason. Each sample keeps the
check's size, width, height and image metadata (`tasks/image_metadata.py`), the values of the
`lightly.*` metadata keys.

    >>> samples = classify(check_table, remove_exact_duplicates=True)
    >>> samples.column_names[:5]
    ['filename', 'label', 'status', 'reason', 'duplicate_of']
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from upath import UPath

from tasks.decoding import CHECK_SCHEMA, read_checks
from tasks.image_metadata import METRICS_SCHEMA
from tasks.storage import write_parquet

# The check's columns that samples.parquet keeps as they are.
KEPT_COLUMNS = ["size", "width", "height", *METRICS_SCHEMA.names]

SAMPLES_SCHEMA = pa.schema(
    [
        ("filename", pa.string()),
        ("label", pa.int32()),
        ("status", pa.string()),  # ok | corrupt | duplicate
        ("reason", pa.string()),  # why corrupt
        ("duplicate_of", pa.string()),  # the kept file a duplicate equals
        *(CHECK_SCHEMA.field(name) for name in KEPT_COLUMNS),
    ]
)


def duplicate_map(filenames: list[str], hashes: list[str]) -> dict[str, str]:
    """duplicate filename -> kept filename, keeping the first of each hash group by sorted path."""
    kept: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for filename, digest in sorted(zip(filenames, hashes)):
        if digest in kept:
            duplicates[filename] = kept[digest]
        else:
            kept[digest] = filename
    return duplicates


def classify(check: pa.Table, remove_exact_duplicates: bool) -> pa.Table:
    """One SAMPLES_SCHEMA row per checked file, in the check table's order."""
    filenames = check.column("filename").to_pylist()
    errors = check.column("error").to_pylist()
    duplicates: dict[str, str] = {}
    if remove_exact_duplicates:
        healthy = check.filter(pc.is_null(check.column("error")))
        duplicates = duplicate_map(healthy.column("filename").to_pylist(), healthy.column("content_hash").to_pylist())
    status = [
        "corrupt" if error is not None else "duplicate" if name in duplicates else "ok"
        for name, error in zip(filenames, errors)
    ]
    return pa.Table.from_arrays(
        [
            check.column("filename"),
            check.column("label"),
            pa.array(status, pa.string()),
            check.column("error"),
            pa.array([duplicates.get(name) for name in filenames], pa.string()),
            *(check.column(name) for name in KEPT_COLUMNS),
        ],
        schema=SAMPLES_SCHEMA,
    )


def ok_samples(filenames: pa.Array, labels: pa.Array) -> pa.Table:
    """SAMPLES_SCHEMA rows of samples that are all ok and whose files were never read (e.g. those
    of an embeddings file): no size, no pixels, so no metadata."""
    n = len(filenames)
    nulls = [pa.nulls(n, field.type) for field in list(SAMPLES_SCHEMA)[3:]]
    return pa.Table.from_arrays([filenames, labels, pa.array(["ok"] * n, pa.string()), *nulls], schema=SAMPLES_SCHEMA)


@task(name="classify-samples")
def classify_samples(check_paths: list[UPath], remove_exact_duplicates: bool, out_path: UPath) -> UPath:
    return write_parquet(classify(read_checks(check_paths), remove_exact_duplicates), out_path)
