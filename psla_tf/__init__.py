"""psla_tf: PSLA audio tagging (Gong, Chung, Glass) in Keras 3 / TensorFlow.

``import psla_tf`` registers every custom Keras object psla_tf saves (front end, fbank and
masking layers, pooling heads, optimizer, schedule), so ``keras.models.load_model`` opens
any ``.keras`` file psla_tf writes:

    import keras, psla_tf
    tagger = keras.models.load_model("exp/wa_model.keras")
    scores = tagger({"waveform": waveform[None], "num_samples": [len(waveform)]})

Where Keras is not installed (e.g. the PyTorch benchmark environment, which only uses the
NumPy metrics) nothing is registered.
"""
from __future__ import annotations

__version__ = "0.3.0"


def _register_keras_objects() -> None:
    """Import the modules whose ``@register_keras_serializable`` classes .keras files name."""
    try:
        import keras  # noqa: F401
    except ImportError:
        return
    from psla_tf import augment, features  # noqa: F401
    from psla_tf.models import frontend, pooling, tagger  # noqa: F401
    from psla_tf.training import optim, schedule  # noqa: F401


_register_keras_objects()
