"""Import of the reference's PyTorch checkpoints (issue 9): the reference EffNetAttention built
from efficientnet_pytorch with random weights and non-trivial BN statistics, saved as a state
dict, imported, and compared on the same normalised fbank batch (max |d| <= 1e-4); refusal
of unmatched / mis-shaped tensors; the tool; the exported SavedModel and TFLite end to end
from real waveforms.

Skipped when torch / efficientnet_pytorch (requirements-import.txt) are not installed.
"""
from __future__ import annotations

import os

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


def _check_parity(ref: nn.Module, classifier: keras.Model, x: np.ndarray) -> float:
    """max |scores_keras - scores_torch| on ``x``, after checking the comparison means
    something (unsaturated scores that differ between clips)."""
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert expected.std() > 0.01 and ((expected > 0.02) & (expected < 0.98)).mean() > 0.5
    assert np.abs(expected[0] - expected[1]).max() > 1e-3
    got = keras.ops.convert_to_numpy(classifier(x, training=False))
    assert got.shape == expected.shape
    # inference is deterministic (drop-connect / dropout inactive)
    np.testing.assert_array_equal(got, keras.ops.convert_to_numpy(classifier(x, training=False)))
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize("b,heads,target_length", [
    (0, 0, 100), (0, 1, 100), (0, 4, 99), (2, 0, 100), (2, 1, 77)])
def test_import_matches_reference(tmp_path, b, heads, target_length):
    classes = 11
    ref = _reference(b, heads, classes, target_length, seed=10 * b + heads)
    path = _save(ref, tmp_path / "ref.pth", prefix="module." if heads != 1 else "")
    model = torch_import.import_checkpoint(path, classes, target_length=target_length)
    x = _fbank_batch(3, target_length, seed=b + heads)
    diff = _check_parity(ref, model.get_layer("classifier"), x)
    assert diff <= TOL, diff


@pytest.fixture(scope="module")
def released_like(tmp_path_factory):
    """The released architecture: EfficientNet-B2, 4 heads, 1056 frames (11 classes);
    (reference, imported tagger, checkpoint path, vocabulary)."""
    classes = 11
    ref = _reference(2, 4, classes, 1056, seed=24)
    path = _save(ref, tmp_path_factory.mktemp("b2") / "audioset_like.pth")
    model = torch_import.import_checkpoint(path, classes)          # inferred: B2, 4 heads
    mids = [f"/m/c{i}" for i in range(classes)]
    return ref, model, path, (mids, [f"class {i}" for i in range(classes)])


def test_import_matches_reference_b2_4_heads_1056_frames(released_like):
    ref, model, path, _ = released_like
    assert model.get_layer("classifier").get_layer("pooling").num_heads == 4
    diff = _check_parity(ref, model.get_layer("classifier"), _fbank_batch(2, 1056, seed=5))
    assert diff <= TOL, diff
    # Keras' own padding (computed for the input size) is a different function for B2:
    # the reference pads block3a / block4a / block6a as for a 260-px image
    own = build_classifier(11, eff_b=2, att_head=4, target_length=1056)
    torch_import.load_state_dict(own, torch_import.read_state_dict(path))
    assert _check_parity(ref, own, _fbank_batch(2, 1056, seed=5)) > 1e-2


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


# ---- refusal: all or nothing, with the list of what does not fit

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """B0, single head, 5 classes, 100 frames: (reference, state dict path, classifier)."""
    ref = _reference(0, 1, 5, 100, seed=3)
    path = _save(ref, tmp_path_factory.mktemp("b0") / "b0.pth")
    classifier = torch_import.build_reference_tagger(5, 0, 1, target_length=100).get_layer(
        "classifier")
    return ref, path, classifier


def _refused(classifier, state) -> str:
    before = [w.copy() for w in classifier.get_weights()]
    with pytest.raises(CheckpointImportError) as e:
        torch_import.load_state_dict(classifier, state, source="ckpt")
    for a, b in zip(before, classifier.get_weights()):      # nothing was loaded
        np.testing.assert_array_equal(a, b)
    return str(e.value)


def test_refuses_unmatched_and_misshaped_tensors(small):
    ref, path, classifier = small
    state = torch_import.read_state_dict(path)               # "module." prefix removed
    assert not any(k.startswith("module.") for k in state)
    broken = dict(state)
    del broken["effnet._blocks.3._depthwise_conv.weight"]
    del broken["attention.att.bias"]
    broken["effnet._fc.weight"] = np.zeros((1000, 1280), np.float32)
    broken["effnet._blocks.0._bn1.running_var"] = np.ones(33, np.float32)
    msg = _refused(classifier, broken)
    assert "nothing was loaded" in msg and "EfficientNet-B0, 1 attention head, 5 classes" in msg
    assert "2 tensors missing" in msg and "effnet._blocks.3._depthwise_conv.weight" in msg
    assert "attention.att.bias" in msg
    assert "1 checkpoint tensors the model has no place for" in msg and "_fc.weight" in msg
    assert "1 mis-shaped" in msg and "effnet._blocks.0._bn1.running_var: (33,)" in msg
    assert "--eff_b=0 --att_head=1 with 5 classes" in msg
    # the same checkpoint against the wrong architecture: a long, truncated listing + hint
    b2 = build_classifier(5, eff_b=2, att_head=4, target_length=100)
    msg = _refused(b2, state)
    assert "EfficientNet-B2, 4 attention heads" in msg and "more" in msg
    assert "looks like --eff_b=0 --att_head=1" in msg
    # the unmodified state dict loads, with or without the DataParallel prefix
    torch_import.load_state_dict(classifier, {"module." + k: v for k, v in state.items()})
    x = _fbank_batch(2, 100, seed=1)
    assert _check_parity(ref, classifier, x) <= TOL


def test_bad_checkpoint_files(tmp_path, small):
    _, path, _ = small
    with pytest.raises(CheckpointImportError, match="does not exist"):
        torch_import.read_state_dict(tmp_path / "none.pth")
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointImportError, match="could not read"):
        torch_import.read_state_dict(text)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], listing)
    with pytest.raises(CheckpointImportError, match="not a state dict"):
        torch_import.read_state_dict(listing)
    with pytest.raises(CheckpointImportError, match="the checkpoint has 5 classes, the label "
                       "CSV 7"):
        torch_import.import_checkpoint(path, 7, target_length=100)


# ---- the tool

def _tool(*args):
    """tools/import_psla_checkpoint.py, in-process (helpers_cli.run_script)."""
    from helpers_cli import run_script
    return run_script("import_psla_checkpoint.py", *args)


def test_tool_writes_a_loadable_tagger(tmp_path, small):
    from psla_tf.data.records import write_label_csv
    from psla_tf.models.loading import load_tagger, load_vocabulary
    ref, path, _ = small
    labels = tmp_path / "vocab.csv"
    mids, names = [f"/m/{i}" for i in range(5)], [f"n{i}" for i in range(5)]
    write_label_csv(str(labels), mids, names)
    out = tmp_path / "imported" / "model.keras"
    r = _tool(f"--checkpoint={path}", f"--label_csv={labels}", f"--output={out}",
              "--target_length=100")
    assert r.returncode == 0, r.stderr
    assert "EfficientNet-B0, 1 attention head, 5 classes" in r.stdout
    assert sorted(os.listdir(out.parent)) == ["labels.csv", "model.keras"]   # no temp files
    model = load_tagger(str(out))
    assert load_vocabulary(str(out)) == (mids, names)
    diff = _check_parity(ref, model.get_layer("classifier"), _fbank_batch(2, 100, seed=9))
    assert diff <= TOL, diff
    # bad input: one line on stderr, exit 2, the existing output untouched
    other = tmp_path / "other.csv"
    write_label_csv(str(other), mids[::-1], names[::-1])
    stamp = out.stat().st_mtime_ns
    for args, expect in [
            ([f"--label_csv={labels}", f"--output={out}"], "--checkpoint is required"),
            ([f"--checkpoint={path}", f"--label_csv={labels}", f"--output={out}"], "exists"),
            ([f"--checkpoint={path}", f"--label_csv={labels}", f"--output={tmp_path}/m.h5"],
             "must end in .keras"),
            ([f"--checkpoint={tmp_path}/no.pth", f"--label_csv={labels}",
              f"--output={tmp_path}/c.keras"], "does not exist"),
            ([f"--checkpoint={path}", f"--label_csv={labels}", f"--output={tmp_path}/b.keras",
              "--eff_b=2"], "does not fit the model"),
            ([f"--checkpoint={path}", f"--label_csv={other}", f"--output={out.parent}/o.keras"],
             "exists with another vocabulary")]:
        r = _tool(*args)
        # (TensorFlow's own start-up log lines may precede the message on stderr)
        message = r.stderr[r.stderr.find("error: "):]
        assert r.returncode == 2 and "error: " in r.stderr and expect in message, (
            args, r.stderr)
        assert "Traceback" not in r.stderr
        if expect != "does not fit the model":          # the refusal lists tensors, one a line
            assert message.strip().count("\n") == 0, message
    assert out.stat().st_mtime_ns == stamp and not (tmp_path / "b.keras").exists()
    assert sorted(os.listdir(out.parent)) == ["labels.csv", "model.keras"]
    assert load_vocabulary(str(out)) == (mids, names)


# ---- end to end: the imported model exported as SavedModel and TFLite vs PyTorch, on real
# audio, from the waveform

def _torch_scores(ref: nn.Module, waveforms: list[np.ndarray], target_length: int) -> np.ndarray:
    """The reference pipeline: clip mean removed, Kaldi fbank (psla_tf's kaldi_fbank, which
    matches torchaudio to ~1e-5), zero-padded / cut to target_length frames, normalised with
    the AudioSet constants, then the PyTorch model."""
    from psla_tf import params
    from psla_tf.features import kaldi_fbank
    batch = np.zeros((len(waveforms), target_length, 128), np.float32)
    for i, w in enumerate(waveforms):
        w64 = np.asarray(w, np.float64)
        fb = kaldi_fbank((w64 - w64.mean()).astype(np.float32)).numpy()[:target_length]
        batch[i, :len(fb)] = fb
    batch = (batch - params.DATASET_MEAN) / params.DATASET_STD
    with torch.no_grad():
        return ref(torch.from_numpy(batch.astype(np.float32))).numpy()


def test_exported_savedmodel_and_tflite_match_pytorch_on_real_audio(tmp_path, shared,
                                                                    released_like):
    from psla_tf.data.prepare import decode_audio
    from psla_tf.export import export_saved_model, load_saved_model
    from psla_tf.export_tflite import TFLiteTagger, export_tflite
    ref, model, _, (mids, names) = released_like
    fsdd = shared("data", "fsdd", "recordings")
    clips = [decode_audio(str(shared("data", "clips", "R9_ZSCveAHg_7s.wav"))),
             decode_audio(str(fsdd / "3_jackson_7.wav")),
             decode_audio(str(fsdd / "8_theo_21.wav"))]
    assert len(clips[0]) == 7 * 16000 and all(len(c) < 16000 for c in clips[1:])
    expected = _torch_scores(ref, clips, 1056)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3

    # SavedModel (TF Serving): a zero-padded batch with the clips' lengths
    saved = load_saved_model(export_saved_model(model, str(tmp_path / "serving"), mids, names))
    assert saved.mids == mids
    lengths = np.array([len(c) for c in clips], np.int32)
    batch = np.zeros((len(clips), lengths.max()), np.float32)
    for i, c in enumerate(clips):
        batch[i, :len(c)] = c
    got = saved(batch, lengths)["scores"]
    d_saved = np.abs(got - expected).max()
    assert d_saved <= TOL, d_saved

    # TFLite (float32, fixed 7-s input; LiteRT interpreter): it scores the clip zero-padded to
    # its input length, so PyTorch gets the same padded waveform
    path = str(tmp_path / "imported.tflite")
    export_tflite(model, path, mids, names, seconds=7.0)
    lite = TFLiteTagger(path)
    padded = [np.pad(c, (0, lite.input_samples - len(c))) for c in clips]
    expected_lite = _torch_scores(ref, padded, 1056)
    got_lite = np.stack([lite(c) for c in clips])
    d_lite = np.abs(got_lite - expected_lite).max()
    assert d_lite <= TOL, d_lite
    print(f"max |d| SavedModel {d_saved:.2e}, TFLite {d_lite:.2e}")
