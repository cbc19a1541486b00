"""The Lightly Worker's active-learning scores and class distributions, per sample, from predictions.

Classification (from each sample's probabilities p over C classes), each scaled so that a one-hot p
scores 0 and the uniform p scores 1, as the Worker does:

- `uncertainty_least_confidence`: (1 - max p) / (1 - 1/C)
- `uncertainty_margin`: 1 - (largest p - second largest p)
- `uncertainty_entropy`: -sum p log p / log C

Object detection:

- `objectness_least_confidence`: 1 - the mean score of the sample's boxes (0 without boxes).
- `object_frequency`: the number of objects, the first of each category counting 1 and every further
  one `frequency_penalty`, mapped linearly from the samples' range onto [`min_score`, 1].
- `uncertainty_least_confidence`, `uncertainty_margin`, `uncertainty_entropy`: the classification
  scores of each box's probabilities, the sample's highest (0 without boxes that carry probabilities);
  present only where some box of the task carries probabilities. They are named as the classification
  scores: Lightly's examples ask for `uncertainty_entropy` of a detection task.

A sample without predictions (no file, or one that could not be read) scores NaN everywhere.

    >>> probabilities = np.array([[0.5, 0.5], [1.0, 0.0], [np.nan, np.nan]])
    >>> classification_scores(probabilities)["uncertainty_margin"].tolist()
    [1.0, 0.0, nan]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from upath import UPath

from tasks.predictions.formats import TaskSchema
from tasks.predictions.predictions import Classifications, Detections, Predictions
from tasks.storage import atomic_target


@dataclass(frozen=True)
class ScorerOptions:
    """The Worker's `scorer_config` for object detection: both in [0, 1]."""

    frequency_penalty: float = 0.25
    min_score: float = 0.9

    def __post_init__(self) -> None:
        for key in ("frequency_penalty", "min_score"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"scorer_config.{key} is {getattr(self, key)}; it must lie in [0, 1]")


def classification_scores(probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """The three uncertainty scores of each row of (N, C) probabilities; NaN rows score NaN. One
    column is read as the probability of a binary task's first class."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape[1] == 1:
        p = np.hstack([p, 1.0 - p])
    n_classes = p.shape[1]
    top2 = -np.sort(-p, axis=1)[:, :2]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
        entropy[np.isnan(p).any(axis=1)] = np.nan
        out = {
            "uncertainty_least_confidence": (1.0 - top2[:, 0]) / (1.0 - 1.0 / n_classes),
            "uncertainty_margin": 1.0 - (top2[:, 0] - top2[:, 1]),
            "uncertainty_entropy": entropy / np.log(n_classes),
        }
    return {name: np.clip(values, 0.0, 1.0) for name, values in out.items()}


def detection_scores(detections: Detections, options: ScorerOptions) -> dict[str, np.ndarray]:
    n = len(detections.present)
    sample = detections.sample_of_box()
    counts = np.diff(detections.offsets)
    score_sum = np.bincount(sample, weights=detections.scores, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        objectness = np.where(counts > 0, 1.0 - score_sum / counts, 0.0)
    out = {
        "objectness_least_confidence": np.where(detections.present, objectness, np.nan),
        "object_frequency": object_frequency(detections, options),
    }
    carries = ~np.isnan(detections.probabilities).any(axis=1)
    if carries.any():
        for name, per_box in classification_scores(detections.probabilities[carries]).items():
            highest = np.full(n, -np.inf)
            np.fmax.at(highest, sample[carries], per_box)
            out[name] = np.where(detections.present, np.where(np.isinf(highest), 0.0, highest), np.nan)
    return out


def object_frequency(detections: Detections, options: ScorerOptions) -> np.ndarray:
    """See the module doc; all samples with the same count score 1."""
    n = len(detections.present)
    n_categories = detections.probabilities.shape[1]
    pairs, per_pair = np.unique(
        detections.sample_of_box() * max(1, n_categories) + detections.categories, return_counts=True
    )
    weight = 1.0 + options.frequency_penalty * (per_pair - 1)
    objects = np.bincount(pairs // max(1, n_categories), weights=weight, minlength=n)
    out = np.full(n, np.nan)
    if detections.present.any():
        found = objects[detections.present]
        low, high = float(found.min()), float(found.max())
        scaled = (
            np.ones_like(found)
            if high == low
            else options.min_score + (found - low) / (high - low) * (1.0 - options.min_score)
        )
        out[detections.present] = scaled
    return out


def scores(task: TaskSchema, predictions: Predictions, options: ScorerOptions | None = None) -> dict[str, np.ndarray]:
    """Every active-learning score of `task` by name, one value per sample (NaN: no predictions)."""
    if isinstance(predictions, Classifications):
        return classification_scores(predictions.probabilities)
    if isinstance(predictions, Detections):
        return detection_scores(predictions, options or ScorerOptions())
    raise ValueError(f"task {task.name!r} ({task.task_type}) has no active-learning scores")


def class_distribution(
    task: TaskSchema, predictions: Predictions, kind: Literal["CLASS_DISTRIBUTION", "CATEGORY_COUNT"]
) -> np.ndarray:
    """(N, C) per sample and category, columns in the schema's order, NaN rows without predictions.

    Classification: one-hot of the most probable class, for both kinds. Object detection: the number
    of boxes of each category (CATEGORY_COUNT), or their share of the sample's boxes
    (CLASS_DISTRIBUTION; a zero row without boxes)."""
    n_categories = len(task.category_ids)
    if isinstance(predictions, Classifications):
        present = predictions.present
        out = np.zeros((len(present), n_categories))
        rows = np.flatnonzero(present)
        out[rows, np.argmax(predictions.probabilities[rows], axis=1)] = 1.0
    else:
        present = predictions.present
        flat = np.bincount(
            predictions.sample_of_box() * n_categories + predictions.categories, minlength=len(present) * n_categories
        )
        out = flat.reshape(len(present), n_categories).astype(np.float64)
        if kind == "CLASS_DISTRIBUTION":
            out /= np.maximum(out.sum(axis=1, keepdims=True), 1.0)
    out[~present] = np.nan
    return out


def category_count(task: TaskSchema, predictions: Predictions, categories: list[str] | None = None) -> np.ndarray:
    """(N,) CATEGORY_COUNT as a scalar input: the sample's objects of `categories` (all when None)."""
    unknown = sorted(set(categories or ()) - set(task.category_names))
    if unknown:
        raise ValueError(f"task {task.name!r} has no categories {unknown}; it has {list(task.category_names)}")
    counts = class_distribution(task, predictions, "CATEGORY_COUNT")
    columns = [task.category_names.index(name) for name in categories] if categories else slice(None)
    return counts[:, columns].sum(axis=1)


def scores_table(filenames: list[str], named: dict[str, np.ndarray]) -> pa.Table:
    """`filenames` and one float64 column per score, null where the sample has none."""
    columns = {"filenames": pa.array(filenames, pa.string())}
    columns.update({name: pa.array(values, pa.float64(), from_pandas=True) for name, values in named.items()})
    return pa.table(columns)


def write_scores_csv(table: pa.Table, path: UPath) -> UPath:
    """The scores as CSV: `filenames` then one column per score, an empty cell where a sample has
    none. Lightly's docs do not describe the Worker's al_score_embeddings.csv, so this is our layout."""
    with atomic_target(path) as tmp:
        pa_csv.write_csv(table, tmp)
    return path
