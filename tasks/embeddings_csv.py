"""The lightly embeddings CSV: `filenames,embedding_0,...,embedding_{d-1},labels`.

This is the format `lightly.utils.io.load_embeddings` reads and the Lightly Worker writes
(`data/embeddings.csv`), and the format `embeddings=` accepts. Reading validates the header
and the values and names the file in every error.

    >>> write_embeddings_csv(location("e.csv"), ["a.jpg"], np.zeros((1, 2), np.float32), [0])
    >>> read_embeddings_csv(location("e.csv"))[0]
    ['a.jpg']
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from upath import UPath

from tasks.storage import atomic_target

# lightly allows these bookkeeping columns between the embeddings and the labels.
OPTIONAL_COLUMNS = ("masked", "selected")
# Rows per block of text (14 MB at d = 1280). pyarrow formats numbers without holding the GIL, so
# blocks are formatted side by side, on up to CSV_THREADS threads (2 cores: 1.7x as fast).
CSV_ROWS = 1024
CSV_THREADS = 4

Block = tuple[list[str], list[int], np.ndarray]  # filenames, labels and their (n, d) embeddings


def write_embeddings_csv(path: UPath, filenames: list[str], vectors: np.ndarray, labels: list[int],
                         rows: np.ndarray | None = None) -> UPath:
    """The CSV of `rows` (all by default) of the samples."""
    rows = np.arange(len(filenames)) if rows is None else rows
    blocks = (([filenames[i] for i in part], [labels[i] for i in part], vectors[part])
              for part in (rows[start : start + CSV_ROWS] for start in range(0, len(rows), CSV_ROWS)))
    return write_embeddings_csv_blocks(path, vectors.shape[1], blocks)


def write_embeddings_csv_blocks(path: UPath, dim: int, blocks: Iterable[Block]) -> UPath:
    """The CSV of the samples of `blocks`, in order. A few blocks are formatted at a time, each into
    its own text, and written in order: the text in memory is a few blocks', never the file's."""
    threads = min(CSV_THREADS, pa.cpu_count())
    header = ",".join(column_names(dim)) + "\n"
    # pyarrow quotes header names; lightly writes (and documents) a bare header, so it is written here.
    with atomic_target(path) as tmp, tmp.open("wb") as out, ThreadPoolExecutor(threads) as pool:
        out.write(header.encode())
        pending: deque[Future] = deque()
        for block in in_blocks_of(blocks, CSV_ROWS):
            pending.append(pool.submit(csv_lines, *block))
            if len(pending) > 2 * threads:
                out.write(pending.popleft().result())
        while pending:
            out.write(pending.popleft().result())
    return path


def in_blocks_of(blocks: Iterable[Block], rows: int) -> Iterator[Block]:
    """The samples of `blocks` again, in blocks of `rows` (the last one smaller): a table's row groups
    can be a shard each, and a block's cost is mostly per column, whatever its rows.

    >>> [len(names) for names, _, _ in in_blocks_of([(["a"], [0], np.zeros((1, 2)))] * 5, 2)]
    [2, 2, 1]
    """
    names: list[str] = []
    labels: list[int] = []
    parts: list[np.ndarray] = []
    for block_names, block_labels, vectors in blocks:
        names += block_names
        labels += block_labels
        parts.append(vectors)
        while len(names) >= rows:
            matrix = np.concatenate(parts) if len(parts) > 1 else parts[0]
            yield names[:rows], labels[:rows], matrix[:rows]
            names, labels, parts = names[rows:], labels[rows:], [matrix[rows:]]
    if names:
        yield names, labels, np.concatenate(parts)


def csv_lines(filenames: list[str], labels: list[int], vectors: np.ndarray) -> pa.Buffer:
    """The CSV lines of a block of samples, without the header."""
    columns = [pa.array(filenames, pa.string()), *(pa.array(vectors[:, j]) for j in range(vectors.shape[1])),
               pa.array(labels, pa.int64())]
    text = pa.BufferOutputStream()
    pacsv.write_csv(pa.Table.from_arrays(columns, names=column_names(vectors.shape[1])), text,
                    pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    return text.getvalue()


def column_names(dim: int) -> list[str]:
    return ["filenames", *(f"embedding_{j}" for j in range(dim)), "labels"]


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
