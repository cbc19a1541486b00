"""Stage 1: list the datasource.

Finds the image and video files under `input_dir` (flat, or in subfolders whose sorted index
becomes the lightly `labels` column; a video's label is its index among the videos, as lightly
labels video folders), and keeps only those named in `relevant_filenames_file` when one is given.
An image is a file of any format Pillow opens (`tasks/image_formats.py`); the files that are neither
images nor videos are counted by extension for report.json. Videos become frame samples in `tasks/video/`.

    >>> files = list_images(location("examples/images"))
    >>> files[0].filename, files[0].label
    ('objects/astronaut_00.jpg', 0)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any, ClassVar

from prefect import get_run_logger, task
from upath import UPath

from tasks.image_formats import readable_extensions
from tasks.storage import StorageError, describe, explain, is_local, local_version, object_version, read_bytes

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpeg", ".mpg", ".m4v"})
# Read once, at import. Pillow claims .mpg/.mpeg but only reads their header; those are videos.
IMAGE_EXTENSIONS = readable_extensions() - VIDEO_EXTENSIONS
INPUT_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


@dataclass(frozen=True)
class InputFile:
    """One input file: its path relative to input_dir (posix), label, size and version.

    The version is what the store says changes when the content does: a local file's modification
    time, an object's ETag (S3, Azure) or generation (GCS). (name, size, version) identifies a file
    across runs: the datapool's record of what was processed and the cache keys use it."""

    filename: str
    label: int
    size: int
    version: str

    # As a `tasks.sharding.Source` a file is read whole: an image, which is its own one sample (a
    # video is read as FrameRanges; while it is probed, it counts as one).
    count: ClassVar[int] = 1

    @property
    def origin(self) -> InputFile:
        return self

    def names(self) -> list[str]:
        return [self.filename]

    def read(
        self, input_dir: UPath, image: Callable[[bytes], Any], frame: Callable[[Any], Any], timeout: float | None = None
    ) -> list[tuple[str, Any]]:
        """[(filename, image(its bytes))], or [(filename, reason)] when it cannot be read. Read at
        once, not when iterated, so that threads can read files ahead (see tasks/embedding.py)."""
        try:
            data = read_bytes(input_dir / self.filename)
        except OSError as error:  # also a pipe or device with an image's name, and an object deleted since listing
            return [(self.filename, f"unreadable: {error.strerror or error}")]
        return [(self.filename, image(data))]

    def key(self, stage: str) -> InputFile | tuple:
        """What the file adds to a stage's cache key: the embed stage has keyed the tuple (filename,
        label, size, version) since before files were Sources; kept so that its caches stay valid."""
        return dataclasses.astuple(self) if stage == "embed" else self

    def __dask_tokenize__(self) -> tuple:
        # Dask names a submitted task by a hash of its arguments, and hashes a dataclass by pickling
        # its class, once per object: 115 ms for a task of 2,000 files, against 3.6 ms so.
        return ("InputFile", self.filename, self.label, self.size, self.version)


def _walk(root: Path) -> list[tuple[str, int, str]]:
    """Regular files under root: a folder's files by name, then its subfolders by name. Symlinks to
    files are followed only while they stay inside root; directory symlinks are not descended (this
    also makes symlink loops harmless).

    Plain strings and os.scandir, not pathlib: a nightly run lists every file of the folder. Over
    100,000 files, listing took 2.0 s with a path object per file and takes 0.6 s without; their
    stat calls alone take 0.33 s."""
    real_root = root.resolve()
    found: list[tuple[str, int, str]] = []

    def visit(folder: str, prefix: str) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:  # a subfolder that cannot be read, or is gone since its parent was read
            if not prefix:
                raise
            log.warning("Skipping the folder %s: %s", folder, error.strerror or error)
            return
        folders = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry)
                continue
            if not _is_utf8(entry.path):
                log.warning(
                    "Skipping %s: its name is not valid UTF-8, which the output lists and CSVs need; "
                    "rename the file (e.g. with convmv) to include it.",
                    ascii(entry.path),
                )
                continue
            try:
                stat = entry.stat()  # follows a symlink
            except OSError as error:  # dangling symlink, symlink loop, or gone since the folder was read
                log.warning("Skipping %s: %s", entry.path, error.strerror or error)
                continue
            if entry.is_symlink():
                if S_ISDIR(stat.st_mode):
                    continue
                target = Path(entry.path).resolve()  # stat succeeded, so the link resolves without a loop
                if not target.is_relative_to(real_root):
                    log.warning("Skipping %s: it is a symlink to %s, outside input_dir.", entry.path, target)
                    continue
            found.append((prefix + entry.name, stat.st_size, local_version(stat.st_mtime)))
        for entry in folders:
            visit(entry.path, prefix + entry.name + "/")

    visit(os.fspath(root), "")
    return found


def _find(root: UPath) -> list[tuple[str, int, str]]:
    """Objects under a bucket prefix, from one paginated recursive listing (not a request per object)."""
    try:
        infos = root.fs.find(root.path, detail=True)
    except Exception as error:  # after the store's own retries: a missing bucket, denied access, ...
        raise StorageError(f"cannot list input_dir={describe(root)}: {explain(error)}") from error
    if not infos and not root.fs.exists(root.path.split("/", 1)[0]):  # Azure lists a missing container as empty
        raise StorageError(f"cannot list input_dir={describe(root)}: the bucket or container does not exist.")
    prefix = root.path.rstrip("/") + "/"
    return sorted(
        (name.removeprefix(prefix), int(info.get("size") or 0), object_version(info))
        for name, info in infos.items()
        if info.get("type", "file") == "file" and name.startswith(prefix)
    )


def _is_utf8(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def suffix(filename: str) -> str:
    """The lower-cased extension of a posix name, as PurePosixPath(filename).suffix gives it, without
    building a path: listing asks it of every file."""
    name = filename.rpartition("/")[2]
    dot = name.rfind(".")
    return name[dot:].lower() if 0 < dot < len(name) - 1 else ""


def is_video(filename: str) -> bool:
    return suffix(filename) in VIDEO_EXTENSIONS


def assign_labels(filenames: list[str]) -> list[int]:
    """lightly's labels: the sorted index of each file's top-level folder; files at the root form the
    group '' (which sorts first), so a flat folder is all label 0."""
    groups = sorted({name.split("/")[0] if "/" in name else "" for name in filenames})
    index = {group: i for i, group in enumerate(groups)}
    return [index[name.split("/")[0] if "/" in name else ""] for name in filenames]


def read_relevant_filenames(path: UPath) -> list[str]:
    """Filenames relative to input_dir, one per line; blank lines and '#' comments are ignored."""
    lines = read_bytes(path).decode("utf-8").splitlines()
    return [line.strip().removeprefix("./") for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class Listing:
    """What input_dir holds: the input files, and how many files it skipped as neither images nor
    videos, by lower-cased extension (e.g. {".json": 1, ".txt": 3}; NO_EXTENSION for names without one)."""

    files: list[InputFile]
    not_images: dict[str, int]


NO_EXTENSION = "(none)"


def list_input(root: UPath, relevant_filenames: list[str] | None = None) -> Listing:
    """Image and video files under input_dir (a local folder's in the order of `_walk`, a bucket's by
    key), and the other files counted by extension."""
    if is_local(root) and not root.is_dir():
        raise FileNotFoundError(f"input_dir={describe(root)!r} is not a folder.")
    found = _walk(root) if is_local(root) else _find(root)
    extensions = [suffix(entry[0]) for entry in found]
    entries = [entry for entry, extension in zip(found, extensions) if extension in INPUT_EXTENSIONS]
    skipped = Counter(extension or NO_EXTENSION for extension in extensions if extension not in INPUT_EXTENSIONS)
    if relevant_filenames is not None:
        wanted = set(relevant_filenames)
        missing = wanted - {entry[0] for entry in entries}
        if missing:
            log.warning(
                "%d files named in relevant_filenames_file are not images or videos in input_dir, e.g. %s",
                len(missing),
                ", ".join(sorted(missing)[:5]),
            )
        entries = [entry for entry in entries if entry[0] in wanted]
    labels = assign_labels([entry[0] for entry in entries])
    videos = iter(range(len(entries)))
    labels = [next(videos) if is_video(entry[0]) else label for entry, label in zip(entries, labels)]
    files = [InputFile(name, label, size, version) for (name, size, version), label in zip(entries, labels)]
    return Listing(files, dict(sorted(skipped.items())))


def list_images(root: UPath, relevant_filenames: list[str] | None = None) -> list[InputFile]:
    """The input files of `list_input`, for callers that need only those."""
    return list_input(root, relevant_filenames).files


@task(name="list-datasource")
def list_datasource(input_dir: UPath, relevant_filenames: list[str] | None) -> Listing:
    listing = list_input(input_dir, relevant_filenames)
    n_videos = sum(is_video(f.filename) for f in listing.files)
    logger = get_run_logger()
    logger.info("Found %d image and %d video files in %s", len(listing.files) - n_videos, n_videos, describe(input_dir))
    if listing.not_images:
        # A format the user expected to be read shows up here rather than silently missing.
        logger.info(
            "Skipped %d files that are neither images nor videos: %s",
            sum(listing.not_images.values()),
            ", ".join(f"{count} {extension}" for extension, count in listing.not_images.items()),
        )
    return listing
