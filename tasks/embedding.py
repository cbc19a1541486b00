"""Stage 4: embed shards of images with a backbone (tasks/backbones.py), on the GPU when there is one.

Images are resized to input_size x input_size (as lightly does) and normalised with the ImageNet
mean and std. Video frames are resized by the decoder as they come out of it
(`tasks/video/frames.py`), so a shard of a long video streams in bounded memory. The model and
torch are loaded by the tasks, on the workers: the flow's process imports this module to plan
the stage and never needs them.

    >>> from tasks.backbones import load_backbone
    >>> from tasks.listing import InputFile
    >>> model = load_backbone("efficientnet-lite0", num_ftrs=32, checkpoint="", seed=1, device="cpu")
    >>> names, vectors, errors, seconds = embed_sources(UPath("examples/images"),
    ...     [InputFile("objects/chelsea_00.jpg", 0, 1, "0.0")], model, EmbedOptions(input_size=64, batch_size=16,
    ...     num_threads=1, torch_threads=1, precision=32, max_pixels=10**8, decode_timeout=10.0,
    ...     full_decode=True))
    >>> vectors.shape
    (1, 1280)
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager, nullcontext
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from upath import UPath

from tasks.decoding import CorruptImage, open_image
from tasks.gathering import embedding_schema
from tasks.models import EmbedOptions, ModelSpec
from tasks.sharding import Batch, Source
from tasks.storage import write_parquet
from tasks.timeouts import ahead
from tasks.video.frames import embedder_input

if TYPE_CHECKING:
    import torch

# Sources are read this many batches ahead of the model: the next batch is ready when the model is,
# and a task of thousands of files at a large input size never holds all their inputs at once.
BATCHES_AHEAD = 2

R = TypeVar("R")


class Turns:
    """The model and the decoding threads take turns on a CPU worker: a decoding thread waits while
    the model computes a batch, rather than share the core with it. A task has a core of its own (a
    local cluster has a single-threaded worker per core, flows/cluster.py), and sliced on it by the
    system, each ran slower than alone: checking and embedding 1,000 photos on one core, the model
    took 2.8 to 3.5 s, against 1.4 to 1.7 s with turns, and the photos went through at 234 against
    268 images/s (benchmarks/turns.py, medians of 6 alternating rounds). The check + embed stage of
    a cold 4,000-photo run on 2 cores took 0.91 to 0.96 times as long with turns
    (benchmarks/throughput.py --baseline, 3 alternating rounds). Only the decode waits, not the
    file's read: a file from a bucket arrives while the model computes. On a GPU the model takes no
    turn, and the cores decode while the device computes."""

    def __init__(self) -> None:
        self._free = threading.Event()
        self._free.set()

    def wait(self) -> None:
        """Until the model is not computing; a decoding thread calls it before each decode."""
        self._free.wait()

    @contextmanager
    def computing(self) -> Iterator[None]:
        self._free.clear()
        try:
            yield
        finally:
            self._free.set()


def preprocess(image: Image.Image, input_size: int) -> np.ndarray:
    """uint8 CHW array of the image squashed to input_size x input_size, as lightly resizes."""
    resized = image.resize((input_size, input_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)


def _image_input(data: bytes, options: EmbedOptions, turns: Turns) -> np.ndarray | str:
    least_size = None if options.full_decode else options.input_size
    turns.wait()
    try:
        image = open_image(data, options.max_pixels, timeout=options.decode_timeout, least_size=least_size)
        return preprocess(image, options.input_size)
    except CorruptImage as error:
        return str(error)


def embed_sources(
    input_dir: UPath, sources: list[Source], model: torch.nn.Module, options: EmbedOptions
) -> tuple[list[str], np.ndarray, list[str | None], float]:
    """The sources' sample names, their embeddings (n, d) float32 in order (NaN rows where
    decoding failed), the errors, and the seconds spent in the model (for compute efficiency)."""

    turns = Turns()

    def read(source: Source) -> Iterable[tuple[str, np.ndarray | str]]:
        return source.read(
            input_dir,
            functools.partial(_image_input, options=options, turns=turns),
            functools.partial(embedder_input, input_size=options.input_size),
            options.decode_timeout,
        )

    # An image is read and decoded when its read is called, here in `ahead`'s threads: Pillow
    # releases the GIL while decoding and resizing, so threads overlap I/O with decoding and with the
    # model (decoding and a model on the CPU take turns, see Turns). A range's frames are decoded as
    # they are taken, in order, so a long video streams in bounded memory.
    with closing(read_ahead(read, sources, options)) as read_sources:  # closed, its threads stop
        inputs = (result for found in read_sources for _, result in found)
        return [name for source in sources for name in source.names()], *embed_inputs(inputs, model, options, turns)


def read_ahead(read: Callable[[Source], R], sources: list[Source], options: EmbedOptions) -> Iterator[R]:
    """read(source) for each source, in order, made by the decoding threads ahead of the model."""
    return ahead(read, sources, options.num_threads, BATCHES_AHEAD * options.batch_size)


def embed_inputs(
    inputs: Iterable[np.ndarray | str], model: torch.nn.Module, options: EmbedOptions, turns: Turns | None = None
) -> tuple[np.ndarray, list[str | None], float]:
    """Embed a stream of uint8 CHW arrays (or error strings), batch by batch, in input order; on the
    CPU, each batch as the model's turn of `turns`, which the threads decoding the inputs share."""
    from tasks.backbones import forward, output_dim  # imported here: torch, which only the workers load

    device = next(model.parameters()).device.type
    dim: int | None = None
    rows: list[np.ndarray | None] = []
    errors: list[str | None] = []
    pending: list[np.ndarray] = []
    compute = 0.0

    def flush() -> None:
        nonlocal dim, compute
        if pending:
            batch = np.stack(pending)
            with turns.computing() if turns is not None and device == "cpu" else nullcontext():
                start = time.perf_counter()
                out = forward(model, batch, options.precision, device)
                compute += time.perf_counter() - start
            dim = out.shape[1]
            rows.extend(out)
            pending.clear()

    for result in inputs:
        if isinstance(result, str):
            flush()  # keep rows in input order
            rows.append(None)
            errors.append(result)
            continue
        pending.append(result)
        errors.append(None)
        if len(pending) == options.batch_size:
            flush()
    flush()
    if dim is None:
        dim = output_dim(model, options.input_size, options.precision, device)
    vectors = np.full((len(rows), dim), np.nan, dtype=np.float32)
    for i, row in enumerate(rows):
        if row is not None:
            vectors[i] = row
    return vectors, errors, compute


def embedding_column(vectors: np.ndarray, errors: list[str | None]) -> pa.FixedSizeListArray:
    """The embeddings as embedding_schema's column: null where a sample has an error."""
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    mask = pa.array([e is not None for e in errors], pa.bool_())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1], mask=mask)


def embeddings_table(
    filenames: list[str], labels: list[int], vectors: np.ndarray, errors: list[str | None]
) -> pa.Table:
    columns = [pa.array(filenames, pa.string()), pa.array(labels, pa.int32()), embedding_column(vectors, errors)]
    return pa.Table.from_arrays([*columns, pa.array(errors, pa.string())], schema=embedding_schema(vectors.shape[1]))


def embed_pieces_with(
    pieces: Sequence[list[Source]],
    spec: ModelSpec,
    options: EmbedOptions,
    out_paths: list[UPath],
    table: Callable[[list[Source], torch.nn.Module], tuple[pa.Table, float]],
) -> dict:
    """Write each piece's `table` (made with the worker's model: the table and the seconds spent in
    the model) to its Parquet file (see tasks/sharding.py); returns the samples and the timings."""
    from tasks.backbones import worker_model  # imported here: torch, which only the workers load

    start = time.perf_counter()
    model = worker_model(spec, options.torch_threads)
    n, compute = 0, 0.0
    for sources, out_path in zip(pieces, out_paths):
        made, seconds = table(sources, model)
        write_parquet(made, out_path)
        n, compute = n + len(made), compute + seconds
    return {"n": n, "seconds": time.perf_counter() - start, "compute_seconds": compute}


def embedded_table(
    input_dir: UPath, sources: list[Source], model: torch.nn.Module, options: EmbedOptions
) -> tuple[pa.Table, float]:
    filenames, vectors, errors, seconds = embed_sources(input_dir, sources, model, options)
    labels = [source.label for source in sources for _ in range(source.count)]
    return embeddings_table(filenames, labels, vectors, errors), seconds


def warm_model(spec: ModelSpec, torch_threads: int) -> None:
    """Load the model on this worker ahead of its first embedding task (flows/stages.py: warm_up)."""
    from tasks.backbones import worker_model  # imported here: torch, which only the workers load

    worker_model(spec, torch_threads)


@task(name="embed-shard", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def embed_pieces(
    input_dir: UPath,
    pieces: Batch,
    spec: ModelSpec,
    options: EmbedOptions,
    out_paths: list[UPath],
) -> dict:
    """Embed each piece (image files, or video frame ranges) into its own Parquet file."""
    return embed_pieces_with(
        pieces, spec, options, out_paths, lambda sources, model: embedded_table(input_dir, sources, model, options)
    )
