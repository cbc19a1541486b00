"""What the report is given (`ReportSettings` from the configuration, built by flows/options.py, and
`ReportInputs` from the run), where its work runs (`InProcess` without a cluster), and the
constants its modules share."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path

from upath import UPath

from tasks.selection.tasks import SelectOptions

PACKAGE = Path(__file__).parent
TEMPLATES = PACKAGE / "templates"
LIST_LIMIT = 20  # corrupt files, duplicate groups and videos listed in the report
GROUPS = ("removed", "selected", "datapool")
# A UMAP whose points were mostly in the dataset's previous layout starts from it and runs fewer
# epochs: that keeps the quality of a fresh layout in a quarter of the time, and moves the old
# points far less (measured in benchmarks/report.py's docstring).
CONTINUE_SHARE = 0.5
CONTINUE_EPOCHS = 50


@dataclass(frozen=True)
class ReportSettings:
    """The configuration keys the report reads, in one place."""

    input_dir: str
    storage_options: dict
    normalize: bool
    memory_gb: float
    n_example_images: int
    max_pixels: int
    seed: int
    labeling_cost_per_image: float
    training_gpu_seconds_per_image: float
    gpu_power_watts: float
    grid_co2_kg_per_kwh: float
    selection: SelectOptions  # how the run selected, to select again for the report's larger budgets


@dataclass(frozen=True)
class ReportInputs:
    """What a report is made of: the run's tables and figures, its configuration (dumped as JSON,
        shown as it is) with the settings the report reads from it, and where the report goes (`run_dir`).

        `video_timelines` is {video: seconds of its selected frames}; `datapool_history` is
        [{"run": name, "n_samples": added}] in run order; `datapool_embeddings_path` is a table of the
        pool's earlier selections in the gathered-embeddings format (drawn as 'datapool' points);
        `cache_dir` holds results of earlier reports to reuse (see ReportCache); `not_images` counts the
    files of input_dir skipped as neither images nor videos, by extension (see tasks/listing.py)."""

    run_dir: UPath
    samples_path: UPath
    embeddings_path: UPath
    selection_path: UPath
    job: dict
    counts: dict
    stages: dict
    selection: dict
    config: dict  # shown in the report as it is
    settings: ReportSettings
    video_timelines: dict[str, list[float]] | None = None
    datapool_history: list[dict] | None = None
    datapool_embeddings_path: UPath | None = None
    cache_dir: UPath | None = None
    not_images: dict[str, int] = field(default_factory=dict)


# Where the work runs: the UMAPs and plots are independent, so in a flow they run side by side on
# the Dask workers (idle by the time of the report); without a cluster, one after another here.
class InProcess(Executor):
    """Runs each call at once, in this process."""

    def submit(self, fn: Callable, /, *args: object, **kwargs: object) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:
            future.set_exception(error)
        return future
