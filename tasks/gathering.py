"""Stage 5: gather the embedding shards into one table in listing order.

Files that passed the check but failed to decode for embedding (possible when
`enable_corruptness_check=False`) become corrupt here, with their reason, so every input file
still ends in exactly one output list.

    >>> samples, embeddings = gather(samples, pq.read_table("shard-00000.parquet"))
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from upath import UPath

from tasks.dedup import SAMPLES_SCHEMA
from tasks.embedding import embedding_schema
from tasks.embeddings_csv import read_embeddings_csv
from tasks.storage import read_parquet, write_parquet

GATHERED_NAME = "embeddings.parquet"


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """(n, d) float32 view of a gathered table's embedding column."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), dim)


def gather(samples: pa.Table, embedded: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(updated samples, embeddings of the ok samples) with embedding failures moved to corrupt."""
    failed = embedded.filter(pc.invert(pc.is_null(embedded.column("error"))))
    reasons = dict(zip(failed.column("filename").to_pylist(), failed.column("error").to_pylist()))
    if reasons:
        names = samples.column("filename").to_pylist()
        status = [("corrupt" if n in reasons else s) for n, s in zip(names, samples.column("status").to_pylist())]
        reason = [reasons.get(n, r) for n, r in zip(names, samples.column("reason").to_pylist())]
        samples = samples.set_column(2, "status", pa.array(status, pa.string()))
        samples = samples.set_column(3, "reason", pa.array(reason, pa.string()))
    ok = embedded.filter(pc.is_null(embedded.column("error"))).select(["filename", "label", "embedding"])
    return samples, ok


def from_embeddings_csv(path: UPath) -> tuple[pa.Table, pa.Table]:
    """Samples and embeddings tables for `embeddings=`: every row is an ok sample."""
    filenames, vectors, labels = read_embeddings_csv(path)
    n, dim = vectors.shape
    names = pa.array(filenames, pa.string())
    label_array = pa.array(labels, pa.int32())
    nulls = pa.nulls(n, pa.string())
    samples = pa.Table.from_arrays([names, label_array, pa.array(["ok"] * n, pa.string()), nulls, nulls],
                                   schema=SAMPLES_SCHEMA)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    return samples, pa.table({"filename": names, "label": label_array, "embedding": column})


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Scale rows to unit length in place; all-zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def load_embeddings(path: UPath, normalize: bool) -> tuple[list[str], list[int], np.ndarray]:
    """filenames, labels and the (n, d) float32 matrix of a gathered table."""
    table = read_parquet([path])
    vectors = embedding_matrix(table).copy()
    if normalize:
        normalize_rows(vectors)
    return table.column("filename").to_pylist(), table.column("label").to_pylist(), vectors


@task(name="gather")
def gather_embeddings(samples_path: UPath, shard_paths: list[UPath], out_path: UPath, dim: int) -> int:
    """Returns the number of embedded samples; dim shapes the table when there is nothing to gather
    (e.g. no new files for a datapool)."""
    embedded = read_parquet(shard_paths) if shard_paths else embedding_schema(dim).empty_table()
    samples, embeddings = gather(read_parquet([samples_path]), embedded)
    write_parquet(samples, samples_path)
    write_parquet(embeddings, out_path)
    return len(embeddings)
