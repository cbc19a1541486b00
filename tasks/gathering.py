"""Stage 5: gather the embedding shards into one table in listing order.

Files that passed the check but failed to decode for embedding (possible when
`enable_corruptness_check=False`) become corrupt here, with their reason, so every input file
still ends in exactly one output list.

    >>> gather_embeddings(samples_path, shard_paths, out_path, dim=1280)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from upath import UPath

from tasks.dedup import ok_samples
from tasks.embeddings_csv import Block, read_embeddings_csv
from tasks.storage import parquet_file, parquet_writer, read_parquet, read_table, write_parquet

GATHERED_NAME = "embeddings.parquet"


def embedding_schema(dim: int) -> pa.Schema:
    """Schema of an embedding shard; rows that failed to decode have a null embedding and an error."""
    return pa.schema(
        [
            ("filename", pa.string()),
            ("label", pa.int32()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("error", pa.string()),
        ]
    )


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """(n, d) float32 view of a gathered table's embedding column."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), dim)


def failures(embedded: pa.Table) -> dict[str, str]:
    """{filename: reason} of the rows of an embedding shard that failed to decode."""
    failed = embedded.filter(pc.invert(pc.is_null(embedded.column("error"))))
    return dict(zip(failed.column("filename").to_pylist(), failed.column("error").to_pylist()))


def mark_corrupt(samples: pa.Table, reasons: dict[str, str]) -> pa.Table:
    """The samples with those named in `reasons` turned corrupt, with their reason."""
    if not reasons:
        return samples
    names = samples.column("filename").to_pylist()
    status = [("corrupt" if n in reasons else s) for n, s in zip(names, samples.column("status").to_pylist())]
    reason = [reasons.get(n, r) for n, r in zip(names, samples.column("reason").to_pylist())]
    samples = samples.set_column(2, "status", pa.array(status, pa.string()))
    return samples.set_column(3, "reason", pa.array(reason, pa.string()))


def ok_rows(embedded: pa.Table) -> pa.Table:
    return embedded.filter(pc.is_null(embedded.column("error"))).select(["filename", "label", "embedding"])


def from_embeddings_csv(path: UPath) -> tuple[pa.Table, pa.Table]:
    """Samples and embeddings tables for `embeddings=`: every row is an ok sample."""
    filenames, vectors, labels = read_embeddings_csv(path)
    n, dim = vectors.shape
    names = pa.array(filenames, pa.string())
    label_array = pa.array(labels, pa.int32())
    samples = ok_samples(names, label_array)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    return samples, pa.table({"filename": names, "label": label_array, "embedding": column})


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Scale rows to unit length in place; all-zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))[:, None]  # np.linalg.norm squares a copy
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def load_embeddings(path: UPath, normalize: bool) -> tuple[list[str], list[int], np.ndarray]:
    """filenames, labels and the (n, d) float32 matrix of a gathered table. The matrix is filled
    block by block, so reading it costs one matrix of memory, not two."""
    with parquet_file(path) as file:
        vectors = np.empty((file.metadata.num_rows, embedding_dim(file.schema_arrow)), np.float32)
    filenames: list[str] = []
    labels: list[int] = []
    for names, block_labels, block in embedding_blocks(path):
        vectors[len(filenames) : len(filenames) + len(names)] = block
        filenames += names
        labels += block_labels
    if normalize:
        normalize_rows(vectors)
    return filenames, labels, vectors


def embedding_blocks(path: UPath) -> Iterator[Block]:
    """(filenames, labels, (n, d) float32 embeddings) of a gathered table, a row group at a time
    (iter_batches reads ahead, holding about twice what it returns). The embeddings are read-only."""
    with parquet_file(path) as file:
        for group in range(file.num_row_groups):
            part = file.read_row_group(group, columns=["filename", "label", "embedding"])
            yield part.column("filename").to_pylist(), part.column("label").to_pylist(), embedding_matrix(part)


def embedding_dim(schema: pa.Schema) -> int:
    return schema.field("embedding").type.list_size


@task(name="gather")
def gather_embeddings(samples_path: UPath, shard_paths: list[UPath], out_path: UPath, dim: int) -> int:
    """Returns the number of embedded samples; dim shapes the table when there is nothing to gather
    (e.g. no new files for a datapool). The shards are copied one at a time, so gathering holds
    one shard in memory, not the run's embeddings twice over. Only the samples left ok by the check
    and dedup count: pieces checked and embedded in one pass also hold the duplicates' embeddings,
    and the check's reasons for the unusable ones, which samples.parquet already has. It is
    rewritten only when an ok sample failed to embed."""
    samples = read_parquet([samples_path])
    usable = pc.filter(samples.column("filename"), pc.equal(samples.column("status"), "ok"))
    schema = embedding_schema(dim)
    reasons: dict[str, str] = {}
    gathered = 0
    with parquet_writer(out_path, ok_rows(schema.empty_table()).schema) as writer:
        for path in shard_paths:
            embedded = read_table(path, columns=schema.names)
            embedded = embedded.filter(pc.is_in(embedded.column("filename"), value_set=usable))
            reasons |= failures(embedded)
            ok = ok_rows(embedded)
            writer.write_table(ok)
            gathered += len(ok)
    if reasons:
        write_parquet(mark_corrupt(samples, reasons), samples_path)
    return gathered
