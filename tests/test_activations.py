"""SwishActivation: swish whose gradient reuses the forward sigmoid, against tf.nn.silu."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from helpers_models import assert_training_twins_step_alike
from psla_tf.models.activations import SwishActivation, swish, swish_twin


def _ops(fn, x) -> list[str]:
    return [op.type for op in tf.function(fn).get_concrete_function(x).graph.get_operations()]


def test_swish_value_and_gradient_equal_silu():
    """Value and derivative equal tf.nn.silu's (and the closed form σ(x)(1 + x(1 − σ(x)))
    in float64) over the range BatchNorm outputs reach, saturated tails included."""
    x = tf.constant(np.concatenate([np.linspace(-30, 30, 601),
                                    np.random.default_rng(0).normal(0, 3, 400)]), tf.float32)
    dy = tf.constant(np.random.default_rng(1).normal(0, 1, x.shape), tf.float32)
    grads = []
    for fn in (tf.nn.silu, swish):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        grads.append((y, tape.gradient(y, x, output_gradients=dy)))
    (y_ref, g_ref), (y, g) = grads
    np.testing.assert_array_equal(y.numpy(), y_ref.numpy())
    np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-6, atol=1e-7)
    x64 = x.numpy().astype(np.float64)
    s = 1.0 / (1.0 + np.exp(-x64))
    np.testing.assert_allclose(g.numpy(), dy.numpy() * s * (1 + x64 * (1 - s)),
                               rtol=1e-5, atol=1e-6)


def test_training_reuses_the_sigmoid_inference_is_silu():
    layer = swish_twin(keras.layers.Activation("swish", name="act"))
    assert type(layer) is SwishActivation and layer.name == "act" and layer.saved_sigmoid
    x = tf.constant(np.random.default_rng(2).normal(0, 2, (2, 3, 4, 5)), tf.float32)

    def grad_ops(act, training):
        def fn(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = act(t, training=training)
            return tape.gradient(y, t)
        return _ops(fn, x)
    assert grad_ops(layer, True).count("Sigmoid") == 1      # forward only
    assert grad_ops(layer, False).count("Sigmoid") == 2     # silu recomputes it
    np.testing.assert_array_equal(layer(x, training=True).numpy(), tf.nn.silu(x).numpy())
    off = swish_twin(keras.layers.Activation("swish"), saved_sigmoid=False)
    assert type(off) is SwishActivation and grad_ops(off, True).count("Sigmoid") == 2
    # only plain swish Activation layers get a twin
    relu = keras.layers.Activation("relu")
    assert swish_twin(relu) is relu
    dense = keras.layers.Dense(2, activation="swish")
    assert swish_twin(dense) is dense


def test_config_and_saving(tmp_path):
    layer = swish_twin(keras.layers.Activation("swish", name="act"), saved_sigmoid=False)
    again = SwishActivation.from_config(layer.get_config())
    assert not again.saved_sigmoid and again.get_config() == layer.get_config()
    inp = keras.Input((4,))
    model = keras.Model(inp, swish_twin(keras.layers.Activation("swish"))(inp))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.layers[-1]) is SwishActivation and loaded.layers[-1].saved_sigmoid
    x = np.random.default_rng(3).normal(0, 2, (3, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x, training=True), model(x, training=True))


def test_tagger_trains_the_same_with_and_without_the_saved_sigmoid():
    """EfficientNet-B0's 33 swish Activation layers are twins; one training step from the same
    weights moves every weight as tf.nn.silu's model does (float rounding)."""
    models = assert_training_twins_step_alike("swish_saved_sigmoid")
    for m, on in zip(models, (False, True)):
        backbone = m.get_layer("classifier").get_layer("backbone")
        acts = [layer for layer in backbone.layers if isinstance(layer, SwishActivation)]
        assert len(acts) == 33 and all(a.saved_sigmoid is on for a in acts)
