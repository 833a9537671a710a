"""Few labels: SetFit's recipe (Tunstall et al. 2022) in Keras, and self-training on unlabelled text.

With a dozen examples per class, fine-tuning a classifier end to end is unstable. SetFit first
trains the encoder as a sentence encoder on pairs of labelled texts (a cosine-similarity loss pulls
same-class pairs towards 1 and pushes different-class pairs towards 0, so N examples give N x pairs
training signals), then fits the head by logistic regression on the encoder's embeddings. The
result is an ordinary classifier of the run's class, so evaluation, export, the Predictor and the
server do not know how it was trained.

Self-training (--unlabeled_file) lets that model label unlabelled texts, keeps the confident ones,
balanced across classes, and trains again on labelled plus pseudo-labelled examples.

The pair sampler, the `auto` decision and the pseudo-label selection need no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from tfsft.config import FEW_SHOT_MAX_PER_CLASS, RunConfig, TrainConfig
from tfsft.data import batches_dataset, plan_batches
from tfsft.errors import ConfigError
from tfsft.tasks import get_task
from tfsft.tokenize import EncodedTexts, pad_batch

EMBED_BATCH_SIZE = 64
"""Texts per call when embedding the training or unlabelled texts (inference only)."""


def _log(message: str) -> None:
    print(f"[tfsft] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- when it applies


def class_counts(label_ids: np.ndarray, num_labels: int) -> np.ndarray:
    """Training examples per class: label ids [N], or the examples carrying each label of a
    multi-hot [N, labels] matrix."""
    if label_ids.ndim == 2:
        return label_ids.sum(axis=0).astype(np.int64)
    return np.bincount(label_ids.astype(np.int64), minlength=num_labels)


def resolve_few_shot(
    config: RunConfig, label_ids: Optional[np.ndarray], num_labels: int, pooling: str
) -> tuple[bool, str]:
    """(on, why) for the run's --few_shot. `auto` is on when the smallest class (of those in the
    training data) has at most FEW_SHOT_MAX_PER_CLASS examples and the checkpoint is a sentence
    encoder (it pools by mean: the embedded MiniLM, sentence-transformers checkpoints), which is
    what SetFit's contrastive stage was designed for; `pooling` is the head's resolved pooling."""
    mode, task = config.train.few_shot, config.model.task
    if mode != "auto":
        return mode == "on", f"--few_shot {mode}"
    if not get_task(task).few_shot:
        return False, f"--few_shot auto: not for --task {task}"
    if label_ids is None or config.data.streaming or config.train.strategy == "multiworker":
        return False, "--few_shot auto: not for a streamed or multi-worker run"
    counts = class_counts(label_ids, num_labels)
    smallest = int(counts[counts > 0].min())
    if smallest > FEW_SHOT_MAX_PER_CLASS:
        return False, f"--few_shot auto: the smallest class has {smallest} training examples (> {FEW_SHOT_MAX_PER_CLASS})"
    if pooling != "mean":
        return False, (
            f"--few_shot auto: the smallest class has {smallest} training examples, but the checkpoint is not a "
            f"sentence encoder (pooling {pooling}); --few_shot on forces it"
        )
    return True, f"--few_shot auto: the smallest class has {smallest} training examples (<= {FEW_SHOT_MAX_PER_CLASS})"


# ------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class SentencePairs:
    """Index pairs into the labelled examples with their target cosine similarity (1 or 0)."""

    first: np.ndarray
    second: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


def sample_pairs(label_ids: np.ndarray, pairs_per_example: int, seed: int) -> SentencePairs:
    """SetFit's pair generation: for each example, `pairs_per_example` partners (half of them,
    rounded up, of the same class, the rest of another), drawn with a seeded generator, never the
    example itself. Multilabel ([N, labels] multi-hot): same class means sharing a label, another
    class means sharing none. An example with no possible partner of a kind gets none of it."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(label_ids)
    n = len(labels)
    if labels.ndim == 2:
        shared = (labels.astype(np.int64) @ labels.astype(np.int64).T) > 0
    else:
        shared = labels[:, None] == labels[None, :]
    positives_each = math.ceil(pairs_per_example / 2)
    negatives_each = pairs_per_example - positives_each
    first, second, targets = [], [], []
    for i in range(n):
        same = np.flatnonzero(shared[i])
        same = same[same != i]
        other = np.flatnonzero(~shared[i])
        other = other[other != i]
        for candidates, count, target in ((same, positives_each, 1.0), (other, negatives_each, 0.0)):
            if len(candidates) == 0 or count == 0:
                continue
            partners = rng.choice(candidates, size=count, replace=len(candidates) < count)
            first.extend([i] * count)
            second.extend(partners.tolist())
            targets.extend([target] * count)
    if not targets:
        raise ConfigError("--few_shot: the training data give no sentence pairs (it needs at least two examples)")
    order = rng.permutation(len(targets))
    return SentencePairs(
        np.asarray(first, dtype=np.int64)[order], np.asarray(second, dtype=np.int64)[order],
        np.asarray(targets, dtype=np.float32)[order],
    )


@dataclass
class PairBatches:
    """Sentence pairs as padded batches: each batch stacks the first texts over the second ones
    ([2 x batch, length]), so one encoder call embeds both; reshuffled every pass."""

    encoded: EncodedTexts
    pairs: SentencePairs
    batch_size: int
    seed: int
    pad_id: int
    feature_names: tuple[str, ...]
    passes: int = 0

    def __len__(self) -> int:
        return math.ceil(len(self.pairs) / self.batch_size)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.passes]).permutation(len(self.pairs))
        self.passes += 1
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            rows = np.concatenate([self.pairs.first[chosen], self.pairs.second[chosen]])
            padded = pad_batch(self.encoded, rows, self.pad_id)
            yield {name: padded[name] for name in self.feature_names}, self.pairs.targets[chosen]

    def to_tf_dataset(self):
        from tfsft.modeling import tf

        features = {name: tf.TensorSpec([None, None], tf.int32, name=name) for name in self.feature_names}
        return batches_dataset(self, (features, tf.TensorSpec([None], tf.float32)))


# ---------------------------------------------------------------------------- pseudo-labels


@dataclass(frozen=True)
class PseudoLabels:
    """Unlabelled examples chosen by `select_pseudo_labels`: their indices and label ids (or multi-hot rows)."""

    indices: np.ndarray
    labels: np.ndarray
    added: dict[int, int]
    """Pseudo-labels per class id."""


def select_pseudo_labels(
    probabilities: np.ndarray, threshold: float, per_class: int, multilabel: bool = False,
    classes: Optional[Sequence[int]] = None,
) -> PseudoLabels:
    """The confident predictions, balanced across classes: every class of `classes` (default all)
    gets the same number of pseudo-labels, the count of the class with the fewest confident ones,
    at most `per_class`, each class taking its most confident. Nothing is added when some class
    has no confident prediction (adding only the others would skew the training set).

    Classification: confident is a top probability >= threshold. Multilabel: every label's
    probability is >= threshold or <= 1 - threshold (the predicted set is sure), and an example
    counts for each label it carries.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = probabilities.shape[1]
    classes = list(range(num_classes)) if classes is None else list(classes)
    if multilabel:
        sure = np.all((probabilities >= threshold) | (probabilities <= 1.0 - threshold), axis=1)
        predicted = probabilities >= 0.5
        confidence = np.min(np.maximum(probabilities, 1.0 - probabilities), axis=1)
        members = {c: np.flatnonzero(sure & predicted[:, c]) for c in classes}
    else:
        top = probabilities.argmax(axis=1)
        confidence = probabilities.max(axis=1)
        members = {c: np.flatnonzero((top == c) & (confidence >= threshold)) for c in classes}
    take = min([len(found) for found in members.values()] + [per_class])
    if take == 0:
        empty = np.zeros((0, num_classes) if multilabel else (0,), dtype=np.float32 if multilabel else np.int64)
        return PseudoLabels(np.zeros(0, dtype=np.int64), empty, {c: 0 for c in classes})
    chosen: dict[int, None] = {}
    added = {}
    for c in classes:
        ranked = members[c][np.argsort(-confidence[members[c]], kind="stable")]
        picked = [int(i) for i in ranked if int(i) not in chosen][:take]
        chosen.update(dict.fromkeys(picked))
        added[c] = len(picked)
    indices = np.asarray(sorted(chosen), dtype=np.int64)
    if multilabel:
        labels = predicted[indices].astype(np.float32)
        added = {c: int(labels[:, c].sum()) for c in classes}
    else:
        labels = probabilities[indices].argmax(axis=1).astype(np.int64)
    return PseudoLabels(indices, labels, added)


# --------------------------------------------------------------------------------- the model


def check_few_shot_model(model) -> None:
    """SetFit's head is a linear layer on the pooled embedding the encoder was trained on: the
    model must have one (`classifier`, a Dense layer) over a pooled embedding it can expose."""
    from tfsft.modeling import tf

    head = getattr(model, "classifier", None)
    main = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pooled = _pooling(model) == "mean" or getattr(main, "pooler", None) is not None
    if not isinstance(head, tf.keras.layers.Dense) or main is None or not pooled:
        raise ConfigError(
            f"--few_shot on needs a model whose head is one dense layer over a pooled embedding (BERT-family "
            f"checkpoints, mean-pooled sentence encoders such as the embedded MiniLM); "
            f"{type(model).__name__} has none: use --few_shot off. Received: few_shot=on"
        )


def _pooling(model) -> str:
    from tfsft.modeling import POOLING_ATTRIBUTE

    return getattr(model.config, POOLING_ATTRIBUTE, "cls")


def pooled_embedding(model, features: dict[str, Any], training: bool = False):
    """The vector the model's head reads: the masked mean of the last hidden states (mean pooling)
    or the pooler's output over [CLS]."""
    from tfsft.modeling import tf

    main = getattr(model, model.base_model_prefix)
    outputs = main(**features, training=training)
    if _pooling(model) != "mean":
        return outputs.pooler_output
    hidden = outputs.last_hidden_state
    mask = tf.cast(features["attention_mask"], hidden.dtype)[:, :, None]
    return tf.reduce_sum(hidden * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1e-9)


def cosine_similarity_loss(targets, similarities):
    """SetFit's CosineSimilarityLoss: the mean squared error between the pairs' cosine similarity and
    their targets (1 same class, 0 not)."""
    from tfsft.modeling import tf

    targets = tf.cast(tf.reshape(targets, [-1]), tf.float32)
    similarities = tf.cast(tf.reshape(similarities, [-1]), tf.float32)
    return tf.reduce_mean(tf.square(similarities - targets))


def _pair_model(model):
    """A Keras model around `model` whose output is the cosine similarity of each pair of its
    input batch ([first texts; second texts]): what the contrastive stage fits."""
    from tfsft.modeling import tf

    class SentencePairModel(tf.keras.Model):
        def __init__(self, encoder):
            super().__init__(name="sentence_pairs")
            self.encoder = encoder

        def call(self, features, training=False):
            embeddings = pooled_embedding(self.encoder, features, training=training)
            first, second = tf.split(tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1), 2, axis=0)
            return tf.reduce_sum(first * second, axis=-1)

    return SentencePairModel(model)


def contrastive_fit(
    model, encoded: EncodedTexts, label_ids: np.ndarray, config: TrainConfig, *, strategy, feature_names: Sequence[str],
    pad_id: int, seed: int, verbose: int = 0,
) -> dict[str, Any]:
    """Train the encoder of `model` on sentence pairs of the labelled examples (the head is left
    alone). Returns {"pairs", "loss_first", "loss_last", "seconds"}."""
    from tfsft.training import make_optimizer

    pairs = sample_pairs(label_ids, config.few_shot_pairs, seed)
    batches = PairBatches(
        encoded, pairs, config.few_shot_batch_size * strategy.num_replicas_in_sync,
        seed=seed, pad_id=pad_id, feature_names=tuple(feature_names),
    )
    settings = dataclasses.replace(
        config, learning_rate=config.few_shot_learning_rate, gradient_accumulation_steps=1, layer_lr_decay=1.0,
        warmup_steps=None,
    )
    head = model.classifier
    head.trainable = False
    losses = _batch_losses_callback()
    start = time.perf_counter()
    try:
        with strategy.scope():
            pair_model = _pair_model(model)
            pair_model.compile(
                optimizer=make_optimizer(settings, len(batches) * config.few_shot_epochs), loss=cosine_similarity_loss,
                jit_compile=config.xla,
            )
        pair_model.fit(batches.to_tf_dataset(), epochs=config.few_shot_epochs, verbose=verbose, callbacks=[losses])
    finally:
        head.trainable = True
    first, last = losses.first_and_last()
    return {
        "pairs": len(pairs) * config.few_shot_epochs,
        "loss_first": first,
        "loss_last": last,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _batch_losses_callback():
    from tfsft.modeling import tf

    class BatchLossesCallback(tf.keras.callbacks.Callback):
        """Each batch's loss, recovered from the running epoch mean Keras reports after every batch."""

        def __init__(self):
            super().__init__()
            self.losses: list[float] = []
            self._mean = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._mean = 0.0

        def on_train_batch_end(self, batch, logs=None):
            mean = float((logs or {}).get("loss", float("nan")))
            self.losses.append((batch + 1) * mean - batch * self._mean)
            self._mean = mean

        def first_and_last(self) -> tuple[Optional[float], Optional[float]]:
            """Mean loss of the first and of the last tenth of the batches (at least one each)."""
            if not self.losses:
                return None, None
            tenth = max(len(self.losses) // 10, 1)
            return float(np.mean(self.losses[:tenth])), float(np.mean(self.losses[-tenth:]))

    return BatchLossesCallback()


def embed(model, encoded: EncodedTexts, feature_names: Sequence[str], pad_id: int) -> np.ndarray:
    """Pooled embeddings [N, hidden] (float32, inference mode), in the order of `encoded`;
    texts of similar length are batched together."""
    from tfsft.modeling import tf

    specs = {name: tf.TensorSpec([None, None], tf.int32, name=name) for name in feature_names}

    @tf.function(input_signature=[specs], reduce_retracing=True)
    def call(features):
        return tf.cast(pooled_embedding(model, features, training=False), tf.float32)

    out = np.zeros((len(encoded), int(model.config.hidden_size)), dtype=np.float32)
    for rows in plan_batches(encoded.lengths, EMBED_BATCH_SIZE, shuffle=False):
        padded = pad_batch(encoded, rows, pad_id)
        out[rows] = call({name: padded[name] for name in feature_names}).numpy()
    return out


def logistic_head(
    embeddings: np.ndarray, label_ids: np.ndarray, num_labels: int, sample_weight: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [hidden, labels], bias [labels]) of the logistic regression SetFit fits on the
    embeddings, as the weights of a dense head: softmax over labels for single labels (two
    classes give symmetric logits), one sigmoid per label for multi-hot `label_ids`. A class absent
    from the training labels gets a bias far below the others, so it is never predicted."""
    from sklearn.linear_model import LogisticRegression

    hidden = embeddings.shape[1]
    kernel = np.zeros((hidden, num_labels), dtype=np.float64)
    bias = np.zeros(num_labels, dtype=np.float64)
    if label_ids.ndim == 2:
        for c in range(num_labels):
            column = label_ids[:, c].astype(np.int64)
            positives = int(column.sum())
            if positives in (0, len(column)):
                bias[c] = math.log((positives + 0.5) / (len(column) - positives + 0.5))
                continue
            regression = LogisticRegression(max_iter=1000).fit(embeddings, column, sample_weight=sample_weight)
            kernel[:, c], bias[c] = regression.coef_[0], regression.intercept_[0]
        return kernel.astype(np.float32), bias.astype(np.float32)
    present = np.unique(label_ids)
    if len(present) < 2:
        only = int(present[0])
        raise ConfigError(f"--few_shot: the training data hold one class only ({only}); a classifier needs two")
    regression = LogisticRegression(max_iter=1000).fit(embeddings, label_ids, sample_weight=sample_weight)
    if len(regression.classes_) == 2:
        half = regression.coef_[0] / 2.0
        coef = np.stack([-half, half])
        intercept = np.array([-regression.intercept_[0] / 2.0, regression.intercept_[0] / 2.0])
    else:
        coef, intercept = regression.coef_, regression.intercept_
    bias[:] = intercept.min() - 20.0
    for row, c in enumerate(regression.classes_):
        kernel[:, int(c)] = coef[row]
        bias[int(c)] = intercept[row]
    return kernel.astype(np.float32), bias.astype(np.float32)


def head_probabilities(embeddings: np.ndarray, kernel: np.ndarray, bias: np.ndarray, multilabel: bool) -> np.ndarray:
    """What the model with that dense head predicts from the embeddings: softmax or sigmoid probabilities."""
    logits = embeddings.astype(np.float64) @ kernel.astype(np.float64) + bias
    if multilabel:
        return 1.0 / (1.0 + np.exp(-logits))
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_head(
    model, encoded: EncodedTexts, label_ids: np.ndarray, num_labels: int, *, feature_names: Sequence[str], pad_id: int,
    sample_weight: Optional[np.ndarray] = None,
) -> dict[str, Any]:
    """Fit the logistic-regression head on the encoder's embeddings and write it into the model's
    dense head. Returns {"train_accuracy", "seconds"}."""
    start = time.perf_counter()
    embeddings = embed(model, encoded, feature_names, pad_id)
    kernel, bias = logistic_head(embeddings, label_ids, num_labels, sample_weight)
    model.classifier.kernel.assign(kernel.astype(model.classifier.kernel.dtype.as_numpy_dtype))
    model.classifier.bias.assign(bias.astype(model.classifier.bias.dtype.as_numpy_dtype))
    probabilities = head_probabilities(embeddings, kernel, bias, label_ids.ndim == 2)
    predicted = (probabilities >= 0.5) if label_ids.ndim == 2 else probabilities.argmax(axis=1)
    correct = np.all(predicted == (label_ids > 0.5), axis=1) if label_ids.ndim == 2 else predicted == label_ids
    return {"train_accuracy": round(float(correct.mean()), 4), "seconds": round(time.perf_counter() - start, 3)}


def few_shot_train(
    model, encoded: EncodedTexts, label_ids: np.ndarray, label_names: Sequence[str], config: TrainConfig, *,
    strategy, feature_names: Sequence[str], pad_id: int, unlabeled: Optional[EncodedTexts] = None,
    class_weights: Optional[np.ndarray] = None, verbose: int = 0,
) -> dict[str, Any]:
    """The few-label recipe on `model` in place: contrastive stage, logistic-regression head, then
    --self_training_rounds of pseudo-labelling `unlabeled` when given. `class_weights`: the
    --class_weights of each label id (single-label runs), which weigh the head's examples.
    Returns what metrics.json records of it."""
    check_few_shot_model(model)
    num_labels = len(label_names)
    common = dict(feature_names=feature_names, pad_id=pad_id)
    start = time.perf_counter()
    contrastive = contrastive_fit(
        model, encoded, label_ids, config, strategy=strategy, seed=config.seed, verbose=verbose, **common
    )
    _log(
        f"few-shot: contrastive stage on {contrastive['pairs']} sentence pairs, loss (first -> last tenth of "
        f"batches) {contrastive['loss_first']:.4f} -> "
        f"{contrastive['loss_last']:.4f} in {contrastive['seconds']:.1f} s"
    )
    head = fit_head(model, encoded, label_ids, num_labels, sample_weight=_weights(class_weights, label_ids), **common)
    _log(f"few-shot: logistic-regression head, training accuracy {head['train_accuracy']:.4f}")
    report: dict[str, Any] = {
        "few_shot_pairs_trained": contrastive["pairs"],
        "few_shot_contrastive_loss_first": contrastive["loss_first"],
        "few_shot_contrastive_loss_last": contrastive["loss_last"],
        "few_shot_head_train_accuracy": head["train_accuracy"],
    }
    if unlabeled is not None:
        report["self_training"] = self_train(
            model, encoded, label_ids, label_names, unlabeled, config, strategy=strategy,
            class_weights=class_weights, verbose=verbose, **common,
        )
    report["few_shot_seconds"] = round(time.perf_counter() - start, 3)
    return report


def self_train(
    model, encoded: EncodedTexts, label_ids: np.ndarray, label_names: Sequence[str], unlabeled: EncodedTexts,
    config: TrainConfig, *, strategy, feature_names: Sequence[str], pad_id: int,
    class_weights: Optional[np.ndarray] = None, verbose: int = 0,
) -> list[dict[str, Any]]:
    """Rounds of: label the remaining unlabelled texts with the model, add the confident ones
    (balanced, see `select_pseudo_labels`) to the training set, continue the contrastive stage and
    refit the head on labelled plus pseudo-labelled examples. One record per round."""
    multilabel = label_ids.ndim == 2
    common = dict(feature_names=feature_names, pad_id=pad_id)
    classes = [c for c, n in enumerate(class_counts(label_ids, len(label_names))) if n > 0]
    remaining = np.arange(len(unlabeled))
    train_encoded, train_labels = encoded, label_ids
    rounds = []
    for number in range(1, config.self_training_rounds + 1):
        if len(remaining) == 0:
            break
        started = time.perf_counter()
        embeddings = embed(model, unlabeled.subset(remaining), **common)
        kernel = model.classifier.kernel.numpy().astype(np.float64)
        bias = model.classifier.bias.numpy().astype(np.float64)
        probabilities = head_probabilities(embeddings, kernel, bias, multilabel)
        chosen = select_pseudo_labels(
            probabilities, config.pseudo_label_threshold, config.pseudo_labels_per_class, multilabel, classes
        )
        record: dict[str, Any] = {
            "round": number,
            "candidates": int(len(remaining)),
            "added": {label_names[c]: int(n) for c, n in chosen.added.items()},
        }
        if len(chosen.indices) == 0:
            record["seconds"] = round(time.perf_counter() - started, 3)
            rounds.append(record)
            _log(f"self-training round {number}: some class had no prediction >= {config.pseudo_label_threshold}; stopping")
            break
        picked = remaining[chosen.indices]
        remaining = np.setdiff1d(remaining, picked)
        train_encoded = train_encoded.concat(unlabeled.subset(picked))
        train_labels = np.concatenate([train_labels, chosen.labels.astype(train_labels.dtype)])
        contrastive = contrastive_fit(
            model, train_encoded, train_labels, config, strategy=strategy, seed=config.seed + number, verbose=verbose,
            **common,
        )
        head = fit_head(
            model, train_encoded, train_labels, len(label_names), sample_weight=_weights(class_weights, train_labels),
            **common,
        )
        record.update(
            pairs_trained=contrastive["pairs"], head_train_accuracy=head["train_accuracy"],
            seconds=round(time.perf_counter() - started, 3),
        )
        rounds.append(record)
        _log(f"self-training round {number}: added pseudo-labels {record['added']}; retrained on {len(train_labels)} examples")
    return rounds


def _weights(class_weights: Optional[np.ndarray], label_ids: np.ndarray) -> Optional[np.ndarray]:
    """Each example's weight for the head: its class's --class_weights entry (None: unweighted)."""
    return None if class_weights is None else class_weights[label_ids]
