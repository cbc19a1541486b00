"""The configuration's surfaces: the `key=value` overrides of `thresher run` (every dotted key, its
help, overrides parsed into a validated config and a config written back as overrides), the
`curate` flow's parameters, and `config/config.yaml`.

    >>> cfg = config_from_overrides(["input_dir=images", "output_dir=out",
    ...                              "stopping_condition.n_samples=0.3"])
    >>> cfg.stopping_condition.n_samples
    0.3
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr

from flows.config import ConfigError, ThresherConfig
from flows.validation import validate_config
from tasks.storage import flatten

log = logging.getLogger(__name__)


# Keys that only make sense with the Lightly Platform; accepted so Lightly commands run unchanged.
NOT_APPLICABLE = {
    "token": "Thresher is self-hosted and never contacts the Lightly Platform",
    "worker_id": "Thresher runs on your Dask cluster, not as a Lightly Platform worker",
    "upload_dataset": "Thresher keeps data where it is; the selection is in filenames/ and data/sampled/",
    "upload_report": "the report is written to the run directory",
    "pretagging": "Lightly's pretagging detector is proprietary",
    "pretagging_debug": "Lightly's pretagging detector is proprietary",
    "pretagging_config": "Lightly's pretagging detector is proprietary",
    "append_weak_labels": "weak labels come from Lightly's proprietary pretagging",
    "scorer": "it named the scorer of Lightly's proprietary pretagging; scores come from your predictions "
    "(active_learning.*, selection_config SCORES inputs)",
    "datapool.dataset_id": "datapools live in shared_dir, not on the Lightly Platform",
    "datasource.dataset_id": "the datasource is input_dir, not a Lightly Platform dataset",
}


def all_keys(model: type[BaseModel] = ThresherConfig, prefix: str = "") -> list[str]:
    """Every dotted key the configuration accepts, e.g. 'stopping_condition.n_samples'."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(all_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def field_help(key: str) -> tuple[Any, str]:
    """Default value and description of a dotted key."""
    model: type[BaseModel] = ThresherConfig
    *sections, leaf = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation  # type: ignore[assignment]
    field = model.model_fields[leaf]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, SecretStr):
        default = ""
    return default, field.description or ""


def similar_keys(key: str, valid: list[str], n: int = 3) -> list[str]:
    """Up to n full dotted keys close to an unknown one: close as a whole, else by their last part
    (`object_level.name` -> `datapool.name`, `lightly.model.name`), the closest first."""
    near = difflib.get_close_matches(key, valid, n=n, cutoff=0.6)
    if near:
        return near
    leaf = key.rsplit(".", 1)[-1]
    leaves = difflib.get_close_matches(leaf, sorted({k.rsplit(".", 1)[-1] for k in valid}), n=n, cutoff=0.6)
    return sorted(
        (k for k in valid if k.rsplit(".", 1)[-1] in leaves), key=lambda k: leaves.index(k.rsplit(".", 1)[-1])
    )[:n]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn Hydra-style `a.b=value` strings into a nested dict; values are read as YAML scalars or lists."""
    valid = all_keys()
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{item!r} is not a key=value override (for example stopping_condition.n_samples=0.3).")
        if key not in valid and not key.startswith("storage_options."):
            near = similar_keys(key, valid)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise ConfigError(f"Unknown key {key!r}.{hint} `thresher run --help` lists every key.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return nested


def config_from_overrides(overrides: list[str]) -> ThresherConfig:
    config = validate_config(parse_overrides(overrides))
    explain_not_applicable(overrides)
    return config


def explain_not_applicable(overrides: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        reason = NOT_APPLICABLE.get(key) or NOT_APPLICABLE.get(key.split(".")[0])
        if reason:
            log.warning("%s is accepted but not applicable: %s. The value is ignored.", key, reason)


def overrides_of(config: ThresherConfig) -> list[str]:
    """The `key=value` overrides that rebuild this config from the defaults (secrets left out)."""
    data = config.model_dump(mode="json", exclude_defaults=True, exclude={"token"})
    # selection_config is one value (its strategies are a list), written as JSON text.
    form = data.pop("selection_config", None)
    return [
        f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for key, value in flatten(data)
    ] + ([f"selection_config={json.dumps(form)}"] if form else [])


def flow_signature() -> inspect.Signature:
    """The top-level keys as keyword parameters with their types and defaults.

    This is the `curate` flow's signature, so the Prefect UI and `prefect deployment run --param`
    offer exactly the keys of `thresher run` (nested groups as JSON objects) without a second list
    of them to keep in step."""
    parameters = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=field.annotation,
            default=inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True),
        )
        for name, field in ThresherConfig.model_fields.items()
    ]
    return inspect.Signature(parameters, return_annotation=dict)


def dump_config(config: ThresherConfig) -> str:
    """YAML of the full configuration, secrets masked."""
    data = config.model_dump(mode="json")
    data["token"] = "***" if config.token.get_secret_value() else ""
    return yaml.safe_dump(data, sort_keys=False)
