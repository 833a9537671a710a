import numpy as np
import pytest

from tfsft.data import LabelMap
from tfsft.errors import ArtifactError
from tfsft.modeling import build_classifier, embedded_checkpoint, feature_names, resolve_checkpoint


def test_tiny_checkpoint_gets_a_fresh_head_only(tiny_checkpoint):
    model, report = build_classifier(tiny_checkpoint, LabelMap(("neg", "pos")))
    assert report.weights_file == "tf_model.h5"
    assert report.newly_initialized == ("classifier",)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert feature_names(model) == ("input_ids", "attention_mask", "token_type_ids")


@pytest.mark.slow
def test_embedded_minilm_loads_every_encoder_weight_from_safetensors():
    from safetensors.numpy import load_file

    checkpoint = embedded_checkpoint()
    model, report = build_classifier(checkpoint, LabelMap(("a", "b", "c")))
    assert report.weights_file == "model.safetensors"
    assert set(report.newly_initialized) == {"classifier.weight", "classifier.bias"}
    state = load_file(str(checkpoint / "model.safetensors"))
    encoder_weights = [w for w in model.weights if "classifier" not in w.name]
    assert len(encoder_weights) == len([k for k in state if k != "embeddings.position_ids"])
    by_name = {w.name: w.numpy() for w in model.weights}
    query = next(v for k, v in by_name.items() if "layer_._5/attention/self/query/kernel" in k)
    np.testing.assert_array_equal(query, state["encoder.layer.5.attention.self.query.weight"].T)
    word_embeddings = next(v for k, v in by_name.items() if "word_embeddings/weight" in k)
    np.testing.assert_array_equal(word_embeddings, state["embeddings.word_embeddings.weight"])


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(ArtifactError, match="checkpoint directory not found"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(ArtifactError, match="config.json missing"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    with pytest.raises(ArtifactError, match="no TensorFlow-loadable weights"):
        build_classifier(resolve_checkpoint(str(tmp_path)), LabelMap(("a", "b")))


def test_corrupt_weights_file_is_an_artifact_error(tiny_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "tf_model.h5").write_bytes(b"\x89HDF\r\n garbage")
    with pytest.raises(ArtifactError, match="tf_model.h5"):
        build_classifier(broken, LabelMap(("a", "b")))
