"""The report as a page: HTML from a jinja2 template with the plots embedded, the PDF that
weasyprint renders from it, and the summary published as Prefect artifacts."""

from __future__ import annotations

import base64
import functools
import mimetypes

import jinja2
import yaml
from upath import UPath

from tasks.report.settings import LIST_LIMIT, TEMPLATES
from tasks.storage import atomic_target, describe, is_local, read_bytes

ARTIFACT_PREFIX = "thresher-report"


def _data_uri(path: UPath) -> str:
    """A plot file (PNG or JPEG, tasks/report/plots.py) as a data URI of its media type."""
    media_type, _ = mimetypes.guess_type(path.name)
    return f"data:{media_type};base64," + base64.b64encode(read_bytes(path)).decode("ascii")


def _number(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def render_html(report: dict, plots_dir: UPath, embed: bool = True) -> str:
    """The report as one HTML page with every plot embedded, so the file can be mailed or archived
    alone; or, with embed=False, linking the plot files (for weasyprint, which then reads the PNGs
    instead of parsing megabytes of base64 first)."""
    return (
        _templates()
        .get_template("report.html.j2")
        .render(
            report=report,
            css=(TEMPLATES / "report.css").read_text(encoding="utf-8"),
            list_limit=LIST_LIMIT,
            config_columns=config_columns(report["config"]),
            plot_source=(lambda name: _data_uri(plots_dir / name)) if embed else (lambda name: uri(plots_dir / name)),
        )
    )


def config_columns(config: dict) -> tuple[str, str]:
    """The configuration as YAML in two halves, split at the top-level key nearest the middle line,
    for the report's two columns (CSS columns cost weasyprint trial layouts to balance them).

    >>> config_columns({"a": 1, "b": {"c": 2}, "d": 3})
    ('a: 1\\n', 'b:\\n  c: 2\\nd: 3\\n')
    """
    lines = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).splitlines(keepends=True)
    keys = [
        i for i, line in enumerate(lines) if not line.startswith((" ", "-"))
    ]  # a top-level list's items start with "-"
    middle = min(keys, key=lambda i: abs(i - len(lines) / 2))
    return "".join(lines[:middle]), "".join(lines[middle:])


@functools.cache
def _templates() -> jinja2.Environment:
    """One environment per process, so the template is compiled once (it keeps compiled templates)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["number"] = _number
    environment.filters["plot"] = jinja2.pass_context(lambda context, name: context["plot_source"](name))
    return environment


def write_pdf(html: str, path: UPath) -> None:
    import weasyprint  # imported here: it loads pango and fonts, which only this step needs

    with atomic_target(path) as tmp:
        weasyprint.HTML(string=html).write_pdf(tmp)


def uri(path: UPath) -> str:
    """A link to a report file: file:// for a local one, the bucket URL for an object."""
    return path.resolve().as_uri() if is_local(path) else describe(path)


def artifacts(report: dict, run_dir: UPath) -> dict:
    """The Prefect artifacts' contents: a markdown summary, a table of counts and a link to the report."""
    counts, distances, saved = report["counts"], report["distances"], report["savings"]
    rows = [
        ("pairwise min", "pairwise", "min"),
        ("pairwise mean", "pairwise", "mean"),
        ("nearest-neighbour median", "nearest_neighbour", "median"),
    ]
    lines = [
        f"| {label} | "
        + " | ".join(_number((distances[s][group] or {}).get(key)) for s in ("before", "after", "random"))
        + " |"
        for label, group, key in rows
    ]
    markdown = "\n".join(
        [
            f"# Thresher report: {run_dir.name}",
            f"{counts['n_input_files']:,} files seen: {counts['n_sampled']:,} selected, "
            f"{counts['n_removed']:,} removed, "
            f"{counts['n_duplicate']:,} exact duplicates, {counts['n_corrupt']:,} corrupt.",
            f"Estimated savings: {saved['labeling_cost_saved_usd']:,.2f} USD of labelling "
            f"({saved['n_images_not_labelled']:,} images), {saved['training_gpu_hours_saved']:,.2f} GPU hours, "
            f"{saved['co2_saved_kg']:,.2f} kg CO2.",
            "",
            "| distance | all samples | selected | random subset |",
            "|---|---|---|---|",
            *lines,
            "",
            f"Full report: `{describe(run_dir / 'report.pdf')}`",
        ]
    )
    return {
        "markdown": {"key": f"{ARTIFACT_PREFIX}-summary", "markdown": markdown, "description": "Thresher run summary"},
        "table": {
            "key": f"{ARTIFACT_PREFIX}-counts",
            "table": [{"count": k, "value": v} for k, v in counts.items()],
            "description": "Files per outcome",
        },
        "link": {
            "key": f"{ARTIFACT_PREFIX}-pdf",
            "link": uri(run_dir / "report.pdf"),
            "link_text": "report.pdf",
            "description": "The run's PDF report",
        },
    }
