"""1×1 convolutions trained as one matrix product (``MatMul``) instead of ``Conv2D``.

An EfficientNet block's expansion and projection, and the top layer, are 1×1 convolutions:
per position a ``[C_in] → [C_out]`` linear map, i.e. ``[B·H·W, C_in] @ [C_in, C_out]``.
On CPU TensorFlow computes ``Conv2D``'s gradients with convolution kernels that are up to
2× slower than the matrix products of the same map, most where the feature map is small and
the channels many (EfficientNet's later blocks); EfficientNet-B0 and B2 + 4 heads trained
1.07-1.14× faster per step with the products (``docs/performance.md``, "Where training time
goes").

:class:`PointwiseConv2D` is ``keras.layers.Conv2D`` with the same weights and config; in
training, where it is a 1×1, stride-1, undilated, ungrouped, channels-last convolution, it
computes ``reshape(x) @ reshape(kernel)`` (+ bias, activation). Everywhere else —
inference, hence every export (SavedModel, TFLite, ONNX) — it is the parent's ``Conv2D``.
:func:`matmul_twin` gives a layer's twin for ``keras.models.clone_model``.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from psla_tf.models.twins import twin

__all__ = ["PointwiseConv2D", "matmul_twin"]


@keras.saving.register_keras_serializable(package="psla_tf")
class PointwiseConv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose 1×1 form trains as one matrix product.

    Input ``[B, H, W, C_in]`` → ``[B, H, W, C_out]`` (channels last); arguments and weights
    are the parent's. ``matmul=False``, inference, and every convolution that is not 1×1
    stride 1 (or is dilated, grouped or channels-first) take the parent's computation.
    """

    def __init__(self, *args, matmul: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul = bool(matmul)

    def _pointwise(self) -> bool:
        return (self.matmul and tuple(self.kernel_size) == (1, 1)
                and tuple(self.strides) == (1, 1) and tuple(self.dilation_rate) == (1, 1)
                and self.groups == 1 and self.data_format == "channels_last")

    def call(self, inputs, training=None):
        if not (training and self._pointwise()):
            return super().call(inputs)
        c_in, c_out = self.kernel.shape[2], self.kernel.shape[3]
        kernel = tf.reshape(tf.cast(self.kernel, inputs.dtype), [c_in, c_out])
        y = tf.linalg.matmul(tf.reshape(inputs, [-1, c_in]), kernel)          # [B·H·W, C_out]
        y = tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [c_out]], axis=0))
        if self.use_bias:
            y = tf.nn.bias_add(y, tf.cast(self.bias, y.dtype))
        return self.activation(y) if self.activation is not None else y

    def get_config(self):
        config = super().get_config()
        config["matmul"] = self.matmul
        return config


def matmul_twin(layer: keras.layers.Layer, matmul: bool = True) -> keras.layers.Layer:
    """A plain ``keras.layers.Conv2D`` → its :class:`PointwiseConv2D` (same name, config and
    weights); any other layer → itself."""
    return twin(layer, keras.layers.Conv2D, PointwiseConv2D, matmul=matmul)
