"""End-to-end: the thresher CLI on real generated images, through Prefect and a real Dask cluster."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from distributed import Client
from lightly.utils.io import load_embeddings
from PIL import Image

from flows.cli import main
from flows.curate import no_heartbeats
from tests.images import dataset

pytestmark = pytest.mark.usefixtures("prefect_server")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _run(dask_address: str, *overrides: str) -> int:
    return main(["run", f"dask.address={dask_address}", *overrides])


def test_curation_writes_the_lightly_layout(tmp_path, dask_address):
    expected = dataset(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "cats" / "meta.json").write_text("{}")
    with Client(dask_address) as client:
        workers = client.run(os.getpid)
    code = _run(
        dask_address,
        f"input_dir={tmp_path / 'in'}",
        f"output_dir={tmp_path / 'out'}",
        "run_directory=run",
        "stopping_condition.n_samples=0.5",
        "dump_dataset=True",
        "output_image_size=32",
        "output_image_format=jpg",
        "token=TOPSECRET",
    )
    assert code == 0
    assert gc.get_freeze_count() == 0  # the run unfroze the objects it froze: the process collects them as before
    run = tmp_path / "out" / "run"
    with Client(dask_address) as client:
        assert client.run(os.getpid) == workers, "the workers of a cluster given by address were replaced"

    config = yaml.safe_load((run / "config" / "config.yaml").read_text())
    assert config["stopping_condition"]["n_samples"] == 0.5 and config["token"] == "***"
    assert "- stopping_condition.n_samples=0.5" in _lines(run / "config" / "overrides.yaml")

    lists = {
        name: _lines(run / "filenames" / f"{name}_filenames.txt")
        for name in ("corrupt", "duplicate", "removed", "sampled")
    }
    every = [f for files in lists.values() for f in files]
    assert sorted(every) == sorted(expected["good"] + expected["duplicate"] + expected["corrupt"])
    assert len(every) == len(set(every)), "a file is in two lists"
    assert sorted(lists["corrupt"]) == sorted(expected["corrupt"])
    assert lists["duplicate"] == expected["duplicate"]
    assert len(lists["sampled"]) == 6 and len(lists["removed"]) == 6

    info = json.loads((run / "data" / "corruptness_check_information.json").read_text())
    assert info["corrupt_samples"]["dogs/empty.png"] == "empty file (0 bytes)"
    assert info["corrupt_samples"]["cats/broken.jpg"].startswith("decoding failed")

    vectors, labels, names = load_embeddings(str(run / "data" / "embeddings.csv"))
    assert sorted(names) == sorted(expected["good"]) and vectors.shape == (12, 1280)
    assert [label for name, label in zip(names, labels) if name.startswith("dogs/")] == [1] * 6
    unit, _, unit_names = load_embeddings(str(run / "data" / "normalized_embeddings.csv"))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    _, _, selected_names = load_embeddings(str(run / "data" / "selected_embeddings.csv"))
    assert sorted(selected_names) == sorted(lists["sampled"])

    dumped = sorted(
        p.relative_to(run / "data" / "sampled").as_posix() for p in (run / "data" / "sampled").rglob("*.jpg")
    )
    assert dumped == sorted(str(Path(f).with_suffix(".jpg")) for f in lists["sampled"])
    with Image.open(run / "data" / "sampled" / dumped[0]) as image:
        assert min(image.size) == 32 and image.format == "JPEG"

    report = json.loads((run / "report.json").read_text())
    assert report["counts"] == {
        "n_input_files": 15,
        "n_corrupt": 2,
        "n_duplicate": 1,
        "n_removed": 6,
        "n_sampled": 6,
        "n_skipped_processed": 0,
        "n_dump_failed": 0,
    }
    assert report["skipped_not_images"] == {".json": 1, ".txt": 1}
    assert "1 .json, 1 .txt (skipped)" in (run / "report.html").read_text()
    distances = report["distances"]
    assert distances["after"]["pairwise"]["min"] >= distances["before"]["pairwise"]["min"]
    stages = {row["stage"]: row for row in report["stages"]}
    for stage in ("check_and_embed", "select"):
        assert stages[stage]["seconds"] > 0
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".yaml", ".txt", ".csv"}:
            assert "TOPSECRET" not in path.read_text(errors="ignore"), path


def test_selection_from_an_embeddings_file_honours_min_distance(tmp_path, dask_address):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 8))
    points = np.concatenate([c + 0.01 * rng.normal(size=(10, 8)) for c in centers]).astype(np.float32)
    names = [f"f{i:03d}.jpg" for i in range(len(points))]
    header = "filenames," + ",".join(f"embedding_{j}" for j in range(8)) + ",labels"
    rows = [f"{n}," + ",".join(f"{v:.6f}" for v in p) + ",0" for n, p in zip(names, points)]
    (tmp_path / "emb.csv").write_text("\n".join([header, *rows]) + "\n")
    code = _run(
        dask_address,
        f"input_dir={tmp_path}",
        f"output_dir={tmp_path / 'out'}",
        f"shared_dir={tmp_path}",
        "embeddings=emb.csv",
        "run_directory=r",
        "stopping_condition.min_distance=0.5",
    )
    assert code == 0
    sampled = _lines(tmp_path / "out" / "r" / "filenames" / "sampled_filenames.txt")
    assert len(sampled) == 5  # one per tight cluster: the clusters are far apart, members within 0.5
    assert len({int(name[1:4]) // 10 for name in sampled}) == 5


def test_random_selection_is_seeded(tmp_path, dask_address):
    dataset(tmp_path / "in", per_label=4)
    results = []
    for run in ("a", "b"):
        assert (
            _run(
                dask_address,
                f"input_dir={tmp_path / 'in'}",
                f"output_dir={tmp_path / 'out'}",
                f"run_directory={run}",
                "method=random",
                "stopping_condition.n_samples=3",
                "enable_corruptness_check=False",
            )
            == 0
        )
        results.append(_lines(tmp_path / "out" / run / "filenames" / "sampled_filenames.txt"))
    assert results[0] == results[1] and len(results[0]) == 3
    # without the full-decode check, broken files are still caught when embedding
    corrupt = _lines(tmp_path / "out" / "a" / "filenames" / "corrupt_filenames.txt")
    assert sorted(corrupt) == ["cats/broken.jpg", "dogs/empty.png"]


def test_training_fine_tunes_the_model_the_run_then_embeds_with(tmp_path, dask_address):
    dataset(tmp_path / "in", per_label=4)
    common = [f"input_dir={tmp_path / 'in'}", f"output_dir={tmp_path / 'out'}", "stopping_condition.n_samples=3"]
    assert _run(dask_address, *common, "run_directory=plain") == 0
    assert (
        _run(
            dask_address,
            *common,
            "run_directory=trained",
            "enable_training=True",
            "lightly.trainer.max_epochs=1",
            "lightly.loader.num_workers=2",
        )
        == 0
    )
    run = tmp_path / "out" / "trained"
    assert (run / "lightly_epoch_0.ckpt").is_file()
    assert "train" in [stage["stage"] for stage in json.loads((run / "report.json").read_text())["stages"]]
    plain, _, plain_names = load_embeddings(str(tmp_path / "out" / "plain" / "data" / "embeddings.csv"))
    trained, _, trained_names = load_embeddings(str(run / "data" / "embeddings.csv"))
    assert list(plain_names) == list(trained_names) and plain.shape == trained.shape
    assert not np.allclose(plain, trained, atol=1e-3), "the trained run embedded with the pretrained model"
    assert len(_lines(run / "filenames" / "sampled_filenames.txt")) == 3


def test_bad_input_stops_with_a_clear_message(tmp_path, capsys):
    assert main(["run", "input_dir=x", "output_dir=y", "stopping_condition.n_sampels=3"]) == 2
    assert "Did you mean: stopping_condition.n_samples" in capsys.readouterr().err
    assert (
        main(["run", f"input_dir={tmp_path / 'missing'}", f"output_dir={tmp_path}", "stopping_condition.n_samples=3"])
        == 1
    )
    assert "is not a folder" in capsys.readouterr().err


ROOT = Path(__file__).parent.parent


def _installed(*args: str, prefect_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The installed `thresher` command, without PREFECT_API_URL: it starts the shared local
    server in `prefect_home` (stopped by the prefect_home fixture). Its output as written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(prefect_home)
    thresher = Path(sys.executable).with_name("thresher")
    done = subprocess.run([str(thresher), *args], env=env, cwd=cwd, capture_output=True, timeout=900, check=False)
    # Decoded as they are: text mode would turn the progress display's carriage returns into new lines.
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def test_installed_command_reports_to_the_shared_local_server(tmp_path, prefect_home):
    """The quickstart path: no PREFECT_API_URL, a local cluster of its own, one server for all workers."""
    dataset(tmp_path / "in", per_label=3)
    result = _installed(
        "run",
        f"input_dir={tmp_path / 'in'}",
        f"output_dir={tmp_path / 'out'}",
        "run_directory=r",
        "stopping_condition.n_samples=2",
        "dump_dataset=True",
        "dask.replace_workers_after=0",
        prefect_home=prefect_home,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    from flows.server import read_state

    server = read_state()
    assert f"Prefect UI: {server.url} (started in the background" in output, output[-3000:]
    run = tmp_path / "out" / "r"
    log = (run / "log.txt").read_text()
    assert "Starting temporary server" not in log
    assert len(_lines(run / "filenames" / "sampled_filenames.txt")) == 2
    # Its own workers are replaced after embedding; the dump and the report's UMAPs run on the new ones.
    stages = json.loads((run / "report.json").read_text())["stages"]
    embed = next(s for s in stages if s["stage"] == "check_and_embed")
    assert embed["workers_replaced"] == os.cpu_count()
    assert len([p for p in (run / "data" / "sampled").rglob("*") if p.is_file()]) == 2
    assert any((run / "plots").glob("scatter_umap_k_*.png"))
    assert "Error logging to API" not in output + log


def test_readme_example_prints_a_few_lines_and_logs_the_internals(tmp_path, prefect_home):
    args = ["run", "input_dir=examples/images", "output_dir=runs", "stopping_condition.n_samples=0.3"]
    assert f"thresher {' '.join(args)}" in (ROOT / "README.md").read_text()
    args[1:3] = [f"input_dir={ROOT / 'examples' / 'images'}", f"output_dir={tmp_path / 'runs'}"]
    # Run from an empty folder: the cache (in shared_dir, the current folder) is empty, so every stage works.
    result = _installed(*args, prefect_home=prefect_home, cwd=tmp_path)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    assert console.count("\n") <= 40, console
    (run,) = (tmp_path / "runs").iterdir()
    log = (run / "log.txt").read_text()
    # The internals are in the log: Dask's, and the workers' Prefect logs (their stderr).
    assert "distributed.scheduler" in log and "Task run 'check-embed" in log
    assert "distributed" not in console and "Task run" not in console, console
    # One progress display (on stderr): a line that follows the run from stage to stage, cleared at its end.
    (progress,) = [line for line in result.stderr.split("\n") if "check_and_embed" in line]
    states = progress.split("\r")
    shown = [state.split()[0] for state in states if state.strip()]
    assert shown[:2] == ["start_cluster", "list"] and shown[-1] == "report", shown
    assert {"check_and_embed", "select", "write"} <= set(shown) and "compute efficiency" in progress
    assert states[-1].strip() == "", states[-3:]
    assert f"Results: {run}" in console and "/runs/flow-run/" in console
    assert "Removed: 1 corrupt, 1 exact duplicates, 31 not selected" in console


def test_command_line_runs_have_no_heartbeats_unless_the_setting_asks(monkeypatch):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    default = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    with no_heartbeats():
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
    assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == default is not None  # deployment runs keep them
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    with no_heartbeats():
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is not None


def test_help_lists_keys():
    thresher = Path(sys.executable).with_name("thresher")
    result = subprocess.run([str(thresher), "run", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "stopping_condition.min_distance = -1.0" in result.stdout
