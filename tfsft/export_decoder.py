"""A transformers TF causal LM -> one ONNX decoder graph with a key/value cache, and its parity gate.

The graph (`DECODER_INPUTS`, `past.{i}.key/value` in; `logits`, `present.{i}.key/value` out) serves
both the prefill and every decode step: a prefill passes a past 0 positions long. `attention_mask`
covers past + new positions and `position_ids` the new ones, so a left-padded batch keeps each row's
positions counting from its first real token, as transformers' own TF `generate` numbers them.

Supported: `TFMistralForCausalLM` (Llama-architecture checkpoints load as Mistral; no sliding window)
and `TFGPT2LMHeadModel`. TensorFlow side; `tfsft.generation` runs the graph without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from tfsft import artifacts, memory
from tfsft.errors import ArtifactError, ConfigError
from tfsft.export import (
    _add_weights,
    _compacting,
    _dropped_warnings,
    _FrozenGraph,
    _register_erfc_handler,
    _save_graph,
    bundle_work_dir,
    publish_bundle,
    quantize_int8,
    save_onnx,
)
from tfsft.generation import (
    DECODER_INPUTS,
    LOGITS_OUTPUT,
    METADATA_MAX_POSITIONS,
    METADATA_MODEL_TYPE,
    DecoderSession,
    generate,
    left_padded,
    past_names,
    present_names,
)
from tfsft.modeling import float32_model, quiet_transformers, tf

DECODER_OPSET = 17
IDS_DTYPE = "int64"
"""Dtype of input_ids, attention_mask and position_ids in the graph (what onnxruntime decoders take)."""
FP32_TOLERANCE = 5e-4
"""Largest |ONNX logit - Keras logit| accepted for an fp32 decoder whose logits stay within +-10
(`TOLERANCE_SCALE`); beyond, the same share of its largest |logit|. Float32 rounding grows with
the values it sums and with depth: a 30-layer decoder's logits over a large vocabulary reach tens,
where kernels that sum in another order differ by more than an encoder's classification logits
do. A real fault (a wrong rotary layout, mask or cache position) moves logits by whole units, and
the gate's other half, identical greedy tokens, is exact."""
TOLERANCE_SCALE = 10.0
SUPPORTED_MODEL_TYPES = frozenset({"mistral", "gpt2"})


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """What the cache inputs of a decoder look like: `[batch, kv_heads, past, head_dim]` per layer."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int


def decoder_shape(model) -> DecoderShape:
    """Read the cache layout from the model's config; refuse models this export cannot trace."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"cannot export {type(model).__name__} as a decoder with a cache: expected one of "
            f"{sorted(SUPPORTED_MODEL_TYPES)}. Received: model_type={model_type!r}"
        )
    if model_type == "gpt2":
        heads = config.n_head
        return DecoderShape(model_type, config.n_layer, heads, config.n_embd // heads, config.vocab_size, config.n_positions)
    if getattr(config, "sliding_window", None) is not None:
        raise ConfigError(
            "cannot export a Mistral decoder with a sliding window: its TF attention ignores the window, so "
            "Keras and a served model would disagree past it; expected sliding_window=None. "
            f"Received: sliding_window={config.sliding_window}"
        )
    heads = config.num_attention_heads
    return DecoderShape(
        model_type, config.num_hidden_layers, config.num_key_value_heads, config.hidden_size // heads,
        config.vocab_size, config.max_position_embeddings,
    )


# ------------------------------------------------------------------------------------ tracing


def _mistral_attention_call(layer):
    """TFMistralAttention.call, traceable with a past of unknown length.

    transformers sizes its rotary table as `q_len + past.shape[-2]`, a static length that is None
    when the past length is a graph input, and reads the table's frequencies from a tensor made
    eagerly at build time, which a traced function captures as an extra graph input (tf2onnx leaves
    it one). This version computes the angles at `position_ids` from those frequencies as a constant
    of the graph: the same products, hence the same cos and sin, without a table. The rest is
    transformers' code unchanged.
    """
    module = sys.modules[type(layer).__module__]
    from transformers.tf_utils import shape_list, stable_softmax

    frequencies = np.asarray(layer.rotary_emb.inv_freq, dtype=np.float32)

    def call(hidden_states, attention_mask=None, position_ids=None, past_key_value=None, output_attentions=False,
             use_cache=False, training=None, **kwargs):
        bsz, q_len, _ = shape_list(hidden_states)

        def heads(states, count):
            return tf.transpose(tf.reshape(states, (bsz, q_len, count, layer.head_dim)), perm=(0, 2, 1, 3))

        query = heads(layer.q_proj(hidden_states), layer.num_heads)
        key = heads(layer.k_proj(hidden_states), layer.num_key_value_heads)
        value = heads(layer.v_proj(hidden_states), layer.num_key_value_heads)
        angles = tf.cast(position_ids, tf.float32)[:, :, None] * tf.constant(frequencies)[None, None, :]
        angles = tf.concat([angles, angles], axis=-1)[:, None]
        cos, sin = tf.cast(tf.cos(angles), value.dtype), tf.cast(tf.sin(angles), value.dtype)
        query = query * cos + module.rotate_half(query) * sin
        key = key * cos + module.rotate_half(key) * sin
        if past_key_value is not None:
            key = tf.concat([past_key_value[0], key], axis=2)
            value = tf.concat([past_key_value[1], value], axis=2)
        present = (key, value) if use_cache else None
        key = module.repeat_kv(key, layer.num_key_value_groups)
        value = module.repeat_kv(value, layer.num_key_value_groups)
        weights = tf.matmul(query, key, transpose_b=True) / np.sqrt(layer.head_dim)
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = tf.cast(stable_softmax(weights, axis=-1), query.dtype)
        output = tf.transpose(tf.matmul(weights, value), perm=(0, 2, 1, 3))
        output = layer.o_proj(tf.reshape(output, (bsz, q_len, layer.hidden_size)))
        return output, (weights if output_attentions else None), present

    return call


def _mistral_decoder_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length):
    """TFMistralMainLayer's attention mask without its `if past > 0` (a graph `If` once traced):
    the same sum of a padding term and a causal term, each 0 or the dtype's minimum."""
    dtype = inputs_embeds.dtype
    new = input_shape[-1]
    total = tf.shape(attention_mask)[-1]
    query = tf.range(new)[:, None] + (total - new)
    causal = tf.where(tf.range(total)[None, :] <= query, 0.0, dtype.min)
    padding = tf.where(tf.cast(attention_mask, tf.bool)[:, None, None, :], 0.0, dtype.min)
    return tf.cast(padding + causal[None, None], dtype)


@contextlib.contextmanager
def _traceable(model, shape: DecoderShape) -> Iterator[None]:
    """Give the model's attention layers their traceable `call` for the block (instance attributes,
    removed on exit: the model is left as it was)."""
    patched: list[tuple[Any, str]] = []
    if shape.model_type == "mistral":
        object.__setattr__(model.model, "_prepare_decoder_attention_mask", _mistral_decoder_mask)
        patched.append((model.model, "_prepare_decoder_attention_mask"))
        for decoder_layer in model.model.layers:
            attention = decoder_layer.self_attn
            object.__setattr__(attention, "call", _mistral_attention_call(attention))
            patched.append((attention, "call"))
    try:
        yield
    finally:
        for owner, name in patched:
            object.__delattr__(owner, name)


def _signature(shape: DecoderShape) -> list:
    ids = [tf.TensorSpec([None, None], getattr(tf, IDS_DTYPE), name=name) for name in DECODER_INPUTS]
    cache = [
        tf.TensorSpec([None, shape.num_kv_heads, None, shape.head_dim], tf.float32, name=name)
        for name in past_names(shape.num_layers)
    ]
    return ids + cache


def _past_structure(shape: DecoderShape, cache: Sequence) -> tuple:
    """The flat `past.{i}.key, past.{i}.value` inputs in the model's own format: (key, value) pairs
    for Mistral, one stacked `[2, ...]` tensor per layer for GPT-2."""
    pairs = [(cache[2 * i], cache[2 * i + 1]) for i in range(shape.num_layers)]
    if shape.model_type == "gpt2":
        return tuple(tf.stack(pair, axis=0) for pair in pairs)
    return tuple(pairs)


def _flat_presents(shape: DecoderShape, presents: Sequence) -> list:
    if shape.model_type == "gpt2":
        return [half for layer in presents for half in tf.unstack(layer, num=2, axis=0)]
    return [half for layer in presents for half in layer]


def decoder_function(model, shape: Optional[DecoderShape] = None):
    """The decoder step as a tf.function over the graph's inputs; returns a dict by output name.
    Trace it (get_concrete_function) inside `_traceable(model, shape)`."""
    shape = shape or decoder_shape(model)
    signature = _signature(shape)
    outputs = [LOGITS_OUTPUT, *present_names(shape.num_layers)]

    @tf.function(input_signature=signature)
    def decoder(input_ids, attention_mask, position_ids, *cache):
        result = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=_past_structure(shape, cache), use_cache=True, training=False, return_dict=True,
        )
        flat = [tf.cast(result.logits, tf.float32), *_flat_presents(shape, result.past_key_values)]
        return dict(zip(outputs, flat))

    return decoder, signature


def convert_decoder(model, path: str | os.PathLike, *, opset: int = DECODER_OPSET) -> DecoderShape:
    """Convert `model` (float32 copy if it computes in mixed precision) to one ONNX decoder at `path`,
    written atomically. Returns the cache layout."""
    shape = decoder_shape(model)
    model = float32_model(model)
    _register_erfc_handler()
    decoder, signature = decoder_function(model, shape)
    metadata = {METADATA_MODEL_TYPE: shape.model_type, METADATA_MAX_POSITIONS: str(shape.max_positions)}
    convert_function(decoder, signature, path, opset, metadata, "decoder", _traceable(model, shape))
    return shape


def convert_function(function, signature: Sequence, path: str | os.PathLike, opset: int, metadata: dict[str, str],
                     what: str, tracing: Any) -> None:
    """Trace `function` on `signature` (inside the `tracing` context: the model's tracing patches) and
    write it, with `metadata`, as one ONNX file at `path`, atomically.

    The conversion is `tfsft.export.convert_to_onnx`'s (weights frozen and taken out of the TF graph
    at once, joining the ONNX graph only before tf2onnx's optimizers, which run without their
    per-pass copies): `tf2onnx.convert.from_function` holds many copies of the weights at once.
    """
    import onnx
    from tf2onnx import optimizer as onnx_optimizer
    from tf2onnx.tfonnx import process_tf_graph

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as work:
        converted = Path(work) / f"{what}.onnx"
        try:
            with tracing, quiet_transformers(), tf.device("/cpu:0"):
                frozen = _frozen_function(function.get_concrete_function(*signature))
            memory.release_memory()
            with tf.Graph().as_default() as tf_graph:
                tf.import_graph_def(frozen.graph_def, name="")
                graph = process_tf_graph(
                    tf_graph, continue_on_error=True, opset=opset, input_names=frozen.inputs,
                    output_names=frozen.outputs, tensors_to_rename=frozen.renames,
                )
            del tf_graph
            _add_weights(graph, frozen.weights)
            del frozen
            memory.release_memory()
            detached: weakref.WeakSet = weakref.WeakSet()
            optimizers = {name: _compacting(factory, detached) for name, factory in onnx_optimizer._get_optimizers().items()}
            graph = onnx_optimizer.optimize_graph(graph, catch_errors=False, optimizers=optimizers)
            _save_graph(graph, converted)
            del graph
        except Exception as error:
            raise ArtifactError(f"{what} ONNX conversion failed ({_innermost_message(error)})") from None
        memory.release_memory()
        proto = onnx.load(str(converted))
    _two_dimensional_weights(proto)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with artifacts.atomic_path(path) as tmp:
        save_onnx(proto, tmp)


def _frozen_function(concrete) -> _FrozenGraph:
    """A concrete function as a frozen, grappler-optimized TF graph whose weights are placeholders,
    their values kept aside: `tfsft.export._frozen_graph` for a function with any signature."""
    from tensorflow.core.framework import graph_pb2
    from tf2onnx import tf_loader
    from tf2onnx.convert import tensor_names_from_structed

    inputs = [t.name for t in concrete.inputs if t.dtype != tf.dtypes.resource]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    renames = tensor_names_from_structed(concrete, inputs, outputs)
    variables = {t.op.name for t in concrete.graph.internal_captures}
    graph_def = tf_loader.convert_variables_to_constants_large_model(concrete)
    del concrete
    weights: dict[str, np.ndarray] = {}
    for node in graph_def.node:
        tensor = node.attr["value"].tensor if node.op == "Const" else None
        if tensor is None or node.name not in variables or not tensor.tensor_content:
            continue
        dtype = tf.dtypes.as_dtype(tensor.dtype)
        weights[node.name] = np.frombuffer(tensor.tensor_content, dtype.as_numpy_dtype).reshape(
            [dim.size for dim in tensor.tensor_shape.dim])
        node.op = "Placeholder"
        node.attr["shape"].shape.CopyFrom(tensor.tensor_shape)
        del node.attr["value"]
        node.attr["dtype"].type = dtype.as_datatype_enum
    compact = graph_pb2.GraphDef()
    compact.CopyFrom(graph_def)
    del graph_def, node, tensor
    graph_def = tf_loader.fix_freezing_errors_part2(compact)
    with tf.Graph().as_default() as graph, tf_loader.tf_session(graph=graph) as session:
        tf.import_graph_def(graph_def, name="")
        graph_def = tf_loader.tf_optimize(tf_loader.inputs_without_resource(session, inputs), outputs, graph_def)
    return _FrozenGraph(graph_def, weights, inputs, outputs, renames)


def _two_dimensional_weights(proto) -> int:
    """Give every MatMul weight of shape `[1, ..., 1, k, n]` its 2-D shape `[k, n]`; returns how many.

    GPT-2's tied head multiplies `[batch, new, hidden]` by the embedding table transposed, which
    tf2onnx folds into a `[1, hidden, vocab]` constant. onnxruntime's int8 MatMuls take a 2-D weight
    (MatMulNBits by definition; the dynamic quantizer's per-column scales fail at run time with "b
    zero point is not valid"), and the product is the same for a left operand of rank 3 or more,
    which shape inference confirms before each rewrite.
    """
    from onnx import numpy_helper, shape_inference

    graph = proto.graph
    weights = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    candidates = [
        node for node in graph.node
        if node.op_type == "MatMul" and node.input[1] in weights and users[node.input[1]] == 1
        and len(weights[node.input[1]].dims) > 2 and all(d == 1 for d in weights[node.input[1]].dims[:-2])
    ]
    if not candidates:
        return 0
    inferred = shape_inference.infer_shapes(proto)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info
             if v.type.tensor_type.HasField("shape")}
    del inferred
    rewritten = 0
    for node in candidates:
        weight = weights[node.input[1]]
        if ranks.get(node.input[0], 0) < len(weight.dims):
            continue
        value = numpy_helper.to_array(weight)
        weight.CopyFrom(numpy_helper.from_array(value.reshape(value.shape[-2:]), weight.name))
        rewritten += 1
    return rewritten


def _innermost_message(error: Exception) -> str:
    """The line that says what went wrong: a traced function's error wraps it in "in user code:",
    tracebacks and layer call arguments, and the last `SomethingError: ...` line is the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return causes[-1] if causes else f"{type(error).__name__}: {lines[0] if lines else ''}"


PREPROCESS_WARNING = "Please consider to run pre-processing before quantization"
"""What onnxruntime's quantizer logs for any graph without its shape-inference pre-pass: dynamic
quantization of the MatMul weights needs no activation shapes."""


INT8_METHODS = frozenset({"blockwise", "dynamic"})
INT8_BLOCK_SIZE = 32
"""`blockwise` int8: one scale per 32 input rows of each weight column, and per 32 values of each
activation row."""
INT8_ACCURACY_LEVEL = 4
"""MatMulNBits computing in int8. Its float-activation levels (0 to 3) dequantize the 8-bit weights
on every call on CPU, which makes a decoder slower than in float32."""


def quantize_decoder(source: str | os.PathLike, target: str | os.PathLike, *, method: str = "blockwise") -> None:
    """An int8 copy of the decoder, written atomically.

    `blockwise` (default): every MatMul by a constant weight becomes onnxruntime's `MatMulNBits`
    with 8-bit weights, one scale per `INT8_BLOCK_SIZE` rows of a column, computing in int8 on
    activations quantized in blocks of the same size.
    `dynamic`: the encoders' quantizer (`tfsft.export.quantize_int8`): one scale per weight column
    but one per activation tensor. The residual stream of Llama-family models carries a few
    channels far larger than the rest, which then set the step for every value of the tensor
    (in a prefill, for every position of the batch); blocks confine them to their own 32 values.
    """
    if method not in INT8_METHODS:
        raise ConfigError(f"unknown int8 method: expected one of {sorted(INT8_METHODS)}. Received: method={method!r}")
    if method == "dynamic":
        with artifacts.atomic_path(target) as tmp, _dropped_warnings(PREPROCESS_WARNING):
            quantize_int8(Path(source), Path(tmp))
        return
    import onnx

    proto = onnx.load(str(source))
    _int8_weights(proto.graph, INT8_BLOCK_SIZE)
    if not any(opset.domain == "com.microsoft" for opset in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    with artifacts.atomic_path(target) as tmp:
        save_onnx(proto, tmp)


def _int8_weights(graph, block_size: int) -> int:
    """Replace each `MatMul(x, W)` whose W is a 2-D float32 initializer by `MatMulNBits(x, Wq, scales)`
    (symmetric int8, zero point 128, rows padded to whole blocks, int8 compute); returns how many."""
    from onnx import TensorProto, helper, numpy_helper

    weights = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    nodes = list(graph.node)
    replaced: dict[str, int] = {}
    for index, node in enumerate(nodes):
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        value = numpy_helper.to_array(weights[node.input[1]])
        rows, columns = value.shape
        blocks = -(-rows // block_size)
        padded = np.zeros((blocks * block_size, columns), np.float32)
        padded[:rows] = value
        grouped = padded.T.reshape(columns, blocks, block_size)
        scales = np.abs(grouped).max(axis=-1) / 127.0
        scales[scales == 0] = 1.0
        quantized = (np.clip(np.round(grouped / scales[..., None]), -127, 127) + 128).astype(np.uint8)
        name = f"{node.input[1]}_int8"
        if name not in replaced:
            graph.initializer.extend([numpy_helper.from_array(quantized, name),
                                      numpy_helper.from_array(scales.astype(np.float32).reshape(-1), f"{name}_scales")])
        replaced[name] = replaced.get(name, 0) + 1
        nodes[index] = helper.make_node(
            "MatMulNBits", [node.input[0], name, f"{name}_scales"], list(node.output), name=node.name,
            domain="com.microsoft", K=rows, N=columns, bits=8, block_size=block_size, accuracy_level=INT8_ACCURACY_LEVEL,
        )
    still_used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return sum(replaced.values())


# ------------------------------------------------------------------------------------- parity


@dataclasses.dataclass(frozen=True)
class DecoderParity:
    """How closely the ONNX decoder reproduces Keras on the parity prompts."""

    prefill_max_abs_diff: float
    """Largest logit difference over the real (not padding) positions of a left-padded prefill."""
    cached_max_abs_diff: float
    """Largest logit difference of decode steps run with the cache, against Keras on the whole sequence."""
    logit_scale: float
    """Largest |Keras logit| at those positions."""
    greedy_prompts: int
    greedy_identical: int
    """Prompts whose ONNX greedy continuation equals Keras' greedy `generate`, token for token."""

    def allowed_diff(self, tolerance: float) -> float:
        return tolerance * max(1.0, self.logit_scale / TOLERANCE_SCALE)

    def passed(self, tolerance: float) -> bool:
        allowed = self.allowed_diff(tolerance)
        return (
            self.prefill_max_abs_diff <= allowed and self.cached_max_abs_diff <= allowed
            and self.greedy_identical == self.greedy_prompts
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def keras_logits(model, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Keras logits for a whole (padded) batch, no cache."""
    with quiet_transformers():
        out = model(input_ids=tf.constant(ids), attention_mask=tf.constant(mask),
                    position_ids=tf.constant(positions), training=False)
    return np.asarray(out.logits, dtype=np.float32)


def keras_greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: Optional[int],
                 pad_token_id: int) -> list[list[int]]:
    """Keras' own greedy `generate` on the left-padded batch of `prompts`: each row's new tokens, up
    to and without eos (None: no eos, as for `tfsft.generation.generate`)."""
    from tfsft.evaluation import keras_generate

    return keras_generate(model, prompts, max_new_tokens, eos_token_id, pad_token_id, batch_size=max(len(prompts), 1))


@dataclasses.dataclass(frozen=True)
class KerasReference:
    """What Keras computes on the parity prompts: once, for every ONNX model compared with it."""

    ids: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    logits: np.ndarray
    """Logits of the left-padded batch, no cache."""
    greedy: list[list[int]]
    max_new_tokens: int
    eos_token_id: Optional[int]
    pad_token_id: int


def keras_reference(
    model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 8, eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
) -> KerasReference:
    """Keras' logits and greedy tokens on `prompts` (token ids), left-padded with `pad_token_id`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError(
            f"decoder parity needs prompts of at least one token. Received: prompt lengths={[len(p) for p in prompts]}"
        )
    ids, mask, positions = left_padded(prompts, pad_token_id)
    return KerasReference(
        ids, mask, positions, keras_logits(model, ids, mask, positions),
        keras_greedy(model, prompts, max_new_tokens, eos_token_id, pad_token_id),
        max_new_tokens, eos_token_id, pad_token_id,
    )


def check_decoder_parity(path: str | os.PathLike, reference: KerasReference) -> DecoderParity:
    """Compare the ONNX decoder at `path` with Keras on the reference prompts:

    - prefill: logits of the left-padded batch (past 0 long), at the real positions;
    - cache: the batch's first half prefilled, the rest fed one token per step through the cache,
      against the whole batch's logits at those positions;
    - greedy: `tfsft.generation.generate` over ONNX against Keras' greedy `generate`.
    """
    session = DecoderSession(path)
    ids, mask, positions = reference.ids, reference.mask, reference.positions
    logits, _ = session.run(ids, mask, positions, session.empty_past(len(ids)))
    real = mask.astype(bool)
    prefill = float(np.max(np.abs(logits[real] - reference.logits[real])))
    cached = _cached_diff(session, reference)
    prompts = [list(row[keep]) for row, keep in zip(ids, real)]
    onnx = generate(session, prompts, max_new_tokens=reference.max_new_tokens, eos_token_id=reference.eos_token_id,
                    pad_token_id=reference.pad_token_id)
    identical = sum(result.tokens == keras for result, keras in zip(onnx, reference.greedy))
    scale = float(np.max(np.abs(reference.logits[real])))
    return DecoderParity(prefill, cached, scale, len(prompts), identical)


def _cached_diff(session: DecoderSession, reference: KerasReference) -> float:
    """Largest logit difference when the padded batch's second half is fed one token per step."""
    ids, mask, positions = reference.ids, reference.mask, reference.positions
    split = max(1, ids.shape[1] // 2)
    logits, past = session.run(ids[:, :split], mask[:, :split], positions[:, :split], session.empty_past(len(ids)))
    worst = 0.0
    for t in range(split, ids.shape[1]):
        logits, past = session.run(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], past)
        real = mask[:, t].astype(bool)
        if real.any():
            worst = max(worst, float(np.max(np.abs(logits[real, 0] - reference.logits[real, t]))))
    return worst


def export_decoder(
    model, path: str | os.PathLike, prompts: Sequence[Sequence[int]], *, eos_token_id: Optional[int] = None,
    pad_token_id: int = 0, max_new_tokens: int = 8, tolerance: float = FP32_TOLERANCE,
    int8_path: Optional[str | os.PathLike] = None,
) -> dict[str, Any]:
    """Convert, check parity on `prompts`, and keep the ONNX file only if it passed; optionally an
    int8 copy too (its parity is reported, not required: int8 moves logits by design).

    Returns a report: the cache layout and each model's parity. Raises ArtifactError, leaving no
    file at `path`, when the fp32 decoder misses the tolerance or a greedy continuation differs.
    """
    model = float32_model(model)
    path = Path(path)
    staging = path.with_name(f".{path.name}.unchecked")
    int8_staging = Path(int8_path).with_name(f".{Path(int8_path).name}.unchecked") if int8_path is not None else None
    try:
        shape = convert_decoder(model, staging)
        reference = keras_reference(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                    pad_token_id=pad_token_id)
        parity = check_decoder_parity(staging, reference)
        if not parity.passed(tolerance):
            raise ArtifactError(
                f"the ONNX decoder does not reproduce Keras: expected logits within {parity.allowed_diff(tolerance):.3g} "
                f"and identical greedy tokens. Received: {parity.as_dict()}"
            )
        report: dict[str, Any] = {"shape": dataclasses.asdict(shape), "fp32": parity.as_dict()}
        if int8_staging is not None:
            quantize_decoder(staging, int8_staging)
            report["int8"] = check_decoder_parity(int8_staging, reference).as_dict()
            os.replace(int8_staging, Path(int8_path))
        os.replace(staging, path)
    finally:
        for leftover in (staging, int8_staging):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
    return report


PARITY_PROMPTS = 8
PARITY_NEW_TOKENS = 8
PARITY_PROMPT_TOKENS = 96
"""The decoder bundle's parity gate: the first validation prompts, their last tokens only (the gate
compares every position of a padded batch, so long prompts cost time and prove nothing more)."""


def export_decoder_bundle(model, run_dir: str | os.PathLike, validation: Any, config: Any) -> dict[str, Any]:
    """Export a fine-tuned causal LM run to `run_dir/onnx/`: the decoder with its cache (and int8
    when the run's variants ask for it), its tokenizer and prompt format, and the report of the
    parity gate on validation prompts. Nothing is published unless the fp32 decoder passes."""
    import time

    from tfsft.checkpoint import load_tokenizer, text_encoder
    from tfsft.tasks import get_task

    run_dir = Path(run_dir)
    model_dir = artifacts.run_model_dir(run_dir)
    tokenizer = load_tokenizer(model_dir)
    encoder = text_encoder(tokenizer, config.data.max_seq_length)
    prompt_format = encoder.prompt_format
    gated = validation.subset(range(min(PARITY_PROMPTS, len(validation))))  # only these are encoded
    _, _, reference = get_task(config.model.task).encode(encoder, gated, None, config.data)
    prompts = [ids[-PARITY_PROMPT_TOKENS:] for ids in reference.prompt_ids if ids]
    eos = prompt_format.eos_token_ids
    with bundle_work_dir(run_dir) as work:
        start = time.perf_counter()
        int8 = "int8" in config.export.variants
        report = export_decoder(
            model, work / artifacts.BUNDLE_MODEL, prompts, eos_token_id=eos[0] if eos else None, pad_token_id=encoder.pad_id,
            max_new_tokens=PARITY_NEW_TOKENS, int8_path=work / artifacts.BUNDLE_MODEL_INT8 if int8 else None,
        )
        report.update(seconds=round(time.perf_counter() - start, 3), parity_prompts=len(prompts),
                      parity_new_tokens=PARITY_NEW_TOKENS)
        files = {"model": artifacts.BUNDLE_MODEL, **({"int8": artifacts.BUNDLE_MODEL_INT8} if int8 else {})}
        report["sizes_bytes"] = {name: (work / name).stat().st_size for name in files.values()}
        shape = report["shape"]
        metadata = {
            "format_version": 2, "task": config.model.task, "model_name": config.model.model_name_or_path,
            "model_type": shape["model_type"], "labels": [], "id2label": {}, "max_seq_length": int(shape["max_positions"]),
            "inputs": list(DECODER_INPUTS), "input_dtype": IDS_DTYPE, "output": LOGITS_OUTPUT, "pad_id": encoder.pad_id,
            "files": files, "decision": {}, "prompt_format": prompt_format.to_dict(),
            **get_task(config.model.task).bundle_settings(config.data),
        }
        artifacts.write_json(work / artifacts.BUNDLE_FILE, metadata)
        publish_bundle(work, run_dir, config, report, model_dir / artifacts.BUNDLE_TOKENIZER)
    return report
