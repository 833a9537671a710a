"""A transformers TF seq2seq model (T5, Marian, BART) -> an ONNX encoder and an ONNX decoder with a
key/value cache, and the parity gate that keeps them only if they reproduce Keras.

The encoder graph (`input_ids`, `attention_mask` -> `encoder_hidden_states`, `cross.{i}.key/value`)
runs once per source. Besides the encoder's states it returns every decoder layer's cross-attention
keys and values, projected by that layer's own key/value weights: they depend on the source only, so
the decoder takes them as inputs instead of projecting the source again at every step.

The decoder graph (`decoder_input_ids [batch, 1]`, `encoder_attention_mask`, `past.{i}.self_key/
self_value`, `cross.{i}.key/value` -> `logits [batch, 1, vocab]`, `present.{i}.self_key/self_value`)
serves every step, the first with a past 0 positions long. It takes one token per row: a seq2seq
decoder starts from its start token alone, and a length fixed at 1 keeps transformers' `if length > 1`
mask branches (BART, Marian) Python-level when traced, so the graph has no `If`. All rows of a batch
are at the same step, so the decoder needs no padding mask of its own.

TensorFlow side; `tfsft.generation.Seq2SeqSession` runs the graphs without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from tfsft import artifacts
from tfsft.errors import ArtifactError, ConfigError
from tfsft.evaluation import banned_tokens, cut_at_eos, generate_with_config, greedy_generation_config
from tfsft.export import _register_erfc_handler, bundle_work_dir, publish_bundle
from tfsft.export_decoder import (
    FP32_TOLERANCE,
    PARITY_NEW_TOKENS,
    PARITY_PROMPTS,
    TOLERANCE_SCALE,
    convert_function,
    quantize_decoder,
)
from tfsft.generation import (
    ENCODER_INPUTS,
    ENCODER_STATES,
    LOGITS_OUTPUT,
    METADATA_DECODER_START,
    METADATA_MAX_POSITIONS,
    METADATA_MODEL_TYPE,
    SEQ2SEQ_DECODER_INPUTS,
    Seq2SeqSession,
    cross_names,
    generate_seq2seq,
    right_padded,
    self_past_names,
    self_present_names,
)
from tfsft.modeling import float32_model, quiet_transformers, tf

SEQ2SEQ_OPSET = 17
IDS_DTYPE = "int64"
SUPPORTED_MODEL_TYPES = frozenset({"t5", "marian", "bart"})
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
ENCODER_INT8_FILE = "encoder.int8.onnx"
DECODER_INT8_FILE = "decoder.int8.onnx"


@dataclasses.dataclass(frozen=True)
class Seq2SeqShape:
    """The layout of the graphs: per decoder layer, caches `[batch, heads, positions, head_dim]`."""

    model_type: str
    num_layers: int
    num_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    max_positions: Optional[int]
    """Positions of the learned or sinusoidal position tables; None for T5's relative positions."""
    decoder_start_token_id: int


def seq2seq_shape(model) -> Seq2SeqShape:
    """Read the layout from the model's config; refuse models this export cannot trace."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"cannot export {type(model).__name__} as a seq2seq encoder and decoder: expected one of "
            f"{sorted(SUPPORTED_MODEL_TYPES)}. Received: model_type={model_type!r}"
        )
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    start = config.decoder_start_token_id if start is None else start
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError(f"a seq2seq export needs the model's decoder_start_token_id. Received: decoder_start_token_id={start!r}")
    if model_type == "t5":
        layers = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
        return Seq2SeqShape(model_type, layers, config.num_heads, config.d_kv, config.d_model, config.vocab_size, None, start)
    heads = config.decoder_attention_heads
    return Seq2SeqShape(model_type, config.decoder_layers, heads, config.d_model // heads, config.d_model,
                        config.vocab_size, config.max_position_embeddings, start)


def _cross_attention_layers(model, shape: Seq2SeqShape) -> list:
    """Each decoder layer's cross-attention layer."""
    if shape.model_type == "t5":
        return [block.layer[1].EncDecAttention for block in model.decoder.block]
    return [layer.encoder_attn for layer in model.model.decoder.layers]


# ------------------------------------------------------------------------------------ tracing


def _t5_self_attention_call(layer):
    """TFT5Attention.call of the decoder's first self-attention (the one that owns the relative
    position bias), traceable with a cache.

    With a cache, transformers finds the query's row of the bias from the last nonzero key of row 0
    (for the zero-padded caches of its XLA generation), through XLA's `dynamic_slice`: an op tf2onnx
    cannot convert, and a wrong row for a cache 0 positions long. Here the bias is computed as
    transformers computes it without a cache (key length = past + new) and its last `new` rows are
    taken, which is PyTorch's T5; the mask is added as the original adds it, and the rest is
    transformers' code unchanged (it receives the bias ready).
    """
    original = type(layer).call.__get__(layer)

    def call(hidden_states, mask=None, key_value_states=None, position_bias=None, past_key_value=None, **kwargs):
        if position_bias is None and past_key_value is not None and key_value_states is None:
            new = tf.shape(hidden_states)[1]
            total = new + tf.shape(past_key_value[0])[2]
            position_bias = layer.compute_bias(total, total)[:, :, -new:, :]
            if mask is not None:
                position_bias = tf.cast(position_bias, mask.dtype) + mask
        return original(hidden_states, mask=mask, key_value_states=key_value_states, position_bias=position_bias,
                        past_key_value=past_key_value, **kwargs)

    return call


@contextlib.contextmanager
def _traceable(model, shape: Seq2SeqShape) -> Iterator[None]:
    """Give the layers that need it a traceable `call` for the block (an instance attribute, removed
    on exit: the model is left as it was)."""
    patched: list[tuple[Any, str]] = []
    if shape.model_type == "t5":
        attention = model.decoder.block[0].layer[0].SelfAttention
        object.__setattr__(attention, "call", _t5_self_attention_call(attention))
        patched.append((attention, "call"))
    try:
        yield
    finally:
        for owner, name in patched:
            object.__delattr__(owner, name)


def _ids_spec(name: str, length: Optional[int] = None):
    return tf.TensorSpec([None, length], getattr(tf, IDS_DTYPE), name=name)


def _cache_specs(shape: Seq2SeqShape, names: Sequence[str]) -> list:
    return [tf.TensorSpec([None, shape.num_heads, None, shape.head_dim], tf.float32, name=name) for name in names]


def encoder_function(model, shape: Optional[Seq2SeqShape] = None):
    """The encoder as a tf.function returning a dict by output name: the states, then each decoder
    layer's cross keys and values from the layer's own attention (called on a one-position query,
    whose output nothing uses: the graph keeps only the projections)."""
    shape = shape or seq2seq_shape(model)
    signature = [_ids_spec(name) for name in ENCODER_INPUTS]
    outputs = [ENCODER_STATES, *cross_names(shape.num_layers)]
    cross_layers = _cross_attention_layers(model, shape)

    @tf.function(input_signature=signature)
    def encoder(input_ids, attention_mask):
        states = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, training=False,
                                     return_dict=True).last_hidden_state
        query = tf.zeros_like(states[:, :1, :])
        flat = [tf.cast(states, tf.float32)]
        for layer in cross_layers:
            if shape.model_type == "t5":
                key, value = layer(query, key_value_states=states, use_cache=True, training=False)[1]
            else:
                key, value = layer(hidden_states=query, key_value_states=states, training=False)[2]
            flat.extend([key, value])
        return dict(zip(outputs, flat))

    return encoder, signature


def decoder_function(model, shape: Optional[Seq2SeqShape] = None):
    """One decoder step as a tf.function returning a dict by output name. Trace it inside
    `_traceable(model, shape)`.

    The model gets the cross keys and values as the cross half of its cache, which its cross
    attention then uses as they are; the encoder states it is also given only carry the source
    length (a zero tensor nothing else reads, pruned from the graph).
    """
    from transformers.modeling_tf_outputs import TFBaseModelOutput

    shape = shape or seq2seq_shape(model)
    layers = shape.num_layers
    signature = [
        _ids_spec(SEQ2SEQ_DECODER_INPUTS[0], 1), _ids_spec(SEQ2SEQ_DECODER_INPUTS[1]),
        *_cache_specs(shape, self_past_names(layers)), *_cache_specs(shape, cross_names(layers)),
    ]
    outputs = [LOGITS_OUTPUT, *self_present_names(layers)]

    @tf.function(input_signature=signature)
    def decoder(decoder_input_ids, encoder_attention_mask, *cache):
        own, cross = cache[: 2 * layers], cache[2 * layers:]
        past = tuple((own[2 * i], own[2 * i + 1], cross[2 * i], cross[2 * i + 1]) for i in range(layers))
        batch, length = tf.shape(encoder_attention_mask)[0], tf.shape(encoder_attention_mask)[1]
        states = tf.zeros(tf.stack([batch, length, shape.d_model]), tf.float32)
        result = model(
            input_ids=None, attention_mask=encoder_attention_mask, decoder_input_ids=decoder_input_ids,
            encoder_outputs=TFBaseModelOutput(last_hidden_state=states), past_key_values=past, use_cache=True,
            training=False, return_dict=True,
        )
        flat = [tf.cast(result.logits, tf.float32)] + [half for layer in result.past_key_values for half in layer[:2]]
        return dict(zip(outputs, flat))

    return decoder, signature


def convert_seq2seq(model, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike, *,
                    opset: int = SEQ2SEQ_OPSET) -> Seq2SeqShape:
    """Convert `model` (a float32 copy if it computes in mixed precision) to its encoder and decoder
    graphs, each written atomically. Returns the layout."""
    shape = seq2seq_shape(model)
    model = float32_model(model)
    _register_erfc_handler()
    metadata = {METADATA_MODEL_TYPE: shape.model_type, METADATA_DECODER_START: str(shape.decoder_start_token_id)}
    if shape.max_positions is not None:
        metadata[METADATA_MAX_POSITIONS] = str(shape.max_positions)
    _convert_function(model, shape, encoder_function, encoder_path, opset, metadata, "encoder")
    _convert_function(model, shape, decoder_function, decoder_path, opset, metadata, "decoder")
    return shape


def _convert_function(model, shape: Seq2SeqShape, make: Callable, path: str | os.PathLike, opset: int,
                      metadata: dict[str, str], what: str) -> None:
    """Trace `make(model, shape)` and convert it as `tfsft.export_decoder.convert_function` converts a
    decoder, with `metadata`, into one ONNX file at `path`."""
    function, signature = make(model, shape)
    convert_function(function, signature, path, opset, metadata, f"seq2seq {what}", _traceable(model, shape))


# ------------------------------------------------------------------------------------- parity


@dataclasses.dataclass(frozen=True)
class Seq2SeqParity:
    """How closely the ONNX encoder and decoder reproduce Keras on the parity sources."""

    encoder_max_abs_diff: float
    """Largest difference of the encoder states at the real (not padding) source positions."""
    encoder_scale: float
    """Largest |Keras encoder state| there."""
    cached_max_abs_diff: float
    """Largest logit difference of decoder steps run with the cache, against Keras' decoder on the
    whole target (its greedy tokens, teacher-forced), at each row's positions up to its end."""
    logit_scale: float
    """Largest |Keras logit| at those positions."""
    greedy_sources: int
    greedy_identical: int
    """Sources whose ONNX greedy target equals Keras' greedy `generate`, token for token."""

    def allowed_diff(self, tolerance: float, scale: float) -> float:
        return tolerance * max(1.0, scale / TOLERANCE_SCALE)

    def passed(self, tolerance: float) -> bool:
        return (
            self.encoder_max_abs_diff <= self.allowed_diff(tolerance, self.encoder_scale)
            and self.cached_max_abs_diff <= self.allowed_diff(tolerance, self.logit_scale)
            and self.greedy_identical == self.greedy_sources
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GreedySettings:
    """What greedy decoding is compared under, on both sides."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    decoder_start_token_id: int
    suppress_token_ids: tuple[int, ...] = ()


def greedy_settings(model, pad_token_id: Optional[int] = None, max_new_tokens: int = 8) -> GreedySettings:
    """The model's own eos, pad and start tokens (its generation config first), and the tokens it never
    generates: single-token `bad_words_ids` (Marian's pad) and `suppress_tokens`."""
    generation, config = model.generation_config, model.config

    def setting(name: str):
        value = getattr(generation, name, None)
        return getattr(config, name, None) if value is None else value

    eos = setting("eos_token_id")
    eos_ids = () if eos is None else tuple(int(t) for t in ([eos] if isinstance(eos, int) else eos))
    pad = setting("pad_token_id") if pad_token_id is None else pad_token_id
    return GreedySettings(max_new_tokens, eos_ids, int(pad if pad is not None else 0), seq2seq_shape(model).decoder_start_token_id,
                          banned_tokens(generation))


def keras_seq2seq_greedy(model, sources: Sequence[Sequence[int]], settings: GreedySettings) -> np.ndarray:
    """Keras' own greedy `generate` on the right-padded batch of `sources`: the decoder sequences it
    returns (start token first, eos kept, padding after).

    The call's generation config holds nothing but the settings (greedy, one beam; no other logits
    processor of the checkpoint's: length penalties, forced tokens, n-gram bans), which is what ONNX
    generation computes; it replaces the model's own for the call, since TF generation reads an eos
    of None as the model's own.
    """
    ids, mask = right_padded(sources, settings.pad_token_id)
    config = greedy_generation_config(settings.max_new_tokens, settings.eos_token_ids, settings.pad_token_id,
                                      settings.decoder_start_token_id, settings.suppress_token_ids)
    return generate_with_config(model, ids, mask, config).astype(np.int64)


def until_eos(row: Sequence[int], eos: Sequence[int]) -> list[int]:
    """A generated decoder row's tokens (start token dropped) up to, without, the first eos."""
    return cut_at_eos(row[1:], eos)


@dataclasses.dataclass(frozen=True)
class Seq2SeqReference:
    """What Keras computes on the parity sources: once, for every ONNX pair compared with it."""

    sources: list[list[int]]
    states: np.ndarray
    """Encoder states of the right-padded batch."""
    targets: np.ndarray
    """Keras' greedy decoder sequences (start token first)."""
    logits: np.ndarray
    """Keras' logits over `targets`, teacher-forced, no cache."""
    greedy: list[list[int]]
    settings: GreedySettings


def keras_reference(model, sources: Sequence[Sequence[int]], settings: GreedySettings) -> Seq2SeqReference:
    """Keras' encoder states, greedy targets and their logits on `sources` (token ids)."""
    if not sources or any(len(s) == 0 for s in sources):
        raise ConfigError(
            f"seq2seq parity needs sources of at least one token. Received: source lengths={[len(s) for s in sources]}"
        )
    sources = [list(s) for s in sources]
    ids, mask = right_padded(sources, settings.pad_token_id)
    targets = keras_seq2seq_greedy(model, sources, settings)
    with quiet_transformers():
        states = model.get_encoder()(input_ids=tf.constant(ids), attention_mask=tf.constant(mask), training=False,
                                     return_dict=True).last_hidden_state
        out = model(input_ids=tf.constant(ids), attention_mask=tf.constant(mask), decoder_input_ids=tf.constant(targets),
                    training=False, return_dict=True)
    greedy = [until_eos(row, settings.eos_token_ids) for row in targets]
    return Seq2SeqReference(sources, np.asarray(states, np.float32), targets, np.asarray(out.logits, np.float32),
                            greedy, settings)


def check_seq2seq_parity(session: Seq2SeqSession, reference: Seq2SeqReference) -> Seq2SeqParity:
    """Compare the ONNX pair with Keras on the reference sources:

    - encoder: its states at the real source positions;
    - cache: Keras' greedy targets fed one token per step through the cache, against Keras' logits
      of the whole targets, at each row's positions up to the one after its last token;
    - greedy: `tfsft.generation.generate_seq2seq` against Keras' greedy `generate`.
    """
    settings = reference.settings
    ids, mask = right_padded(reference.sources, settings.pad_token_id)
    states, cross = session.encode(ids, mask)
    real = mask.astype(bool)
    encoder_diff = float(np.max(np.abs(states[real] - reference.states[real])))
    lengths = np.array([len(tokens) + 1 for tokens in reference.greedy])
    past, cached = session.empty_past(len(ids)), 0.0
    for t in range(reference.targets.shape[1]):
        logits, past = session.decode(reference.targets[:, t:t + 1], mask, past, cross)
        rows = t < lengths
        if rows.any():
            cached = max(cached, float(np.max(np.abs(logits[rows, 0] - reference.logits[rows, t]))))
    positions = np.arange(reference.logits.shape[1])[None, :] < lengths[:, None]
    onnx = generate_seq2seq(session, reference.sources, settings.max_new_tokens, list(settings.eos_token_ids),
                            settings.pad_token_id, suppress_token_ids=list(settings.suppress_token_ids),
                            decoder_start_token_id=settings.decoder_start_token_id)
    identical = sum(result.tokens == keras for result, keras in zip(onnx, reference.greedy))
    return Seq2SeqParity(
        encoder_diff, float(np.max(np.abs(reference.states[real]))), cached,
        float(np.max(np.abs(reference.logits[positions]))), len(reference.sources), identical,
    )


def export_seq2seq(
    model, directory: str | os.PathLike, sources: Sequence[Sequence[int]], *, settings: Optional[GreedySettings] = None,
    tolerance: float = FP32_TOLERANCE, int8: bool = False,
) -> dict[str, Any]:
    """Convert, check parity on `sources` (token ids), and keep the pair (`encoder.onnx`, `decoder.onnx`
    in `directory`) only if it passed; optionally an int8 pair too (blockwise int8 weights,
    `tfsft.export_decoder.quantize_decoder`; its parity is reported, not required).

    Returns a report: the layout, the greedy settings and each pair's parity. Raises ArtifactError,
    leaving neither file, when the fp32 pair misses the tolerance or a greedy target differs.
    """
    model = float32_model(model)
    settings = settings or greedy_settings(model)
    directory = Path(directory)
    final = {name: directory / name for name in (ENCODER_FILE, DECODER_FILE, ENCODER_INT8_FILE, DECODER_INT8_FILE)}
    staging = {name: path.with_name(f".{path.name}.unchecked") for name, path in final.items()}
    try:
        shape = convert_seq2seq(model, staging[ENCODER_FILE], staging[DECODER_FILE])
        reference = keras_reference(model, sources, settings)
        parity = check_seq2seq_parity(Seq2SeqSession(staging[ENCODER_FILE], staging[DECODER_FILE]), reference)
        if not parity.passed(tolerance):
            raise ArtifactError(
                f"the ONNX seq2seq model does not reproduce Keras: expected encoder states within "
                f"{parity.allowed_diff(tolerance, parity.encoder_scale):.3g}, cached logits within "
                f"{parity.allowed_diff(tolerance, parity.logit_scale):.3g} and identical greedy tokens. "
                f"Received: {parity.as_dict()}"
            )
        report: dict[str, Any] = {"shape": dataclasses.asdict(shape), "greedy": dataclasses.asdict(settings),
                                  "fp32": parity.as_dict()}
        names = [ENCODER_FILE, DECODER_FILE]
        if int8:
            for fp32, quantized in ((ENCODER_FILE, ENCODER_INT8_FILE), (DECODER_FILE, DECODER_INT8_FILE)):
                quantize_decoder(staging[fp32], staging[quantized])
            session = Seq2SeqSession(staging[ENCODER_INT8_FILE], staging[DECODER_INT8_FILE])
            report["int8"] = check_seq2seq_parity(session, reference).as_dict()
            names += [ENCODER_INT8_FILE, DECODER_INT8_FILE]
        for name in names:
            os.replace(staging[name], final[name])
    finally:
        for leftover in staging.values():
            leftover.unlink(missing_ok=True)
    return report


def export_seq2seq_bundle(model, run_dir: str | os.PathLike, sources: Sequence[str], config: Any) -> dict[str, Any]:
    """Export a fine-tuned seq2seq run to `run_dir/onnx/`: the encoder and decoder (and their int8
    copies when the run's variants ask for them), the tokenizer, and the report of the parity gate
    on the first `PARITY_PROMPTS` (`tfsft.export_decoder`'s) of `sources`: the texts the encoder reads, the run's source_prefix
    already in front (bundle.json records it, for the Predictor to put in front of what it is sent).
    Nothing is published unless the fp32 pair passes."""
    import time

    from tfsft.checkpoint import load_tokenizer, text_encoder

    run_dir = Path(run_dir)
    model_dir = artifacts.run_model_dir(run_dir)
    encoder = text_encoder(load_tokenizer(model_dir), config.data.max_seq_length)
    prefix = getattr(config.data, "source_prefix", "") or ""
    encoded = encoder.encode(list(sources[:PARITY_PROMPTS]))
    parity_sources = [[int(t) for t in ids] for ids in encoded.input_ids if len(ids)]
    if not parity_sources:
        raise ConfigError("a seq2seq export needs sources for its parity gate: expected at least one non-empty source. "
                          f"Received: {len(sources)} sources")
    model = float32_model(model)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else encoder.pad_id
    settings = greedy_settings(model, int(pad), PARITY_NEW_TOKENS)
    with bundle_work_dir(run_dir) as work:
        start = time.perf_counter()
        int8 = "int8" in config.export.variants
        report = export_seq2seq(model, work, parity_sources, settings=settings, int8=int8)
        report.update(seconds=round(time.perf_counter() - start, 3), parity_sources=len(parity_sources),
                      parity_new_tokens=PARITY_NEW_TOKENS)
        files = {"encoder": ENCODER_FILE, "decoder": DECODER_FILE}
        if int8:
            files.update(encoder_int8=ENCODER_INT8_FILE, decoder_int8=DECODER_INT8_FILE)
        report["sizes_bytes"] = {name: (work / name).stat().st_size for name in files.values()}
        metadata = {
            "format_version": 2, "task": config.model.task, "model_name": config.model.model_name_or_path,
            "model_type": report["shape"]["model_type"], "labels": [], "id2label": {},
            "max_seq_length": config.data.max_seq_length, "inputs": list(ENCODER_INPUTS), "input_dtype": IDS_DTYPE,
            "output": LOGITS_OUTPUT, "pad_id": settings.pad_token_id, "decision": {}, "files": files,
            "decoder_start_token_id": settings.decoder_start_token_id, "eos_token_ids": list(settings.eos_token_ids),
            "suppress_token_ids": list(settings.suppress_token_ids), "max_new_tokens": config.data.max_new_tokens,
            "source_prefix": prefix,
        }
        artifacts.write_json(work / artifacts.BUNDLE_FILE, metadata)
        publish_bundle(work, run_dir, config, report, model_dir / artifacts.BUNDLE_TOKENIZER)
    return report
