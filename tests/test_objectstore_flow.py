"""End to end: the curate flow with its input, outputs, datapool and cache in buckets, on real S3, GCS
and Azure Blob protocol servers (tests/objectstores.py), through the CLI and a real Prefect server."""

import asyncio
import io
import json
import uuid
from pathlib import Path

import pytest
from lightly.utils.io import load_embeddings

from flows.cli import main
from tests.images import picture, save, truncated
from tests.objectstores import Store
from tests.videos import frames, write_video

pytestmark = pytest.mark.usefixtures("prefect_server")

# Small and fast: one in-process cluster (it shares this process's environment, where the server
# fixtures put the stores' credentials), a small model input.
FAST = [
    "dask.cluster=local-threads",
    "lightly.model.name=resnet-18",
    "lightly.collate.input_size=32",
    "n_example_images=2",
]


def _dataset(root: Path) -> None:
    for seed in range(6):
        save(picture(seed), root / "cams" / f"img_{seed}.jpg", format="JPEG", quality=90)
    (root / "cams" / "copy_of_0.jpg").write_bytes((root / "cams" / "img_0.jpg").read_bytes())
    truncated(root / "cams" / "cut.jpg", seed=7)
    (root / "empty.png").write_bytes(b"")
    write_video(root / "clips" / "walk.mp4", frames(6))


def _at(store: Store, key: str) -> str:
    """The fsspec path of `key` in the store's bucket."""
    return f"{store.url.split('://', 1)[1]}/{key}"


def _lines(store: Store, key: str) -> list[str]:
    return store.fs.cat_file(_at(store, key)).decode().splitlines()


def _json(store: Store, key: str) -> dict:
    return json.loads(store.fs.cat_file(_at(store, key)))


def _flow_run_parameters() -> list[str]:
    from prefect.client.orchestration import get_client

    async def read() -> list[str]:
        async with get_client() as client:
            return [json.dumps(run.parameters) for run in await client.read_flow_runs()]

    return asyncio.run(read())


def test_everything_in_s3_with_a_datapool_and_no_secret_in_any_output(s3_store, tmp_path, monkeypatch, capsys, caplog):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("THRESHER_TEST_S3_SECRET", secret)  # moto accepts any secret; it must reach no output
    _dataset(tmp_path / "data")
    s3_store.upload(tmp_path / "data", "in")
    s3_store.fs.pipe(
        _at(s3_store, "shared/relevant.txt"),
        b"# everything but one image\n"
        + "\n".join(
            [f"cams/img_{i}.jpg" for i in range(5)]
            + ["cams/copy_of_0.jpg", "cams/cut.jpg", "empty.png", "clips/walk.mp4"]
        ).encode(),
    )
    run = [
        "run",
        f"input_dir={s3_store.url}/in",
        f"output_dir={s3_store.url}/runs",
        f"shared_dir={s3_store.url}/shared",
        f"storage_options.s3.endpoint_url={s3_store.storage_options['endpoint_url']}",
        "storage_options.s3.secret=${THRESHER_TEST_S3_SECRET}",
        "storage_options.s3.key=${AWS_ACCESS_KEY_ID}",
        "datapool.name=pool",
        "dump_dataset=True",
        "stopping_condition.n_samples=4",
        *FAST,
    ]
    assert main([*run, "run_directory=r1", "relevant_filenames_file=relevant.txt"]) == 0

    assert _lines(s3_store, "runs/r1/filenames/corrupt_filenames.txt") == ["cams/cut.jpg", "empty.png"]
    assert _lines(s3_store, "runs/r1/filenames/duplicate_filenames.txt") == ["cams/img_0.jpg"]
    sampled = _lines(s3_store, "runs/r1/filenames/sampled_filenames.txt")
    removed = _lines(s3_store, "runs/r1/filenames/removed_filenames.txt")
    assert len(sampled) == 4 and len(sampled) + len(removed) == 5 + 6  # 5 images and 6 frames are usable
    dumped = sorted(
        p.removeprefix(_at(s3_store, "runs/r1/data/sampled/"))
        for p in s3_store.fs.find(_at(s3_store, "runs/r1/data/sampled"))
    )
    assert dumped == sorted(name.rsplit(".", 1)[0] + ".png" for name in sampled)
    csv = s3_store.fs.cat_file(_at(s3_store, "runs/r1/data/embeddings.csv"))
    (tmp_path / "embeddings.csv").write_bytes(csv)
    _, _, names = load_embeddings(str(tmp_path / "embeddings.csv"))
    assert sorted(names) == sorted(sampled + removed)
    assert s3_store.fs.cat_file(_at(s3_store, "runs/r1/report.pdf"))[:5] == b"%PDF-"
    report = _json(s3_store, "runs/r1/report.json")
    assert report["counts"]["n_input_files"] == 9 and report["job"]["run_directory"] == f"{s3_store.url}/runs/r1"
    assert s3_store.fs.exists(_at(s3_store, "shared/pool/datapool.parquet"))
    assert not s3_store.fs.exists(_at(s3_store, "shared/pool/.lock"))

    # The next night: two new images, and one old image uploaded again with the same bytes (same ETag).
    save(picture(40), tmp_path / "new" / "cams" / "img_40.jpg", format="JPEG", quality=90)
    save(picture(41), tmp_path / "new" / "cams" / "img_41.jpg", format="JPEG", quality=90)
    (tmp_path / "new" / "cams" / "img_1.jpg").write_bytes((tmp_path / "data" / "cams" / "img_1.jpg").read_bytes())
    s3_store.upload(tmp_path / "new", "in")
    assert main([*run, "run_directory=r2"]) == 0
    counts = _json(s3_store, "runs/r2/report.json")["counts"]
    # img_5 was left out of r1 by relevant_filenames_file: it is new too.
    assert counts["n_input_files"] == 3 and counts["n_skipped_processed"] == 9
    lists = {
        kind: _lines(s3_store, f"runs/r2/filenames/{kind}_filenames.txt")
        for kind in ("sampled", "removed", "duplicate", "corrupt")
    }
    assert set(lists["sampled"]) == {"cams/img_40.jpg", "cams/img_41.jpg", "cams/img_5.jpg"}, lists

    config = s3_store.fs.cat_file(_at(s3_store, "runs/r2/config/config.yaml")).decode()
    assert "${THRESHER_TEST_S3_SECRET}" in config  # the reference is recorded, not its value
    leaks = [path for path in s3_store.fs.find(_at(s3_store, "")) if secret.encode() in s3_store.fs.cat_file(path)]
    assert not leaks, f"the secret is in {leaks}"
    output = capsys.readouterr()
    assert secret not in output.out + output.err + caplog.text
    assert not [p for p in _flow_run_parameters() if secret in p], "the secret is in a flow run's parameters"


def test_a_literal_secret_in_storage_options_is_refused_before_any_work(s3_store, capsys):
    assert (
        main(
            [
                "run",
                f"input_dir={s3_store.url}/in",
                "output_dir=out",
                "stopping_condition.n_samples=2",
                "storage_options.s3.secret=plain-text-secret",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "storage_options.s3.secret" in error and "${ENV_VAR}" in error and "plain-text-secret" not in error


def test_gcs_input_with_local_outputs(gcs_store, tmp_path):
    _dataset(tmp_path / "data")
    gcs_store.upload(tmp_path / "data", "in")

    def run_args(run_directory: str) -> list[str]:
        return [
            "run",
            f"input_dir={gcs_store.url}/in",
            f"output_dir={tmp_path / 'out'}",
            f"shared_dir={tmp_path}",
            f"run_directory={run_directory}",
            f"storage_options.gs.endpoint_url={gcs_store.storage_options['endpoint_url']}",
            "storage_options.gs.token=anon",
            "stopping_condition.n_samples=3",
            *FAST,
        ]

    assert main(run_args("r")) == 0
    run = tmp_path / "out" / "r"
    assert (run / "filenames" / "corrupt_filenames.txt").read_text().splitlines() == ["cams/cut.jpg", "empty.png"]
    assert len((run / "filenames" / "sampled_filenames.txt").read_text().splitlines()) == 3
    assert json.loads((run / "report.json").read_text())["counts"]["n_input_files"] == 10
    # Its cache keys use the objects' generations: an unchanged rerun embeds nothing again.
    assert main(run_args("again")) == 0
    stages = {s["stage"]: s for s in json.loads((tmp_path / "out" / "again" / "report.json").read_text())["stages"]}
    assert stages["check_and_embed"]["items"] == 0


def test_azure_input_and_outputs_with_a_local_shared_folder(azure_store, tmp_path):
    _dataset(tmp_path / "data")
    azure_store.upload(tmp_path / "data", "in")
    assert (
        main(
            [
                "run",
                f"input_dir={azure_store.url}/in",
                f"output_dir={azure_store.url}/runs",
                f"shared_dir={tmp_path}",
                "run_directory=r",
                "stopping_condition.n_samples=3",
                "dump_dataset=True",
                *FAST,
            ]
        )
        == 0
    )
    assert _lines(azure_store, "runs/r/filenames/corrupt_filenames.txt") == ["cams/cut.jpg", "empty.png"]
    assert len(_lines(azure_store, "runs/r/filenames/sampled_filenames.txt")) == 3
    assert len(azure_store.fs.find(_at(azure_store, "runs/r/data/sampled"))) == 3
    assert azure_store.fs.cat_file(_at(azure_store, "runs/r/report.pdf"))[:5] == b"%PDF-"


def test_a_missing_bucket_and_denied_access_stop_with_the_url(s3_store, azure_store, tmp_path, monkeypatch, capsys):
    endpoint = f"storage_options.s3.endpoint_url={s3_store.storage_options['endpoint_url']}"
    assert (
        main(
            [
                "run",
                "input_dir=s3://no-such-bucket-here/in",
                f"output_dir={tmp_path / 'out'}",
                endpoint,
                "stopping_condition.n_samples=2",
                *FAST,
            ]
        )
        == 1
    )
    assert "s3://no-such-bucket-here/in" in capsys.readouterr().err

    save(picture(1), tmp_path / "in" / "a.jpg")
    assert (
        main(
            [
                "run",
                f"input_dir={tmp_path / 'in'}",
                "output_dir=s3://no-such-bucket-here/runs",
                endpoint,
                "stopping_condition.n_samples=1",
                *FAST,
            ]
        )
        == 1
    )
    error = capsys.readouterr().err
    assert "cannot write s3://no-such-bucket-here/runs/" in error and "does not exist" in error

    azure_store.upload(tmp_path / "in", "in")
    wrong = azure_store.env["AZURE_STORAGE_CONNECTION_STRING"].replace("AccountKey=", "AccountKey=AAAA")
    monkeypatch.setenv("THRESHER_TEST_WRONG_CONNECTION", wrong)
    assert (
        main(
            [
                "run",
                f"input_dir={azure_store.url}/in",
                f"output_dir={tmp_path / 'out'}",
                "storage_options.az.connection_string=${THRESHER_TEST_WRONG_CONNECTION}",
                "stopping_condition.n_samples=1",
                *FAST,
            ]
        )
        == 1
    )
    error = capsys.readouterr().err
    assert f"cannot list input_dir={azure_store.url}/in" in error and "access denied" in error


def test_throttling_errors_and_dropped_connections_are_retried_to_the_same_result(
    s3_store, flaky_s3_store, s3_fault_proxy, tmp_path
):
    _dataset(tmp_path / "data")
    s3_store.upload(tmp_path / "data", "in")

    def run(store: Store, name: str) -> list[str]:
        assert (
            main(
                [
                    "run",
                    f"input_dir={store.url}/in",
                    f"output_dir={store.url}/runs",
                    f"run_directory={name}",
                    f"shared_dir={store.url}/shared-{name}",
                    "stopping_condition.n_samples=4",
                    f"storage_options.s3.endpoint_url={store.storage_options['endpoint_url']}",
                    *FAST,
                ]
            )
            == 0
        )
        return [
            _lines(s3_store, f"runs/{name}/filenames/{kind}_filenames.txt")
            for kind in ("sampled", "removed", "duplicate", "corrupt")
        ]

    clean = run(s3_store, "clean")
    assert run(flaky_s3_store, "flaky") == clean
    assert len(s3_fault_proxy.injected) >= 10 and set(s3_fault_proxy.injected) == {"slowdown", "internal", "drop"}
    frame = s3_store.fs.cat_file(_at(s3_store, "runs/flaky/data/embeddings.csv"))
    assert frame == s3_store.fs.cat_file(_at(s3_store, "runs/clean/data/embeddings.csv"))
    assert io.BytesIO(frame).readline().startswith(b"filenames,embedding_0,")
