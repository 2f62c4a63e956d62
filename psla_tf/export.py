"""Deployment: a self-contained TF Serving SavedModel that takes raw 16-kHz audio.

``export_saved_model`` writes ``DIR/<version>/`` (the layout TF Serving watches) holding the
whole waveform → scores graph of a trained tagger (front end of paper Sec. II-C, CNN,
attention pooling of Fig. 2) -- or of a checkpoint ensemble (Sec. VI) -- as plain TF ops, so
``tf.saved_model.load`` / ``saved_model_cli`` / TF Serving need neither Python nor the
psla_tf custom layers. Signatures (see docs/deployment.md, "SavedModel")::

    serving_default(waveform float32 [B, S])                    → scores [B, C], embeddings [B, D]
    serving_lengths(waveform [B, S], num_samples int32 [B])     → same (zero-padded batch)
    class_names()                                               → mids [C], names [C]
    class_map_path()                                            → the class_map.csv asset path
    metadata()                                                  → sample_rate, clip_samples

``S`` may be anything from 400 samples (one 25-ms frame) on. Shorter clips than the training
length ``clip_samples`` are zero-padded with ``num_samples`` marking the valid part (exactly as
the training pipeline pads); longer clips are cut to ``clip_samples``, unless the model was
exported ``windowed``: then windows of ``window`` samples every ``hop`` samples (the last one
may be shorter, as in :mod:`psla_tf.inference`) are scored and pooled (max for scores, mean for
embeddings). ``embeddings`` are the pooled backbone features (mean over frequency and time);
for an ensemble the members' embeddings are concatenated.

Scores are sigmoid outputs per attention head summed with learned weights (as the reference
does), so with several heads a score can exceed 1; ``clip_scores=True`` clips to [0, 1].

``load_saved_model`` gives a small Python wrapper (``ServingTagger``) used by the tools.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import shutil
import tempfile
from typing import Sequence

import numpy as np
import tensorflow as tf
import keras

from psla_tf import params
from psla_tf.errors import ExportError

__all__ = ["ExportError", "ExportSpec", "ScoringModel", "scoring_model", "export_saved_model",
           "load_saved_model", "ServingTagger", "find_version_dir", "CLASS_MAP_ASSET",
           "default_clip_samples"]

CLASS_MAP_ASSET = "class_map.csv"


# ----------------------------------------------------------------------------- model parts
def _dual_classifier(classifier: keras.Model) -> keras.Model:
    """``classifier`` with a second output, the pooled backbone features ``[B, D]``
    (:func:`psla_tf.models.tagger.classifier_with_embedding`); ExportError if it has none."""
    from psla_tf.models.tagger import classifier_with_embedding
    try:
        return classifier_with_embedding(classifier)
    except ValueError as e:
        raise ExportError(str(e)) from None


def _is_tagger(model: keras.Model) -> bool:
    names = {layer.name for layer in model.layers}
    return {"frontend", "classifier"} <= names


def _members(model: keras.Model) -> list[keras.Model]:
    """The taggers whose scores ``model`` outputs: itself, or an ensemble's members."""
    if _is_tagger(model):
        return [model]
    members = [layer for layer in model.layers if re.fullmatch(r"member_\d+", layer.name)]
    members.sort(key=lambda layer: int(layer.name.split("_")[1]))
    if members and all(isinstance(m, keras.Model) and _is_tagger(m) for m in members):
        return members
    raise ExportError(f"model {model.name!r} is neither a psla_tf tagger (layers 'frontend' and "
                      "'classifier') nor an ensemble of taggers (sub-models member_0, member_1, …)")


class ScoringModel:
    """``(waveform [B, S], num_samples [B]) → (scores [B, C], embeddings [B, D])`` for a
    tagger or an ensemble (mean of the members' scores, concatenated embeddings), in
    inference mode, float32 out whatever the training dtype policy was.

    A plain Python object on purpose: a SavedModel whose root tracks Keras 3 models as
    children saves fine but fails in the TF1-style loaders of TF Serving and
    ``saved_model_cli run`` ("Could not find variable …", tensorflow/tensorflow#72963); the
    export root tracks only the variables (as keras.export.ExportArchive does)."""

    def __init__(self, model: keras.Model, clip_scores: bool = False):
        members = _members(model)
        self.frontends = [m.get_layer("frontend") for m in members]
        self.classifiers = [_dual_classifier(m.get_layer("classifier")) for m in members]
        # --loss=ce taggers end in SingleLabelScores (softmax): keep it in the export
        self.single_label = [next((layer for layer in m.layers if layer.name == "single_label"),
                                  None) for m in members]
        self.model = model
        self.clip_scores = bool(clip_scores)
        self.target_length = int(self.frontends[0].target_length)
        self.num_classes = int(self.classifiers[0].outputs[0].shape[-1])
        self.embedding_size = int(sum(c.outputs[1].shape[-1] for c in self.classifiers))

    @property
    def variables(self) -> list:
        """The tf.Variables of the layers :meth:`__call__` uses, each once."""
        seen, out = set(), []
        for layer in [*self.frontends, *self.classifiers, *filter(None, self.single_label)]:
            for v in layer.variables:
                tv = getattr(v, "value", v)          # the tf.Variable behind a Keras variable
                if id(tv) not in seen:
                    seen.add(id(tv))
                    out.append(tv)
        return out

    def __call__(self, waveform, num_samples):
        from psla_tf.features import forced_dft
        scores, embs = [], []
        for frontend, classifier, head in zip(self.frontends, self.classifiers,
                                              self.single_label):
            with forced_dft("matmul"):   # exports: the folded-matmul front end (TFLite, ONNX)
                fbank = frontend(waveform, num_samples, training=False)
            s, e = classifier(fbank, training=False)
            if head is not None:
                s = head(s)
            scores.append(tf.cast(s, tf.float32))
            embs.append(tf.cast(e, tf.float32))
        s = scores[0] if len(scores) == 1 else tf.add_n(scores) / float(len(scores))
        e = embs[0] if len(embs) == 1 else tf.concat(embs, axis=-1)
        if self.clip_scores:
            s = tf.clip_by_value(s, 0.0, 1.0)
        return s, e


def scoring_model(model: keras.Model, clip_scores: bool = False) -> ScoringModel:
    return ScoringModel(model, clip_scores)


def default_clip_samples(model: keras.Model) -> int:
    """The training input length implied by the model: enough samples for exactly
    ``target_length`` frames, (T - 1) · 160 + 400 (what main.py uses by default)."""
    t = int(_members(model)[0].get_layer("frontend").target_length)
    return (t - 1) * params.FRAME_SHIFT + params.FRAME_LENGTH


@dataclasses.dataclass
class ExportSpec:
    """How raw audio of any length is fed to the model (see the module docstring)."""
    clip_samples: int
    windowed: bool = False
    window: int = 0         # samples per window (windowed only; default clip_samples)
    hop: int = 0            # samples between window starts (default window // 2)

    def __post_init__(self):
        if self.clip_samples < params.FRAME_LENGTH:
            raise ExportError(f"clip_samples must be >= {params.FRAME_LENGTH}, "
                              f"got {self.clip_samples}")
        if self.windowed:
            self.window = int(self.window or self.clip_samples)
            self.hop = int(self.hop or max(1, self.window // 2))
            if self.window < params.FRAME_LENGTH or self.hop < 1:
                raise ExportError(f"window must be >= {params.FRAME_LENGTH} samples and hop "
                                  f">= 1, got {self.window}, {self.hop}")


def _fit_to_clip(waveform, num_samples, clip_samples: int):
    """Cut to / zero-pad to ``clip_samples`` (training's _pad_or_cut, batched)."""
    w = waveform[:, :clip_samples]
    pad = tf.maximum(clip_samples - tf.shape(w)[1], 0)
    w = tf.pad(w, [[0, 0], [0, pad]])
    w = tf.ensure_shape(w, [None, clip_samples]) if w.shape.rank == 2 else w
    n = tf.minimum(tf.cast(num_samples, tf.int32), clip_samples)
    return w, n


def serve(scorer: ScoringModel, spec: ExportSpec, waveform, num_samples):
    """The exported computation: raw audio ``[B, S]`` + valid lengths → (scores, embeddings)."""
    waveform = tf.cast(waveform, tf.float32)
    num_samples = tf.minimum(tf.cast(num_samples, tf.int32), tf.shape(waveform)[1])
    if not spec.windowed:
        w, n = _fit_to_clip(waveform, num_samples, spec.clip_samples)
        return scorer(w, n)
    window, hop = spec.window, spec.hop
    batch = tf.shape(waveform)[0]
    total = tf.shape(waveform)[1]
    # windows 0, hop, 2·hop, … until one reaches the end (inference.window_starts)
    count = 1 + (tf.maximum(total - window, 0) + hop - 1) // hop
    padded = tf.pad(waveform, [[0, 0], [0, (count - 1) * hop + window - total]])
    frames = tf.signal.frame(padded, window, hop, axis=1)          # [B, W, window]
    starts = tf.range(count) * hop                                  # [W]
    n_w = tf.clip_by_value(num_samples[:, None] - starts[None, :], 0, window)   # [B, W]
    per_clip = 1 + (tf.maximum(num_samples - window, 0) + hop - 1) // hop        # [B]
    valid = tf.range(count)[None, :] < per_clip[:, None]                         # [B, W]
    flat_w = tf.reshape(frames, [-1, window])
    w, n = _fit_to_clip(flat_w, tf.reshape(n_w, [-1]), spec.clip_samples)
    s, e = scorer(w, n)
    s = tf.reshape(s, [batch, count, scorer.num_classes])
    e = tf.reshape(e, [batch, count, scorer.embedding_size])
    s = tf.reduce_max(tf.where(valid[:, :, None], s, tf.fill(tf.shape(s), -np.inf)), axis=1)
    vf = tf.cast(valid, tf.float32)[:, :, None]
    e = tf.reduce_sum(e * vf, axis=1) / tf.reduce_sum(vf, axis=1)
    return s, e


# ----------------------------------------------------------------------------- SavedModel
def _class_map_text(mids: Sequence[str], names: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "mid", "display_name"])
    for i, (m, n) in enumerate(zip(mids, names)):
        w.writerow([i, m, n])
    return buf.getvalue()


class _ServingModule(tf.Module):
    def __init__(self, scorer: ScoringModel, spec: ExportSpec, class_map: str):
        super().__init__(name="psla_serving")
        self.scorer = scorer                       # plain object: not tracked (see ScoringModel)
        self.spec = spec
        self.class_map = tf.saved_model.Asset(class_map)
        self.sample_rate = tf.constant(params.SAMPLE_RATE, tf.int32)
        self.clip_samples = tf.constant(spec.clip_samples, tf.int32)

    def _outputs(self, waveform, num_samples):
        tf.debugging.assert_greater_equal(
            tf.shape(waveform)[1], params.FRAME_LENGTH,
            message=f"waveform must have at least {params.FRAME_LENGTH} samples (25 ms at "
                    f"{params.SAMPLE_RATE} Hz)")
        tf.debugging.assert_non_negative(num_samples, message="num_samples must be >= 0")
        s, e = serve(self.scorer, self.spec, waveform, num_samples)
        return {"scores": tf.identity(s, name="scores"),
                "embeddings": tf.identity(e, name="embeddings")}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="waveform")],
                 autograph=False)
    def serving_default(self, waveform):
        n = tf.fill([tf.shape(waveform)[0]], tf.shape(waveform)[1])
        return self.serving_lengths(waveform, n)   # a call of that function: traced once

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="waveform"),
                                  tf.TensorSpec([None], tf.int32, name="num_samples")],
                 autograph=False)
    def serving_lengths(self, waveform, num_samples):
        return self._outputs(waveform, num_samples)

    @tf.function(input_signature=[], autograph=False)
    def class_map_path(self):
        return {"class_map_path": self.class_map.asset_path}

    @tf.function(input_signature=[], autograph=False)
    def class_names(self):
        text = tf.strings.regex_replace(tf.io.read_file(self.class_map.asset_path), "\r", "")
        lines = tf.strings.split(tf.strings.strip(text), "\n")[1:]   # skip the header
        _, mids, names = tf.io.decode_csv(lines, record_defaults=[[0], [""], [""]])
        return {"mids": mids, "names": names}

    @tf.function(input_signature=[], autograph=False)
    def metadata(self):
        return {"sample_rate": tf.identity(self.sample_rate),
                "clip_samples": tf.identity(self.clip_samples)}


def export_saved_model(model: keras.Model, saved_model_dir: str, mids: Sequence[str],
                       names: Sequence[str], *, version: int = 1,
                       clip_samples: int | None = None, windowed: bool = False,
                       window: int = 0, hop: int = 0, clip_scores: bool = False,
                       overwrite: bool = False) -> str:
    """Write ``saved_model_dir/<version>/`` for TF Serving; returns that path.

    The version folder is written under a temporary name and renamed when complete, so TF
    Serving never sees a half-written version and an interrupted export leaves nothing behind.
    """
    if int(version) < 0:
        raise ExportError(f"version must be a non-negative integer, got {version}")
    scorer = ScoringModel(model, clip_scores)
    if len(mids) != scorer.num_classes or len(names) != len(mids):
        raise ExportError(f"the vocabulary has {len(mids)} classes, the model "
                          f"{scorer.num_classes} outputs")
    spec = ExportSpec(int(clip_samples or default_clip_samples(model)), windowed, window, hop)
    out = os.path.join(saved_model_dir, str(int(version)))
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out} already exists (choose another --version or --overwrite)")
    os.makedirs(saved_model_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{int(version)}.tmp-", dir=saved_model_dir)
    try:
        os.makedirs(os.path.join(tmp, "src"))
        map_file = os.path.join(tmp, "src", CLASS_MAP_ASSET)   # copied as assets/class_map.csv
        with open(map_file, "w", encoding="utf-8", newline="") as f:
            f.write(_class_map_text(mids, names))
        module = _ServingModule(scorer, spec, map_file)
        # tf.saved_model.save traces the signatures itself (a function traced before, outside
        # its save context, is another cache key and would be traced twice)
        signatures = {name: getattr(module, name) for name in (
            "serving_default", "serving_lengths", "class_names", "class_map_path", "metadata")}
        # track the variables themselves (deduplicated), as keras.export.ExportArchive does:
        # TF Serving's loader restores these
        module.all_variables = scorer.variables
        target = os.path.join(tmp, "model")
        # (custom gradients stay saved, as by default: without them every load warns and a
        # gradient through the loaded model fails, e.g. at each swish of an EfficientNet)
        tf.saved_model.save(module, target, signatures=signatures)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(target, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- loading
def find_version_dir(path: str) -> str:
    """``path`` itself if it is a SavedModel, else its highest numeric version folder."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    if os.path.isdir(path):
        versions = [d for d in os.listdir(path) if d.isdigit()
                    and os.path.exists(os.path.join(path, d, "saved_model.pb"))]
        if versions:
            return os.path.join(path, max(versions, key=int))
    raise ExportError(f"{path!r} is neither a SavedModel nor a folder of numbered SavedModel "
                      "versions (write one with tools/export.py --saved_model_dir)")


class ServingTagger:
    """An exported psla_tf SavedModel, called from Python (no psla_tf layers needed).

    ``tagger(waveform [B, S] float32, num_samples [B] int32)`` → ``{"scores": [B, C],
    "embeddings": [B, D]}`` (NumPy); ``mids``, ``names``, ``sample_rate``, ``clip_samples``.
    """

    def __init__(self, path: str):
        self.path = find_version_dir(path)
        try:
            self._loaded = tf.saved_model.load(self.path)
        except Exception as e:
            raise ExportError(f"could not load SavedModel {self.path!r}: {type(e).__name__}: "
                              f"{e}") from e
        sigs = self._loaded.signatures
        missing = {"serving_lengths", "class_names", "metadata"} - set(sigs)
        if missing:
            raise ExportError(f"{self.path!r} lacks the signatures {sorted(missing)} (not a "
                              "psla_tf export)")
        self._serve = sigs["serving_lengths"]
        cn = sigs["class_names"]()
        self.mids = [m.decode("utf-8") for m in cn["mids"].numpy()]
        self.names = [n.decode("utf-8") for n in cn["names"].numpy()]
        md = sigs["metadata"]()
        self.sample_rate = int(md["sample_rate"].numpy())
        self.clip_samples = int(md["clip_samples"].numpy())

    def __call__(self, waveform: np.ndarray, num_samples: np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
        w = np.asarray(waveform, np.float32)
        if w.ndim == 1:
            w = w[None]
        if num_samples is None:
            num_samples = np.full([w.shape[0]], w.shape[1], np.int32)
        out = self._serve(waveform=tf.constant(w),
                          num_samples=tf.constant(np.asarray(num_samples, np.int32)))
        return {"scores": out["scores"].numpy(), "embeddings": out["embeddings"].numpy()}


def load_saved_model(path: str) -> ServingTagger:
    """Load ``DIR`` (its highest version) or ``DIR/<version>`` written by export_saved_model."""
    return ServingTagger(path)
