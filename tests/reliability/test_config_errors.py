"""Hostile configuration: every key with a wrong type, values out of range, paths that escape
shared_dir and broken embeddings files all stop before any work, with a message naming the key
or the file."""

from __future__ import annotations

import numpy as np
import pytest

from flows.cli import main
from flows.config import ConfigError
from flows.overrides import all_keys, config_from_overrides, field_help
from tasks.datapool import commit, run_rows
from tasks.decoding import check_table
from tasks.dedup import classify
from tasks.embeddings_csv import read_embeddings_csv, write_embeddings_csv

BASE = ["input_dir=in", "output_dir=out", "stopping_condition.n_samples=0.5"]


def _rejected(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        config_from_overrides([*BASE, *overrides])
    return str(error.value)


@pytest.mark.parametrize("key", all_keys())
def test_every_key_rejects_a_mapping(key):
    assert key in _rejected(f"{key}={{oops: 1}}")


@pytest.mark.parametrize("key", [k for k in all_keys() if isinstance(field_help(k)[0], (bool, int, float, tuple))])
def test_every_non_text_key_rejects_text(key):
    assert key in _rejected(f"{key}=not-a-number")


@pytest.mark.parametrize(
    "override, message",
    [
        ("stopping_condition.n_samples=-2", "use a count >= 0"),
        ("stopping_condition.n_samples=1.5", "a fraction in (0, 1]"),
        ("stopping_condition.n_samples=0.0", "a fraction in (0, 1]"),
        ("stopping_condition.min_distance=2.5", "normalised embeddings are at most 2 apart"),
        ("stopping_condition.min_distance=-0.5", "use a distance >= 0 or -1"),
        ("corruptness_check.max_pixels=0", "corruptness_check.max_pixels=0"),
        ("corruptness_check.decode_timeout=0", "corruptness_check.decode_timeout=0"),
        ("corruptness_check.corruption_threshold=1.5", "corruptness_check.corruption_threshold=1.5"),
        ("lightly.loader.batch_size=-1", "lightly.loader.batch_size=-1"),
        ("dask.shard_size=0", "dask.shard_size=0"),
        ("output_image_size=[0,5]", "height and width must be positive"),
    ],
)
def test_values_out_of_range(override, message):
    assert message in _rejected(override)


@pytest.mark.parametrize("key", ["embeddings", "checkpoint", "relevant_filenames_file"])
def test_paths_that_escape_shared_dir_stop_before_any_work(tmp_path, key):
    (tmp_path / "shared").mkdir()
    (tmp_path / "secret.csv").write_text("x")
    message = _rejected(f"shared_dir={tmp_path / 'shared'}", f"{key}=../secret.csv")
    assert f"{key}='../secret.csv' points outside shared_dir" in message
    assert "does not exist" in _rejected(f"shared_dir={tmp_path / 'shared'}", f"{key}=missing.csv")


@pytest.mark.parametrize(
    "text, message",
    [
        ("filenames,embedding_0,labels\na,1,0\nb,2\n", "not a valid CSV"),  # ragged
        ("filenames,embedding_0,labels\na,1,0\nb,2,0,9\n", "not a valid CSV"),  # ragged, the other way
        ("filenames,embedding_0,labels\na,inf,0\n", "NaN or infinite"),
        ("", "not a valid CSV"),
        ("filenames,embedding_0,labels\na,1,zero\n", "non-numeric"),
        ("filenames,embedding_0,embedding_1,labels\na,1,,0\n", "NaN or infinite"),  # a missing value
    ],
)
def test_more_broken_embeddings_files(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_embeddings_csv(tmp_path / "bad.csv")


@pytest.mark.usefixtures("prefect_server")
def test_bad_embeddings_file_and_pool_dimension_stop_the_run_with_a_message(tmp_path, dask_address, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "bad.csv").write_text("name,embedding_0,labels\na,1,0\n")
    run = [
        "run",
        f"dask.address={dask_address}",
        f"input_dir={tmp_path}",
        f"output_dir={tmp_path / 'out'}",
        f"shared_dir={shared}",
        "stopping_condition.n_samples=1",
    ]
    assert main([*run, "embeddings=bad.csv"]) == 1
    assert "header must be filenames,embedding_0" in capsys.readouterr().err

    write_embeddings_csv(shared / "eight.csv", ["a.jpg"], np.ones((1, 8), np.float32), [0])
    samples = classify(
        check_table(
            [
                {
                    "filename": "b.jpg",
                    "label": 0,
                    "size": 1,
                    "version": "0.0",
                    "content_hash": "h",
                    "width": 1,
                    "height": 1,
                    "error": None,
                }
            ]
        ),
        True,
    )
    rows = run_rows(
        str(tmp_path),
        samples,
        {"b.jpg": ("b.jpg", 1, "0.0")},
        {},
        {"b.jpg": np.ones(3, np.float32)},
        "r0",
        3,
        "embeddings-file",
    )
    commit(shared / "pool", rows, keep_history=False)
    assert main([*run, "embeddings=eight.csv", "datapool.name=pool"]) == 1
    assert "holds 3-dimensional embeddings but this run makes 8-dimensional" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.parquet")), "no work was done"
