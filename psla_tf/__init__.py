"""psla_tf: PSLA audio tagging (Gong, Chung, Glass) in Keras 3 / TensorFlow.

``import psla_tf`` registers every custom Keras object psla_tf saves (front end, fbank and
masking layers, pooling heads, optimizer, schedule, distillation loss), so
``keras.models.load_model`` opens any ``.keras`` file psla_tf writes:

    import keras, psla_tf
    tagger = keras.models.load_model("exp/wa_model.keras")
    scores = tagger({"waveform": waveform[None], "num_samples": [len(waveform)]})

The import itself stays light (no TensorFlow): the Keras modules are imported when Keras
is (psla_tf._keras_objects). Where Keras is not installed (e.g. the PyTorch benchmark
environment, which only uses the NumPy metrics) nothing is registered.
"""
from __future__ import annotations

__version__ = "0.3.0"

from psla_tf._keras_objects import register_when_keras_loads  # noqa: E402

register_when_keras_loads()
