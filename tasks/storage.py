"""Every file the pipeline reads or writes, local or in a bucket, goes through this module.

Locations are `upath.UPath`s: a local path (a `pathlib.Path` subclass) or an fsspec URL such as
`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` or `abfs://...`, created by
`location` with the storage options configured for it. A UPath carries its options, so tasks on
Dask workers receive paths they can open without any global state.

Writes are atomic under both: a local file is written under a temporary name and renamed; an
object is written to a local temporary file and uploaded in one request (or one multipart upload
that the store completes only at the end), so a killed run never leaves a half-written file.

    >>> out = location("s3://bucket/runs", {"s3": {"endpoint_url": "http://127.0.0.1:9000"}})
    >>> write_text("hello", out / "note.txt")

Credentials come from each store's standard chain (environment variables, config files, instance
roles). Storage options may name secrets only by reference, `${ENV_VAR}` or
`prefect-secret:BLOCK_NAME`, resolved here when the location is made, so a secret never appears in
the config, the Prefect parameters, the report or the logs.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

# Rows per Parquet row group: the unit a table is read in part by (8,192 embeddings of d = 1280 are
# 42 MB), where pyarrow's default (a million rows) would make a large table one part.
ROW_GROUP_ROWS = 8192

# Option names that hold credentials in s3fs, gcsfs and adlfs: a literal value is refused.
SECRET_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "account_key",
        "sas_token",
        "connection_string",
        "client_secret",
        "credential",
        "credentials",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    }
)
# gcsfs's `token` also takes these mode names, which are not secrets.
TOKEN_MODES = frozenset({"anon", "google_default", "cache", "cloud", "browser"})
REFERENCE = re.compile(r"^(?:\$\{(?P<env>[A-Za-z_][A-Za-z0-9_]*)\}|prefect-secret:(?P<block>[\w-]+))$")

# Filesystem instances live as long as their process (a Dask worker serves many runs): a cached listing
# would hide objects uploaded since, so every listing asks the store.
DEFAULTS: dict[str, Any] = {"use_listings_cache": False}
# Retries with backoff for throttling and 5xx on top of s3fs's own (botocore's default is 5 tries in legacy mode).
S3_DEFAULTS: dict[str, Any] = {**DEFAULTS, "config_kwargs": {"retries": {"max_attempts": 10, "mode": "adaptive"}}}


class StorageError(RuntimeError):
    """A location cannot be used as configured; the message names the URL or key."""


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def is_local(path: UPath) -> bool:
    return isinstance(path, Path)


def literal_secrets(options: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """`storage_options.<entry>.<option>` keys that hold a credential as a literal value."""
    found = []
    for entry, values in options.items():
        for name, value in flatten(values):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in SECRET_OPTIONS and isinstance(value, str) and value and not REFERENCE.match(value):
                if not (leaf == "token" and value in TOKEN_MODES):
                    found.append(f"storage_options.{entry}.{name}")
    return found


def flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as (dotted key, value) pairs, the form of `key=value` overrides."""
    items = []
    for name, value in values.items():
        if isinstance(value, Mapping):
            items.extend(flatten(value, f"{prefix}{name}."))
        else:
            items.append((f"{prefix}{name}", value))
    return items


def options_for(url: str, options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The configured options of `url`: the entry whose key is the longest prefix of the URL (for
    one bucket, `s3://bucket`), else the entry named by its protocol (`s3`, `gs`, `az`, `abfs`)."""
    protocol = url.split("://", 1)[0]
    prefixes = [key for key in options if "://" in key and (url == key or url.startswith(key.rstrip("/") + "/"))]
    if prefixes:
        chosen = options[max(prefixes, key=len)]
    else:
        chosen = options.get(protocol, {})
    defaults = S3_DEFAULTS if protocol in {"s3", "s3a"} else DEFAULTS
    return {**defaults, **{name: _resolve(value, f"{protocol}.{name}") for name, value in chosen.items()}}


def _resolve(value: Any, key: str) -> Any:
    if isinstance(value, Mapping):
        return {name: _resolve(item, f"{key}.{name}") for name, item in value.items()}
    match = REFERENCE.match(value) if isinstance(value, str) else None
    if match is None:
        return value
    if match["env"]:
        if match["env"] not in os.environ:
            raise StorageError(
                f"storage_options {key} refers to ${{{match['env']}}}, which is not set in the environment."
            )
        return os.environ[match["env"]]
    from prefect.blocks.system import Secret

    try:
        return Secret.load(match["block"]).get()
    except ValueError as error:
        raise StorageError(
            f"storage_options {key}: Prefect Secret block {match['block']!r} cannot be loaded ({error})."
        ) from None


def location(path: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> UPath:
    """A local path (resolved to an absolute one) or a URL with its storage options."""
    if not is_url(path):
        return UPath(Path(path.removeprefix("file://")).expanduser().resolve())
    url = path.rstrip("/")
    return UPath(url, **options_for(url, options or {}))


def describe(path: UPath) -> str:
    """The path as the user wrote it (no options: they may hold credentials)."""
    return str(path) if is_local(path) else f"{path.protocol}://{path.path}"


# Who writes a temporary file: `remove_partial_files` tells a killed writer's file from a live one's.
HOST = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())[:64]
PARTIAL = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_-]*)\.(?P<pid>\d+)-\d+\.tmp$")


def atomic_path(path: Path) -> Path:
    """A sibling temporary name, unique per host and writing thread; renaming it onto `path` is
    atomic on one filesystem. The name is cut so that the temporary name of a 255-byte name still fits."""
    return path.with_name(f".{path.name[:100]}.{HOST}.{os.getpid()}-{threading.get_ident()}.tmp")


def remove_partial_files(folder: UPath, recursive: bool = False, max_age: float = 24 * 3600) -> int:
    """Delete the temporary files of killed writers in a local folder: those written by a process of
    this host that no longer exists, and any older than max_age seconds (a writer on another host
    sharing the folder). Returns how many were deleted."""
    if not is_local(folder) or not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        match = PARTIAL.match(path.name)
        if match is None:
            continue
        try:
            dead = match["host"] == HOST and not process_exists(int(match["pid"]))
            if dead or time.time() - path.stat().st_mtime > max_age:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # renamed or removed by its writer meanwhile
            continue
    return removed


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_target(path: UPath) -> Iterator[Path]:
    """A local temporary path to write `path` through: when the block succeeds it is renamed onto a
    local path or uploaded to an object in one request; when it fails (a full disk, say) it is
    removed, so no partial file is left under either name."""
    if is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic_path(path)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="thresher-upload-") as folder:
        tmp = Path(folder) / path.name[:200]
        yield tmp
        try:
            path.fs.put_file(str(tmp), path.path)
        except Exception as error:  # after the store's own retries: a missing bucket, denied access, ...
            raise StorageError(f"cannot write {describe(path)}: {explain(error)}") from error


def explain(error: Exception) -> str:
    """An object-store error in words: the three stores' clients raise different types for the same
    causes (a missing bucket, denied access)."""
    status = getattr(getattr(error, "response", None), "status_code", None) or getattr(error, "status_code", None)
    if isinstance(error, FileNotFoundError) or status == 404:
        cause = "the bucket, container or object does not exist"
    elif isinstance(error, PermissionError) or status in (401, 403):
        cause = "access denied: check the credentials and their permissions"
    else:
        return f"{type(error).__name__}: {error}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{cause} ({first_line})"


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Writer options: dictionary encoding and statistics for the plain columns only. An embedding's
    floats are nearly all distinct, so their dictionary is built only to be dropped, and min/max of
    list elements serve no reader; with both, writing a table of 2,000 x 1,280 floats took twice as
    long (85 against 45 ms)."""
    plain = [
        field.name
        for field in schema
        if not (
            pa.types.is_list(field.type)
            or pa.types.is_large_list(field.type)
            or pa.types.is_fixed_size_list(field.type)
        )
    ]
    return {"use_dictionary": plain, "write_statistics": plain}


def write_parquet(table: pa.Table, path: UPath) -> UPath:
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, **parquet_options(table.schema))
    return path


def write_text(text: str, path: UPath) -> UPath:
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def read_table(path: UPath, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's table, or only its `columns` (the others are not read)."""
    if is_local(path):
        return pq.read_table(path, columns=columns)
    with path.open("rb") as handle:
        return pq.read_table(handle, columns=columns)


@contextmanager
def parquet_file(path: UPath) -> Iterator[pq.ParquetFile]:
    """A Parquet file open for reading in parts (its metadata, then row group by row group), so a
    large table need not be in memory whole."""
    if is_local(path):
        with pq.ParquetFile(path) as file:
            yield file
        return
    with path.open("rb") as handle, pq.ParquetFile(handle) as file:
        yield file


@contextmanager
def parquet_writer(path: UPath, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A Parquet file written a table at a time, atomically like `write_parquet`."""
    with atomic_target(path) as tmp, pq.ParquetWriter(tmp, schema, **parquet_options(schema)) as writer:
        yield writer


def read_parquet(paths: list[UPath]) -> pa.Table:
    """Concatenate shard tables in the given order."""
    return pa.concat_tables([read_table(p) for p in paths])


def read_bytes(path: UPath) -> bytes:
    """The bytes of a file or object. A local file is opened without blocking and checked, so a pipe
    or device that carries an image's name is refused instead of hanging the run on its first read."""
    if not is_local(path):
        return path.read_bytes()
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise NotARegularFile("not a regular file (a pipe, socket or device)")
        return handle.read()


# Info keys that carry an object's version, in order of preference: S3's ETag, Azure's etag, GCS's
# generation; stores that have none of them fall back to the modification time.
VERSION_KEYS = ("ETag", "etag", "generation", "version_id", "LastModified", "last_modified", "updated", "mtime")


def object_version(info: dict) -> str:
    for key in VERSION_KEYS:
        if info.get(key) not in (None, ""):
            return str(info[key]).strip('"')
    return ""


def local_version(mtime: float) -> str:
    """A local file's version: its modification time, written so that it reads back exactly."""
    return repr(mtime)


def file_identity(path: UPath) -> tuple[int, str] | None:
    """(size, version) of a file as listing records it, or None when it is not there."""
    try:
        if is_local(path):
            stat_result = path.stat()
            return stat_result.st_size, local_version(stat_result.st_mtime)
        info = path.fs.info(path.path)
    except OSError:
        return None
    return int(info.get("size") or 0), object_version(info)


class NotARegularFile(OSError):
    """A local name that is a pipe, socket or device rather than a file."""


def existing_names(folder: UPath) -> set[str]:
    """Names of the files directly in `folder` (empty when it does not exist), in one listing
    rather than one request per name."""
    try:
        return {entry.rsplit("/", 1)[-1] for entry in folder.fs.ls(folder.path, detail=False)}
    except FileNotFoundError:
        return set()


@contextmanager
def decoder_source(path: UPath) -> Iterator[str | BinaryIO]:
    """What FFmpeg (PyAV) opens: a local file by its name, an object as a seekable file that reads
    it in ranges on demand, so a video is never copied to disk and memory stays bounded."""
    if is_local(path):
        yield str(path)
        return
    with path.open("rb") as handle:
        yield handle


def create_exclusive(path: UPath, text: str) -> bool:
    """Create a file holding `text`, or return False when it exists: one atomic step on a local
    disk (O_EXCL) and in a bucket (the store's conditional create: If-None-Match / ifGenerationMatch)."""
    if is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return True
    try:
        with path.fs.open(path.path, "xb") as handle:
            handle.write(text.encode())
    except FileExistsError:
        return False
    return True
