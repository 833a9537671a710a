"""Decoder export with a key/value cache (tfsft.export_decoder) and generation over onnxruntime
(tfsft.generation), on tiny random Mistral (the Llama computation) and GPT-2 models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tfsft.errors import ArtifactError, ConfigError, DataError
from tfsft.generation import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    DecoderSession,
    generate,
    left_padded,
    trim_at_stop,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23], [1], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
NEW_TOKENS = 12
PAD = 0


DEFAULT_EOS = {"mistral": 2, "gpt2": 51}
"""A token each tiny model's greedy continuations produce, made its config's default eos."""


def tiny_model(kind: str):
    """A 2-layer, hidden-32 causal LM with seeded weights large enough (N(0, 0.5)) that its logits
    are far apart: greedy choices are not float-rounding coin flips. Its config's default eos
    (`DEFAULT_EOS`) is a token it generates, which generation must not stop at unless asked to."""
    import transformers

    eos_token_id = DEFAULT_EOS[kind]

    if kind == "mistral":
        config = transformers.MistralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=None, max_position_embeddings=128, eos_token_id=eos_token_id,
        )
        model = transformers.TFMistralForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                         eos_token_id=eos_token_id, bos_token_id=eos_token_id)
        model = transformers.TFGPT2LMHeadModel(config)
    model(model.dummy_inputs, training=False)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each architecture exported once through the parity gate (fp32 and int8), on first use."""
    from tfsft.export_decoder import export_decoder

    done: dict[str, SimpleNamespace] = {}

    def get(kind: str) -> SimpleNamespace:
        if kind not in done:
            model = tiny_model(kind)
            directory = tmp_path_factory.mktemp(kind)
            report = export_decoder(model, directory / "decoder.onnx", PROMPTS, max_new_tokens=NEW_TOKENS,
                                    int8_path=directory / "decoder.int8.onnx")
            done[kind] = SimpleNamespace(model=model, directory=directory, report=report,
                                         session=DecoderSession(directory / "decoder.onnx"))
        return done[kind]

    return get


@pytest.fixture(params=["mistral", "gpt2"])
def decoder(request, exports):
    """(Keras model, DecoderSession over its checked ONNX export) for each architecture."""
    export = exports(request.param)
    return export.model, export.session


@pytest.fixture
def mistral(exports):
    export = exports("mistral")
    return export.model, export.session


# ------------------------------------------------------------------------------ export parity


def test_one_graph_has_the_cache_inputs_and_outputs(decoder):
    _, session = decoder
    names = [i.name for i in session.session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "position_ids", "past.0.key", "past.0.value", "past.1.key",
                     "past.1.value"]
    assert [o.name for o in session.session.get_outputs()] == [
        "logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert session.num_layers == 2 and session.head_dim == 8 and session.vocab_size == 64
    assert session.max_positions == 128 and session.model_type in ("mistral", "gpt2")
    import onnx

    graph = onnx.load(str(session.path)).graph
    assert not {node.op_type for node in graph.node} & {"If", "Loop"}, "one straight-line graph, no branches"


def test_prefill_logits_match_keras_on_a_left_padded_batch(decoder):
    from tfsft.export_decoder import keras_logits

    model, session = decoder
    ids, mask, positions = left_padded(PROMPTS, PAD)
    logits, present = session.run(ids, mask, positions, session.empty_past(len(PROMPTS)))
    reference = keras_logits(model, ids, mask, positions)
    real = mask.astype(bool)
    assert np.max(np.abs(logits[real] - reference[real])) < 1e-4
    assert present[0].shape == (len(PROMPTS), session.num_kv_heads, ids.shape[1], session.head_dim)


def test_cached_steps_match_the_full_recomputation(decoder):
    """Prefill 3 positions, then feed the rest one token per step through the cache: the logits of
    each step equal Keras' (and ONNX's own) logits of the whole sequence at that position."""
    from tfsft.export_decoder import keras_logits

    model, session = decoder
    ids, mask, positions = left_padded(PROMPTS, PAD)
    reference = keras_logits(model, ids, mask, positions)
    full, _ = session.run(ids, mask, positions, session.empty_past(len(ids)))
    _, past = session.run(ids[:, :3], mask[:, :3], positions[:, :3], session.empty_past(len(ids)))
    for t in range(3, ids.shape[1]):
        step, past = session.run(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], past)
        real = mask[:, t].astype(bool)
        assert np.max(np.abs(step[real, 0] - reference[real, t])) < 1e-4, t
        assert np.max(np.abs(step[real, 0] - full[real, t])) < 1e-4, t
        assert past[0].shape[2] == t + 1


def test_greedy_ids_equal_keras_generate(decoder):
    """ONNX greedy over the left-padded batch against Keras' `generate(do_sample=False)` on the same
    batch (transformers' TF generate numbers left-padded positions from the mask, as the exported
    graph is fed) and on two prompts alone, unpadded. The config's default eos is generated along
    the way: neither side may stop there, since no eos was asked for."""
    from tfsft.export_decoder import keras_greedy

    model, session = decoder
    onnx = generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    assert all(result.finish_reason == FINISH_LENGTH and len(result.tokens) == NEW_TOKENS for result in onnx)
    assert any(model.config.eos_token_id in result.tokens for result in onnx)
    assert keras_greedy(model, PROMPTS, NEW_TOKENS, None, PAD) == [result.tokens for result in onnx]
    for index in (0, 3):
        assert keras_greedy(model, [PROMPTS[index]], NEW_TOKENS, None, PAD) == [onnx[index].tokens]


def test_left_padded_batch_equals_one_by_one(decoder):
    _, session = decoder
    batched = generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    single = [generate(session, [prompt], max_new_tokens=NEW_TOKENS, pad_token_id=PAD)[0] for prompt in PROMPTS]
    assert batched == single


def test_recomputing_every_step_gives_the_cached_tokens(mistral):
    """The benchmark's baseline (no cache: the whole sequence each step, an empty past) is the same
    computation."""
    _, session = mistral
    cached = generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    assert generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD, use_cache=False) == cached


# ------------------------------------------------------------------------------- stopping rows


def test_eos_stops_its_row_only(mistral):
    _, session = mistral
    free = generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    eos = free[0].tokens[4]
    stopped = generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD, eos_token_id=eos)
    for before, after in zip(free, stopped):
        if eos in before.tokens:
            assert after.tokens == before.tokens[: before.tokens.index(eos)] and after.finish_reason == FINISH_EOS
        else:
            assert after == before
    assert stopped[0].tokens == free[0].tokens[:4]
    unused = next(t for t in range(64) if all(t not in r.tokens for r in free))
    assert generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD, eos_token_id=[unused, eos]) == stopped


def test_stop_token_sequences_end_and_are_trimmed(mistral):
    _, session = mistral
    free = generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    stop = free[2].tokens[5:7]
    stopped = generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD, stop_token_sequences=[stop])
    assert stopped[2].finish_reason == FINISH_STOP
    tokens = free[2].tokens
    first = next(i for i in range(len(tokens) - 1) if tokens[i:i + 2] == stop)
    assert stopped[2].tokens == tokens[:first]


def test_trim_at_stop_cuts_at_the_earliest_stop_string():
    assert trim_at_stop("Answer: 42\nQuestion: next", ["\nQuestion:", "42"]) == ("Answer: ", True)
    assert trim_at_stop("no stop here", ["###", ""]) == ("no stop here", False)
    assert trim_at_stop("ends ###", ["###"]) == ("ends ", True)


# ----------------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(mistral):
    _, session = mistral
    settings = dict(max_new_tokens=NEW_TOKENS, pad_token_id=PAD, temperature=1.5)
    first = generate(session, PROMPTS, seed=7, **settings)
    assert generate(session, PROMPTS, seed=7, **settings) == first
    others = [generate(session, PROMPTS, seed=seed, **settings) for seed in (8, 9)]
    assert any(other != first for other in others), "different seeds sample different tokens"
    greedy = generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    assert first != greedy
    assert generate(session, PROMPTS, seed=7, top_p=1e-6, **settings) == greedy


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    from tfsft.generation import _choose

    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    rng = np.random.default_rng(0)
    drawn = {int(_choose(np.log(probs), 1.0, 0.75, rng)[0]) for _ in range(400)}
    assert drawn == {0, 1}, "0.5 + 0.3 reaches 0.75; the rest is cut"
    drawn = {int(_choose(np.log(probs), 1.0, 1.0, rng)[0]) for _ in range(400)}
    assert drawn == {0, 1, 2, 3}


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(temperature=-1.0), ConfigError, "temperature=-1.0"),
        (dict(top_p=0.0), ConfigError, "top_p=0.0"),
        (dict(max_new_tokens=-2), ConfigError, "max_new_tokens=-2"),
        (dict(prompts=[[1, 2], []]), DataError, "prompt 1 is empty"),
        (dict(prompts=[[1, 64]]), DataError, "prompt 0 has a token id outside the vocabulary"),
        (dict(prompts=[list(range(1, 60)) * 2], max_new_tokens=20), ConfigError, "beyond the model's 128 positions"),
        (dict(stop_token_sequences=[[]]), ConfigError, "empty sequence"),
        (dict(eos_token_id="2"), ConfigError, "eos_token_id='2'"),
    ],
)
def test_bad_generation_arguments_are_one_line_errors(mistral, kwargs, error, message):
    _, session = mistral
    arguments = dict(prompts=PROMPTS, max_new_tokens=4, pad_token_id=PAD) | kwargs
    with pytest.raises(error, match=message) as raised:
        generate(session, **arguments)
    assert "\n" not in str(raised.value)


def test_a_graph_without_the_cache_inputs_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])], "encoder",
        [helper.make_tensor_value_info(name, TensorProto.INT64, ["b", "s"]) for name in
         ("input_ids", "attention_mask", "position_ids")],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ArtifactError, match="has no cache inputs"):
        DecoderSession(path)
    with pytest.raises(ArtifactError, match="not found"):
        DecoderSession(tmp_path / "missing.onnx")


def test_unsupported_decoders_are_refused_before_tracing():
    from tfsft.export_decoder import decoder_shape

    with pytest.raises(ConfigError, match="model_type='bert'"):
        decoder_shape(SimpleNamespace(config=SimpleNamespace(model_type="bert")))
    window = SimpleNamespace(model_type="mistral", sliding_window=4096)
    with pytest.raises(ConfigError, match="sliding_window=4096"):
        decoder_shape(SimpleNamespace(config=window))


# ---------------------------------------------------------------------- gate, int8, TF-free


@pytest.mark.parametrize("kind", ["mistral", "gpt2"])
def test_export_keeps_a_checked_decoder_and_its_int8_copy(exports, kind):
    export = exports(kind)
    assert sorted(p.name for p in export.directory.iterdir()) == ["decoder.int8.onnx", "decoder.onnx"]
    fp32, int8 = export.report["fp32"], export.report["int8"]
    assert fp32["greedy_identical"] == fp32["greedy_prompts"] == len(PROMPTS)
    assert fp32["prefill_max_abs_diff"] < 1e-4 and fp32["cached_max_abs_diff"] < 1e-4
    assert 0 < int8["prefill_max_abs_diff"] < 1.0, "int8 moves the logits, a little"
    assert export.report["shape"]["num_layers"] == 2
    session = DecoderSession(export.directory / "decoder.int8.onnx")
    assert [len(r.tokens) for r in generate(session, PROMPTS, max_new_tokens=4)] == [4] * len(PROMPTS)


def test_int8_methods(exports, tmp_path):
    """`blockwise` turns every MatMul by a weight into an 8-bit MatMulNBits (the attention products,
    of two activations, stay float); `dynamic` is the encoders' quantizer."""
    import onnx

    from tfsft.export_decoder import quantize_decoder

    export = exports("gpt2")
    ops = [node.op_type for node in onnx.load(str(export.directory / "decoder.int8.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 * 4 + 1 and ops.count("MatMul") == 2 * 2
    quantize_decoder(export.directory / "decoder.onnx", tmp_path / "dynamic.onnx", method="dynamic")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "dynamic.onnx")).graph.node]
    assert "MatMulNBits" not in ops and ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 2 * 4 + 1
    assert len(generate(DecoderSession(tmp_path / "dynamic.onnx"), PROMPTS, max_new_tokens=3)) == len(PROMPTS)
    with pytest.raises(ConfigError, match="method='int4'"):
        quantize_decoder(export.directory / "decoder.onnx", tmp_path / "x.onnx", method="int4")


def test_the_logit_tolerance_grows_with_the_logits_beyond_ten():
    from tfsft.export_decoder import DecoderParity

    small, large = DecoderParity(2e-4, 0.0, 8.0, 1, 1), DecoderParity(2e-4, 0.0, 30.0, 1, 1)
    assert small.allowed_diff(1e-4) == 1e-4 and not small.passed(1e-4)
    assert large.allowed_diff(1e-4) == pytest.approx(3e-4) and large.passed(1e-4)
    assert not DecoderParity(0.0, 0.0, 1.0, greedy_prompts=2, greedy_identical=1).passed(1e-4)


def test_export_failing_parity_leaves_no_decoder(tmp_path, monkeypatch):
    """The gate's bookkeeping: a decoder (and its int8 copy) that misses parity is not kept."""
    from tfsft import export_decoder as module

    def convert(model, path):
        Path(path).write_bytes(b"converted")
        return None

    def parity(*args, **kwargs):
        return module.DecoderParity(1e-6, 1e-6, 5.0, greedy_prompts=len(PROMPTS), greedy_identical=len(PROMPTS) - 1)

    monkeypatch.setattr(module, "float32_model", lambda model: model)
    monkeypatch.setattr(module, "keras_reference", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "convert_decoder", convert)
    monkeypatch.setattr(module, "check_decoder_parity", parity)
    with pytest.raises(ArtifactError, match="does not reproduce Keras.*'greedy_identical': 4"):
        module.export_decoder(object(), tmp_path / "decoder.onnx", PROMPTS, int8_path=tmp_path / "decoder.int8.onnx")
    assert list(tmp_path.iterdir()) == []


def test_generation_imports_without_tensorflow():
    code = (
        "import sys, tfsft.generation; "
        "heavy = [m for m in ('tensorflow', 'transformers', 'tf_keras', 'tf2onnx') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
