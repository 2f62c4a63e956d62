"""PointwiseConv2D: Conv2D's arithmetic, 1×1 convolutions trained as one matrix product."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers_models import assert_training_twins_step_alike
from psla_tf.models.pointwise import PointwiseConv2D, matmul_twin


def _pair(**config):
    """A Keras Conv2D and its PointwiseConv2D twin, built on [*, 5, 7, 6], same weights."""
    conv = keras.layers.Conv2D(**config)
    conv.build((None, 5, 7, 6))
    rng = np.random.default_rng(0)
    conv.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32)
                      for w in conv.get_weights()])
    return conv, matmul_twin(conv)


def _ops(fn, x) -> set[str]:
    return {op.type for op in tf.function(fn).get_concrete_function(x).graph.get_operations()}


@pytest.mark.parametrize("bias,activation", [(True, "swish"), (False, None)])
def test_training_output_and_gradients_equal_conv2d(bias, activation):
    conv, twin = _pair(filters=4, kernel_size=1, use_bias=bias, activation=activation)
    assert type(twin) is PointwiseConv2D and twin.name == conv.name
    x = tf.constant(np.random.default_rng(1).normal(0, 1, (3, 5, 7, 6)).astype(np.float32))
    results = []
    for layer in (conv, twin):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.sin(y))
        results.append((y, *tape.gradient(loss, [x, *layer.trainable_weights])))
    for a, b in zip(*results):      # output, d/dx, d/dkernel (, d/dbias)
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5)
    # training: one MatMul and no convolution; inference (exports): the parent's Conv2D
    assert "MatMul" in _ops(lambda t: twin(t, training=True), x)
    assert "Conv2D" not in _ops(lambda t: twin(t, training=True), x)
    assert "Conv2D" in _ops(lambda t: twin(t, training=False), x)
    np.testing.assert_allclose(twin(x).numpy(), conv(x).numpy(), rtol=0, atol=0)


def test_other_convolutions_and_matmul_off_take_conv2d():
    x = tf.constant(np.random.default_rng(2).normal(0, 1, (2, 5, 7, 6)).astype(np.float32))
    for config in (dict(filters=4, kernel_size=3, padding="same"),
                   dict(filters=4, kernel_size=1, strides=2),
                   dict(filters=6, kernel_size=1, groups=2)):
        conv, twin = _pair(**config)
        assert "MatMul" not in _ops(lambda t: twin(t, training=True), x), config
        np.testing.assert_allclose(twin(x, training=True).numpy(),
                                   conv(x, training=True).numpy(), rtol=1e-6, atol=1e-6)
    conv = keras.layers.Conv2D(4, 1)
    conv.build((None, 5, 7, 6))
    off = matmul_twin(conv, matmul=False)
    assert "Conv2D" in _ops(lambda t: off(t, training=True), x)
    assert matmul_twin(keras.layers.Dense(3)).__class__ is keras.layers.Dense


def test_config_saving_and_mixed_precision(tmp_path):
    _, twin = _pair(filters=4, kernel_size=1, activation="relu")
    again = PointwiseConv2D.from_config(twin.get_config())
    assert again.matmul and again.get_config() == twin.get_config()
    inp = keras.Input((5, 7, 6))
    model = keras.Model(inp, twin(inp))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.layers[-1]) is PointwiseConv2D
    x = np.random.default_rng(3).normal(0, 1, (2, 5, 7, 6)).astype(np.float32)
    np.testing.assert_allclose(loaded(x, training=True), model(x, training=True), atol=1e-6)
    half = PointwiseConv2D.from_config({**twin.get_config(), "dtype": "mixed_float16"})
    half.build((None, 5, 7, 6))
    half.set_weights(twin.get_weights())
    y = half(tf.constant(x), training=True)
    assert y.dtype == tf.float16
    np.testing.assert_allclose(y.numpy().astype(np.float32), twin(x, training=True).numpy(),
                               rtol=2e-2, atol=2e-2)


def test_tagger_trains_the_same_with_and_without_the_products():
    """EfficientNet-B0's every convolution is a PointwiseConv2D (the 1x1 ones train as
    products); one training step from the same weights moves every weight as the Conv2D
    model does (float rounding)."""
    models = assert_training_twins_step_alike("pointwise_matmul")
    backbone = models[1].get_layer("classifier").get_layer("backbone")
    convs = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)
             and not isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert all(type(layer) is PointwiseConv2D and layer.matmul for layer in convs)
    assert sum(tuple(layer.kernel_size) == (1, 1) for layer in convs) > 40
