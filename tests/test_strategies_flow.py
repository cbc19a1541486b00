"""End to end: selection_config's strategies on real files with Lightly-format predictions, through
the CLI on a real Prefect server and Dask cluster; the seed example's selection_config verbatim;
and the same inputs from an S3 bucket (moto)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from flows.cli import main
from tasks.image_metadata import image_metadata
from tests.images import picture, save

pytestmark = pytest.mark.usefixtures("prefect_server")

FAST = ["lightly.model.name=resnet-18", "lightly.collate.input_size=32", "n_example_images=2"]
N_A, N_B, N_BLURRED, N_SELECT = 54, 6, 6, 12
NIGHT = {f"img_{i:03d}.jpg" for i in range(8, N_A, 9)}  # six of class a, by their custom metadata


def entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(np.clip(p, 1e-12, 1))).sum() / np.log(len(p)))


def write_dataset(root: Path) -> dict:
    """A 90/10 split of two classes (by their predictions), blurred copies of six images, one sample
    each with a missing and a malformed prediction file, and six night images by their custom
    metadata (the others take the schema's default). Returns what the test checks against."""
    rng = np.random.default_rng(0)
    metadata = root / ".lightly" / "metadata"
    metadata.mkdir(parents=True)
    night = {"name": "Night", "path": "scene.night", "defaultValue": False, "valueDataType": "CATEGORICAL_BOOLEAN"}
    (metadata / "schema.json").write_text(json.dumps([night]))
    for name in NIGHT:
        (metadata / f"{name[:-4]}.json").write_text(
            json.dumps({"type": "image", "metadata": {"scene": {"night": True}}})
        )
    tasks = root / ".lightly" / "predictions"
    (tasks / "kind").mkdir(parents=True)
    (tasks / "tasks.json").write_text(json.dumps(["kind"]))
    schema = {"task_type": "classification", "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}
    (tasks / "kind" / "schema.json").write_text(json.dumps(schema))
    truth, sharpness = {}, {"sharp": [], "blurred": []}
    for i in range(N_A + N_B + N_BLURRED):
        if i < N_A + N_B:
            name, image = f"img_{i:03d}.jpg", picture(i)
        else:  # a blurred copy of an earlier image
            name, image = f"blur_{i:03d}.jpg", picture(i - N_A - N_B).filter(ImageFilter.GaussianBlur(3))
        save(image, root / name, format="JPEG", quality=95)
        measured = image_metadata(Image.open(root / name).convert("RGB"))["sharpness"]
        sharpness["blurred" if name.startswith("blur") else "sharp"].append(measured)
        label = int(N_A <= i < N_A + N_B)
        confidence = rng.uniform(0.5, 1.0)
        p = np.array([confidence, 1 - confidence] if label == 0 else [1 - confidence, confidence])
        truth[name] = (label, entropy(p))
        prediction = {"predictions": [{"category_id": int(np.argmax(p)), "probabilities": p.round(6).tolist()}]}
        (tasks / "kind" / f"{name.rsplit('.', 1)[0]}.json").write_text(json.dumps(prediction))
    (tasks / "kind" / "img_001.json").unlink()
    (tasks / "kind" / "img_002.json").write_text("{not json")
    threshold = (max(sharpness["blurred"]) + min(sharpness["sharp"])) / 2
    assert max(sharpness["blurred"]) < threshold < min(sharpness["sharp"])
    return {"truth": truth, "threshold": threshold}


def strategies_form(threshold: float) -> dict:
    return {
        "n_samples": N_SELECT,
        "strategies": [
            {
                "input": {"type": "METADATA", "key": "lightly.sharpness"},
                "strategy": {"type": "THRESHOLD", "threshold": threshold, "operation": "BIGGER"},
            },
            {
                "input": {"type": "PREDICTIONS", "task": "kind", "name": "CLASS_DISTRIBUTION"},
                "strategy": {"type": "BALANCE", "target": {"a": 0.5, "b": 0.5}},
            },
            {
                "input": {"type": "SCORES", "task": "kind", "score": "uncertainty_entropy"},
                "strategy": {"type": "WEIGHTS", "strength": 1.0},
            },
            {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}},
            {
                "input": {"type": "METADATA", "key": "scene.night"},
                "strategy": {"type": "THRESHOLD", "threshold": 0.5, "operation": "SMALLER"},
            },
        ],
    }


def run(input_dir: str, out: Path, name: str, *overrides: str) -> dict:
    # An in-process cluster: it shares this process's environment, where the S3 fixture put its credentials.
    code = main(
        ["run", "dask.cluster=local-threads", f"input_dir={input_dir}", f"output_dir={out}",
         f"run_directory={name}", f"shared_dir={out}", *FAST, *overrides]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / name / "report.json").read_text())
    return {"sampled": (out / name / "filenames" / "sampled_filenames.txt").read_text().split(), "report": report}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("strategies")
    planted = write_dataset(root / "in")
    form = json.dumps(strategies_form(planted["threshold"]))
    result = run(str(root / "in"), root / "out", "local", f"selection_config={form}")
    return {**result, **planted, "root": root, "form": form}


def test_threshold_balance_and_weights_do_what_they_say(local_run):
    sampled, truth = local_run["sampled"], local_run["truth"]
    assert len(sampled) == N_SELECT
    assert not [name for name in sampled if name.startswith("blur")]  # THRESHOLD on lightly.sharpness
    assert not NIGHT & set(sampled)  # THRESHOLD on custom metadata
    share_b = np.mean([truth[name][0] for name in sampled])
    assert abs(share_b - 0.5) <= 0.05  # BALANCE: from 90/10 to within 5 points of 50/50
    unscored = {"img_001.jpg", "img_002.jpg"}
    candidates = [name for name in truth if not name.startswith("blur") and name not in unscored | NIGHT]
    selected_entropy = np.mean([truth[name][1] for name in sampled if name in candidates])
    assert selected_entropy > np.mean([truth[name][1] for name in candidates])  # a random subset's expectation

    selection = local_run["report"]["selection"]
    assert selection["method"] == "selection_config"
    threshold, balance, weights, _, night = selection["strategies"]
    assert threshold["n_removed"] == N_BLURRED and threshold["input"] == "METADATA lightly.sharpness"
    assert night["n_removed"] == len(NIGHT) and night["input"] == "METADATA scene.night"
    assert balance["before"][1] < 0.15 and abs(balance["after"][1] - 0.5) <= 0.05 and balance["target"] == [0.5, 0.5]
    assert weights["mean_after"] > weights["mean_before"]
    problems = {p["filename"]: p["problem"] for p in selection["input_problems"]["examples"]}
    assert set(problems) == {"img_001.jpg", "img_002.jpg"}
    html = (local_run["root"] / "out" / "local" / "report.html").read_text()
    assert "Strategies" in html and "strategy_1.png" in html


def test_the_seed_examples_selection_configs_verbatim(tmp_path):
    """Lightly's datapool example: a first run at minimum distance 0.1, then, with more data in the
    input, a second at 0.2 that counts the pool's samples as selected."""
    (tmp_path / "in").mkdir()
    shutil.copytree("examples/images/objects", tmp_path / "in" / "objects")
    pool = ["datapool.name=pool"]
    for run_name, limit in (("first", 0.1), ("second", 0.2)):
        form = (
            '{"n_samples": 100, "strategies": [{"input": {"type": "EMBEDDINGS"}, '
            f'"strategy": {{"type": "DIVERSITY", "stopping_condition_minimum_distance": {limit}}}}}]}}'
        )
        result = run(str(tmp_path / "in"), tmp_path / "out", run_name, f"selection_config={form}", *pool)
        selection = result["report"]["selection"]
        assert selection["min_distance"] == limit and selection["strategies"][0]["type"] == "DIVERSITY"
        shutil.copytree("examples/images/textures", tmp_path / "in" / "textures", dirs_exist_ok=True)
    assert selection["stopped_by"] == "min_distance" and 0 < selection["n_selected"] < selection["n_candidates"]
    assert all(name.startswith("textures/") for name in result["sampled"])  # objects/ were processed before
    assert selection["last_pick_distance"] >= 0.2


def test_the_same_inputs_from_s3_give_the_same_selection(local_run, s3_store, tmp_path):
    s3_store.upload(local_run["root"] / "in", "in")
    result = run(
        f"{s3_store.url}/in",
        tmp_path / "out",
        "s3",
        f"storage_options.s3.endpoint_url={s3_store.storage_options['endpoint_url']}",
        f"selection_config={local_run['form']}",
    )
    assert result["sampled"] == local_run["sampled"]


def test_method_coral_weighs_coverage_by_an_active_learning_score(local_run, tmp_path):
    keys = ["method=coral", "active_learning.task_name=kind", "active_learning.score_name=uncertainty_entropy"]
    result = run(
        str(local_run["root"] / "in"), tmp_path / "out", "coral", *keys, f"stopping_condition.n_samples={N_SELECT}"
    )
    selection = result["report"]["selection"]
    assert selection["method"] == "coral" and selection["n_selected"] == N_SELECT
    _, weights = selection["strategies"]
    assert weights["input"] == "SCORES kind.uncertainty_entropy" and weights["mean_after"] > weights["mean_before"]
    scores = pq.read_table(tmp_path / "out" / "coral" / "data" / "active_learning_scores.parquet")
    assert scores.column_names == ["filenames", "kind.uncertainty_least_confidence", "kind.uncertainty_margin",
                                   "kind.uncertainty_entropy"]  # fmt: skip
    entropy_of = dict(
        zip(scores.column("filenames").to_pylist(), scores.column("kind.uncertainty_entropy").to_pylist())
    )
    assert entropy_of["img_001.jpg"] is None  # its prediction file is missing
    assert entropy_of["img_003.jpg"] == pytest.approx(local_run["truth"]["img_003.jpg"][1], abs=1e-5)
    csv = (tmp_path / "out" / "coral" / "data" / "active_learning_scores.csv").read_text().splitlines()
    assert csv[0].startswith('"filenames"') and len(csv) == 1 + len(scores)
