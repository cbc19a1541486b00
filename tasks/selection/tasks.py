"""Stage 6: select a diverse subset of the gathered embeddings into the selection table.

`choose` selects from a table of candidate embeddings. `select_samples` runs it on the images or
frames themselves; `select_sequences` runs it between a step before (one candidate per complete
sequence of video frames, the mean of their embeddings) and a step after (each picked sequence
expanded back to its frames).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
from prefect import task
from upath import UPath

from tasks.gathering import load_embeddings
from tasks.predictions.formats import Problem
from tasks.predictions.scores import scores_table, write_scores_csv
from tasks.selection.form import SelectionForm, input_label
from tasks.selection.inputs import InputSources, RunTables, resolve
from tasks.selection.methods import SelectionResult, select
from tasks.selection.strategies import combine, explain
from tasks.storage import read_parquet, read_table, write_parquet
from tasks.video.sequences import frame_infos, sequences

# radius: the covering radius once the row is picked (see SelectionResult); null for random subsets.
SELECTION_SCHEMA = pa.schema(
    [("filename", pa.string()), ("order", pa.int32()), ("distance", pa.float32()), ("radius", pa.float32())]
)


@dataclass(frozen=True)
class SelectOptions:
    """The selection settings of a run; the flow builds them from its validated config.

    `n_samples` is a count, a fraction in (0, 1] of the candidates, or None (no count limit);
    `min_distance` is None when there is no distance limit. The config makes sure one of them is
    set. With `sequence_length` > 1, `n_samples` counts frames.
    """

    method: str
    n_samples: int | float | None
    min_distance: float | None
    normalize: bool
    seed: int
    device: str
    sequence_length: int
    # A selection_config (or method=coral) selects by its strategies on the inputs `sources` locate.
    form: SelectionForm | None = None
    sources: InputSources | None = None

    def count(self, n_total: int) -> int | None:
        """The row count `n_samples` asks for among `n_total` rows: a fraction rounded, a count capped.

        >>> options = SelectOptions("coreset", 0.25, None, True, 1, "cpu", 1)
        >>> options.count(10), replace(options, n_samples=50).count(10)
        (2, 10)
        """
        if self.n_samples is None:
            return None
        if isinstance(self.n_samples, float):
            assert 0.0 < self.n_samples <= 1.0, self.n_samples
            return round(self.n_samples * n_total)
        return min(self.n_samples, n_total)


def selected_filenames(path: UPath) -> list[str]:
    """The selected filenames of a selection table, in selection order."""
    return read_table(path).column("filename").to_pylist()


def selection_table(names: list[str], distances: np.ndarray, radii: np.ndarray | None) -> pa.Table:
    """A SELECTION_SCHEMA table of the selected names in selection order."""
    order = np.arange(len(names), dtype=np.int32)
    radius = pa.nulls(len(names), pa.float32()) if radii is None else pa.array(radii, pa.float32())
    return pa.Table.from_arrays(
        [pa.array(names, pa.string()), pa.array(order), pa.array(distances, pa.float32()), radius],
        schema=SELECTION_SCHEMA,
    )


def choose(
    candidates_path: UPath,
    options: SelectOptions,
    centers_path: UPath | None = None,
    tables: RunTables = RunTables(),
) -> tuple[list[str], SelectionResult, dict]:
    """Select from a gathered embeddings table: its filenames, the picks and a summary of the selection.

    centers_path: a table of the same layout whose rows count as already selected (the datapool);
    tables: the run's tables that the strategies of `options.form` read and write."""
    filenames, _, vectors = load_embeddings(candidates_path, normalize=options.normalize)
    centers = load_embeddings(centers_path, normalize=options.normalize)[2] if centers_path else None
    centers = centers if centers is not None and len(centers) else None
    count = options.count(len(filenames))
    extra: dict = {}
    if not len(filenames):
        result = SelectionResult(np.empty(0, np.int64), np.empty(0, np.float32))
    elif options.form is None:
        result = select(vectors, options.method, count, options.min_distance, centers, options.seed, options.device)
    else:
        result, extra = by_strategies(filenames, vectors, options, count, centers, tables)
    finite = result.distances[np.isfinite(result.distances)]
    reached_count = count is not None and len(result.indices) >= count
    limit = options.min_distance
    stopped_by = "n_samples" if reached_count else "min_distance" if limit is not None else "all selected"
    if stopped_by == "all selected" and options.form is not None and options.form.stops_by_itself:
        stopped_by = "a strategy's stopping condition"
    return (
        filenames,
        result,
        {
            "method": "selection_config" if options.form is not None and options.method != "coral" else options.method,
            "n_candidates": len(filenames),
            "n_selected": int(len(result.indices)),
            "n_samples_target": count,
            "min_distance": limit,
            "stopped_by": stopped_by,
            "last_pick_distance": float(finite[-1]) if finite.size else None,
            **extra,
        },
    )


def by_strategies(
    filenames: list[str],
    vectors: np.ndarray,
    options: SelectOptions,
    count: int | None,
    centers: np.ndarray | None,
    tables: RunTables,
) -> tuple[SelectionResult, dict]:
    """The selection of `options.form`, and what each strategy did (see `choose`); the active-learning
    scores that SCORES inputs use are written to `tables.scores` (Parquet, and CSV beside it)."""
    inputs = resolve(options.form, options.sources, filenames, vectors, tables)
    result, scores = combine(vectors, inputs.plan, count, options.min_distance, centers, options.seed, options.device)
    described = explain(inputs.plan, scores, result.indices)
    for entry, given in zip(described, options.form.strategies):
        entry["input"] = input_label(given.input)
    if inputs.scores and tables.scores is not None:
        table = scores_table(filenames, inputs.scores)
        write_parquet(table, tables.scores)
        write_scores_csv(table, tables.scores.with_suffix(".csv"))
    return result, {"strategies": described, "input_problems": problem_summary(inputs.problems)}


def problem_summary(problems: list[Problem], examples: int = 20) -> dict:
    """How many predictions or metadata files could not be used, and the first few by name."""
    return {"n_problems": len(problems), "examples": [{"filename": f, "problem": p} for f, p in problems[:examples]]}


@task(name="select")
def select_samples(
    embeddings_path: UPath,
    options: SelectOptions,
    out_path: UPath,
    centers_path: UPath | None = None,
    tables: RunTables = RunTables(),
) -> dict:
    """Select from a gathered embeddings table into a SELECTION_SCHEMA table; returns a summary (see `choose`)."""
    filenames, result, summary = choose(embeddings_path, options, centers_path, tables)
    write_parquet(selection_table([filenames[i] for i in result.indices], result.distances, result.radii), out_path)
    return summary


def sequence_candidates(
    embeddings_path: UPath, videos_path: UPath, options: SelectOptions, out_path: UPath
) -> tuple[list[str], list[list[int]], SelectOptions]:
    """The step before: a table at `out_path` with one row per complete sequence of
    `options.sequence_length` frames, named after its first frame, whose embedding is the mean of its
    frames'. Returns the frame names, each sequence's rows among them, and the options that select
    sequences: a frame count becomes a count of sequences (a fraction of frames rounds to whole ones)."""
    filenames, labels, vectors = load_embeddings(embeddings_path, normalize=options.normalize)
    chunks = sequences(filenames, frame_infos(read_parquet([videos_path])), options.sequence_length)
    means = np.stack([vectors[rows].mean(axis=0) for rows in chunks]) if chunks else np.empty((0, vectors.shape[1]))
    write_parquet(
        pa.table(
            {
                "filename": pa.array([filenames[rows[0]] for rows in chunks], pa.string()),
                "label": pa.array([labels[rows[0]] for rows in chunks], pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(means.reshape(-1), pa.float32()), means.shape[1]
                ),
            }
        ),
        out_path,
    )
    frames = options.count(len(filenames))
    per_sequence = None if frames is None else round(frames / options.sequence_length)
    return filenames, chunks, replace(options, n_samples=per_sequence)


@task(name="select-sequences")
def select_sequences(embeddings_path: UPath, videos_path: UPath, options: SelectOptions, out_path: UPath) -> dict:
    """`selected_sequence_length` > 1: select whole sequences of consecutive video frames.

    The selection table lists every frame of the chosen sequences in selection order, each with
    its sequence's distance (the step after)."""
    candidates_path = out_path.with_name("sequence_embeddings.parquet")
    filenames, chunks, per_sequence = sequence_candidates(embeddings_path, videos_path, options, candidates_path)
    _, result, summary = choose(candidates_path, per_sequence)
    length = options.sequence_length
    names = [filenames[row] for i in result.indices for row in chunks[i]]
    write_parquet(
        selection_table(
            names, *(None if a is None else np.repeat(a, length) for a in (result.distances, result.radii))
        ),
        out_path,
    )
    count = per_sequence.n_samples
    return {
        **summary,
        "sequence_length": length,
        "n_sequences_selected": summary["n_selected"],
        "n_selected": len(names),
        "n_samples_target": None if count is None else count * length,
    }
