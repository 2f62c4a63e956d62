"""psla_tf: PSLA audio tagging (Gong, Chung, Glass) in Keras 3 / TensorFlow.

The public API (README "Python API"), imported on first use:

    tagger = psla_tf.load_tagger("exp/demo")      # .keras, run folder, checkpoint, SavedModel
    psla_tf.tag(tagger, "clip.wav", top_k=3)      # [(name, score), ...]
    psla_tf.kaldi_fbank(waveform)                 # Kaldi log-mel [..., frames, 128]
    psla_tf.KaldiFbank()                          # the same as a Keras layer
    psla_tf.adapt_batchnorm(tagger.model, batches)  # to a new speaker / device (no labels)
    psla_tf.export_saved_model(tagger.model, "serving/psla", tagger.mids, tagger.names)
    psla_tf.export_tflite_model(tagger.model, "psla.tflite", tagger.mids, tagger.names)

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

# public name → (the module defining it, its name there); imported on first access (PEP 562).
# No public name may equal a submodule's name: importing the submodule would rebind it.
_API = {
    "load_tagger": ("psla_tf.api", "load_tagger"),
    "tag": ("psla_tf.api", "tag"),
    "kaldi_fbank": ("psla_tf.features", "kaldi_fbank"),
    "KaldiFbank": ("psla_tf.features", "KaldiFbank"),
    "adapt_batchnorm": ("psla_tf.models.adaptation", "adapt_batchnorm"),
    "export_saved_model": ("psla_tf.export", "export_saved_model"),
    "export_tflite_model": ("psla_tf.export_tflite", "export_tflite"),
    "PslaError": ("psla_tf.errors", "PslaError"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'psla_tf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
