"""psla_tf's Python API for a trained tagger (README, "Python API"); ``psla_tf.load_tagger``
and ``psla_tf.tag`` are these functions.

    import psla_tf
    tagger = psla_tf.load_tagger("exp/demo")      # any form the commands' --model takes
    psla_tf.tag(tagger, "clip.wav", top_k=3)      # [(name, score), ...] of the whole clip
    psla_tf.tag(tagger, waveform, sample_rate=44100)
"""
from __future__ import annotations

import os

import numpy as np

from psla_tf import params
from psla_tf.errors import AudioError


def load_tagger(model: str | os.PathLike, label_csv: str | None = None):
    """A trained tagger with its class map, ready to score audio.

    ``model``: a ``.keras`` file, a training run's folder (its ``wa_model.keras``, else
    ``final_model.keras``), a run's ``checkpoints/epoch_NNN.weights.h5`` or an exported
    SavedModel; ``label_csv``: the class map of a Keras file without a ``labels.csv`` beside it.
    Returns a :class:`psla_tf.inference.Scorer`: ``tagger(waveform [B, S] float32 at 16 kHz,
    num_samples [B] int32) -> scores [B, C]``, with ``names``, ``mids``, ``clip_samples`` (the
    model's input length) and, for Keras forms, the Keras ``model``.
    """
    from psla_tf.scoring import load_scorer
    return load_scorer(os.fspath(model), label_csv)


def as_mono(waveform: np.ndarray, sample_rate: int, target_rate: int = params.SAMPLE_RATE,
            what: str = "waveform") -> np.ndarray:
    """``[samples]`` or ``[samples, channels]`` audio → float32 mono at ``target_rate`` (channels
    averaged, soxr HQ resampling: what the commands do with files)."""
    x = np.asarray(waveform, np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if x.ndim != 1:
        raise AudioError(f"{what}: expected [samples] or [samples, channels], got shape "
                         f"{np.shape(waveform)}")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{what}: contains NaN or Inf samples")
    if sample_rate != target_rate and x.size:
        import soxr
        x = soxr.resample(x, sample_rate, target_rate, quality="HQ").astype(np.float32)
    return x


def tag(tagger, audio: str | os.PathLike | np.ndarray, *, top_k: int = 5,
        sample_rate: int = params.SAMPLE_RATE, hop_seconds: float | None = None,
        pooling: str = "max") -> list[tuple[str, float]]:
    """The ``top_k`` classes of a whole clip, best first: ``[(name, score), ...]``.

    ``audio``: a file (any format, rate and channel count soundfile reads) or a waveform
    ``[samples]`` / ``[samples, channels]`` at ``sample_rate``. Audio longer than the model's
    input is scored in windows of that length every ``hop_seconds`` (default: half a window),
    pooled over windows by ``max`` (or ``mean``), as ``psla-infer`` does.
    """
    from psla_tf import inference
    window_seconds = tagger.clip_samples / tagger.sample_rate
    hop = window_seconds / 2 if hop_seconds is None else hop_seconds
    kw = dict(window_seconds=window_seconds, hop_seconds=hop, pooling=pooling,
              sample_rate=tagger.sample_rate)
    if isinstance(audio, (str, os.PathLike)):
        result = inference.tag_file(tagger, os.fspath(audio), **kw)
    else:
        result = inference.tag_waveform(tagger, as_mono(audio, sample_rate, tagger.sample_rate),
                                        **kw)
    return inference.top_k(result.clip_scores, tagger.names, top_k)
