"""Custom metadata of a datasource: `<root>/.lightly/metadata/schema.json` and one file per sample.

    schema.json     [{"name": "Temperature", "path": "weather.temperature", "defaultValue": 0.0,
                      "valueDataType": "NUMERIC_FLOAT"}, ...]
    sub/img.json    {"type": "image", "metadata": {"weather": {"temperature": 23.2}}}

A sample's file is named like its prediction files (`formats.json_name`). `read_metadata` gives one
array per schema `path`, aligned with the filenames: float64 for NUMERIC_INT, NUMERIC_FLOAT,
CATEGORICAL_INT and CATEGORICAL_BOOLEAN (true/false as 1/0), which WEIGHTS, THRESHOLD and BALANCE can
use; an object array of str for CATEGORICAL_STRING, which only BALANCE can (as categories). As in
Lightly, a sample without a file or without the key takes the schema's defaultValue (NaN or None when
that does not fit the type); a value of the wrong type is NaN or None and a Problem.

    >>> import json, tempfile
    >>> root = UPath(tempfile.mkdtemp())
    >>> _ = (root / METADATA).mkdir(parents=True)
    >>> _ = (root / METADATA / "schema.json").write_text(json.dumps([{"name": "T", "path": "weather.t",
    ...     "defaultValue": 0, "valueDataType": "NUMERIC_FLOAT"}]))
    >>> _ = (root / METADATA / "a.json").write_text(json.dumps({"type": "image", "metadata": {"weather": {"t": 21.5}}}))
    >>> values, problems = read_metadata(root, ["a.png", "b.png"])
    >>> values["weather.t"].tolist(), problems
    ([21.5, 0.0], [])
"""

from __future__ import annotations

from typing import Any

import numpy as np
from upath import UPath

from tasks.predictions.formats import NUMBER, Problem, failure, load_json, read_json_files
from tasks.storage import describe

METADATA = ".lightly/metadata"
NUMERIC = ("NUMERIC_INT", "NUMERIC_FLOAT", "CATEGORICAL_INT", "CATEGORICAL_BOOLEAN")
VALUE_TYPES = (*NUMERIC, "CATEGORICAL_STRING")
MISSING = object()


def read_schema(root: UPath) -> list[dict]:
    """The entries of `<root>/.lightly/metadata/schema.json`; a ValueError names the file and entry."""
    path = root / METADATA / "schema.json"
    schema = load_json(path)
    if not isinstance(schema, list):
        raise ValueError(f"{describe(path)} must be a JSON list of {{name, path, defaultValue, valueDataType}}")
    for number, entry in enumerate(schema):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ValueError(f"{describe(path)}: entry {number} has no path")
        if entry.get("valueDataType") not in VALUE_TYPES:
            raise ValueError(
                f"{describe(path)}: {entry['path']} has valueDataType {entry.get('valueDataType')!r}; "
                f"it must be one of {', '.join(VALUE_TYPES)}"
            )
    return schema


def read_metadata(
    root: UPath, filenames: list[str], videos: list[str | None] | None = None
) -> tuple[dict[str, np.ndarray], list[Problem]]:
    """One array per schema path, aligned with `filenames` (see the module doc), and the problems found.
    `videos` (aligned with filenames, None for images) names each frame's video: a frame without a
    file of its own takes the video's, as in Lightly. Without a schema.json there is no metadata."""
    if not (root / METADATA / "schema.json").exists():
        return {}, []
    schema = read_schema(root)
    files = read_json_files(root / METADATA, filenames)
    if videos is not None:
        rows = [i for i, content in enumerate(files) if isinstance(content, FileNotFoundError) and videos[i]]
        for row, content in zip(rows, read_json_files(root / METADATA, [videos[i] for i in rows])):
            files[row] = content
    problems: list[Problem] = []
    values = {entry["path"]: _empty(entry, len(filenames)) for entry in schema}
    for row, (name, content) in enumerate(zip(filenames, files)):
        if isinstance(content, FileNotFoundError):
            continue
        if (
            isinstance(content, Exception)
            or not isinstance(content, dict)
            or not isinstance(content.get("metadata"), dict)
        ):
            reason = failure(content) if isinstance(content, Exception) else 'expected {"metadata": {...}}'
            problems.append(Problem(name, f"metadata: {reason}"))
            continue
        for entry in schema:
            _store(values[entry["path"]], row, name, entry, content["metadata"], problems)
    return values, problems


def _store(column: np.ndarray, row: int, name: str, entry: dict, metadata: dict, problems: list[Problem]) -> None:
    value = _lookup(metadata, entry["path"])
    if value is MISSING:
        return
    converted = _convert(value, entry["valueDataType"])
    if converted is MISSING:
        problems.append(Problem(name, f"metadata {entry['path']}: {value!r} is not {entry['valueDataType']}"))
        converted = np.nan if entry["valueDataType"] in NUMERIC else None
    column[row] = converted


def _empty(entry: dict, n: int) -> np.ndarray:
    default = _convert(entry.get("defaultValue"), entry["valueDataType"])
    if entry["valueDataType"] in NUMERIC:
        return np.full(n, np.nan if default is MISSING else default, dtype=np.float64)
    return np.full(n, None if default is MISSING else default, dtype=object)


def _lookup(metadata: dict, path: str) -> Any:
    value: Any = metadata
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def _convert(value: Any, value_type: str) -> Any:
    """The value as its array holds it, or MISSING when it does not fit the type."""
    if value_type == "CATEGORICAL_STRING":
        return value if isinstance(value, str) else MISSING
    if value_type == "CATEGORICAL_BOOLEAN":
        return float(value) if isinstance(value, bool) else MISSING
    if type(value) not in NUMBER:
        return MISSING
    if value_type in ("NUMERIC_INT", "CATEGORICAL_INT") and not float(value).is_integer():
        return MISSING
    return float(value)
