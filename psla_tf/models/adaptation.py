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
drop-connect are off, so the statistics are those of the clips as the model will see them.

A single-label tagger can then also adapt its BatchNorm layers' affine parameters (γ, β;
nothing else) to the same clips by information maximisation (SHOT's IM loss; Liang et al.,
2020, "Do we really need to access the source data?", ICML), :func:`maximise_information`:

    L = mean_i H(p_i) − H(mean_i p_i),   H(p) = −Σ_c p_c log p_c

confident predictions per clip (first term) that still spread over the classes (second
term: it assumes the new clips cover the classes roughly evenly), plus SHOT's
self-supervised pseudo-labels (:func:`shot_pseudo_labels`, Sec. 3.3 there): at the start of
every epoch each clip is labelled by the nearest class centroid of the clips' embeddings, and
``β · CE(pseudo-label, p)`` joins the loss (β = 0.3, SHOT's value for digits). Clips of one
speaker saying one digit lie close together: their centroid corrects the clips the classifier
alone gets wrong. ``pseudo_labels="balanced"`` assigns the same centroid similarities under
the constraint that the clips spread evenly over the classes (:func:`balanced_assignment`,
the equipartition of SwAV's Sinkhorn-Knopp step; Caron et al., 2020), the assumption the IM
loss's diversity term already makes, so that a digit the classifier hears as another cannot
draw both clusters to one centroid. The adapted model is an ordinary tagger (``.keras``;
exports as any other).
``scope="encoder"`` adapts every backbone weight instead of the BatchNorm affine parameters
alone, the attention head frozen — SHOT's own choice (the "hypothesis" fixed, the feature
extractor adapted); on FSDD's validation speakers it was no better (docs/fsdd_recipe.md).

Both are transductive: they need recordings of the new domain (unlabelled) before scoring
them. Measured on FSDD's unseen speakers (docs/own_data.md, "Adapting to the speaker").
"""
from __future__ import annotations

from typing import Any, Iterable

import keras
import numpy as np

from psla_tf import params
from psla_tf.models.batchnorm import BatchNormStatistics, batchnorm_layers

__all__ = ["BatchNormAdapter", "adapt_batchnorm", "maximise_information",
           "information_maximisation_loss", "shot_pseudo_labels", "balanced_assignment",
           "is_single_label",
           "adaptable_variables", "ClipSample", "MIN_ADAPT_CLIPS", "MAX_IM_CLIPS",
           "PSEUDO_LABEL_WEIGHT", "PSEUDO_LABELS", "SCOPES"]

# fewer clips than this give statistics too noisy to replace the training domain's
MIN_ADAPT_CLIPS = 16
# information maximisation holds at most this many clips in memory (a uniform sample beyond)
MAX_IM_CLIPS = 1000
# its optimisation, chosen on FSDD's validation speakers (docs/own_data.md)
IM_BATCH_SIZE = 50
IM_LEARNING_RATE = params.IM_LEARNING_RATE
PSEUDO_LABEL_WEIGHT = params.PSEUDO_LABEL_WEIGHT   # SHOT's β (docs/own_data.md)
SCOPES = params.ADAPT_SCOPES   # what information maximisation adapts (adaptable_variables)
PSEUDO_LABELS = params.PSEUDO_LABELS   # how shot_pseudo_labels assigns them


def is_single_label(model: keras.Model) -> bool:
    """Whether ``model`` is a single-label tagger (class probabilities summing to 1)."""
    return "single_label" in {layer.name for layer in model.layers}


def adaptable_variables(model: keras.Model, scope: str = "batchnorm") -> list:
    """The weights information maximisation adapts: ``"batchnorm"``, every BatchNorm layer's
    scale and offset (γ, β) in the classifier; ``"encoder"``, every trainable weight of the
    classifier except its ``pooling`` head (SHOT: the classifier head fixed). ValueError for
    another scope or when there is nothing to adapt."""
    if scope not in SCOPES:
        raise ValueError(f"adaptation scope {scope!r}: expected one of {', '.join(SCOPES)}")
    classifier = model.get_layer("classifier")
    if scope == "batchnorm":
        found = []
        for layer in batchnorm_layers(classifier):
            found += [v for v in (layer.gamma, layer.beta) if v is not None]
        if not found:
            raise ValueError("the model has no BatchNorm scale or offset to adapt")
        return found
    head = {id(v) for layer in classifier.layers if layer.name == "pooling"
            for v in layer.trainable_variables}
    found = [v for v in classifier.trainable_variables if id(v) not in head]
    if not found:
        raise ValueError("the model has no trainable encoder weight to adapt")
    return found


def information_maximisation_loss(probs):
    """SHOT's IM loss of class probabilities ``[B, C]`` → scalar (module doc)."""
    import tensorflow as tf
    p = tf.clip_by_value(probs, 1e-8, 1.0)
    mean = tf.clip_by_value(tf.reduce_mean(probs, 0), 1e-8, 1.0)
    entropy = -tf.reduce_mean(tf.reduce_sum(p * tf.math.log(p), -1))
    return entropy + tf.reduce_sum(mean * tf.math.log(mean))


def balanced_assignment(scores: np.ndarray, epsilon: float = params.SINKHORN_EPSILON,
                        iterations: int = 200, tol: float = 1e-9) -> np.ndarray:
    """Each of N items' class ``[N]`` under an even spread over the C classes: the
    entropic optimal transport of the uniform distribution over the items onto the uniform
    distribution over the classes with gain ``scores`` ``[N, C]`` (Sinkhorn-Knopp; SwAV's
    equipartition, Caron et al., 2020), each item then taking its most probable class.
    ``epsilon``: the entropic regularisation (smaller: closer to the hard assignment);
    columns of ``-inf`` (classes left out) get no item."""
    scores = np.asarray(scores, np.float64)
    keep = np.isfinite(scores).all(0)
    if not keep.any():
        raise ValueError("balanced_assignment: every class is left out")
    s = scores[:, keep]
    q = np.exp((s - s.max()) / epsilon)
    n, c = q.shape
    for _ in range(iterations):
        q *= (1.0 / c) / np.maximum(q.sum(0, keepdims=True), 1e-300)
        row = q.sum(1, keepdims=True)
        q *= (1.0 / n) / np.maximum(row, 1e-300)
        if np.abs(q.sum(0) * c - 1.0).max() < tol:
            break
    return np.flatnonzero(keep)[q.argmax(1)]


def _check_assignment(assign: str) -> None:
    if assign not in PSEUDO_LABELS:
        raise ValueError(f"pseudo-label assignment (pseudo_labels) {assign!r}: expected one of "
                         f"{', '.join(PSEUDO_LABELS)}")


def shot_pseudo_labels(probs: np.ndarray, features: np.ndarray, rounds: int = 2,
                       assign: str = "centroid") -> np.ndarray:
    """SHOT's self-supervised pseudo-labels (Liang et al., 2020, Sec. 3.3, eqs. 4-6).

    Class centroids of the clips' features weighted by their class probabilities; each clip
    takes the class of its nearest centroid (cosine distance); the centroids again from those
    labels (classes with no clip left out), and the labels again (``rounds`` = 2 as SHOT).
    As SHOT's code, a constant 1 is appended to every feature vector before the rows are
    L2-normalised. ``assign="balanced"``: each round's labels by :func:`balanced_assignment`
    of the cosine similarities instead of the nearest centroid (the clips spread evenly over
    the classes).

    Args:
      probs: ``[N, C]`` class probabilities; features: ``[N, D]`` embeddings of the clips.
    Returns:
      ``[N]`` int64 class indices.
    """
    _check_assignment(assign)
    probs = np.asarray(probs, np.float64)
    f = np.asarray(features, np.float64)
    f = np.concatenate([f, np.ones((len(f), 1))], 1)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    weights = probs
    labels = probs.argmax(1)
    for _ in range(rounds):
        mass = weights.sum(0)
        centroids = weights.T @ f / (1e-8 + mass[:, None])
        similarity = f @ centroids.T / np.maximum(np.linalg.norm(centroids, axis=1), 1e-12)
        similarity[:, mass <= 0] = -np.inf
        labels = (balanced_assignment(similarity) if assign == "balanced"
                  else similarity.argmax(1))
        weights = np.eye(probs.shape[1])[labels]
    return labels


def maximise_information(model: keras.Model, waveform: np.ndarray, num_samples: np.ndarray,
                         epochs: int, batch_size: int = IM_BATCH_SIZE,
                         learning_rate: float = IM_LEARNING_RATE, seed: int = 0,
                         pseudo_label_weight: float = PSEUDO_LABEL_WEIGHT,
                         progress: bool = False, scope: str = "batchnorm",
                         pseudo_labels: str = PSEUDO_LABELS[0]) -> list[float]:
    """Adapt a single-label tagger's BatchNorm γ, β (``scope``: :func:`adaptable_variables`)
    in place to unlabelled clips by SHOT
    (module doc): Adam, ``epochs`` passes over the clips in a random order (``seed``) in
    batches of ``batch_size``, minimising the IM loss plus ``pseudo_label_weight`` × the
    cross-entropy with each clip's :func:`shot_pseudo_labels` (recomputed at the start of
    every epoch, assigned as ``pseudo_labels`` says; 0: IM alone), the model in inference
    mode (its moving statistics, no
    masking, dropout off). Call it after :func:`adapt_batchnorm`. ``progress``: a tqdm bar
    over the epochs.

    Args:
      waveform: ``[N, S]`` float32 clips; num_samples: ``[N]`` int32 valid samples.
    Returns:
      the mean loss of each epoch. ValueError for a multi-label model or one without
      BatchNorm affine parameters.
    """
    import tensorflow as tf
    if not is_single_label(model):
        raise ValueError("information maximisation needs a single-label tagger (--loss=ce): "
                         "its scores must be class probabilities")
    variables = adaptable_variables(model, scope)
    if pseudo_label_weight < 0:
        raise ValueError(f"pseudo_label_weight must be >= 0, got {pseudo_label_weight}")
    _check_assignment(pseudo_labels)
    optimizer = keras.optimizers.Adam(learning_rate)
    beta = float(pseudo_label_weight)

    def step(w, n, y):
        with tf.GradientTape() as tape:
            p = model({"waveform": w, "num_samples": n}, training=False)
            loss = information_maximisation_loss(p)
            if beta:
                p_y = tf.gather(p, y, batch_dims=1)
                loss += beta * -tf.reduce_mean(tf.math.log(tf.clip_by_value(p_y, 1e-8, 1.0)))
        grads = tape.gradient(loss, [v.value for v in variables])
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    step = tf.function(step, reduce_retracing=True, autograph=False)
    waveform = np.asarray(waveform, np.float32)
    num_samples = np.asarray(num_samples, np.int32)
    labels = np.zeros(len(waveform), np.int32)
    if beta:
        from psla_tf.models.tagger import scores_and_embedding
        both = tf.function(scores_and_embedding(model), reduce_retracing=True,
                           autograph=False)
    rng = np.random.default_rng(seed)
    losses = []
    from tqdm.auto import tqdm
    for _ in tqdm(range(epochs), desc="information maximisation", unit="epoch",
                  disable=not progress):
        if beta:
            out = [both({"waveform": tf.constant(waveform[i:i + batch_size]),
                         "num_samples": tf.constant(num_samples[i:i + batch_size])},
                        training=False) for i in range(0, len(waveform), batch_size)]
            labels = shot_pseudo_labels(np.concatenate([p.numpy() for p, _ in out]),
                                        np.concatenate([f.numpy() for _, f in out]),
                                        assign=pseudo_labels).astype(np.int32)
        order = rng.permutation(len(waveform))
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            total += float(step(tf.constant(waveform[idx]), tf.constant(num_samples[idx]),
                                tf.constant(labels[idx]))) * len(idx)
        losses.append(total / max(len(order), 1))
    return losses


class ClipSample:
    """A uniform sample of at most ``capacity`` clips of a stream of batches (reservoir
    sampling, ``seed``), kept in stream order: :meth:`add` each batch, :meth:`arrays` →
    ``(waveform [N, S], num_samples [N])``, shorter clips zero-padded to the longest."""

    def __init__(self, capacity: int = MAX_IM_CLIPS, seed: int = 0):
        self.capacity = int(capacity)
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.kept: list[tuple[int, np.ndarray, int]] = []

    def add(self, waveform: np.ndarray, num_samples: np.ndarray) -> None:
        for w, n in zip(waveform, num_samples):
            item = (self.seen, np.array(w[:max(int(n), 1)], np.float32), int(n))
            if len(self.kept) < self.capacity:
                self.kept.append(item)
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.capacity:
                    self.kept[j] = item
            self.seen += 1

    def arrays(self, min_samples: int = 0) -> tuple[np.ndarray, np.ndarray]:
        kept = sorted(self.kept, key=lambda item: item[0])
        width = max([min_samples] + [len(w) for _, w, _ in kept])
        waveform = np.zeros((len(kept), width), np.float32)
        for row, (_, w, _) in enumerate(kept):
            waveform[row, :len(w)] = w
        return waveform, np.array([n for _, _, n in kept], np.int32)


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
      keep_clips: also keep a uniform sample of at most this many clips (``sample``, a
        :class:`ClipSample`) for :func:`maximise_information`; 0: none.
    """

    kind = "adapter"
    progress_label = "adapt"

    def __init__(self, model: keras.Model, mids: list[str] | None = None,
                 names: list[str] | None = None, keep_clips: int = 0):
        import tensorflow as tf

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
        self.sample = ClipSample(keep_clips) if keep_clips > 0 else None
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
        if self.sample is not None:
            self.sample.add(waveform, num_samples)
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

    def maximise_information(self, epochs: int, progress: bool = False,
                             pseudo_label_weight: float = PSEUDO_LABEL_WEIGHT,
                             scope: str = "batchnorm",
                             learning_rate: float = IM_LEARNING_RATE,
                             pseudo_labels: str = PSEUDO_LABELS[0]
                             ) -> tuple[int, list[float]]:
        """After :meth:`finish`: the model's BatchNorm γ, β (``scope``) by
        :func:`maximise_information` over the kept clips (``keep_clips`` > 0) → (clips used,
        each epoch's mean loss)."""
        if self.sample is None:
            raise ValueError("no clips kept for information maximisation (keep_clips=0)")
        waveform, num_samples = self.sample.arrays(self.clip_samples)
        return len(waveform), maximise_information(
            self.model, waveform, num_samples, epochs=epochs, progress=progress,
            pseudo_label_weight=pseudo_label_weight, scope=scope,
            learning_rate=learning_rate, pseudo_labels=pseudo_labels)

    def abort(self) -> None:
        """Put the model back as it was (no statistics written)."""
        self._restore(assign=False)

    def _restore(self, assign: bool) -> None:
        self.stats.finish(assign=assign)
        for d, rate in zip(self.dropouts, self._rates):
            d.rate = rate


def adapt_batchnorm(model: keras.Model, batches: Iterable[Any],
                    min_clips: int = MIN_ADAPT_CLIPS, im_epochs: int = 0,
                    pseudo_label_weight: float = PSEUDO_LABEL_WEIGHT,
                    scope: str = "batchnorm", learning_rate: float = IM_LEARNING_RATE,
                    pseudo_labels: str = PSEUDO_LABELS[0]) -> int:
    """Adapt ``model``'s BatchNorm statistics (in place) to the clips of ``batches``; with
    ``im_epochs`` > 0 (single-label taggers) then its BatchNorm γ, β (``scope``) by
    :func:`maximise_information` (``pseudo_label_weight``: SHOT's β, ``pseudo_labels`` their
    assignment; ``learning_rate``) over
    (a sample of at most ``MAX_IM_CLIPS`` of) them.

    ``batches`` yields ``{"waveform": [B, S], "num_samples": [B]}`` dicts or ``(dict,
    labels)`` tuples (labels are not used), e.g. :func:`psla_tf.data.pipeline.
    make_eval_dataset`. Returns the number of clips. See the module doc.
    """
    if im_epochs > 0 and not is_single_label(model):
        raise ValueError("information maximisation needs a single-label tagger (--loss=ce)")
    if im_epochs > 0:
        adaptable_variables(model, scope)   # a wrong scope: refused before any change
    adapter = BatchNormAdapter(model, keep_clips=MAX_IM_CLIPS if im_epochs > 0 else 0)
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            adapter(np.asarray(x["waveform"]), np.asarray(x["num_samples"]))
    except BaseException:
        adapter.abort()
        raise
    clips = adapter.finish(min_clips)
    if im_epochs > 0:
        adapter.maximise_information(im_epochs, pseudo_label_weight=pseudo_label_weight,
                                     scope=scope, learning_rate=learning_rate,
                                     pseudo_labels=pseudo_labels)
    return clips
