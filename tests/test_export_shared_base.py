"""Shared-base files of LoRA runs (tfsft.export_shared_base, `--adapter_files`): export, the
structure digest, Predictors on one base session, and the server's choice between them and merged bundles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import tiny_bundle
from tfsft.errors import ArtifactError, ConfigError


def _lora_run(directory, checkpoint, slices, learning_rate, **flags):
    from tfsft import RunConfig, finetune

    config = RunConfig.from_flat(dict(
        model_name_or_path=str(checkpoint), train_file=str(slices["train"]), validation_file=str(slices["dev"]),
        num_train_epochs=1, learning_rate=learning_rate, warmup_ratio=0.0, per_device_train_batch_size=16,
        max_seq_length=64, output_dir=str(directory / "run"), lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
        export_variants="fused,int8", adapter_files=True, **flags,
    ))
    return finetune(config, verbose=0).run_dir


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_checkpoint, sst2_slices):
    """Two LoRA runs of the tiny BERT, trained at different rates, exported with --adapter_files."""
    return {
        "first": _lora_run(tmp_path_factory.mktemp("first"), tiny_checkpoint, sst2_slices, 1e-2),
        "second": _lora_run(tmp_path_factory.mktemp("second"), tiny_checkpoint, sst2_slices, 3e-2, seed=7),
    }


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_checkpoint, sst2_slices):
    """A bundle of a fully fine-tuned (not LoRA) tiny classifier."""
    return tiny_bundle(tmp_path_factory.mktemp("plain"), tiny_checkpoint, sst2_slices["dev"])


@pytest.fixture(scope="module")
def texts(sst2_slices):
    from tfsft.config import DataConfig
    from tfsft.data import read_examples

    return read_examples(str(sst2_slices["dev"]), DataConfig()).texts[:48]


def test_the_bundle_ships_the_base_graphs_and_the_adapter_checked_against_keras(two_adapters):
    from tfsft import artifacts
    from tfsft.export_shared_base import adapter_inputs

    import onnx

    bundle = two_adapters["first"] / "onnx"
    meta = json.loads((bundle / artifacts.BUNDLE_FILE).read_text())["shared_base"]
    assert meta["files"] == artifacts.SHARED_BASE_FILES and meta["adapter"] == artifacts.SHARED_BASE_ADAPTER
    for name in (*meta["files"].values(), meta["adapter"]):
        assert (bundle / name).is_file()
    # 2 layers x query, value x (lora_a, lora_b), and the classifier's kernel and bias
    assert len(meta["inputs"]) == 2 * 2 * 2 + 2
    assert all(name.startswith("adapter/") for name in meta["inputs"])
    for name in meta["files"].values():
        assert adapter_inputs(onnx.load(str(bundle / name))) == meta["inputs"]
    report = json.loads((bundle / artifacts.BUNDLE_REPORT).read_text())["shared_base"]
    fused = report["parity"][artifacts.SHARED_BASE_FILES["fused"]]
    assert {result["max_abs_logit_diff"] for result in fused.values()} and all(
        result["max_abs_logit_diff"] < 1e-4 for result in fused.values())
    assert report["parity"][artifacts.SHARED_BASE_FILES["int8"]]["batch_8"]["label_agreement"] > 0.9
    assert report["sizes_bytes"][artifacts.SHARED_BASE_ADAPTER] < 0.05 * report["sizes_bytes"][meta["files"]["fused"]]
    other = json.loads((two_adapters["second"] / "onnx" / artifacts.BUNDLE_FILE).read_text())["shared_base"]
    assert other["digests"] == meta["digests"]


@pytest.mark.parametrize("int8", [False, True])
def test_adapters_on_one_base_session_predict_as_their_merged_bundles(two_adapters, texts, int8):
    from tfsft.inference import Predictor, shared_base_predictors

    shared = shared_base_predictors({name: run / "onnx" for name, run in two_adapters.items()}, int8=int8)
    assert shared["first"].session is shared["second"].session
    merged = {name: Predictor(run / "onnx", int8=int8) for name, run in two_adapters.items()}
    logits = {name: shared[name].logits(texts) for name in shared}
    for name in shared:
        expected = merged[name].logits(texts)
        if int8:  # the adapters' own MatMuls stay float in the shared int8 graph: close, not equal
            assert np.mean(logits[name].argmax(1) == expected.argmax(1)) >= 0.9
        else:
            np.testing.assert_allclose(logits[name], expected, atol=1e-4)
    assert np.abs(logits["first"] - logits["second"]).max() > 1e-2  # each call ran its own adapter


def test_the_structure_digest_ignores_names_and_adapter_values_but_not_the_graph(two_adapters, tmp_path):
    from tfsft import artifacts
    from tfsft.export_shared_base import structure_digest

    import onnx
    from onnx import numpy_helper

    source = two_adapters["first"] / "onnx" / artifacts.SHARED_BASE_FILES["fused"]
    digest = structure_digest(source)

    def variant(edit) -> str:
        model = onnx.load(str(source))
        edit(model.graph)
        path = tmp_path / "edited.onnx"
        onnx.save(model, str(path))
        return structure_digest(path)

    def rename_internal(graph):
        kept = {v.name for v in graph.input} | {v.name for v in graph.output}
        names = {name for node in graph.node for name in (*node.input, *node.output) if name and name not in kept}
        names |= {init.name for init in graph.initializer if init.name not in kept}
        for init in graph.initializer:
            if init.name in names:
                init.name = "scope_1/" + init.name
        for node in graph.node:
            node.name = "scope_1/" + node.name
            node.input[:] = ["scope_1/" + n if n in names else n for n in node.input]
            node.output[:] = ["scope_1/" + n if n in names else n for n in node.output]

    def set_initializer(prefix_match: bool):
        def edit(graph):
            init = next(i for i in graph.initializer if i.name.startswith("adapter/") == prefix_match
                        and i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2)
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
        return edit

    def change_attribute(graph):
        node = next(n for n in graph.node if any(a.type == onnx.AttributeProto.FLOAT for a in n.attribute))
        attribute = next(a for a in node.attribute if a.type == onnx.AttributeProto.FLOAT)
        attribute.f += 1.0

    assert variant(rename_internal) == digest
    assert variant(set_initializer(prefix_match=True)) == digest  # another run's adapter values
    assert variant(set_initializer(prefix_match=False)) != digest  # another base's frozen weights
    assert variant(change_attribute) != digest


def test_the_server_shares_the_base_when_it_can_and_says_so(two_adapters, texts, bundle_dir):
    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import ServeSettings

    adapters = tuple((name, str(run / "onnx")) for name, run in two_adapters.items())
    sample = texts[:6]
    expected = {name: Predictor(path, int8=False).predict(sample) for name, path in adapters}
    for share in (True, False):
        settings = ServeSettings(adapters=adapters, precision="fp32", share_base=share)
        assert settings.sharing(settings.choices())[0] is share
        with TestClient(settings.build_app()) as client:
            meta = client.get("/metadata").json()["adapters"]
            assert all((meta[name]["shared_base"] is not None) is share for name in expected)
            for name in expected:
                answer = client.post("/predict", json={"adapter": name, "texts": sample}).json()
                assert [p["label"] for p in answer["predictions"]] == [p.label for p in expected[name]]
    # a bundle without shared-base files is served merged beside them, with the reason
    mixed = ServeSettings(adapters=(*adapters, ("plain", str(bundle_dir))), precision="fp32")
    shared, why = mixed.sharing(mixed.choices())
    assert not shared and "plain" in why and "--adapter_files" in why


def test_bundles_that_cannot_share_are_refused_with_the_reason(two_adapters, bundle_dir, tmp_path):
    from tfsft import artifacts
    from tfsft.inference import shared_base_predictors

    first = two_adapters["first"] / "onnx"
    with pytest.raises(ArtifactError, match="cannot share one base: no shared-base files"):
        shared_base_predictors({"a": first, "b": bundle_dir})
    corrupt = tmp_path / "corrupt"
    shutil.copytree(two_adapters["second"] / "onnx", corrupt)
    (corrupt / artifacts.SHARED_BASE_ADAPTER).write_bytes(b"not an adapter")
    with pytest.raises(ArtifactError, match="Corrupt or unreadable adapter file"):
        shared_base_predictors({"a": first, "b": corrupt})
    meta = json.loads((corrupt / artifacts.BUNDLE_FILE).read_text())
    meta["shared_base"]["digests"]["fused"] = "0" * 64
    (corrupt / artifacts.BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="base graphs differ"):
        shared_base_predictors({"a": first, "b": corrupt})


def test_adapter_files_need_a_lora_run(tiny_checkpoint, sst2_slices, tmp_path):
    from tfsft import RunConfig

    flags = dict(model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["train"]),
                 output_dir=str(tmp_path / "run"), adapter_files=True)
    with pytest.raises(ConfigError, match="adapter_files.*--lora_rank"):
        RunConfig.from_flat(flags)
    assert RunConfig.from_flat({**flags, "lora_rank": 4}).export.adapter_files


def test_tfsft_export_adds_the_files_to_a_run_trained_without_them(two_adapters, bundle_dir, tmp_path):
    from tfsft import artifacts
    from tfsft.commands.export import build_parser, run

    copy = tmp_path / "run"
    shutil.copytree(two_adapters["second"], copy)
    config = json.loads((copy / artifacts.CONFIG_FILE).read_text())
    config["export"]["adapter_files"] = False
    (copy / artifacts.CONFIG_FILE).write_text(json.dumps(config))
    shutil.rmtree(copy / artifacts.ONNX_DIR)
    run(build_parser().parse_args([str(copy), "--adapter_files", "--export_variants", "fused"]))
    meta = json.loads((copy / artifacts.ONNX_DIR / artifacts.BUNDLE_FILE).read_text())["shared_base"]
    assert set(meta["files"]) == {"fused"} and not (copy / artifacts.ONNX_DIR / artifacts.SHARED_BASE_FILES["int8"]).exists()
    original = json.loads((two_adapters["second"] / "onnx" / artifacts.BUNDLE_FILE).read_text())["shared_base"]
    assert meta["digests"]["fused"] == original["digests"]["fused"]  # another conversion, the same digest
    plain = tmp_path / "plain"
    shutil.copytree(bundle_dir.parent, plain)
    (plain / artifacts.METRICS_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="adapter_files"):  # not a LoRA run: refused before any work
        run(build_parser().parse_args([str(plain), "--adapter_files"]))


def test_no_share_base_reaches_every_worker_process(two_adapters):
    from tfsft.commands.serve import build_parser
    from tfsft.serving import ServeSettings

    runs = [f"{name}={run}" for name, run in two_adapters.items()]
    args = build_parser().parse_args(["--adapter", runs[0], "--adapter", runs[1], "--no_share_base"])
    assert args.share_base is False
    assert build_parser().parse_args(["--adapter", runs[0]]).share_base is True
    settings = ServeSettings(adapters=tuple(args.adapter), share_base=args.share_base)
    assert ServeSettings.from_json(settings.to_json()) == settings  # what --workers processes rebuild
