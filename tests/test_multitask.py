"""Multi-task runs: the `tasks:` config, task sampling, single-task batches, the shared model's
per-task loss, and a finished run's metrics, reports and saved model (export: test_multitask_export.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MULTITASK_SETTINGS, multitask_tasks, run_script
from tfsft import artifacts
from tfsft.config import RunConfig, load_config_file
from tfsft.errors import ConfigError


def config_with(tasks, **flags) -> RunConfig:
    return RunConfig.from_flat(dict(tasks=tasks, **flags))


TWO_TASKS = {
    "sentiment": {"task": "classification", "train_file": "s.tsv", "validation_file": "s_dev.tsv"},
    "similarity": {"task": "regression", "train_file": "p.tsv", "text_column": "sentence1", "text_pair_column": "sentence2",
                   "label_column": "score", "max_train_samples": 50},
}


# ------------------------------------------------------------------------------------- config


def test_tasks_config_from_yaml_round_trips_through_config_json(tmp_path):
    path = tmp_path / "mt.yaml"
    path.write_text(
        "max_seq_length: 64\nmax_train_samples: 200\nnum_train_epochs: 2\ntasks:\n"
        "  sentiment: {task: classification, train_file: s.tsv, text_column: sentence}\n"
        "  similarity: {task: regression, train_file: p.tsv, text_column_name: sentence1, text_pair_column: sentence2,\n"
        "               label_column: score, max_train_samples: 50, metric_for_best_model: pearson, loss_weight: 2.5}\n"
    )
    config = RunConfig.from_flat(load_config_file(str(path)))
    assert config.model.task == "multitask" and config.train.metric_for_best_model == "mean"
    sentiment, similarity = config.tasks
    assert (sentiment.name, sentiment.task, sentiment.metric_for_best_model) == ("sentiment", "classification", "accuracy")
    assert sentiment.data.max_train_samples == 200 and similarity.data.max_train_samples == 50  # shared, then own
    assert similarity.data.text_column == "sentence1" and similarity.metric_for_best_model == "pearson"
    assert (sentiment.loss_weight, similarity.loss_weight) == (1.0, 2.5)
    assert sentiment.data.max_seq_length == similarity.data.max_seq_length == 64
    saved = json.loads(json.dumps(config.to_dict()))
    assert [task["name"] for task in saved["tasks"]] == ["sentiment", "similarity"]  # in order
    assert "max_seq_length" not in saved["tasks"][0]  # only what differs from the shared flags
    assert RunConfig.from_dict(saved) == config
    assert saved["tasks"][1]["loss_weight"] == 2.5
    del saved["tasks"][1]["loss_weight"]  # a config.json written before loss weights
    assert RunConfig.from_dict(saved).tasks[1].loss_weight == 1.0
    assert config.replace(learning_rate=1e-4).tasks == config.tasks
    assert "tasks" not in RunConfig().to_dict()  # single-task config.json files are unchanged
    default_length = config_with(TWO_TASKS)
    assert [entry.data.max_seq_length for entry in default_length.tasks] == [128, 128]
    assert default_length.replace(few_shot="off").tasks == default_length.tasks


@pytest.mark.parametrize("tasks, flags, message", [
    ({"a": {"task": "qa", "train_file": "x"}}, {}, "tasks.a: task must be one of"),
    ({"a": {"train_file": "x", "colour": "red"}}, {}, "tasks.a: unknown key 'colour'"),
    ({"a": {"train_file": "x", "max_seq_length": 32}}, {}, "tasks.a: max_seq_length is set once for all tasks"),
    ({"a": {"validation_file": "x"}}, {}, "tasks.a.train_file"),
    ({"a b": {"train_file": "x"}}, {}, "a task name is letters"),
    ({"a": {"train_file": "x", "metric_for_best_model": "loss"}}, {}, "tasks.a.metric_for_best_model"),
    ({"a": {"train_file": "x", "max_train_samples": 0}}, {}, "tasks.a: Invalid value for --max_train_samples"),
    ({"a": {"train_file": "x", "loss_weight": 0}}, {}, "--tasks.a.loss_weight: expected a number above 0"),
    ({"a": {"train_file": "x", "loss_weight": -1.5}}, {}, "--tasks.a.loss_weight"),
    ({"a": {"train_file": "x", "loss_weight": "heavy"}}, {}, "--tasks.a.loss_weight"),
    ({"a": {"train_file": "x", "loss_weight": float("inf")}}, {}, "--tasks.a.loss_weight"),
    ({"a": {"train_file": "x", "loss_weight": True}}, {}, "--tasks.a.loss_weight"),
    ({"a": {"train_file": "x"}}, {"train_file": "y"}, "--train_file"),
    ({"a": {"train_file": "x"}}, {"lora_rank": 8}, "--lora_rank"),
    ({"a": {"train_file": "x"}}, {"metric_for_best_model": "accuracy"}, "'mean' for a multi-task run"),
    ({"a": {"train_file": "x"}}, {"task": "classification"}, "no value with a `tasks:` list"),
    ([1, 2], {}, "tasks: expected a mapping"),
])
def test_tasks_config_refuses_with_the_task_and_field(tasks, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_with(tasks, **flags)


def test_task_sampling_temperature_is_checked():
    with pytest.raises(ConfigError, match="task_sampling_temperature"):
        config_with(TWO_TASKS, task_sampling_temperature=0.5)


# ------------------------------------------------------------------------------------- sampling


def test_sampling_probabilities_follow_size_to_the_one_over_t():
    from tfsft.multitask import sampling_probabilities

    np.testing.assert_allclose(sampling_probabilities([300, 100], 1.0), [0.75, 0.25])
    np.testing.assert_allclose(sampling_probabilities([400, 100], 2.0), [2 / 3, 1 / 3])  # sqrt: 20 : 10
    assert np.ptp(sampling_probabilities([10_000, 10], 1e6)) < 1e-3  # large T: uniform


def test_task_schedule_gives_each_task_its_share_in_a_seeded_order():
    from tfsft.multitask import task_schedule

    probabilities = np.array([0.5, 0.3, 0.2])
    first = task_schedule(11, probabilities, seed=3, epoch=0)
    assert np.bincount(first, minlength=3).tolist() == [6, 3, 2]  # 5.5, 3.3, 2.2: largest remainder rounds 5.5 up
    assert np.array_equal(first, task_schedule(11, probabilities, seed=3, epoch=0))
    orders = {tuple(task_schedule(40, probabilities, seed=3, epoch=e)) for e in range(5)}
    assert len(orders) == 5  # reshuffled every epoch
    assert np.bincount(task_schedule(40, probabilities, 3, 1)).tolist() == [20, 12, 8]


def _parts(sizes, batch_size=4):
    from tfsft.data import LengthBatchedData

    parts = []
    for task, size in enumerate(sizes):
        ids = [np.arange(2, 4 + (i % 5), dtype=np.int32) for i in range(size)]
        encoded = _encoded(ids)
        labels = np.arange(size, dtype=np.int64) * 10 + task  # each label names its task and example
        parts.append(LengthBatchedData(encoded, labels, batch_size, shuffle=True, seed=0, feature_names=("input_ids", "attention_mask")))
    return parts


def _encoded(ids):
    from tfsft.tokenize import EncodedTexts

    lengths = np.array([len(row) for row in ids])
    return EncodedTexts(ids, [np.zeros_like(row) for row in ids], lengths, np.zeros(len(ids), dtype=bool))


def test_multitask_batches_are_single_task_and_cover_every_example_at_t1():
    from tfsft.multitask import MultiTaskData, sampling_probabilities

    sizes = [40, 12]
    data = MultiTaskData(_parts(sizes), sampling_probabilities(sizes, 1.0), seed=0)
    assert len(data) == 10 + 3
    seen: dict[int, list] = {0: [], 1: []}
    for features, labels in data:
        task_ids = features["task_id"]
        assert (task_ids == task_ids[0]).all() and labels.dtype == np.float32 and labels.shape == (len(task_ids), 1)
        assert ((labels[:, 0].astype(int) % 10) == task_ids[0]).all()  # labels of the batch's own task
        assert features["input_ids"].shape == features["attention_mask"].shape
        seen[int(task_ids[0])] += (labels[:, 0].astype(int) // 10).tolist()
    assert sorted(seen[0]) == list(range(40)) and sorted(seen[1]) == list(range(12))


def test_a_high_temperature_draws_the_small_task_again_in_new_passes():
    from tfsft.multitask import MultiTaskData, sampling_probabilities

    sizes = [80, 8]
    data = MultiTaskData(_parts(sizes), sampling_probabilities(sizes, 100.0), seed=0)
    drawn = [int(features["task_id"][0]) for features, _ in data]
    assert len(drawn) == 22 and abs(drawn.count(1) - 11) <= 1  # about half the batches, from 2 batches per pass
    data.epoch = 1
    assert [int(f["task_id"][0]) for f, _ in data] != drawn


# ------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def four_head_model(tiny_checkpoint):
    from tfsft.multitask_model import HeadSpec, build_multitask

    specs = [
        HeadSpec("topic", "classification", ("a", "b", "c")),
        HeadSpec("score", "regression", ("score",)),
        HeadSpec("tags", "multilabel", ("x", "y")),
        HeadSpec("ner", "ner", ("O", "B-PER", "I-PER")),
    ]
    model, report = build_multitask(tiny_checkpoint, specs, pooling="cls")
    assert report.loaded > 0
    return model


def _features(model, task_id: int):
    from tfsft.modeling import tf

    ids = tf.constant([[101, 2023, 2003, 102, 0], [101, 2307, 102, 0, 0]], dtype=tf.int32)
    return {
        "input_ids": ids, "attention_mask": tf.cast(ids > 0, tf.int32), "token_type_ids": tf.zeros_like(ids),
        "task_id": tf.fill([2], task_id),
    }


FOUR_HEAD_LABELS = (  # a batch of 2 for each of four_head_model's heads, in order
    np.array([2, 0]), np.array([3.5, 1.0], dtype=np.float32), np.array([[1, 0], [1, 1]], dtype=np.float32),
    np.array([[-100, 1, 2, -100, -100], [-100, 0, -100, -100, -100]], dtype=np.int32),
)


def _four_head_layouts():
    from tfsft.multitask_model import LabelLayout

    return [LabelLayout.of(FOUR_HEAD_LABELS[i]) if i != 3 else LabelLayout.of(np.array([[1]], dtype=object)) for i in range(4)]


def test_each_task_loss_is_its_own_head_against_a_hand_computation(four_head_model):
    from tfsft.multitask_model import HeadView, pack_labels
    from tfsft.tasks.base import log_softmax

    model = four_head_model
    labels = FOUR_HEAD_LABELS
    model.prepare_training(_four_head_layouts())
    for index, spec in enumerate(model.specs):
        features = _features(model, index)
        loss = float(model.task_loss(features, pack_labels(labels[index]), training=False))
        logits = HeadView(model, spec.name)(features).logits.numpy()
        if spec.task == "classification":
            expected = -log_softmax(logits)[[0, 1], labels[0]].mean()
        elif spec.task == "regression":
            expected = ((logits[:, 0] - labels[1]) ** 2).mean()
        elif spec.task == "multilabel":
            p = 1 / (1 + np.exp(-logits))
            expected = -(labels[2] * np.log(p) + (1 - labels[2]) * np.log(1 - p)).mean()
        else:
            keep = labels[3] != -100
            expected = -log_softmax(logits)[keep, labels[3][keep]].mean()
        assert loss == pytest.approx(expected, rel=1e-4), spec.task


def test_a_task_loss_is_multiplied_by_its_loss_weight(four_head_model):
    from tfsft.multitask_model import pack_labels

    model, labels, layouts = four_head_model, FOUR_HEAD_LABELS, _four_head_layouts()
    model.prepare_training(layouts)
    plain = [float(model.task_loss(_features(model, i), pack_labels(labels[i]), training=False)) for i in range(4)]
    weights = [1.0, 3.0, 0.25, 2.0]
    model.prepare_training(layouts, weights)
    weighted = [float(model.task_loss(_features(model, i), pack_labels(labels[i]), training=False)) for i in range(4)]
    assert weighted == pytest.approx([w * p for w, p in zip(weights, plain)], rel=1e-6)
    with pytest.raises(ValueError, match="3 loss weights for 4 heads"):
        model.prepare_training(layouts, weights[:3])


def test_a_batch_trains_the_encoder_and_its_own_head_only(four_head_model):
    from tfsft.modeling import tf
    from tfsft.multitask_model import LabelLayout, pack_labels

    model = four_head_model
    model.prepare_training([LabelLayout.of(np.array([0])), LabelLayout.of(np.array([0.0], dtype=np.float32)),
                            LabelLayout.of(np.zeros((1, 2), dtype=np.float32)), LabelLayout.of(np.array([[1]], dtype=object))])
    with tf.GradientTape() as tape:
        loss = model.task_loss(_features(model, 1), pack_labels(np.array([3.5, 1.0], dtype=np.float32)), training=False)
    heads = [head.classifier.kernel for head in model.heads]
    encoder_weight = model.encoder.trainable_weights[0]
    gradients = tape.gradient(loss, heads + [encoder_weight])
    norms = [0.0 if g is None else float(tf.norm(tf.convert_to_tensor(g))) for g in gradients]
    assert norms[1] > 0 and norms[4] > 0  # the regression head and the shared encoder learn
    assert norms[0] == norms[2] == norms[3] == 0.0  # the other heads get nothing


def test_a_step_of_another_task_leaves_a_head_and_its_moments_as_they_were(tiny_checkpoint):
    """AdamW with weight decay, one step of task 0, then one of task 1: the second moves the
    encoder and head 1 but leaves head 0 and its Adam moments alone. The control, without
    skip_when_unused, shows head 0 drifting on its stale momentum and decay."""
    from tfsft.config import TrainConfig
    from tfsft.multitask_model import HeadSpec, LabelLayout, build_multitask, pack_labels
    from tfsft.training import compile_model, skip_when_unused

    def two_steps(skip: bool):
        specs = [HeadSpec("topic", "classification", ("a", "b", "c")), HeadSpec("score", "regression", ("score",))]
        model, _ = build_multitask(tiny_checkpoint, specs, pooling="cls")
        model.prepare_training([LabelLayout.of(np.array([0])), LabelLayout.of(np.array([0.0], dtype=np.float32))])
        compile_model(model, TrainConfig(learning_rate=1e-2, weight_decay=0.1, warmup_ratio=0.0), 10, "classification",
                      objective=(None, []))
        if skip:
            skip_when_unused(model.optimizer, [v for head in model.heads for v in head.trainable_variables])
        head_0, head_1 = (head.classifier.kernel for head in model.heads)
        encoder_weight = model.encoder.trainable_weights[-1]
        model.train_on_batch(_features(model, 0), pack_labels(np.array([0, 2])))
        moment = model.optimizer._momentums[model.optimizer._index_dict[model.optimizer._var_key(head_0)]]
        before = [v.numpy().copy() for v in (head_0, moment, head_1, encoder_weight)]
        model.train_on_batch(_features(model, 1), pack_labels(np.array([3.5, 1.0], dtype=np.float32)))
        after = [v.numpy() for v in (head_0, moment, head_1, encoder_weight)]
        return [np.abs(a - b).max() for a, b in zip(after, before)]

    head_0, moment_0, head_1, encoder = two_steps(skip=True)
    assert head_0 == 0.0 and moment_0 == 0.0
    assert head_1 > 0 and encoder > 0
    drifted_head, drifted_moment, _, _ = two_steps(skip=False)
    assert drifted_head > 1e-4 and drifted_moment > 0


def test_head_view_is_the_model_output_of_that_head(four_head_model):
    from tfsft.multitask_model import HeadView

    features = _features(four_head_model, 0)
    outputs = four_head_model(features)
    for spec in four_head_model.specs:
        view = HeadView(four_head_model, spec.name)
        np.testing.assert_array_equal(view(features).logits.numpy(), outputs[spec.name].numpy())
        assert view.config.num_labels == spec.outputs and list(view.config.id2label.values()) == list(spec.labels)


# ------------------------------------------------------------------------------------- a finished run


def test_run_reports_each_task_as_a_single_task_run_would(multitask_run):
    metrics = json.loads((multitask_run / artifacts.METRICS_FILE).read_text())
    assert metrics["tasks"] == ["sentiment", "similarity", "entities"]
    assert {"eval_accuracy", "eval_f1", "eval_loss", "eval_samples"} <= set(metrics["sentiment"])
    assert {"eval_spearman", "eval_pearson", "eval_mse"} <= set(metrics["similarity"])
    assert {"eval_f1", "eval_precision", "eval_recall"} <= set(metrics["entities"])
    mains = [metrics["sentiment"]["eval_accuracy"], metrics["similarity"]["eval_spearman"], metrics["entities"]["eval_f1"]]
    assert metrics["eval_mean"] == pytest.approx(np.mean(mains))
    assert sum(metrics[name]["sampling_probability"] for name in metrics["tasks"]) == pytest.approx(1.0)
    assert [metrics[name]["loss_weight"] for name in metrics["tasks"]] == [1.0, 2.0, 1.0]  # as conftest sets them
    assert metrics["train_samples"] == sum(metrics[name]["train_samples"] for name in metrics["tasks"])
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    for name in metrics["tasks"]:
        report = json.loads((multitask_run / "tasks" / name / "eval_report.json").read_text())
        assert report, name
    assert (multitask_run / "tasks" / "sentiment" / artifacts.CONFUSION_PLOT).is_file()
    config = artifacts.read_config(multitask_run)
    assert [entry.name for entry in config.tasks] == metrics["tasks"] and config.train.few_shot == "off"


def test_best_epoch_is_the_best_mean_of_the_tasks_main_metrics(multitask_run):
    history = artifacts.read_history(multitask_run / artifacts.HISTORY_FILE)
    metrics = json.loads((multitask_run / artifacts.METRICS_FILE).read_text())
    assert len(history) == MULTITASK_SETTINGS["num_train_epochs"]
    best = max(history, key=lambda row: row["val_mean"])
    assert metrics["eval_mean"] == pytest.approx(best["val_mean"], abs=1e-6)
    assert metrics["similarity"]["eval_spearman"] == pytest.approx(best["val_similarity_spearman"], abs=1e-6)


def test_saved_model_reloads_to_the_reported_scores(multitask_run):
    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits, task_metrics
    from tfsft.export import recorded_validation
    from tfsft.checkpoint import load_tokenizer, text_encoder
    from tfsft.data import encode_labels
    from tfsft.multitask_model import HeadView, load_multitask
    from tfsft.tasks import get_task

    model = load_multitask(multitask_run / artifacts.MODEL_DIR)
    config = artifacts.read_config(multitask_run)
    metrics = json.loads((multitask_run / artifacts.METRICS_FILE).read_text())
    encoder = text_encoder(load_tokenizer(multitask_run / artifacts.MODEL_DIR), config.data.max_seq_length)
    for entry in config.tasks:
        spec = model.specs[model.index(entry.name)]
        examples = recorded_validation(multitask_run / "tasks" / entry.name)
        labels = encode_labels(entry.task, spec.label_map(), examples, entry.data.label_delimiter)
        encoded, y, reference = get_task(entry.task).encode(encoder, examples, labels, entry.data)
        data = LengthBatchedData(encoded, y, 16, shuffle=False, feature_names=model.inputs_accepted)
        scores, _ = task_metrics(entry.task, reference, predict_logits(HeadView(model, entry.name), data), spec.label_map(), "eval")
        key = f"eval_{entry.metric_for_best_model}"
        assert scores[key] == pytest.approx(metrics[entry.name][key], abs=1e-6), entry.name


def test_a_missing_model_file_is_a_one_line_error(multitask_run, tmp_path):
    import shutil

    from tfsft.errors import ArtifactError
    from tfsft.multitask_model import load_multitask

    copy = tmp_path / "model"
    shutil.copytree(multitask_run / artifacts.MODEL_DIR, copy)
    (copy / "multitask_weights.h5").unlink()
    with pytest.raises(ArtifactError, match="multitask_weights.h5"):
        load_multitask(copy)
    (copy / "multitask.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt multi-task description"):
        load_multitask(copy)


def test_finetune_script_runs_a_tasks_config_and_names_a_bad_task_file(tmp_path, tiny_checkpoint):
    import yaml

    tasks = multitask_tasks(tmp_path)
    del tasks["entities"]
    config = {"model_name_or_path": str(tiny_checkpoint), **MULTITASK_SETTINGS, "num_train_epochs": 1, "tasks": tasks}
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_script("finetune.py", "--config", str(path), "--output_dir", str(tmp_path / "run"), "--no_export")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / artifacts.METRICS_FILE).read_text())
    assert metrics["tasks"] == ["sentiment", "similarity"] and metrics["epochs"] == 1

    tasks["similarity"]["train_file"] = str(tmp_path / "missing.tsv")
    path.write_text(yaml.safe_dump({**config, "tasks": tasks}))
    result = run_script("finetune.py", "--config", str(path), "--output_dir", str(tmp_path / "run2"), "--no_export")
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "tasks.similarity" in error[0] and "missing.tsv" in error[0]
    assert not (tmp_path / "run2").exists()


def test_evaluate_scores_one_head_on_a_file_with_its_columns(multitask_run, tmp_path):
    from tfsft.pipeline import evaluate_run

    config = artifacts.read_config(multitask_run)
    similarity = next(entry for entry in config.tasks if entry.name == "similarity")
    metrics = evaluate_run(str(multitask_run), similarity.data.validation_file, task="similarity")
    reported = json.loads((multitask_run / artifacts.METRICS_FILE).read_text())["similarity"]
    assert metrics["eval_spearman"] == pytest.approx(reported["eval_spearman"], abs=1e-6)
    assert (multitask_run / "evaluations" / "similarity" / "stsb_dev" / artifacts.METRICS_FILE).is_file()
    with pytest.raises(ConfigError, match=r"--task must name one of its tasks \['sentiment', 'similarity', 'entities'\]"):
        evaluate_run(str(multitask_run), similarity.data.validation_file)


MIRRORED_MULTITASK = """
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
from pathlib import Path
from tfsft.modeling import tf
checkpoint, strategy_name, start_file, out_file = sys.argv[1:5]
if strategy_name == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from transformers import BertConfig, TFBertModel
from tfsft.config import TrainConfig
from tfsft.data import batches_dataset
from tfsft.multitask_model import HeadSpec, LabelLayout, build_multitask, pack_labels
from tfsft.training import compile_model, make_strategy

tf.keras.utils.set_random_seed(0)
if not Path(checkpoint).exists():
    config = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = TFBertModel(config)
    bert(bert.dummy_inputs)
    bert.save_pretrained(checkpoint)
rng = np.random.default_rng(0)
batches = []
for step in range(4):
    task = step % 2
    ids = rng.integers(5, 120, size=(8, 6)).astype(np.int32)
    labels = rng.integers(0, 3, size=8) if task == 0 else rng.normal(size=8).astype(np.float32)
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
                "task_id": np.full(8, task, dtype=np.int32)}
    batches.append((features, pack_labels(labels)))
signature = ({k: tf.TensorSpec([None, None] if k != "task_id" else [None], tf.int32) for k in batches[0][0]},
             tf.TensorSpec([None, None], tf.float32))
specs = [HeadSpec("topic", "classification", ("a", "b", "c")), HeadSpec("score", "regression", ("score",))]
strategy = make_strategy(strategy_name)
with strategy.scope():
    model, _ = build_multitask(Path(checkpoint), specs, pooling="cls")
    if Path(start_file).exists():
        model.set_weights(list(np.load(start_file).values()))
    else:
        np.savez(start_file, *model.get_weights())
    model.prepare_training([LabelLayout.of(np.array([0])), LabelLayout.of(np.array([0.5], dtype=np.float32))])
    compile_model(model, TrainConfig(learning_rate=1e-2, warmup_ratio=0.0), 4, "multitask", steps_per_epoch=4,
                  objective=(None, []))
model.fit(batches_dataset(batches, signature), epochs=1, verbose=0)
np.savez(out_file, *model.get_weights())
print(strategy.num_replicas_in_sync, int(model.optimizer.iterations.numpy()))
"""


def test_mirrored_training_equals_one_replica(tmp_path):
    """Two replicas of 4 against one of 8 (separate processes, the same start), batches of
    alternating tasks: the same weights after four steps, so each replica's loss is scaled as the
    optimizer sums their gradients."""
    import subprocess
    import sys

    from conftest import ROOT

    start, outputs = tmp_path / "start.npz", {}
    for strategy in ("mirrored", "default"):
        outputs[strategy] = tmp_path / f"{strategy}.npz"
        result = subprocess.run(
            [sys.executable, "-c", MIRRORED_MULTITASK, str(tmp_path / "bert"), strategy, str(start), str(outputs[strategy])],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[-2:] == ["2" if strategy == "mirrored" else "1", "4"]
    initial, mirrored, default = (list(np.load(path).values()) for path in (start, outputs["mirrored"], outputs["default"]))
    assert max(float(np.abs(a - b).max()) for a, b in zip(default, initial)) > 1e-3
    assert max(float(np.abs(a - b).max()) for a, b in zip(mirrored, default)) < 1e-5


def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_checkpoint, tmp_path):
    """SIGKILL in the middle of the second epoch, the same command again: the task schedule and
    every task's batches replay, and the metrics equal a run that was never killed."""
    import signal

    import yaml

    from test_resume import run_with_signal
    from tfsft import finetune

    settings = {"model_name_or_path": str(tiny_checkpoint), **MULTITASK_SETTINGS, "tasks": multitask_tasks(tmp_path)}
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    reference = finetune(RunConfig.from_flat({**settings, "output_dir": str(tmp_path / "ref"), "export": False}), verbose=0)
    args = ["--config", str(path), "--output_dir", str(tmp_path / "run"), "--no_export"]
    killed = run_with_signal(1, 8, signal.SIGKILL, args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / ".run.partial" / "backup").is_dir() and not (tmp_path / "run").exists()
    resumed = run_script("finetune.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the interrupted run" in resumed.stderr
    metrics = json.loads((tmp_path / "run" / artifacts.METRICS_FILE).read_text())
    assert metrics["epochs"] == 2 and metrics["epochs_resumed"] == 1
    for name in metrics["tasks"]:
        for key, value in reference.metrics[name].items():
            if key.startswith("eval_"):
                assert metrics[name][key] == pytest.approx(value, abs=1e-5), (name, key)


def test_a_multilabel_head_ships_its_validation_threshold_and_predicts_label_sets(tiny_checkpoint, tmp_path):
    """Multilabel beside classification, exported: the threshold chosen on validation is that head's
    decision in bundle.json, and the Predictor's label sets are its probabilities at that threshold."""
    import csv

    from conftest import shared_path, write_tsv_slice
    from tfsft import finetune
    from tfsft.inference import Predictor

    sst2 = write_tsv_slice(shared_path("glue", "SST-2", "train.tsv"), tmp_path / "sst2.tsv", 240)
    rows = [line.split("\t") for line in sst2.read_text(encoding="utf-8").splitlines()[1:]]
    tagged = tmp_path / "tagged.csv"
    with tagged.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "labels"])
        for text, label in rows:  # real phrases, two label families: sentiment and length
            names = ["positive" if label == "1" else "negative"] + (["long"] if len(text.split()) > 6 else [])
            writer.writerow([text, "|".join(names)])
    tasks = {
        "tags": {"task": "multilabel", "train_file": str(tagged), "label_column": "labels"},
        "sentiment": {"task": "classification", "train_file": str(sst2)},
    }
    result = finetune(RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), tasks=tasks, output_dir=str(tmp_path / "run"), **MULTITASK_SETTINGS,
    )), verbose=0)
    metrics = result.metrics
    assert {"eval_f1_micro", "eval_threshold"} <= set(metrics["tags"])
    bundle = json.loads((result.run_dir / "onnx" / "bundle.json").read_text())
    assert bundle["tasks"]["tags"]["decision"]["threshold"] == pytest.approx(metrics["tags"]["eval_threshold"])
    predictor = Predictor(result.run_dir / "onnx", int8=False)
    texts = [row[0] for row in rows[:12]]
    threshold = metrics["tags"]["eval_threshold"]
    probabilities = 1 / (1 + np.exp(-predictor.logits(texts, task="tags")))
    names = predictor.for_task("tags").labels
    for prediction, row in zip(predictor.predict(texts, task="tags"), probabilities):
        assert sorted(prediction.labels) == sorted(name for name, p in zip(names, row) if p >= threshold)
    assert {p.label for p in predictor.predict(texts, task="sentiment")} <= {"0", "1"}
