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
