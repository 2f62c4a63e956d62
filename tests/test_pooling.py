"""Pooling heads (Fig. 2): NumPy parity of the maths, initialisation, serialisation, float32."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from psla_tf.models.pooling import (AttentionPooling, MeanPooling, MultiHeadAttentionPooling,
                                    init_class_prior, make_pooling)

B, T, D, C = 3, 7, 16, 5


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_heads(x, att_k, att_b, cla_k, cla_b):
    """Reference maths in float64, head by head with explicit loops over heads."""
    outs, atts = [], []
    for h in range(att_k.shape[0]):
        att = _sigmoid(x @ att_k[h] + att_b[h])                  # [B, T, C]
        att = np.clip(att, 1e-7, 1 - 1e-7)
        norm = att / att.sum(axis=1, keepdims=True)
        cla = _sigmoid(x @ cla_k[h] + cla_b[h])
        outs.append((norm * cla).sum(axis=1))
        atts.append(norm)
    return np.stack(outs, 1), np.stack(atts, 1)                  # [B, H, C], [B, H, T, C]


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=(B, T, D)).astype(np.float32)


def _randomise(layer, seed=1):
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        w.assign(rng.normal(size=w.shape).astype(np.float32))


def test_mean_pooling_matches_numpy():
    layer = MeanPooling(C)
    x = _x()
    layer(x)
    _randomise(layer)
    k, b = layer.cla_kernel.numpy()[0], layer.cla_bias.numpy()[0]
    expected = _sigmoid(x.astype(np.float64) @ k + b).mean(axis=1)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_single_head_matches_numpy():
    layer = AttentionPooling(C)
    x = _x()
    layer(x)
    _randomise(layer)
    out, att = layer(x, return_attention=True)
    heads, atts = _np_heads(x.astype(np.float64), layer.att_kernel.numpy(),
                            layer.att_bias.numpy(), layer.cla_kernel.numpy(),
                            layer.cla_bias.numpy())
    np.testing.assert_allclose(out.numpy(), heads[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att.numpy(), atts, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(att.numpy().sum(axis=2), 1.0, atol=1e-5)


def test_multi_head_matches_numpy_and_clamp():
    layer = MultiHeadAttentionPooling(C, num_heads=3)
    x = _x() * 30.0                                              # saturate: clamp matters
    layer(x)
    _randomise(layer)
    out = layer(x).numpy()
    heads, atts = _np_heads(x.astype(np.float64), layer.att_kernel.numpy(),
                            layer.att_bias.numpy(), layer.cla_kernel.numpy(),
                            layer.cla_bias.numpy())
    expected = (heads * layer.head_weight.numpy()[None, :, None]).sum(axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(layer.attention_maps(x).numpy(), atts, rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(out))


def test_initialisation():
    keras.utils.set_random_seed(0)
    dim, classes = 512, 300
    x = np.zeros((1, 2, dim), np.float32)
    mh = MultiHeadAttentionPooling(classes, num_heads=4)
    mh(x)
    np.testing.assert_allclose(mh.head_weight.numpy(), 0.25)
    bound = 1 / np.sqrt(dim)
    for w in (mh.att_kernel, mh.cla_kernel, mh.att_bias, mh.cla_bias):
        v = w.numpy().ravel()
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.99 * bound
        assert abs(v.std() - bound / np.sqrt(3)) < 0.02 * bound      # U(±a): std a/sqrt(3)
    sh = AttentionPooling(classes)
    sh(x)
    he = np.sqrt(6 / dim)
    for w in (sh.att_kernel, sh.cla_kernel):
        v = w.numpy().ravel()
        assert np.abs(v).max() <= he and np.abs(v).max() > 0.99 * he
    np.testing.assert_array_equal(sh.att_bias.numpy(), 0.0)
    np.testing.assert_array_equal(sh.cla_bias.numpy(), 0.0)


def test_parameter_counts_and_factory():
    x = np.zeros((1, 2, D), np.float32)
    for heads, cls, n in ((0, MeanPooling, D * C + C), (1, AttentionPooling, 2 * (D * C + C)),
                          (4, MultiHeadAttentionPooling, 4 * 2 * (D * C + C) + 4)):
        layer = make_pooling(C, heads)
        assert isinstance(layer, cls)
        layer(x)
        assert layer.count_params() == n
    with pytest.raises(ValueError, match="att_head"):
        make_pooling(C, -1)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_float32_under_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        inp = keras.Input((T, D))
        h = keras.layers.Dense(D)(inp)                           # half-precision activations
        layer = MultiHeadAttentionPooling(C, 2)
        out = layer(h)
        assert h.dtype != "float32"
        assert out.dtype == "float32" and layer.compute_dtype == "float32"
        assert all(w.dtype == "float32" for w in layer.weights)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_keras_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, D))
    outs = [MeanPooling(C, name="mean")(inp), AttentionPooling(C, name="single")(inp),
            MultiHeadAttentionPooling(C, 3, name="multi")(inp)]
    model = keras.Model(inp, outs)
    path = tmp_path / "pool.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = _x(5)
    for a, b in zip(model(x), loaded(x)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    assert loaded.get_layer("multi").num_heads == 3
    assert isinstance(loaded.get_layer("single"), AttentionPooling)


def test_bad_input_rank():
    with pytest.raises(ValueError, match="batch, time, features"):
        AttentionPooling(C)(tf.zeros((2, 3, 4, 5)))


@pytest.mark.parametrize("att_head", [0, 1, 4, "dense"])
def test_class_prior_initialisation_starts_scores_at_the_prior(att_head):
    """--head_bias_init=prior: an untrained head on small features scores each class at its
    prior (the pooled sigmoid of logit(p) is p; attention weights sum to 1, head weights too;
    the global-pooling backbones' sigmoid Dense likewise)."""
    keras.utils.set_random_seed(0)
    prior = np.array([0.5, 0.2, 0.01, 1e-6, 0.9])
    x = 1e-3 * _x()                       # features near 0: the kernels contribute ~1e-4
    if att_head == "dense":
        layer, x = keras.layers.Dense(C, activation="sigmoid"), x[:, 0]
    else:
        layer = make_pooling(C, att_head)
    layer(x)
    init_class_prior(layer, prior)
    expected = np.broadcast_to(np.clip(prior, 1e-4, 1), (B, C))
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=2e-3, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        init_class_prior(layer, prior[:2])
