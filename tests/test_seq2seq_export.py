"""Seq2seq export (tfsft.export_seq2seq: an ONNX encoder and a decoder with a cache, and its parity
gate), TF-free generation over them (tfsft.generation.Seq2SeqSession, generate_seq2seq) and the
Predictor on a seq2seq bundle, on tiny random T5, BART and Marian models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tfsft.errors import ArtifactError, ConfigError, DataError
from tfsft.export_decoder import FP32_TOLERANCE
from tfsft.generation import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Seq2SeqSession,
    generate_seq2seq,
    right_padded,
)

SOURCES = [[5, 6, 7, 8, 9, 1], [3, 4, 1], [20, 21, 22, 23, 1], [40, 41, 42, 43, 44, 45, 46, 47, 1], [10, 1],
           [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 50, 51, 1]]
NEW_TOKENS = 10
KINDS = ("t5", "bart", "marian")
WEIGHT_STD = {"t5": 0.7, "bart": 0.7, "marian": 0.7}


def tiny_model(kind: str):
    """A 2-layer, d_model-32 seq2seq model with seeded N(0, WEIGHT_STD) weights (norms at gain 1 and
    shift 0, BART's and Marian's final logits bias at 0): its greedy targets differ from source to
    source, and their top two logits stay at least 0.01 apart, where float rounding moves them by
    1e-5 at most (larger BART weights make attention so sharp that Keras' own cached and full
    passes differ by 2e-3)."""
    import transformers

    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
        )
        model = transformers.TFT5ForConditionalGeneration(config)
    else:
        settings = dict(
            vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        )
        if kind == "bart":
            config = transformers.BartConfig(**settings, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                             decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None)
            model = transformers.TFBartForConditionalGeneration(config)
        else:
            config = transformers.MarianConfig(**settings, pad_token_id=63, eos_token_id=0, decoder_start_token_id=63,
                                               bad_words_ids=[[63]])
            model = transformers.TFMarianMTModel(config)
    model(model.dummy_inputs, training=False)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        name = weight.name.lower()
        if "norm" in name and ("gamma" in name or "weight" in name):
            weight.assign(np.ones(weight.shape, np.float32))
        elif "norm" in name or "final_logits_bias" in name:
            weight.assign(np.zeros(weight.shape, np.float32))
        else:
            weight.assign(rng.normal(0.0, WEIGHT_STD[kind], weight.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each architecture exported once through the parity gate (fp32 and int8), on first use."""
    from tfsft.export_seq2seq import export_seq2seq, greedy_settings

    done: dict[str, SimpleNamespace] = {}

    def get(kind: str) -> SimpleNamespace:
        if kind not in done:
            model = tiny_model(kind)
            directory = tmp_path_factory.mktemp(kind)
            settings = greedy_settings(model, max_new_tokens=NEW_TOKENS)
            report = export_seq2seq(model, directory, SOURCES, settings=settings, int8=True)
            session = Seq2SeqSession(directory / "encoder.onnx", directory / "decoder.onnx")
            done[kind] = SimpleNamespace(model=model, directory=directory, report=report, settings=settings,
                                         session=session)
        return done[kind]

    return get


@pytest.fixture(params=KINDS)
def export(request, exports):
    return exports(request.param)


@pytest.fixture
def t5(exports):
    return exports("t5")


def keras_logits(model, sources, targets) -> np.ndarray:
    ids, mask = right_padded(sources, 0)
    return np.asarray(model(input_ids=ids, attention_mask=mask, decoder_input_ids=np.asarray(targets), training=False).logits)


# ------------------------------------------------------------------------------ graphs and gate


def test_graphs_have_the_documented_inputs_outputs_and_metadata(export):
    import onnx

    session = export.session
    assert [i.name for i in session.encoder.get_inputs()] == ["input_ids", "attention_mask"]
    assert sorted(o.name for o in session.encoder.get_outputs()) == sorted(
        ["encoder_hidden_states", "cross.0.key", "cross.0.value", "cross.1.key", "cross.1.value"])
    assert [i.name for i in session.session.get_inputs()] == [
        "decoder_input_ids", "encoder_attention_mask", "past.0.self_key", "past.0.self_value", "past.1.self_key",
        "past.1.self_value", "cross.0.key", "cross.0.value", "cross.1.key", "cross.1.value"]
    assert sorted(o.name for o in session.session.get_outputs()) == sorted(
        ["logits", "present.0.self_key", "present.0.self_value", "present.1.self_key", "present.1.self_value"])
    assert (session.num_layers, session.num_heads, session.head_dim, session.vocab_size) == (2, 4, 8, 64)
    kind = export.report["shape"]["model_type"]
    assert session.model_type == kind and session.max_positions == (None if kind == "t5" else 64)
    assert session.decoder_start_token_id == export.model.config.decoder_start_token_id
    for path in (session.encoder_path, session.path):
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert not ops & {"If", "Loop"}, "straight-line graphs, no branches"


def test_export_passes_the_gate_and_keeps_an_int8_pair(export):
    report = export.report
    fp32 = report["fp32"]
    assert fp32["greedy_identical"] == fp32["greedy_sources"] == len(SOURCES)
    assert fp32["encoder_max_abs_diff"] < FP32_TOLERANCE and fp32["cached_max_abs_diff"] < FP32_TOLERANCE
    assert set(report["int8"]) == set(fp32) and report["int8"]["greedy_sources"] == len(SOURCES)
    assert sorted(p.name for p in export.directory.iterdir()) == [
        "decoder.int8.onnx", "decoder.onnx", "encoder.int8.onnx", "encoder.onnx"]
    int8 = Seq2SeqSession(export.directory / "encoder.int8.onnx", export.directory / "decoder.int8.onnx")
    assert len(generate_seq2seq(int8, SOURCES, 3)) == len(SOURCES)


def test_cached_steps_match_keras_full_pass(export):
    """Random targets teacher-forced one token per step through the cache: each step's logits equal
    Keras' logits of the whole target at that position, and the encoder states Keras' states."""
    model, session = export.model, export.session
    start = session.decoder_start_token_id
    rng = np.random.default_rng(1)
    targets = np.concatenate([np.full((len(SOURCES), 1), start), rng.integers(3, 60, (len(SOURCES), 7))], axis=1)
    reference = keras_logits(model, SOURCES, targets)
    ids, mask = right_padded(SOURCES, 0)
    states, cross = session.encode(ids, mask)
    keras_states = np.asarray(model.get_encoder()(input_ids=ids, attention_mask=mask, training=False).last_hidden_state)
    real = mask.astype(bool)
    assert np.max(np.abs(states[real] - keras_states[real])) < FP32_TOLERANCE
    past = session.empty_past(len(SOURCES))
    for t in range(targets.shape[1]):
        logits, past = session.decode(targets[:, t:t + 1], mask, past, cross)
        assert np.max(np.abs(logits[:, 0] - reference[:, t])) < FP32_TOLERANCE, t
        assert past[0].shape == (len(SOURCES), 4, t + 1, 8)


def test_greedy_equals_keras_generate_with_rows_ending_on_eos(export):
    """Eos is a token that some greedy targets reach mid-way: those rows end there (eos dropped),
    the others run to the token budget, on both sides; Marian's pad stays suppressed."""
    from tfsft.export_seq2seq import GreedySettings, keras_seq2seq_greedy, until_eos

    model, session, settings = export.model, export.session, export.settings
    free = generate_seq2seq(session, SOURCES, NEW_TOKENS, pad_token_id=settings.pad_token_id,
                            suppress_token_ids=list(settings.suppress_token_ids))
    eos = free[0].tokens[2]
    ending = GreedySettings(NEW_TOKENS, (eos,), settings.pad_token_id, settings.decoder_start_token_id,
                            settings.suppress_token_ids)
    keras = [until_eos(row, (eos,)) for row in keras_seq2seq_greedy(model, SOURCES, ending)]
    onnx = generate_seq2seq(session, SOURCES, NEW_TOKENS, eos, settings.pad_token_id,
                            suppress_token_ids=list(settings.suppress_token_ids))
    assert [g.tokens for g in onnx] == keras
    assert [g.finish_reason for g in onnx] == [FINISH_EOS if eos in f.tokens else FINISH_LENGTH for f in free]
    assert FINISH_EOS in {g.finish_reason for g in onnx} and all(eos not in g.tokens for g in onnx)
    assert all(t not in settings.suppress_token_ids for g in free for t in g.tokens)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_batched_generation_equals_one_by_one(exports, kind):
    session = exports(kind).session
    batched = generate_seq2seq(session, SOURCES, NEW_TOKENS, eos_token_id=36)
    alone = [generate_seq2seq(session, [source], NEW_TOKENS, eos_token_id=36)[0] for source in SOURCES]
    assert batched == alone


def test_suppressed_tokens_are_never_chosen_as_keras_bans_them(t5):
    from tfsft.export_seq2seq import GreedySettings, keras_seq2seq_greedy, until_eos

    plain = generate_seq2seq(t5.session, SOURCES, NEW_TOKENS)
    common = int(np.bincount([t for g in plain for t in g.tokens]).argmax())
    banned = GreedySettings(NEW_TOKENS, (), 0, 0, (common,))
    onnx = generate_seq2seq(t5.session, SOURCES, NEW_TOKENS, suppress_token_ids=[common])
    assert all(common not in g.tokens for g in onnx)
    assert [g.tokens for g in onnx] == [until_eos(row, ()) for row in keras_seq2seq_greedy(t5.model, SOURCES, banned)]


def test_stop_sequences_and_seeded_sampling(t5):
    session = t5.session
    greedy = generate_seq2seq(session, SOURCES[:1], NEW_TOKENS)[0]
    stop = greedy.tokens[1:3]
    stopped = generate_seq2seq(session, SOURCES[:1], NEW_TOKENS, stop_token_sequences=[stop])[0]
    assert stopped.finish_reason == FINISH_STOP and stopped.tokens == greedy.tokens[:1]
    first = generate_seq2seq(session, SOURCES, NEW_TOKENS, temperature=1.5, seed=7)
    assert first == generate_seq2seq(session, SOURCES, NEW_TOKENS, temperature=1.5, seed=7)
    assert first != generate_seq2seq(session, SOURCES, NEW_TOKENS, temperature=1.5, seed=8)
    assert generate_seq2seq(session, SOURCES, NEW_TOKENS, temperature=1.0, top_p=1e-9, seed=3) == \
        generate_seq2seq(session, SOURCES, NEW_TOKENS)
    assert generate_seq2seq(session, SOURCES, 0) == [type(greedy)([], FINISH_LENGTH)] * len(SOURCES)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(sources=[]), DataError, "no sources"),
    (dict(sources=[[5], []]), DataError, "source 1 is empty"),
    (dict(sources=[[5, 64]]), DataError, "source 0 has a token id outside"),
    (dict(temperature=-1.0), ConfigError, "temperature"),
    (dict(decoder_start_token_id=99), ConfigError, r"Received: \[99\]"),
    (dict(suppress_token_ids=["x"]), ConfigError, "suppress_token_ids"),
])
def test_bad_generation_arguments_are_one_line_errors(t5, kwargs, error, message):
    arguments = {"sources": SOURCES, "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        generate_seq2seq(t5.session, **arguments)


def test_position_limits_of_learned_positions(exports):
    session = exports("bart").session
    with pytest.raises(ConfigError, match="beyond the decoder's 64 positions"):
        generate_seq2seq(session, SOURCES, 65)
    with pytest.raises(DataError, match="source 0 has 65 tokens"):
        generate_seq2seq(session, [[5] * 65], 4)


def test_unsupported_models_are_refused_before_tracing():
    from tfsft.export_seq2seq import seq2seq_shape

    def fake(model_type, start=0):
        return SimpleNamespace(config=SimpleNamespace(model_type=model_type, decoder_start_token_id=start),
                               generation_config=SimpleNamespace(decoder_start_token_id=None))

    with pytest.raises(ConfigError, match=r"expected one of \['bart', 'marian', 't5'\]. Received: model_type='gpt2'"):
        seq2seq_shape(fake("gpt2"))
    with pytest.raises(ConfigError, match="decoder_start_token_id=None"):
        seq2seq_shape(fake("t5", None))


def test_a_failing_gate_leaves_no_files(tmp_path, monkeypatch):
    from tfsft import export_seq2seq as module

    def convert(model, encoder, decoder):
        Path(encoder).write_bytes(b"encoder")
        Path(decoder).write_bytes(b"decoder")

    failing = module.Seq2SeqParity(1e-6, 1.0, 1e-6, 5.0, greedy_sources=3, greedy_identical=2)
    monkeypatch.setattr(module, "float32_model", lambda model: model)
    monkeypatch.setattr(module, "convert_seq2seq", convert)
    monkeypatch.setattr(module, "keras_reference", lambda *args: None)
    monkeypatch.setattr(module, "Seq2SeqSession", lambda *args: None)
    monkeypatch.setattr(module, "check_seq2seq_parity", lambda *args: failing)
    settings = module.GreedySettings(4, (1,), 0, 0)
    with pytest.raises(ArtifactError, match="does not reproduce Keras.*'greedy_identical': 2"):
        module.export_seq2seq(object(), tmp_path, SOURCES, settings=settings, int8=True)
    assert list(tmp_path.iterdir()) == []
    assert module.Seq2SeqParity(1e-3, 30.0, 0.0, 1.0, 1, 1).passed(5e-4), "the tolerance grows with the states"
    assert not module.Seq2SeqParity(1e-3, 5.0, 0.0, 1.0, 1, 1).passed(5e-4)


def test_a_graph_without_the_seq2seq_inputs_is_refused(t5):
    with pytest.raises(ArtifactError, match="has no cache inputs"):
        Seq2SeqSession(t5.directory / "encoder.onnx", t5.directory / "encoder.onnx")
    with pytest.raises(ArtifactError, match=r"seq2seq encoder \S+decoder.onnx lacks inputs \['input_ids', 'attention_mask'\]"):
        Seq2SeqSession(t5.directory / "decoder.onnx", t5.directory / "decoder.onnx")
    with pytest.raises(ArtifactError, match="not found"):
        Seq2SeqSession(t5.directory / "missing.onnx", t5.directory / "decoder.onnx")


# ------------------------------------------------------------------------------ bundle and Predictor

WORDS = [f"w{i}" for i in range(61)]


def word_tokenizer():
    """A word-level tokenizer of 64 ids, T5's specials first (<pad> 0, </s> 1, <unk> 2), that ends
    each source with </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: 3 + i for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tokenizer


TEXTS = ["w1 w2 w3", "w10 w11", "w40 w41 w42 w43 w44 w45", "w7", "w20 w30 w40 w50 w60", "w5 w5 w5"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, exports):
    """A fake finished run (model/ with the T5 and the tokenizer, config.json) exported as a bundle."""
    from transformers import PreTrainedTokenizerFast

    from tfsft import artifacts
    from tfsft.config import RunConfig
    from tfsft.export_seq2seq import export_seq2seq_bundle

    model = exports("t5").model
    run_dir = tmp_path_factory.mktemp("run")
    model_dir = artifacts.run_model_dir(run_dir)
    PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(model_dir))
    model.save_pretrained(str(model_dir))
    config = RunConfig.from_flat({"task": "seq2seq", "train_file": "x.jsonl"})
    artifacts.save_config(config, run_dir)
    report = export_seq2seq_bundle(model, run_dir, TEXTS, config)
    return SimpleNamespace(model=model, directory=run_dir / artifacts.ONNX_DIR, report=report, config=config)


def test_bundle_json_and_report(bundle):
    meta = json.loads((bundle.directory / "bundle.json").read_text())
    assert meta == {
        "format_version": 2, "task": "seq2seq", "model_name": bundle.config.model.model_name_or_path, "model_type": "t5",
        "labels": [], "id2label": {}, "max_seq_length": bundle.config.data.max_seq_length,
        "inputs": ["input_ids", "attention_mask"], "input_dtype": "int64", "output": "logits", "pad_id": 0, "decision": {},
        "files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "encoder_int8": "encoder.int8.onnx",
                  "decoder_int8": "decoder.int8.onnx"},
        "decoder_start_token_id": 0, "eos_token_ids": [1], "suppress_token_ids": [],
        "max_new_tokens": bundle.config.data.max_new_tokens, "source_prefix": "",
    }
    assert {p.name for p in bundle.directory.iterdir()} >= {"tokenizer.json", "config.json", "export_report.json"}
    assert bundle.report["fp32"]["greedy_identical"] == bundle.report["parity_sources"] == len(TEXTS)
    assert bundle.report["parity_new_tokens"] == 8 and set(bundle.report["sizes_bytes"]) == set(meta["files"].values())


def test_predictor_generates_keras_greedy_targets(bundle):
    from tokenizers import Tokenizer

    from tfsft.export_seq2seq import GreedySettings, keras_seq2seq_greedy, until_eos
    from tfsft.inference import Generation, Predictor

    predictor = Predictor(bundle.directory, batch_size=4)
    assert predictor.generates and predictor.encoder_decoder and predictor.model_path.name == "decoder.onnx"
    generated = predictor.generate(TEXTS, max_new_tokens=6)
    tokenizer = Tokenizer.from_file(str(bundle.directory / "tokenizer.json"))
    sources = [tokenizer.encode(text).ids for text in TEXTS]
    assert sources[0] == [4, 5, 6, 1]
    keras = keras_seq2seq_greedy(bundle.model, sources, GreedySettings(6, (1,), 0, 0))
    assert [list(g.tokens) for g in generated] == [until_eos(row, (1,)) for row in keras]
    assert all(isinstance(g, Generation) and g.text == tokenizer.decode(list(g.tokens)).strip() for g in generated)
    assert len(predictor.generate(TEXTS[:1])[0].tokens) <= bundle.config.data.max_new_tokens
    *pieces, final = predictor.stream(TEXTS[0], max_new_tokens=6)
    assert "".join(pieces) == final.text == generated[0].text


def test_predictor_int8_pair_and_precision_choice(bundle):
    from tfsft.inference import Bundle, Predictor, choose_precision

    predictor = Predictor(bundle.directory, int8=True)
    assert predictor.model_path.name == "decoder.int8.onnx"
    assert predictor.seq2seq.encoder_path.name == "encoder.int8.onnx"
    assert len(predictor.generate(TEXTS[:2], max_new_tokens=3)) == 2
    choice = choose_precision(Bundle.load(bundle.directory), "auto")
    assert not choice.int8 and "no int8 score drop" in choice.reason
    assert choose_precision(Bundle.load(bundle.directory), "int8").int8


def test_predictor_prepends_the_source_prefix_and_refuses_bad_sources(bundle, tmp_path):
    import shutil

    from tfsft.inference import Predictor, PromptError

    copy = tmp_path / "onnx"
    shutil.copytree(bundle.directory, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**meta, "source_prefix": "w9 "}))
    predictor = Predictor(copy)
    assert predictor.source_ids(["w1 w2"]) == [[12, 4, 5, 1]]
    plain = Predictor(bundle.directory)
    assert predictor.generate(["w1 w2"], max_new_tokens=4) == plain.generate(["w9 w1 w2"], max_new_tokens=4)
    with pytest.raises(PromptError, match="prompt 1 is a list: a seq2seq model takes a source text"):
        plain.generate(["w1", [{"role": "user", "content": "w1"}]])
    with pytest.raises(PromptError, match="prompt 0 is empty"):
        plain.generate(["  "])
    with pytest.raises(ConfigError, match="generates text: call Predictor.generate"):
        plain.logits(["w1"])


def test_predict_goes_through_the_task(bundle):
    from tfsft.inference import Predictor
    from tfsft.tasks import TASKS
    from tfsft.tasks.base import Task

    if type(TASKS["seq2seq"]).predict is Task.predict:
        pytest.skip("the seq2seq task's predict is not written yet")
    predictor = Predictor(bundle.directory)
    assert predictor.predict(TEXTS[:2]) == predictor.generate(TEXTS[:2])


def test_bundle_export_needs_sources(bundle):
    from tfsft.export_seq2seq import export_seq2seq_bundle

    with pytest.raises(ConfigError, match="needs sources for its parity gate"):
        export_seq2seq_bundle(bundle.model, bundle.directory.parent, [], bundle.config)
