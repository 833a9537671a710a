"""The promised encoder families other than BERT, each with its own kind of tokenizer, end to end:
training (`finetune`, a tiny budget), ONNX export with its parity checks, and the Predictor on the
bundle. Checkpoints are tiny (2 layers, hidden 32) with tokenizers trained here, by the `tokenizers`
library, on a few hundred lines of the shared data: byte-level BPE (RoBERTa), WordPiece (DistilBERT,
uncased; ELECTRA, cased) and Unigram with Metaspace (ALBERT, SentencePiece-like)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from tfsft import artifacts
from tfsft.config import RunConfig

FAMILIES = ("roberta", "distilbert", "electra", "albert")
TOKENIZER_MODELS = {"roberta": "BPE", "distilbert": "WordPiece", "electra": "WordPiece", "albert": "Unigram"}
SIZE = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=130)


def corpus() -> list[str]:
    """Three hundred SST-2 sentences and three hundred CoNLL sentences (names, numbers, punctuation)."""
    sst2 = shared_path("glue", "SST-2", "train.tsv").read_text(encoding="utf-8").splitlines()[1:301]
    blocks = shared_path("conll2003", "train.txt").read_text(encoding="utf-8").split("\n\n")[:301]
    conll = [" ".join(line.split()[0] for line in block.splitlines() if line.strip()) for block in blocks]
    return [line.split("\t")[0] for line in sst2] + [s for s in conll if s and not s.startswith("-DOCSTART-")]


def cls_sep_template():
    """BERT's special tokens around one text or a pair, with [CLS] id 2 and [SEP] id 3."""
    from tokenizers import processors

    return processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )


def build_tokenizer(family: str, directory: Path):
    """Train the family's kind of tokenizer and save it as transformers saves that family's."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    lines = corpus()
    if family == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator(lines, trainers.BpeTrainer(
            vocab_size=1200, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        wrapped = transformers.RobertaTokenizerFast(tokenizer_object=backend, model_max_length=128)
    elif family == "albert":
        specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
        backend = Tokenizer(models.Unigram())
        backend.normalizer = normalizers.Sequence([
            normalizers.Replace("``", '"'), normalizers.Replace("''", '"'), normalizers.NFKD(),
            normalizers.StripAccents(), normalizers.Lowercase(),
        ])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(),
        ])
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=1200, special_tokens=specials, unk_token="<unk>")
        backend.train_from_iterator(lines, trainer)
        backend.post_processor = cls_sep_template()
        wrapped = transformers.AlbertTokenizerFast(tokenizer_object=backend, model_max_length=128)
    else:
        lowercase = family == "distilbert"
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        backend.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=1200, special_tokens=specials))
        backend.post_processor = cls_sep_template()
        fast = transformers.DistilBertTokenizerFast if family == "distilbert" else transformers.ElectraTokenizerFast
        wrapped = fast(tokenizer_object=backend, do_lower_case=lowercase, model_max_length=128)
    wrapped.save_pretrained(str(directory))
    return wrapped


def build_checkpoint(family: str, directory: Path) -> Path:
    """A randomly initialised tiny encoder of the family, saved with its tokenizer as `tf_model.h5`."""
    import transformers

    tokenizer = build_tokenizer(family, directory)
    vocab = len(tokenizer)
    if family == "roberta":
        config = transformers.RobertaConfig(vocab_size=vocab, hidden_size=32, type_vocab_size=1, pad_token_id=1,
                                            bos_token_id=0, eos_token_id=2, **SIZE)
    elif family == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=128, pad_token_id=0)
    elif family == "electra":
        config = transformers.ElectraConfig(vocab_size=vocab, embedding_size=16, hidden_size=32, pad_token_id=0, **SIZE)
    else:
        config = transformers.AlbertConfig(vocab_size=vocab, embedding_size=16, hidden_size=32, pad_token_id=0,
                                           bos_token_id=2, eos_token_id=3, **SIZE)
    from tfsft.modeling import tf

    tf.keras.utils.set_random_seed(0)  # the same weights every run: the training budgets below are tight
    model = transformers.TFAutoModel.from_config(config)
    model(model.dummy_inputs)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> tiny checkpoint directory, built on first use."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_checkpoint(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.mark.parametrize("family", ["bert", *FAMILIES])
def test_words_encode_as_they_do_in_running_text(family, tmp_path, tiny_checkpoint):
    """Pre-split words (token classification) get the word pieces they get inside a sentence: a
    byte-level BPE marks a word after a space (`Ġ`), so each word is encoded with that prefix."""
    from tfsft.tokenize import TextEncoder

    directory = tiny_checkpoint if family == "bert" else tmp_path
    if family != "bert":
        build_tokenizer(family, tmp_path)
    encoder = TextEncoder.from_file(directory / "tokenizer.json", 64)
    sentences = [["Peter", "Blackburn", "said", "the", "film", "was", "great"], ["EU", "rejects", "German", "call"]]
    encoded, word_ids = encoder.encode_words(sentences)
    running = encoder.encode([" " + " ".join(words) for words in sentences])
    for i, words in enumerate(sentences):
        np.testing.assert_array_equal(encoded.input_ids[i], running.input_ids[i])
        assert sorted(set(word_ids[i].tolist()) - {-1}) == list(range(len(words)))
    if family == "roberta":
        tokens = [encoder.tokenizer.id_to_token(int(i)) for i in encoded.input_ids[0]]
        assert tokens[1].startswith("Ġ") and tokens[0] == "<s>" and tokens[-1] == "</s>"


def keras_probabilities(run_dir: Path, task: str, encoded, pad_id: int) -> np.ndarray:
    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits
    from tfsft.inference import softmax
    from tfsft.modeling import feature_names, load_finetuned

    model = load_finetuned(run_dir / artifacts.MODEL_DIR, task)
    data = LengthBatchedData(encoded, None, 8, shuffle=False, pad_id=pad_id, feature_names=feature_names(model))
    return softmax(predict_logits(model, data))


def check_bundle(run_dir: Path, family: str) -> dict:
    """The bundle's metadata, after checking its parity report and tokenizer kind."""
    report = json.loads((run_dir / "onnx" / artifacts.BUNDLE_REPORT).read_text())
    fp32 = [name for name in report["parity"] if name != artifacts.BUNDLE_MODEL_INT8]
    assert fp32 == [artifacts.BUNDLE_MODEL_FUSED if report["fusion"]["applied"] else artifacts.BUNDLE_MODEL]
    for name in fp32:
        for batch in ("batch_1", "batch_8"):
            assert report["parity"][name][batch]["max_abs_logit_diff"] < 1e-4, (name, batch)
            assert report["parity"][name][batch]["label_agreement"] == 1.0, (name, batch)
    tokenizer = json.loads((run_dir / "onnx" / artifacts.BUNDLE_TOKENIZER).read_text())
    assert tokenizer["model"]["type"] == TOKENIZER_MODELS[family]
    meta = json.loads((run_dir / "onnx" / artifacts.BUNDLE_FILE).read_text())
    assert meta["model_type"] == family
    assert ("token_type_ids" in meta["inputs"]) == (family != "distilbert")
    return meta


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_classification_trains_exports_and_serves(family, checkpoints, sst2_slices, tmp_path):
    from tfsft import finetune
    from tfsft.inference import Predictor

    checkpoint = checkpoints(family)
    result = finetune(RunConfig.from_flat(dict(
        model_name_or_path=str(checkpoint), train_file=str(sst2_slices["train"]),
        validation_file=str(sst2_slices["dev"]), max_train_samples=48, max_eval_samples=24, num_train_epochs=1,
        learning_rate=1e-3, warmup_ratio=0.0, per_device_train_batch_size=16, max_seq_length=64,
        output_dir=str(tmp_path / "run"), quantize_int8=False,
    )), verbose=0)
    metrics, run_dir = result.metrics, result.run_dir
    assert metrics["eval_samples"] == 24 and metrics["train_samples"] == 48
    # Only the head is new (DistilBERT's loading info also names its weightless head dropout layer).
    new = [name for name in metrics["newly_initialized"] if not name.startswith("dropout")]
    assert new and all("classifier" in name for name in new), metrics["newly_initialized"]
    check_bundle(run_dir, family)

    predictor = Predictor(run_dir / "onnx")
    texts = [line.split("\t")[0] for line in sst2_slices["dev"].read_text(encoding="utf-8").splitlines()[1:13]]
    predictions = predictor.predict(texts)
    got = np.array([[p.probabilities[label] for label in predictor.labels] for p in predictions])
    expected = keras_probabilities(run_dir, "classification", predictor.encoder.encode(texts), predictor.encoder.pad_id)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_roberta_tags_raw_text_end_to_end(checkpoints, tmp_path):
    """NER with a byte-level BPE: the words of raw text are encoded with the prefix space in
    training, export and serving alike, and the Predictor's spans are the Keras model's."""
    from tfsft import finetune
    from tfsft.inference import Predictor
    from tfsft.tasks.ner import entity_spans, word_tags
    from tfsft.tokenize import split_words

    # A tiny model needs a few epochs before it tags anything; the texts to tag are sentences it
    # trained on, written as raw text (punctuation attached), so its spans are not all empty.
    blocks = shared_path("conll2003", "train.txt").read_text(encoding="utf-8").split("\n\n")
    (tmp_path / "train.txt").write_text("\n\n".join(blocks[1:161]) + "\n", encoding="utf-8")
    (tmp_path / "dev.txt").write_text("\n\n".join(blocks[1:25]) + "\n", encoding="utf-8")
    result = finetune(RunConfig.from_flat(dict(
        task="ner", model_name_or_path=str(checkpoints("roberta")), train_file=str(tmp_path / "train.txt"),
        validation_file=str(tmp_path / "dev.txt"), num_train_epochs=6, learning_rate=1e-2, warmup_ratio=0.0,
        per_device_train_batch_size=16, max_seq_length=64, output_dir=str(tmp_path / "run"), quantize_int8=False,
    )), verbose=0)
    run_dir = result.run_dir
    check_bundle(run_dir, "roberta")

    predictor = Predictor(run_dir / "onnx")
    sentences = [[line.split()[0] for line in block.splitlines()] for block in blocks[1:25]]
    texts = [re.sub(r" ([,.;:)'])", r"\1", re.sub(r"\( ", "(", " ".join(words))) for words in sentences]
    assert sum(bool(re.search(r"\w[,.]", text)) for text in texts) > 10
    predictions = predictor.predict(texts)
    words = [split_words(text) for text in texts]
    encoded, word_ids = predictor.encoder.encode_words([[w for w, _, _ in ws] for ws in words])
    pieces = [predictor.encoder.tokenizer.id_to_token(int(i)) for i in encoded.input_ids[0]]
    assert all(pieces[np.flatnonzero(word_ids[0] == w)[0]].startswith("Ġ") for w in range(len(words[0])))
    probabilities = keras_probabilities(run_dir, "ner", encoded, predictor.encoder.pad_id)
    tagged = 0
    for i, prediction in enumerate(predictions):
        tags, scores = word_tags(probabilities[i], word_ids[i], len(words[i]), predictor.labels)
        tagged += sum(tag != "O" for tag in tags)
        expected = entity_spans(texts[i], words[i], tags, scores)
        assert [(e["entity"], e["start"], e["end"]) for e in prediction.entities] == [
            (e["entity"], e["start"], e["end"]) for e in expected]
        assert [e["score"] for e in prediction.entities] == pytest.approx([e["score"] for e in expected], abs=1e-4)
    assert tagged > 0  # the spans compared are not all empty
