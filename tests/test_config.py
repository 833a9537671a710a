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
        ({"export_variants": "fused,fp16"}, "export_variants='fused,fp16'"),
        ({"export_variants": "int8,int8"}, "each once"),
        ({"export_variants": "int8", "quantize_int8": False}, "nothing is left to export"),
        ({"external_data": "sometimes"}, "external_data"),
        ({"lora_rank": -1}, "lora_rank"),
        ({"lora_rank": 8, "lora_alpha": 0}, "lora_alpha"),
        ({"lora_rank": 8, "lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_targets": "query"}, "with --lora_rank > 0"),
        ({"lora_rank": 8, "lora_targets": " , "}, "comma-separated layer names"),
    ],
)
def test_bad_values_fail_loudly(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_flat(values)


def test_export_variants_are_recorded_in_order_and_no_quantize_int8_drops_int8():
    config = RunConfig.from_flat({"export_variants": " int8, fp32 "})
    assert config.export.export_variants == "fp32,int8" and config.export.variants == ("fp32", "int8")
    assert RunConfig().export.variants == ("fused", "int8")
    assert RunConfig.from_flat({"quantize_int8": False}).export.variants == ("fused",)
    assert RunConfig.from_dict(json.loads(config.to_json())) == config


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


def parse(*flags: str) -> RunConfig:
    return config_from_args(build_arg_parser("t").parse_args(list(flags)))


def test_run_ner_column_flags_are_aliases_recorded_under_the_canonical_name():
    config = parse("--train_file", "a.jsonl", "--text_column_name", "tokens", "--label_column_name", "ner_tags")
    assert (config.data.text_column, config.data.label_column) == ("tokens", "ner_tags")
    saved = json.loads(config.to_json())
    assert saved["data"]["text_column"] == "tokens" and saved["data"]["label_column"] == "ner_tags"
    assert "text_column_name" not in config.to_json() and "label_column_name" not in config.to_json()
    assert parse("--text_column", "review").data.text_column == "review"


def test_fp16_is_an_alias_of_mixed_precision():
    assert parse("--fp16").train.mixed_precision is True
    assert parse("--mixed_precision").train.mixed_precision is True
    assert parse("--no_fp16").train.mixed_precision is False
    assert "fp16" not in parse("--fp16").to_json()


def test_alias_keys_in_a_config_file_map_to_the_canonical_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("text_column_name: tokens\nfp16: true\n")
    config = parse("--config", str(path))
    assert config.data.text_column == "tokens" and config.train.mixed_precision is True
    assert parse("--config", str(path), "--text_column", "words").data.text_column == "words"
    with pytest.raises(ConfigError, match="text_column_name.*text_column|text_column.*text_column_name"):
        RunConfig.from_flat({"text_column": "a", "text_column_name": "b"})


def boolean_flags() -> list[tuple[str, bool]]:
    from tfsft.config import _base_type, iter_fields

    defaults = dataclasses_flat(RunConfig())
    return [(name, defaults[name]) for name, _, f in iter_fields() if _base_type(f.type) is bool]


def dataclasses_flat(config: RunConfig) -> dict:
    from tfsft.config import _flatten

    return _flatten(config.to_dict())


BOOLEANS_NEED = {"adapter_files": ["--lora_rank", "4"]}
"""Flags a boolean is only valid beside (checked by the config, with both values)."""


@pytest.mark.parametrize("name, default", boolean_flags())
def test_every_boolean_takes_both_the_flag_and_its_no_form(name, default):
    base = ["--train_file", "a.csv", "--validation_file", "b.csv", *BOOLEANS_NEED.get(name, [])]
    on, off = parse(*base, f"--{name}"), parse(*base, f"--no_{name}")
    assert dataclasses_flat(on)[name] is True, name
    assert dataclasses_flat(off)[name] is False, name
    assert dataclasses_flat(parse(*base, f"--{name}", "false"))[name] is False
    assert dataclasses_flat(parse(*base, f"--{name}=True"))[name] is True
    assert dataclasses_flat(parse(*base))[name] is default


def test_a_boolean_and_its_no_form_together_is_a_one_line_flag_error(capsys):
    from tfsft.cli import ArgumentParser

    parser = build_arg_parser("t", ArgumentParser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--xla", "--no_xla"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--xla", "maybe"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--xla" in err and "maybe" in err


def test_warmup_steps_is_validated_and_recorded():
    assert parse("--warmup_steps", "7").train.warmup_steps == 7
    assert parse().train.warmup_steps is None
    assert parse("--warmup_steps", "0", "--warmup_ratio", "0.2").train.warmup_steps == 0
    with pytest.raises(ConfigError, match=r"--warmup_steps.*Received: warmup_steps=-1"):
        parse("--warmup_steps", "-1")


def test_gradient_accumulation_steps_is_validated():
    assert parse("--gradient_accumulation_steps", "4").train.gradient_accumulation_steps == 4
    assert parse().train.gradient_accumulation_steps == 1
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=0"):
        parse("--gradient_accumulation_steps", "0")
    with pytest.raises(ConfigError, match=r"--gradient_accumulation_steps.*mixed_precision"):
        parse("--gradient_accumulation_steps", "2", "--fp16")


def test_max_predict_samples_caps_the_test_file_and_max_eval_samples_validation_only(sst2_slices):
    from tfsft.data import load_splits

    files = ["--train_file", str(sst2_slices["train"]), "--validation_file", str(sst2_slices["dev"]),
             "--test_file", str(sst2_slices["dev"])]
    config = parse(*files, "--max_eval_samples", "30", "--max_predict_samples", "12")
    splits = load_splits(config.data, config.train.seed)
    assert (len(splits.validation), len(splits.test)) == (30, 12)
    config = parse(*files, "--max_eval_samples", "30")
    splits = load_splits(config.data, config.train.seed)
    assert (len(splits.validation), len(splits.test)) == (30, 200)
    with pytest.raises(ConfigError, match="max_predict_samples=0"):
        parse("--max_predict_samples", "0")


def test_cache_dir_is_the_hub_cache_and_the_token_cache_has_its_own_flag():
    config = parse("--cache_dir", "/hub", "--streaming_cache_dir", "/tokens")
    assert config.model.cache_dir == "/hub" and config.data.streaming_cache_dir == "/tokens"
    assert parse("--tokenizer_name", "bert-base-uncased").model.tokenizer_name == "bert-base-uncased"


@pytest.mark.parametrize("streaming", [True, False])
def test_an_older_runs_cache_dir_still_loads(tmp_path, streaming):
    """Runs saved before --streaming_cache_dir kept the token cache in data.cache_dir."""
    from tfsft import artifacts

    old = json.loads(RunConfig().to_json())
    del old["data"]["streaming_cache_dir"]
    del old["model"]["cache_dir"]
    old["data"].update(cache_dir="/old/tokens", streaming=streaming, train_file="t.csv", validation_file="v.csv")
    (tmp_path / "config.json").write_text(json.dumps(old))
    for config in (artifacts.read_config(tmp_path), RunConfig.from_flat(load_config_file(str(tmp_path / "config.json")))):
        assert config.model.cache_dir is None
        assert config.data.streaming_cache_dir == ("/old/tokens" if streaming else None)


@pytest.fixture
def fake_hub(monkeypatch, tiny_checkpoint):
    """Record snapshot_download calls; every repository is the tiny checkpoint."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_cache_dir_is_where_hub_downloads_go(fake_hub, tmp_path):
    from tfsft.pipeline import _open_checkpoint

    config = parse("--model_name_or_path", "some-org/tiny-bert", "--cache_dir", str(tmp_path / "hub"),
                   "--max_seq_length", "64")
    _open_checkpoint(config)
    assert [(repo, kwargs.get("cache_dir")) for repo, kwargs in fake_hub] == [("some-org/tiny-bert", str(tmp_path / "hub"))]
    fake_hub.clear()
    _open_checkpoint(parse("--model_name_or_path", "some-org/tiny-bert", "--max_seq_length", "64"))
    assert fake_hub[0][1].get("cache_dir") is None


def word_level_tokenizer(directory, words):
    """A fast tokenizer with its own small vocabulary, saved the way transformers loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.save_pretrained(str(directory))
    return directory


def test_tokenizer_name_loads_the_tokenizer_from_another_directory(tiny_checkpoint, tmp_path):
    from tfsft.pipeline import _open_checkpoint

    tokenizer_dir = word_level_tokenizer(tmp_path / "tok", ["good", "movie"])
    model_flags = ["--model_name_or_path", str(tiny_checkpoint), "--max_seq_length", "64"]
    _, _, own = _open_checkpoint(parse(*model_flags))
    _, tokenizer, other = _open_checkpoint(parse(*model_flags, "--tokenizer_name", str(tokenizer_dir)))
    assert len(tokenizer) == 6
    assert other.encode(["good movie"]).input_ids[0].tolist() == [2, 4, 5, 3]
    assert own.encode(["good movie"]).input_ids[0].tolist() != [2, 4, 5, 3]


def test_tokenizer_name_from_the_hub_uses_the_cache_dir(fake_hub, tmp_path):
    from tfsft.pipeline import _open_checkpoint

    _open_checkpoint(parse("--model_name_or_path", "some-org/model", "--tokenizer_name", "some-org/tok",
                           "--cache_dir", str(tmp_path), "--max_seq_length", "64"))
    assert [(repo, kwargs.get("cache_dir")) for repo, kwargs in fake_hub] == [
        ("some-org/model", str(tmp_path)), ("some-org/tok", str(tmp_path))]
    assert "tf_model.h5" not in fake_hub[1][1]["allow_patterns"]


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tiny_checkpoint, tmp_path):
    from tfsft.pipeline import _open_checkpoint

    small = tmp_path / "small-vocab"
    small.mkdir()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(config, vocab_size=5)))
    (small / "tf_model.h5").write_bytes(b"")
    tokenizer_dir = word_level_tokenizer(tmp_path / "tok", ["good", "movie"])
    with pytest.raises(ConfigError, match=r"--tokenizer_name.*6 tokens.*vocab_size=5.*Received: tokenizer_name="):
        _open_checkpoint(parse("--model_name_or_path", str(small), "--tokenizer_name", str(tokenizer_dir),
                               "--max_seq_length", "64"))
