import json

import pytest

from tfsft.config import RunConfig, build_arg_parser, config_from_args, load_config_file
from tfsft.errors import ConfigError


def test_defaults_round_trip_through_json():
    config = RunConfig()
    assert RunConfig.from_dict(json.loads(config.to_json())) == config


def test_config_is_frozen():
    config = RunConfig()
    with pytest.raises(Exception):
        config.train.learning_rate = 1.0  # type: ignore[misc]


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 3.0e-5\nnum_train_epochs: 4\ntrain_file: a.csv\n")
    args = build_arg_parser("t").parse_args(["--config", str(path), "--num_train_epochs", "2", "--no_export", "--xla"])
    config = config_from_args(args)
    assert config.train.learning_rate == pytest.approx(3e-5)
    assert config.train.num_train_epochs == 2
    assert config.data.train_file == "a.csv"
    assert config.export.export is False and config.train.xla is True


def test_saved_nested_config_is_accepted_as_config_file(tmp_path):
    config = RunConfig().replace(learning_rate=2e-5, seed=7)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert RunConfig.from_flat(load_config_file(str(path))) == config


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"learnin_rate": 1e-5}, "Unknown config key"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"learning_rate": 2.0}, "learning_rate"),
        ({"num_train_epochs": 0}, "num_train_epochs"),
        ({"strategy": "tpu"}, "strategy"),
        ({"max_seq_length": 4}, "max_seq_length"),
        ({"xla": "maybe"}, "xla"),
        ({"num_train_epochs": 1.5}, "num_train_epochs"),
    ],
)
def test_bad_values_fail_loudly(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flat(values)


def test_every_flag_has_help_text():
    parser = build_arg_parser("t")
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(str(tmp_path / "nope.json"))


def test_embedded_default_job_records_its_sample_cap():
    from tfsft.config import EMBEDDED_TRAIN_SAMPLES

    assert RunConfig().with_embedded_defaults().data.max_train_samples == EMBEDDED_TRAIN_SAMPLES
    own_file = RunConfig().replace(train_file="mine.csv")
    assert own_file.with_embedded_defaults() == own_file
    capped = RunConfig().replace(max_train_samples=500)
    assert capped.with_embedded_defaults() == capped
