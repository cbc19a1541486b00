"""Validation of the configuration: one pass that turns pydantic's errors and the rules spanning
several keys into ConfigErrors that name the key and say what to do.

    >>> validate_config({"input_dir": "in", "output_dir": "out", "selection_config": {"n_samples": 10,
    ...     "strategies": [{"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY", "strength": "x"}}]}})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    flows.config.ConfigError: Invalid configuration:
      selection_config.strategies[0].strategy.strength='x': Input should be a valid number, ...
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from flows.config import ConfigError, ThresherConfig
from flows.options import input_sources
from tasks.selection.inputs import check_inputs

# Union and validator members add loc parts such as 'int' or 'function-after[...]'; discriminated
# unions add their tag ('DIVERSITY'). Keys are lower case, so these are left out of the key named.
TYPE_PARTS = {"int", "float", "str", "bool", "tuple[int,int]"}


def error_key(loc: tuple) -> str:
    """The dotted key of a pydantic error location, list items as [i]: selection_config.strategies[0].input."""
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part not in TYPE_PARTS and "[" not in part and not part.isupper():
            key += f".{part}" if key else part
    return key


def _describe_errors(error: ValidationError) -> str:
    lines: dict[str, str] = {}
    for item in error.errors():
        key = error_key(item["loc"])
        if key in lines:
            continue
        if item["type"] == "missing":
            example = "" if key.startswith("selection_config") else f", e.g. {key}=path/to/folder"
            lines[key] = f"{key}: required{example}"
        elif key.startswith("storage_options"):  # its value may hold a credential: never echo it
            lines[key] = f"{key}: {item['msg']}"
        else:
            shown = repr(item.get("input"))
            lines[key] = f"{key}={shown if len(shown) < 200 else shown[:200] + '...'}: {item['msg']}"
    return "Invalid configuration:\n  " + "\n  ".join(lines.values())


def validate_config(data: dict[str, Any]) -> ThresherConfig:
    """Build and check a config from nested values; raises ConfigError naming the key and value."""
    try:
        config = ThresherConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe_errors(error)) from None
    check_consistency(config)
    return config


def check_consistency(config: ThresherConfig) -> None:
    """Rules that span several keys, checked before any work starts."""
    for key in ("checkpoint", "embeddings", "relevant_filenames_file"):
        if getattr(config, key):
            config.shared_path(getattr(config, key), key)  # inside shared_dir, and there
    if config.enable_training and config.datapool.name:
        raise ConfigError(
            "enable_training=True cannot be combined with datapool.name: a datapool's embeddings must all come from "
            "one model, and training would change it for this run only. Train once without the datapool, then use "
            "the run's lightly_epoch_<N>.ckpt as checkpoint= (relative to shared_dir) for every datapool run."
        )
    if config.enable_training and config.lightly.trainer.max_epochs == 0:
        raise ConfigError("enable_training=True needs lightly.trainer.max_epochs >= 1 (or enable_training=False).")
    if config.selected_sequence_length > 1 and config.datapool.name:
        raise ConfigError(
            "selected_sequence_length > 1 cannot be combined with datapool.name yet; "
            "select sequences without a datapool, or frames (selected_sequence_length=1) with one."
        )
    if config.selection_config is None:
        check_stopping_condition(config)
    else:
        check_selection_config(config)
    if config.enable_training and config.embeddings:
        raise ConfigError("enable_training=True needs images to train on; it cannot be combined with embeddings=.")
    if config.method == "coral" and not config.active_learning.task_name:
        raise ConfigError(
            "method=coral weighs samples by a prediction task's active-learning score: set "
            "active_learning.task_name (a task in .lightly/predictions/tasks.json) and active_learning.score_name."
        )


def check_stopping_condition(config: ThresherConfig) -> None:
    """The plain keys' rules: method and stopping_condition.*."""
    stop = config.stopping_condition
    if stop.samples is None and stop.radius is None:
        raise ConfigError(
            "Set a stopping condition: stopping_condition.n_samples (count, or fraction in (0, 1]) "
            "and/or stopping_condition.min_distance, or a selection_config."
        )
    n = stop.n_samples
    if isinstance(n, float) and not 0 < n <= 1:
        raise ConfigError(
            f"stopping_condition.n_samples={n}: a float must be a fraction in (0, 1]; use an int for a count."
        )
    if isinstance(n, int) and n < 0 and n != -1:
        raise ConfigError(f"stopping_condition.n_samples={n}: use a count >= 0, a fraction in (0, 1], or -1.")
    if stop.radius is not None and not (math.isfinite(stop.radius) and stop.radius >= 0):
        raise ConfigError(f"stopping_condition.min_distance={stop.min_distance}: use a distance >= 0 or -1.")
    check_reachable(config, "stopping_condition.min_distance", stop.radius)
    if config.method == "random" and stop.radius is not None:
        raise ConfigError(
            "stopping_condition.min_distance needs method=coreset, typical_coreset or coral; random selection ignores "
            "distances."
        )
    length = config.selected_sequence_length
    if length > 1 and isinstance(n, int) and n != -1 and n % length:
        raise ConfigError(
            f"stopping_condition.n_samples={n} counts frames and must be a multiple of "
            f"selected_sequence_length={length}, "
            f"e.g. {max(length, n - n % length)}."
        )


def check_reachable(config: ThresherConfig, key: str, min_distance: float | None) -> None:
    if config.normalize_embeddings and min_distance is not None and min_distance > 2:
        raise ConfigError(
            f"{key}={min_distance}: normalised embeddings are at most 2 apart, so nothing past the first sample "
            "could be selected; use a value in [0, 2]."
        )


def check_selection_config(config: ThresherConfig) -> None:
    """selection_config's rules beyond its own form (tasks/selection/form.py)."""
    form = config.selection_config
    stop = config.stopping_condition
    if stop.samples is not None or stop.radius is not None or config.method != "typical_coreset":
        raise ConfigError(
            "selection_config replaces method and stopping_condition.*: give the size as selection_config.n_samples "
            "or proportion_samples, the minimum distance as a DIVERSITY strategy's "
            "stopping_condition_minimum_distance, and leave method and stopping_condition.* unset."
        )
    if config.selected_sequence_length > 1:
        raise ConfigError(
            "selection_config cannot be combined with selected_sequence_length > 1 yet: its inputs are per frame. "
            "Select sequences with method= and stopping_condition.*."
        )
    diversity = [i for i, entry in enumerate(form.strategies) if entry.strategy.type == "DIVERSITY"]
    if len(diversity) > 1:
        raise ConfigError(
            f"selection_config.strategies[{diversity[1]}]: one DIVERSITY strategy at most "
            f"(strategies[{diversity[0]}] is one)."
        )
    for i in diversity:
        limit = form.strategies[i].strategy.stopping_condition_minimum_distance
        check_reachable(config, f"selection_config.strategies[{i}].strategy.stopping_condition_minimum_distance", limit)
    measured = [i for i, entry in enumerate(form.strategies) if getattr(entry.input, "key", "").startswith("lightly.")]
    if config.embeddings and measured:
        raise ConfigError(
            f"selection_config.strategies[{measured[0]}].input.key: the lightly.* metadata is measured by the check "
            "stage, which a run from embeddings= skips; select from images, or use your own .lightly/metadata."
        )
    try:
        check_inputs(form, input_sources(config))
    except ValueError as error:
        raise ConfigError(str(error)) from None
