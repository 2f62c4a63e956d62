"""BatchNormalization whose training step is one fused kernel (``FusedBatchNormV3``).

Keras 3 computes a BatchNorm layer in training as separate graph ops (batch moments, then
``(x - mean) · γ / sqrt(var + ε) + β``), and its gradient as a dozen more; Keras 2 and
PyTorch use one fused kernel forward and one backward. On CPU the separate ops' gradients
were a quarter of an EfficientNet-B0 training step's op time (``docs/performance.md``,
"Where training time goes").

:class:`FusedBatchNormalization` is ``keras.layers.BatchNormalization`` with the same
weights, config and arithmetic — batch mean and biased batch variance normalise, the moving
statistics follow Keras' update ``m ← m·momentum + batch·(1 − momentum)`` with the biased
variance — computed in training by TensorFlow's fused kernel. It falls back to Keras' own
computation wherever that kernel does not apply (inference, frozen layers, masks, renorm,
synchronised statistics across replicas, inputs that are not 4-D channels-last, ε below
cuDNN's minimum).

:func:`fuse_batchnorm` swaps every BatchNormalization layer of a functional model for one.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from psla_tf.models.twins import twin

__all__ = ["FusedBatchNormalization", "fuse_batchnorm", "fused_twin", "MIN_FUSED_EPSILON",
           "batchnorm_layers", "BatchNormStatistics"]

MIN_FUSED_EPSILON = 1.001e-5   # cuDNN's minimum ε, as tf.compat.v1.nn.fused_batch_norm


@keras.saving.register_keras_serializable(package="psla_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` trained with one fused kernel.

    Input ``[B, H, W, C]`` (channels last) → output of the same shape; any other input, and
    every case the fused kernel does not cover, takes the parent's computation. Arguments and
    weights are the parent's; ``fused=False`` always takes the parent's computation.
    """

    def __init__(self, fused: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.fused = bool(fused)

    def _fusable(self, inputs, training, mask) -> bool:
        return (self.fused and bool(training) and self.trainable and mask is None
                and not self.renorm and not self.synchronized and len(inputs.shape) == 4
                and self.axis in (-1, 3) and self.epsilon >= MIN_FUSED_EPSILON)

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, "float32")
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels])
        beta = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels])
        y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
            epsilon=self.epsilon, exponential_avg_factor=1.0, data_format="NHWC",
            is_training=True)
        # the kernel returns the unbiased variance; Keras' moving variance takes the biased one
        n = tf.cast(tf.size(x) // channels, "float32")
        variance = tf.where(n > 1.0, variance * (n - 1.0) / tf.maximum(n, 1.0), 0.0)
        mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
        self.moving_mean.assign(self.moving_mean * self.momentum
                                + tf.cast(mean, self.moving_mean.dtype) * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum
            + tf.cast(variance, self.moving_variance.dtype) * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["fused"] = self.fused
        return config


def fuse_batchnorm(model: keras.Model, fused: bool = True) -> keras.Model:
    """``model`` (functional) with every ``keras.layers.BatchNormalization`` replaced by a
    :class:`FusedBatchNormalization` of the same config and weights; every other layer is
    shared with ``model``, not copied (its weights and names stay as they are)."""

    if not any(type(layer) is keras.layers.BatchNormalization for layer in model.layers):
        return model
    return keras.models.clone_model(model, clone_function=lambda layer: fused_twin(layer, fused))


def fused_twin(layer: keras.layers.Layer, fused: bool = True) -> keras.layers.Layer:
    """A plain ``keras.layers.BatchNormalization`` → its :class:`FusedBatchNormalization`
    (same name, config and weights); any other layer → itself."""
    return twin(layer, keras.layers.BatchNormalization, FusedBatchNormalization, fused=fused)


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every ``BatchNormalization`` layer of ``model``, nested models included."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


class BatchNormStatistics:
    """Sets BatchNorm layers' moving statistics to the average of their training-mode batch
    statistics over the batches run between :meth:`begin` and :meth:`finish`.

    ``begin`` sets each layer's momentum to 0 (a training-mode call then leaves exactly that
    batch's mean and biased variance in the moving statistics); call :meth:`accumulate`
    after each training-mode forward, with the batch's weight (default 1: an equal average;
    the clip count: a partial last batch counts for its clips); ``finish`` assigns the
    weighted averages (``assign=False``, or no batch ran: the statistics as they were before
    ``begin``) and puts the momenta back. Returns the number of batches.
    """

    def __init__(self, layers: list[keras.layers.BatchNormalization]):
        self.layers = list(layers)
        self.momentum: list[float] = []
        self.count = 0
        self.weight = 0.0

    def begin(self) -> None:
        self.momentum = [layer.momentum for layer in self.layers]
        self.before = [(layer.moving_mean.numpy(), layer.moving_variance.numpy())
                       for layer in self.layers]
        for layer in self.layers:
            layer.momentum = 0.0
        self.means = [np.zeros(layer.moving_mean.shape, np.float64) for layer in self.layers]
        self.variances = [np.zeros(layer.moving_variance.shape, np.float64)
                          for layer in self.layers]
        self.count = 0
        self.weight = 0.0

    def accumulate(self, weight: float = 1.0) -> None:
        for layer, mean, variance in zip(self.layers, self.means, self.variances):
            mean += weight * layer.moving_mean.numpy()
            variance += weight * layer.moving_variance.numpy()
        self.count += 1
        self.weight += float(weight)

    def finish(self, assign: bool = True) -> int:
        for layer, m in zip(self.layers, self.momentum):
            layer.momentum = m
        if assign and self.count:
            for layer, mean, variance in zip(self.layers, self.means, self.variances):
                layer.moving_mean.assign((mean / self.weight).astype(layer.moving_mean.dtype))
                layer.moving_variance.assign(
                    (variance / self.weight).astype(layer.moving_variance.dtype))
        else:
            for layer, (mean, variance) in zip(self.layers, self.before):
                layer.moving_mean.assign(mean)
                layer.moving_variance.assign(variance)
        return self.count
