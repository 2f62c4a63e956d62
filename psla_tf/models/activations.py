"""Swish whose gradient reuses the forward pass's sigmoid instead of recomputing it.

EfficientNet applies swish, ``x · σ(x)``, after 33 of B0's BatchNorm layers. TensorFlow's
``tf.nn.silu`` keeps only ``x`` for the backward pass and recomputes ``σ(x)`` there, then
forms ``dy · σ(x) · (1 + x · (1 − σ(x)))`` (with a ``β · x`` product each way for its
``β`` argument): about seven elementwise passes over every activation. Keeping ``σ(x)`` and
``y = x · σ(x)`` from the forward pass, the same derivative is
``dy · (y + σ(x) · (1 − y))``: four passes and no exponential. EfficientNet-B0 and B2 + 4
heads trained 1.05-1.08× faster per step on CPU (``docs/performance.md``, "Where training
time goes").

:class:`SwishActivation` is ``keras.layers.Activation`` with the same config; in training,
where its activation is swish, it computes :func:`swish`. Everywhere else — inference, hence
every export (SavedModel, TFLite, ONNX) — it is the parent's ``tf.nn.silu``.
:func:`swish_twin` gives a layer's twin for ``keras.models.clone_model``.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from psla_tf.models.twins import twin

__all__ = ["swish", "SwishActivation", "swish_twin"]

_SWISH_NAMES = ("swish", "silu")


@tf.custom_gradient
def swish(x: tf.Tensor):
    """``x · σ(x)``, any shape; its gradient ``dy · (y + σ(x) · (1 − y))`` reuses the forward
    ``σ(x)`` and ``y`` (equal to ``tf.nn.silu``'s ``dy · σ(x) · (1 + x · (1 − σ(x)))``)."""
    s = tf.sigmoid(x)
    y = x * s

    def grad(dy):
        return dy * (y + s * (1.0 - y))

    return y, grad


def _is_swish(activation) -> bool:
    name = activation if isinstance(activation, str) else getattr(activation, "__name__", "")
    return name in _SWISH_NAMES


@keras.saving.register_keras_serializable(package="psla_tf")
class SwishActivation(keras.layers.Activation):
    """``keras.layers.Activation`` whose swish trains with :func:`swish`.

    Input of any shape → output of the same shape. Arguments are the parent's;
    ``saved_sigmoid=False``, inference, and any activation other than swish take the
    parent's computation.
    """

    def __init__(self, activation, saved_sigmoid: bool = True, **kwargs):
        super().__init__(activation, **kwargs)
        self.saved_sigmoid = bool(saved_sigmoid)

    def call(self, inputs, training=None):
        if training and self.saved_sigmoid and _is_swish(self.activation):
            return swish(inputs)
        return super().call(inputs)

    def get_config(self):
        config = super().get_config()
        config["saved_sigmoid"] = self.saved_sigmoid
        return config


def swish_twin(layer: keras.layers.Layer, saved_sigmoid: bool = True) -> keras.layers.Layer:
    """A plain ``keras.layers.Activation`` applying swish → its :class:`SwishActivation`
    (same name and config); any other layer → itself."""
    if not _is_swish(getattr(layer, "activation", None)):
        return layer
    return twin(layer, keras.layers.Activation, SwishActivation, saved_sigmoid=saved_sigmoid)
