"""The configuration as each stage's options: the only code that reads `ThresherConfig` for the tasks.

The tasks take small frozen option objects whose fields have no defaults: the defaults live in
the config (`flows/config.py`), so changing one means changing one place.

    >>> config = ThresherConfig(input_dir="in", output_dir="out")
    >>> check_options(config).max_pixels == config.corruptness_check.max_pixels
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flows.config import ThresherConfig
from tasks.decoding import CheckOptions
from tasks.models import EmbedOptions, ModelSpec
from tasks.predictions.scores import ScorerOptions
from tasks.report.settings import ReportSettings
from tasks.selection.form import SelectionForm
from tasks.selection.inputs import InputSources
from tasks.selection.tasks import SelectOptions

if TYPE_CHECKING:
    from tasks.training import TrainOptions


def check_options(config: ThresherConfig) -> CheckOptions:
    # CheckOptions names its fields as the corruptness_check.* keys.
    return CheckOptions(full_decode=config.enable_corruptness_check, **config.corruptness_check.model_dump())


# Embedding batches hold at least this many pixels: 32 images at the default input size of 64.
# Check + embed of 4,000 photos on 2 cores ran 7 to 8% faster in batches of 32 or 64 than of 16
# (fewer hand-overs between the decoding threads and the model); an image's embedding does not
# depend on its batch. Larger inputs keep lightly.loader.batch_size, which also bounds memory.
LEAST_BATCH_PIXELS = 32 * 64 * 64


def embed_options(config: ThresherConfig, threads: int) -> EmbedOptions:
    """`threads`: the threads of one Dask worker (see ClusterPlan.threads)."""
    loader = config.lightly.loader
    input_size = config.lightly.collate.input_size
    return EmbedOptions(
        input_size=input_size,
        batch_size=max(loader.batch_size, LEAST_BATCH_PIXELS // input_size**2),
        num_threads=threads if loader.num_workers == -1 else max(1, loader.num_workers),
        torch_threads=threads,
        precision=config.lightly.trainer.precision,
        max_pixels=config.corruptness_check.max_pixels,
        decode_timeout=config.corruptness_check.decode_timeout,
        full_decode=config.enable_corruptness_check,
    )


def embeds_while_checking(config: ThresherConfig) -> bool:
    """Whether the check also embeds (tasks/one_pass.py): when it decodes every image fully, and the
    model is known before the check (a model trained with SimCLR exists only after it)."""
    return config.enable_corruptness_check and not config.enable_training


def model_spec(config: ThresherConfig) -> ModelSpec:
    return ModelSpec(
        name=config.lightly.model.name,
        num_ftrs=config.lightly.model.num_ftrs,
        checkpoint=config.shared_path(config.checkpoint, "checkpoint") if config.checkpoint else None,
        seed=config.lightly.seed,
    )


def train_options(config: ThresherConfig) -> TrainOptions:
    # Imported here: lightly loads torchvision, which only training needs.
    from tasks.training import Augmentations, TrainOptions

    lightly = config.lightly
    return TrainOptions(
        max_epochs=lightly.trainer.max_epochs,
        batch_size=lightly.loader.batch_size,
        shuffle=lightly.loader.shuffle,
        drop_last=lightly.loader.drop_last,
        num_workers=lightly.loader.num_workers,
        use_gpu=lightly.trainer.gpus > 0,
        precision=lightly.trainer.precision,
        lr=lightly.optimizer.lr,
        weight_decay=lightly.optimizer.weight_decay,
        temperature=lightly.criterion.temperature,
        memory_bank_size=lightly.criterion.memory_bank_size,
        out_dim=lightly.model.out_dim,
        max_pixels=config.corruptness_check.max_pixels,
        # lightly's own transform ignores kernel_size (it blurs with Pillow by sigmas)
        augment=Augmentations(**lightly.collate.model_dump(exclude={"kernel_size"})),
    )


def select_options(config: ThresherConfig) -> SelectOptions:
    stop = config.stopping_condition
    form = selection_form(config)
    return SelectOptions(
        method=config.method,
        n_samples=stop.samples if form is None else form.samples,
        min_distance=stop.radius if form is None else form.min_distance,
        normalize=config.normalize_embeddings,
        seed=config.lightly.seed,
        device=config.selection.device,
        sequence_length=config.selected_sequence_length,
        form=form,
        sources=None if form is None else input_sources(config),
    )


def selection_form(config: ThresherConfig) -> SelectionForm | None:
    """The strategies a run selects by: its selection_config, or method=coral's (the Worker's first
    active-learning method: coverage weighted by a prediction task's score); None for the other methods."""
    if config.selection_config is not None or config.method != "coral":
        return config.selection_config
    stop, learning = config.stopping_condition, config.active_learning
    size = {"proportion_samples": stop.samples} if isinstance(stop.samples, float) else {"n_samples": stop.samples}
    diversity = {"type": "DIVERSITY", "stopping_condition_minimum_distance": stop.radius}
    scores = {"type": "SCORES", "task": learning.task_name, "score": learning.score_name}
    return SelectionForm.model_validate(
        {
            **size,
            "strategies": [
                {"input": {"type": "EMBEDDINGS"}, "strategy": diversity},
                {"input": scores, "strategy": {"type": "WEIGHTS"}},
            ],
        }
    )


def input_sources(config: ThresherConfig) -> InputSources:
    return InputSources(
        lightly_root=config.location(config.lightly_dir or config.input_dir),
        shared_base=config.shared_base(),
        seed=config.lightly.seed,
        scorer=ScorerOptions(**config.scorer_config.model_dump()),
    )


def report_settings(config: ThresherConfig) -> ReportSettings:
    # ReportSettings names its last fields as the report.* keys.
    return ReportSettings(
        input_dir=config.input_dir,
        storage_options=config.storage_options,
        normalize=config.normalize_embeddings,
        memory_gb=config.memory_requirement_in_GB,
        n_example_images=config.n_example_images,
        max_pixels=config.corruptness_check.max_pixels,
        seed=config.lightly.seed,
        **config.report.model_dump(),
        selection=select_options(config),
    )


def report_config(config: ThresherConfig) -> dict:
    """The config as the report shows it, secrets left out."""
    return config.model_dump(mode="json", exclude={"token"})
