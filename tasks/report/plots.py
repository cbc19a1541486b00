"""The report's pictures, drawn with matplotlib into PNG files (and Pillow for the image pairs, JPEG):
distance histograms, scatter views with thumbnails, retained/removed pairs, video timelines and
datapool growth. `summary_plots` and `view_plots` say which pictures a report has, as `Plot`s that
the cache draws or reuses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
from PIL import Image, ImageDraw, ImageOps
from upath import UPath

from tasks.report.previews import THUMBNAIL_PIXELS, Thumbnails
from tasks.report.settings import GROUPS, LIST_LIMIT
from tasks.report.views import Scatter
from tasks.storage import atomic_target

matplotlib.use("Agg")  # Dask workers have no display

PAIR_FRAME, PAIR_GAP = 3, 16  # pixels around and between the two images of a pair
PHOTO = ".jpg"  # the suffix of pictures of images (plot_two_images); charts are PNGs
# Figure sizes in inches: the page shows half-width plots about 3.4 in wide, so 4.2 in keeps
# matplotlib's 10 pt text above 8 pt in print.
HALF_WIDTH, FULL_WIDTH, DPI = 4.2, 6.4, 110
OVERLAY_GRID = 4  # at most OVERLAY_GRID^2 thumbnails on a scatter plot
COLOURS = {"removed": "#b0b0b0", "selected": "#e66100", "datapool": "#1f6fb4"}


@dataclass(frozen=True)
class Plot:
    """One picture of the report: draw(*inputs, path) draws plots/<name>."""

    name: str
    draw: Callable[..., None]
    inputs: tuple


def _figure(width: float = HALF_WIDTH, height: float = 3.0) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return figure, figure.add_subplot()


def _save(figure: Figure, path: UPath) -> None:
    """The figure as an RGB PNG. One draw lays it out and renders it (savefig draws twice for its
    layout engine, the same picture); without the alpha channel weasyprint compresses it once for
    the PDF, not twice (the picture and an alpha mask)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")


def plot_distance_histogram(stats: dict, title: str, path: UPath) -> None:
    figure, ax = _figure()
    hist = stats["histogram"]
    ax.stairs(hist["counts"], hist["edges"], fill=True, color="#3b75af", alpha=0.85)
    ax.set_yscale("log")
    peak = max(hist["counts"])
    ax.set_ylim(0.5, 2.0 * peak**1.3)  # a quarter of the height above the peak, for the note at the top
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(NullLocator())  # minor ticks of a log axis cost more than the rest of the plot
    ax.set_xlabel("pairwise distance")
    ax.set_ylabel("pairs (log scale)")
    ax.set_title(title, fontsize=10)
    source = (
        f"exact: all {stats['n_pairs']:,} pairs"
        if stats["exact"]
        else f"estimate from {stats['n_pairs']:,} random pairs\n(CDF error < {stats['cdf_error_95']:.4f}, 95%)"
    )
    ax.text(0.02, 0.97, source, transform=ax.transAxes, va="top", fontsize=8, color="#333")
    _save(figure, path)


def plot_nn_distances(statistics: dict, path: UPath) -> None:
    figure, ax = _figure(FULL_WIDTH * 0.75, 3.0)
    labels = {"before": "all samples", "after": "selected", "random": "random subset, same size"}
    for name, colour in zip(labels, ("#777777", COLOURS["selected"], "#1f6fb4")):
        stats = statistics[name]["nearest_neighbour"]
        if stats:
            hist = stats["histogram"]
            source = "exact" if stats["exact"] else f"{stats['n_queries']:,} random samples"
            ax.stairs(hist["counts"], hist["edges"], color=colour, linewidth=1.6, label=f"{labels[name]} ({source})")
    ax.set_xlabel("distance to the nearest other sample in the same set")
    ax.set_ylabel("samples")
    ax.set_title("Nearest-neighbour distances")
    ax.legend(fontsize=8)
    _save(figure, path)


def _overlay_points(xy: np.ndarray, scatter: Scatter) -> list[int]:
    """One selected point per cell of an OVERLAY_GRID x OVERLAY_GRID grid: the one nearest the cell's centre."""
    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    cells = np.minimum(((xy - low) / span * OVERLAY_GRID).astype(int), OVERLAY_GRID - 1)
    centres = low + (cells + 0.5) * span / OVERLAY_GRID
    offset = np.linalg.norm((xy - centres) / span, axis=1)
    chosen: dict[tuple[int, int], int] = {}
    for i in np.flatnonzero(scatter.groups[: len(xy)] == GROUPS.index("selected")):
        cell = (int(cells[i, 0]), int(cells[i, 1]))
        if cell not in chosen or offset[i] < offset[chosen[cell]]:
            chosen[cell] = int(i)
    return sorted(chosen.values())


def plot_scatter(view: dict, scatter: Scatter, thumbnails: Thumbnails | None, path: UPath) -> None:
    """Removed, datapool and selected points (selected on top); with `thumbnails`, images of
    selected samples drawn at their points."""
    figure, ax = _figure(HALF_WIDTH, 3.1)
    ax.margins(0.14)  # room for thumbnails at the edges
    xy = view["xy"]
    groups = scatter.groups[: len(xy)]
    for code, group in enumerate(GROUPS):
        mask = groups == code
        if mask.any():
            ax.scatter(
                xy[mask, 0],
                xy[mask, 1],
                s=4 if len(xy) > 2000 else 14,
                color=COLOURS[group],
                label=f"{group} ({int(mask.sum()):,})",
                linewidths=0,
                rasterized=True,
            )
    if thumbnails is not None:
        for i in _overlay_points(xy, scatter):
            image = thumbnails.get(scatter.names[i])
            if image is not None:
                box = OffsetImage(np.asarray(image), zoom=34 * DPI / 100 / max(image.size))
                ax.add_artist(
                    AnnotationBbox(
                        box, xy[i], frameon=True, pad=0.1, bboxprops={"edgecolor": COLOURS["selected"], "linewidth": 1}
                    )
                )
    shown = f"{len(xy):,} of {scatter.n_total:,} points" if len(xy) < scatter.n_total else f"{len(xy):,} points"
    ax.set_title(f"{view['title']} ({shown})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=2, loc="best")
    _save(figure, path)


RETAINED_REMOVED = (("retained", "selected"), ("removed", "removed"))


def plot_pair(pair: dict, thumbnails: Thumbnails, path: UPath) -> None:
    """The retained image, framed in the colour of selected points, beside its removed neighbour,
    framed in the colour of removed ones."""
    plot_two_images(pair, thumbnails, RETAINED_REMOVED, path)


def plot_two_images(pair: dict, thumbnails: Thumbnails, sides: tuple, path: UPath) -> None:
    """Two images side by side: `sides` names each one's key in `pair` and the group whose colour
    frames it. Composed with Pillow: the names and the distance are the figure's caption in the
    report, as text, and a matplotlib figure of two images was slow to draw (measured in
    benchmarks/report.py's docstring).

    A JPEG (`path` ends in PHOTO): weasyprint puts a JPEG into the PDF as it is, but decodes every
    PNG and compresses it again, and a PNG of photos is slow to write and three times the size. For
    a report's ten pairs, as JPEGs instead of PNGs: 0.01 s to write them instead of 0.1 s, 0.08 to
    0.28 s less to write the PDF, and a PDF 0.5 MB (37%) smaller."""
    assert path.suffix == PHOTO, path
    cell = THUMBNAIL_PIXELS + 2 * PAIR_FRAME
    canvas = Image.new("RGB", (2 * cell + PAIR_GAP, cell), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (role, group) in enumerate(sides):
        left = column * (cell + PAIR_GAP)
        image = thumbnails.get(pair[role])
        if image is None:
            draw.rectangle((left, 0, left + cell - 1, cell - 1), fill="#eeeeee")
            draw.text((left + cell / 2, cell / 2), "no preview", fill="#777777", anchor="mm")
            continue
        image = ImageOps.contain(image, (THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))  # small images are scaled up too
        x, y = left + (cell - image.width) // 2, (cell - image.height) // 2
        draw.rectangle(
            (x - PAIR_FRAME, y - PAIR_FRAME, x + image.width + PAIR_FRAME - 1, y + image.height + PAIR_FRAME - 1),
            fill=COLOURS[group],
        )
        canvas.paste(image, (x, y))
    with atomic_target(path) as tmp:
        canvas.save(tmp, format="JPEG", quality=90, subsampling=0)  # 4:4:4 keeps the frames' colours sharp


def _shorten(name: str, width: int = 34) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def plot_video_timelines(timelines: dict[str, list[float]], path: UPath) -> None:
    shown = list(timelines.items())[:LIST_LIMIT]
    figure, ax = _figure(FULL_WIDTH, 1.0 + 0.32 * len(shown))
    for row, (_, seconds) in enumerate(shown):
        ax.plot(seconds, [row] * len(seconds), "|", markersize=11, color=COLOURS["selected"])
    ax.set_yticks(range(len(shown)), [_shorten(video, 28) for video, _ in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time in video (s)")
    ax.set_title("Selected frames per video")
    _save(figure, path)


def plot_datapool_growth(history: list[dict], path: UPath) -> None:
    figure, ax = _figure(FULL_WIDTH * 0.75, 3.2)
    runs = [entry["run"] for entry in history]
    added = np.array([entry["n_samples"] for entry in history])
    ax.bar(range(len(runs)), added, color=COLOURS["datapool"], label="added by the run")
    ax.plot(range(len(runs)), np.cumsum(added), "o-", color="#333", label="pool size")
    ax.set_xticks(range(len(runs)), [_shorten(r, 20) for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("samples")
    ax.set_title("Datapool growth")
    ax.legend(fontsize=8)
    _save(figure, path)


def plot_strategy(entry: dict, path: UPath) -> None:
    """What one selection_config strategy did: BALANCE's class shares before and after selection
    against its target, or the input's distribution over the candidates and the selection."""
    figure, ax = _figure()
    if "classes" in entry:
        x = np.arange(len(entry["classes"]))
        ax.bar(x - 0.27, entry["before"], 0.27, color=COLOURS["removed"], label="candidates")
        ax.bar(x, entry["after"], 0.27, color=COLOURS["selected"], label="selected")
        ax.bar(x + 0.27, entry["target"], 0.27, color=COLOURS["datapool"], label="target")
        ax.set_xticks(x, [_shorten(c, 14) for c in entry["classes"]], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("share of samples")
    else:
        _distribution(ax, entry)
    ax.set_title(f"{entry['type']} (strength {entry['strength']:g})", fontsize=10)
    ax.legend(fontsize=8)
    _save(figure, path)


def _distribution(ax: Axes, entry: dict) -> None:
    """A value's histogram over the candidates (filled) and over the selection, as shares of each."""
    edges = np.asarray(entry["histogram"]["edges"])
    for key, colour, label in (("before", "removed", "candidates"), ("after", "selected", "selected")):
        counts = np.asarray(entry["histogram"][key], float)
        ax.stairs(counts / max(counts.sum(), 1.0), edges, color=COLOURS[colour], label=label, fill=key == "before")
    ax.set_ylabel("share of samples")
    ax.set_xlabel(entry["input"], fontsize=8)


def plot_image_measures(measures: list[dict], path: UPath) -> None:
    """The check stage's image measures over the candidates and the selection, one panel each."""
    figure = Figure(figsize=(FULL_WIDTH, 2.4), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, len(measures), squeeze=False)[0]
    for ax, entry in zip(axes, measures):
        _distribution(ax, entry)
        ax.tick_params(labelsize=7)
        if ax is not axes[0]:
            ax.set_ylabel("")
    axes[0].legend(fontsize=7)
    _save(figure, path)


def plot_probe(probe: dict, path: UPath) -> None:
    """Probe accuracy against the number of training samples: the selection's, and the random
    subsets' mean with a band of one standard deviation."""
    figure, ax = _figure(FULL_WIDTH * 0.75, 3.0)
    budgets = probe["budgets"]
    n = [b["n_samples"] for b in budgets]
    mean, std = np.array([b["random_mean"] for b in budgets]), np.array([b["random_std"] for b in budgets])
    ax.fill_between(n, mean - std, mean + std, color=COLOURS["datapool"], alpha=0.2, linewidth=0)
    ax.plot(n, mean, "o-", color=COLOURS["datapool"], label=f"random (mean ± std of {probe['seeds']} seeds)")
    ax.plot(n, [b["selection"] for b in budgets], "o-", color=COLOURS["selected"], label="selection")
    run = next((b["n_samples"] for b in budgets if b["source"] == "run"), None)
    if run is not None:
        ax.axvline(run, color="#777", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("samples to train on (dotted: this run's selection)")
    ax.set_ylabel("accuracy on the other samples")
    ax.set_title("Linear probe: selection against random", fontsize=10)
    ax.legend(fontsize=8)
    _save(figure, path)


def _plain_log_ticks(axis: object) -> None:
    """Ticks of a log axis at 1, 2 and 5 times the powers of ten, labelled as plain numbers (0.2, 50)."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_how_many(advice: dict, probe: dict | None, path: UPath) -> None:
    """The covering radius and its certified lower bound against the number selected, where the
    curve flattens and, with a probe, its accuracies on a second axis; one legend below."""
    figure, ax = _figure(FULL_WIDTH * 0.75, 4.0)
    curve = advice["curve"]
    ax.plot(curve["n_selected"], curve["radius"], color=COLOURS["selected"], label="covering radius")
    ax.plot(
        curve["n_selected"],
        curve["lower_bound"],
        "--",
        color="#777",
        label="certified bound: no selection of that size does better",
    )
    if advice["suggested_n_samples"]:
        ax.axvline(
            advice["suggested_n_samples"],
            color="#333",
            linestyle=":",
            linewidth=1.2,
            label=f"flattens at {advice['suggested_n_samples']:,}",
        )
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("samples selected")
    ax.set_ylabel("distance")
    handles = ax.get_legend_handles_labels()
    if probe:
        accuracy = ax.twinx()
        budgets = probe["budgets"]
        for key, marker, colour, label in (
            ("selection", "o", "selected", "selection"),
            ("random_mean", "s", "datapool", "random (mean)"),
        ):
            accuracy.plot(
                [b["n_samples"] for b in budgets],
                [b[key] for b in budgets],
                marker,
                color=COLOURS[colour],
                markerfacecolor="white",
                label=f"probe accuracy, {label}",
            )
        accuracy.set_ylabel("probe accuracy")
        handles = tuple(mine + theirs for mine, theirs in zip(handles, accuracy.get_legend_handles_labels()))
    figure.legend(*handles, loc="outside lower center", ncols=1, fontsize=7)
    ax.set_title("How many should we label?", fontsize=10)
    _save(figure, path)


def plot_min_distance(calibration: dict, path: UPath) -> None:
    """The nearest-neighbour distances on a log scale with the suggested min_distance."""
    figure, ax = _figure(FULL_WIDTH * 0.75, 3.0)
    hist = calibration["histogram"]
    ax.stairs(hist["counts"], hist["edges"], fill=True, color="#3b75af", alpha=0.85)
    ax.axvline(
        calibration["suggested_min_distance"],
        color=COLOURS["selected"],
        linewidth=1.6,
        label=f"suggested min_distance {calibration['suggested_min_distance']:.4g} ({calibration['rule']})",
    )
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("distance to the nearest other sample (log scale)")
    ax.set_ylabel("samples")
    ax.set_title("Calibrating min_distance", fontsize=10)
    ax.legend(fontsize=8)
    _save(figure, path)


def _add(plots: list[Plot], key: str, draw: Callable[..., None], *inputs: object, suffix: str = ".png") -> str:
    plots.append(Plot(f"{key}{suffix}", draw, inputs))
    return f"{key}{suffix}"


def summary_plots(report: dict, previews: Thumbnails) -> tuple[dict, list[Plot]]:
    """The plots of the distances, the filter decisions, video timelines and datapool growth:
    {plot key: file name}, and what draws them."""
    plots: list[Plot] = []
    names: dict = {}
    for name in ("before", "after"):
        stats = report["distances"][name]["pairwise"]
        if stats:
            title = "Pairwise distances, all samples" if name == "before" else "Pairwise distances, selected samples"
            names[f"distance_distr_{name}"] = _add(
                plots, f"distance_distr_{name}", plot_distance_histogram, stats, title
            )
    if report["distances"]["before"]["nearest_neighbour"]:
        names["nn_distance_distr"] = _add(plots, "nn_distance_distr", plot_nn_distances, report["distances"])
    names["filter_decisions"] = [
        _add(
            plots,
            f"filter_decision_{i}",
            plot_pair,
            pair,
            previews.subset([pair["retained"], pair["removed"]]),
            suffix=PHOTO,
        )
        for i, pair in enumerate(report["example_pairs"])
    ]
    names |= quality_plots(report["selection_quality"], previews, plots)
    if report["image_measures"]:
        names["image_measures"] = _add(plots, "image_measures", plot_image_measures, report["image_measures"])
    strategies = {
        str(i): _add(plots, f"strategy_{i}", plot_strategy, entry)
        for i, entry in enumerate(report["selection"].get("strategies", []))
        if "classes" in entry or "histogram" in entry
    }
    if strategies:
        names["strategies"] = strategies
    if report.get("video_timelines"):
        names["video_timelines"] = _add(plots, "video_timelines", plot_video_timelines, report["video_timelines"])
    if report.get("datapool_history"):
        names["datapool_growth"] = _add(plots, "datapool_growth", plot_datapool_growth, report["datapool_history"])
    return names, plots


BELOW_SIDES = (("first", "selected"), ("second", "removed"))  # min_distance keeps one of them
ABOVE_SIDES = (("first", "selected"), ("second", "selected"))  # and both of these


def quality_plots(quality: dict, previews: Thumbnails, plots: list[Plot]) -> dict:
    """The probe, the radius curve, the nearest-neighbour distances with the suggested
    min_distance and the pairs either side of it: {plot key: file name}, their Plots added to `plots`."""
    names: dict = {}
    if quality["probe"] and quality["probe"]["budgets"]:
        names["selection_probe"] = _add(plots, "selection_probe", plot_probe, quality["probe"])
    if quality["how_many"]:
        names["how_many"] = _add(plots, "how_many", plot_how_many, quality["how_many"], quality["probe"])
    calibration = quality["min_distance"]
    if calibration:
        names["min_distance"] = _add(plots, "min_distance", plot_min_distance, calibration)
        for side, sides in (("below", BELOW_SIDES), ("above", ABOVE_SIDES)):
            names[f"min_distance_{side}"] = [
                _add(
                    plots,
                    f"min_distance_{side}_{i}",
                    plot_two_images,
                    pair,
                    previews.subset([pair["first"], pair["second"]]),
                    sides,
                    suffix=PHOTO,
                )
                for i, pair in enumerate(calibration[f"pairs_{side}"])
            ]
    return names


def view_plots(views: list[dict], scatter: Scatter | None, previews: Thumbnails) -> tuple[dict, list[Plot]]:
    """Each 2-D view with thumbnails of selected samples and without: {plot key: file name}, and what draws them."""
    plots: list[Plot] = []
    names: dict = {}
    for view in views:
        assert scatter is not None, "views are drawn from scatter points"
        key = f"scatter_{view['key']}"
        shown = previews.subset(scatter.names[i] for i in _overlay_points(view["xy"], scatter))
        names[key] = _add(plots, key, plot_scatter, view, scatter, shown)
        names[f"{key}_no_overlay"] = _add(plots, f"{key}_no_overlay", plot_scatter, view, scatter, None)
    return names, plots
