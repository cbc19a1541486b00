import dataclasses
import gc
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from lightly.loss import NTXentLoss
from PIL import Image

from flows.config import ConfigError
from flows.validation import validate_config
from tasks.backbones import build_backbone, load_backbone, load_checkpoint
from tasks.embedding import embed_sources
from tasks.listing import InputFile, list_images
from tasks.models import ModelSpec
from tasks.sharding import frame_ranges
from tasks.training import (
    Step,
    build_simclr,
    checkpoint_payload,
    extract_frames,
    sample_ranges,
    save_checkpoint,
    train,
    train_model,
    train_step,
    training_loader,
)
from tasks.video.probe import VIDEO_SCHEMA, probe_row
from tests.images import picture, save
from tests.options import augmentations, embed_options, train_options
from tests.videos import frames, write_video

SPEC = ModelSpec("resnet-18", num_ftrs=16, checkpoint=None, seed=1)
TINY = train_options(
    max_epochs=1, batch_size=8, out_dim=16, lr=0.1, num_workers=0, augment=augmentations(input_size=32)
)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("train_images")
    return [
        save(picture(seed, (48, 40)), root / f"img_{seed:02d}.jpg", format="JPEG", quality=90) for seed in range(10)
    ]


def test_one_epoch_writes_a_checkpoint_that_embeds_and_resumes(images, tmp_path):
    steps: list[Step] = []
    checkpoint = train(images, SPEC, TINY, tmp_path / "run", steps.append)
    assert checkpoint == tmp_path / "run" / "lightly_epoch_0.ckpt" and checkpoint.exists()
    assert len(steps) == 1 and np.isfinite(steps[0].loss) and 0 < steps[0].compute_efficiency <= 1
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["epoch"] == 0 and payload["model_name"] == "resnet-18" and payload["num_ftrs"] == 16
    assert set(payload["state_dict"]) == set(build_backbone("resnet-18", 16, 1).state_dict())

    # resuming carries on the epoch count
    resumed = train(images, ModelSpec("resnet-18", 16, checkpoint, 1), TINY, tmp_path / "run2")
    assert resumed.name == "lightly_epoch_1.ckpt"

    # the trained backbone embeds differently from the untrained one
    options = embed_options(input_size=32, batch_size=8)
    files = [InputFile(p.name, 0, 1, "0.0") for p in images[:4]]
    before = embed_sources(images[0].parent, files, load_backbone("resnet-18", 16, None, 1, "cpu"), options)[1]
    after = embed_sources(images[0].parent, files, load_backbone("resnet-18", 16, checkpoint, 1, "cpu"), options)[1]
    assert before.shape == after.shape == (4, 16) and not np.allclose(before, after, atol=1e-4)


def test_loss_decreases_on_a_fixed_batch(images):
    torch.manual_seed(0)  # the projection head's initialisation draws from the global generator
    model, start = build_simclr(SPEC, out_dim=16)
    assert start == 0
    views = next(iter(training_loader(images, TINY, seed=1, pin_memory=False)))
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2
    criterion = NTXentLoss(temperature=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    losses = [train_step(model, criterion, optimizer, scaler, views, precision=32) for _ in range(6)]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < losses[0]


def test_checkpoint_of_another_out_dim_is_refused_with_the_key(tmp_path):
    model, _ = build_simclr(SPEC, out_dim=16)
    checkpoint = save_checkpoint(checkpoint_payload(model, SPEC, TINY, epoch=3, loss=1.0), tmp_path)
    assert build_simclr(ModelSpec("resnet-18", 16, checkpoint, 1), out_dim=16)[1] == 4
    with pytest.raises(ValueError, match="lightly.model.out_dim"):
        build_simclr(ModelSpec("resnet-18", 16, checkpoint, 1), out_dim=32)


def test_a_bare_backbone_checkpoint_starts_a_new_head(tmp_path):
    backbone = build_backbone("resnet-18", 16, seed=5)
    torch.save(backbone.state_dict(), tmp_path / "bare.pth")
    model, start = build_simclr(ModelSpec("resnet-18", 16, tmp_path / "bare.pth", 1), out_dim=16)
    assert start == 0 and torch.equal(model.backbone.state_dict()["8.weight"], backbone.state_dict()["8.weight"])


def test_too_few_images_is_a_clear_error(images):
    with pytest.raises(ValueError, match="at least 2 images"):
        training_loader(images[:1], TINY, seed=1, pin_memory=False)


def test_video_frames_are_sampled_to_image_files(tmp_path):
    write_video(tmp_path / "in" / "clip.mp4", frames(12))
    videos = pa.Table.from_pylist(
        [probe_row(tmp_path / "in", f, False) for f in list_images(tmp_path / "in")], schema=VIDEO_SCHEMA
    )
    sampled = sample_ranges(frame_ranges(videos, size=5), max_frames=4)
    paths = extract_frames(tmp_path / "in", sampled, tmp_path / "frames")
    assert [p.name for p in paths] == ["clip-00-mp4.png", "clip-03-mp4.png", "clip-06-mp4.png", "clip-09-mp4.png"]
    assert Image.open(paths[1]).size == (64, 48)


def test_train_model_task_reports_progress(images, tmp_path, prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow
    def one_training() -> str:
        return train_model(images[0].parent, [p.name for p in images], SPEC, TINY, tmp_path)

    checkpoint = one_training()
    assert Path(checkpoint).name == "lightly_epoch_0.ckpt"
    load_checkpoint(build_backbone("resnet-18", 16, 1), Path(checkpoint))

    import asyncio

    async def progress():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    artifacts = [a for a in asyncio.run(progress()) if a.key == "training-progress"]
    assert artifacts and artifacts[0].data == 100


def test_loader_processes_end_cleanly_in_a_flow_process(images, tmp_path, prefect_server, monkeypatch):
    """Data-loading processes forked from a process running Prefect's API services once failed at
    their exit, and torch reported it as an error when the loader was collected."""
    from prefect import flow

    errors = []
    monkeypatch.setattr(sys, "unraisablehook", errors.append)  # where torch's report went

    @flow
    def training_with_loader_processes() -> str:
        return train_model(
            images[0].parent, [p.name for p in images], SPEC, dataclasses.replace(TINY, num_workers=2), tmp_path
        )

    assert Path(training_with_loader_processes()).name == "lightly_epoch_0.ckpt"
    gc.collect()
    assert not errors, errors[0].exc_value


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"datapool": {"name": "pool"}}, "datapool"),
        ({"lightly": {"trainer": {"max_epochs": 0}}}, "lightly.trainer.max_epochs"),
    ],
)
def test_config_refuses_training_it_cannot_do(extra, message):
    base = {"input_dir": "in", "output_dir": "out", "stopping_condition": {"n_samples": 3}, "enable_training": True}
    validate_config({**base, "datapool": {"name": None}, "lightly": {}})  # training alone is accepted
    with pytest.raises(ConfigError, match=message):
        validate_config({**base, **extra})
