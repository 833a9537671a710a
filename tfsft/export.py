"""Keras classifier -> verified ONNX bundle: convert, fuse, quantize, check parity, publish.

The bundle (`RUN_DIR/onnx/`) is built in a temporary sibling directory and renamed into place
only after every fp32 model matched the Keras logits, so a directory named `onnx` always holds
models that were checked. Model inputs are int32 (`INPUT_DTYPE`), the dtype the training
pipeline feeds, with dynamic batch and sequence axes; the output is `logits`. It ships the
models `--export_variants` names (`ExportConfig.variants`), nothing else.

Memory: the export holds few copies of the weights at once (the measures are in
`convert_to_onnx`, `optimize`, `quantize_int8` and `save_onnx`), and its report names every
stage with its seconds and peak RSS (`tfsft.memory`).

Why the graph is rewritten before onnxruntime's transformer optimizer runs: tf2onnx writes
Keras Dense layers as Reshape-MatMul-Reshape ("Tensordot"), LayerNorm as GlobalAveragePool
moments, the exact GELU through `Erfc` and the attention reshapes with shapes computed at run
time. None of these match the optimizer's fusion patterns (it fused nothing). `canonicalize`
rewrites each subgraph into the mathematically equal form a PyTorch export has, which the
optimizer's `bert` fusions recognise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from tfsft import artifacts, memory
from tfsft.config import LOWER_IS_BETTER, ExportConfig, RunConfig
from tfsft.data import Examples, LabelMap, LengthBatchedData
from tfsft.errors import ArtifactError
from tfsft.evaluation import concat_padded, predict_logits, task_metrics
from tfsft.tasks import get_task
from tfsft.tasks.multilabel import DEFAULT_MULTILABEL_THRESHOLD
from tfsft.tasks.ner import TokenExamples
from tfsft.modeling import feature_names, float32_model, float32_policy, tf
from tfsft.tokenize import EncodedTexts, TextEncoder, pad_batch

INPUT_DTYPE = "int32"
"""Dtype of every model input: what `tfsft.tokenize.pad_batch` produces for training too."""
OUTPUT_NAME = "logits"
FP32_TOLERANCE = 1e-4
"""Largest |ONNX logit - Keras logit| accepted for an fp32 model."""
PARITY_SETS = {
    "batch_1": "one example at a time",
    "batch_8": "batches of 8 sorted by length",
    "batch_8_padded": "shuffled batches of 8 of mixed lengths, every other one padded to max_seq_length",
}
"""The batches every fp32 model must reproduce Keras on: sorted batches carry almost no padding
(and one example none), so only the shuffled, padded ones test the attention mask."""
PARITY_BATCH_SIZE = 8
MAX_SINGLE_EXAMPLES = 32
"""Batch-size-1 parity runs on this many examples spread over the length range (it is slow)."""
PADDED_PARITY_EXAMPLES = 256
"""The shuffled, padded parity batches take a seeded random sample of this many examples."""
PARITY_SEED = 0
"""Seed of that sample and its order: every export of a run checks the same batches."""
FORMAT_VERSION = 2
"""2: `files` lists only the models shipped (`--export_variants`); 1 always had model, fused (and int8)."""
RECORD_VERSION = 1
EXTERNAL_DATA_SUFFIX = ".data"
"""`model.onnx` keeps external weights in `model.onnx.data`, as onnxruntime's tools name them."""
EXTERNAL_DATA_AUTO_BYTES = 2**30
"""`--external_data auto` stores weights beyond this as external data: well under protobuf's 2 GiB
limit, which the graph and the optimizers' added tensors share with the weights."""
PROTOBUF_LIMIT_BYTES = 2**31
EXTERNAL_MIN_BYTES = 1024
"""Tensors smaller than this stay inside an ONNX file stored with external data (onnx's default)."""


@dataclass(frozen=True)
class ParityResult:
    """How one ONNX model compares with the Keras model on the evaluation examples.

    `score` is the run's parity score (`score_name`: accuracy, F1, Spearman, ...) against the labels.
    """

    max_abs_diff: float
    label_agreement: Optional[float]
    """Over the `decided` predictions (see `label_agreement`); None for regression, or none decided."""
    score: float
    examples: int
    score_name: str = "accuracy"
    decided: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_logit_diff": self.max_abs_diff,
            "label_agreement": self.label_agreement,
            "decided_predictions": self.decided,
            self.score_name: self.score,
            "examples": self.examples,
        }


def parity_score_name(task: str, metric: str) -> str:
    """The score the int8 model is compared in: the run's --metric_for_best_model (MRPC's F1, say),
    or the task's main metric when that is a loss, where a "drop" would read backwards."""
    return get_task(task).best_metrics[0] if metric in LOWER_IS_BETTER else metric


# ------------------------------------------------------------------------------------ conversion

_ERFC_REGISTERED = False


def _register_erfc_handler() -> None:
    """Teach tf2onnx `Erfc(x) = 1 - Erf(x)`: TF's exact GELU emits Erfc, which it cannot convert."""
    global _ERFC_REGISTERED
    if _ERFC_REGISTERED:
        return
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:  # noqa: F841 - registered by the decorator
        @classmethod
        def version_1(cls, ctx, node, **kwargs):
            dtype = ctx.get_dtype(node.input[0])
            from onnx import helper

            one = ctx.make_const(f"{node.name}__one", np.array(1, dtype=helper.tensor_dtype_to_np_dtype(dtype)))
            erf = ctx.make_node("Erf", [node.input[0]], name=f"{node.name}__erf")
            outputs = node.output
            ctx.remove_node(node.name)
            ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=outputs, name=node.name)

    _ERFC_REGISTERED = True


def convert_to_onnx(
    model, path: Path, opset: int, *, external_data: bool = False, outputs: Optional[Outputs] = None
) -> list[str]:
    """Convert the Keras classifier with tf2onnx; returns the input names, in order. `outputs`:
    the graph's named outputs from the model and its input features (default: `logits` alone).

    The steps are tf2onnx's `convert.from_function` (freeze, grappler, tf2onnx's handlers and
    optimizers, save), arranged so that few copies of the weights are alive at once:

    - the variables are frozen into constants and taken out of the graph at once: grappler and
      tf2onnx's handlers convert a graph whose weights are placeholders, and the weights join
      the ONNX graph as constants only before tf2onnx's optimizers (which fold and move them);
    - those optimizers run without their per-pass deep copy of the graph (`catch_errors`), and
      each pass ends by moving the node protos into fresh memory (`_compact_node_protos`).

    The weights are written to `PATH.data` beside the graph (ONNX external data) as they leave
    the graph; without `external_data` they are then moved into the ONNX file.
    """
    from tf2onnx import optimizer as onnx_optimizer
    from tf2onnx.tfonnx import process_tf_graph

    _register_erfc_handler()
    names = list(feature_names(model))
    try:
        with tf.device("/cpu:0"):
            with memory.stage("convert/freeze"):
                frozen = _frozen_graph(model, names, outputs)
            memory.release_memory()
            with memory.stage("convert/tf2onnx"):
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
            with memory.stage("convert/optimize"):
                detached: weakref.WeakSet = weakref.WeakSet()
                optimizers = {
                    name: _compacting(factory, detached) for name, factory in onnx_optimizer._get_optimizers().items()
                }
                graph = onnx_optimizer.optimize_graph(graph, catch_errors=False, optimizers=optimizers)
            with memory.stage("convert/save"):
                _save_graph(graph, path)
                del graph
            if not external_data:
                memory.release_memory()
                with memory.stage("convert/inline"):
                    inline_external_data(path)
    except ArtifactError:
        raise
    except Exception as error:
        raise ArtifactError(f"ONNX conversion failed ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    return names


Outputs = Callable[[Any, dict[str, Any]], dict[str, Any]]
"""(model, input features) -> {ONNX output name: tensor}: what a converted graph computes."""


def _logits_output(model, features: dict[str, Any]) -> dict[str, Any]:
    """A classifier's one output, `logits`."""
    return {OUTPUT_NAME: model(features, training=False).logits}


@dataclass
class _FrozenGraph:
    """A frozen, optimized TF graph whose weights are placeholders; their values in `weights`
    (by placeholder name)."""

    graph_def: Any
    weights: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    renames: dict[str, str]


def _frozen_graph(model, names: Sequence[str], outputs: Optional[Outputs] = None) -> _FrozenGraph:
    """The model's inference function as a frozen, grappler-optimized TF graph (as tf2onnx's
    `tf_loader.from_function` makes it), its weights taken out of it as soon as they are frozen.

    Grappler sees the weights as placeholders of their shape: there is nothing in them to fold,
    and it copies none of them several times.
    """
    from tensorflow.core.framework import graph_pb2
    from tf2onnx import tf_loader
    from tf2onnx.convert import tensor_names_from_structed

    signature = [tf.TensorSpec([None, None], getattr(tf, INPUT_DTYPE), name=name) for name in names]
    named_outputs = outputs or _logits_output

    @tf.function(input_signature=signature)
    def forward(*inputs):
        return named_outputs(model, dict(zip(names, inputs)))

    concrete = forward.get_concrete_function(*signature)
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.dtypes.resource]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    renames = tensor_names_from_structed(concrete, inputs, outputs)
    variables = {t.op.name for t in concrete.graph.internal_captures}
    graph_def = tf_loader.convert_variables_to_constants_large_model(concrete)
    del concrete, forward
    weights: dict[str, np.ndarray] = {}
    node = tensor = None
    for node in graph_def.node:
        tensor = node.attr["value"].tensor if node.op == "Const" else None
        if tensor is None or node.name not in variables or not tensor.tensor_content:
            continue
        dtype = tf.dtypes.as_dtype(tensor.dtype)
        shape = [dim.size for dim in tensor.tensor_shape.dim]
        weights[node.name] = np.frombuffer(tensor.tensor_content, dtype.as_numpy_dtype).reshape(shape)
        node.op = "Placeholder"
        node.attr["shape"].shape.CopyFrom(tensor.tensor_shape)
        del node.attr["value"]
        node.attr["dtype"].type = dtype.as_datatype_enum
    # The old message's memory holds every weight until it is freed, and any reference into it
    # (these loop variables too) keeps all of it.
    compact = graph_pb2.GraphDef()
    compact.CopyFrom(graph_def)
    del graph_def, node, tensor
    graph_def = tf_loader.fix_freezing_errors_part2(compact)
    with tf.Graph().as_default() as graph, tf_loader.tf_session(graph=graph) as session:
        tf.import_graph_def(graph_def, name="")
        graph_def = tf_loader.tf_optimize(tf_loader.inputs_without_resource(session, inputs), outputs, graph_def)
    return _FrozenGraph(graph_def, weights, inputs, outputs, renames)


def _add_weights(graph, weights: dict[str, np.ndarray]) -> None:
    """Replace each weight placeholder of the tf2onnx graph by a constant of its value, emptying
    `weights` as it goes (each value is freed once it is in the graph)."""
    for name in list(weights):
        value = weights.pop(name)
        output = f"{name}:0"
        node = graph.get_node_by_output(output)
        if node is None:  # grappler found it unused
            continue
        graph.remove_node(node.name)
        graph.make_const(output, value)


def _compacting(factory, detached: "weakref.WeakSet"):
    """A tf2onnx optimizer class whose passes end with `_compact_node_protos`."""

    class Compacting(factory):
        def optimize(self, graph, iteration):
            graph = super().optimize(graph, iteration)
            _compact_node_protos(graph, detached)
            return graph

    Compacting.__name__ = factory.__name__
    return Compacting


def _compact_node_protos(graph, detached: "weakref.WeakSet") -> None:
    """Give every node of a tf2onnx graph a fresh proto without attributes.

    Each tf2onnx optimizer pass rewrites every node's proto from the node's attributes
    (`Node.update_proto`, which runs again whenever the proto is used), copying the constants
    into it; protobuf's upb backend frees what a message held only with the whole message, so
    without this each pass keeps one more copy of the weights alive (there are tens of passes).
    A node's attributes start out inside its first proto: they are copied out once (`detached`),
    so that proto can go too. A tf2onnx whose nodes are built otherwise is left as it is.
    """
    import copy

    for node in graph.get_nodes():
        proto, attrs = getattr(node, "_op", None), getattr(node, "_attr", None)
        if proto is None or not isinstance(attrs, dict):
            return
        if node not in detached:
            node._attr = {name: copy.deepcopy(value) for name, value in attrs.items()}
            detached.add(node)
        del proto.attribute[:]
        fresh = type(proto)()
        fresh.CopyFrom(proto)
        node._op = fresh
        for body in (node.get_body_graphs() or {}).values():
            _compact_node_protos(body, detached)


def _save_graph(graph, path: Path) -> None:
    """Write a tf2onnx graph as an ONNX file with its weights as external data (`PATH.data`),
    each constant's bytes written out and dropped before the next: the whole model is never
    held in one message (tf2onnx's `make_model` copies the weights twice more)."""
    from onnx import TensorProto

    data = external_data_path(path)
    with open(data, "wb") as f:
        for node in graph.get_nodes():
            attr = node.get_attr("value") if node.is_const() else None
            tensor = attr.t if attr is not None else None
            if tensor is None or tensor.data_location == TensorProto.EXTERNAL or tensor.ByteSize() < EXTERNAL_MIN_BYTES:
                continue
            raw = tensor.raw_data if tensor.HasField("raw_data") else None
            if raw is None:
                continue
            stub = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            stub.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(f.tell())), ("length", str(len(raw)))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
            f.write(raw)
            del raw
            node.set_attr("value", stub)
    save_onnx(graph.make_model("converted from the Keras model by tfsft"), path)


def save_onnx(model, path: Path) -> None:
    """Write `model` as one ONNX file, one initializer at a time (emptying the graph's initializer
    list as it goes): the bytes a parser reads as `model`, in another field order, without the
    whole model serialized in memory (twice over, by protobuf's upb backend). Tensors that point
    to external data keep pointing there."""
    from onnx import GraphProto, ModelProto

    graph = model.graph
    tensors = list(graph.initializer)
    del graph.initializer[:]
    head = ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    graph_head = graph.SerializeToString()
    tag = _field_tag(GraphProto.DESCRIPTOR.fields_by_name["initializer"].number)
    sizes = [tensor.ByteSize() for tensor in tensors]
    graph_size = len(graph_head) + sum(len(tag) + len(_varint(size)) + size for size in sizes)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        f.write(_field_tag(ModelProto.DESCRIPTOR.fields_by_name["graph"].number) + _varint(graph_size))
        f.write(graph_head)
        for index, size in enumerate(sizes):
            f.write(tag + _varint(size))
            f.write(tensors[index].SerializeToString())
            tensors[index] = None


def _field_tag(number: int) -> bytes:
    """The key of a length-delimited protobuf field."""
    return _varint(number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def inline_external_data(path: Path) -> None:
    """Rewrite an ONNX file stored with external data as one self-contained file."""
    import onnx

    model = onnx.load(str(path))
    external_data_path(path).unlink(missing_ok=True)
    save_onnx(model, path)


def external_data_path(path: Path) -> Path:
    """Where the weights of an ONNX file stored as external data are: `PATH.data`."""
    return path.with_name(path.name + EXTERNAL_DATA_SUFFIX)


# ---------------------------------------------------------------------------- graph rewriting


class _Graph:
    """Producer/consumer lookups over an ONNX graph, and a queue of node replacements."""

    def __init__(self, model, prefix: str) -> None:
        self.model = model
        self.graph = model.graph
        self.constants = _Initializers(self.graph.initializer)
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in dict.fromkeys(node.input):
                self.consumers.setdefault(name, []).append(node)
        self.removed: set[int] = set()
        self.added: list = []
        self._count = 0
        self._prefix = f"tfsft_{prefix}"

    def parent(self, node, index: int, op_type: str):
        if index >= len(node.input):
            return None
        parent = self.producer.get(node.input[index])
        return parent if parent is not None and parent.op_type == op_type else None

    def children(self, name: str, op_type: str) -> list:
        return [n for n in self.consumers.get(name, []) if n.op_type == op_type]

    def only_child(self, name: str, op_type: str):
        nodes = self.consumers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None

    def scalar(self, name: str) -> Optional[float]:
        value = self.constants.get(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(()))

    def other_input(self, node, name: str) -> Optional[str]:
        others = [i for i in node.input if i != name]
        return others[0] if len(others) == 1 else None

    def const(self, values: Any, dtype: Any, hint: str) -> str:
        from onnx import numpy_helper

        self._count += 1
        name = f"{self._prefix}/{hint}_{self._count}"
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], output: Optional[str] = None, **attrs: Any) -> str:
        from onnx import helper

        self._count += 1
        name = f"{self._prefix}/{op_type}_{self._count}"
        out = output or f"{name}:0"
        self.added.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def remove(self, *nodes) -> None:
        self.removed.update(id(n) for n in nodes)

    def commit(self) -> None:
        """Apply the queued changes, drop dead nodes and initializers, and sort topologically."""
        nodes = [n for n in self.graph.node if id(n) not in self.removed] + self.added
        nodes = _live_nodes(nodes, [o.name for o in self.graph.output])
        del self.graph.node[:]
        self.graph.node.extend(_topological(nodes, {i.name for i in self.graph.input}))
        used = {name for n in self.graph.node for name in n.input}
        # Deleted one by one: re-adding the kept ones would copy every weight into the model again.
        for index in reversed([i for i, init in enumerate(self.graph.initializer) if init.name not in used]):
            del self.graph.initializer[index]


class _Initializers:
    """Initializer name -> numpy value, converted when asked: the rewrites read shapes and
    scalars, and only test whether a weight is a constant, so no weight is copied."""

    def __init__(self, initializers) -> None:
        self._protos = {init.name: init for init in initializers}

    def __contains__(self, name: object) -> bool:
        return name in self._protos

    def get(self, name: str) -> Optional[np.ndarray]:
        from onnx import numpy_helper

        proto = self._protos.get(name)
        return None if proto is None else numpy_helper.to_array(proto)


def _live_nodes(nodes: list, outputs: list[str]) -> list:
    producer = {out: n for n in nodes for out in n.output}
    needed, stack, live = set(outputs), list(outputs), set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        for name in node.input:
            if name and name not in needed:
                needed.add(name)
                stack.append(name)
    return [n for n in nodes if id(n) in live]


def _topological(nodes: list, graph_inputs: set[str]) -> list:
    """Nodes in dependency order (ONNX requires it); a cycle is a rewrite bug and fails loudly."""
    producer = {out: n for n in nodes for out in n.output}
    state: dict[int, int] = {}  # 1: being visited, 2: done
    ordered: list = []
    for root in nodes:
        stack = [(root, iter(root.input))]
        if state.get(id(root)):
            continue
        state[id(root)] = 1
        while stack:
            node, inputs = stack[-1]
            parent = next((producer[i] for i in inputs if i in producer and state.get(id(producer[i])) != 2), None)
            if parent is None:
                state[id(node)] = 2
                ordered.append(node)
                stack.pop()
            elif state.get(id(parent)) == 1:
                raise ArtifactError(f"graph rewrite produced a cycle through node {parent.name}")
            else:
                state[id(parent)] = 1
                stack.append((parent, iter(parent.input)))
    return ordered


def _collapse_tensordot(g: _Graph) -> int:
    """Reshape(x, [-1, K]) -> MatMul(W) -> Reshape(back)  ==>  MatMul(x, W) (ONNX MatMul broadcasts).

    When tf2onnx merged the restoring Reshape into a following one (an attention head split,
    with an explicit target shape), only the flattening is removed.
    """
    count = 0
    for matmul in list(g.graph.node):
        if matmul.op_type != "MatMul" or matmul.input[1] not in g.constants:
            continue
        flatten = g.parent(matmul, 0, "Reshape")
        restore = g.only_child(matmul.output[0], "Reshape")
        if flatten is None or restore is None:
            continue
        shape = g.constants.get(flatten.input[1])
        if shape is None or shape.size != 2 or int(shape[0]) != -1:
            continue
        if _restores_leading_dims(g, restore):
            g.node("MatMul", [flatten.input[0], matmul.input[1]], output=restore.output[0])
            g.remove(matmul, restore)
        else:  # tf2onnx merged the restoring Reshape into the next one (a head split): keep that
            matmul.input[0] = flatten.input[0]
        count += 1
    return count


def _restores_leading_dims(g: _Graph, restore) -> bool:
    """Whether a Reshape's shape is Concat(leading dims of the input, [N]): Tensordot's, not a head split."""
    shape = g.producer.get(restore.input[1])
    if shape is not None and shape.op_type == "Cast":
        shape = g.producer.get(shape.input[0])
    return shape is not None and shape.op_type == "Concat" and len(shape.input) == 2 and shape.input[1] in g.constants


def _canonical_layernorm(g: _Graph, opset: int) -> int:
    """TF moments/batchnorm LayerNorm ==> ReduceMean-Sub-Pow-ReduceMean-Add-Sqrt-Div-Mul-Add."""
    count = 0
    for mean in list(g.graph.node):
        if mean.op_type != "GlobalAveragePool":
            continue
        match = _match_tf_layernorm(g, mean)
        if match is None:
            continue
        x, eps, gamma, beta, out, nodes = match
        mean_out = _reduce_mean(g, x, opset)
        diff = g.node("Sub", [x, mean_out])
        variance = _reduce_mean(g, g.node("Pow", [diff, g.const(2.0, np.float32, "two")]), opset)
        std = g.node("Sqrt", [g.node("Add", [variance, g.const(eps, np.float32, "eps")])])
        scaled = g.node("Mul", [g.node("Div", [diff, std]), gamma])
        g.node("Add", [scaled, beta], output=out)
        g.remove(*nodes)
        count += 1
    return count


def _reduce_mean(g: _Graph, x: str, opset: int) -> str:
    if opset >= 18:
        return g.node("ReduceMean", [x, g.const([-1], np.int64, "axes")], keepdims=1)
    return g.node("ReduceMean", [x], axes=[-1], keepdims=1)


def _match_tf_layernorm(g: _Graph, mean):
    x = mean.input[0]
    sub = next((n for n in g.children(mean.output[0], "Sub") if list(n.input) == [x, mean.output[0]]), None)
    square = sub and g.only_child(sub.output[0], "Mul")
    if square is None or list(square.input) != [sub.output[0], sub.output[0]]:
        return None
    variance = g.only_child(square.output[0], "GlobalAveragePool")
    add_eps = variance and g.only_child(variance.output[0], "Add")
    eps = add_eps and g.scalar(g.other_input(add_eps, variance.output[0]) or "")
    sqrt = add_eps and g.only_child(add_eps.output[0], "Sqrt")
    reciprocal = sqrt and g.only_child(sqrt.output[0], "Reciprocal")
    scale = reciprocal and g.only_child(reciprocal.output[0], "Mul")
    if eps is None or scale is None:
        return None
    gamma = g.other_input(scale, reciprocal.output[0])
    scaled_x = next((n for n in g.children(scale.output[0], "Mul") if x in n.input), None)
    scaled_mean = next((n for n in g.children(scale.output[0], "Mul") if mean.output[0] in n.input), None)
    shift = scaled_mean and g.only_child(scaled_mean.output[0], "Sub")
    out = scaled_x and g.only_child(scaled_x.output[0], "Add")
    if gamma not in g.constants or shift is None or out is None or shift.output[0] not in out.input:
        return None
    beta = shift.input[0]
    if beta not in g.constants:
        return None
    nodes = (mean, sub, square, variance, add_eps, sqrt, reciprocal, scale, scaled_x, scaled_mean, shift, out)
    return x, eps, gamma, beta, out.output[0], nodes


def _canonical_gelu(g: _Graph) -> int:
    """0.5x * (1 - Erf(-x/sqrt2))  ==>  x * (1 + Erf(x / sqrt2)) * 0.5, the PyTorch GELU form."""
    count = 0
    for erf in list(g.graph.node):
        if erf.op_type != "Erf":
            continue
        scale = g.parent(erf, 0, "Mul")
        negate = scale and (g.parent(scale, 0, "Neg") or g.parent(scale, 1, "Neg"))
        factor = negate and g.scalar(g.other_input(scale, negate.output[0]) or "")
        if factor is None or abs(factor - 1 / np.sqrt(2)) > 1e-4:
            continue
        x = negate.input[0]
        complement = g.only_child(erf.output[0], "Sub")
        if complement is None or g.scalar(complement.input[0]) != 1.0:
            continue
        out = g.only_child(complement.output[0], "Mul")
        half = out and g.producer.get(g.other_input(out, complement.output[0]) or "")
        if half is None or half.op_type != "Mul" or x not in half.input:
            continue
        if g.scalar(g.other_input(half, x) or "") != 0.5 or len(g.consumers[half.output[0]]) != 1:
            continue
        erf_out = g.node("Erf", [g.node("Div", [x, g.const(np.sqrt(2.0), np.float32, "sqrt2")])])
        product = g.node("Mul", [x, g.node("Add", [erf_out, g.const(1.0, np.float32, "one")])])
        g.node("Mul", [product, g.const(0.5, np.float32, "half")], output=out.output[0])
        g.remove(scale, negate, erf, complement, out, half)
        count += 1
    return count


def _canonical_attention(g: _Graph, num_heads: int, hidden_size: int) -> int:
    """Constant head reshapes, Div scaling and the PyTorch mask form, around every Softmax."""
    masks: dict[str, str] = {}
    count = 0
    for softmax in list(g.graph.node):
        if softmax.op_type != "Softmax":
            continue
        add = g.parent(softmax, 0, "Add")
        scale = add and next((g.producer[i] for i in add.input if i in g.producer and g.producer[i].op_type == "Mul"
                              and g.parent(g.producer[i], 0, "MatMul")), None)
        scores = scale and g.parent(scale, 0, "MatMul")
        factor = scale and g.scalar(g.other_input(scale, scale.input[0]) or "")
        mask = add and scale and _match_tf_mask(g, g.other_input(add, scale.output[0]) or "")
        heads = scores and _head_reshapes(g, scores, softmax)
        if factor is None or not factor > 0 or mask is None or heads is None:
            continue
        mask_input, filter_value = mask
        if mask_input not in masks:
            masks[mask_input] = _pytorch_mask(g, mask_input, filter_value)
        scaled = g.node("Div", [scores.output[0], g.const(1.0 / factor, np.float32, "scale")])
        g.node("Add", [scaled, masks[mask_input]], output=add.output[0])
        g.remove(scale, add)
        head_shape = g.const([0, 0, num_heads, hidden_size // num_heads], np.int64, "head_shape")
        merged_shape = g.const([0, 0, hidden_size], np.int64, "merged_shape")
        for reshape in heads[:3]:
            _ensure_bias(g, reshape, hidden_size)
            reshape.input[1] = head_shape
        heads[3].input[1] = merged_shape
        _ensure_output_bias(g, heads[3], hidden_size)
        count += 1
    return count


def _match_tf_mask(g: _Graph, name: str) -> Optional[tuple[str, float]]:
    """(attention mask input, filter value) of `eps + (1 - cast(reshape(mask))) * filter`."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "Add":
        constant = next((i for i in node.input if g.scalar(i) is not None), None)
        if constant is None or abs(g.scalar(constant)) > 1e-6:  # adding a constant to all scores: no-op
            return None
        node = g.producer.get(g.other_input(node, constant) or "")
    if node is None or node.op_type != "Mul":
        return None
    sub = g.parent(node, 0, "Sub")
    filter_value = g.scalar(node.input[1])
    cast = sub and g.parent(sub, 1, "Cast")
    reshape = cast and g.parent(cast, 0, "Reshape")
    if filter_value is None or filter_value >= 0 or reshape is None or g.scalar(sub.input[0]) != 1.0:
        return None
    graph_inputs = {i.name for i in g.graph.input}
    if reshape.input[0] not in graph_inputs:
        return None
    return reshape.input[0], filter_value


def _pytorch_mask(g: _Graph, mask_input: str, filter_value: float) -> str:
    from onnx import TensorProto

    expanded = g.node("Unsqueeze", [g.node("Unsqueeze", [mask_input, g.const([1], np.int64, "axis")]),
                                    g.const([2], np.int64, "axis")])
    inverted = g.node("Sub", [g.const(1.0, np.float32, "one"), g.node("Cast", [expanded], to=TensorProto.FLOAT)])
    return g.node("Mul", [inverted, g.const(filter_value, np.float32, "filter")])


def _head_reshapes(g: _Graph, scores, softmax):
    """The Q, K, V head-splitting Reshapes and the head-merging Reshape of one attention block."""
    q = g.parent(scores, 0, "Transpose")
    k = g.parent(scores, 1, "Transpose")
    context = g.only_child(softmax.output[0], "MatMul")
    v = context and g.parent(context, 1, "Transpose")
    merge_t = context and g.only_child(context.output[0], "Transpose")
    merge = merge_t and g.only_child(merge_t.output[0], "Reshape")
    if q is None or k is None or v is None or merge is None:
        return None
    splits = [g.parent(t, 0, "Reshape") for t in (q, k, v)]
    if any(s is None or (g.parent(s, 0, "Add") or g.parent(s, 0, "MatMul")) is None for s in splits):
        return None
    return (*splits, merge)


def _ensure_bias(g: _Graph, split, hidden_size: int) -> None:
    """Give a bias-free projection (tf2onnx folds away zero biases) the Add the fusion expects."""
    if g.parent(split, 0, "MatMul") is not None:
        split.input[0] = g.node("Add", [split.input[0], g.const(np.zeros(hidden_size), np.float32, "zero_bias")])


def _ensure_output_bias(g: _Graph, merge, hidden_size: int) -> None:
    """Same for the attention output projection after the head-merging Reshape."""
    projection = g.only_child(merge.output[0], "MatMul")
    if projection is None or projection.input[1] not in g.constants:
        return
    bias = g.only_child(projection.output[0], "Add")
    if bias is not None and any(i in g.constants for i in bias.input):
        return
    original = projection.output[0]
    projection.output[0] = f"{original}__without_bias"
    g.node("Add", [projection.output[0], g.const(np.zeros(hidden_size), np.float32, "zero_bias")], output=original)


def canonicalize(model, num_heads: int, hidden_size: int, opset: int) -> dict[str, int]:
    """Rewrite tf2onnx subgraphs into the forms onnxruntime's BERT fusions match; returns counts."""
    counts = {}
    for name, rewrite in (
        ("tensordot", _collapse_tensordot),
        ("layernorm", lambda g: _canonical_layernorm(g, opset)),
        ("gelu", _canonical_gelu),
        ("attention", lambda g: _canonical_attention(g, num_heads, hidden_size)),
    ):
        graph = _Graph(model, name)
        counts[name] = rewrite(graph)
        graph.commit()
    del model.graph.value_info[:]  # shapes recorded by tf2onnx no longer describe the rewritten tensors
    return counts


def optimize(
    source: Path, target: Path, num_heads: int, hidden_size: int, opset: int, *, external_data: bool = False
) -> dict[str, Any]:
    """Canonicalize, then run onnxruntime's transformer optimizer; returns the fusion counts.
    `external_data`: store the weights of `target` in `TARGET.data`.

    The optimizer has no MPNet model type, and its BERT attention fusion has no pattern for MPNet's
    relative position bias (added to the scores before the mask): an MPNet gets its LayerNorm and
    GELU fusions only, its attention stays as converted, and parity is checked the same way."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    with memory.stage("optimize/canonicalize"):
        model = onnx.load(str(source))
        rewrites = canonicalize(model, num_heads, hidden_size, opset)
    with memory.stage("optimize/fuse"):
        options = FusionOptions("bert")
        # Each symbolic shape inference of the optimizer copies the whole model, weights included,
        # and the canonical graph fuses just as fully without its shape checks.
        options.enable_shape_inference = False
        # Residual Add + LayerNormalization stay two ops: see artifacts.ORT_DISABLED_OPTIMIZERS.
        options.enable_skip_layer_norm = False
        with _quiet_loggers(*OPTIMIZER_LOGGERS):
            optimized = optimize_model(
                model, model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
                optimization_options=options,
            )
        del model
        fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    with memory.stage("optimize/save"):
        external_data_path(target).unlink(missing_ok=True)
        optimized.save_model_to_file(str(target), use_external_data_format=True)  # without a serialized copy
        del optimized
    if not external_data:
        memory.release_memory()
        with memory.stage("optimize/inline"):
            inline_external_data(target)
    return {"rewrites": rewrites, "fused_operators": fused}


OPTIMIZER_LOGGERS = ("onnxruntime.transformers.optimizer", "fusion_skiplayernorm")
"""Loggers of onnxruntime's transformer optimizer whose warnings say nothing about these graphs:
that tf2onnx, not PyTorch, produced them, and that shape inference is off (on purpose)."""


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Only errors from the loggers `names` inside the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _dropped_warnings(prefix: str):
    """Drop the root logger's records whose message starts with `prefix` inside the block."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


INT8_PER_CHANNEL = True
"""Weights are quantized with one scale per output column (`quantize_int8`), not one per matrix."""
UNTYPED_TENSOR_WARNING = "Failed to infer data type of tensor"
"""What onnxruntime's quantizer logs for each input of a MatMul of two activations that it cannot
type (the inputs come from its contrib ops, which ONNX shape inference does not know): the attention
products of an encoder whose attention the optimizer does not fuse (MPNet's: its relative position
bias is not a pattern onnxruntime fuses). It leaves those MatMuls in float, as the fused Attention
keeps them in a BERT; a warning per tensor, several per layer, would say no more."""


def quantize_int8(source: Path, target: Path, *, external_data: bool = False, float_nodes: Sequence[str] = ()) -> None:
    """Dynamic int8 quantization of weights (activations are quantized at run time).
    `external_data`: store the weights of `target` in `TARGET.data`. `float_nodes`: names of
    nodes left in float (a shared LoRA base's adapter MatMuls, whose weights are graph inputs).

    The weights of every MatMul and fused Attention get a scale and zero point per output column
    (`INT8_PER_CHANNEL`; onnxruntime keeps one per table for the embeddings). With one scale per
    matrix, a few large columns (the feed-forward output projections have them) set the step for
    all the others, and the rounding noise moves question answering's start and end logits enough
    to change which token is the argmax over a window; per-column scales keep each column's noise
    to its own range. The model is as small (a scale per column) and runs the same integer
    kernels, and classifiers lose nothing by it, so every task gets it.
    """
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external_data_path(target).unlink(missing_ok=True)
    with _no_second_shape_inference(), _dropped_warnings(UNTYPED_TENSOR_WARNING):
        quantize_dynamic(
            str(source), str(target), weight_type=QuantType.QInt8, use_external_data_format=external_data,
            per_channel=INT8_PER_CHANNEL, nodes_to_exclude=list(float_nodes),
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )


@contextlib.contextmanager
def _no_second_shape_inference():
    """Skip the quantizer's second shape inference where it would infer what the first did.

    onnxruntime's dynamic quantizer loads the model with shape inference, replaces Gemm nodes by
    MatMul, then infers shapes again on a deep copy saved to disk and reloaded: three copies of
    the weights at once. Without a Gemm (none in these encoders) nothing was replaced, and the
    model it has is the one that inference would give back. The hook is onnxruntime's module
    function, restored on exit; an onnxruntime without it quantizes as it always does.
    """
    try:
        from onnxruntime.quantization import onnx_quantizer

        original = onnx_quantizer.save_and_reload_model_with_shape_infer
    except (ImportError, AttributeError):
        yield
        return

    def reload(model):
        return original(model) if _has_op(model.graph, "Gemm") else model

    onnx_quantizer.save_and_reload_model_with_shape_infer = reload
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = original


def _has_op(graph, op_type: str) -> bool:
    """Whether `graph` or one of its subgraphs has a node of `op_type`."""
    from onnx import AttributeProto

    for node in graph.node:
        if node.op_type == op_type:
            return True
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            if any(_has_op(subgraph, op_type) for subgraph in subgraphs):
                return True
    return False


# ------------------------------------------------------------------------------------- parity


def onnx_logits(model: Path | Any, data: LengthBatchedData, output: str = OUTPUT_NAME) -> np.ndarray:
    """Logits (the output named `output`) of an ONNX model (a path, or an open onnxruntime
    session) over `data`, in the examples' original order. Batches are padded as they are run,
    one at a time."""
    session = _session(model) if isinstance(model, (str, os.PathLike)) else model
    chunks = [session.run([output], features)[0] for features in data]
    logits = concat_padded(chunks)
    out = np.empty_like(logits)
    out[data.order()] = logits
    return out


def _session(path: Path):
    """A session of an exported model as the Predictor opens one (the same graph rewrites off)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(artifacts.ORT_DISABLED_OPTIMIZERS))


def spread_by_length(lengths: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` examples evenly spread from the shortest to the longest."""
    order = np.argsort(lengths, kind="stable")
    if len(order) <= count:
        return order
    return order[np.linspace(0, len(order) - 1, count).round().astype(int)]


class PaddedBatches:
    """Batches of `batch_size` consecutive examples, in the order given (a random one mixes
    lengths in every batch), every other batch padded to `max_length`: most positions are
    padding, which only the attention mask keeps out of the logits. Iterates like
    LengthBatchedData without labels (feature dicts, and `order()`)."""

    def __init__(
        self, encoded: EncodedTexts, batch_size: int, max_length: int, pad_id: int, feature_names: Sequence[str]
    ):
        self.encoded = encoded
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = pad_id
        self.feature_names = tuple(feature_names)

    def batches(self) -> list[np.ndarray]:
        indices = np.arange(len(self.encoded))
        return [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]

    def order(self) -> np.ndarray:
        return np.concatenate(self.batches())

    def __iter__(self):
        for number, indices in enumerate(self.batches()):
            multiple = self.max_length if number % 2 == 0 else 1
            padded = pad_batch(self.encoded, indices, self.pad_id, multiple)
            yield {name: padded[name] for name in self.feature_names}


def label_agreement(
    task: str,
    candidate: np.ndarray,
    reference: np.ndarray,
    tolerance: float,
    threshold: Optional[float] = None,
    token_labels: Optional[np.ndarray] = None,
    lengths: Optional[np.ndarray] = None,
) -> tuple[Optional[float], int]:
    """(share of the reference's decided predictions that `candidate` makes too, how many there are).

    A prediction is decided when no change of at most `tolerance` in each logit can flip it, so
    a near-tie that flips inside the tolerance is no disagreement (the logit bound judges it);
    each task says what its prediction is (`Task.agreement`): the top two logits more than
    2 x tolerance apart (classification; NER per scored token, the first word pieces
    `token_labels` marks), every logit more than `tolerance` from the threshold's logit
    (multilabel, at `threshold`, the default one when None), start and end per window (QA).
    Regression predicts no labels: (None, 0). The share is None when nothing is decided.
    """
    return get_task(task).agreement(candidate, reference, tolerance, threshold, token_labels, lengths)


def _max_abs_diff(candidate: np.ndarray, reference: np.ndarray, lengths: np.ndarray) -> float:
    """Largest |difference| of the logits, over each example's own tokens for per-token logits."""
    diff = np.abs(candidate - reference)
    if diff.ndim == 3:
        diff = diff[np.arange(diff.shape[1])[None, :] < np.asarray(lengths)[:, None]]
    return float(diff.max())


@dataclass(frozen=True)
class _ParitySet:
    """Evaluation data in each of PARITY_SETS' batchings, with Keras's logits for it."""

    data: dict[str, Any]
    keras: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    task: str = "classification"
    decision: Optional[dict[str, Any]] = None
    names: tuple[str, ...] = ()
    score_name: str = "accuracy"
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    references: dict[str, Any] = field(default_factory=dict)
    """What each set's logits are scored against (`Task.encode`'s reference: labels, or questions with windows)."""

    @property
    def threshold(self) -> Optional[float]:
        return (self.decision or {}).get("threshold")

    def score(self, logits: np.ndarray, name: str) -> float:
        """The `score_name` metric, computed as the run's evaluation computes it, at the
        threshold the Predictor will use (the default one when the run recorded none)."""
        decision = {"threshold": DEFAULT_MULTILABEL_THRESHOLD, **(self.decision or {})}
        labels = self.references.get(name, self.labels[name])
        metrics, _ = task_metrics(self.task, labels, logits, LabelMap(self.names), "parity", decision)
        return metrics[f"parity_{self.score_name}"]


def _parity_set(
    model,
    encoded: EncodedTexts,
    labels: np.ndarray,
    pad_id: int,
    names: Sequence[str],
    max_length: int,
    task: str = "classification",
    decision: Optional[dict[str, Any]] = None,
    score_name: str = "accuracy",
    reference: Any = None,
) -> _ParitySet:
    """`reference`: what the task scores logits against, row-aligned with `encoded` (default: `labels`)."""
    count = len(encoded)
    indices = {
        "batch_1": spread_by_length(encoded.lengths, MAX_SINGLE_EXAMPLES),
        "batch_8": np.arange(count),
        "batch_8_padded": np.random.default_rng(PARITY_SEED).permutation(count)[:PADDED_PARITY_EXAMPLES],
    }
    data: dict[str, Any] = {}
    for name, chosen in indices.items():
        subset = encoded.subset(chosen)
        if name == "batch_8_padded":
            data[name] = PaddedBatches(subset, PARITY_BATCH_SIZE, max_length, pad_id, names)
        else:
            batch_size = 1 if name == "batch_1" else PARITY_BATCH_SIZE
            data[name] = LengthBatchedData(subset, None, batch_size, shuffle=False, pad_id=pad_id, feature_names=names)
    keras = {name: predict_logits(model, batches) for name, batches in data.items()}
    label_names = tuple(str(model.config.id2label[i]) for i in range(int(model.config.num_labels)))
    return _ParitySet(
        data, keras, {name: labels[chosen] for name, chosen in indices.items()}, task, decision, label_names,
        score_name, {name: encoded.lengths[chosen] for name, chosen in indices.items()},
        {name: get_task(task).reference_subset(labels if reference is None else reference, chosen) for name, chosen in indices.items()},
    )


def check_parity(
    path: Path | Any, parity: _ParitySet, tolerance: float = FP32_TOLERANCE, output: str = OUTPUT_NAME
) -> dict[str, ParityResult]:
    """Compare one ONNX model (a path, or an open session) and its output `output` with Keras on
    every parity set."""
    results = {}
    # one session for every set; the caller's next model gets the memory back
    session = _session(path) if isinstance(path, (str, os.PathLike)) else path
    for name, data in parity.data.items():
        logits = onnx_logits(session, data, output)
        reference = parity.keras[name]
        token_labels = parity.labels[name]
        agreement, decided = label_agreement(
            parity.task, logits, reference, tolerance, parity.threshold, token_labels, parity.lengths[name]
        )
        results[name] = ParityResult(
            max_abs_diff=_max_abs_diff(logits, reference, parity.lengths[name]),
            label_agreement=agreement,
            score=parity.score(logits, name),
            examples=len(logits),
            score_name=parity.score_name,
            decided=decided,
        )
    return results


def _require_fp32_parity(name: str, results: dict[str, ParityResult], tolerance: float) -> None:
    for set_name, result in results.items():
        disagrees = result.label_agreement is not None and result.label_agreement < 1.0
        if result.max_abs_diff > tolerance or disagrees:
            agreement = "n/a" if result.label_agreement is None else f"{result.label_agreement:.4f}"
            raise ArtifactError(
                f"{name}: ONNX/Keras parity failed on {set_name} ({PARITY_SETS[set_name]}): max |logit diff| "
                f"{result.max_abs_diff:.3g} (limit {tolerance:g}), label agreement {agreement} over "
                f"{result.decided} decided predictions (expected 1.0); no ONNX bundle was written"
            )


@dataclass(frozen=True)
class OutputCheck:
    """One model output the parity gate checks: its parity set, the score reported for it, its
    Keras score (int8's drop is measured from it) and the ONNX output's name."""

    parity_set: _ParitySet
    score_name: str
    keras_score: float
    output: str = OUTPUT_NAME


def check_outputs(models: "_BundleModels", checks: dict[str, OutputCheck], tolerance: float) -> dict[str, dict[str, Any]]:
    """Every output's parity on every fp32 model (each must pass) and on the int8 model (recorded,
    with the score it loses), one session per model. Keys of `checks` name outputs in errors
    (a multi-task head; "" for a model's only output)."""
    checked: dict[str, dict[str, Any]] = {name: {"parity": {}} for name in checks}

    def run(path: Path) -> dict[str, dict[str, ParityResult]]:
        with memory.stage(f"parity/{path.name}"):
            session = _session(path)
            results = {name: check_parity(session, check.parity_set, tolerance, check.output)
                       for name, check in checks.items()}
            del session
        memory.release_memory()
        return results

    for path in models.checked:
        for name, results in run(path).items():
            _require_fp32_parity(f"{path.name}, head {name!r}" if name else path.name, results, tolerance)
            checked[name]["parity"][path.name] = {set_name: r.to_dict() for set_name, r in results.items()}
    if models.int8 is not None:
        for name, results in run(models.int8).items():
            check, batch = checks[name], results["batch_8"]
            checked[name]["parity"][models.int8.name] = {set_name: r.to_dict() for set_name, r in results.items()}
            checked[name]["int8"] = {
                "label_agreement": batch.label_agreement,
                check.score_name: batch.score,
                f"{check.score_name}_drop": check.keras_score - batch.score,
            }
            if models.best.name not in models.files.values():  # checked as int8's source, not shipped
                checked[name]["int8"]["source_parity"] = checked[name]["parity"].pop(models.best.name)
    return checked


# ------------------------------------------------------------------------------------- bundle


def _bundle_metadata(
    model, config: RunConfig, names: Sequence[str], pad_id: int, files: dict[str, str], decision: dict[str, Any]
) -> dict:
    num_labels = int(model.config.num_labels)
    return {
        "format_version": FORMAT_VERSION,
        "task": config.model.task,
        "model_name": config.model.model_name_or_path,
        "model_type": getattr(model.config, "model_type", None),
        "labels": [str(model.config.id2label[i]) for i in range(num_labels)],
        "id2label": {str(i): str(model.config.id2label[i]) for i in range(num_labels)},
        "max_seq_length": config.data.max_seq_length,
        "inputs": list(names),
        "input_dtype": INPUT_DTYPE,
        "output": OUTPUT_NAME,
        "pad_id": pad_id,
        "files": files,
        "decision": decision,
        **get_task(config.model.task).bundle_settings(config.data),
    }


def export_bundle(
    model,
    run_dir: str | os.PathLike,
    validation_data: tuple[Examples, np.ndarray],
    *,
    tolerance: float = FP32_TOLERANCE,
    settings: Optional[ExportConfig] = None,
) -> dict[str, Any]:
    """Export `model` to `run_dir/onnx/` and return the export report.

    A model that computes in float16 (a --mixed_precision run) is exported, and checked, as a
    float32 copy of its weights: the ONNX graph is float32 whatever the training precision.
    The report names every stage with its seconds and peak RSS (`stages`, see `tfsft.memory`).

    Args:
        model: the fine-tuned HF TF classifier (a Keras model).
        run_dir: a (partial or finished) run directory holding `config.json` and `model/`.
        validation_data: evaluation examples and their int32 label ids, for the parity checks.
        tolerance: largest accepted |ONNX - Keras| logit difference for the fp32 models.
        settings: export settings in place of the run's own (`config.json`'s `export`).

    Returns:
        The export report, also written to `run_dir/onnx/export_report.json`.

    Raises:
        ArtifactError: conversion failed or an fp32 model disagrees with Keras; then no bundle
            (and no `model.onnx`) is left behind.
    """
    run_dir = Path(run_dir)
    config = artifacts.read_config(run_dir)
    if settings is not None:
        config = dataclasses.replace(config, export=settings)
    task = get_task(config.model.task)
    if task.generates and task.encoder_decoder:
        from tfsft.export_seq2seq import export_seq2seq_bundle

        return export_seq2seq_bundle(model, run_dir, [config.data.source_prefix + s for s in validation_data[0].prompts], config)
    if task.generates:
        from tfsft.export_decoder import export_decoder_bundle

        return export_decoder_bundle(model, run_dir, validation_data[0], config)
    examples, labels = validation_data
    tokenizer_file = artifacts.run_model_dir(run_dir) / artifacts.BUNDLE_TOKENIZER
    encoder = TextEncoder.from_file(tokenizer_file, config.data.max_seq_length)
    encoded, labels, reference = get_task(config.model.task).encode(encoder, examples, labels, config.data)
    with bundle_work_dir(run_dir) as work:
        with contextlib.ExitStack() as stack:
            memory.release_memory()  # what a training left unreferenced, before the export's first stage
            monitor = memory.active_monitor() or stack.enter_context(memory.StageMonitor())
            stack.enter_context(monitor.activate())
            decision = artifacts.read_decision(run_dir)
            with float32_policy():
                model = float32_model(model)
                report = _build_bundle(
                    model, config, work, encoder, encoded, np.asarray(labels), tolerance, decision, reference,
                    adapter_dir=artifacts.run_model_dir(run_dir) if config.export.adapter_files else None,
                )
            del model
        report["stages"] = monitor.report()
        report["peak_rss_mb"] = round(monitor.peak_rss / memory.MB, 1)
        publish_bundle(work, run_dir, config, report, tokenizer_file)
    return report


@contextlib.contextmanager
def bundle_work_dir(run_dir: Path) -> Iterator[Path]:
    """A fresh work directory in `run_dir` for a bundle being built (stale ones a killed export
    left are removed first); removed on the way out, whether or not `publish_bundle` renamed it."""
    artifacts.remove_stale_work_dirs(run_dir, artifacts.ONNX_DIR)
    work = Path(tempfile.mkdtemp(prefix=f".{artifacts.ONNX_DIR}.", suffix=".partial", dir=run_dir))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish_bundle(work: Path, run_dir: Path, config: RunConfig, report: dict[str, Any], tokenizer_file: Path) -> None:
    """Complete the bundle built in `work` (tokenizer, config, report) and rename it into `run_dir/onnx`."""
    shutil.copy(tokenizer_file, work / artifacts.BUNDLE_TOKENIZER)
    artifacts.save_config(config, work)
    artifacts.write_json(work / artifacts.BUNDLE_REPORT, report)
    os.chmod(work, 0o755)
    artifacts.publish_dir(work, run_dir / artifacts.ONNX_DIR)


def wants_external_data(mode: str, weight_bytes: int) -> bool:
    """Whether the bundle's ONNX files keep their weights as external data (`--external_data`)."""
    if mode == "never" and weight_bytes >= PROTOBUF_LIMIT_BYTES:
        raise ArtifactError(
            f"the model's weights ({weight_bytes / 2**30:.2f} GiB) exceed protobuf's 2 GiB limit of a single-file "
            "ONNX model; export with --external_data auto or always. Received: external_data=never"
        )
    return mode == "always" or (mode == "auto" and weight_bytes > EXTERNAL_DATA_AUTO_BYTES)


def _weight_bytes(model) -> int:
    return sum(int(np.prod(weight.shape)) * weight.dtype.size for weight in model.weights)


def _build_bundle(
    model,
    config: RunConfig,
    work: Path,
    encoder: TextEncoder,
    encoded: EncodedTexts,
    labels: np.ndarray,
    tolerance: float,
    decision: dict[str, Any],
    reference: Any = None,
    adapter_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """Keras logits, convert, fuse, check, quantize, check: each stage frees what it no longer
    needs before the next starts, and onnxruntime sessions are opened one at a time.
    `adapter_dir`: a LoRA run's saved adapters, whose shared-base files (`--adapter_files`,
    `tfsft.export_shared_base`) join the bundle, checked on the same parity sets."""
    names = list(feature_names(model))
    score_name = parity_score_name(config.model.task, config.train.metric_for_best_model)
    with memory.stage("keras_logits"):
        parity_set = _parity_set(
            model, encoded, labels, encoder.pad_id, names, encoder.max_length, config.model.task, decision, score_name,
            reference,
        )
    keras_score = parity_set.score(parity_set.keras["batch_8"], "batch_8")
    names, models = _write_models(model, work, config.export)
    report: dict[str, Any] = {**models.report(config.export, tolerance), f"keras_{score_name}": keras_score}
    checked = check_outputs(models, {"": OutputCheck(parity_set, score_name, keras_score)}, tolerance)[""]
    report["parity"] = checked["parity"]
    if "int8" in checked:
        report["int8"] = {**checked["int8"], **models.int8_report()}
    report["sizes_bytes"] = models.remove_unshipped()
    metadata = _bundle_metadata(model, config, names, encoder.pad_id, models.files, decision)
    metadata["external_data"] = models.external_data_files()
    if adapter_dir is not None:
        from tfsft.export_shared_base import write_shared_base

        metadata["shared_base"], report["shared_base"] = write_shared_base(
            adapter_dir, config.model.task, work, config.export.opset, config.export.variants, parity_set, tolerance
        )
    artifacts.write_json(work / artifacts.BUNDLE_FILE, metadata)
    return report


@dataclass
class _BundleModels:
    """The ONNX files a bundle's work directory holds once converted, fused and quantized: `files`
    (bundle.json's: what ships), `checked` (the fp32 models parity must pass: the shipped ones, and
    the one int8 is quantized from), `best` (the fused model if fusion applied, else the plain one),
    `int8` (the int8 model, or None)."""

    work: Path
    files: dict[str, str]
    fusion: dict[str, Any]
    best: Path
    checked: list[Path]
    int8: Optional[Path]
    external: bool

    def report(self, settings: ExportConfig, tolerance: float) -> dict[str, Any]:
        """The export report's fields that say how the models were made."""
        return {
            "opset": settings.opset,
            "input_dtype": INPUT_DTYPE,
            "tolerance": tolerance,
            "variants": list(settings.variants),
            "external_data": self.external,
            "fusion": self.fusion,
        }

    def int8_report(self) -> dict[str, Any]:
        """The int8 model's fields of the report that do not depend on a head's scores."""
        assert self.int8 is not None
        return {
            "size_ratio": round(_stored_bytes(self.best) / _stored_bytes(self.int8), 2),
            "quantized_from": self.best.name,
            "weight_scales": "per_channel" if INT8_PER_CHANNEL else "per_tensor",
        }

    def remove_unshipped(self) -> dict[str, int]:
        """Delete the models that were made but do not ship (and their external data); returns the
        size of each shipped file."""
        work = self.work
        shipped = {name for model_file in self.files.values() for name in (model_file, external_data_path(work / model_file).name)}
        plain, fused, int8 = (work / artifacts.BUNDLE_MODEL, work / artifacts.BUNDLE_MODEL_FUSED, work / artifacts.BUNDLE_MODEL_INT8)
        for path in (plain, fused, int8, external_data_path(plain), external_data_path(fused), external_data_path(int8)):
            if path.name not in shipped:
                path.unlink(missing_ok=True)
        return {path.name: path.stat().st_size for path in sorted(work.iterdir()) if path.name in shipped}

    def external_data_files(self) -> dict[str, str]:
        """bundle.json's `external_data`: each shipped model's external data file, where it has one."""
        stored = {name: external_data_path(self.work / name).name for name in self.files.values()}
        return {name: data for name, data in stored.items() if (self.work / data).is_file()}


def _write_models(
    model, work: Path, settings: ExportConfig, outputs: Optional[Outputs] = None
) -> tuple[list[str], _BundleModels]:
    """(input names, models): convert, fuse and quantize as `settings` ask, into `work`."""
    variants = settings.variants
    plain, fused, int8 = (work / artifacts.BUNDLE_MODEL, work / artifacts.BUNDLE_MODEL_FUSED, work / artifacts.BUNDLE_MODEL_INT8)
    external = wants_external_data(settings.external_data, _weight_bytes(model))
    # Every model is written with external data first: onnx.load and onnxruntime's quantizer then
    # read its weights a tensor at a time; shipped models are made single files (inlined) last.
    with memory.stage("convert"):
        names = convert_to_onnx(model, plain, settings.opset, external_data=True, outputs=outputs)
    memory.release_memory()
    fusion: dict[str, Any] = {"applied": False}
    if variants != ("fp32",):
        heads, hidden = int(model.config.num_attention_heads), int(model.config.hidden_size)
        with memory.stage("optimize"):
            fusion = optimize(plain, fused, heads, hidden, settings.opset, external_data=True)
        fusion["applied"] = bool(fusion["fused_operators"])
        memory.release_memory()
    best = fused if fusion["applied"] else plain  # what "fused" ships as, and what int8 is quantized from
    files = {}
    if "fp32" in variants:
        files["model"] = plain.name
    if "fused" in variants:
        files["fused" if best == fused else "model"] = best.name
    checked = list(dict.fromkeys([work / name for name in files.values()] + ([best] if "int8" in variants else [])))
    if "int8" in variants:
        with memory.stage("quantize"):
            quantize_int8(best, int8, external_data=external)
        memory.release_memory()
    if not external:
        for name in files.values():
            with memory.stage(f"inline/{name}"):
                inline_external_data(work / name)
            memory.release_memory()
    if "int8" in variants:
        files["int8"] = int8.name  # quantized as a single file already, unless external
    return names, _BundleModels(work, files, fusion, best, checked, int8 if "int8" in variants else None, external)


def _stored_bytes(path: Path) -> int:
    """Bytes of an ONNX file with its external data, if any."""
    data = external_data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def export_run(run_dir: str | os.PathLike, settings: Optional[ExportConfig] = None) -> dict[str, Any]:
    """Export a finished run, checking parity on the validation examples it was evaluated on.

    Those are the run's record of them (`record_validation`), so neither data file is read: not
    the training file (a whole corpus under --streaming), nor files moved or changed since. A run
    saved before runs recorded them re-reads its validation file, sampled as training sampled it,
    or, for a hold-out, the training file, split as training split it. `settings` replace the
    run's export settings (`tfsft export --export_variants ...`).
    """
    from tfsft.data import encode_labels
    from tfsft.lora import load_run_model

    run = artifacts.require_run_dir(run_dir)
    config = artifacts.read_config(run)
    task = config.model.task
    if config.tasks:
        from tfsft.export_multitask import export_multitask_run

        return export_multitask_run(run, settings)
    validation = recorded_validation(run)
    if validation is None:
        validation = _reread_validation(config)
    with memory.StageMonitor() as monitor, monitor.activate():
        with memory.stage("load_model"):
            model = load_run_model(artifacts.run_model_dir(run), task)
        label_map = LabelMap(tuple(str(model.config.id2label[i]) for i in range(model.config.num_labels)))
        labels = encode_labels(task, label_map, validation, config.data.label_delimiter)
        return export_bundle(model, run, validation_data=(validation, labels), settings=settings)


def _reread_validation(config: RunConfig, data=None, task: Optional[str] = None) -> Examples | TokenExamples:
    """The validation examples of a run that did not record them, read as training read them
    (`data`, `task`: one task's of a multi-task run instead of the run's)."""
    from tfsft.data import load_splits, sample

    data, seed, task = data or config.data, config.train.seed, task or config.model.task
    if data.validation_file and not data.dataset_name:
        return sample(get_task(task).read(data.validation_file, data), data.max_eval_samples, seed)
    return load_splits(data, seed, task=task).validation


def record_validation(run_dir: str | os.PathLike, examples: Examples | TokenExamples) -> Path:
    """Write the validation examples a run is evaluated on into the run directory
    (`artifacts.VALIDATION_EXAMPLES`), for `export_run` to check parity on exactly those."""
    if isinstance(examples, TokenExamples):
        values: dict[str, Any] = {"kind": "tokens", "words": examples.words}
    elif hasattr(examples, "completions"):
        values = {
            "kind": "completions", "prompts": examples.prompts, "completions": examples.completions, "rows": examples.rows,
            "source": examples.source, "columns": examples.columns, "format_version": RECORD_VERSION,
        }
        return artifacts.write_text(Path(run_dir) / artifacts.VALIDATION_EXAMPLES, json.dumps(values, ensure_ascii=False) + "\n")
    elif hasattr(examples, "contexts"):
        values = {
            "kind": "questions", "ids": examples.ids, "questions": examples.questions, "contexts": examples.contexts,
            "answers": examples.answers, "source": examples.source, "format_version": RECORD_VERSION,
        }
        return artifacts.write_text(Path(run_dir) / artifacts.VALIDATION_EXAMPLES, json.dumps(values, ensure_ascii=False) + "\n")
    else:
        values = {"kind": "texts", "texts": examples.texts, "pairs": examples.pairs}
    values.update(labels=examples.labels, rows=examples.rows, source=examples.source, format_version=RECORD_VERSION)
    text = json.dumps(values, ensure_ascii=False, separators=(",", ":")) + "\n"
    return artifacts.write_text(Path(run_dir) / artifacts.VALIDATION_EXAMPLES, text)


def recorded_validation(run_dir: str | os.PathLike) -> Optional[Examples | TokenExamples]:
    """The validation examples `record_validation` wrote into the run, or None (none recorded)."""
    path = Path(run_dir) / artifacts.VALIDATION_EXAMPLES
    if not path.exists():
        return None
    values = artifacts.read_json(path, "validation record")
    if isinstance(values, dict) and values.get("kind") == "questions":
        return _recorded_questions(values, path)
    if isinstance(values, dict) and values.get("kind") == "completions":
        return _recorded_completions(values, path)
    try:
        kind, common = values["kind"], {"labels": values["labels"], "rows": values["rows"], "source": values["source"]}
        examples: Examples | TokenExamples
        if kind == "tokens":
            examples = TokenExamples(words=values["words"], **common)
        elif kind == "texts":
            examples = Examples(texts=values["texts"], pairs=values["pairs"], **common)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        columns = [examples.texts, examples.labels, examples.rows, *([examples.pairs] if examples.pairs else [])]
        if len({len(column) for column in columns}) != 1:
            raise ValueError("its columns differ in length")
    except (KeyError, TypeError, ValueError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise ArtifactError(
            f"Corrupt validation record {path}: {detail}; delete it to re-read the validation data"
        ) from None
    return examples


def _recorded_completions(values: dict[str, Any], path: Path) -> Any:
    """The prompt/completion validation examples `record_validation` wrote."""
    from tfsft.tasks.causal_lm import CausalLMExamples

    try:
        prompts, completions, rows = values["prompts"], values["completions"], values["rows"]
        if not len(prompts) == len(completions) == len(rows):
            raise ValueError("its columns differ in length")
        columns = tuple(values["columns"]) if values.get("columns") else None
        return CausalLMExamples(list(prompts), [str(c) for c in completions], list(rows), str(values["source"]), None, columns)
    except (KeyError, TypeError, ValueError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise ArtifactError(f"Corrupt validation record {path}: {detail}; delete it to re-read the validation data") from None


def _recorded_questions(values: dict[str, Any], path: Path) -> Any:
    """The question-answering validation examples `record_validation` wrote."""
    from tfsft.tasks.qa import QAExamples

    try:
        columns = [values[name] for name in ("ids", "questions", "contexts", "answers")]
        if len({len(column) for column in columns}) != 1:
            raise ValueError("its columns differ in length")
        answers = [[(str(text), int(start)) for text, start in row] for row in values["answers"]]
        return QAExamples(
            ids=list(map(str, columns[0])), questions=list(columns[1]), contexts=list(columns[2]), answers=answers,
            source=str(values["source"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise ArtifactError(f"Corrupt validation record {path}: {detail}; delete it to re-read the validation data") from None
