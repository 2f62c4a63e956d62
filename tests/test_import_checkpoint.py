"""Import of the reference's PyTorch checkpoints (issue 9): the reference EffNetAttention built
from efficientnet_pytorch with random weights and non-trivial BN statistics, saved as a state
dict, imported, and compared on the same normalised fbank batch (max |d| <= 1e-4); refusal
of unmatched / mis-shaped tensors; the tool; the exported SavedModel and TFLite end to end
from real waveforms.

Skipped when torch / efficientnet_pytorch (requirements-import.txt) are not installed.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch not installed (pip install -r requirements-import.txt)")
efficientnet_pytorch = pytest.importorskip(
    "efficientnet_pytorch",
    reason="efficientnet_pytorch not installed (pip install -r requirements-import.txt)")

import keras  # noqa: E402
from torch import nn  # noqa: E402

from psla_tf.models import torch_import  # noqa: E402
from psla_tf.models.tagger import build_classifier  # noqa: E402
from psla_tf.models.torch_import import CheckpointImportError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


# ---- the reference model (PSLA src/models/Models.py, HigherModels.py), written from its
# description: conv 1x1 heads with bias, sigmoid, attention clamped to [1e-7, 1 - 1e-7] and
# normalised over time

class RefAttention(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.att = nn.Conv2d(n_in, n_out, kernel_size=(1, 1), bias=True)
        self.cla = nn.Conv2d(n_in, n_out, kernel_size=(1, 1), bias=True)

    def forward(self, x):                                   # x [B, D, T', 1]
        att = torch.sigmoid(self.att(x))[:, :, :, 0]
        cla = torch.sigmoid(self.cla(x))[:, :, :, 0]
        att = torch.clamp(att, 1e-7, 1.0 - 1e-7)
        norm_att = att / torch.sum(att, dim=2)[:, :, None]
        return torch.sum(norm_att * cla, dim=2)


class RefMeanPooling(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.cla = nn.Conv2d(n_in, n_out, kernel_size=(1, 1), bias=True)

    def forward(self, x):
        return torch.mean(torch.sigmoid(self.cla(x))[:, :, :, 0], dim=2)


class RefMHeadAttention(nn.Module):
    def __init__(self, n_in: int, n_out: int, head_num: int = 4):
        super().__init__()
        self.head_num = head_num
        self.att = nn.ModuleList([nn.Conv2d(n_in, n_out, (1, 1), bias=True)
                                  for _ in range(head_num)])
        self.cla = nn.ModuleList([nn.Conv2d(n_in, n_out, (1, 1), bias=True)
                                  for _ in range(head_num)])
        self.head_weight = nn.Parameter(torch.tensor([1.0 / head_num] * head_num))

    def forward(self, x):
        out = []
        for i in range(self.head_num):
            att = torch.sigmoid(self.att[i](x))[:, :, :, 0]
            cla = torch.sigmoid(self.cla[i](x))[:, :, :, 0]
            att = torch.clamp(att, 1e-7, 1.0 - 1e-7)
            norm_att = att / torch.sum(att, dim=2)[:, :, None]
            out.append(torch.sum(norm_att * cla, dim=2) * self.head_weight[i])
        return torch.stack(out, dim=0).sum(dim=0)


class RefEffNetAttention(nn.Module):
    middim = (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560)

    def __init__(self, label_dim: int, b: int, head_num: int):
        super().__init__()
        self.effnet = efficientnet_pytorch.EfficientNet.from_name(f"efficientnet-b{b}",
                                                                  in_channels=1)
        if head_num > 1:
            self.attention = RefMHeadAttention(self.middim[b], label_dim)   # always 4 heads
        elif head_num == 1:
            self.attention = RefAttention(self.middim[b], label_dim)
        else:
            self.attention = RefMeanPooling(self.middim[b], label_dim)
        self.avgpool = nn.AvgPool2d((4, 1))
        self.effnet._fc = nn.Identity()

    def forward(self, x):                                   # x [B, T, 128]
        x = x.unsqueeze(1).transpose(2, 3)                  # [B, 1, 128, T]
        x = self.effnet.extract_features(x)
        x = self.avgpool(x)
        x = x.transpose(2, 3)                               # [B, D, T', 1]
        return self.attention(x)


def _reference(b: int, heads: int, classes: int, target_length: int, seed: int):
    """A reference model with random weights and non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = RefEffNetAttention(classes, b, heads)
    # BN statistics: the batch statistics of a random input (keeps activations in range),
    # then perturbed so that running mean / var are not the identity; random affine params
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = 1.0
    params = model.effnet._global_params
    model.effnet._global_params = params._replace(drop_connect_rate=None)  # no drop-connect
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(_fbank_batch(4, target_length, seed + 100)))
        model.effnet._global_params = params
        g = torch.Generator().manual_seed(seed + 1)
        for m in bns:
            c = m.num_features
            m.running_mean += 0.1 * m.running_var.sqrt() * torch.randn(c, generator=g)
            m.running_var *= torch.empty(c).uniform_(0.8, 1.25, generator=g)
            m.weight.copy_(torch.empty(c).uniform_(0.8, 1.2, generator=g))
            m.bias.copy_(0.1 * torch.randn(c, generator=g))
            m.num_batches_tracked.fill_(1234)
        if heads > 1:
            model.attention.head_weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        # head convs scaled so that their logits have std ~1.5 (unsaturated sigmoids)
        model.eval()
        calib = torch.from_numpy(_fbank_batch(4, target_length, seed + 100))
        feats = model.avgpool(model.effnet.extract_features(
            calib.unsqueeze(1).transpose(2, 3))).transpose(2, 3)
        for conv in model.attention.modules():
            if isinstance(conv, nn.Conv2d):
                scale = 1.5 / conv(feats).std()
                conv.weight.mul_(scale)
                conv.bias.mul_(scale)
    model.eval()
    return model


def _fbank_batch(n: int, target_length: int, seed: int) -> np.ndarray:
    """A normalised-fbank-like batch: smooth random spectra, roughly zero mean, unit std."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, target_length, 128)).cumsum(axis=2) / 6.0
    return (x + rng.normal(0.0, 0.5, size=x.shape)).astype(np.float32)


def _save(model: nn.Module, path, prefix: str = "module.") -> str:
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    return str(path)


@pytest.mark.parametrize("b,heads,target_length", [
    (0, 0, 100), (0, 1, 100), (0, 4, 99), (2, 0, 100), (2, 1, 77), (2, 4, 1056)])
def test_import_matches_reference(tmp_path, b, heads, target_length):
    classes = 11
    ref = _reference(b, heads, classes, target_length, seed=10 * b + heads)
    path = _save(ref, tmp_path / "ref.pth", prefix="module." if heads != 1 else "")
    x = _fbank_batch(2 if target_length > 500 else 3, target_length, seed=b + heads)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    # a meaningful comparison: scores spread across classes and clips, not saturated
    assert expected.std() > 0.01 and ((expected > 0.02) & (expected < 0.98)).mean() > 0.5
    assert np.abs(expected[0] - expected[1]).max() > 1e-3

    model = torch_import.import_checkpoint(path, classes, target_length=target_length)
    classifier = model.get_layer("classifier")
    got = keras.ops.convert_to_numpy(classifier(x, training=False))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()
    # inference is deterministic (no drop-connect / dropout at inference)
    again = keras.ops.convert_to_numpy(classifier(x, training=False))
    np.testing.assert_array_equal(got, again)


def test_reference_padding_matches_efficientnet_pytorch():
    """The static padding table equals efficientnet_pytorch's Conv2dStaticSamePadding
    modules for B0..B7, and for B2 it differs from Keras' own (input-size) padding."""
    for b in range(8):
        net = efficientnet_pytorch.EfficientNet.from_name(f"efficientnet-b{b}", in_channels=1)
        convs = [m for m in net.modules()
                 if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2)]
        want = [tuple(m.static_padding.padding) for m in convs]       # (l, r, t, b)
        got = torch_import.reference_padding(b, [m.kernel_size[0] for m in convs])
        assert [p + p for p in got] == want, b
    own = build_classifier(3, eff_b=2, att_head=1, target_length=1056)
    ref = torch_import.with_reference_padding(own, 2)
    pads = {layer.name: layer.padding for layer in
            ref.get_layer("backbone").layers if isinstance(layer, keras.layers.ZeroPadding2D)}
    assert pads["block3a_dwconv_pad"] == ((2, 2), (2, 2))
    assert pads["block4a_dwconv_pad"] == ((1, 1), (1, 1))
    keras_pads = {layer.name: layer.padding for layer in
                  own.get_layer("backbone").layers
                  if isinstance(layer, keras.layers.ZeroPadding2D)}
    assert keras_pads["block3a_dwconv_pad"] == ((1, 2), (1, 2))
