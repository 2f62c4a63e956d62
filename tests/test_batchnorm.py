"""FusedBatchNormalization: Keras' BatchNorm arithmetic in one fused kernel (NumPy as truth)."""
import numpy as np
import pytest

import keras
import tensorflow as tf

from psla_tf.models.batchnorm import MIN_FUSED_EPSILON, FusedBatchNormalization, fuse_batchnorm

RNG = np.random.default_rng(0)
X = (RNG.standard_normal((4, 5, 6, 3)) * [1.0, 3.0, 0.5] + [0.0, 2.0, -1.0]).astype("float32")
W = RNG.standard_normal(X.shape).astype("float32")     # a fixed cotangent for the gradients


def _pair(momentum=0.9, epsilon=1e-3):
    """A Keras BatchNormalization and a FusedBatchNormalization with the same weights."""
    keras_bn = keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon)
    fused_bn = FusedBatchNormalization(momentum=momentum, epsilon=epsilon)
    for layer in (keras_bn, fused_bn):
        layer.build(X.shape)
    keras_bn.set_weights([np.array([1.0, 2.0, 0.5], "float32"),     # gamma
                          np.array([0.0, 1.0, -1.0], "float32"),    # beta
                          np.array([0.1, 0.2, 0.3], "float32"),     # moving mean
                          np.array([1.5, 0.5, 2.0], "float32")])    # moving variance
    fused_bn.set_weights(keras_bn.get_weights())
    return keras_bn, fused_bn


def _step(layer):
    """Training-mode output, gradients of Σ W·y w.r.t. (x, γ, β), and the moving statistics."""
    x = tf.constant(X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * W)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return (y.numpy(), [g.numpy() for g in grads],
            layer.moving_mean.numpy(), layer.moving_variance.numpy())


def test_training_step_is_keras_batchnorm_arithmetic():
    keras_bn, fused_bn = _pair()
    assert fused_bn._fusable(tf.constant(X), True, None)
    y, grads, mean, var = _step(fused_bn)
    y_ref, grads_ref, mean_ref, var_ref = _step(keras_bn)
    # NumPy truth: batch mean and biased variance normalise and feed the moving averages
    x = X.astype(np.float64)
    mu, sigma2 = x.mean((0, 1, 2)), x.var((0, 1, 2))
    expected = (x - mu) / np.sqrt(sigma2 + 1e-3) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    np.testing.assert_allclose(y, expected, atol=2e-5)
    np.testing.assert_allclose(mean, 0.9 * np.array([0.1, 0.2, 0.3]) + 0.1 * mu, atol=1e-6)
    np.testing.assert_allclose(var, 0.9 * np.array([1.5, 0.5, 2.0]) + 0.1 * sigma2, atol=1e-6)
    # the same as Keras' own separate ops, forward and backward
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(mean, mean_ref, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=5e-5, rtol=1e-5)


def test_inference_and_fused_off_take_keras_computation():
    keras_bn, fused_bn = _pair()
    np.testing.assert_array_equal(fused_bn(X, training=False), keras_bn(X, training=False))
    off = FusedBatchNormalization(fused=False, momentum=0.9)
    off.build(X.shape)
    off.set_weights(keras_bn.get_weights())
    assert not off._fusable(tf.constant(X), True, None)
    np.testing.assert_array_equal(_step(off)[0], _step(keras_bn)[0])


@pytest.mark.parametrize("case", ["frozen", "mask", "2d", "epsilon", "renorm", "synchronized"])
def test_falls_back_where_the_kernel_does_not_apply(case):
    layer = FusedBatchNormalization(epsilon=1e-5 if case == "epsilon" else 1e-3,
                                    renorm=case == "renorm", synchronized=case == "synchronized")
    x = tf.constant(X[:, 0, 0] if case == "2d" else X)
    layer.build(x.shape)
    layer.trainable = case != "frozen"
    mask = tf.ones(x.shape[:-1], bool) if case == "mask" else None
    assert not layer._fusable(x, True, mask)
    assert 1e-5 < MIN_FUSED_EPSILON


def test_single_value_per_channel_gives_zero_biased_variance():
    layer = FusedBatchNormalization(momentum=0.0)
    x = np.full((1, 1, 1, 2), 3.0, "float32")
    layer.build(x.shape)
    layer(x, training=True)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [3.0, 3.0])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), [0.0, 0.0])


def test_mixed_precision_computes_in_float32():
    layer = FusedBatchNormalization(dtype="mixed_float16")
    layer.build(X.shape)
    y = layer(tf.constant(X, "float16"), training=True)
    assert y.dtype == tf.float16 and layer.moving_mean.dtype == "float32"
    x = X.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(y.numpy(), (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2))
                                                                           + 1e-3), atol=5e-3)


def test_fuse_batchnorm_keeps_weights_names_and_outputs(tmp_path):
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn")(h)
    model = keras.Model(inputs, keras.layers.ReLU(name="relu")(h), name="net")
    model.get_layer("bn").set_weights([np.full(4, 2.0, "float32"), np.ones(4, "float32"),
                                       np.full(4, 0.5, "float32"), np.full(4, 3.0, "float32")])
    fused = fuse_batchnorm(model)
    assert fused.name == "net"
    assert [w.path for w in fused.weights] == [w.path for w in model.weights]
    assert fused.get_layer("conv") is model.get_layer("conv")        # shared, not copied
    bn = fused.get_layer("bn")
    assert type(bn) is FusedBatchNormalization and bn.fused and bn.momentum == 0.9
    x = RNG.standard_normal((2, 8, 8, 1)).astype("float32")
    np.testing.assert_array_equal(fused(x), model(x))
    assert fuse_batchnorm(fused) is fused                             # nothing left to swap
    fused.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.get_layer("bn")) is FusedBatchNormalization
    np.testing.assert_array_equal(loaded(x), model(x))


def test_tagger_backbone_fuses_by_default_and_on_request():
    from psla_tf.models.tagger import build_tagger
    kwargs = dict(model="mobilenet_v2", att_head=1, target_length=32, num_mel_bins=32,
                  freqm=0, timem=0, seed=0, pretrained="none")

    def fused_layers(model):
        backbone = model.get_layer("classifier").get_layer("backbone")
        return [layer.fused for layer in backbone.layers
                if isinstance(layer, keras.layers.BatchNormalization)]

    on, off = fused_layers(build_tagger(3, **kwargs)), fused_layers(
        build_tagger(3, fused_batchnorm=False, **kwargs))
    assert on and all(on) and len(off) == len(on) and not any(off)
