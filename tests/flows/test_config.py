import json
import logging
import re

import pytest
import yaml

from flows.cli import keys_help
from flows.config import ConfigError, SecretStr
from flows.overrides import all_keys, config_from_overrides, dump_config, overrides_of, parse_overrides
from flows.validation import validate_config

BASE = ["input_dir=in", "output_dir=out"]


def test_lightly_defaults_and_types():
    config = config_from_overrides([*BASE, "stopping_condition.n_samples=0.3"])
    assert config.method == "typical_coreset" and config.enable_corruptness_check and config.remove_exact_duplicates
    assert config.lightly.loader.batch_size == 16 and config.lightly.collate.input_size == 64
    assert config.n_example_images == 6 and config.memory_requirement_in_GB == 2
    assert config_from_overrides([*BASE, "stopping_condition.n_samples=1."]).stopping_condition.n_samples == 1.0
    assert isinstance(
        config_from_overrides([*BASE, "stopping_condition.n_samples=1"]).stopping_condition.n_samples, int
    )
    assert config_from_overrides(
        [*BASE, "stopping_condition.n_samples=5", "output_image_size=[32,48]"]
    ).output_image_size == (32, 48)


def test_embedding_batches_hold_at_least_32_images_of_64_px():
    from flows.options import embed_options

    def batch(*overrides: str) -> int:
        return embed_options(config_from_overrides([*BASE, "stopping_condition.n_samples=1", *overrides]), 1).batch_size

    assert batch() == 32 and batch("lightly.collate.input_size=32") == 128
    assert batch("lightly.loader.batch_size=100") == 100 and batch("lightly.collate.input_size=224") == 16


def test_unknown_key_names_the_nearest_valid_keys():
    with pytest.raises(
        ConfigError, match=r"Unknown key 'stopping_condition.n_sample'. Did you mean: stopping_condition.n_samples"
    ):
        parse_overrides([*BASE, "stopping_condition.n_sample=3"])
    with pytest.raises(ConfigError, match="Did you mean: lightly.loader.batch_size"):
        parse_overrides(["lightly.loader.batchsize=3"])
    with pytest.raises(ConfigError, match="not a key=value override"):
        parse_overrides(["input_dir"])


@pytest.mark.parametrize(
    "key, suggested",
    [
        # close by the last part only: full keys, each once, the closest part first
        ("object_level.name", ["datapool.name", "lightly.model.name", "active_learning.task_name"]),
        ("foo.bar.n_samples", ["stopping_condition.n_samples"]),
    ],
)
def test_unknown_key_hints_name_full_keys_once(key, suggested):
    with pytest.raises(ConfigError) as error:
        parse_overrides([*BASE, f"{key}=3"])
    hint = str(error.value).split("Did you mean: ", 1)[1].split("?", 1)[0].split(", ")
    assert hint[: len(suggested)] == suggested
    assert len(hint) == len(set(hint)) and all(name in all_keys() for name in hint), hint


@pytest.mark.parametrize(
    "override, message",
    [
        ("stopping_condition.n_samples=abc", "stopping_condition.n_samples='abc'"),
        ("stopping_condition.n_samples=1.5", "a float must be a fraction in (0, 1]"),
        ("stopping_condition.n_samples=-3", "use a count >= 0"),
        ("stopping_condition.min_distance=2.5", "normalised embeddings are at most 2 apart"),
        ("method=kmeans", "method='kmeans': Input should be 'typical_coreset', 'coreset', 'random' or 'coral'"),
        ("n_example_images=3", "must be an even number"),
        ("output_image_size=0", "output_image_size=0"),
        ("lightly.trainer.precision=8", "lightly.trainer.precision=8"),
        ("datapool.name=../up", "datapool.name='../up': String should match pattern"),
    ],
)
def test_bad_values_name_key_and_value(override, message):
    extra = [] if "stopping_condition" in override else ["stopping_condition.n_samples=0.5"]
    with pytest.raises(ConfigError) as error:
        config_from_overrides([*BASE, *extra, override])
    assert message in str(error.value)


def test_a_stopping_condition_is_required():
    with pytest.raises(ConfigError, match="Set a stopping condition"):
        config_from_overrides(BASE)


@pytest.mark.parametrize("value", [-2, 0.0, 1.5, -0.5, float("nan"), None])
def test_n_samples_rejects(value):
    with pytest.raises(ConfigError, match=r"stopping_condition\.n_samples.*" + repr(value)[:3]):
        validate_config({"input_dir": "x", "output_dir": "y", "stopping_condition": {"n_samples": value}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=random", "stopping_condition.min_distance=0.5"], "min_distance needs method=coreset"),
        (["stopping_condition.min_distance=.nan", "normalize_embeddings=False"], "=nan: use a distance >= 0"),
        (["stopping_condition.min_distance=.inf", "normalize_embeddings=False"], "=inf: use a distance >= 0"),
    ],
)
def test_stopping_rules_span_keys_and_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_overrides([*BASE, *overrides])


def test_minus_one_means_not_set():
    stop = config_from_overrides([*BASE, "stopping_condition.n_samples=0.3"]).stopping_condition
    assert (stop.n_samples, stop.min_distance, stop.samples, stop.radius) == (0.3, -1, 0.3, None)
    stop = config_from_overrides([*BASE, "stopping_condition.min_distance=0"]).stopping_condition
    assert (stop.n_samples, stop.samples, stop.radius) == (-1, None, 0.0)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="output_dir: required"):
        config_from_overrides(["input_dir=x", "stopping_condition.n_samples=3"])


def test_cloud_only_keys_are_accepted_and_explained(caplog):
    with caplog.at_level(logging.WARNING):
        config = config_from_overrides([*BASE, "stopping_condition.n_samples=3", "token=SECRET", "upload_dataset=True"])
    assert "token is accepted but not applicable" in caplog.text
    assert "upload_dataset is accepted but not applicable" in caplog.text
    assert "SECRET" not in dump_config(config) and "SECRET" not in " ".join(overrides_of(config))


def test_overrides_rebuild_the_same_config():
    config = config_from_overrides(
        [
            *BASE,
            "stopping_condition.min_distance=0.2",
            "output_image_size=[3,4]",
            "lightly.collate.input_size=32",
            "dump_dataset=True",
        ]
    )
    assert validate_config(parse_overrides(overrides_of(config))) == config.model_copy(update={"token": SecretStr("")})
    assert yaml.safe_load(dump_config(config))["stopping_condition"]["min_distance"] == 0.2


def test_paths_must_stay_inside_shared_dir(tmp_path):
    (tmp_path / "emb.csv").write_text("x")
    config = config_from_overrides([*BASE, f"shared_dir={tmp_path}", "stopping_condition.n_samples=3"])
    assert config.shared_path("emb.csv", "embeddings") == tmp_path / "emb.csv"
    with pytest.raises(ConfigError, match="points outside shared_dir"):
        config.shared_path("../etc/passwd", "embeddings")
    with pytest.raises(ConfigError, match="does not exist"):
        config.shared_path("nope.csv", "checkpoint")


def test_help_lists_every_key_with_default():
    text = keys_help()
    for key in all_keys():
        assert f"  {key} " in text
    assert "stopping_condition.n_samples = -1" in text
    assert "  input_dir (required)" in text and "  output_dir (required)" in text
    assert "Undefined" not in text


# The seed example's selection_config (Lightly's datapool page), verbatim.
SEED_FORM = {
    "n_samples": 100,
    "strategies": [
        {
            "input": {"type": "EMBEDDINGS"},
            "strategy": {"type": "DIVERSITY", "stopping_condition_minimum_distance": 0.1},
        }
    ],
}


def test_selection_config_as_json_yaml_or_a_shared_file(tmp_path):
    (tmp_path / "form.yaml").write_text(yaml.safe_dump(SEED_FORM))
    given = [
        f"selection_config={json.dumps(SEED_FORM)}",
        "selection_config={n_samples: 100, strategies: [{input: {type: EMBEDDINGS}, strategy: "
        "{type: DIVERSITY, stopping_condition_minimum_distance: 0.1}}]}",
        "selection_config=@form.yaml",
    ]
    forms = [config_from_overrides([*BASE, f"shared_dir={tmp_path}", item]).selection_config for item in given]
    assert forms[0] == forms[1] == forms[2]
    assert forms[0].samples == 100 and forms[0].min_distance == 0.1
    config = config_from_overrides([*BASE, f"selection_config={json.dumps(SEED_FORM)}"])
    assert validate_config(parse_overrides(overrides_of(config))) == config.model_copy(update={"token": SecretStr("")})


def strategy(input_: dict, strategy_: dict) -> dict:
    return {"input": input_, "strategy": strategy_}


DIVERSE = strategy({"type": "EMBEDDINGS"}, {"type": "DIVERSITY"})


@pytest.mark.parametrize(
    "form, message",
    [
        ({"n_samples": 5, "strategies": []}, "selection_config.strategies=[]: List should have at least 1 item"),
        (
            {"n_samples": 5, "strategies": [strategy({"type": "EMBEDDINGS"}, {"type": "DIVERSE"})]},
            "selection_config.strategies[0].strategy={'type': 'DIVERSE'}: Input tag 'DIVERSE'",
        ),
        (
            {"n_samples": 5, "strategies": [DIVERSE, strategy({"type": "SCORES"}, {"type": "WEIGHTS"})]},
            "selection_config.strategies[1].input.task: required",
        ),
        (
            {"n_samples": 5, "strategies": [strategy({"type": "EMBEDDINGS"}, {"type": "DIVERSITY", "strength": "a"})]},
            "selection_config.strategies[0].strategy.strength='a': Input should be a valid number",
        ),
        (
            {"n_samples": 5, "strategies": [strategy({"type": "METADATA", "key": "x"}, {"type": "DIVERSITY"})]},
            "DIVERSITY cannot use input METADATA; it takes EMBEDDINGS",
        ),
        ({"strategies": [DIVERSE]}, "set n_samples or proportion_samples, or a strategy's stopping condition"),
        ({"n_samples": 5, "strategies": [DIVERSE, DIVERSE]}, "strategies[1]: one DIVERSITY strategy at most"),
        (
            {"n_samples": 5, "strategies": [strategy({"type": "EMBEDDINGS"}, {"type": "SIMILARITY"})]},
            "SIMILARITY needs input.query",
        ),
        (
            {
                "n_samples": 5,
                "strategies": [
                    strategy(
                        {"type": "METADATA", "key": "weather"},
                        {"type": "THRESHOLD", "threshold": 1, "operation": "BIGGER"},
                    )
                ],
            },
            "selection_config.strategies[0].input.key='weather' is not in",
        ),
        (
            {
                "n_samples": 5,
                "strategies": [strategy({"type": "METADATA", "key": "lightly.blur"}, {"type": "WEIGHTS"})],
            },
            "selection_config.strategies[0].input.key='lightly.blur': the lightly.* keys are lightly.sharpness",
        ),
        (
            {
                "n_samples": 5,
                "strategies": [strategy({"type": "SCORES", "task": "t", "score": "s"}, {"type": "WEIGHTS"})],
            },
            ".lightly/predictions/tasks.json does not exist",
        ),
        (
            {"n_samples": 5, "strategies": [strategy({"type": "METADATA", "key": "lightly.snr"}, {"type": "BALANCE"})]},
            None,
        ),
    ],
)
def test_bad_selection_configs_name_the_strategy_and_key(form, message):
    override = f"selection_config={json.dumps(form)}"
    if message is None:  # BALANCE defaults to a uniform target: valid
        assert (
            config_from_overrides([*BASE, override]).selection_config.strategies[0].strategy.distribution == "UNIFORM"
        )
        return
    with pytest.raises(ConfigError) as error:
        config_from_overrides([*BASE, override])
    assert message in str(error.value)


def test_selection_config_replaces_the_plain_keys(tmp_path):
    form = f"selection_config={json.dumps(SEED_FORM)}"
    for plain in ("stopping_condition.n_samples=3", "method=coreset"):
        with pytest.raises(ConfigError, match="selection_config replaces method and stopping_condition"):
            config_from_overrides([*BASE, form, plain])
    with pytest.raises(ConfigError, match=r"selection_config='@nope.yaml'.*does not exist"):
        config_from_overrides([*BASE, f"shared_dir={tmp_path}", "selection_config=@nope.yaml"])
    with pytest.raises(ConfigError, match="method=coral weighs samples by a prediction task"):
        config_from_overrides([*BASE, "method=coral", "stopping_condition.n_samples=3"])


def test_a_prediction_task_or_category_that_does_not_exist_stops_before_any_work(tmp_path):
    tasks = tmp_path / ".lightly" / "predictions"
    (tasks / "kind").mkdir(parents=True)
    (tasks / "tasks.json").write_text('["kind"]')
    (tasks / "kind" / "schema.json").write_text(
        json.dumps({"task_type": "object-detection", "categories": [{"id": 0, "name": "car"}]})
    )
    scores = strategy({"type": "SCORES", "task": "weather", "score": "uncertainty_margin"}, {"type": "WEIGHTS"})
    count = strategy({"type": "PREDICTIONS", "task": "kind", "name": "CATEGORY_COUNT", "categories": ["bus"]},
                     {"type": "WEIGHTS"})  # fmt: skip
    for entry, message in (
        (scores, "selection_config.strategies[0].input.task='weather' is not in"),
        (count, "selection_config.strategies[0].input.categories: task 'kind' has no categories ['bus']"),
    ):
        form = json.dumps({"n_samples": 3, "strategies": [entry]})
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_overrides(
                ["input_dir=in", "output_dir=out", f"lightly_dir={tmp_path}", f"selection_config={form}"]
            )
