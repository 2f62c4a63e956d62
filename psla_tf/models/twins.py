"""Training twins: a Keras layer swapped for a subclass that keeps its name, config and
weights and trains with faster kernels (``FusedBatchNormalization``, ``PointwiseConv2D``)."""
from __future__ import annotations

import keras

__all__ = ["twin"]


def twin(layer: keras.layers.Layer, base: type, cls: type, **options) -> keras.layers.Layer:
    """``layer`` as a ``cls`` (a subclass of ``base``) with its config plus ``options``,
    built and holding its weights, where ``layer`` is exactly a ``base``; else ``layer``."""
    if type(layer) is not base:
        return layer
    out = cls(**options, **layer.get_config())
    out.build_from_config(layer.get_build_config())
    out.set_weights(layer.get_weights())
    return out
