import numpy as np
import pytest

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


def test_fused_adamw_matches_keras_adamw_on_dense_and_sparse_gradients():
    """Same trajectory as Keras' own AdamW (decay, clipping, schedule), for an embedding-style
    sparse gradient as well as dense ones; only float rounding may differ."""
    from tfsft.modeling import tf
    from tfsft.training import NO_DECAY, FusedAdamW

    config = TrainConfig(weight_decay=0.1, learning_rate=1e-2, warmup_ratio=0.2)
    rng = np.random.default_rng(0)
    start = {name: rng.normal(size=shape).astype(np.float32)
             for name, shape in (("embeddings/word", (50, 4)), ("dense/kernel", (4, 3)), ("dense/bias", (3,)))}

    def trajectory(optimizer) -> dict[str, np.ndarray]:
        variables = {name: tf.Variable(value, name=name) for name, value in start.items()}
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
        for step in range(6):
            ids = tf.constant([step, 7, 7, 30 + step])
            with tf.GradientTape() as tape:
                hidden = tf.gather(variables["embeddings/word"], ids)
                loss = tf.reduce_sum(tf.tanh(hidden @ variables["dense/kernel"] + variables["dense/bias"]) ** 2)
            grads = tape.gradient(loss, list(variables.values()))
            assert isinstance(grads[0], tf.IndexedSlices)
            optimizer.apply_gradients(zip(grads, variables.values()))
        return {name: v.numpy() for name, v in variables.items()}

    fused = make_optimizer(config, total_steps=6)
    assert isinstance(fused, FusedAdamW)
    keras = tf.keras.optimizers.AdamW(
        learning_rate=WarmupLinearDecay(1e-2, 1, 6), weight_decay=0.1, epsilon=1e-6, global_clipnorm=1.0)
    got, expected = trajectory(fused), trajectory(keras)
    for name in start:
        assert not np.allclose(got[name], start[name])
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
