"""Residual LayerNorm benchmark: onnxruntime's fused SkipLayerNormalization against the Add +
LayerNormalization that tfsft's export ships (`artifacts.ORT_DISABLED_OPTIMIZERS`), in one run.

Part 1 times the two forms as one-op graphs on CPU at encoder shapes (batch x tokens x hidden),
both for LayerNorm and for its RMS twin (SkipSimplifiedLayerNormalization against Add +
SimplifiedLayerNormalization, the decoders' form).

Part 2 (with --bundle) times each model the bundle ships on synthetic batches in two forms: (a)
with its residual norms fused into SkipLayerNormalization by onnxruntime's transformer optimizer
(the graph tfsft exported before it kept them apart), opened with onnxruntime's default rewrites;
(b) the file as shipped, opened as tfsft opens it. Round-robin, with the largest logit difference
between the two. A bundle exported by an earlier tfsft already holds SkipLayerNormalization nodes
(the table says how many each file holds), so its (b) runs the slow kernel too: re-export it
with `tfsft export RUN_DIR`.

No timing is asserted anywhere: the ratios, measured in the same run, are what carry over.

    python bench/layer_norm.py
    python bench/layer_norm.py --bundle RUN/onnx --repeats 20 --output layer_norm.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.inference import interleaved_medians, synthetic_batch  # noqa: E402
from tfsft import artifacts  # noqa: E402
from tfsft.inference import Bundle, open_session  # noqa: E402

OP_SHAPES = ((1, 1, 576), (1, 128, 384), (1, 175, 768), (32, 128, 384))
MODEL_SHAPES = ((1, 128), (32, 128))


def session(model, fused: bool):
    """A CPU session without spinning; `fused`: with onnxruntime's default graph rewrites."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    disabled = [] if fused else list(artifacts.ORT_DISABLED_OPTIMIZERS)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def residual_norm_graph(shape: tuple[int, int, int], fused: bool, rms: bool) -> bytes:
    """y = norm(x + skip) as one fused contrib op, or as Add then the norm."""
    from onnx import TensorProto, helper

    hidden = shape[-1]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("x", "skip")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    weights = [helper.make_tensor("gamma", TensorProto.FLOAT, [hidden], np.ones(hidden, np.float32))]
    if not rms:
        weights.append(helper.make_tensor("beta", TensorProto.FLOAT, [hidden], np.zeros(hidden, np.float32)))
    params = [w.name for w in weights]
    if fused:
        op = "SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"
        nodes = [helper.make_node(op, ["x", "skip", *params], ["y"], domain="com.microsoft", epsilon=1e-6)]
    else:
        op = "SimplifiedLayerNormalization" if rms else "LayerNormalization"
        nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
                 helper.make_node(op, ["sum", *params], ["y"], axis=-1, epsilon=1e-6)]
    graph = helper.make_graph(nodes, "residual_norm", inputs, [output], weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def op_table(repeats: int) -> list[str]:
    rows = ["## Part 1: one residual norm, fused op against Add + norm", "",
            "| shape (batch x tokens x hidden) | norm | fused op | Add + norm | Add + norm speed-up | max diff |",
            "|---|---|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for shape in OP_SHAPES:
        feed = {name: rng.standard_normal(shape).astype(np.float32) for name in ("x", "skip")}
        for rms in (False, True):
            runs = {kind: session(residual_norm_graph(shape, kind == "fused", rms), fused=False)
                    for kind in ("fused", "apart")}
            seconds = interleaved_medians({k: (lambda s=s: s.run(None, feed)) for k, s in runs.items()},
                                          repeats * 10, budget_s=5.0)
            diff = np.abs(runs["fused"].run(None, feed)[0] - runs["apart"].run(None, feed)[0]).max()
            rows.append(
                f"| {' x '.join(map(str, shape))} | {'RMS' if rms else 'LayerNorm'} | "
                f"{seconds['fused'] * 1e6:.0f} us | {seconds['apart'] * 1e6:.0f} us | "
                f"{seconds['fused'] / seconds['apart']:.2f}x | {diff:.1e} |")
    return rows


def count_ops(model, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def with_fused_residual_norms(model):
    """`model` with each residual Add + LayerNormalization (and the bias Add before it) fused into
    SkipLayerNormalization by onnxruntime's transformer optimizer, as tfsft exported them before."""
    from onnxruntime.transformers.fusion_skiplayernorm import (
        FusionBiasSkipLayerNormalization,
        FusionSkipLayerNormalization,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    FusionSkipLayerNormalization(wrapped, shape_infer=False).apply()
    FusionBiasSkipLayerNormalization(wrapped).apply()
    wrapped.prune_graph()
    return wrapped.model


def bundle_table(directory: Path, repeats: int) -> list[str]:
    import onnx

    bundle = Bundle.load(directory)
    rows = [f"## Part 2: the models of {directory}", "",
            "| model | SkipLayerNormalization nodes: shipped / fused | shape | (a) fused, onnxruntime's defaults | "
            "(b) as shipped, as tfsft opens it | (b) speed-up | max logit diff |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for name in dict.fromkeys(bundle.files.values()):
        model = onnx.load(str(directory / name))
        shipped = count_ops(model, "SkipLayerNormalization")
        fused = with_fused_residual_norms(model)  # rewrites the loaded model in place
        nodes = f"{shipped} / {count_ops(fused, 'SkipLayerNormalization')}"
        runs = {"fused": session(fused.SerializeToString(), fused=True), "tfsft": open_session(directory / name, None)}
        del model, fused
        for batch, length in MODEL_SHAPES:
            feed = synthetic_batch(batch, length, bundle.inputs)
            feed = {i.name: feed[i.name].astype(np.int64 if "int64" in i.type else np.int32)
                    for i in runs["tfsft"].get_inputs()}
            seconds = interleaved_medians({k: (lambda s=s: s.run(None, feed)) for k, s in runs.items()}, repeats)
            diff = max(float(np.abs(a - b).max())
                       for a, b in zip(runs["fused"].run(None, feed), runs["tfsft"].run(None, feed)))
            unit = (lambda s: f"{s * 1000:.1f} ms") if batch == 1 else (lambda s: f"{batch / s:.0f} ex/s")
            rows.append(f"| {name} | {nodes} | batch {batch} x {length} | {unit(seconds['fused'])} | "
                        f"{unit(seconds['tfsft'])} | {seconds['fused'] / seconds['tfsft']:.2f}x | {diff:.1e} |")
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="Part 2: an exported bundle (a run's onnx/ directory).")
    parser.add_argument("--repeats", type=int, default=10, help="Round-robin rounds per shape (median).")
    parser.add_argument("--output", default=None, help="Also write the Markdown report to this file.")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/layer_norm.py", *given])
    lines = ["# Residual LayerNorm benchmark", "", f"`{command}`", ""] + op_table(args.repeats)
    if args.bundle:
        lines += [""] + bundle_table(Path(args.bundle), args.repeats)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.output:
        artifacts.write_text(args.output, text)


if __name__ == "__main__":
    main()
