"""CNN backbones on a 1-channel spectrogram image (paper Sec. III, Fig. 2, Table XIII).

``build_backbone`` returns a Keras functional model ``[B, mel, time, 1] → [B, F', T', D]``:

* ``efficientnet`` B0..B7 (``keras.applications.EfficientNetB{n}``, no top) — PSLA's model;
  B2 on ``[128, 1056, 1]`` gives ``[4, 33, 1408]``.
* ``mobilenet_v2`` (``keras.applications.MobileNetV2``) and ``resnet50``
  (``keras.applications.ResNet50``): the Table XIII baselines.
* ``cnn``: a plain VGG-style CNN in PANNs' CNN10 layout (Kong et al., 2020), four blocks of
  two 3×3 convolutions with BatchNorm and ReLU, then 2×2 average pooling; channels
  ``64, 128, 256, 512`` × ``width``. No ImageNet weights. 33 layers against B0's ~240:
  it traces in a fraction of EfficientNet's time (small-footprint models, quick experiments).

keras.applications' EfficientNet starts with ``Rescaling(1/255)`` and a ``Normalization``
layer that holds ImageNet's RGB statistics once ImageNet weights are loaded. Neither belongs
in front of a log-mel spectrogram, so the backbone starts at the stem's padding layer:
those layers are not part of the returned model at all.

ImageNet pretraining (Sec. III): ``pretrained="imagenet"`` (Keras' own download and cache) or
a path to a ``.h5`` / ``.weights.h5`` file of the 3-channel no-top model. Every layer's
weights are copied by name from the 3-channel model except the stem convolution, which takes
1 channel: randomly initialised as in the paper (``stem_init="random"``) or the sum of the
pretrained RGB kernels over the input-channel axis (``stem_init="rgb_sum"``).
"""
from __future__ import annotations

import os
from typing import Callable

import keras
import numpy as np

from psla_tf.errors import PretrainedWeightsError
from psla_tf.models.activations import swish_twin
from psla_tf.models.batchnorm import fused_twin
from psla_tf.models.pointwise import matmul_twin

__all__ = ["build_backbone", "build_cnn", "cnn_channels", "BACKBONES", "BACKBONE_INITS",
           "PretrainedWeightsError",
           "stem_layer_name", "backbone_channels", "stem_kernel_from_rgb", "torch_fan_in",
           "reinit_like_torch", "zero_init_residual"]

BACKBONES = ("efficientnet", "mobilenet_v2", "resnet50", "cnn")
_STEM = {"efficientnet": "stem_conv", "mobilenet_v2": "Conv1", "resnet50": "conv1_conv",
         "cnn": "block1_conv1"}
# first layer of the backbone proper (everything before it is image preprocessing)
_FIRST = {"efficientnet": "stem_conv_pad"}
_CHANNELS = {"mobilenet_v2": 1280, "resnet50": 2048}
_EFFNET_CHANNELS = (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560)
CNN_CHANNELS = (64, 128, 256, 512)     # PANNs CNN10's blocks at width 1
CNN_DROPOUT = 0.2                      # PANNs: dropout after every block's pooling
_RGB_SHAPE = (224, 224, 3)
# "auto": the reference's initialisation where it is known (efficientnet_pytorch builds its
# EfficientNet from torch.nn layers and keeps their default initialisation), else Keras'.
BACKBONE_INITS = ("auto", "pytorch", "keras")
# the BatchNorm that closes a residual block's branch, by the name of the block's Add layer
_RESIDUAL_BN = {"efficientnet": "_project_bn", "mobilenet_v2": "_project_BN",
                "resnet50": "_3_bn"}


def stem_layer_name(model: str) -> str:
    """Name of the backbone's first convolution (the one that takes 1 channel)."""
    _check_model(model)
    return _STEM[model]


def backbone_channels(model: str, eff_b: int = 2, width: float = 1.0) -> int:
    """D, the channel count of the backbone's output feature map."""
    _check_model(model)
    if model == "efficientnet":
        _check_b(eff_b)
        return _EFFNET_CHANNELS[eff_b]
    if model == "cnn":
        return cnn_channels(width)[-1]
    return _CHANNELS[model]


def cnn_channels(width: float = 1.0) -> tuple[int, ...]:
    """The ``cnn`` backbone's channels per block: PANNs CNN10's ``64, 128, 256, 512`` × width
    (rounded, at least 1)."""
    if not 0.0 < float(width) <= 8.0:
        raise ValueError(f"cnn width must be in (0, 8], got {width}")
    return tuple(max(1, int(round(c * float(width)))) for c in CNN_CHANNELS)


def build_cnn(input_shape: tuple[int, int, int], width: float = 1.0,
              name: str = "backbone") -> keras.Model:
    """``[B, mel, T, 1] → [B, mel // 16, T // 16, 512·width]``: PANNs' CNN10 feature extractor
    (4 × [3×3 conv (no bias) → BN → ReLU] × 2 → 2×2 average pooling → dropout 0.2).

    Kernels draw from Glorot-uniform, as PANNs' ``init_layer`` (Xavier uniform); BatchNorm
    starts at γ = 1, β = 0. Needs ``mel`` and ``T`` ≥ 16."""
    mel, frames, _ = input_shape
    if min(mel, frames) < 16:
        raise ValueError(f"the cnn backbone pools 4 times by 2: it needs mel bins and frames "
                         f">= 16, got input_shape {tuple(input_shape)}")
    inputs = keras.Input(tuple(input_shape), name="spectrogram")
    x = inputs
    for b, channels in enumerate(cnn_channels(width), start=1):
        for c in (1, 2):
            x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False,
                                    kernel_initializer="glorot_uniform",
                                    name=f"block{b}_conv{c}")(x)
            x = keras.layers.BatchNormalization(epsilon=1e-5, name=f"block{b}_bn{c}")(x)
            x = keras.layers.ReLU(name=f"block{b}_relu{c}")(x)
        x = keras.layers.AveragePooling2D(2, name=f"block{b}_pool")(x)
        x = keras.layers.Dropout(CNN_DROPOUT, name=f"block{b}_dropout")(x)
    return keras.Model(inputs, x, name=name)


def _check_model(model: str) -> None:
    if model not in BACKBONES:
        raise ValueError(f"model must be one of {BACKBONES}, got {model!r}")


def _check_b(eff_b: int) -> None:
    if int(eff_b) not in range(8):
        raise ValueError(f"eff_b must be 0..7 (EfficientNet-B0..B7), got {eff_b}")


def _application(model: str, eff_b: int) -> Callable[..., keras.Model]:
    """The keras.applications constructor for ``model``."""
    if model == "efficientnet":
        _check_b(eff_b)
        return getattr(keras.applications, f"EfficientNetB{int(eff_b)}")
    if model == "mobilenet_v2":
        return keras.applications.MobileNetV2
    return keras.applications.ResNet50


def _rgb_model(model: str, eff_b: int, pretrained: str) -> keras.Model:
    """The 3-channel no-top model holding the pretrained weights."""
    app = _application(model, eff_b)
    label = f"{app.__name__}(include_top=False, 3 channels)"
    if pretrained == "imagenet":
        try:
            return app(include_top=False, weights="imagenet", input_shape=_RGB_SHAPE)
        except Exception as e:  # download / cache failure: say what to do instead
            raise PretrainedWeightsError(
                f"could not obtain ImageNet weights for {label} through keras.applications "
                f"({type(e).__name__}: {e}). Keras downloads them to ~/.keras/models on first "
                f"use; without internet access, copy the keras-applications no-top .h5 file "
                f"there, or pass pretrained=PATH to a weights file of {label}, or "
                f"pretrained='none'.") from e
    path = os.fspath(pretrained)
    if not os.path.exists(path):
        raise PretrainedWeightsError(
            f"pretrained must be 'none', 'imagenet' or a path to a weights file of {label}; "
            f"{path!r} does not exist")
    rgb = app(include_top=False, weights=None, input_shape=_RGB_SHAPE)
    try:
        rgb.load_weights(path)
    except Exception as e:
        raise PretrainedWeightsError(
            f"weights file {path!r} does not match {label} "
            f"({type(e).__name__}: {e}); it must be saved with save_weights() from "
            f"keras.applications.{app.__name__}(include_top=False, input_shape=(H, W, 3))") from e
    return rgb


def _copy_weights(backbone: keras.Model, rgb: keras.Model, stem: str, stem_init: str,
                  source: str) -> None:
    """Copy every weight of ``rgb`` into ``backbone`` by layer name; the stem is random or
    the RGB sum. Raises PretrainedWeightsError on any mismatch."""
    rgb_layers = {layer.name: layer for layer in rgb.layers}
    used = set()
    for layer in backbone.layers:
        if not layer.weights:
            continue
        src = rgb_layers.get(layer.name)
        if src is None:
            raise PretrainedWeightsError(
                f"layer {layer.name!r} of the backbone has no counterpart in {source}")
        used.add(layer.name)
        values = src.get_weights()
        if layer.name == stem:
            if stem_init == "random":
                continue
            # rgb_sum: kernel [kh, kw, 3, out] -> [kh, kw, 1, out]; a bias stays as it is
            values = [stem_kernel_from_rgb(values[0])] + values[1:]
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [v.shape for v in values]:
            raise PretrainedWeightsError(
                f"layer {layer.name!r}: {source} has weights of shapes "
                f"{[v.shape for v in values]}, the backbone expects {shapes}")
        layer.set_weights(values)
    # weights the backbone did not take may only be the dropped image preprocessing
    for name, layer in rgb_layers.items():
        if layer.weights and name not in used and not isinstance(
                layer, keras.layers.Normalization):
            raise PretrainedWeightsError(
                f"{source} has weights for layer {name!r}, which the backbone lacks")


def build_backbone(model: str = "efficientnet", *, eff_b: int = 2,
                   input_shape: tuple[int, int, int] = (128, 1056, 1),
                   pretrained: str | os.PathLike = "none", stem_init: str = "random",
                   bn_momentum: float | None = None, init: str = "auto",
                   zero_residual: bool = True, width: float = 1.0,
                   fused_batchnorm: bool = True, pointwise_matmul: bool = True,
                   swish_saved_sigmoid: bool = True,
                   name: str = "backbone") -> keras.Model:
    """``[B, mel, time, 1] → [B, F', T', D]`` backbone (Sec. III), optionally ImageNet-pretrained.

    ``pretrained``: ``"none"``, ``"imagenet"`` or a path to weights of the 3-channel no-top
    keras.applications model. ``stem_init``: ``"random"`` (the paper) or ``"rgb_sum"``.
    ``bn_momentum``: BatchNormalization momentum of every BN layer (Keras convention; None
    keeps keras.applications' 0.99, which equals efficientnet_pytorch's PyTorch momentum 0.01).
    ``init``: random initialisation of the weights not taken from ``pretrained``: ``pytorch``
    (torch.nn's defaults, :func:`reinit_like_torch`), ``keras`` (keras.applications') or
    ``auto`` (pytorch for EfficientNet, the reference's efficientnet_pytorch; keras otherwise).
    ``zero_residual``: every residual block starts as the identity (:func:`zero_init_residual`;
    pretrained weights replace it).
    ``width``: channel multiplier of the ``cnn`` backbone (ignored by the others).
    ``fused_batchnorm``: BatchNorm layers train with one fused kernel
    (:class:`~psla_tf.models.batchnorm.FusedBatchNormalization`; same arithmetic, faster).
    ``pointwise_matmul``: 1×1 convolutions train as one matrix product
    (:class:`~psla_tf.models.pointwise.PointwiseConv2D`; same arithmetic, faster on CPU).
    ``swish_saved_sigmoid``: swish's gradient reuses the forward sigmoid
    (:class:`~psla_tf.models.activations.SwishActivation`; same derivative, faster).
    """
    _check_model(model)
    if stem_init not in ("random", "rgb_sum"):
        raise ValueError(f"stem_init must be 'random' or 'rgb_sum', got {stem_init!r}")
    pretrained = "none" if pretrained is None else pretrained
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = "none"
        if stem_init != "random":
            raise ValueError("stem_init='rgb_sum' needs pretrained weights "
                             "(pretrained='imagenet' or a weights file)")
    if init not in BACKBONE_INITS:
        raise ValueError(f"init must be one of {BACKBONE_INITS}, got {init!r}")
    if len(input_shape) != 3 or input_shape[-1] != 1:
        raise ValueError(f"input_shape must be (mel, time, 1), got {input_shape}")
    if model == "cnn":
        if pretrained != "none":
            raise PretrainedWeightsError(
                "--model=cnn has no ImageNet weights: pass --pretrained=none (or start from "
                "a trained psla_tf model with --init_from)")
        backbone = build_cnn(tuple(input_shape), width, name=name)
    else:
        app = _application(model, eff_b)
        full = app(include_top=False, weights=None, input_shape=tuple(input_shape))
        first = _FIRST.get(model)
        start = full.get_layer(first).input if first else full.inputs[0]
        backbone = keras.Model(start, full.outputs[0], name=name)
    backbone = keras.models.clone_model(   # same names and weights, faster training kernels
        backbone, clone_function=lambda layer: swish_twin(
            matmul_twin(fused_twin(layer, fused_batchnorm), pointwise_matmul),
            swish_saved_sigmoid))
    for layer in backbone.layers:   # no ImageNet preprocessing in front of a spectrogram
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            raise AssertionError(f"unexpected preprocessing layer {layer.name} in backbone")
    if bn_momentum is not None:
        if not 0.0 <= float(bn_momentum) < 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum}")
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = float(bn_momentum)
    if init == "pytorch" or (init == "auto" and model == "efficientnet"):
        reinit_like_torch(backbone)
    if zero_residual:
        zero_init_residual(backbone, model)
    if pretrained != "none":
        rgb = _rgb_model(model, eff_b, pretrained)
        source = ("ImageNet weights" if pretrained == "imagenet"
                  else f"weights file {os.fspath(pretrained)!r}")
        _copy_weights(backbone, rgb, _STEM[model], stem_init, source)
        del rgb
    return backbone


def torch_fan_in(layer: keras.layers.Layer) -> int:
    """fan_in as torch.nn computes it for the layer's PyTorch twin: ``in / groups · kh · kw``
    (a depthwise convolution has one input channel per group)."""
    shape = tuple(layer.kernel.shape)
    if isinstance(layer, keras.layers.DepthwiseConv2D):       # [kh, kw, C, multiplier]
        return int(np.prod(shape[:2]))
    if isinstance(layer, keras.layers.Conv2D):                 # [kh, kw, in / groups, out]
        return int(np.prod(shape[:3]))
    return int(shape[0])                                       # Dense [in, out]


def reinit_like_torch(model: keras.Model) -> int:
    """Re-draw every convolution / dense kernel and bias of ``model`` as torch.nn does by
    default — ``kaiming_uniform(a=√5)``, i.e. U(±1/√fan_in), and the bias U(±1/√fan_in) —
    which is how efficientnet_pytorch's ``EfficientNet.from_name`` (the reference's model
    from scratch, and its 1-channel stem under ImageNet weights) starts. BatchNorm keeps
    γ = 1, β = 0. Draws come from Keras' global seed. Returns the number of layers re-drawn.

    Keras' EfficientNet instead draws VarianceScaling(2, fan_out): on B0 its squeeze-excite
    kernels start ~12× and its projection kernels ~6× larger, which slows learning from
    scratch (docs/learning.md, "Initialisation")."""
    count = 0
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                  keras.layers.Dense)):
            continue
        bound = 1.0 / np.sqrt(torch_fan_in(layer))
        draw = keras.initializers.RandomUniform(-bound, bound)
        layer.kernel.assign(draw(tuple(layer.kernel.shape), dtype=layer.kernel.dtype))
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(draw(tuple(layer.bias.shape), dtype=layer.bias.dtype))
        count += 1
    return count


def zero_init_residual(backbone: keras.Model, model: str) -> int:
    """Start every residual block as the identity: γ = 0 in the BatchNorm that closes the
    block's residual branch ("zero γ", Goyal et al., 2017, Sec. 5.1), so at the start the
    block adds nothing to its input (in inference mode exactly; in training mode up to β,
    which starts at 0). Not in the reference, whose blocks start with γ = 1; from scratch it
    lets EfficientNet leave the class-prior plateau epochs sooner (docs/learning.md, "Residual
    blocks start as the identity"). Returns the number of blocks (B0: 9 of 16; ``cnn``: 0)."""
    suffix = _RESIDUAL_BN.get(model)
    if suffix is None:
        return 0
    names = {layer.name for layer in backbone.layers}
    count = 0
    for layer in backbone.layers:
        if layer.name.endswith("_add") and layer.name[:-len("_add")] + suffix in names:
            gamma = backbone.get_layer(layer.name[:-len("_add")] + suffix).gamma
            gamma.assign(np.zeros(tuple(gamma.shape), dtype=gamma.dtype))
            count += 1
    return count


def stem_kernel_from_rgb(rgb_kernel: np.ndarray) -> np.ndarray:
    """The ``rgb_sum`` stem: ``[kh, kw, 3, out]`` → ``[kh, kw, 1, out]`` by summing channels."""
    return np.asarray(rgb_kernel).sum(axis=2, keepdims=True)
