"""A trained tagger adapted to a new recording domain without labels (not in PSLA).

A tagger normalises every backbone activation with BatchNorm statistics of its training data.
A new speaker, microphone or room shifts those statistics, and a model tuned to the training
domain's shifts scores the new one worse. Adaptive BatchNorm (AdaBN; Li et al., 2018,
"Adaptive Batch Normalization for practical domain adaptation", Pattern Recognition 80)
replaces each BatchNorm layer's moving mean and variance with the statistics the layer sees on
the new domain's clips — no labels, no gradient step, every weight unchanged:

    mean_l := Σ_k n_k μ_lk / Σ_k n_k,   var_l := Σ_k n_k σ²_lk / Σ_k n_k

with μ_lk, σ²_lk the mean and biased variance layer l sees on batch k (n_k clips) of the
domain's clips, each batch's forward in training mode (every layer normalised with that
batch's statistics). The front end runs as in inference (no masking), and dropout /
drop-connect are off, so the statistics are those of the clips as the model will see them. The adapted model is an ordinary tagger (``.keras``; exports as any other).

It is transductive: it needs recordings of the new domain (unlabelled) before scoring them.
Measured on FSDD's unseen speakers (docs/own_data.md, "Adapting to the speaker").
"""
from __future__ import annotations

from typing import Any, Iterable

import keras
import numpy as np

from psla_tf.models.batchnorm import BatchNormStatistics, batchnorm_layers

__all__ = ["BatchNormAdapter", "adapt_batchnorm", "MIN_ADAPT_CLIPS"]

# fewer clips than this give statistics too noisy to replace the training domain's
MIN_ADAPT_CLIPS = 16


class BatchNormAdapter:
    """Accumulates a tagger's BatchNorm statistics on batches of a new domain's clips.

    A :class:`psla_tf.inference.Scorer` in form: ``adapter(waveform [B, S] float32,
    num_samples [B] int32) → zeros [B, C]`` runs one statistics step (so
    :func:`psla_tf.prediction.predict` can stream records or audio files through it);
    :meth:`finish` writes the averaged statistics into the model and returns the clips used.

    Args:
      model: a tagger of :func:`psla_tf.models.tagger.build_tagger` (``frontend`` and
        ``classifier`` layers), adapted in place.
      mids, names: its vocabulary (only carried, as a scorer's).
    """

    kind = "adapter"
    progress_label = "adapt"

    def __init__(self, model: keras.Model, mids: list[str] | None = None,
                 names: list[str] | None = None):
        import tensorflow as tf

        from psla_tf import params
        from psla_tf.data.pipeline import clip_samples_for_frames
        layer_names = {layer.name for layer in model.layers}
        if not {"frontend", "classifier"} <= layer_names:
            raise ValueError("BatchNorm adaptation needs a single psla_tf tagger ('frontend' "
                             "and 'classifier' layers), not an ensemble or another model")
        self.model = model
        frontend, classifier = model.get_layer("frontend"), model.get_layer("classifier")
        layers = batchnorm_layers(classifier)
        if not layers:
            raise ValueError("the model has no BatchNorm layer to adapt")
        self.stats = BatchNormStatistics(layers)
        self.dropouts = [layer for layer in classifier._flatten_layers(include_self=False,
                                                                        recursive=True)
                         if isinstance(layer, keras.layers.Dropout)]
        self.mids = list(mids or [])
        self.names = list(names or [])
        self.sample_rate = params.SAMPLE_RATE
        self.target_length = int(frontend.target_length)
        self.clip_samples = clip_samples_for_frames(self.target_length)
        self.num_classes = int(model.outputs[0].shape[-1])
        if self.mids and len(self.mids) != self.num_classes:
            raise ValueError(f"the model has {self.num_classes} outputs but its vocabulary "
                             f"lists {len(self.mids)} classes (wrong labels.csv / --label_csv?)")
        self.clips = 0
        self._rates = [d.rate for d in self.dropouts]
        for d in self.dropouts:      # read when the step is traced (the first call)
            d.rate = 0.0
        self.stats.begin()
        spec = (tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32))
        self._step = tf.function(
            lambda w, n: classifier(frontend(w, n, training=False), training=True),
            input_signature=spec, reduce_retracing=True, autograph=False)

    def __call__(self, waveform: np.ndarray, num_samples: np.ndarray) -> np.ndarray:
        waveform = np.asarray(waveform, np.float32)
        self._step(waveform, np.asarray(num_samples, np.int32))
        self.stats.accumulate(weight=len(waveform))
        self.clips += len(waveform)
        return np.zeros((len(waveform), self.num_classes), np.float32)

    def finish(self, min_clips: int = MIN_ADAPT_CLIPS) -> int:
        """Write the averaged statistics into the model (dropout rates and momenta back);
        fewer than ``min_clips`` clips: ValueError, the model unchanged."""
        enough = self.clips >= min_clips
        self._restore(assign=enough)
        if not enough:
            raise ValueError(f"BatchNorm adaptation needs at least {min_clips} clips of the "
                             f"new domain, got {self.clips}")
        return self.clips

    def abort(self) -> None:
        """Put the model back as it was (no statistics written)."""
        self._restore(assign=False)

    def _restore(self, assign: bool) -> None:
        self.stats.finish(assign=assign)
        for d, rate in zip(self.dropouts, self._rates):
            d.rate = rate


def adapt_batchnorm(model: keras.Model, batches: Iterable[Any],
                    min_clips: int = MIN_ADAPT_CLIPS) -> int:
    """Adapt ``model``'s BatchNorm statistics (in place) to the clips of ``batches``.

    ``batches`` yields ``{"waveform": [B, S], "num_samples": [B]}`` dicts or ``(dict,
    labels)`` tuples (labels are not used), e.g. :func:`psla_tf.data.pipeline.
    make_eval_dataset`. Returns the number of clips. See the module doc.
    """
    adapter = BatchNormAdapter(model)
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            adapter(np.asarray(x["waveform"]), np.asarray(x["num_samples"]))
    except BaseException:
        adapter.abort()
        raise
    return adapter.finish(min_clips)
