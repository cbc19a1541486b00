"""Stage 7: write the run directory's lists and tables in the Lightly Worker's layout.

    filenames/{corrupt,duplicate,removed,sampled}_filenames.txt
    data/embeddings.csv, data/normalized_embeddings.csv, data/selected_embeddings.csv
    data/corruptness_check_information.json

Every input file lands in exactly one filename list; the lists follow listing order.
"""

from __future__ import annotations

import json

import pyarrow as pa
from prefect import task
from upath import UPath

from tasks.embeddings_csv import Block, write_embeddings_csv_blocks
from tasks.gathering import embedding_blocks, embedding_dim, normalize_rows
from tasks.listing import is_video
from tasks.selection.tasks import selected_filenames
from tasks.storage import parquet_file, read_parquet, write_text

LISTS = ("corrupt", "duplicate", "removed", "sampled")


def partition(samples: pa.Table, selected: set[str]) -> dict[str, list[str]]:
    """The four filename lists: each sample in exactly one, in listing order."""
    lists: dict[str, list[str]] = {name: [] for name in LISTS}
    for filename, status in zip(samples.column("filename").to_pylist(), samples.column("status").to_pylist()):
        if status == "ok":
            lists["sampled" if filename in selected else "removed"].append(filename)
        else:
            lists[status].append(filename)
    return lists


def corruptness_information(samples: pa.Table) -> dict:
    """Lightly's format: {"corrupt_samples": {filename: reason}, "corrupt_videos": {video: reason}};
    corrupt frames are samples, videos that cannot be used at all are videos."""
    corrupt = {
        filename: reason
        for filename, status, reason in zip(
            samples.column("filename").to_pylist(),
            samples.column("status").to_pylist(),
            samples.column("reason").to_pylist(),
        )
        if status == "corrupt"
    }
    return {
        "corrupt_samples": {name: reason for name, reason in corrupt.items() if not is_video(name)},
        "corrupt_videos": {name: reason for name, reason in corrupt.items() if is_video(name)},
    }


def list_line(filename: str) -> str:
    """A filename as one line of a list. Linux allows line breaks in names; they are written as the
    escapes \\n and \\r so that every file stays exactly one line (the CSVs and the JSON hold the exact name)."""
    return filename.replace("\n", "\\n").replace("\r", "\\r") + "\n"


def rows_of(block: Block, chosen: set[str]) -> Block:
    """The samples of a block whose names are in `chosen`."""
    names, labels, vectors = block
    rows = [i for i, name in enumerate(names) if name in chosen]
    return [names[i] for i in rows], [labels[i] for i in rows], vectors[rows]


def write_lists(run_dir: UPath, lists: dict[str, list[str]]) -> None:
    for name, filenames in lists.items():
        write_text("".join(map(list_line, filenames)), run_dir / "filenames" / f"{name}_filenames.txt")


@task(name="write-outputs")
def write_outputs(
    run: UPath,
    samples_path: UPath,
    embeddings_path: UPath,
    selection_path: UPath,
    normalize: bool,
    dump_sampled_embeddings: bool,
) -> dict[str, int]:
    samples = read_parquet([samples_path])
    selected = selected_filenames(selection_path)
    lists = partition(samples, set(selected))
    write_lists(run, lists)
    info = corruptness_information(samples)
    write_text(json.dumps(info, indent=2, ensure_ascii=False), run / "data" / "corruptness_check_information.json")

    # The CSVs are written from the table a block at a time: the run's embeddings are never in memory whole.
    with parquet_file(embeddings_path) as file:
        dim = embedding_dim(file.schema_arrow)
    write_embeddings_csv_blocks(run / "data" / "embeddings.csv", dim, embedding_blocks(embeddings_path))
    if dump_sampled_embeddings:
        chosen = set(selected)
        write_embeddings_csv_blocks(
            run / "data" / "selected_embeddings.csv",
            dim,
            (rows_of(block, chosen) for block in embedding_blocks(embeddings_path)),
        )
    if normalize:
        write_embeddings_csv_blocks(
            run / "data" / "normalized_embeddings.csv",
            dim,
            (
                (names, labels, normalize_rows(vectors.copy()))
                for names, labels, vectors in embedding_blocks(embeddings_path)
            ),
        )
    return {name: len(items) for name, items in lists.items()}
