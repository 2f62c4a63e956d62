"""Time pooling heads: mean, single-head and multi-head attention (paper Fig. 2, Sec. V).

Input: backbone features averaged over frequency, ``x`` ``[B, T', D]``. A 1x1 convolution over
``[D, T', 1]`` (PyTorch layout) is a dense map over D applied at every time step, so each
head's convolutions are ``[D, C]`` kernels applied with einsum.

* ``MeanPooling``: ``mean_t sigmoid(x W + b)``.
* ``AttentionPooling`` (one head): ``att = clip(sigmoid(x W_a + b_a), 1e-7, 1 - 1e-7)``,
  normalised by its sum over time; ``cla = sigmoid(x W_c + b_c)``; ``out = Σ_t att * cla``.
  He-uniform kernels and zero biases (the reference's ``init_layer``).
* ``MultiHeadAttentionPooling`` (H heads): ``out = Σ_h w_h out_h`` with learnable ``w_h``
  initialised to 1/H; kernels and biases initialised as PyTorch's Conv2d default,
  U(±1/sqrt(D)).

The layers compute in float32 under any mixed-precision policy (their dtype policy is pinned).
``attention_maps(x)`` gives the normalised attention ``[B, H, T', C]`` and ``frame_scores(x)``
the per-frame class scores ``cla`` ``[B, H, T', C]``, for frame-level output / localisation.
"""
from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from psla_tf import params

__all__ = ["MeanPooling", "AttentionPooling", "MultiHeadAttentionPooling", "make_pooling",
           "init_class_prior", "prior_logits"]


class _Pooling(keras.layers.Layer):
    """Common parts: float32 policy, ``[H, D, C]`` att / cla kernels."""

    def __init__(self, num_classes: int, num_heads: int = 1, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if int(num_classes) < 1 or int(num_heads) < 1:
            raise ValueError(f"num_classes and num_heads must be >= 1, "
                             f"got {num_classes}, {num_heads}")
        self.num_classes = int(num_classes)
        self.num_heads = int(num_heads)

    def _initializers(self, dim: int):
        """(kernel, bias) initialisers; overridden by MultiHeadAttentionPooling."""
        return keras.initializers.HeUniform(), keras.initializers.Zeros()

    def _add_conv(self, prefix: str, dim: int) -> tuple:
        k_init, b_init = self._initializers(dim)
        kernel = self.add_weight(name=f"{prefix}_kernel",
                                 shape=(self.num_heads, dim, self.num_classes),
                                 initializer=k_init)
        bias = self.add_weight(name=f"{prefix}_bias", shape=(self.num_heads, self.num_classes),
                               initializer=b_init)
        return kernel, bias

    def init_class_prior(self, prior) -> None:
        """Start every head's class biases at logit(prior) ``[C]`` (:func:`prior_logits`),
        so the untrained pooled scores are about the training set's mean targets instead of
        0.5 (not in the reference; ``--head_bias_init=prior``)."""
        logit = prior_logits(prior, self.num_classes)
        self.cla_bias.assign(np.broadcast_to(logit, (self.num_heads, self.num_classes)))

    @staticmethod
    def _conv(x, kernel, bias):
        # x [B, T, D], kernel [H, D, C] -> [B, H, T, C]
        return tf.einsum("btd,hdc->bhtc", x, kernel) + bias[tf.newaxis, :, tf.newaxis, :]

    def _check_input(self, x):
        x = tf.cast(x, tf.float32)
        if x.shape.rank != 3:
            raise ValueError(f"{type(self).__name__} expects [batch, time, features], "
                             f"got shape {x.shape}")
        return x

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(num_classes=self.num_classes)
        return config


@keras.saving.register_keras_serializable(package="psla_tf")
class MeanPooling(_Pooling):
    """``mean_t sigmoid(conv1x1(x))`` (the reference's ``MeanPooling``, head_num = 0)."""

    def __init__(self, num_classes: int, **kwargs):
        kwargs.pop("num_heads", None)
        super().__init__(num_classes, 1, **kwargs)

    def build(self, input_shape):
        self.cla_kernel, self.cla_bias = self._add_conv("cla", int(input_shape[-1]))
        self.built = True

    def frame_scores(self, x):
        """Per-frame class scores ``[B, 1, T', C]``."""
        x = self._check_input(x)
        return tf.sigmoid(self._conv(x, self.cla_kernel, self.cla_bias))

    def attention_maps(self, x):
        """Uniform weights 1/T' ``[B, 1, T', C]`` (mean pooling as attention)."""
        cla = self.frame_scores(x)
        return tf.ones_like(cla) / tf.cast(tf.shape(cla)[2], cla.dtype)

    def call(self, x, return_attention: bool = False):
        cla = self.frame_scores(x)
        out = tf.reduce_mean(cla[:, 0], axis=1)
        if return_attention:
            return out, tf.ones_like(cla) / tf.cast(tf.shape(cla)[2], cla.dtype)
        return out


@keras.saving.register_keras_serializable(package="psla_tf")
class AttentionPooling(_Pooling):
    """Single-head attention pooling (the reference's ``Attention``; Fig. 2 with H = 1)."""

    def __init__(self, num_classes: int, **kwargs):
        kwargs.pop("num_heads", None)
        super().__init__(num_classes, 1, **kwargs)

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.att_kernel, self.att_bias = self._add_conv("att", dim)
        self.cla_kernel, self.cla_bias = self._add_conv("cla", dim)
        self.built = True

    def frame_scores(self, x):
        """Per-head, per-frame class scores ``cla`` ``[B, H, T', C]``."""
        x = self._check_input(x)
        return tf.sigmoid(self._conv(x, self.cla_kernel, self.cla_bias))

    def attention_maps(self, x):
        """Normalised attention ``[B, H, T', C]`` (sums to 1 over T')."""
        x = self._check_input(x)
        att = tf.sigmoid(self._conv(x, self.att_kernel, self.att_bias))
        att = tf.clip_by_value(att, params.CLAMP_EPS, 1.0 - params.CLAMP_EPS)
        return att / tf.reduce_sum(att, axis=2, keepdims=True)

    def _head_outputs(self, x):
        att = self.attention_maps(x)
        return tf.reduce_sum(att * self.frame_scores(x), axis=2), att   # [B, H, C]

    def call(self, x, return_attention: bool = False):
        heads, att = self._head_outputs(x)
        out = heads[:, 0]
        return (out, att) if return_attention else out


@keras.saving.register_keras_serializable(package="psla_tf")
class MultiHeadAttentionPooling(AttentionPooling):
    """H-head attention pooling: ``Σ_h w_h out_h``, ``w_h`` learnable, initialised 1/H
    (the reference's ``MHeadAttention``; Fig. 2)."""

    def __init__(self, num_classes: int, num_heads: int = 4, **kwargs):
        _Pooling.__init__(self, num_classes, num_heads, **kwargs)

    def _initializers(self, dim: int):
        bound = 1.0 / math.sqrt(dim)
        # PyTorch Conv2d default: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)); same bias
        return (keras.initializers.RandomUniform(-bound, bound),
                keras.initializers.RandomUniform(-bound, bound))

    def build(self, input_shape):
        super().build(input_shape)
        self.head_weight = self.add_weight(
            name="head_weight", shape=(self.num_heads,),
            initializer=keras.initializers.Constant(1.0 / self.num_heads))
        self.built = True

    def call(self, x, return_attention: bool = False):
        heads, att = self._head_outputs(x)
        out = tf.einsum("bhc,h->bc", heads, self.head_weight)
        return (out, att) if return_attention else out

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads)
        return config


def prior_logits(prior, num_classes: int) -> np.ndarray:
    """logit(p) ``[C]`` float32 of class priors ``[C]`` clipped to [1e-4, 1 − 1e-4]."""
    p = np.clip(np.asarray(prior, np.float64), 1e-4, 1.0 - 1e-4)
    if p.shape != (num_classes,):
        raise ValueError(f"prior must have shape ({num_classes},), got {p.shape}")
    return np.log(p / (1.0 - p)).astype(np.float32)


def init_class_prior(head: keras.layers.Layer, prior) -> None:
    """A tagger's head (a pooling layer above, or the sigmoid ``Dense`` of the global-pooling
    backbones) starts its class scores at ``prior`` ``[C]``: biases at logit(prior)."""
    if isinstance(head, _Pooling):
        head.init_class_prior(prior)
    elif isinstance(head, keras.layers.Dense) and head.use_bias:
        head.bias.assign(prior_logits(prior, head.units))
    else:
        raise ValueError(f"no class biases to initialise in {type(head).__name__}")


def make_pooling(num_classes: int, att_head: int, name: str = "pooling") -> _Pooling:
    """The reference's choice: 0 → mean pooling, 1 → single head, > 1 → multi-head."""
    if att_head < 0:
        raise ValueError(f"att_head must be >= 0 (0 = mean pooling), got {att_head}")
    if att_head == 0:
        return MeanPooling(num_classes, name=name)
    if att_head == 1:
        return AttentionPooling(num_classes, name=name)
    return MultiHeadAttentionPooling(num_classes, att_head, name=name)
