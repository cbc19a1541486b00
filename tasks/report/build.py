"""Stage 9's steps in order: numbers, views and plots, then report.json, report.html and report.pdf
(`build_report`); `write_report` is its Prefect task, which also publishes the summary."""

from __future__ import annotations

import functools
import json
from concurrent.futures import Executor
from contextlib import nullcontext

import numpy as np
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from threadpoolctl import threadpool_limits
from upath import UPath

from tasks.gathering import load_embeddings
from tasks.report.cache import ReportCache
from tasks.report.numbers import file_lists, image_measures, machine, savings, selection_numbers, stage_table
from tasks.report.plots import summary_plots, view_plots
from tasks.report.previews import Thumbnails
from tasks.report.quality import Picks, RunSelection, selection_quality
from tasks.report.render import artifacts, render_html, write_pdf
from tasks.report.settings import GROUPS, InProcess, ReportInputs, ReportSettings
from tasks.report.views import Scatter, StartedViews, start_views
from tasks.storage import is_local, location, read_table, write_text

SCHEMA_VERSION = 2


def build_report(inputs: ReportInputs, executor: Executor = InProcess(), started: StartedViews | None = None) -> dict:
    """Write report.json, report.html, report.pdf and plots/ into inputs.run_dir; returns the report.

    With `inputs.cache_dir`, results of an earlier report on the same data are reused from
    `cache_dir/report/` (see ReportCache). The UMAPs and plots run on `executor`; `started` are the
    views if start_views started them already, with the same embeddings and settings."""
    settings = inputs.settings
    cache = ReportCache.under(inputs.cache_dir)
    filenames, labels, vectors = load_embeddings(inputs.embeddings_path, normalize=settings.normalize)
    picks = Picks.read(inputs.selection_path, filenames)
    selected = np.zeros(len(filenames), bool)
    selected[picks.rows] = True

    # The views' UMAPs run while the distance numbers are computed here (a flow starts them earlier).
    started = started or start_views(vectors, settings, inputs.datapool_embeddings_path, inputs.cache_dir, executor)
    scatter = started.scatter(filenames, selected) if started else None

    # One BLAS thread meanwhile: the UMAPs keep the cores busy, and BLAS threads waiting on a busy
    # core spin instead of yielding it.
    with threadpool_limits(1) if started else nullcontext():
        numbers = cache.numbers(
            functools.partial(selection_numbers, vectors, filenames, selected, settings),
            "selection numbers",
            vectors,
            filenames,
            selected,
            settings.memory_gb,
            settings.seed,
            settings.n_example_images,
        )
        quality = selection_quality_numbers(inputs, settings, cache, vectors, filenames, labels, picks)
    samples = read_table(inputs.samples_path)
    del vectors  # the run's matrix is freed before the plots
    report = {
        "schema_version": SCHEMA_VERSION,
        "job": {**inputs.job, "machine": machine()},
        "counts": inputs.counts,
        "skipped_not_images": inputs.not_images,
        "stages": stage_table(inputs.stages),
        "selection": inputs.selection,
        "savings": savings(inputs.counts, settings),
        **numbers,
        "selection_quality": quality,
        "files": file_lists(samples),
        "image_measures": image_measures(samples, filenames, selected),
        "video_timelines": inputs.video_timelines,
        "datapool_history": inputs.datapool_history,
        "config": inputs.config,
    }
    previews = Thumbnails(location(settings.input_dir, settings.storage_options), settings.max_pixels)
    run_dir = inputs.run_dir
    plots_dir = run_dir / "plots"
    # The other plots are drawn while the UMAPs run, by the workers that the UMAPs leave idle.
    names, plots = summary_plots(report, previews)
    drawing = cache.draw(plots, plots_dir, executor)
    views = started.pending.result() if started else []
    report["embedding_views"] = views_summary(scatter, views)
    view_names, plots = view_plots(views, scatter, previews)
    drawing += cache.draw(plots, plots_dir, executor)
    cache.finish(drawing, plots_dir)
    report["plots"] = names | view_names
    write_documents(report, run_dir)
    return report


def views_summary(scatter: Scatter | None, views: list[dict]) -> dict:
    return {
        "n_points": len(scatter.groups) if scatter else 0,
        "n_total": scatter.n_total if scatter else 0,
        "n_datapool_points": int(np.sum(scatter.groups == GROUPS.index("datapool"))) if scatter else 0,
        "views": [{k: v for k, v in view.items() if k != "xy"} for view in views],
    }


def write_documents(report: dict, run_dir: UPath) -> None:
    """report.html, report.pdf and report.json in the run directory."""
    write_text(render_html(report, run_dir / "plots"), run_dir / "report.html")
    # weasyprint reads local plot files faster than it parses their base64; objects are embedded.
    write_pdf(render_html(report, run_dir / "plots", embed=not is_local(run_dir)), run_dir / "report.pdf")
    write_text(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False), run_dir / "report.json")


def selection_quality_numbers(
    inputs: ReportInputs,
    settings: ReportSettings,
    cache: ReportCache,
    vectors: np.ndarray,
    filenames: list[str],
    labels: list[int],
    picks: Picks,
) -> dict:
    """The selection against random, how many to label and the calibrated min_distance (see
    tasks.report.quality), or what an earlier report computed from the same inputs."""
    path = inputs.datapool_embeddings_path
    centers = load_embeddings(path, normalize=settings.normalize)[2] if path else None
    run = RunSelection(inputs.settings.selection, centers if centers is not None and len(centers) else None)
    label_array = np.asarray(labels, np.int64)
    return cache.numbers(
        functools.partial(selection_quality, vectors, filenames, label_array, picks, run),
        "selection quality",
        vectors,
        filenames,
        label_array,
        picks,
        run,
    )


# No Prefect cache key: the report is never reused whole (its job section is new every run), and
# an executor cannot be hashed.
@task(name="report", cache_policy=NO_CACHE)
def write_report(inputs: ReportInputs, executor: Executor = InProcess(), started: StartedViews | None = None) -> UPath:
    """The report files in inputs.run_dir and its summary as Prefect artifacts; returns the report.json path.

    The UMAPs and plots run on `executor` (in a flow, the cluster's); `started` are views that
    start_views started."""
    report = build_report(inputs, executor, started)
    published = artifacts(report, inputs.run_dir)
    create_markdown_artifact(**published["markdown"])
    create_table_artifact(**published["table"])
    create_link_artifact(**published["link"])
    return inputs.run_dir / "report.json"
