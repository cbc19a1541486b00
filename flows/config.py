"""The one configuration object of a Thresher run.

It is the `curate` flow's parameter set, the CLI's `key=value` surface and the
`config/config.yaml` written into every run directory. Key names and defaults follow
the Lightly Worker (Docker) parameter list, so a Lightly user's overrides work as they are:

    >>> cfg = ThresherConfig.model_validate({"input_dir": "images", "output_dir": "out",
    ...                                      "stopping_condition": {"n_samples": 0.3}})
    >>> cfg.stopping_condition.n_samples
    0.3
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator
from upath import UPath

from tasks.selection.form import SelectionForm
from tasks.storage import StorageError, describe, is_local, literal_secrets, location


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message names the key and says what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StoppingCondition(_Section):
    n_samples: int | float = Field(
        -1, description="Float in (0, 1] for a fraction of the input, int for a number of samples, -1 means inactive."
    )
    min_distance: float = Field(
        -1.0, description="Minimum distance between two samples in the selected set; -1 means inactive."
    )

    # Lightly's -1 ("not set") stops here: the selection gets None instead. check_consistency holds the rules.
    @property
    def samples(self) -> int | float | None:
        """`n_samples` as a count, a fraction in (0, 1], or None when it is not set."""
        return None if self.n_samples == -1 else self.n_samples

    @property
    def radius(self) -> float | None:
        """`min_distance`, or None when it is not set."""
        return None if self.min_distance == -1 else self.min_distance


class CorruptnessCheck(_Section):
    corruption_threshold: float = Field(
        0.1, ge=0, le=1, description="Video frames whose corruptness score exceeds this are corrupt (video input)."
    )
    max_pixels: int = Field(
        178_956_970,
        gt=0,
        description="Images that declare more pixels are rejected as decompression bombs before any pixel is decoded.",
    )
    decode_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds one image, or one video frame, may take to decode; a slower image is listed as corrupt, "
        "as are a video's frames from the slow one on, so no file can stall a run.",
    )
    allow_extension_mismatch: bool = Field(
        False,
        description="Keep images whose content format differs from their file extension "
        "(by default they are listed as corrupt, since a wrong extension usually means a broken export).",
    )


class Datapool(_Section):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name of the datapool in shared_dir: selections grow it across runs.",
    )
    keep_history: bool = Field(True, description="Keep a backup of every previous datapool state.")
    dataset_id: str | None = Field(None, description="Lightly Platform only; not applicable to Thresher.")


class Datasource(_Section):
    dataset_id: str | None = Field(None, description="Lightly Platform only; not applicable to Thresher.")
    process_all: bool = Field(False, description="Reprocess every file, not only files no earlier run processed.")
    enable_datapool_update: bool = Field(True, description="Add this run's selection to the datapool.")
    use_frame_count_metadata: bool = Field(False, description="Trust the container's frame count for videos.")


class ScorerConfig(_Section):
    frequency_penalty: float = Field(
        0.25,
        ge=0,
        le=1,
        description="object_frequency score: what each further object of a category already in the image counts "
        "(the first counts 1).",
    )
    min_score: float = Field(
        0.9, ge=0, le=1, description="object_frequency score: the object counts are mapped onto [min_score, 1]."
    )


class ActiveLearning(_Section):
    task_name: str = Field(
        "", description="Prediction task (in .lightly/predictions) whose scores method=coral weighs samples by."
    )
    score_name: str = Field(
        "uncertainty_margin", description="Active-learning score of that task that method=coral weighs samples by."
    )


class Loader(_Section):
    batch_size: int = Field(
        16, gt=0, description="Images per batch for training and embedding (embedding: at least 32 at input_size 64)."
    )
    shuffle: bool = Field(True, description="Shuffle training batches (embedding keeps input order).")
    num_workers: int = Field(
        -1,
        ge=-1,
        description="Decoding threads per embedding task, and data-loading processes "
        "when training; -1 means one per CPU core.",
    )
    drop_last: bool = Field(True, description="Drop the last incomplete training batch.")


class Model(_Section):
    name: Literal["efficientnet-lite0", "resnet-18", "resnet-34", "resnet-50", "resnet-101", "resnet-152"] = Field(
        "efficientnet-lite0",
        description="Backbone. efficientnet-lite0 carries ImageNet weights from an installed package; "
        "resnet-* start from random weights unless `checkpoint` is given.",
    )
    out_dim: int = Field(128, gt=0, description="Projection head output size (training).")
    num_ftrs: int = Field(32, gt=0, description="Embedding size of resnet-* backbones (1x1 conv after the trunk).")
    width: int = Field(1, gt=0, description="Width multiplier (training).")


class Trainer(_Section):
    gpus: int = Field(1, ge=0, description="GPUs used when present.")
    max_epochs: int = Field(100, ge=0, description="Training epochs.")
    precision: Literal[16, 32] = Field(
        32,
        description="16 runs the model in mixed precision (fp16) on a GPU; on a CPU it runs in float32, which "
        "measured faster than bf16 there.",
    )


class Criterion(_Section):
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature (training).")
    memory_bank_size: int = Field(0, ge=0, description="Memory bank size (training).")


class Optimizer(_Section):
    lr: float = Field(1.0, gt=0, description="Learning rate (training).")
    weight_decay: float = Field(1e-5, ge=0, description="Weight decay (training).")


class Collate(_Section):
    input_size: int = Field(64, gt=0, description="Images are resized to input_size x input_size for the model.")
    cj_prob: float = Field(0.8, ge=0, le=1, description="Colour-jitter probability (training).")
    cj_bright: float = Field(0.7, ge=0, description="Colour-jitter brightness (training).")
    cj_contrast: float = Field(0.7, ge=0, description="Colour-jitter contrast (training).")
    cj_sat: float = Field(0.7, ge=0, description="Colour-jitter saturation (training).")
    cj_hue: float = Field(0.2, ge=0, le=0.5, description="Colour-jitter hue (training).")
    min_scale: float = Field(0.15, gt=0, le=1, description="Smallest random-crop scale (training).")
    random_gray_scale: float = Field(0.2, ge=0, le=1, description="Grey-scale probability (training).")
    gaussian_blur: float = Field(0.5, ge=0, le=1, description="Gaussian-blur probability (training).")
    kernel_size: float = Field(
        0.1, gt=0, description="Accepted for compatibility; like lightly's own transform, blurring uses sigmas."
    )
    sigmas: tuple[float, float] = Field((0.2, 2.0), description="Blur sigma range (training).")
    vf_prob: float = Field(0.0, ge=0, le=1, description="Vertical-flip probability (training).")
    hf_prob: float = Field(0.5, ge=0, le=1, description="Horizontal-flip probability (training).")
    rr_prob: float = Field(0.0, ge=0, le=1, description="Random-rotation probability (training).")


class Lightly(_Section):
    loader: Loader = Field(default_factory=Loader)
    model: Model = Field(default_factory=Model)
    trainer: Trainer = Field(default_factory=Trainer)
    criterion: Criterion = Field(default_factory=Criterion)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    collate: Collate = Field(default_factory=Collate)
    seed: int = Field(1, description="Seed for training, random selection and the first coreset center.")


class Dask(_Section):
    address: str = Field(
        "", description="Scheduler of an existing Dask cluster (tcp://host:8786); empty starts a local one."
    )
    cluster: str = Field(
        "local", description="Local cluster spec: a name in flows/clusters/ (local, local-threads) or a YAML file path."
    )
    n_workers: int = Field(0, ge=0, description="Local cluster workers; 0 takes the spec's (one per CPU core).")
    threads_per_worker: int = Field(
        0, ge=0, description="Threads per local worker (also torch's intra-op threads); 0 takes the spec's."
    )
    shard_size: int = Field(
        256,
        gt=0,
        description="Files per cached shard, and the fewest per mapped task (a large run's take up to 16 shards);"
        " smaller shards spread small inputs over all workers.",
    )
    retries: int = Field(2, ge=0, description="Times a failed shard task is retried (e.g. after a worker died).")
    replace_workers_after: int = Field(
        100_000,
        ge=0,
        description="Replace the local workers after embedding, to free the model's memory (about 1 GB each) for "
        "the later stages, when a run embeds at least this many samples; 0 always replaces them.",
    )


class Selection(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where selection runs; auto uses a GPU when present."
    )


class ReportOptions(_Section):
    labeling_cost_per_image: float = Field(
        0.05, ge=0, description="Labelling cost of one image in USD, for the report's savings."
    )
    training_gpu_seconds_per_image: float = Field(
        0.1,
        ge=0,
        description="GPU seconds a training run spends on one image over all its epochs, for the report's "
        "compute savings.",
    )
    gpu_power_watts: float = Field(400, ge=0, description="Power draw of that GPU, for the report's energy savings.")
    grid_co2_kg_per_kwh: float = Field(
        0.4,
        ge=0,
        description="kg of CO2 per kWh of electricity (about 0.4 is the world average), for the report's CO2 savings.",
    )


class ThresherConfig(_Section):
    input_dir: str = Field(
        description="Folder or bucket URL (s3://, gs://, az://, abfs://) of images and videos to curate (flat, or "
        "subfolders as labels)."
    )
    output_dir: str = Field(description="Folder or bucket URL where run directories are written.")
    shared_dir: str = Field(
        "",
        description="Folder or bucket URL that checkpoint, embeddings, relevant_filenames_file and datapools are "
        "relative to; empty means the current directory.",
    )
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per protocol or URL prefix, e.g. "
        "storage_options.s3.endpoint_url=http://minio:9000; credentials only as ${ENV_VAR} or "
        "prefect-secret:NAME (never written out).",
    )
    run_directory: str | None = Field(None, description="Run folder name inside output_dir; default is a timestamp.")
    cache_dir: str = Field(
        "",
        description="Folder or bucket URL where shard results and the report's numbers, projections and plots are "
        "cached across runs; empty means .thresher-cache in shared_dir.",
    )

    token: SecretStr = Field(SecretStr(""), description="Lightly Platform token; not applicable (never written out).")
    worker_id: str = Field("", description="Lightly Platform worker id; not applicable.")
    sanity_check: bool = Field(
        False, description="Check the installation (model, cluster, flow) on a few files and stop."
    )
    relevant_filenames_file: str = Field(
        "",
        description="File (relative to shared_dir) listing the input files to use, one per line, relative to "
        "input_dir.",
    )
    enable_corruptness_check: bool = Field(
        True, description="Fully decode every image and list broken ones as corrupt."
    )
    corruptness_check: CorruptnessCheck = Field(default_factory=CorruptnessCheck)
    remove_exact_duplicates: bool = Field(True, description="Remove files whose bytes equal an earlier file's.")
    checkpoint: str = Field("", description="Backbone checkpoint relative to shared_dir.")
    embeddings: str = Field(
        "", description="Embeddings CSV relative to shared_dir; skips embedding and selects from it."
    )
    enable_training: bool = Field(False, description="Train a self-supervised model before embedding.")
    dump_dataset: bool = Field(False, description="Copy the selected images to data/sampled/.")
    dump_sampled_embeddings: bool = Field(True, description="Write data/selected_embeddings.csv.")
    output_image_size: int | tuple[int, int] = Field(
        -1, description="Size of dumped images: x matches the shortest edge to x, [h,w] resizes, -1 keeps the original."
    )
    output_image_format: Literal["png", "jpg", "jpeg", "webp", "bmp", "tiff"] = Field(
        "png", description="Format of dumped images."
    )
    upload_dataset: bool = Field(False, description="Lightly Platform upload; not applicable.")
    upload_report: bool = Field(True, description="Lightly Platform upload; not applicable.")
    pretagging: bool = Field(False, description="Lightly's proprietary detector; not applicable.")
    pretagging_debug: bool = Field(False, description="Lightly's proprietary detector; not applicable.")
    pretagging_config: str = Field("", description="Lightly's proprietary detector; not applicable.")
    append_weak_labels: bool = Field(False, description="Weak labels from pretagging; not applicable.")
    normalize_embeddings: bool = Field(True, description="Normalise embeddings to unit length before selection.")
    scorer: str = Field("object-frequency", description="Lightly's pretagging scorer; not applicable.")
    scorer_config: ScorerConfig = Field(default_factory=ScorerConfig)
    active_learning: ActiveLearning = Field(default_factory=ActiveLearning)
    lightly_dir: str = Field(
        "",
        description="Folder or bucket URL holding .lightly/predictions and .lightly/metadata; empty means input_dir.",
    )
    method: Literal["typical_coreset", "coreset", "random", "coral"] = Field(
        "typical_coreset",
        description="Selection method: typical_coreset (coverage weighted by typicality), coreset (k-center greedy), "
        "random, or coral (coverage weighted by active_learning.score_name).",
    )
    selection_config: SelectionForm | None = Field(
        None,
        description="The Lightly Worker's selection form, {n_samples | proportion_samples, strategies: [...]}, as "
        "JSON or YAML text, or @path to such a file relative to shared_dir; replaces method and "
        "stopping_condition.",
    )
    stopping_condition: StoppingCondition = Field(default_factory=StoppingCondition)
    selected_sequence_length: int = Field(
        1, ge=1, description="Select whole sequences of this many consecutive frames."
    )
    datapool: Datapool = Field(default_factory=Datapool)
    datasource: Datasource = Field(default_factory=Datasource)
    n_example_images: int = Field(6, ge=0, description="Retained/removed image pairs shown in the report.")
    memory_requirement_in_GB: float = Field(2, gt=0, description="Memory cap for the report's distance statistics.")
    show_video_sampling_timeline: bool = Field(
        True, description="Show selected frame timestamps per video in the report."
    )
    lightly: Lightly = Field(default_factory=Lightly)
    dask: Dask = Field(default_factory=Dask)
    selection: Selection = Field(default_factory=Selection)
    report: ReportOptions = Field(default_factory=ReportOptions)

    @field_validator("output_image_size")
    @classmethod
    def _check_output_image_size(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(value, int) and not (value == -1 or value > 0):
            raise ValueError("use x > 0 (shortest edge), [height,width], or -1 (original size)")
        if isinstance(value, tuple) and min(value) <= 0:
            raise ValueError("height and width must be positive")
        return value

    @field_validator("selection_config", mode="before")
    @classmethod
    def _read_selection_config(cls, value: Any, info: ValidationInfo) -> Any:
        """Text is parsed as YAML (JSON included); `@path` is read from shared_dir first."""
        if not isinstance(value, str):
            return value
        text = value
        if value.startswith("@"):
            data = info.data
            base = location(data.get("shared_dir") or os.getcwd(), data.get("storage_options", {}))
            text = inside_shared(base, value[1:], "selection_config").read_text()
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"not valid JSON or YAML: {error}") from None

    @field_validator("n_example_images")
    @classmethod
    def _check_even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be an even number (pairs are shown two per row)")
        return value

    @field_validator("storage_options")
    @classmethod
    def _no_literal_secrets(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        secrets = literal_secrets(value)
        if secrets:
            raise ValueError(
                f"{', '.join(secrets)} would be written to config.yaml and shown in the Prefect UI; give credentials "
                "as ${ENV_VAR} or prefect-secret:BLOCK_NAME, or leave them to the store's standard credential chain."
            )
        return value

    def location(self, path: str) -> UPath:
        """A configured folder or URL as a path that carries its storage options."""
        try:
            return location(path, self.storage_options)
        except StorageError as error:
            raise ConfigError(str(error)) from None

    def shared_base(self) -> UPath:
        return self.location(self.shared_dir or os.getcwd())

    def pool_dir(self) -> UPath | None:
        return self.shared_base() / self.datapool.name if self.datapool.name else None

    def cache_path(self) -> UPath:
        return self.location(self.cache_dir) if self.cache_dir else self.shared_base() / ".thresher-cache"

    def shared_path(self, relative: str, key: str) -> UPath:
        """Resolve a path given relative to shared_dir, refusing paths that escape it."""
        return inside_shared(self.shared_base(), relative, key)


def inside_shared(base: UPath, relative: str, key: str) -> UPath:
    """`relative` under the shared_dir `base`; raises ConfigError for a path that escapes it or does not exist."""
    if is_local(base):
        path = (base / relative).resolve()  # also follows symlinks out of shared_dir
        inside = path.is_relative_to(base)
    else:
        normal = posixpath.normpath(relative)
        path = base / normal
        inside = not (normal == ".." or normal.startswith(("../", "/")) or "://" in relative)
    if not inside:
        raise ConfigError(f"{key}={relative!r} points outside shared_dir ({describe(base)}); give a path inside it.")
    if not path.exists():
        raise ConfigError(
            f"{key}={relative!r}: {describe(path)} does not exist (paths are relative to shared_dir={describe(base)})."
        )
    return path
