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


ARCHITECTURES = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, pad_token_id=0),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "electra": dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "albert": dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_bert_family_architectures_train_through_the_same_path(model_type, tiny_checkpoint, sst2_slices, tmp_path):
    import shutil

    from transformers import AutoConfig, TFAutoModel

    from conftest import TOKENIZER_FILES
    from tfsft import RunConfig, finetune

    checkpoint = tmp_path / model_type
    config = AutoConfig.for_model(model_type, vocab_size=30522, max_position_embeddings=512, **ARCHITECTURES[model_type])
    encoder = TFAutoModel.from_config(config)
    encoder(encoder.dummy_inputs)
    encoder.save_pretrained(str(checkpoint))
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / name, checkpoint / name)
    result = finetune(
        RunConfig.from_flat(dict(
            model_name_or_path=str(checkpoint), train_file=str(sst2_slices["train"]),
            validation_file=str(sst2_slices["dev"]), max_train_samples=64, max_eval_samples=32,
            output_dir=str(tmp_path / "run"), export=False,
        )),
        verbose=0,
    )
    assert result.metrics["eval_samples"] == 32
    new = result.metrics["newly_initialized"]
    assert any("classifier" in name for name in new)
    assert not [name for name in new if any(part in name for part in ("embeddings", "encoder", "transformer", "layer_"))]
