"""The PSLA tagger: waveform → fbank → CNN → attention pooling → scores (paper Fig. 2).

``build_tagger`` returns a Keras functional model::

    {"waveform": [B, S] float32, "num_samples": [B] int32}
      → AudioFrontend ("frontend": mean removal, Kaldi fbank, pad/cut, [train] masking,
        normalisation)                                                    [B, T, 128]
      → "classifier" (``build_classifier``): transpose to [B, 128 mel, T, 1] → backbone
        → mean over frequency [B, T', D] → pooling                        [B, C]
      → "scores" float32

``build_classifier`` alone maps a normalised fbank ``[B, T, 128]`` (time, mel: the
reference's layout) to scores, for pipelines that compute features in tf.data and for
importing PyTorch checkpoints. ``embedding_model`` gives the pooled backbone features
``[B, D]`` (mean over frequency and time of the backbone output).

Mixed precision: under a ``mixed_float16`` / ``mixed_bfloat16`` global policy the backbone
runs in half precision; the front end, the pooling head and the outputs stay float32.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import keras

from psla_tf import params
from psla_tf.models.backbones import BACKBONES, build_backbone
from psla_tf.models.frontend import AudioFrontend
from psla_tf.models.pooling import make_pooling

if TYPE_CHECKING:
    from psla_tf.config import TrainConfig

__all__ = ["build_tagger", "build_model", "build_classifier", "embedding_model",
           "classifier_with_embedding", "scores_and_embedding", "SingleLabelScores"]


@keras.saving.register_keras_serializable(package="psla_tf")
class FrequencyMean(keras.layers.Layer):
    """Mean over the frequency axis of ``[B, F', T', D]`` → ``[B, T', D]`` (the reference's
    ``AvgPool2d((4, 1))`` over the 4 frequency rows), computed in float32."""

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, x):
        return keras.ops.mean(keras.ops.cast(x, "float32"), axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + tuple(input_shape[2:])

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        return config


@keras.saving.register_keras_serializable(package="psla_tf")
class SingleLabelScores(keras.layers.Layer):
    """Single-label output (``--loss=ce``): pooled scores ``p`` ``[B, C]`` → class
    probabilities ``[B, C]`` that sum to 1.

    ``form="scores"`` (what :func:`build_tagger` builds): ``softmax(log p)`` = ``p / Σ_c p_c``
    (p floored at 1e-7), defined for every p > 0 — multi-head pooling's scores exceed 1 (its
    head weights need not sum to 1) — so every score keeps its gradient.
    ``form="logit"`` (the default only so that models saved before keep their outputs):
    softmax over ``log p - log(1 - p)``, p clamped to [1e-7, 1 - 1e-7]; the clamp stops the
    gradient of every score at or above 1 - 1e-7, and a run whose wrong classes' scores pass
    it cannot push them down again (docs/decisions.md). The reference applies PyTorch's
    CrossEntropyLoss to the sigmoid scores themselves, which caps the top class's softmax
    probability at e / (e + C - 1).
    """

    FORMS = ("scores", "logit")

    def __init__(self, form: str = "logit", **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}, got {form!r}")
        self.form = form

    def call(self, scores):
        p = keras.ops.cast(scores, "float32")
        if self.form == "scores":
            return keras.ops.softmax(keras.ops.log(keras.ops.maximum(p, params.CLAMP_EPS)),
                                     axis=-1)
        p = keras.ops.clip(p, params.CLAMP_EPS, 1.0 - params.CLAMP_EPS)
        return keras.ops.softmax(keras.ops.log(p) - keras.ops.log1p(-p), axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config["form"] = self.form
        return config


def build_classifier(num_classes: int, *, model: str = "efficientnet", eff_b: int = 2,
                     att_head: int = 4, pretrained: str | os.PathLike = "none",
                     stem_init: str = "random", target_length: int = params.TARGET_LENGTH,
                     num_mel_bins: int = params.NUM_MEL_BINS, bn_momentum: float | None = None,
                     backbone_init: str = "auto", zero_init_residual: bool = True,
                     cnn_width: float = 1.0, fused_batchnorm: bool = True,
                     pointwise_matmul: bool = True, swish_saved_sigmoid: bool = True,
                     name: str = "classifier") -> keras.Model:
    """Normalised fbank ``[B, target_length, num_mel_bins]`` → scores ``[B, num_classes]``.

    ``model``: ``efficientnet`` (B``eff_b``, pooling by ``att_head``: 0 mean, 1 single head,
    > 1 multi-head), ``resnet50`` (pooling by ``att_head``; Table XIII uses 1 head) or
    ``mobilenet_v2`` (Table XIII: global average pooling, linear classifier, sigmoid;
    ``att_head`` is ignored) or ``cnn`` (PANNs' CNN10 layout, channels × ``cnn_width``;
    pooling by ``att_head``). ``backbone_init``: see :func:`build_backbone`'s ``init``;
    ``zero_init_residual``: its ``zero_residual``; ``fused_batchnorm``,
    ``pointwise_matmul`` and ``swish_saved_sigmoid``: its own.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if model not in BACKBONES:
        raise ValueError(f"model must be one of {BACKBONES}, got {model!r}")
    fbank = keras.Input((target_length, num_mel_bins), name="fbank", dtype="float32")
    # [B, T, mel] -> [B, mel, T] -> [B, mel, T, 1]: the image the reference feeds the CNN
    x = keras.layers.Permute((2, 1), name="mel_time")(fbank)
    x = keras.layers.Reshape((num_mel_bins, target_length, 1), name="add_channel")(x)
    backbone = build_backbone(model, eff_b=eff_b, input_shape=(num_mel_bins, target_length, 1),
                              pretrained=pretrained, stem_init=stem_init,
                              bn_momentum=bn_momentum, init=backbone_init,
                              zero_residual=zero_init_residual, width=cnn_width,
                              fused_batchnorm=fused_batchnorm,
                              pointwise_matmul=pointwise_matmul,
                              swish_saved_sigmoid=swish_saved_sigmoid, name="backbone")
    features = backbone(x)                                   # [B, F', T', D]
    if model == "mobilenet_v2":
        pooled = keras.layers.GlobalAveragePooling2D(name="global_pool", dtype="float32")(
            features)
        scores = keras.layers.Dense(num_classes, activation="sigmoid", name="pooling",
                                    dtype="float32")(pooled)
    else:
        x = FrequencyMean(name="frequency_mean")(features)  # [B, T', D]
        scores = make_pooling(num_classes, att_head, name="pooling")(x)
    return keras.Model(fbank, scores, name=name)


def build_tagger(num_classes: int, *, model: str = "efficientnet", eff_b: int = 2,
                 att_head: int = 4, pretrained: str | os.PathLike = "none",
                 stem_init: str = "random", target_length: int = params.TARGET_LENGTH,
                 num_mel_bins: int = params.NUM_MEL_BINS, freqm: int = params.FREQM,
                 timem: int = params.TIMEM, dataset_mean: float = params.DATASET_MEAN,
                 dataset_std: float = params.DATASET_STD, seed: int | None = None,
                 bn_momentum: float | None = None, single_label: bool = False,
                 backbone_init: str = "auto", zero_init_residual: bool = True,
                 fbank_dft: str = "auto",
                 clip_norm: str = "none", num_ceps: int = 0, high_freq: float = 0.0,
                 cnn_width: float = 1.0, time_shift: int = 0, trim_onset_db: float = 0.0,
                 vtlp: float = 0.0, fused_batchnorm: bool = True,
                 pointwise_matmul: bool = True, swish_saved_sigmoid: bool = True,
                 name: str = "psla_tagger") -> keras.Model:
    """The full PSLA model, waveform in, scores out (Fig. 2; masking of Alg. 1 inside).

    Inputs ``{"waveform": [B, S] float32, "num_samples": [B] int32}`` (S may vary between
    batches; samples past ``num_samples`` are padding); output ``scores`` ``[B, C]``:
    independent sigmoid scores, or with ``single_label`` class probabilities summing to 1
    (:class:`SingleLabelScores`, for ``--loss=ce``). ``fbank_dft``: the front end's DFT
    (:class:`AudioFrontend` ``dft``; ``"auto"`` resolves where the model is traced).
    ``clip_norm``: the front end's per-clip normalisation (``none`` / ``cmn`` / ``cmvn``);
    ``num_ceps``: its cepstral smoothing of each frame (0 = off); ``high_freq``: the upper
    edge of its mel banks in Hz (0 = Nyquist, the paper); ``time_shift``: its random delay
    of up to that many frames in training (0 = off, the paper); ``trim_onset_db``: its removal
    of each clip's leading frames that far below its loudest (0 = off, the paper); ``vtlp``:
    its vocal-tract length perturbation in training, factors U[1 − x, 1 + x] (0 = off, the
    paper). ``fused_batchnorm``: the backbone's BatchNorm trains with one fused kernel;
    ``pointwise_matmul``: its 1×1 convolutions train as matrix products;
    ``swish_saved_sigmoid``: its swish's gradient reuses the forward sigmoid
    (:func:`build_backbone`).
    """
    waveform = keras.Input((None,), name="waveform", dtype="float32")
    num_samples = keras.Input((), name="num_samples", dtype="int32")
    frontend = AudioFrontend(target_length, num_mel_bins, freqm, timem, dataset_mean,
                             dataset_std, seed=seed, dft=fbank_dft, clip_norm=clip_norm,
                             num_ceps=num_ceps, high_freq=high_freq, time_shift=time_shift,
                             trim_onset_db=trim_onset_db, vtlp=vtlp, name="frontend")
    fbank = frontend(waveform, num_samples)
    classifier = build_classifier(num_classes, model=model, eff_b=eff_b, att_head=att_head,
                                  pretrained=pretrained, stem_init=stem_init,
                                  target_length=target_length, num_mel_bins=num_mel_bins,
                                  bn_momentum=bn_momentum, backbone_init=backbone_init,
                                  zero_init_residual=zero_init_residual,
                                  cnn_width=cnn_width, fused_batchnorm=fused_batchnorm,
                                  pointwise_matmul=pointwise_matmul,
                                  swish_saved_sigmoid=swish_saved_sigmoid, name="classifier")
    scores = classifier(fbank)
    if single_label:
        scores = SingleLabelScores(form="scores", name="single_label")(scores)
    scores = keras.layers.Activation("linear", name="scores", dtype="float32")(scores)
    return keras.Model({"waveform": waveform, "num_samples": num_samples}, scores, name=name)


def build_model(cfg: "TrainConfig", num_classes: int) -> keras.Model:
    """:func:`build_tagger` with a run's settings (a :class:`psla_tf.config.TrainConfig`)."""
    return build_tagger(num_classes, model=cfg.model, eff_b=cfg.eff_b, att_head=cfg.att_head,
                        pretrained=cfg.pretrained, stem_init=cfg.stem_init,
                        bn_momentum=cfg.bn_momentum, backbone_init=cfg.backbone_init,
                        zero_init_residual=cfg.zero_init_residual,
                        target_length=cfg.target_length, freqm=cfg.freqm, timem=cfg.timem,
                        dataset_mean=cfg.dataset_mean, dataset_std=cfg.dataset_std,
                        seed=cfg.seed, single_label=cfg.loss == "ce", fbank_dft=cfg.fbank_dft,
                        clip_norm=cfg.clip_norm, num_ceps=cfg.num_ceps, high_freq=cfg.high_freq,
                        num_mel_bins=cfg.num_mel_bins,
                        cnn_width=cfg.cnn_width, time_shift=cfg.time_shift,
                        trim_onset_db=cfg.trim_onset_db, vtlp=cfg.vtlp,
                        fused_batchnorm=cfg.fused_batchnorm,
                        pointwise_matmul=cfg.pointwise_matmul,
                        swish_saved_sigmoid=cfg.swish_saved_sigmoid)


def classifier_with_embedding(classifier: keras.Model) -> keras.Model:
    """``fbank [B, T, mel] → [scores [B, C], embedding [B, D]]``, sharing ``classifier``'s
    layers and graph (no second backbone pass): the embedding is the mean over frequency and
    time of the tensor the backbone hands to the pooling head. ValueError for a model that
    is not from :func:`build_classifier`."""
    names = {layer.name for layer in classifier.layers}
    head = next((n for n in ("frequency_mean", "global_pool") if n in names), None)
    if head is None or "backbone" not in names:
        raise ValueError(f"classifier {classifier.name!r} has no backbone → pooling structure "
                         "(expected a model from psla_tf.models.tagger.build_classifier)")
    embedding = keras.layers.GlobalAveragePooling2D(name="embedding", dtype="float32")(
        classifier.get_layer(head).input)            # the backbone output in this graph
    return keras.Model(classifier.inputs, [classifier.outputs[0], embedding],
                       name=f"{classifier.name}_with_embedding")


def scores_and_embedding(model: keras.Model) -> keras.Model:
    """A model sharing tagger ``model``'s weights that returns ``[scores [B, C], embedding
    [B, D]]`` from one forward pass (inputs as ``model``'s): the embedding is the pooled
    backbone output the scores are computed from, as :func:`embedding_model`'s."""
    waveform = keras.Input((None,), name="waveform", dtype="float32")
    num_samples = keras.Input((), name="num_samples", dtype="int32")
    fbank = model.get_layer("frontend")(waveform, num_samples)
    scores, embedding = classifier_with_embedding(model.get_layer("classifier"))(fbank)
    names = [layer.name for layer in model.layers]
    for layer in model.layers[names.index("classifier") + 1:]:   # single_label, scores
        scores = layer(scores)
    return keras.Model({"waveform": waveform, "num_samples": num_samples},
                       [scores, embedding], name=f"{model.name}_scores_embedding")


def embedding_model(model: keras.Model) -> keras.Model:
    """A model sharing ``model``'s weights whose output is the embedding ``[B, D]``: the
    mean over frequency and time of the backbone output.

    ``model`` is a tagger (inputs waveform / num_samples) or a classifier (input fbank).
    """
    names = {layer.name for layer in model.layers}
    if "classifier" in names and "frontend" in names:
        both = scores_and_embedding(model)
        return keras.Model(both.input, both.outputs[1], name=f"{model.name}_embedding")
    if "backbone" in names:
        both = classifier_with_embedding(model)
        return keras.Model(both.input, both.outputs[1], name=f"{model.name}_embedding")
    raise ValueError(f"model {model.name!r} is neither a tagger from build_tagger nor a "
                     f"classifier from build_classifier")
