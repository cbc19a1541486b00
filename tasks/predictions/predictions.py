"""One prediction task's per-sample files, read into arrays aligned with the samples' filenames.

    classification     {"predictions": [{"category_id": 1, "probabilities": [0.2, 0.7, 0.1]}]}
    object-detection   {"predictions": [{"category_id": 0, "bbox": [x, y, w, h], "score": 0.8,
                                         "probabilities": [...]  (optional)}]}

`bbox` is in pixels from the image's top-left corner; `probabilities` follow the order of the schema's
categories. A classification file whose prediction has no probabilities counts as certain of its
category_id (a one-hot row), as labels uploaded as predictions are.

Whatever cannot be used is a `Problem` and reading goes on: a missing or malformed file leaves the
sample without predictions (`present` False, NaN probabilities); an unknown category or a box outside
the image (by more than `EDGE` pixels, for rounding) drops that box; probabilities of the wrong length
drop the classification, or a box's probabilities (the box stays).

    >>> import json, tempfile
    >>> root = UPath(tempfile.mkdtemp())
    >>> task = TaskSchema("weather", "classification", ("sunny", "rainy"), (0, 1))
    >>> _ = (root / PREDICTIONS / "weather").mkdir(parents=True)
    >>> _ = (root / PREDICTIONS / "weather" / "a.json").write_text(
    ...     json.dumps({"predictions": [{"category_id": 0, "probabilities": [0.9, 0.1]}]}))
    >>> found, problems = read_predictions(root, task, ["a.png", "b.png"])
    >>> found.probabilities.tolist(), problems
    ([[0.9, 0.1], [nan, nan]], [Problem(filename='b.png', message='weather: no file')])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from upath import UPath

from tasks.predictions.formats import NUMBER, PREDICTIONS, Problem, TaskSchema, failure, read_json_files


@dataclass(frozen=True)
class Classifications:
    """(N, C) class probabilities; a row of NaN where the sample has none."""

    present: np.ndarray
    probabilities: np.ndarray


@dataclass(frozen=True)
class Detections:
    """Every sample's boxes in flat arrays: those of sample i are rows `offsets[i]:offsets[i + 1]`.

    `categories` (B,) holds column indices into the task's categories, `scores` (B,), `boxes` (B, 4)
    [x, y, w, h] in pixels, `probabilities` (B, C) with NaN rows for boxes that carry none. A sample
    with a file but no boxes is `present` with an empty range."""

    present: np.ndarray
    offsets: np.ndarray
    categories: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    probabilities: np.ndarray

    def sample_of_box(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.present)), np.diff(self.offsets))


Predictions = Classifications | Detections

# How far a box may cross the image's edge, in pixels: Lightly suggests rounding coordinates to a tenth of
# a pixel, and a converter may round to whole ones.
EDGE = 0.5


def read_predictions(
    root: UPath,
    task: TaskSchema,
    filenames: list[str],
    widths: np.ndarray | None = None,
    heights: np.ndarray | None = None,
) -> tuple[Predictions, list[Problem]]:
    """The predictions of `task` for each of `filenames` (relative to the input root, frames by their
    frame names), with the problems found. `widths` and `heights` (aligned with filenames; NaN or 0
    for unknown) bound the boxes; without them only negative coordinates count as outside."""
    files = read_json_files(root / PREDICTIONS / task.name, filenames)
    if task.task_type == "classification":
        return _classifications(task, filenames, files)
    if task.task_type == "object-detection":
        return _detections(task, filenames, files, widths, heights)
    raise ValueError(f"task {task.name!r} is {task.task_type}; only classification and object-detection are read")


def _predictions_list(task: TaskSchema, name: str, content: Any, problems: list[Problem]) -> list | None:
    if isinstance(content, Exception):
        problems.append(Problem(name, f"{task.name}: {failure(content)}"))
        return None
    entries = content.get("predictions") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        problems.append(Problem(name, f'{task.name}: malformed: expected {{"predictions": [{{...}}, ...]}}'))
        return None
    return entries


def _probabilities(task: TaskSchema, value: Any) -> np.ndarray | str:
    """A probability vector, or why it is not one."""
    if not isinstance(value, list) or not all(type(p) in NUMBER for p in value):
        return "probabilities must be a list of numbers"
    if len(value) != len(task.category_ids):
        return f"{len(value)} probabilities for {len(task.category_ids)} categories"
    probabilities = np.asarray(value, dtype=np.float64)
    if not ((probabilities >= 0) & (probabilities <= 1)).all():
        return "probabilities must lie in [0, 1]"
    return probabilities


def _classifications(task: TaskSchema, filenames: list[str], files: list[Any]) -> tuple[Classifications, list[Problem]]:
    problems: list[Problem] = []
    index = task.column_of_id()
    out = np.full((len(filenames), len(task.category_ids)), np.nan)
    for row, (name, content) in enumerate(zip(filenames, files)):
        entries = _predictions_list(task, name, content, problems)
        if not entries:
            if entries == []:
                problems.append(Problem(name, f"{task.name}: the predictions list is empty"))
            continue
        entry = entries[0]
        if entry.get("category_id") not in index:
            problems.append(Problem(name, f"{task.name}: unknown category_id {entry.get('category_id')!r}"))
            continue
        if "probabilities" not in entry:
            out[row] = 0.0
            out[row, index[entry["category_id"]]] = 1.0
            continue
        probabilities = _probabilities(task, entry["probabilities"])
        if isinstance(probabilities, str):
            problems.append(Problem(name, f"{task.name}: {probabilities}"))
            continue
        out[row] = probabilities
    return Classifications(~np.isnan(out).any(axis=1), out), problems


def _detections(
    task: TaskSchema,
    filenames: list[str],
    files: list[Any],
    widths: np.ndarray | None,
    heights: np.ndarray | None,
) -> tuple[Detections, list[Problem]]:
    problems: list[Problem] = []
    index = task.column_of_id()
    present = np.zeros(len(filenames), dtype=bool)
    counts = np.zeros(len(filenames), dtype=np.int64)
    categories: list[int] = []
    scores: list[float] = []
    boxes: list[list[float]] = []
    probabilities: list[np.ndarray | None] = []
    for row, (name, content) in enumerate(zip(filenames, files)):
        entries = _predictions_list(task, name, content, problems)
        if entries is None:
            continue
        present[row] = True
        size = None if widths is None or heights is None else (float(widths[row]), float(heights[row]))
        for entry in entries:
            box = _box(task, index, entry, size)
            if isinstance(box, str):
                problems.append(Problem(name, f"{task.name}: {box}"))
                continue
            column, score, bbox, probs = box
            if isinstance(probs, str):
                problems.append(Problem(name, f"{task.name}: a box's {probs}; the box is kept without them"))
                probs = None
            categories.append(column)
            scores.append(score)
            boxes.append(bbox)
            probabilities.append(probs)
            counts[row] += 1
    n_categories = len(task.category_ids)
    table = np.full((len(probabilities), n_categories), np.nan)
    for i, probs in enumerate(probabilities):
        if probs is not None:
            table[i] = probs
    return (
        Detections(
            present,
            np.concatenate([[0], np.cumsum(counts)]),
            np.asarray(categories, dtype=np.int32),
            np.asarray(scores, dtype=np.float64),
            np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            table,
        ),
        problems,
    )


def _box(task: TaskSchema, index: dict[int, int], entry: dict, size: tuple[float, float] | None) -> tuple | str:
    """(category column, score, bbox, probabilities or why they are unusable), or why the box is dropped."""
    if entry.get("category_id") not in index:
        return f"unknown category_id {entry.get('category_id')!r}"
    bbox, score = entry.get("bbox"), entry.get("score")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(type(v) in NUMBER and math.isfinite(v) for v in bbox)):
        return f"bbox must be [x, y, width, height], got {bbox!r}"
    if type(score) not in NUMBER or not 0 <= score <= 1:
        return f"score must be a number in [0, 1], got {score!r}"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has no area"
    width, height = size if size is not None else (np.nan, np.nan)
    # An unknown size (NaN or 0) checks only the lower bounds.
    outside = min(x, y) < -EDGE or (width > 0 and x + w > width + EDGE) or (height > 0 and y + h > height + EDGE)
    if outside:
        return f"bbox {bbox} lies outside the image" + (f" ({width:g}x{height:g})" if size is not None else "")
    probs = _probabilities(task, entry["probabilities"]) if "probabilities" in entry else None
    return index[entry["category_id"]], float(score), [x, y, w, h], probs
