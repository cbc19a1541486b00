"""The Lightly prediction tasks of a datasource, and the bulk reader of per-sample JSON files.

    <root>/.lightly/predictions/tasks.json              ["weather", "people"]
    <root>/.lightly/predictions/weather/schema.json     {"task_type": "classification",
                                                         "categories": [{"id": 0, "name": "sunny"}, ...]}
    <root>/.lightly/predictions/weather/sub/img.json    the predictions of sample sub/img.png

A sample's file is named after its filename with the extension replaced by `.json` (`json_name`); a
video frame's filename is `tasks.video.frames.frame_name`'s, so `clip.mp4`'s frame 99 of 200 reads
`clip-099-mp4.json`, Lightly's name for it. The schema's type key is `task_type` (older Lightly docs
call it `task_description`; both are read).

    >>> json_name("sub/clip-099-mp4.png")
    'sub/clip-099-mp4.json'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from upath import UPath

from tasks.storage import describe, is_local

PREDICTIONS = ".lightly/predictions"
# Lightly's task types; scores exist for the first two only.
TASK_TYPES = (
    "classification",
    "object-detection",
    "semantic-segmentation",
    "keypoint-detection",
    "instance-segmentation",
)
# Files per request batch: large enough for the store's concurrency (s3fs fetches a batch at once), small
# enough that a batch's bytes stay a few MB.
CHUNK = 1000
# The types a JSON number parses to, checked by exact type so that true and false (bools are ints) are
# not numbers.
NUMBER = (int, float)


class Problem(NamedTuple):
    """A sample's file that could not be used as it is; reading goes on with the other samples."""

    filename: str
    message: str


@dataclass(frozen=True)
class TaskSchema:
    """One prediction task: its categories in the order of schema.json, where column c of every
    per-class array is category `category_ids[c]`."""

    name: str
    task_type: str
    category_names: tuple[str, ...]
    category_ids: tuple[int, ...]

    def column_of_id(self) -> dict[int, int]:
        return {category: column for column, category in enumerate(self.category_ids)}


def json_name(filename: str) -> str:
    """The name of a sample's prediction or metadata file, relative to the task's folder: the
    extension of the last component replaced (pathlib's with_suffix, at a tenth of its cost).

    >>> json_name("a.b/c"), json_name("sub/.hidden"), json_name("x.tar.gz")
    ('a.b/c.json', 'sub/.hidden.json', 'x.tar.json')
    """
    dot = filename.rfind(".")
    # A dot that starts the last component begins its name, not an extension.
    if dot > filename.rfind("/") + 1:
        filename = filename[:dot]
    return filename + ".json"


def read_tasks(root: UPath) -> dict[str, TaskSchema]:
    """Every task of `<root>/.lightly/predictions/tasks.json`, by name; a ValueError names the file
    that is missing or malformed."""
    folder = root / PREDICTIONS
    names = load_json(folder / "tasks.json")
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f'{describe(folder / "tasks.json")} must be a JSON list of task names, e.g. ["weather"]')
    return {name: read_schema(folder / name / "schema.json", name) for name in names}


def read_schema(path: UPath, name: str) -> TaskSchema:
    try:
        schema = load_json(path)
    except ValueError as error:
        raise ValueError(f"task {name!r} is listed in tasks.json, but {error}") from None
    where = f"{describe(path)} (task {name!r})"
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON object with task_type and categories")
    task_type = schema.get("task_type", schema.get("task_description"))
    if task_type not in TASK_TYPES:
        raise ValueError(f"{where}: task_type is {task_type!r}; it must be one of {', '.join(TASK_TYPES)}")
    categories = schema.get("categories")
    if not isinstance(categories, list) or not all(_is_category(c) for c in categories):
        raise ValueError(f'{where}: categories must be a list of {{"id": int, "name": str}}')
    ids = tuple(int(c["id"]) for c in categories)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: category ids must be unique, got {list(ids)}")
    return TaskSchema(name, task_type, tuple(c["name"] for c in categories), ids)


def _is_category(category: Any) -> bool:
    return (
        isinstance(category, dict)
        and isinstance(category.get("id"), int)
        and not isinstance(category.get("id"), bool)
        and isinstance(category.get("name"), str)
    )


def load_json(path: UPath) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{describe(path)} does not exist") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{describe(path)} is not valid JSON: {error}") from None


def read_json_files(folder: UPath, filenames: list[str]) -> list[Any | Exception]:
    """The parsed JSON file of each sample under `folder` (see `json_name`), or the exception that
    stopped it: FileNotFoundError for a missing file, ValueError for one that is not JSON.

    In a bucket, files are fetched a chunk at a time with `cat_ranges`, which an async store (s3fs,
    gcsfs, adlfs) serves concurrently; `cat` would read the names as glob patterns (a name with `[`
    would match other files or none). A local file is opened directly: fsspec's open costs four
    times the read of a small file."""
    base = folder.path.rstrip("/")
    out: list[Any | Exception] = []
    for start in range(0, len(filenames), CHUNK):
        paths = [f"{base}/{json_name(name)}" for name in filenames[start : start + CHUNK]]
        if is_local(folder):
            contents = [_read_local(path) for path in paths]
        else:
            contents = folder.fs.cat_ranges(paths, None, None, on_error="return")
        out.extend(content if isinstance(content, Exception) else _parse(content) for content in contents)
    return out


def _read_local(path: str) -> bytes | Exception:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        return error


def _parse(content: bytes) -> Any | Exception:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as error:
        return ValueError(f"not valid JSON: {error}")


def failure(error: Exception) -> str:
    """A fetch error in words."""
    if isinstance(error, FileNotFoundError):
        return "no file"
    return str(error) if isinstance(error, ValueError) else f"cannot read: {type(error).__name__}: {error}"
