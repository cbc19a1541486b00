"""The object-store test servers behave as the pipeline will use them through fsspec and UPath:
upload, one recursive listing with details, whole and ranged reads, credentials from the
environment only, from another process, and S3 through injected faults."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest
from azure.core.exceptions import HttpResponseError
from distributed import Client, LocalCluster

from tests.images import dataset
from tests.objectstores import AZURITE_KEY, FAULTS, FaultProxy, Store, azurite_connection_string, export_env, running

STORES = ["s3_store", "gcs_store", "azure_store"]
# The listing key that identifies an object's version, and whether uploading the same bytes again
# changes it: S3's ETag is the MD5 of a single-part upload; a GCS generation and an Azure ETag are
# new with every write.
VERSION_KEYS = {"s3": ("ETag", False), "gs": ("generation", True), "az": ("etag", True)}


@pytest.fixture(params=STORES)
def store(request) -> Store:
    return request.getfixturevalue(request.param)


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_uploaded_folder_lists_in_one_call_and_reads_back_whole_and_ranged(store, tmp_path):
    dataset(tmp_path, per_label=2)  # nested labels, an empty file and a truncated one
    files = local_files(tmp_path)
    root = store.upload(tmp_path, "in")

    listing = store.fs.find(root.path, detail=True)
    prefix = root.path.rstrip("/") + "/"
    assert {name.removeprefix(prefix): info["size"] for name, info in listing.items()} == {
        name: len(data) for name, data in files.items()
    }
    assert all(info["type"] == "file" for info in listing.values())
    for name, data in files.items():
        assert (root / name).read_bytes() == data
        if data:  # S3 and Azure refuse any range of an empty object: see the test below
            assert store.fs.cat_file(f"{prefix}{name}", start=10, end=40) == data[10:40]
    with (root / "cats" / "img_01.jpg").open("rb") as file:
        file.seek(100)
        assert file.read(50) == files["cats/img_01.jpg"][100:150]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(files)


@pytest.mark.parametrize("protocol", VERSION_KEYS)
def test_listing_names_a_version_key(protocol, request):
    store = request.getfixturevalue({"s3": "s3_store", "gs": "gcs_store", "az": "azure_store"}[protocol])
    key, changes_on_same_bytes = VERSION_KEYS[protocol]
    path = store.path("a.bin")

    def version() -> str:
        store.fs.invalidate_cache()
        return str(store.fs.find(store.path().path, detail=True)[path.path][key])

    path.write_bytes(b"first")
    first = version()
    path.write_bytes(b"first")
    assert (version() != first) is changes_on_same_bytes
    path.write_bytes(b"second")
    assert version() != first


def test_a_range_of_an_empty_object_is_refused_but_a_read_through_open_is_not(store):
    """Real S3 and Azure refuse a range that starts at or past an object's end; the GCS emulator
    answers it with no bytes. Reading a file object's first bytes works on all three."""
    path = store.path("empty.png")
    path.write_bytes(b"")
    with path.open("rb") as file:
        assert file.read(16) == b""
    if store.protocol == "gs":
        assert store.fs.cat_file(path.path, start=0, end=16) == b""
    else:
        with pytest.raises((OSError, HttpResponseError), match="range"):
            store.fs.cat_file(path.path, start=0, end=16)


def test_missing_bucket_is_file_not_found(store):
    missing = Store(store.protocol, f"{store.protocol}://thresher-no-such-bucket", store.storage_options)
    with pytest.raises(FileNotFoundError):
        missing.path("a.jpg").read_bytes()
    with pytest.raises(FileNotFoundError):
        missing.fs.ls("thresher-no-such-bucket")
    # Listing recursively is where the backends part: an empty answer from adlfs, an error elsewhere.
    if store.protocol == "az":
        assert missing.fs.find("thresher-no-such-bucket", detail=True) == {}
    else:
        with pytest.raises(FileNotFoundError):
            missing.fs.find("thresher-no-such-bucket", detail=True)


def test_a_missing_prefix_lists_as_empty(store):
    store.path("there.txt").write_text("x")
    assert store.fs.find(store.path("nothing-here").path, detail=True) == {}


def test_azurite_rejects_a_wrong_account_key(azure_store, azurite_endpoint):
    azure_store.path("a.txt").write_text("x")
    wrong_key = AZURITE_KEY[:-8] + "AAAAAAA="
    wrong = fsspec.filesystem(
        "az", connection_string=azurite_connection_string(azurite_endpoint, wrong_key), skip_instance_cache=True
    )
    with pytest.raises(HttpResponseError, match="AuthorizationFailure"):
        wrong.cat_file(azure_store.path("a.txt").path)


def test_s3_lists_past_one_page(s3_store):
    names = [f"deep/{i % 7}/{i:05d}.bin" for i in range(1001)]  # S3 answers at most 1000 keys a page
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: s3_store.fs.pipe_file(s3_store.path(name).path, b"x"), names))
    s3_store.fs.invalidate_cache()
    assert len(s3_store.fs.find(s3_store.path("deep").path, detail=True)) == 1001


def test_storage_options_hold_no_secret_and_env_alone_authenticates_another_process(store):
    store.path("x.txt").write_text("from the test")
    assert not any(secret in repr(store.storage_options) for secret in store.env.values())
    path = f"UPath({store.url!r}, **{store.storage_options!r}).joinpath('x.txt')"
    code = f"from upath import UPath; print({path}.read_text())"
    others = {k: v for k, v in os.environ.items() if k not in store.env}
    with_env = subprocess.run(
        [sys.executable, "-c", code], env=others | store.env, capture_output=True, text=True, timeout=120
    )
    assert with_env.stdout.strip() == "from the test", with_env.stderr
    if store.protocol in ("s3", "az"):  # the GCS emulator takes anonymous requests
        without = subprocess.run([sys.executable, "-c", code], env=others, capture_output=True, text=True, timeout=120)
        assert without.returncode != 0
        assert {"s3": "NoCredentialsError", "az": "connection_string"}[store.protocol] in without.stderr


@pytest.fixture(scope="module")
def dask_worker_process():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def test_a_dask_worker_process_reads_a_pickled_upath_with_exported_credentials(store, dask_worker_process):
    path = store.path("sub", "y.bin")
    path.write_bytes(b"\x00\x01 worker")
    with Client(dask_worker_process) as client:
        client.run(lambda names: [os.environ.pop(name, None) for name in names], list(store.env))
        export_env(dask_worker_process, store.env)
        assert client.submit(lambda p: p.read_bytes(), pickle.loads(pickle.dumps(path))).result() == b"\x00\x01 worker"


@pytest.mark.parametrize(
    "options",
    [{}, {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}],
    ids=["default-retries", "standard-retries"],
)
def test_s3fs_retries_absorb_throttling_errors_and_dropped_connections(
    flaky_s3_store, s3_store, s3_fault_proxy, options, tmp_path
):
    flaky = Store("s3", flaky_s3_store.url, flaky_s3_store.storage_options | options, flaky_s3_store.env)
    files = {f"part_{i % 2}/{i}.bin": os.urandom(500 + i) for i in range(6)}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    root = flaky.upload(tmp_path, "in")
    large = os.urandom(11 * 2**20)  # three parts of a multipart upload
    with flaky.fs.open(flaky.path("large.bin").path, "wb", block_size=5 * 2**20) as file:
        file.write(large)

    flaky.fs.invalidate_cache()
    listing = flaky.fs.find(root.path, detail=True)
    assert sorted(name.removeprefix(root.path + "/") for name in listing) == sorted(files)
    for name, data in files.items():
        assert (root / name).read_bytes() == data
        assert flaky.fs.cat_file(f"{root.path}/{name}", start=100, end=300) == data[100:300]
    assert flaky.fs.cat_file(flaky.path("large.bin").path, start=2**20, end=2**20 + 10) == large[2**20 : 2**20 + 10]
    assert s3_store.path("large.bin").read_bytes() == large  # read around the proxy: what landed is whole
    assert set(s3_fault_proxy.injected) == set(FAULTS) and len(s3_fault_proxy.injected) >= 8


def test_without_botocore_retries_a_throttled_head_request_fails(s3_store, s3_endpoint):
    """The control for the test above: s3fs's own retries recognise SlowDown by the error body,
    which a HEAD answer has none of; it is botocore's retries that absorb it."""
    s3_store.path("a.txt").write_text("x")
    with running(FaultProxy(s3_endpoint, every=2, faults=("slowdown",))) as proxy:
        fs = fsspec.filesystem("s3", endpoint_url=proxy.endpoint, config_kwargs={"retries": {"max_attempts": 0}})
        fs.info(s3_store.path("a.txt").path)  # request 1 passes
        with pytest.raises(OSError, match="Service Unavailable"):
            fs.info(s3_store.path("a.txt").path)  # request 2 is throttled
    assert proxy.injected == ["slowdown"]
