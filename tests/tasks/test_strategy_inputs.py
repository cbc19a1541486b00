"""Tests of selection_config's inputs (tasks/selection/inputs.py) on real files: what each strategy gets."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from upath import UPath

from tasks.listing import InputFile
from tasks.predictions.scores import ScorerOptions
from tasks.selection.form import SelectionForm
from tasks.selection.inputs import InputSources, RunTables, check_inputs, resolve
from tasks.storage import write_parquet
from tasks.video.frames import frame_name
from tasks.video.probe import VIDEO_SCHEMA, probe_row
from tests.videos import frames, write_video

NAMES = ["day/a.jpg", "day/b.jpg", "night/c.jpg", "night/d.jpg"]


@pytest.fixture
def sources(tmp_path) -> InputSources:
    root = tmp_path / "in"
    (root / ".lightly" / "metadata").mkdir(parents=True)
    schema = [{"name": "Weather", "path": "weather", "defaultValue": "unknown", "valueDataType": "CATEGORICAL_STRING"}]
    (root / ".lightly" / "metadata" / "schema.json").write_text(json.dumps(schema))
    for name, weather in zip(NAMES, ["sun", "rain", "sun"]):
        path = root / ".lightly" / "metadata" / name.replace(".jpg", ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "image", "metadata": {"weather": weather}}))
    tasks = root / ".lightly" / "predictions"
    (tasks / "cars").mkdir(parents=True)
    (tasks / "tasks.json").write_text('["cars"]')
    categories = [{"id": 3, "name": "car"}, {"id": 7, "name": "bus"}]
    (tasks / "cars" / "schema.json").write_text(json.dumps({"task_type": "object-detection", "categories": categories}))
    for name, boxes in zip(NAMES, [[3, 3, 7], [7], [], [3]]):
        path = tasks / "cars" / name.replace(".jpg", ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = [{"category_id": c, "bbox": [1, 1, 2, 2], "score": 0.9} for c in boxes]
        path.write_text(json.dumps({"predictions": entries}))
    (tmp_path / "query.txt").write_text("night/d.jpg\nnot/there.jpg\n")
    return InputSources(UPath(root), UPath(tmp_path), seed=5, scorer=ScorerOptions())


def form(*entries: tuple[dict, dict]) -> SelectionForm:
    return SelectionForm.model_validate(
        {"n_samples": 2, "strategies": [{"input": i, "strategy": s} for i, s in entries]}
    )


def plan_of(sources: InputSources, *entries: tuple[dict, dict]):
    vectors = np.array([[1, 0], [0.8, 0.2], [0, 1], [-1, 0]], dtype=np.float32)
    selection = form(*entries)
    check_inputs(selection, sources)
    return resolve(selection, sources, NAMES, vectors, RunTables())


def test_similarity_queries_are_a_file_of_names_or_a_folder(sources):
    similar = {"type": "SIMILARITY"}
    by_file = plan_of(sources, ({"type": "EMBEDDINGS", "query": "query.txt"}, similar)).plan[0]
    assert by_file.input.query.tolist() == [[-1.0, 0.0]]
    by_folder = plan_of(sources, ({"type": "EMBEDDINGS", "query": "night"}, similar)).plan[0]
    assert by_folder.input.query.tolist() == [[0.0, 1.0], [-1.0, 0.0]]
    with pytest.raises(ValueError, match=r"strategies\[0\]: SIMILARITY query 'dusk' names no candidate"):
        plan_of(sources, ({"type": "EMBEDDINGS", "query": "dusk"}, similar))


def test_random_values_are_seeded(sources):
    weights = {"type": "WEIGHTS"}
    one = plan_of(sources, ({"type": "RANDOM"}, weights)).plan[0].input.values
    again = plan_of(sources, ({"type": "RANDOM"}, weights)).plan[0].input.values
    other = plan_of(sources, ({"type": "RANDOM", "random_seed": 6}, weights)).plan[0].input.values
    assert one.tolist() == again.tolist() != other.tolist() and ((0 <= one) & (one < 1)).all()


def test_string_metadata_are_balances_classes_and_defaults_count(sources):
    resolved = plan_of(sources, ({"type": "METADATA", "key": "weather"}, {"type": "BALANCE"}))
    scored = resolved.plan[0].input
    assert scored.class_names == ("rain", "sun", "unknown")
    assert scored.classes.argmax(axis=1).tolist() == [1, 0, 1, 2]  # d.json is missing: the default
    with pytest.raises(ValueError, match="holds strings"):
        plan_of(sources, ({"type": "METADATA", "key": "weather"}, {"type": "WEIGHTS"}))


def test_detections_give_category_counts_distributions_and_scores(sources):
    count = {"type": "PREDICTIONS", "task": "cars", "name": "CATEGORY_COUNT", "categories": ["car"]}
    resolved = plan_of(
        sources,
        (count, {"type": "WEIGHTS"}),
        ({"type": "PREDICTIONS", "task": "cars", "name": "CLASS_DISTRIBUTION"}, {"type": "BALANCE"}),
        ({"type": "SCORES", "task": "cars", "score": "object_frequency"}, {"type": "WEIGHTS"}),
    )
    counted, shares, _ = resolved.plan
    assert counted.input.values.tolist() == [2, 0, 0, 1]
    assert shares.input.class_names == ("car", "bus")
    assert shares.input.classes[0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert set(resolved.scores) >= {"cars.object_frequency", "cars.objectness_least_confidence"}
    assert resolved.problems == []
    with pytest.raises(ValueError, match="task 'cars' .* has no score 'uncertainty_margin'"):
        plan_of(sources, ({"type": "SCORES", "task": "cars", "score": "uncertainty_margin"}, {"type": "WEIGHTS"}))


def test_a_video_frame_without_metadata_of_its_own_takes_its_videos(sources, tmp_path):
    root = sources.lightly_root
    write_video(root / "clips" / "walk.mp4", frames(3))
    videos = write_parquet(
        pa.Table.from_pylist([probe_row(root, InputFile("clips/walk.mp4", 0, 1, "0"), False)], schema=VIDEO_SCHEMA),
        UPath(tmp_path / "videos.parquet"),
    )
    (root / ".lightly" / "metadata" / "clips").mkdir()
    (root / ".lightly" / "metadata" / "clips" / "walk.json").write_text(
        '{"type": "video", "metadata": {"weather": "fog"}}'
    )
    names = [frame_name("clips/walk.mp4", i, 3) for i in range(3)]
    (root / ".lightly" / "metadata" / names[1].replace(".png", ".json")).write_text(
        '{"type": "image", "metadata": {"weather": "snow"}}'
    )
    selection = form(({"type": "METADATA", "key": "weather"}, {"type": "BALANCE"}))
    plan = resolve(selection, sources, names, np.eye(3, dtype=np.float32), RunTables(videos=videos)).plan
    scored = plan[0].input
    assert [scored.class_names[i] for i in scored.classes.argmax(axis=1)] == ["fog", "snow", "fog"]
