"""Stages 2 and 4 in one pass: every file is read and decoded once, for the check and for the model.

The check must decode an image fully to call it usable (tasks/decoding.py); that decode also gives
the model its input, resized as the embedder resizes (tasks/embedding.py: preprocess), and a video
frame's input comes from the decoder's scaler (embedder_input), as when embedding on its own.
Threads read and decode the next files ahead of the model (on a CPU, decoding and the model take
turns: tasks/embedding.py, Turns). A piece's table is its check table with an `embedding` column
(null for an unusable sample): dedup reads the check's columns (decoding.read_checks) and gathering
the embeddings of the samples left ok (tasks/gathering.py).

Duplicates are embedded too: one is known as such only once every piece is checked. That costs a
model call per duplicate, against a decode saved for every file. The pass runs when the check
decodes fully and the model is known before the check (flows/options.py: embeds_while_checking).

    >>> from tasks.backbones import load_backbone
    >>> from tasks.listing import InputFile
    >>> from tests.options import check_options, embed_options
    >>> model = load_backbone("efficientnet-lite0", num_ftrs=32, checkpoint="", seed=1, device="cpu")
    >>> table, _ = check_and_embed(UPath("examples/images"), [InputFile("objects/chelsea_00.jpg", 0, 1, "0.0")],
    ...     model, check_options(), embed_options())
    >>> table.column("error").to_pylist(), len(table.column("embedding")[0])
    ([None], 1280)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import closing
from typing import TYPE_CHECKING

import av
import numpy as np
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from upath import UPath

from tasks.decoding import CheckOptions, check_table, check_threshold, found_row, inspect_image, source_extension
from tasks.embedding import Turns, embed_inputs, embed_pieces_with, embedding_column, preprocess, read_ahead
from tasks.models import EmbedOptions, ModelSpec
from tasks.sharding import Batch, Source
from tasks.video.frames import embedder_input
from tasks.video.quality import check_frame

if TYPE_CHECKING:
    import torch

Inspected = tuple[dict, np.ndarray | str]  # what the check found, and the model's input or why there is none


def inspect_image_for_model(
    data: bytes, extension: str | None, check: CheckOptions, input_size: int, turns: Turns
) -> Inspected:
    turns.wait()
    found, image = inspect_image(data, extension, check)
    return found, (found["error"] if image is None else preprocess(image, input_size))


def inspect_frame_for_model(frame: av.VideoFrame, threshold: float | None, input_size: int) -> Inspected:
    found = check_frame(frame, threshold)
    return found, (found["error"] if "error" in found else embedder_input(frame, input_size))


def check_and_embed(
    input_dir: UPath, sources: list[Source], model: torch.nn.Module, check: CheckOptions, embed: EmbedOptions
) -> tuple[pa.Table, float]:
    """The sources' check table (CHECK_SCHEMA, one row per sample in order) with their embeddings,
    and the seconds spent in the model."""
    assert check.full_decode, "one pass needs the check's full decode"
    frame = functools.partial(inspect_frame_for_model, threshold=check_threshold(check), input_size=embed.input_size)
    rows: list[dict] = []
    turns = Turns()

    def read(source: Source) -> list[tuple[str, Inspected | str]] | Iterator[tuple[str, Inspected | str]]:
        extension = source_extension(source, check)
        size = embed.input_size
        image = functools.partial(
            inspect_image_for_model, extension=extension, check=check, input_size=size, turns=turns
        )
        return source.read(input_dir, image, frame, check.decode_timeout)

    def inputs(read_sources: Iterator[Iterable[tuple[str, Inspected | str]]]) -> Iterator[np.ndarray | str]:
        # The rows are kept as the model's inputs are taken, so both stay in the sources' order.
        for source, found in zip(sources, read_sources):
            for name, result in found:
                fields, model_input = (result, result) if isinstance(result, str) else result
                rows.append(found_row(source, name, fields))
                yield model_input

    with closing(read_ahead(read, sources, embed)) as read_sources:  # closed, its threads stop
        vectors, errors, seconds = embed_inputs(inputs(read_sources), model, embed, turns)
    return check_table(rows).append_column("embedding", embedding_column(vectors, errors)), seconds


@task(name="check-embed", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def check_embed_pieces(
    input_dir: UPath,
    pieces: Batch,
    spec: ModelSpec,
    check: CheckOptions,
    embed: EmbedOptions,
    out_paths: list[UPath],
) -> dict:
    """Check and embed each piece into its own Parquet file; returns the samples and the timings."""
    return embed_pieces_with(
        pieces, spec, embed, out_paths, lambda sources, model: check_and_embed(input_dir, sources, model, check, embed)
    )
