"""A LoRA run's shared-base files: several adapter runs of one base served from one session.

A bundle's models have the run's adapters merged into the dense weights (`tfsft.export`), so a
server of N adapter runs of one base holds N copies of it. `--adapter_files` also ships
`shared_base/` in the bundle: the unmerged graph, fused (and int8 when the bundle ships int8)
like the bundle's own models, whose adapter and head weights are graph inputs named after the
weights (`adapter/<weight>`, the same names in every run of the base), and the run's values of
them as an onnxruntime adapter file. A server of several such runs opens the first run's base
graph once and activates each run's adapter file per call (`tfsft.inference.shared_base_predictors`).

Which runs may share one graph is decided from a digest of what each graph computes
(`structure_digest`), blind to the names and node order tf2onnx chose and to the adapter inputs'
values: runs whose graphs differ anywhere else (another base, rank, pooling, label count or
opset) get different digests and are served as merged bundles.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from tfsft import artifacts, memory
from tfsft.errors import ArtifactError
from tfsft.inference import SharedBase, open_session
from tfsft.export import (
    OUTPUT_NAME,
    _ParitySet,
    _require_fp32_parity,
    check_parity,
    convert_to_onnx,
    optimize,
    quantize_int8,
)

ADAPTER_INPUT_PREFIX = artifacts.SHARED_BASE_INPUT_PREFIX


def _log(message: str) -> None:
    print(f"[tfsft] {message}", flush=True)


def expose_adapter_weights(model_proto, saved: dict[str, np.ndarray], source: Path) -> list[str]:
    """Make every initializer of `model_proto` that holds one of the `saved` weights a graph input
    named `adapter/<weight>` (its value stays the default), in place; returns the input names.
    ArtifactError when a saved weight is not found once, as it is, among the initializers."""
    from onnx import TensorProto, helper, numpy_helper

    by_value: dict[tuple, list[str]] = {}
    for key, value in saved.items():
        by_value.setdefault((value.dtype.str, value.shape, value.tobytes()), []).append(key)
    renamed: dict[str, str] = {}
    for init in model_proto.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(init)
        keys = by_value.get((value.dtype.str, value.shape, value.tobytes()), [])
        if not keys:
            continue
        if len(keys) > 1 or ADAPTER_INPUT_PREFIX + keys[0] in renamed.values():
            raise ArtifactError(
                f"{source}: the adapter weights {keys} have equal values, so their graph inputs cannot be told apart; "
                "train the adapters (a run that did not move them has nothing to share), or serve the merged bundle"
            )
        renamed[init.name] = ADAPTER_INPUT_PREFIX + keys[0]
    missing = sorted(set(saved) - {name[len(ADAPTER_INPUT_PREFIX):] for name in renamed.values()})
    if missing:
        raise ArtifactError(
            f"{source}: the converted graph holds no initializer equal to the adapter weights {missing[:3]} "
            "(the converter folded them into other constants); this model cannot share its base"
        )
    for init in model_proto.graph.initializer:
        if init.name in renamed:
            init.name = renamed[init.name]
            model_proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for node in model_proto.graph.node:
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
    return sorted(renamed.values())


def adapter_inputs(model_proto) -> list[str]:
    """The graph inputs that are also initializers and carry the adapter prefix."""
    initializers = {init.name for init in model_proto.graph.initializer}
    return sorted(v.name for v in model_proto.graph.input
                  if v.name in initializers and v.name.startswith(ADAPTER_INPUT_PREFIX))


def structure_digest(path: Path) -> str:
    """SHA-256 of what an ONNX graph computes: each tensor is named by a hash of how it is made
    (a graph input by its name, a constant by its value, an adapter input by its name and shape, a
    node's output by its operator, attributes and inputs' hashes), and the digest hashes the graph
    outputs'. Node names, tensor names and node order do not count (tf2onnx's differ between two
    conversions of one model), nor the adapter inputs' values: the base graphs of two runs of one
    base that differ only in their adapters get the same digest, and any other difference another."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    known: dict[str, str] = {"": ""}

    def sha(*parts: Any) -> str:
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    for value in graph.input:
        if value.name not in initializers:
            known[value.name] = sha("input", value.name)
    for name, init in initializers.items():
        if name.startswith(ADAPTER_INPUT_PREFIX):
            known[name] = sha("adapter", name, list(init.dims))
        else:
            array = np.ascontiguousarray(numpy_helper.to_array(init))
            known[name] = sha("const", array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
    for node in graph.node:
        attributes = []
        for attribute in sorted(node.attribute, key=lambda a: a.name):
            if attribute.type == onnx.AttributeProto.TENSOR:
                array = np.ascontiguousarray(numpy_helper.to_array(attribute.t))
                attributes.append((attribute.name, array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest()))
            else:
                attributes.append((attribute.name, attribute.SerializeToString()))
        try:
            inputs = [known[name] for name in node.input]
        except KeyError as missing:
            raise ArtifactError(f"{path}: node {node.name} reads {missing}, which no earlier node makes") from None
        made = sha(node.domain, node.op_type, attributes, inputs)
        for index, name in enumerate(node.output):
            known[name] = sha(made, index)
    outputs = [(value.name, known.get(value.name)) for value in graph.output]
    return sha(sorted((o.domain, o.version) for o in model.opset_import), outputs)


def quantize_base(source: Path, target: Path) -> None:
    """Dynamic int8 of `source` as a bundle's model is quantized (`tfsft.export.quantize_int8`),
    leaving every node that reads an adapter input in float (a quantized copy would ignore the input)."""
    import onnx

    model = onnx.load(str(source))
    exposed = set(adapter_inputs(model))
    float_nodes = [node.name for node in model.graph.node if any(name in exposed for name in node.input)]
    del model
    quantize_int8(source, target, float_nodes=float_nodes)


def write_adapter_file(path: Path, saved: dict[str, np.ndarray]) -> None:
    """The run's adapter and head weights as an onnxruntime adapter file, under their graph input names."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({ADAPTER_INPUT_PREFIX + key: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                            for key, value in saved.items()})
    with artifacts.atomic_path(path) as tmp:
        adapter.export_adapter(str(tmp))


class AdapterSession:
    """An onnxruntime session of a shared base graph that runs with one adapter file active:
    what `tfsft.export.check_parity` calls like a session."""

    def __init__(self, session, adapter_file: Path):
        self.session = session
        self.options, self.adapter = SharedBase.activate(adapter_file)

    def run(self, outputs, feed):
        return self.session.run(outputs, feed, self.options)


def write_shared_base(
    adapter_dir: Path, task: str, work: Path, opset: int, variants: tuple[str, ...], parity_set: _ParitySet,
    tolerance: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write `work/shared_base/` for the LoRA run saved in `adapter_dir`: its unmerged graph with
    the adapter inputs (fused; int8 too when `variants` has int8), the adapter file, each checked on
    `parity_set` with the adapter active (fp32 must match Keras within `tolerance`). Returns
    (bundle.json's "shared_base", the export report's)."""
    import onnx
    from safetensors.numpy import load_file

    from tfsft.lora import ADAPTER_WEIGHTS_FILE, load_adapter, read_adapter_config

    target = work / artifacts.SHARED_BASE_DIR
    target.mkdir()
    plain = target / "base.onnx"
    fused = work / artifacts.SHARED_BASE_FILES["fused"]
    saved = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    with memory.stage("shared_base/convert"):
        model = load_adapter(adapter_dir, task, merge=False)
        heads, hidden = int(model.config.num_attention_heads), int(model.config.hidden_size)
        convert_to_onnx(model, plain, opset)
        del model
    memory.release_memory()
    proto = onnx.load(str(plain))
    inputs = expose_adapter_weights(proto, saved, adapter_dir / ADAPTER_WEIGHTS_FILE)
    onnx.save(proto, str(plain))
    del proto
    with memory.stage("shared_base/optimize"):
        fusion = optimize(plain, fused, heads, hidden, opset)
    kept = adapter_inputs(onnx.load(str(fused), load_external_data=False))
    if kept != inputs:
        raise ArtifactError(
            f"{fused.name}: onnxruntime's optimizer folded {len(inputs) - len(kept)} of the {len(inputs)} adapter inputs "
            "into constants; this model cannot share its base"
        )
    plain.unlink()
    files = {"fused": artifacts.SHARED_BASE_FILES["fused"]}
    if "int8" in variants:
        with memory.stage("shared_base/quantize"):
            quantize_base(fused, work / artifacts.SHARED_BASE_FILES["int8"])
        files["int8"] = artifacts.SHARED_BASE_FILES["int8"]
    adapter_file = work / artifacts.SHARED_BASE_ADAPTER
    write_adapter_file(adapter_file, saved)
    parity: dict[str, Any] = {}
    for variant, name in files.items():
        with memory.stage(f"shared_base/parity/{variant}"):
            session = open_session(work / name, None, spinning=True, quiet=True)
            results = check_parity(AdapterSession(session, adapter_file), parity_set, tolerance, OUTPUT_NAME)
        if variant != "int8":
            _require_fp32_parity(name, results, tolerance)
        parity[name] = {set_name: result.to_dict() for set_name, result in results.items()}
    config = read_adapter_config(adapter_dir)
    metadata = {
        "files": files,
        "adapter": artifacts.SHARED_BASE_ADAPTER,
        "inputs": inputs,
        "digests": {variant: structure_digest(work / name) for variant, name in files.items()},
        "base_weights_sha256": config["base_weights_sha256"],
    }
    report = {
        "fusion": fusion,
        "parity": parity,
        "sizes_bytes": {name: (work / name).stat().st_size for name in (*files.values(), artifacts.SHARED_BASE_ADAPTER)},
    }
    _log(
        f"export: shared base for adapter serving in {artifacts.SHARED_BASE_DIR}/ ({len(inputs)} adapter inputs; "
        f"adapter file {report['sizes_bytes'][artifacts.SHARED_BASE_ADAPTER] / 1e6:.2f} MB)"
    )
    return metadata, report

