"""Stage 1: list the datasource.

Finds the image and video files under `input_dir` (flat, or in subfolders whose sorted index
becomes the lightly `labels` column; a video's label is its index among the videos, as lightly
labels video folders), and keeps only those named in `relevant_filenames_file` when one is given.
Videos become frame samples in `tasks/video.py`.

    >>> files = list_images("examples/images")
    >>> files[0].filename, files[0].label
    ('objects/astronaut_00.jpg', 0)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from prefect import get_run_logger, task

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpeg", ".mpg", ".m4v"})
# Pillow's readable formats, read once: registered_extensions() initialises every plugin. Pillow
# claims .mpg/.mpeg but only reads their header; those are videos.
IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
) - VIDEO_EXTENSIONS


@dataclass(frozen=True)
class InputFile:
    """One input file: its path relative to input_dir (posix), label, size and modification time."""

    filename: str
    label: int
    size: int
    mtime: float


def _walk(root: Path) -> list[tuple[str, os.stat_result]]:
    """Regular files under root. Symlinks are followed only while they stay inside root;
    directory symlinks are not descended (this also makes symlink loops harmless)."""
    real_root = root.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                stat = path.stat()
            except OSError as error:  # dangling symlink, symlink loop, or gone since the directory was read
                log.warning("Skipping %s: %s", path, error.strerror or error)
                continue
            if path.is_symlink():
                target = path.resolve()  # stat succeeded, so the link resolves without a loop
                if not target.is_relative_to(real_root):
                    log.warning("Skipping %s: it is a symlink to %s, outside input_dir.", path, target)
                    continue
            found.append((path.relative_to(root).as_posix(), stat))
    return found


def is_video(filename: str) -> bool:
    return Path(filename).suffix.lower() in VIDEO_EXTENSIONS


def assign_labels(filenames: list[str]) -> list[int]:
    """lightly's labels: the sorted index of each file's top-level folder; files at the root form the
    group '' (which sorts first), so a flat folder is all label 0."""
    groups = sorted({name.split("/")[0] if "/" in name else "" for name in filenames})
    index = {group: i for i, group in enumerate(groups)}
    return [index[name.split("/")[0] if "/" in name else ""] for name in filenames]


def read_relevant_filenames(path: Path) -> list[str]:
    """Filenames relative to input_dir, one per line; blank lines and '#' comments are ignored."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip().removeprefix("./") for line in lines if line.strip() and not line.lstrip().startswith("#")]


def list_images(input_dir: str, relevant_filenames: list[str] | None = None) -> list[InputFile]:
    """Image and video files under input_dir, sorted by relative path."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir={input_dir!r} is not a folder.")
    entries = [(name, stat) for name, stat in _walk(root)
               if Path(name).suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS]
    if relevant_filenames is not None:
        wanted = set(relevant_filenames)
        missing = wanted - {name for name, _ in entries}
        if missing:
            log.warning(
                "%d files named in relevant_filenames_file are not images or videos in input_dir, e.g. %s",
                len(missing),
                ", ".join(sorted(missing)[:5]),
            )
        entries = [(name, stat) for name, stat in entries if name in wanted]
    labels = assign_labels([name for name, _ in entries])
    videos = iter(range(len(entries)))
    labels = [next(videos) if is_video(name) else label for (name, _), label in zip(entries, labels)]
    return [InputFile(name, label, stat.st_size, stat.st_mtime) for (name, stat), label in zip(entries, labels)]


@task(name="list-datasource")
def list_datasource(input_dir: str, relevant_filenames: list[str] | None) -> list[InputFile]:
    files = list_images(input_dir, relevant_filenames)
    n_videos = sum(is_video(f.filename) for f in files)
    get_run_logger().info("Found %d image and %d video files in %s", len(files) - n_videos, n_videos, input_dir)
    return files
