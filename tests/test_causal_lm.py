"""--task causal_lm: reading prompt/completion and chat records, the completion-only loss labels,
generation scores, and a whole run (fit, loss before/after, greedy generations, decoder bundle)
on a tiny random Mistral checkpoint with a word-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tfsft.config import DataConfig
from tfsft.errors import ConfigError, DataError
from tfsft.tasks import IGNORED_LABEL
from tfsft.tasks.causal_lm import (
    PromptFormat,
    encode_example,
    generation_scores,
    read_causal_lm_examples,
    rouge_l,
)

WORDS = [f"w{i}" for i in range(24)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_tokenizer():
    """A word-level `tokenizers.Tokenizer` over WORDS and a few specials (<pad> 0, <s> 1, </s> 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|user|>": 4, "<|assistant|>": 5, "=": 6}
    for word in WORDS:
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"])
    return tokenizer


FORMAT = PromptFormat(eos_token_ids=(2,), bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------- reading


def test_reads_prompt_completion_and_chat_records(tmp_path):
    data = DataConfig()
    plain = read_causal_lm_examples(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}] * 2), data)
    assert plain.prompts == ["a", "a"] and plain.completions == ["b", "b"] and plain.rows == [1, 2]
    chat = read_causal_lm_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "w1"},
    ]}]), data)
    assert chat.prompts == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    assert chat.completions == ["w1"] and chat.is_chat
    renamed = read_causal_lm_examples(
        write_jsonl(tmp_path / "r.jsonl", [{"q": "a", "a": "b"}]), DataConfig(prompt_column="q", completion_column="a")
    )
    assert renamed.completions == ["b"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "row 2: no 'completion' field"),
        ([{"prompt": "a", "completion": "  "}], "row 1: empty 'completion'"),
        ([{"prompt": 3, "completion": "b"}], "row 1: 'prompt' must be a string"),
        ([{"messages": [{"role": "user", "content": "a"}]}], "row 1: the last message must be the assistant's reply"),
        ([{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}], "row 1: message 1 has role 'robot'"),
        ([{"messages": "hello"}], "row 1: messages must be a non-empty list"),
        ([{"prompt": "a", "completion": "b"}, {"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}], "mixes prompt/completion"),
    ],
)
def test_bad_records_name_the_row(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as error:
        read_causal_lm_examples(path, DataConfig())
    assert path in str(error.value)


# ------------------------------------------------------------------------------------ token layout


def test_loss_counts_only_completion_tokens_and_the_eos():
    tokenizer = word_tokenizer()
    ids, labels, truncated = encode_example(tokenizer, tokenizer.encode("w1 w2 w3 =").ids, "w4 w5", (2,), 64)
    prompt_ids = tokenizer.encode("w1 w2 w3 =").ids
    completion_ids = tokenizer.encode("w4 w5", add_special_tokens=False).ids
    assert ids.tolist() == prompt_ids + completion_ids + [2] and not truncated
    counted = labels != IGNORED_LABEL
    assert counted.sum() == len(completion_ids) + 1  # by hand: w4, w5 and the eos; no prompt token
    assert labels[counted].tolist() == completion_ids + [2]
    first = len(prompt_ids) - 1  # the last prompt position predicts the first completion token
    assert np.flatnonzero(counted).tolist() == list(range(first, first + 3))
    assert labels[-1] == IGNORED_LABEL


def test_no_second_eos_when_the_completion_holds_one_and_long_prompts_lose_their_start():
    tokenizer = word_tokenizer()
    ids, labels, _ = encode_example(tokenizer, tokenizer.encode("w1 =").ids, "w4 </s>", (2,), 64)
    assert ids.tolist().count(2) == 1
    prompt = " ".join(WORDS[:20]) + " ="
    ids, labels, truncated = encode_example(tokenizer, tokenizer.encode(prompt).ids, "w21 w22", (2,), 8)
    assert truncated and len(ids) == 8
    assert (labels != IGNORED_LABEL).sum() == 3  # the whole completion stays; the prompt keeps its end
    assert tokenizer.decode(ids.tolist()[:5]) == "w16 w17 w18 w19 ="


def test_chat_renders_with_the_template_and_trains_on_the_reply_and_its_end_of_turn():
    messages = [{"role": "user", "content": "w1 w2"}]
    assert FORMAT.prompt_text(messages) == "<|user|> w1 w2 <|assistant|> "
    completion = FORMAT.completion_text(messages, "w3")
    assert completion == "w3 </s> "
    ids, labels, _ = encode_example(
        word_tokenizer(), word_tokenizer().encode(FORMAT.prompt_text(messages)).ids, completion, (2,), 64
    )
    assert [t for t in labels if t != IGNORED_LABEL] == [word_tokenizer().token_to_id("w3"), 2]
    with pytest.raises(DataError, match="no chat template"):
        PromptFormat(eos_token_ids=(2,)).prompt_text(messages)


# -------------------------------------------------------------------------------------- metrics


def test_rouge_l_and_generation_scores_by_hand():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    # LCS of (a b c d) and (a c e) is (a c): P 2/4, R 2/3 -> F 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("", "a") == 0.0 and rouge_l("x y", "a b") == 0.0
    scores = generation_scores(["The Paris.", "blue sky"], ["paris", "red sky"])
    assert scores["exact_match"] == 0.5  # articles and punctuation dropped, as SQuAD normalises
    assert scores["token_f1"] == pytest.approx((1.0 + 0.5) / 2)


def test_causal_lm_config_defaults_and_refusals():
    from tfsft.config import RunConfig

    config = RunConfig.from_flat({"task": "causal_lm", "train_file": "x.jsonl"})
    assert config.data.max_seq_length == 512 and config.train.metric_for_best_model == "loss"
    with pytest.raises(ConfigError, match="text_column"):
        RunConfig.from_flat({"task": "causal_lm", "train_file": "x.jsonl", "text_column": "sentence"})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        RunConfig.from_flat({"task": "causal_lm", "train_file": "x.jsonl", "max_new_tokens": 0})


# ------------------------------------------------------------------------------------- whole run


def tiny_checkpoint(directory: Path, kind: str = "mistral") -> Path:
    """A 2-layer, hidden-32 random Mistral (or GPT-2) with the word tokenizer and CHAT_TEMPLATE, saved as transformers saves."""
    from transformers import MistralConfig, PreTrainedTokenizerFast

    from tfsft.modeling import tf

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(), bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    from transformers import GPT2Config, TFGPT2LMHeadModel, TFMistralForCausalLM

    tf.keras.utils.set_random_seed(0)
    if kind == "gpt2":
        model = TFGPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             eos_token_id=2, bos_token_id=1))
        model(model.dummy_inputs)
        model.save_pretrained(str(directory))
        return directory
    config = MistralConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None, max_position_embeddings=64, eos_token_id=2, bos_token_id=1,
        pad_token_id=0,
    )
    model = TFMistralForCausalLM(config)
    model(model.dummy_inputs)
    model.save_pretrained(str(directory))
    return directory


def successor_rows(count: int, seed: int):
    """`wN =` -> `w(N+1) w(N+2)`: a mapping a tiny model learns in a few epochs."""
    rng = np.random.default_rng(seed)
    for n in rng.integers(0, len(WORDS) - 2, size=count):
        yield {"prompt": f"{WORDS[n]} =", "completion": f"{WORDS[n + 1]} {WORDS[n + 2]}"}


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    from tfsft.config import RunConfig
    from tfsft.pipeline import finetune

    root = tmp_path_factory.mktemp("causal")
    checkpoint = tiny_checkpoint(root / "checkpoint")
    train = write_jsonl(root / "train.jsonl", successor_rows(240, 0))
    validation = write_jsonl(root / "validation.jsonl", successor_rows(16, 1))
    config = RunConfig.from_flat(dict(
        task="causal_lm", model_name_or_path=str(checkpoint), train_file=train, validation_file=validation,
        output_dir=str(root / "run"), num_train_epochs=12, learning_rate=1e-2, per_device_train_batch_size=16,
        max_seq_length=32, max_generate_samples=8, max_new_tokens=4, warmup_ratio=0.05,
    ))
    result = finetune(config, verbose=0)
    return result


def test_run_learns_the_completions_and_reports_loss_before_and_after(causal_run):
    metrics = causal_run.metrics
    assert metrics["eval_loss"] < 0.5 * metrics["eval_loss_initial"]
    assert metrics["eval_perplexity"] == pytest.approx(np.exp(metrics["eval_loss"]))
    assert metrics["eval_tokens"] == 16 * 3  # two words and the eos per validation completion
    assert metrics["eval_generated_samples"] == 8
    assert metrics["eval_token_f1"] >= 0.75 and 0 <= metrics["eval_exact_match"] <= 1
    assert metrics["train_tokens_per_s"] > 0
    rows = [json.loads(line) for line in (causal_run.run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"prompt", "reference", "generation"}


def test_run_exports_a_decoder_bundle_through_the_parity_gate(causal_run):
    bundle = causal_run.run_dir / "onnx"
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["task"] == "causal_lm" and meta["inputs"] == ["input_ids", "attention_mask", "position_ids"]
    assert meta["prompt_format"]["eos_token_ids"] == [2] and meta["prompt_format"]["chat_template"] == CHAT_TEMPLATE
    assert meta["max_new_tokens"] == 4 and set(meta["files"]) == {"model", "int8"}
    report = json.loads((bundle / "export_report.json").read_text())
    assert report["fp32"]["greedy_identical"] == report["fp32"]["greedy_prompts"] == 8
    assert report["fp32"]["prefill_max_abs_diff"] < 1e-4


def test_reexport_and_reevaluate_a_finished_run(causal_run, tmp_path):
    from tfsft.pipeline import evaluate_run, export_finished_run

    report = export_finished_run(causal_run.run_dir)
    assert report["fp32"]["greedy_identical"] == report["fp32"]["greedy_prompts"]
    other = write_jsonl(tmp_path / "other.jsonl", successor_rows(6, 7))
    metrics = evaluate_run(str(causal_run.run_dir), other)
    assert metrics["eval_samples"] == 6 and "eval_token_f1" in metrics
    assert (causal_run.run_dir / "evaluations" / "other" / "generations.jsonl").is_file()


def test_predictor_generates_what_evaluation_generated(causal_run):
    """The bundle's TF-free Predictor, greedy over the ONNX cache, reproduces the run's own Keras
    generations (generations.jsonl) from the same rendered prompts."""
    from tfsft.inference import Predictor

    rows = [json.loads(line) for line in (causal_run.run_dir / "generations.jsonl").read_text().splitlines()]
    predictor = Predictor(causal_run.run_dir / "onnx")
    generated = predictor.generate([row["prompt"] for row in rows])
    assert [g.text for g in generated] == [row["generation"] for row in rows]


def test_lora_trains_only_the_adapters_of_a_language_model(tmp_path):
    """--lora_rank on a decoder: q/v adapters train, the embeddings and the pretrained output layer do
    not (PEFT's CAUSAL_LM); the run saves the adapters only and still exports through the gate."""
    from tfsft.config import RunConfig
    from tfsft.pipeline import finetune

    checkpoint = tiny_checkpoint(tmp_path / "checkpoint")
    result = finetune(RunConfig.from_flat(dict(
        task="causal_lm", model_name_or_path=str(checkpoint), train_file=write_jsonl(tmp_path / "t.jsonl", successor_rows(64, 0)),
        validation_file=write_jsonl(tmp_path / "v.jsonl", successor_rows(8, 1)), output_dir=str(tmp_path / "run"),
        num_train_epochs=2, learning_rate=1e-2, per_device_train_batch_size=16, max_seq_length=32, max_generate_samples=2,
        max_new_tokens=3, lora_rank=4, lora_targets="q_proj,v_proj",
    )), verbose=0)
    # by hand, per layer: q 32->32 (A 32x4, B 4x32) and v 32->16 (A 32x4, B 4x16) = 256 + 192; two layers
    assert result.metrics["trainable_parameters"] == 2 * (256 + 192)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_initial"]
    saved = json.loads((result.run_dir / "model" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == []
    parity = json.loads((result.run_dir / "onnx" / "export_report.json").read_text())["fp32"]
    assert parity["greedy_identical"] == parity["greedy_prompts"] == 8


def test_a_gpt2_checkpoint_trains_and_exports_the_same_way(tmp_path):
    from tfsft.config import RunConfig
    from tfsft.pipeline import finetune

    checkpoint = tiny_checkpoint(tmp_path / "checkpoint", kind="gpt2")
    result = finetune(RunConfig.from_flat(dict(
        task="causal_lm", model_name_or_path=str(checkpoint), train_file=write_jsonl(tmp_path / "t.jsonl", successor_rows(96, 0)),
        validation_file=write_jsonl(tmp_path / "v.jsonl", successor_rows(8, 1)), output_dir=str(tmp_path / "run"),
        num_train_epochs=4, learning_rate=1e-2, per_device_train_batch_size=16, max_seq_length=32, max_generate_samples=4,
        max_new_tokens=3,
    )), verbose=0)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_initial"]
    meta = json.loads((result.run_dir / "onnx" / "bundle.json").read_text())
    assert meta["model_type"] == "gpt2" and meta["max_seq_length"] == 64
    parity = json.loads((result.run_dir / "onnx" / "export_report.json").read_text())["fp32"]
    assert parity["greedy_identical"] == parity["greedy_prompts"] == 8
