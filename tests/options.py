"""Stage options as a run with the default configuration gets them (flows/options.py), with the
given fields changed: tests construct options the way the flow does."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flows import options
from flows.config import ThresherConfig
from tasks.decoding import CheckOptions
from tasks.models import EmbedOptions

DEFAULTS = ThresherConfig(input_dir="in", output_dir="out")


def check_options(**changes: Any) -> CheckOptions:
    return replace(options.check_options(DEFAULTS), **changes)


def embed_options(**changes: Any) -> EmbedOptions:
    return replace(options.embed_options(DEFAULTS, threads=1), **changes)


def train_options(**changes: Any):  # -> tasks.training.TrainOptions, which imports lightly
    return replace(options.train_options(DEFAULTS), **changes)


def augmentations(**changes: Any):  # -> tasks.training.Augmentations
    return replace(options.train_options(DEFAULTS).augment, **changes)
