"""Stage 3b (optional, `enable_training=True`): fine-tune the backbone on the input images with
SimCLR before they are embedded, as the Lightly Worker and `lightly-ssl-train` do.

SimCLR with lightly's defaults and lightly's own parts: two augmented views of every image
(`lightly.transforms.SimCLRTransform`, torchvision transforms v2, set by `lightly.collate.*`), the
backbone from `tasks.backbones.build_backbone`, a `SimCLRProjectionHead(d, d, out_dim,
batch_norm=False)` as in lightly's CLI, `NTXentLoss(temperature, memory_bank_size)` and plain
SGD(lr, weight_decay). Training starts from the default pretrained backbone, or from `checkpoint=`
(a backbone, or one of our training checkpoints, whose projection head and epoch count carry on).
It runs on the GPU when there is one (`lightly.trainer.gpus` > 0), in mixed precision (fp16
with loss scaling) when `lightly.trainer.precision=16`; on the CPU it trains in float32. Images are decoded
by `tasks.decoding.open_image`, so exactly the files that passed the corruptness check are
trained on; video frames are sampled to image files first (`extract_frames`).

Checkpoint layout. After every epoch N (counted from 0, as lightly names them) the run directory
gets `lightly_epoch_<N>.ckpt`, replacing the previous epoch's file (the last epoch's is the one
embedding uses and training resumes from; keeping every epoch would cost a backbone per epoch).
It is a `torch.save`d dict that loads with `torch.load(path, weights_only=True)`:

    state_dict       backbone.state_dict(): the same module `build_backbone(model_name, num_ftrs,
                     seed)` makes, so `tasks.backbones.load_checkpoint` loads it as it is.
                     resnet-*: keys "0.*" ... "7.*" are torchvision's resnet trunk (conv1, bn1,
                     relu, maxpool, layer1-4), "8.weight"/"8.bias" the 1x1 conv to num_ftrs
                     (then average pool and flatten, no weights). efficientnet-lite0: timm's
                     `tf_efficientnet_lite0` keys (conv_stem, bn1, blocks.*, conv_head, bn2),
                     classifier removed.
    projection_head  SimCLRProjectionHead state dict ("layers.0.*", "layers.2.*").
    epoch            N, the last finished epoch.
    loss             mean NT-Xent loss of epoch N.
    model_name, num_ftrs, out_dim, input_size, thresher_version   what it was trained with.

    >>> checkpoint = train([location("examples/images/objects/chelsea_00.jpg"), ...],
    ...                    ModelSpec("resnet-18", num_ftrs=32, checkpoint="", seed=1),
    ...                    train_options(config), location("out/run"))
    >>> checkpoint.name
    'lightly_epoch_0.ckpt'
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from PIL import Image
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from tqdm import tqdm
from upath import UPath

from tasks.backbones import build_backbone, default_device, load_checkpoint
from tasks.decoding import open_image
from tasks.models import ModelSpec
from tasks.storage import atomic_target, describe, read_bytes
from tasks.video.frames import FrameRange, frame_image, read_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augmentations:
    """`lightly.collate.*`, named as `SimCLRTransform`'s arguments. lightly's `kernel_size` is not
    here: lightly's own transform ignores it since it blurs with Pillow by `sigmas`."""

    input_size: int
    cj_prob: float
    cj_bright: float
    cj_contrast: float
    cj_sat: float
    cj_hue: float
    min_scale: float
    random_gray_scale: float
    gaussian_blur: float
    sigmas: tuple[float, float]
    vf_prob: float
    hf_prob: float
    rr_prob: float


@dataclass(frozen=True)
class TrainOptions:
    """The `lightly.*` keys that training reads (see flows/options.py)."""

    max_epochs: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    num_workers: int  # data-loading processes; -1 means one per CPU core
    use_gpu: bool
    precision: int
    lr: float
    weight_decay: float
    temperature: float
    memory_bank_size: int
    out_dim: int
    max_pixels: int
    augment: Augmentations


@dataclass(frozen=True)
class Step:
    """What one optimisation step did, for progress bars and logs."""

    epoch: int
    index: int  # step within the epoch, from 0
    steps: int  # steps per epoch
    loss: float
    images: int
    compute_seconds: float  # forward, backward and update
    seconds: float  # since the previous step ended: loading the batch plus compute

    @property
    def compute_efficiency(self) -> float:
        return self.compute_seconds / self.seconds if self.seconds else 1.0


class TrainingImages(torch.utils.data.Dataset):
    """Two augmented views of each image file."""

    def __init__(self, paths: list[UPath], transform: Callable[[Image.Image], list[torch.Tensor]], max_pixels: int):
        self.paths, self.transform, self.max_pixels = paths, transform, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return self.transform(open_image(read_bytes(self.paths[index]), self.max_pixels))


class SimCLR(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, projection_head: torch.nn.Module):
        super().__init__()
        self.backbone, self.projection_head = backbone, projection_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


def feature_dim(backbone: torch.nn.Module) -> int:
    was_training = backbone.training
    with torch.no_grad():
        dim = backbone.eval()(torch.zeros(1, 3, 32, 32)).flatten(start_dim=1).shape[1]
    backbone.train(was_training)
    return dim


def build_simclr(spec: ModelSpec, out_dim: int) -> tuple[SimCLR, int]:
    """The SimCLR model to train and the epoch to start from (0, or one past the checkpoint's)."""
    backbone = build_backbone(spec.name, spec.num_ftrs, spec.seed)
    dim = feature_dim(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)  # the same head on every run with the same seed
        head = SimCLRProjectionHead(dim, dim, out_dim, batch_norm=False)
    if not spec.checkpoint:
        return SimCLR(backbone, head), 0
    load_checkpoint(backbone, spec.checkpoint)
    payload = torch.load(io.BytesIO(read_bytes(spec.checkpoint)), map_location="cpu", weights_only=True)
    if "projection_head" not in payload:  # a bare backbone: a new head, epochs from 0
        return SimCLR(backbone, head), 0
    try:
        head.load_state_dict(payload["projection_head"])
    except RuntimeError:
        raise ValueError(
            f"checkpoint={describe(spec.checkpoint)} has a projection head of another size than "
            f"lightly.model.out_dim={out_dim}; "
            f"use the out_dim it was trained with ({payload.get('out_dim')})."
        ) from None
    return SimCLR(backbone, head), int(payload["epoch"]) + 1


def checkpoint_payload(model: SimCLR, spec: ModelSpec, options: TrainOptions, epoch: int, loss: float) -> dict:
    return {
        "state_dict": model.backbone.state_dict(),
        "projection_head": model.projection_head.state_dict(),
        "epoch": epoch,
        "loss": loss,
        "model_name": spec.name,
        "num_ftrs": spec.num_ftrs,
        "out_dim": options.out_dim,
        "input_size": options.augment.input_size,
        "thresher_version": importlib.metadata.version("thresher"),
    }


def save_checkpoint(payload: dict, run_dir: UPath) -> UPath:
    path = run_dir / f"lightly_epoch_{payload['epoch']}.ckpt"
    with atomic_target(path) as tmp:  # a crash mid-write never leaves a truncated checkpoint behind
        torch.save({key: _to_cpu(value) for key, value in payload.items()}, tmp)
    return path


def _to_cpu(value: object) -> object:
    return {k: v.detach().cpu() for k, v in value.items()} if isinstance(value, dict) else value


def loader_workers(requested: int) -> int:
    workers = (os.cpu_count() or 1) if requested == -1 else requested
    if workers and multiprocessing.current_process().daemon:
        # Dask runs tasks in daemonic processes, which may not start children: load in-process.
        log.warning("Training runs in a daemonic process: lightly.loader.num_workers=%d falls back to 0.", requested)
        return 0
    return workers


def loader_context() -> multiprocessing.context.BaseContext:
    """Where data-loading processes come from: forked from a fork server, not from the flow's process.

    A process forked from the flow's inherits the exit hooks of Prefect's API services, whose threads
    live only in the flow's process. They failed at the loader worker's exit (code 1), and torch then
    printed a "DataLoader worker exited unexpectedly" traceback at the end of every training. (Forking a
    process that runs threads is unsafe anyway; Python 3.14 no longer does it by default.) The server
    imports this module once, about 10 s on 2 cores, and forks each worker ready to load."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once the server runs: it is one per process
    return context


def training_loader(
    paths: list[UPath], options: TrainOptions, seed: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    if len(paths) < 2:
        raise ValueError(f"enable_training=True needs at least 2 images to contrast; the input has {len(paths)}.")
    dataset = TrainingImages(paths, SimCLRTransform(**dataclasses.asdict(options.augment)), options.max_pixels)
    workers = loader_workers(options.num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=min(options.batch_size, len(paths)),  # as lightly: a small input still gives one batch
        shuffle=options.shuffle,
        drop_last=options.drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        multiprocessing_context=loader_context() if workers > 0 else None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def mixed_precision(precision: int, device: str) -> bool:
    # On CPUs without bf16 units (most), a bf16 autocast training step measured 7x slower than
    # float32 (resnet-18, 32 px, batch 8); there precision=16 would only cost time.
    return precision == 16 and device == "cuda"


def train_step(
    model: SimCLR,
    criterion: NTXentLoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    views: list[torch.Tensor],
    precision: int,
) -> float:
    """One SGD step on a batch of two views; returns the loss."""
    device = next(model.parameters()).device.type
    x0, x1 = (view.to(device, non_blocking=True) for view in views)
    with torch.autocast(device, dtype=torch.float16, enabled=mixed_precision(precision, device)):
        z0, z1 = model(x0), model(x1)
    loss = criterion(z0.float(), z1.float())  # the softmax over similarities needs float32 range
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()  # also waits for the GPU, so step timings are real


def fit(
    model: SimCLR,
    loader: torch.utils.data.DataLoader,
    spec: ModelSpec,
    options: TrainOptions,
    start_epoch: int,
    run_dir: UPath,
    on_step: Callable[[Step], None] = lambda step: None,
) -> UPath:
    """Train for options.max_epochs epochs from start_epoch; returns the last epoch's checkpoint."""
    device = next(model.parameters()).device.type
    criterion = NTXentLoss(temperature=options.temperature, memory_bank_size=options.memory_bank_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    scaler = torch.amp.GradScaler(device, enabled=mixed_precision(options.precision, device))
    if options.precision == 16 and device == "cpu":
        log.warning("lightly.trainer.precision=16 applies on a GPU; training on the CPU runs in float32.")
    model.train()
    previous: UPath | None = None
    for epoch in range(start_epoch, start_epoch + options.max_epochs):
        losses = []
        ready = time.perf_counter()
        for index, views in enumerate(loader):
            started = time.perf_counter()
            losses.append(train_step(model, criterion, optimizer, scaler, views, options.precision))
            done = time.perf_counter()
            on_step(Step(epoch, index, len(loader), losses[-1], len(views[0]), done - started, done - ready))
            ready = done
        payload = checkpoint_payload(model, spec, options, epoch, sum(losses) / max(1, len(losses)))
        path = save_checkpoint(payload, run_dir)
        if previous is not None:
            previous.unlink(missing_ok=True)
        previous = path
        log.info("Training epoch %d: mean loss %.4f, checkpoint %s", epoch, payload["loss"], describe(path))
    assert previous is not None, "max_epochs must be at least 1"
    return previous


def train(
    paths: list[UPath],
    spec: ModelSpec,
    options: TrainOptions,
    run_dir: UPath,
    on_step: Callable[[Step], None] = lambda step: None,
) -> UPath:
    """Fine-tune spec's backbone on the image files with SimCLR; returns the last checkpoint."""
    device = default_device() if options.use_gpu else "cpu"
    model, start_epoch = build_simclr(spec, options.out_dim)
    loader = training_loader(paths, options, spec.seed, pin_memory=device == "cuda")
    return fit(model.to(device), loader, spec, options, start_epoch, run_dir, on_step)


def sample_ranges(ranges: list[FrameRange], max_frames: int) -> list[FrameRange]:
    """Every k-th frame of the ranges, so that at most max_frames are kept: neighbouring frames are
    near copies, which add decoding time but little to contrast."""
    stride = max(1, -(-sum(len(rng.indices) for rng in ranges) // max_frames))
    sampled, seen = [], 0
    for rng in ranges:
        first = -seen % stride  # the stride runs on across ranges, so the total stays within max_frames
        seen += len(rng.indices)
        if first < len(rng.indices):
            sampled.append(dataclasses.replace(rng, indices=rng.indices[first::stride], pts=rng.pts[first::stride]))
    return sampled


def extract_frames(input_dir: UPath, ranges: list[FrameRange], out_dir: Path) -> list[UPath]:
    """Decode the frames once into PNG files to train on (an epoch then reads them like images);
    frames that fail to decode are left out."""
    paths = []
    for name, frame in read_frames(input_dir, ranges, frame_image):
        if isinstance(frame, Image.Image):
            path = out_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.save(path)
            paths.append(UPath(path))
    return paths


class Progress:
    """Training progress in the terminal (tqdm) and in the Prefect UI (a progress artifact)."""

    def __init__(self, max_epochs: int):
        self.max_epochs, self.done_steps, self.last_update = max_epochs, 0, 0.0
        self.bar = tqdm(desc=f"{'train':<12}", unit="step", dynamic_ncols=True)
        self.artifact = create_progress_artifact(0.0, key="training-progress", description="SimCLR training")

    def __call__(self, step: Step) -> None:
        total = step.steps * self.max_epochs
        self.done_steps += 1
        self.bar.total = total
        self.bar.set_postfix(
            epoch=step.epoch,
            loss=f"{step.loss:.3f}",
            img_s=f"{step.images / step.seconds:.1f}",
            efficiency=f"{step.compute_efficiency:.2f}",
            refresh=False,
        )
        self.bar.update(1)
        if time.monotonic() - self.last_update > 2 or self.done_steps == total:  # spare the API server
            update_progress_artifact(
                self.artifact, 100 * self.done_steps / total, description=f"epoch {step.epoch}, loss {step.loss:.3f}"
            )
            self.last_update = time.monotonic()


@task(name="train-model")
def train_model(
    input_dir: UPath,
    files: list[str],
    spec: ModelSpec,
    options: TrainOptions,
    run_dir: UPath,
    frames: list[FrameRange] | None = None,
    max_frames: int = 10_000,
) -> UPath:
    """Fine-tune the backbone on the image files and (every k-th of at most max_frames) video
    frames; returns the path of the checkpoint to embed with. Frames are decoded once into a
    local temporary folder that is removed after training."""
    paths = [input_dir / name for name in files]
    progress = Progress(options.max_epochs)
    with tempfile.TemporaryDirectory(prefix="thresher-train-frames-") as frame_dir, progress.bar:
        if frames:
            paths += extract_frames(input_dir, sample_ranges(list(frames), max_frames), Path(frame_dir))
        return train(paths, spec, options, run_dir, progress)
