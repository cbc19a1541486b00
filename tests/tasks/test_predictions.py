import json
import math
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pytest
from upath import UPath

from tasks.predictions.formats import PREDICTIONS, Problem, TaskSchema, read_tasks
from tasks.predictions.metadata import METADATA, read_metadata
from tasks.predictions.predictions import Classifications, Detections, read_predictions
from tasks.predictions.scores import (
    ScorerOptions,
    category_count,
    class_distribution,
    classification_scores,
    scores,
    scores_table,
    write_scores_csv,
)
from tasks.video.frames import frame_name

WEATHER = {"task_type": "classification", "categories": [{"id": 0, "name": "sunny"}, {"id": 1, "name": "rainy"}]}
# Ids out of order: columns follow schema.json, not the ids.
PEOPLE = {"task_type": "object-detection", "categories": [{"id": 5, "name": "person"}, {"id": 2, "name": "car"}]}


def write(root: Path, relative: str, content) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def datasource(root: Path, tasks: dict[str, dict]) -> UPath:
    write(root, f"{PREDICTIONS}/tasks.json", list(tasks))
    for name, schema in tasks.items():
        write(root, f"{PREDICTIONS}/{name}/schema.json", schema)
    return UPath(root)


def box(category: int, bbox: list[float], score: float, probabilities: list[float] | None = None) -> dict:
    entry = {"category_id": category, "bbox": bbox, "score": score}
    return entry if probabilities is None else {**entry, "probabilities": probabilities}


def test_tasks_keep_the_schema_order_and_accept_the_older_type_key(tmp_path):
    old = {"task_description": "object-detection", "categories": PEOPLE["categories"]}
    root = datasource(tmp_path, {"weather": WEATHER, "old": old})
    tasks = read_tasks(root)
    assert tasks["weather"] == TaskSchema("weather", "classification", ("sunny", "rainy"), (0, 1))
    assert tasks["old"].category_ids == (5, 2) and tasks["old"].task_type == "object-detection"


def test_a_listed_task_without_schema_is_an_error_naming_it(tmp_path):
    root = datasource(tmp_path, {"weather": WEATHER})
    write(tmp_path, f"{PREDICTIONS}/tasks.json", ["weather", "lanes"])
    with pytest.raises(
        ValueError, match=r"task 'lanes' is listed in tasks.json, but .*/lanes/schema.json does not exist"
    ):
        read_tasks(root)
    write(tmp_path, f"{PREDICTIONS}/tasks.json", "{not json")
    with pytest.raises(ValueError, match=r"tasks.json is not valid JSON"):
        read_tasks(root)
    write(tmp_path, f"{PREDICTIONS}/tasks.json", ["weather"])
    write(tmp_path, f"{PREDICTIONS}/weather/schema.json", {"task_type": "regression", "categories": []})
    with pytest.raises(ValueError, match=r"task 'weather'.*task_type is 'regression'"):
        read_tasks(root)
    with pytest.raises(ValueError, match=r"predictions/tasks.json does not exist"):
        read_tasks(UPath(tmp_path / "empty"))


def test_classification_problems_are_reported_and_reading_goes_on(tmp_path):
    root = datasource(tmp_path, {"weather": WEATHER})
    folder = f"{PREDICTIONS}/weather"
    write(tmp_path, f"{folder}/ok.json", {"predictions": [{"category_id": 1, "probabilities": [0.3, 0.7]}]})
    write(tmp_path, f"{folder}/sub/label.json", {"predictions": [{"category_id": 1}]})
    write(tmp_path, f"{folder}/broken.json", "{oops")
    write(tmp_path, f"{folder}/unknown.json", {"predictions": [{"category_id": 7, "probabilities": [0.5, 0.5]}]})
    write(tmp_path, f"{folder}/short.json", {"predictions": [{"category_id": 0, "probabilities": [1.0]}]})
    write(tmp_path, f"{folder}/odd.json", {"predictions": [{"category_id": 0, "probabilities": [1.5, -0.5]}]})
    write(tmp_path, f"{folder}/[odd].json", {"predictions": [{"category_id": 0, "probabilities": [0.6, 0.4]}]})
    names = ["ok.jpg", "sub/label.png", "missing.png", "broken.png", "unknown.png", "short.png", "[odd].png", "odd.png"]
    found, problems = read_predictions(root, read_tasks(root)["weather"], names)
    assert isinstance(found, Classifications)
    assert found.present.tolist() == [True, True, False, False, False, False, True, False]
    np.testing.assert_allclose(found.probabilities[[0, 1, 6]], [[0.3, 0.7], [0.0, 1.0], [0.6, 0.4]])
    assert np.isnan(found.probabilities[2:6]).all()
    reasons = {problem.filename: problem.message for problem in problems}
    assert reasons["missing.png"] == "weather: no file"
    assert reasons["broken.png"].startswith("weather: not valid JSON")
    assert reasons["unknown.png"] == "weather: unknown category_id 7"
    assert reasons["short.png"] == "weather: 1 probabilities for 2 categories"
    assert reasons["odd.png"] == "weather: probabilities must lie in [0, 1]"
    assert len(problems) == 5


def test_detection_boxes_are_flat_and_bad_boxes_are_dropped_with_a_problem(tmp_path):
    root = datasource(tmp_path, {"people": PEOPLE})
    folder = f"{PREDICTIONS}/people"
    write(tmp_path, f"{folder}/a.json", {"predictions": [box(5, [0, 0, 10, 10], 0.9), box(2, [5, 5, 5, 5], 0.5)]})
    write(
        tmp_path,
        f"{folder}/b.json",
        {"predictions": [box(9, [0, 0, 1, 1], 0.5), box(5, [90, 0, 20, 10], 0.4), box(2, [0, 0, 100.2, 50], 0.3)]},
    )
    write(tmp_path, f"{folder}/c.json", {"predictions": [box(2, [1, 1, 2, 2], 0.7, [0.5, 0.5, 0.0])]})
    write(tmp_path, f"{folder}/empty.json", {"predictions": []})
    names = ["a.png", "b.png", "c.png", "empty.png", "none.png"]
    found, problems = read_predictions(
        root, read_tasks(root)["people"], names, widths=np.full(5, 100.0), heights=np.full(5, 50.0)
    )
    assert isinstance(found, Detections)
    assert found.present.tolist() == [True, True, True, True, False]
    assert found.offsets.tolist() == [0, 2, 3, 4, 4, 4]
    assert found.categories.tolist() == [0, 1, 1, 1]
    assert found.scores.tolist() == [0.9, 0.5, 0.3, 0.7]  # 0.3: the box over the edge by rounding
    assert found.boxes[1].tolist() == [5, 5, 5, 5]
    assert np.isnan(found.probabilities).all()
    assert problems == [
        Problem("b.png", "people: unknown category_id 9"),
        Problem("b.png", "people: bbox [90, 0, 20, 10] lies outside the image (100x50)"),
        Problem("c.png", "people: a box's 3 probabilities for 2 categories; the box is kept without them"),
        Problem("none.png", "people: no file"),
    ]
    # Without the image sizes the same box is kept.
    unchecked, _ = read_predictions(root, read_tasks(root)["people"], ["b.png"])
    assert unchecked.offsets.tolist() == [0, 2]


def test_classification_scores_match_hand_computed_values():
    p = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [np.nan] * 3])
    got = classification_scores(p)
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    np.testing.assert_allclose(got["uncertainty_least_confidence"][:3], [0.3 / (2 / 3), 1.0, 0.0])
    np.testing.assert_allclose(got["uncertainty_margin"][:3], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(got["uncertainty_entropy"][:3], [entropy, 1.0, 0.0], atol=1e-12)
    assert all(np.isnan(values[3]) for values in got.values())
    # One column is a binary task's first class.
    np.testing.assert_allclose(classification_scores(np.array([[0.8]]))["uncertainty_margin"], [0.4])


def detections(boxes_per_sample: list[list[tuple] | None], n_categories: int = 2) -> Detections:
    """Boxes (category column, score[, probabilities]) per sample; None: a sample without predictions."""
    flat = [b for boxes in boxes_per_sample for b in boxes or []]
    probabilities = np.full((len(flat), n_categories), np.nan)
    for i, b in enumerate(flat):
        if len(b) > 2:
            probabilities[i] = b[2]
    return Detections(
        present=np.array([boxes is not None for boxes in boxes_per_sample]),
        offsets=np.concatenate([[0], np.cumsum([len(boxes or []) for boxes in boxes_per_sample])]),
        categories=np.array([b[0] for b in flat], dtype=np.int32),
        scores=np.array([b[1] for b in flat], dtype=np.float64),
        boxes=np.zeros((len(flat), 4)),
        probabilities=probabilities,
    )


def test_detection_scores_match_hand_computed_values():
    task = TaskSchema("people", "object-detection", ("person", "car"), (5, 2))
    found = detections([[(0, 0.9), (0, 0.5), (0, 0.7), (1, 0.8, [0.6, 0.4])], [(1, 0.2, [0.5, 0.5])], []])
    got = scores(task, found, ScorerOptions(frequency_penalty=0.5, min_score=0.8))
    np.testing.assert_allclose(got["objectness_least_confidence"], [1 - 2.9 / 4, 0.8, 0.0])
    # Objects: 1 + 0.5 + 0.5 persons + 1 car = 3, 1 car = 1, none = 0; mapped from [0, 3] onto [0.8, 1].
    np.testing.assert_allclose(got["object_frequency"], [1.0, 0.8 + 0.2 / 3, 0.8])
    np.testing.assert_allclose(got["uncertainty_margin"], [1 - 0.2, 1.0, 0.0])
    np.testing.assert_allclose(got["uncertainty_least_confidence"], [0.8, 1.0, 0.0])


def test_a_sample_without_predictions_scores_nan():
    task = TaskSchema("people", "object-detection", ("person", "car"), (5, 2))
    found = detections([[(0, 0.5)], None])
    got = scores(task, found)
    assert got["object_frequency"][0] == 1.0 and np.isnan(got["object_frequency"][1])
    assert np.isnan(got["objectness_least_confidence"][1])
    assert "uncertainty_margin" not in got  # no box carries probabilities
    with pytest.raises(ValueError, match="frequency_penalty"):
        ScorerOptions(frequency_penalty=2.0)


def test_class_distributions_for_balance():
    task = TaskSchema("people", "object-detection", ("person", "car"), (5, 2))
    found = detections([[(0, 0.9), (0, 0.5), (1, 0.8)], None])
    np.testing.assert_allclose(class_distribution(task, found, "CATEGORY_COUNT")[0], [2, 1])
    np.testing.assert_allclose(class_distribution(task, found, "CLASS_DISTRIBUTION")[0], [2 / 3, 1 / 3])
    assert np.isnan(class_distribution(task, found, "CLASS_DISTRIBUTION")[1]).all()
    assert category_count(task, found, ["car"])[0] == 1.0
    with pytest.raises(ValueError, match="no categories \\['bus'\\]"):
        category_count(task, found, ["bus"])
    weather = TaskSchema("weather", "classification", ("sunny", "rainy"), (0, 1))
    probabilities = np.array([[0.3, 0.7], [np.nan, np.nan]])
    one_hot = class_distribution(weather, Classifications(np.array([True, False]), probabilities), "CLASS_DISTRIBUTION")
    assert one_hot[0].tolist() == [0.0, 1.0] and np.isnan(one_hot[1]).all()


def test_scores_table_and_csv_leave_missing_scores_empty(tmp_path):
    table = scores_table(["a.png", "b.png"], {"uncertainty_margin": np.array([0.25, np.nan])})
    assert table.column("uncertainty_margin").to_pylist() == [0.25, None]
    path = write_scores_csv(table, UPath(tmp_path / "scores.csv"))
    assert path.read_text().splitlines() == ['"filenames","uncertainty_margin"', '"a.png",0.25', '"b.png",']
    assert pa_csv.read_csv(path).num_rows == 2


def test_video_frame_predictions_are_named_like_lightly(tmp_path):
    root = datasource(tmp_path, {"weather": WEATHER})
    frame = frame_name("sub/clip.mp4", 99, 200)
    write(tmp_path, f"{PREDICTIONS}/weather/sub/clip-099-mp4.json", {"predictions": [{"category_id": 0}]})
    found, problems = read_predictions(root, read_tasks(root)["weather"], [frame])
    assert found.present.tolist() == [True] and problems == []


def test_metadata_takes_defaults_and_reports_wrong_types(tmp_path):
    write(
        tmp_path,
        f"{METADATA}/schema.json",
        [
            {"name": "T", "path": "weather.temperature", "defaultValue": 0.0, "valueDataType": "NUMERIC_FLOAT"},
            {"name": "Scene", "path": "scene", "defaultValue": "undefined", "valueDataType": "CATEGORICAL_STRING"},
            {"name": "Night", "path": "night", "defaultValue": None, "valueDataType": "CATEGORICAL_BOOLEAN"},
        ],
    )
    write(
        tmp_path,
        f"{METADATA}/a.json",
        {"type": "image", "metadata": {"weather": {"temperature": 21}, "scene": "city", "night": True}},
    )
    write(tmp_path, f"{METADATA}/b.json", {"type": "image", "metadata": {"weather": {"temperature": "warm"}}})
    write(tmp_path, f"{METADATA}/c.json", "[")
    values, problems = read_metadata(UPath(tmp_path), ["a.png", "b.png", "c.png", "d.png"])
    np.testing.assert_array_equal(values["weather.temperature"], [21.0, np.nan, 0.0, 0.0])
    assert values["scene"].tolist() == ["city", "undefined", "undefined", "undefined"]
    np.testing.assert_array_equal(values["night"], [1.0, np.nan, np.nan, np.nan])
    assert [p.filename for p in problems] == ["b.png", "c.png"]
    assert problems[0].message == "metadata weather.temperature: 'warm' is not NUMERIC_FLOAT"


def test_a_frame_without_metadata_takes_its_videos(tmp_path):
    write(
        tmp_path,
        f"{METADATA}/schema.json",
        [{"name": "C", "path": "car", "defaultValue": 0, "valueDataType": "NUMERIC_INT"}],
    )
    write(tmp_path, f"{METADATA}/sub/clip.json", {"type": "video", "metadata": {"car": 7}})
    write(tmp_path, f"{METADATA}/sub/clip-1-mp4.json", {"type": "frame", "metadata": {"car": 8}})
    frames = [frame_name("sub/clip.mp4", i, 3) for i in range(3)]
    values, problems = read_metadata(UPath(tmp_path), [*frames, "x.png"], videos=["sub/clip.mp4"] * 3 + [None])
    assert values["car"].tolist() == [7.0, 8.0, 7.0, 0.0] and problems == []


def test_predictions_and_metadata_read_from_a_bucket(s3_store, tmp_path):
    datasource(tmp_path, {"weather": WEATHER})
    for i in range(30):
        write(tmp_path, f"{PREDICTIONS}/weather/sub/{i}.json", {"predictions": [{"category_id": i % 2}]})
    write(
        tmp_path,
        f"{METADATA}/schema.json",
        [{"name": "I", "path": "i", "defaultValue": -1, "valueDataType": "NUMERIC_INT"}],
    )
    write(tmp_path, f"{METADATA}/sub/3.json", {"type": "image", "metadata": {"i": 3}})
    root = s3_store.upload(tmp_path)
    names = [f"sub/{i}.png" for i in range(31)]
    found, problems = read_predictions(root, read_tasks(root)["weather"], names)
    assert found.present.sum() == 30 and problems == [Problem("sub/30.png", "weather: no file")]
    assert scores(read_tasks(root)["weather"], found)["uncertainty_margin"][:2].tolist() == [0.0, 0.0]
    values, problems = read_metadata(root, names[:5])
    assert values["i"].tolist() == [-1, -1, -1, 3, -1] and problems == []
