"""The lightly embeddings CSV: `filenames,embedding_0,...,embedding_{d-1},labels`.

This is the format `lightly.utils.io.load_embeddings` reads and the Lightly Worker writes
(`data/embeddings.csv`), and the format `embeddings=` accepts. Reading validates the header
and the values and names the file in every error.

    >>> write_embeddings_csv(location("e.csv"), ["a.jpg"], np.zeros((1, 2), np.float32), [0])
    >>> read_embeddings_csv(location("e.csv"))[0]
    ['a.jpg']
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from upath import UPath

from tasks.storage import atomic_target

# lightly allows these bookkeeping columns between the embeddings and the labels.
OPTIONAL_COLUMNS = ("masked", "selected")
CSV_ROWS = 8192


def write_embeddings_csv(path: UPath, filenames: list[str], vectors: np.ndarray, labels: list[int],
                         rows: np.ndarray | None = None) -> UPath:
    """The CSV of `rows` (all by default), written CSV_ROWS at a time: a block's columns are the
    only copy of the embeddings made, so the run's embeddings are never in memory twice."""
    dim = vectors.shape[1]
    rows = np.arange(len(filenames)) if rows is None else rows
    names = ["filenames", *(f"embedding_{j}" for j in range(dim)), "labels"]
    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    # pyarrow quotes header names; lightly writes (and documents) a bare header, so it is written here.
    with atomic_target(path) as tmp, tmp.open("wb") as out:
        out.write((",".join(names) + "\n").encode())
        for start in range(0, len(rows), CSV_ROWS):
            block = rows[start : start + CSV_ROWS]
            part = vectors[block]
            columns = [pa.array([filenames[i] for i in block], pa.string()),
                       *(pa.array(part[:, j]) for j in range(dim)),
                       pa.array([labels[i] for i in block], pa.int64())]
            pacsv.write_csv(pa.Table.from_arrays(columns, names=names), out, options)
    return path


def read_embeddings_csv(path: UPath) -> tuple[list[str], np.ndarray, list[int]]:
    """filenames, (n, d) float32 embeddings and integer labels; ValueError naming the file otherwise."""
    try:
        with path.open("rb") as handle:
            table = pacsv.read_csv(handle, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    except pa.ArrowInvalid as error:
        raise ValueError(f"embeddings file {path}: not a valid CSV ({error}).") from None
    names = table.column_names
    dims = [n for n in names if n.startswith("embedding_")]
    expected_tail = [n for n in names[1 + len(dims) :] if n not in OPTIONAL_COLUMNS]
    if (
        not names
        or names[0] != "filenames"
        or dims != [f"embedding_{j}" for j in range(len(dims))]
        or not dims
        or expected_tail != ["labels"]
    ):
        raise ValueError(
            f"embeddings file {path}: header must be filenames,embedding_0,...,embedding_N,labels; got "
            f"{','.join(names[:4])}{',...' if len(names) > 4 else ''}"
        )
    filenames = [str(f) for f in table.column("filenames").to_pylist()]
    duplicated = len(filenames) - len(set(filenames))
    if duplicated:
        raise ValueError(f"embeddings file {path}: {duplicated} filenames appear more than once.")
    try:
        vectors = np.column_stack([table.column(n).to_numpy().astype(np.float32) for n in dims])
        labels = [int(v) for v in table.column("labels").to_pylist()]
    except (pa.ArrowInvalid, TypeError, ValueError) as error:
        raise ValueError(f"embeddings file {path}: non-numeric or missing values ({error}).") from None
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise ValueError(f"embeddings file {path}: row for {filenames[bad[0]]!r} has NaN or infinite values.")
    return filenames, vectors.reshape(len(filenames), len(dims)), labels
