import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT
from tfsft.config import TrainConfig
from tfsft.training import WarmupLinearDecay, make_optimizer


def test_schedule_warms_up_then_decays_linearly_to_zero():
    schedule = WarmupLinearDecay(1e-3, warmup_steps=10, total_steps=110)
    values = [float(schedule(step)) for step in (0, 5, 10, 60, 110, 200)]
    np.testing.assert_allclose(values, [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0], atol=1e-9)


def test_schedule_without_warmup_starts_at_peak():
    schedule = WarmupLinearDecay(2e-5, warmup_steps=0, total_steps=100)
    assert float(schedule(0)) == pytest.approx(2e-5)
    assert float(schedule(50)) == pytest.approx(1e-5)


def test_adamw_skips_decay_on_layernorm_and_bias():
    from tfsft.modeling import tf

    optimizer = make_optimizer(TrainConfig(weight_decay=0.1), total_steps=10)
    kernel = tf.Variable(tf.ones([2, 2]), name="encoder/dense/kernel")
    bias = tf.Variable(tf.ones([2]), name="encoder/dense/bias")
    gamma = tf.Variable(tf.ones([2]), name="encoder/LayerNorm/gamma")
    optimizer.build([kernel, bias, gamma])
    assert optimizer._use_weight_decay(kernel)
    assert not optimizer._use_weight_decay(bias)
    assert not optimizer._use_weight_decay(gamma)
    assert optimizer.global_clipnorm == 1.0


@pytest.mark.parametrize("xla", [False, True])
def test_fused_adamw_matches_keras_adamw_on_dense_and_sparse_gradients(xla):
    """Same trajectory as Keras' own AdamW (decay, clipping, schedule), for an embedding-style
    sparse gradient as well as dense ones, also inside an XLA-compiled step (as under --xla,
    where the whole train step is compiled); only float rounding may differ."""
    from tfsft.modeling import tf
    from tfsft.training import NO_DECAY, FusedAdamW

    config = TrainConfig(weight_decay=0.1, learning_rate=1e-2, warmup_ratio=0.2)
    rng = np.random.default_rng(0)
    start = {name: rng.normal(size=shape).astype(np.float32)
             for name, shape in (("embeddings/word", (50, 4)), ("dense/kernel", (4, 3)), ("dense/bias", (3,)))}

    def trajectory(optimizer, jit_compile: bool) -> dict[str, np.ndarray]:
        variables = {name: tf.Variable(value, name=name) for name, value in start.items()}
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
        optimizer.build(list(variables.values()))

        def train_step(ids):
            with tf.GradientTape() as tape:
                hidden = tf.gather(variables["embeddings/word"], ids)
                loss = tf.reduce_sum(tf.tanh(hidden @ variables["dense/kernel"] + variables["dense/bias"]) ** 2)
            grads = tape.gradient(loss, list(variables.values()))
            assert isinstance(grads[0], tf.IndexedSlices)
            optimizer.apply_gradients(zip(grads, variables.values()))

        step_fn = tf.function(train_step, jit_compile=True) if jit_compile else train_step
        for step in range(6):
            step_fn(tf.constant([step, 7, 7, 30 + step]))
        return {name: v.numpy() for name, v in variables.items()}

    fused = make_optimizer(config, total_steps=6)
    assert isinstance(fused, FusedAdamW)
    keras = tf.keras.optimizers.AdamW(
        learning_rate=WarmupLinearDecay(1e-2, 1, 6), weight_decay=0.1, epsilon=1e-6, global_clipnorm=1.0)
    got, expected = trajectory(fused, jit_compile=xla), trajectory(keras, jit_compile=False)
    for name in start:
        assert not np.allclose(got[name], start[name])
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_xla_train_step_with_fused_adamw_matches_keras_adamw(tiny_checkpoint):
    """Under --xla the whole train step, the fused update included, is compiled: its weights
    match Keras' AdamW in the same compiled step. (XLA against the plain graph differs by up to
    a few 1e-3 after 3 steps with either optimizer: Adam divides by the gradient's running RMS,
    which amplifies rounding in near-zero embedding gradients.)"""
    from tfsft.data import LabelMap
    from tfsft.modeling import build_classifier, tf
    from tfsft.training import NO_DECAY, make_optimizer, set_seed

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 5000, size=(8, 16)).astype(np.int32)
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    labels = rng.integers(0, 2, size=8)
    config = TrainConfig(xla=True, learning_rate=1e-3, warmup_ratio=0.0)

    def trained(fused: bool) -> list[np.ndarray]:
        set_seed(0, deterministic=True)
        model, _ = build_classifier(tiny_checkpoint, LabelMap.from_labels(["0", "1"]))
        optimizer = make_optimizer(config, total_steps=3)
        if not fused:
            optimizer = tf.keras.optimizers.AdamW(
                learning_rate=WarmupLinearDecay(1e-3, 0, 3), weight_decay=config.weight_decay, epsilon=1e-6,
                global_clipnorm=config.max_grad_norm)
            optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
        model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=True)
        losses = [float(model.train_on_batch(features, labels)) for _ in range(3)]
        assert losses[-1] < losses[0]
        return [w.numpy() for w in model.trainable_weights]

    fused, keras = trained(True), trained(False)
    tf.keras.backend.clear_session()
    for a, b in zip(fused, keras):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layer_lr_scale_decays_from_the_head_down_to_the_embeddings(tiny_checkpoint):
    from tfsft.data import LabelMap
    from tfsft.modeling import build_classifier
    from tfsft.training import compile_model, encoder_layer_count, layer_lr_scale

    model, _ = build_classifier(tiny_checkpoint, LabelMap.from_labels(["0", "1"]))
    names = [variable.name for variable in model.trainable_variables]
    assert encoder_layer_count(names) == 2
    scales = {name: layer_lr_scale(name, 2, 0.5) for name in names}
    by_part = {}
    for name, scale in scales.items():
        part = ("embeddings" if "/embeddings/" in name else "layer 0" if "layer_._0/" in name
                else "layer 1" if "layer_._1/" in name else "head")
        by_part.setdefault(part, set()).add(scale)
    assert by_part == {"embeddings": {0.125}, "layer 0": {0.25}, "layer 1": {0.5}, "head": {1.0}}
    assert any("classifier" in name for name in names if scales[name] == 1.0)
    assert all(layer_lr_scale(name, 2, 1.0) == 1.0 for name in names)
    assert encoder_layer_count(["dense/kernel:0", "embeddings/word:0"]) == 0
    compile_model(model, TrainConfig(layer_lr_decay=0.5), total_steps=10, task="classification")
    assert (model.optimizer.num_layers, model.optimizer.layer_lr_decay) == (2, 0.5)


@pytest.mark.parametrize("family", ["bert", "distilbert", "albert", "electra", "roberta", "mpnet"])
def test_layer_decay_leaves_no_encoder_weight_at_the_heads_rate(family):
    """Every family's embeddings (with their projection to the hidden size) and encoder decay; only
    the pooler and classifier train at the full rate. ALBERT's shared layer group is one layer;
    MPNet's relative attention bias, shared by all layers, moves as the lowest one."""
    import transformers

    from tfsft.modeling import tf
    from tfsft.training import encoder_layer_count, layer_lr_scale

    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    configs = {
        "bert": transformers.BertConfig(**sizes),
        "distilbert": transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=37),
        "albert": transformers.AlbertConfig(embedding_size=16, **sizes),
        "electra": transformers.ElectraConfig(embedding_size=16, **sizes),
        "roberta": transformers.RobertaConfig(max_position_embeddings=40, **sizes),
        "mpnet": transformers.MPNetConfig(**sizes),
    }
    model = transformers.TFAutoModelForSequenceClassification.from_config(configs[family])
    model(model.dummy_inputs)
    names = [variable.name.split("/", 1)[1] for variable in model.trainable_variables]
    layers = encoder_layer_count(names)
    assert layers == (1 if family == "albert" else 2)
    full_rate = [name for name in names if layer_lr_scale(name, layers, 0.5) == 1.0]
    assert full_rate and all(
        name.split("/")[0] in ("classifier", "pre_classifier") or "/pooler" in name for name in full_rate
    ), full_rate
    embedding_parts = ("/embeddings/", "/embeddings_project/", "/embedding_hidden_mapping_in/")
    embeddings = [name for name in names if any(part in name for part in embedding_parts)]
    assert embeddings and all(layer_lr_scale(name, layers, 0.5) == 0.5 ** (layers + 1) for name in embeddings)
    if family == "mpnet":
        assert layer_lr_scale("mpnet/encoder/relative_attention_bias/embeddings:0", 2, 0.5) == 0.25
    tf.keras.backend.clear_session()


def test_fused_adamw_with_layer_decay_moves_each_layer_at_its_own_rate():
    """Each variable follows Keras' AdamW run at its scaled peak rate, weight decay included
    (clipping is off so that the variables' trajectories are independent)."""
    from tfsft.modeling import tf
    from tfsft.training import NO_DECAY

    config = TrainConfig(weight_decay=0.1, learning_rate=1e-2, warmup_ratio=0.2, layer_lr_decay=0.5,
                         max_grad_norm=1e9)
    rng = np.random.default_rng(0)
    scales = {"m/embeddings/word": 0.125, "m/encoder/layer_._0/kernel": 0.25, "m/encoder/layer_._1/kernel": 0.5,
              "m/classifier/kernel": 1.0}
    start = {name: rng.normal(size=(4, 3)).astype(np.float32) for name in scales}

    def trajectory(name, optimizer) -> np.ndarray:
        variable = tf.Variable(start[name], name=name)
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
        optimizer.build([variable])
        for step in range(6):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.tanh(variable * (step + 1.0)) ** 2)
            optimizer.apply_gradients([(tape.gradient(loss, variable), variable)])
        return variable.numpy()

    for name, scale in scales.items():
        got = trajectory(name, make_optimizer(config, total_steps=6, num_layers=2))
        expected = trajectory(name, tf.keras.optimizers.AdamW(
            learning_rate=WarmupLinearDecay(1e-2 * scale, 1, 6), weight_decay=0.1, epsilon=1e-6, global_clipnorm=1e9))
        assert not np.allclose(got, start[name])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_layer_decay_needs_a_layered_encoder_and_a_factor_in_range():
    from tfsft.errors import ConfigError

    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="layer_lr_decay"):
            TrainConfig(layer_lr_decay=bad)
    with pytest.raises(ConfigError, match="layer_lr_decay 0.8: the model has no encoder layers"):
        make_optimizer(TrainConfig(layer_lr_decay=0.8), total_steps=10, num_layers=0)
    assert make_optimizer(TrainConfig(), total_steps=10, num_layers=0).layer_lr_decay == 1.0


def test_warmup_steps_overrides_warmup_ratio():
    optimizer = make_optimizer(TrainConfig(warmup_ratio=0.5, warmup_steps=3), total_steps=100)
    schedule = optimizer._learning_rate
    assert (schedule.warmup_steps, schedule.total_steps) == (3, 100)
    assert make_optimizer(TrainConfig(warmup_ratio=0.5, warmup_steps=0), total_steps=100)._learning_rate.warmup_steps == 0
    assert make_optimizer(TrainConfig(warmup_ratio=0.5), total_steps=100)._learning_rate.warmup_steps == 50


def test_schedule_counts_optimizer_steps_under_gradient_accumulation():
    """3 epochs of 10 batches, 4 batches a step: 3 steps per epoch (the last one of 2 batches)."""
    config = TrainConfig(gradient_accumulation_steps=4, warmup_ratio=0.2)
    schedule = make_optimizer(config, total_steps=30, steps_per_epoch=10)._learning_rate
    assert (schedule.warmup_steps, schedule.total_steps) == (2, 9)
    config = TrainConfig(gradient_accumulation_steps=4, warmup_steps=5)
    assert make_optimizer(config, total_steps=30, steps_per_epoch=10)._learning_rate.warmup_steps == 5


def tiny_classifier(seed: int = 0):
    """A 1-layer BERT classifier without dropout, so that batches split differently compute the same."""
    from transformers import BertConfig, TFBertForSequenceClassification

    from tfsft.modeling import tf

    tf.keras.utils.set_random_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=2)
    model = TFBertForSequenceClassification(config)
    model(model.dummy_inputs)
    return model


def accumulation_data(examples: int = 10, length: int = 6):
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 40, size=(examples, length)).astype(np.int32)
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return features, rng.integers(0, 2, size=examples).astype(np.int32)


@pytest.mark.parametrize("xla", [False, True])
def test_gradient_accumulation_of_two_batches_equals_one_batch_twice_as_large(xla):
    """10 examples, 2 epochs: batches of 4 one step each (4, 4, 2 per epoch) against batches of 2
    accumulated two at a time (an epoch's 5th batch makes a step alone): the same 6 updates, with
    weight decay and the schedule in play, give the same weights. Clipping is off here: Keras
    takes the norm of an embedding's sparse gradient before summing its repeated rows, the
    accumulated gradient is summed (see the next test for clipping)."""
    from tfsft.modeling import tf
    from tfsft.training import compile_model

    features, labels = accumulation_data()
    start = tiny_classifier().get_weights()

    def train(batch_size: int, accumulate: int):
        model = tiny_classifier()
        model.set_weights(start)
        dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch_size)
        steps = len(dataset)
        config = TrainConfig(learning_rate=1e-2, warmup_ratio=0.2, weight_decay=0.1, max_grad_norm=1e9, xla=xla,
                             gradient_accumulation_steps=accumulate, num_train_epochs=2)
        compile_model(model, config, 2 * steps, "classification", steps_per_epoch=steps)
        model.fit(dataset, epochs=2, verbose=0, shuffle=False)
        return model, steps

    whole, whole_steps = train(4, 1)
    accumulated, micro_steps = train(2, 2)
    assert (whole_steps, micro_steps) == (3, 5)
    assert int(whole.optimizer.iterations) == 6
    assert int(accumulated.optimizer.iterations) == 2 * math.ceil(micro_steps / 2) == 6
    for a, b, before in zip(accumulated.get_weights(), whole.get_weights(), start):
        if not np.array_equal(b, before):
            assert not np.array_equal(a, before)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    tf.keras.backend.clear_session()


def test_gradient_accumulation_clips_and_decays_the_mean_gradient_once_per_step():
    """Dense and sparse (embedding) gradients, clipping active: 2 epochs of batches of 2
    accumulated in pairs against batches of 4, called eagerly, step by step."""
    from tfsft.modeling import tf

    rng = np.random.default_rng(0)
    ids = rng.permutation(50)[:8].reshape(8, 1).astype(np.int32)
    targets = rng.normal(size=(8, 3)).astype(np.float32)
    start = {"embeddings/word": rng.normal(size=(50, 4)), "dense/kernel": rng.normal(size=(4, 3)), "dense/bias": np.zeros(3)}

    def train(batch_size: int, accumulate: int):
        variables = {name: tf.Variable(value.astype(np.float32), name=name) for name, value in start.items()}
        steps = 8 // batch_size
        config = TrainConfig(learning_rate=1e-2, warmup_ratio=0.25, weight_decay=0.1, max_grad_norm=0.1,
                             gradient_accumulation_steps=accumulate)
        optimizer = make_optimizer(config, total_steps=2 * steps, steps_per_epoch=steps)
        for _ in range(2):
            for batch in range(steps):
                rows = slice(batch * batch_size, (batch + 1) * batch_size)
                with tf.GradientTape() as tape:
                    hidden = tf.gather(variables["embeddings/word"], ids[rows, 0])
                    output = tf.tanh(hidden @ variables["dense/kernel"] + variables["dense/bias"])
                    loss = tf.reduce_mean(tf.reduce_sum((output - targets[rows]) ** 2, axis=-1))
                grads = tape.gradient(loss, list(variables.values()))
                assert isinstance(grads[0], tf.IndexedSlices)
                optimizer.apply_gradients(zip(grads, variables.values()))
        return {name: v.numpy() for name, v in variables.items()}, int(optimizer.iterations)

    (whole, whole_steps), (accumulated, accumulated_steps) = train(4, 1), train(2, 2)
    assert whole_steps == accumulated_steps == 4
    for name in start:
        assert not np.allclose(accumulated[name], start[name]), name
        np.testing.assert_allclose(accumulated[name], whole[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_gradient_accumulation_under_mirrored_strategy_equals_one_larger_batch():
    """Two replicas, 2 examples each, 2 global batches a step, against one batch of 8 unreplicated."""
    code = textwrap.dedent("""
        import json, os, sys
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        sys.path.insert(0, "tests")
        from tfsft.modeling import tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import numpy as np
        from test_training import accumulation_data, tiny_classifier
        from tfsft.config import TrainConfig
        from tfsft.training import compile_model, make_strategy

        features, labels = accumulation_data(examples=16)
        start = tiny_classifier().get_weights()
        weights = []
        for strategy, batch, accumulate in ((make_strategy("mirrored"), 4, 2), (make_strategy("default"), 8, 1)):
            with strategy.scope():
                model = tiny_classifier()
                model.set_weights(start)
                steps = 16 // batch
                config = TrainConfig(learning_rate=1e-2, warmup_ratio=0.0, gradient_accumulation_steps=accumulate)
                compile_model(model, config, steps, "classification", steps_per_epoch=steps)
            data = tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch)
            model.fit(data, epochs=1, verbose=0, shuffle=False)
            weights.append(model.get_weights())
            print(strategy.num_replicas_in_sync, int(model.optimizer.iterations.numpy()))
        print(json.dumps(max(float(np.max(np.abs(a - b))) for a, b in zip(*weights))))
        print(json.dumps(max(float(np.max(np.abs(a - b))) for a, b in zip(weights[0], start))))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-4:-2] == ["2 2", "1 2"]
    difference, moved = json.loads(lines[-2]), json.loads(lines[-1])
    assert moved > 1e-3 and difference < 1e-5


def test_step_logger_writes_each_optimizer_step_once(tmp_path):
    """Under accumulation several batches end on the same optimizer step: only the batch that
    made the step logs it (not step 0 before any, nor a resumed run's restored step again)."""
    from tfsft.modeling import tf
    from tfsft.training import StepLogger

    class Optimizer:
        iterations = None
        learning_rate = 0.5

    class Model:
        optimizer = Optimizer()

    logger = StepLogger(tmp_path, every=2)
    logger.set_model(Model())
    # Steps before and after each batch: accumulating from step 0, and from a resumed step 4.
    for before, after in ((0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (4, 4), (4, 5), (5, 5), (5, 6)):
        Optimizer.iterations = tf.Variable(before, dtype=tf.int64)
        logger.on_train_batch_begin(0)
        Optimizer.iterations = tf.Variable(after, dtype=tf.int64)
        logger.on_train_batch_end(0, {"loss": 1.0})
    assert [step for step, _ in logger.pending] == [2, 6]
