"""Import the reference's released PyTorch checkpoints (PSLA ``EffNetAttention`` state dicts).

The paper's authors released their trained models (EfficientNet-B2 + 4-head attention
pooling, Fig. 2; AudioSet mAP up to 0.444 single, FSD50K) as PyTorch ``state_dict`` files.
The reference model (``src/models/Models.py``) is::

    effnet    = efficientnet_pytorch.EfficientNet.from_name('efficientnet-b{b}', in_channels=1)
    effnet._fc = Identity()
    attention = MHeadAttention (head_num > 1; always 4 heads), Attention (1), MeanPooling (0)
    forward(x [B, T, 128]): [B, 1, 128, T] → effnet.extract_features → AvgPool2d((4, 1))
                            → [B, D, T', 1] → attention → scores [B, C]

which is psla_tf's ``build_tagger`` / ``build_classifier`` (same input layout, same pooling
heads, BN eps 1e-3) up to one difference: efficientnet_pytorch's ``from_name`` builds every
convolution with ``Conv2dStaticSamePadding`` for the model's nominal ImageNet image size
(224 px for B0, 260 px for B2, ...), so the padding around each stride-2 convolution is the
TF "same" padding *of that image size*, whatever the spectrogram's size. Keras' EfficientNet
pads for the actual input size; for B2 the two differ at ``block3a``, ``block4a`` and
``block6a`` (e.g. (2, 2) instead of (1, 2)). ``with_reference_padding`` rebuilds a model with
the reference's paddings, so an imported model computes the reference's function.

Tensor mapping (``module.`` — DataParallel — prefix optional; see docs/checkpoint_import.md for the table):
``effnet._conv_stem`` → ``stem_conv``, ``effnet._bn0`` → ``stem_bn``,
``effnet._blocks.N._{expand_conv, bn0, depthwise_conv, bn1, se_reduce, se_expand,
project_conv, bn2}`` → ``block{S}{l}_{expand_conv, expand_bn, dwconv, bn, se_reduce,
se_expand, project_conv, project_bn}`` (block N is the N-th Keras block in stage order),
``effnet._conv_head`` / ``_bn1`` → ``top_conv`` / ``top_bn``, ``attention.{att,cla}[.h]`` →
``pooling`` ``{att,cla}_kernel[h]`` / ``_bias[h]``, ``attention.head_weight`` →
``pooling/head_weight``. Conv kernels OIHW → HWIO, depthwise ``[C, 1, k, k]`` → ``[k, k, C,
1]``, 1x1 head convs ``[C, D, 1, 1]`` → ``[D, C]``; BatchNorm weight / bias / running_mean /
running_var → gamma / beta / moving_mean / moving_variance; ``num_batches_tracked`` is a
training counter and is not imported.

Reading ``.pth`` files needs torch (``requirements-import.txt``); nothing else here does.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Mapping

import keras
import numpy as np

from psla_tf import params
from psla_tf.errors import CheckpointImportError

__all__ = ["CheckpointImportError", "REFERENCE_IMAGE_SIZE", "TensorMapping", "read_state_dict",
           "strip_module_prefix", "infer_architecture", "describe", "reference_padding",
           "with_reference_padding", "build_reference_tagger", "tensor_mapping",
           "load_state_dict", "import_checkpoint"]

# efficientnet_pytorch.utils.efficientnet_params: the image size each B-variant's static
# "same" padding is computed for
REFERENCE_IMAGE_SIZE = (224, 240, 260, 300, 380, 456, 528, 600)
# efficientnet_pytorch block counts (len(model._blocks)) and the reference's middim
_REFERENCE_BLOCKS = (16, 23, 23, 26, 32, 39, 45, 55)
_MIDDIM = (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560)
_BN_EPS = 1e-3
_IGNORED = ("num_batches_tracked",)

# Keras EfficientNet block sub-layer → efficientnet_pytorch MBConvBlock module
_BLOCK_MODULES = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv",
                  "bn": "_bn1", "se_reduce": "_se_reduce", "se_expand": "_se_expand",
                  "project_conv": "_project_conv", "project_bn": "_bn2"}
_TOP_MODULES = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head",
                "top_bn": "_bn1"}
_BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
              "moving_variance": "running_var"}
_BLOCK_RE = re.compile(r"^(block\d+[a-z])_(.+)$")


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One PyTorch tensor → (part of) one Keras variable.

    ``layout``: ``conv`` (OIHW → HWIO), ``depthwise`` ([C, 1, k, k] → [k, k, C, 1]),
    ``vector`` (as is), ``head_conv`` ([C, D, 1, 1] → row ``head`` of an [H, D, C] kernel),
    ``head_bias`` ([C] → row ``head`` of an [H, C] bias).
    """
    torch_key: str
    keras_path: str
    layout: str
    head: int | None = None

    def torch_shape(self, keras_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The PyTorch shape that fits a Keras variable of ``keras_shape``."""
        if self.layout == "conv":
            kh, kw, i, o = keras_shape
            return (o, i, kh, kw)
        if self.layout == "depthwise":
            kh, kw, c, m = keras_shape
            return (c * m, 1, kh, kw)
        if self.layout == "head_conv":
            _, d, c = keras_shape
            return (c, d, 1, 1)
        if self.layout == "head_bias":
            return (keras_shape[1],)
        return tuple(keras_shape)

    def to_keras(self, value: np.ndarray) -> np.ndarray:
        """``value`` (PyTorch layout) in the Keras layout (one head's row for head layouts)."""
        if self.layout == "conv":
            return value.transpose(2, 3, 1, 0)
        if self.layout == "depthwise":
            return value.transpose(2, 3, 0, 1)
        if self.layout == "head_conv":
            return value[:, :, 0, 0].T
        return value


def strip_module_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop DataParallel's ``module.`` prefix (present on every key or on none)."""
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``.pth`` state dict as float32 NumPy arrays, ``module.`` prefix removed (needs torch)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointImportError(f"checkpoint {path!r} does not exist")
    try:
        import torch
    except ImportError as e:
        raise CheckpointImportError(
            "reading a PyTorch checkpoint needs torch: pip install -r requirements-import.txt"
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointImportError(f"could not read {path!r} as a PyTorch checkpoint "
                                    f"({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointImportError(
            f"{path!r} is not a state dict (a mapping of names to tensors, as saved by "
            f"torch.save(model.state_dict(), path))")
    return strip_module_prefix({k: v.detach().cpu().float().numpy() if v.is_floating_point()
                                else v.detach().cpu().numpy() for k, v in state.items()})


def infer_architecture(state: Mapping[str, np.ndarray]) -> tuple[int, int, int] | None:
    """(eff_b, att_head, num_classes) a reference state dict was made with, or None."""
    state = strip_module_prefix(state)
    head = state.get("effnet._conv_head.weight")
    blocks = {int(m.group(1)) for k in state
              for m in [re.match(r"effnet\._blocks\.(\d+)\.", k)] if m}
    if head is None or not blocks:
        return None
    arch = [b for b in range(8) if _MIDDIM[b] == head.shape[0]
            and _REFERENCE_BLOCKS[b] == max(blocks) + 1]
    if len(arch) != 1:
        return None
    if "attention.head_weight" in state:
        heads = int(state["attention.head_weight"].shape[0])
        cla = state.get("attention.cla.0.weight")
    elif "attention.att.weight" in state:
        heads, cla = 1, state.get("attention.cla.weight")
    else:
        heads, cla = 0, state.get("attention.cla.weight")
    if cla is None:
        return None
    return arch[0], heads, int(cla.shape[0])


def reference_padding(eff_b: int, kernel_sizes: list[int]) -> list[tuple[int, int]]:
    """efficientnet_pytorch's static (before, after) padding of the successive stride-2
    convolutions with ``kernel_sizes`` (stem first) for EfficientNet-B``eff_b``'s image size
    (``Conv2dStaticSamePadding``: TF "same" padding computed for that size)."""
    n = REFERENCE_IMAGE_SIZE[int(eff_b)]
    pads = []
    for k in kernel_sizes:
        out = math.ceil(n / 2)
        total = max((out - 1) * 2 + k - n, 0)
        pads.append((total // 2, total - total // 2))
        n = out
    return pads


def _backbone_of(model: keras.Model) -> keras.Model:
    names = {layer.name for layer in model.layers}
    if "backbone" in names:
        return model.get_layer("backbone")
    if "classifier" in names:
        return _backbone_of(model.get_layer("classifier"))
    raise ValueError(f"model {model.name!r} has no EfficientNet backbone")


def with_reference_padding(model: keras.Model, eff_b: int) -> keras.Model:
    """A copy of ``model`` (an EfficientNet tagger or classifier) whose stride-2 convolutions
    are padded as efficientnet_pytorch pads them for B``eff_b`` (weights are not copied).
    Stride-1 convolutions need nothing: "same" padding is symmetric for odd kernels in both."""
    backbone = _backbone_of(model)
    pad_layers = [layer for layer in backbone.layers
                  if isinstance(layer, keras.layers.ZeroPadding2D)]
    if [layer.name for layer in pad_layers][:1] != ["stem_conv_pad"]:
        raise ValueError("expected a Keras EfficientNet backbone starting at stem_conv_pad")
    kernels = []
    for layer in pad_layers:
        conv = backbone.get_layer(layer.name[:-len("_pad")])
        if tuple(conv.strides) != (2, 2) or conv.padding != "valid":
            raise ValueError(f"{layer.name} does not precede a stride-2 valid convolution")
        kernels.append(int(conv.kernel_size[0]))
    pads = dict(zip((layer.name for layer in pad_layers), reference_padding(eff_b, kernels)))

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.ZeroPadding2D) and layer.name in pads:
            config["padding"] = (pads[layer.name], pads[layer.name])
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


def build_reference_tagger(num_classes: int, eff_b: int = 2, att_head: int = 4, *,
                           target_length: int = params.TARGET_LENGTH,
                           dataset_mean: float = params.DATASET_MEAN,
                           dataset_std: float = params.DATASET_STD) -> keras.Model:
    """psla_tf's tagger (waveform → scores) with the reference's EfficientNet padding; its
    ``classifier`` sub-model is the reference's ``EffNetAttention`` (fbank → scores)."""
    from psla_tf.models.tagger import build_tagger
    tagger = build_tagger(num_classes, model="efficientnet", eff_b=eff_b, att_head=att_head,
                          target_length=target_length, dataset_mean=dataset_mean,
                          dataset_std=dataset_std)
    return with_reference_padding(tagger, eff_b)


def tensor_mapping(classifier: keras.Model) -> list[TensorMapping]:
    """Every PyTorch tensor of the reference model that ``classifier``'s weights come from."""
    backbone = classifier.get_layer("backbone")
    out: list[TensorMapping] = []
    block_index: dict[str, int] = {}
    for layer in backbone.layers:
        if not layer.weights:
            continue
        if layer.name in _TOP_MODULES:
            module = f"effnet.{_TOP_MODULES[layer.name]}"
        else:
            m = _BLOCK_RE.match(layer.name)
            if m is None or m.group(2) not in _BLOCK_MODULES:
                raise ValueError(f"backbone layer {layer.name!r} has no reference counterpart")
            n = block_index.setdefault(m.group(1), len(block_index))
            module = f"effnet._blocks.{n}.{_BLOCK_MODULES[m.group(2)]}"
        for v in layer.weights:
            if isinstance(layer, keras.layers.BatchNormalization):
                if not math.isclose(layer.epsilon, _BN_EPS):
                    raise ValueError(f"{layer.name}: BN eps {layer.epsilon}, the reference's "
                                     f"is {_BN_EPS}")
                out.append(TensorMapping(f"{module}.{_BN_PARAMS[v.name]}", v.path, "vector"))
            elif isinstance(layer, keras.layers.DepthwiseConv2D) and v.name == "kernel":
                out.append(TensorMapping(f"{module}.weight", v.path, "depthwise"))
            elif isinstance(layer, keras.layers.Conv2D) and v.name == "kernel":
                out.append(TensorMapping(f"{module}.weight", v.path, "conv"))
            elif v.name == "bias":
                out.append(TensorMapping(f"{module}.bias", v.path, "vector"))
            else:
                raise ValueError(f"unexpected weight {v.path} in the backbone")
    pooling = classifier.get_layer("pooling")
    kind = type(pooling).__name__
    variables = {v.name: v for v in pooling.weights}
    names = ("cla",) if kind == "MeanPooling" else ("att", "cla")
    for h in range(pooling.num_heads):
        for name in names:
            module = (f"attention.{name}.{h}" if kind == "MultiHeadAttentionPooling"
                      else f"attention.{name}")
            out.append(TensorMapping(f"{module}.weight", variables[f"{name}_kernel"].path,
                                     "head_conv", h))
            out.append(TensorMapping(f"{module}.bias", variables[f"{name}_bias"].path,
                                     "head_bias", h))
    if kind == "MultiHeadAttentionPooling":
        out.append(TensorMapping("attention.head_weight", variables["head_weight"].path,
                                 "vector"))
    return out


def describe(classifier: keras.Model) -> str:
    """A label like "EfficientNet-B2, 4 attention heads, 527 classes" for ``classifier``."""
    backbone = classifier.get_layer("backbone")
    blocks = {m.group(1) for layer in backbone.layers for m in [_BLOCK_RE.match(layer.name)] if m}
    top = backbone.get_layer("top_conv").filters
    b = [b for b in range(8) if _MIDDIM[b] == top and _REFERENCE_BLOCKS[b] == len(blocks)]
    pooling = classifier.get_layer("pooling")
    heads = {"MeanPooling": "mean pooling", "AttentionPooling": "1 attention head"}.get(
        type(pooling).__name__, f"{pooling.num_heads} attention heads")
    name = f"EfficientNet-B{b[0]}" if len(b) == 1 else "EfficientNet"
    return f"{name}, {heads}, {pooling.num_classes} classes"


def _listing(title: str, items: list[str], limit: int = 40) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {len(items)} {title}:\n" + "\n".join(f"    {s}" for s in items[:limit]) + more


def load_state_dict(classifier: keras.Model, state: Mapping[str, np.ndarray],
                    source: str = "checkpoint") -> None:
    """Assign a reference state dict to ``classifier`` (from ``build_reference_tagger``).

    All or nothing: any reference tensor missing from ``state``, any tensor of ``state`` the
    model has no place for (``num_batches_tracked`` excepted) or any mis-shaped tensor raises
    CheckpointImportError listing them, before a single weight is changed.
    """
    state = strip_module_prefix(state)
    mapping = tensor_mapping(classifier)
    variables = {v.path: v for v in classifier.weights}
    targets = {m.keras_path for m in mapping}
    uncovered = sorted(set(variables) - targets)
    if uncovered:   # a psla_tf model the mapping does not describe: a bug, not user error
        raise AssertionError(f"Keras weights without a reference tensor: {uncovered}")
    mapped = {m.torch_key for m in mapping}
    missing = [m.torch_key for m in mapping if m.torch_key not in state]
    unexpected = sorted(k for k in state if k not in mapped
                        and k.rsplit(".", 1)[-1] not in _IGNORED)
    misshaped = []
    for m in mapping:
        if m.torch_key in state:
            want = m.torch_shape(tuple(variables[m.keras_path].shape))
            got = tuple(np.shape(state[m.torch_key]))
            if got != want:
                misshaped.append(f"{m.torch_key}: {got} in the checkpoint, expected {want} "
                                 f"(for {m.keras_path})")
    if missing or unexpected or misshaped:
        parts = [f"{source} does not fit the model ({describe(classifier)}); "
                 f"nothing was loaded:"]
        if missing:
            parts.append(_listing("tensors missing from the checkpoint", missing))
        if unexpected:
            parts.append(_listing("checkpoint tensors the model has no place for", unexpected))
        if misshaped:
            parts.append(_listing("mis-shaped tensors", misshaped))
        arch = infer_architecture(state)
        if arch is not None:
            parts.append(f"  the checkpoint looks like --eff_b={arch[0]} --att_head={arch[1]} "
                         f"with {arch[2]} classes")
        raise CheckpointImportError("\n".join(parts))
    values = {path: np.array(v.numpy(), dtype=np.float32) for path, v in variables.items()}
    for m in mapping:
        value = m.to_keras(np.asarray(state[m.torch_key], dtype=np.float32))
        if m.head is None:
            values[m.keras_path] = value
        else:
            values[m.keras_path][m.head] = value
    for path, v in variables.items():
        v.assign(values[path])


def import_checkpoint(checkpoint: str | os.PathLike, num_classes: int, *,
                      eff_b: int | None = None, att_head: int | None = None,
                      target_length: int = params.TARGET_LENGTH,
                      dataset_mean: float = params.DATASET_MEAN,
                      dataset_std: float = params.DATASET_STD) -> keras.Model:
    """A psla_tf tagger (waveform → scores) holding a released reference checkpoint.

    ``eff_b`` / ``att_head``: the architecture (None: inferred from the checkpoint; the
    released AudioSet and FSD50K models are B2 with 4 heads). ``target_length``: input frames
    (the reference's AudioSet models: 1056; FSD50K: 3000).
    """
    state = read_state_dict(checkpoint)
    arch = infer_architecture(state)
    if eff_b is None or att_head is None:
        if arch is None:
            raise CheckpointImportError(
                f"{os.fspath(checkpoint)!r} is not a PSLA EffNetAttention state dict "
                f"(no effnet._conv_head / effnet._blocks / attention tensors); pass --eff_b "
                f"and --att_head to see which tensors differ")
        eff_b = arch[0] if eff_b is None else eff_b
        att_head = arch[1] if att_head is None else att_head
    if int(eff_b) not in range(8):
        raise CheckpointImportError(f"eff_b must be 0..7, got {eff_b}")
    if int(att_head) < 0:
        raise CheckpointImportError(f"att_head must be >= 0, got {att_head}")
    if arch is not None and arch[2] != num_classes:
        raise CheckpointImportError(f"the checkpoint has {arch[2]} classes, the label CSV "
                                    f"{num_classes}")
    model = build_reference_tagger(num_classes, int(eff_b), int(att_head),
                                   target_length=target_length, dataset_mean=dataset_mean,
                                   dataset_std=dataset_std)
    load_state_dict(model.get_layer("classifier"), state, source=repr(os.fspath(checkpoint)))
    return model
