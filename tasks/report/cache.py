"""Reuse of the report's slow results across runs: `ReportCache` keeps the distance numbers, 2-D
projections and plots under a content key of what determines each (`content_key`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, fields, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash
from pydantic import BaseModel
from upath import UPath

from tasks.caching import CODE_VERSION
from tasks.report.previews import Thumbnails
from tasks.report.settings import CONTINUE_SHARE, PACKAGE
from tasks.storage import atomic_target, read_bytes, write_text

if TYPE_CHECKING:
    from tasks.report.plots import Plot


def source_digest(package: Path) -> str:
    """A hash of a package's code and templates (its *.py files and everything under templates/),
    each file by its path in the package and its bytes, in path order."""
    files = [*package.glob("*.py"), *(path for path in (package / "templates").rglob("*") if path.is_file())]
    digest = xxhash.xxh3_64()
    for path in sorted(files, key=lambda path: path.relative_to(package).as_posix()):
        content = path.read_bytes()
        digest.update(f"{path.relative_to(package).as_posix()} {len(content)};".encode())
        digest.update(content)
    return digest.hexdigest()


# Part of every key: results of other code are never reused. The report package's own sources are
# in it, as an edit to a plot changes its picture without changing the release; code outside the
# package is not, so an edit elsewhere keeps the cached results.
CODE_IDENTITY = (
    CODE_VERSION,
    source_digest(PACKAGE),
    *(metadata.version(name) for name in ("numpy", "scipy", "matplotlib", "umap-learn")),
)


def content_key(*parts: object) -> str:
    """A hash of `parts`: arrays by dtype, shape and bytes; dicts, lists, tuples and dataclasses
    item by item; previews by their files' identities; numbers, strings and None by type and repr.
    Not caching.shard_key, which hashes reprs: NumPy shortens the repr of a large array to its
    corners, so two different embedding matrices could share a key.

    >>> content_key({"n": 1}, np.zeros(2)) == content_key({"n": 1}, np.zeros(2)) != content_key({"n": 2}, np.zeros(2))
    True
    """
    digest = xxhash.xxh3_128()

    def feed(value: object) -> None:
        if isinstance(value, np.ndarray):
            digest.update(f"array {value.dtype.str} {value.shape};".encode())
            digest.update(np.ascontiguousarray(value).data)
        elif isinstance(value, Thumbnails):
            feed(value.identity())
        elif isinstance(value, BaseModel):  # selection_config
            feed(value.model_dump(mode="json"))
        elif isinstance(value, UPath):  # where selection_config's inputs are read
            feed(str(value))
        elif is_dataclass(value):
            feed({field.name: getattr(value, field.name) for field in fields(value)})
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)};".encode())
            for item in value.items():
                feed(item)
        elif isinstance(value, (list, tuple)):  # alike, as a tuple comes back from JSON as a list
            digest.update(f"list {len(value)};".encode())
            if all(item is None or isinstance(item, str) for item in value):  # file names: one call, not 10^6
                digest.update(json.dumps(value, ensure_ascii=False).encode())
                return
            for item in value:
                feed(item)
        else:
            value = value.item() if isinstance(value, np.generic) else value
            assert value is None or isinstance(value, (bool, int, float, str)), f"no content key for {type(value)}"
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed((CODE_IDENTITY, parts))
    return digest.hexdigest()


@dataclass(frozen=True)
class ReportCache:
    """The report's slow results in `<cache_dir>/report/`, each named by a content key of what
    determines it: an unchanged rerun reuses the distance numbers, the 2-D projections and every
    plot, and an input that changed gets a new key and is computed. Like the shard cache
    (tasks/caching.py), a file is its own cache record and is written atomically, so a file that
    exists is complete. Without a root, everything is computed.

    It also keeps each input's latest UMAP layout (`previous_layout`), which the next report on a
    grown input continues instead of starting afresh."""

    root: UPath | None = None

    @classmethod
    def under(cls, cache_dir: UPath | None) -> ReportCache:
        """The report's cache in a run's cache directory (`cache_dir/report/`), or none without one."""
        return cls(cache_dir / "report" if cache_dir else None)

    def numbers(self, compute: Callable[[], dict], *key: object) -> dict:
        """compute(), or what it returned for an earlier call with an equal key (a JSON round trip
        keeps every number exact)."""
        if self.root is None:
            return compute()
        path = self.root / "numbers" / f"{content_key(*key)}.json"
        if path.exists():
            return json.loads(read_bytes(path))
        value = compute()
        write_text(json.dumps(value, allow_nan=False), path)
        return value

    def stored_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under `key` (a content key), or None."""
        path = self.root / "arrays" / f"{key}.npz" if self.root else None
        if path is None or not path.exists():
            return None
        with np.load(io.BytesIO(read_bytes(path))) as stored:
            return {name: stored[name] for name in stored.files}

    def previous_layout(self, name: str, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The place of each point (by point_ids) in every view of the layout stored under `name`,
        NaN for a point that was not in it; none when fewer than CONTINUE_SHARE of the points were,
        as a layout of mostly new points is better started afresh."""
        stored = self.stored_arrays(name)
        if stored is None:
            return {}
        kept = stored.pop("ids")
        order = np.argsort(kept)
        at = order[np.minimum(np.searchsorted(kept, ids, sorter=order), len(kept) - 1)]
        found = kept[at] == ids
        if found.mean() < CONTINUE_SHARE:
            return {}
        return {view: np.where(found[:, None], xy[at], np.nan).astype(np.float32) for view, xy in stored.items()}

    def store_arrays(self, key: str, value: dict[str, np.ndarray]) -> None:
        if self.root is not None:
            with atomic_target(self.root / "arrays" / f"{key}.npz") as tmp, tmp.open("wb") as file:
                np.savez(file, **value)

    def draw(self, plots: list[Plot], plots_dir: UPath, executor: Executor) -> list[Drawing]:
        """Every plot into plots_dir: a copy of the picture an earlier report drew from equal inputs,
        or started on `executor`, the plots side by side; `finish` waits for those."""
        drawing = []
        for plot in plots:
            key = content_key(plot.draw.__name__, *plot.inputs)
            stored = self.root / "plots" / f"{key}{Path(plot.name).suffix}" if self.root else None
            if stored is not None and stored.exists():
                copy(stored, plots_dir / plot.name)
            else:
                drawing.append(
                    Drawing(executor.submit(plot.draw, *plot.inputs, plots_dir / plot.name), plot.name, stored)
                )
        return drawing

    @staticmethod
    def finish(drawing: list[Drawing], plots_dir: UPath) -> None:
        """Wait for the plots being drawn and keep each for later reports."""
        for plot in drawing:
            plot.future.result()
            if plot.stored is not None:
                copy(plots_dir / plot.name, plot.stored)


@dataclass(frozen=True)
class Drawing:
    """A plot being drawn into plots/<name>, and where the cache keeps it (None without a cache)."""

    future: Future
    name: str
    stored: UPath | None


def copy(source: UPath, target: UPath) -> None:
    with atomic_target(target) as tmp:
        tmp.write_bytes(read_bytes(source))
