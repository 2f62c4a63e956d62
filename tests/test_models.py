"""Front end, backbones, tagger (Fig. 2): real clips, weight loading, sizes, serialisation."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from psla_tf import params
from psla_tf.features import kaldi_fbank
from psla_tf.models import backbones
from psla_tf.models.backbones import PretrainedWeightsError, build_backbone
from psla_tf.models.frontend import AudioFrontend
from psla_tf.models.pooling import AttentionPooling, MultiHeadAttentionPooling
from psla_tf.models.tagger import (build_classifier, build_tagger, classifier_with_embedding,
                                   embedding_model)

CLIPS = ["0_george_0", "3_yweweler_12", "7_jackson_32", "one_frame", "short_399",
         "sine440_1s"]
TARGET = 64
NORM_PAD = (0.0 - params.DATASET_MEAN) / params.DATASET_STD


def _batch(shared, extra: int = 700, seed: int = 0):
    """Real clips padded with random noise (not zeros) to one length; their reference fbank."""
    root = shared("fbank_reference")
    clips = [np.load(root / f"{c}.npz") for c in CLIPS]
    waves = [c["waveform"].astype(np.float32) for c in clips]
    length = max(len(w) for w in waves) + extra
    rng = np.random.default_rng(seed)
    batch = rng.normal(0, 0.3, (len(waves), length)).astype(np.float32)
    for i, w in enumerate(waves):
        batch[i, :len(w)] = w
    n = np.array([len(w) for w in waves], np.int32)
    return batch, n, waves, [c["fbank"] for c in clips]


def _pad(fb: np.ndarray, target: int) -> np.ndarray:
    out = np.zeros((target, fb.shape[1]), np.float32)
    out[:min(target, len(fb))] = fb[:target]
    return out


def test_frontend_matches_per_clip_computation(shared):
    batch, n, waves, refs = _batch(shared)
    front = AudioFrontend(TARGET, freqm=48, timem=192, seed=0)
    out = front(batch, n).numpy()                                    # inference: no masks
    assert out.shape == (len(CLIPS), TARGET, 128) and out.dtype == np.float32
    for i, (w, ref) in enumerate(zip(waves, refs)):
        centred = (w.astype(np.float64) - w.astype(np.float64).mean()).astype(np.float32)
        own = kaldi_fbank(centred).numpy()
        expected = (_pad(own, TARGET) - params.DATASET_MEAN) / params.DATASET_STD
        np.testing.assert_allclose(out[i], expected, atol=2e-3, rtol=0,
                                   err_msg=CLIPS[i])
        # the torchaudio reference (fbank of the clip as given: per-frame DC removal makes
        # the clip's mean irrelevant); DESIGN.md: mean |d| ~1e-5, p99.9 ~5e-3
        ref_norm = (_pad(ref, TARGET) - params.DATASET_MEAN) / params.DATASET_STD
        d = np.abs(out[i] - ref_norm) * params.DATASET_STD
        assert d.mean() < 1e-4 and np.quantile(d, 0.999) < 2e-2, CLIPS[i]
    # one clip at a time (tf.data's per-clip map: a static batch of 1 takes its own path,
    # a cut instead of a select): the batch's rows, noise past num_samples included
    for i in range(len(CLIPS)):
        np.testing.assert_allclose(front(batch[i:i + 1], n[i:i + 1]).numpy()[0], out[i],
                                   atol=1e-5, rtol=0, err_msg=CLIPS[i])
    # clips shorter than 400 samples: all padding
    np.testing.assert_allclose(out[CLIPS.index("short_399")], NORM_PAD, rtol=1e-6)
    # frames past each clip's end are padding, not fbank of the noise that follows
    for i, w in enumerate(waves):
        frames = 0 if len(w) < 400 else 1 + (len(w) - 400) // 160
        if frames < TARGET:
            np.testing.assert_allclose(out[i, frames:], NORM_PAD, rtol=1e-6)


def test_frontend_masking_in_training_only(shared):
    batch, n, _, _ = _batch(shared)
    front = AudioFrontend(TARGET, freqm=20, timem=16, seed=3)
    clean = front(batch, n).numpy()
    np.testing.assert_array_equal(front(batch, n, training=False).numpy(), clean)
    masked = front(batch, n, training=True).numpy()
    changed = masked != clean
    assert changed.any()
    np.testing.assert_allclose(masked[changed], NORM_PAD, rtol=1e-6)   # masks are 0 pre-norm
    for i in range(len(CLIPS)):
        is_pad = np.isclose(masked[i], NORM_PAD)
        full_time = np.flatnonzero(is_pad.all(axis=0) & ~np.isclose(clean[i], NORM_PAD).all(0))
        assert len(full_time) < 20                                     # < freqm bins
    unmasked = AudioFrontend(TARGET, freqm=0, timem=0)
    np.testing.assert_array_equal(unmasked(batch, n, training=True).numpy(), clean)


def test_frontend_config_and_errors():
    front = AudioFrontend(100, 64, 10, 20, -4.0, 4.0, seed=1, name="fe")
    clone = AudioFrontend.from_config(front.get_config())
    assert (clone.target_length, clone.num_mel_bins, clone.freqm, clone.timem, clone.seed) == (
        100, 64, 10, 20, 1)
    with pytest.raises(ValueError, match="dataset_std"):
        AudioFrontend(dataset_std=0)


def test_efficientnet_b2_shape_and_parameter_counts():
    # DESIGN.md: B2 on [128, 1056, 1] -> [4, 33, 1408]; B2 + 4 heads + 527 = 13.64 M and
    # B0 + 1 head = 5.36 M parameters (PyTorch's count: trainable, without BN statistics)
    b2 = build_classifier(527, eff_b=2, att_head=4, target_length=1056)
    assert tuple(b2.get_layer("backbone").outputs[0].shape[1:]) == (4, 33, 1408)
    n = sum(int(np.prod(w.shape)) for w in b2.trainable_weights)
    assert round(n / 1e6, 2) == 13.64, n
    b0 = build_classifier(527, eff_b=0, att_head=1, target_length=1056)
    n = sum(int(np.prod(w.shape)) for w in b0.trainable_weights)
    assert round(n / 1e6, 2) == 5.36, n
    assert isinstance(b0.get_layer("pooling"), AttentionPooling)
    assert isinstance(b2.get_layer("pooling"), MultiHeadAttentionPooling)


@pytest.fixture(scope="module")
def rgb_file(tmp_path_factory):
    """A 3-channel no-top EfficientNet-B0 with distinctive weights, saved with save_weights."""
    keras.utils.set_random_seed(11)
    app = keras.applications.EfficientNetB0
    rgb = app(include_top=False, weights=None, input_shape=(64, 64, 3))
    for layer in rgb.layers:   # make every weight distinctive (BN statistics included)
        if isinstance(layer, keras.layers.Normalization):
            continue
        layer.set_weights([np.random.default_rng(len(layer.name)).normal(
            size=w.shape).astype(np.float32) + 2.0 for w in layer.get_weights()])
    path = tmp_path_factory.mktemp("weights") / "rgb.weights.h5"
    rgb.save_weights(path)
    return rgb, path


def test_backbone_loads_weights_file(rgb_file):
    rgb, path = rgb_file
    keras.utils.set_random_seed(0)
    random_stem = build_backbone(eff_b=0, input_shape=(128, 32, 1), pretrained=path)
    summed = build_backbone(eff_b=0, input_shape=(128, 32, 1), pretrained=str(path),
                            stem_init="rgb_sum")
    rgb_layers = {layer.name: layer for layer in rgb.layers}
    checked = 0
    for model in (random_stem, summed):
        assert not any(isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization))
                       for layer in model.layers)
        for layer in model.layers:
            if not layer.weights or layer.name == "stem_conv":
                continue
            for got, want in zip(layer.get_weights(), rgb_layers[layer.name].get_weights()):
                np.testing.assert_array_equal(got, want)
                checked += 1
    assert checked > 2 * 150
    rgb_stem = rgb.get_layer("stem_conv").get_weights()[0]
    np.testing.assert_allclose(summed.get_layer("stem_conv").get_weights()[0],
                               rgb_stem.sum(axis=2, keepdims=True), rtol=1e-6)
    stem = random_stem.get_layer("stem_conv").get_weights()[0]
    assert stem.shape == (3, 3, 1, 32)
    assert np.abs(stem).max() < 1.0              # random init, not the file's (mean ~2) values
    # the spectrogram reaches stem_conv untouched (no ImageNet rescaling / normalisation)
    x = np.random.default_rng(1).normal(size=(2, 128, 32, 1)).astype(np.float32) * 5 - 4
    first = [layer for layer in summed.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert first[0].name == "stem_conv_pad" and first[1].name == "stem_conv"
    probe = summed.get_layer("stem_conv")(summed.get_layer("stem_conv_pad")(x))
    padded = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])   # correct_pad for even sizes
    expected = tf.nn.conv2d(padded, summed.get_layer("stem_conv").get_weights()[0], 2, "VALID")
    np.testing.assert_allclose(probe.numpy(), expected.numpy(), rtol=1e-4, atol=1e-3)


def test_backbone_rejects_mismatched_file(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(PretrainedWeightsError, match="does not match"):
        build_backbone(eff_b=0, input_shape=(128, 32, 1), pretrained=path)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_backbone(eff_b=0, input_shape=(128, 32, 1), pretrained=tmp_path / "nope.h5")
    with pytest.raises(ValueError, match="rgb_sum"):
        build_backbone(eff_b=0, input_shape=(128, 32, 1), stem_init="rgb_sum")
    with pytest.raises(ValueError, match="eff_b"):
        build_backbone(eff_b=9)
    with pytest.raises(ValueError, match="model must be"):
        build_backbone("vgg")


def test_imagenet_path_uses_keras_applications(monkeypatch):
    calls = []
    real = backbones._application

    def spy(model, eff_b):
        app = real(model, eff_b)

        def constructor(**kwargs):
            calls.append(kwargs["weights"])
            if kwargs["weights"] == "imagenet":   # stand-in for the download: random weights
                kwargs["weights"] = None
                keras.utils.set_random_seed(5)
                spy.rgb = app(**kwargs)
                return spy.rgb
            return app(**kwargs)
        constructor.__name__ = app.__name__
        return constructor

    monkeypatch.setattr(backbones, "_application", spy)
    model = build_backbone(eff_b=0, input_shape=(128, 32, 1), pretrained="imagenet")
    assert calls == [None, "imagenet"]
    np.testing.assert_array_equal(model.get_layer("top_conv").get_weights()[0],
                                  spy.rgb.get_layer("top_conv").get_weights()[0])


def test_imagenet_download_failure_is_clear(monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(PretrainedWeightsError, match="ImageNet weights.*pretrained=PATH"):
        build_backbone(eff_b=0, input_shape=(128, 32, 1), pretrained="imagenet")


@pytest.mark.parametrize("model,dim", [("mobilenet_v2", 1280), ("resnet50", 2048)])
def test_table_xiii_baselines(model, dim):
    keras.utils.set_random_seed(0)
    clf = build_classifier(3, model=model, att_head=1, target_length=64)
    assert clf.get_layer("backbone").outputs[0].shape[1:] == (4, 2, dim)
    fb = np.random.default_rng(0).normal(size=(2, 64, 128)).astype(np.float32)
    scores = clf(fb).numpy()
    assert scores.shape == (2, 3) and np.all((scores > 0) & (scores < 1))
    stem = clf.get_layer("backbone").get_layer(backbones.stem_layer_name(model))
    assert stem.get_weights()[0].shape[2] == 1
    if model == "mobilenet_v2":   # GAP + linear + sigmoid on the pooled features
        feats = keras.Model(clf.inputs, clf.get_layer("global_pool").output)(fb).numpy()
        k, b = clf.get_layer("pooling").get_weights()
        np.testing.assert_allclose(scores, 1 / (1 + np.exp(-(feats @ k + b))), rtol=1e-5)
    else:
        assert isinstance(clf.get_layer("pooling"), AttentionPooling)


@pytest.mark.parametrize("model,blocks", [("efficientnet", 9), ("mobilenet_v2", 10),
                                          ("resnet50", 16), ("cnn", 0)])
def test_residual_blocks_start_as_identity(model, blocks):
    """zero γ (Goyal et al. 2017): each residual branch's closing BatchNorm starts at γ = 0, so
    in inference mode the branch outputs 0 and every Add returns its shortcut input exactly;
    every other BatchNorm keeps γ = 1, and ``zero_residual=False`` leaves all at 1."""
    keras.utils.set_random_seed(0)
    shape = (64, 32, 1)
    kw = {"eff_b": 0} if model == "efficientnet" else {}
    b = build_backbone(model, input_shape=shape, **kw)
    plain = build_backbone(model, input_shape=shape, zero_residual=False, **kw)
    bns = [layer for layer in b.layers if isinstance(layer, keras.layers.BatchNormalization)]
    zero = [layer.name for layer in bns if not np.any(layer.gamma.numpy())]
    assert len(zero) == blocks
    assert all(np.all(layer.gamma.numpy() == 1) for layer in bns if layer.name not in zero)
    assert all(np.all(layer.gamma.numpy() == 1) for layer in plain.layers
               if isinstance(layer, keras.layers.BatchNormalization))
    adds = [layer for layer in b.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == blocks

    def producer(tensor):            # the layer whose output feeds the Add (through dropout)
        op = tensor._keras_history.operation
        while isinstance(op, keras.layers.Dropout):
            op = op.input._keras_history.operation
        return op.name
    for add in adds:                 # one input of every Add is a zeroed BatchNorm ...
        assert len({producer(t) for t in add.input} & set(zero)) == 1, add.name
    rng = np.random.default_rng(0)
    for name in zero:                # ... which outputs exactly 0 in inference mode
        bn = b.get_layer(name)
        x = rng.normal(1.0, 3.0, size=(2, 8, 4, bn.gamma.shape[0])).astype(np.float32)
        assert not np.any(bn(x, training=False))


def test_cnn_is_panns_cnn10_layout():
    """width 1: PANNs CNN10's feature extractor (Kong et al. 2020, 5.2 M parameters with its
    two dense layers): conv kernels Σ 9·in·out over (1→64→64, 64→128→128, 128→256→256,
    256→512→512) plus BN γ, β; four 2×2 poolings."""
    convs = [(1, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512),
             (512, 512)]
    expected = sum(9 * i * o + 2 * o for i, o in convs)                   # 4,686,144
    b = build_backbone("cnn", input_shape=(128, 1056, 1))
    assert sum(int(np.prod(w.shape)) for w in b.trainable_weights) == expected
    assert b.outputs[0].shape[1:] == (8, 66, 512) and backbones.backbone_channels("cnn") == 512
    assert backbones.cnn_channels(0.25) == (16, 32, 64, 128)
    dropouts = [la for la in b.layers if isinstance(la, keras.layers.Dropout)]
    assert [la.rate for la in dropouts] == [backbones.CNN_DROPOUT] * 4
    keras.utils.set_random_seed(0)
    clf = build_classifier(3, model="cnn", cnn_width=0.25, att_head=2, target_length=48)
    assert clf.get_layer("backbone").outputs[0].shape[1:] == (8, 3, 128)
    assert isinstance(clf.get_layer("pooling"), MultiHeadAttentionPooling)
    stem = clf.get_layer("backbone").get_layer(backbones.stem_layer_name("cnn"))
    assert stem.get_weights()[0].shape == (3, 3, 1, 16)


def test_cnn_refuses_imagenet_and_short_inputs():
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights.*pretrained=none"):
        build_backbone("cnn", input_shape=(128, 64, 1), pretrained="imagenet")
    with pytest.raises(ValueError, match=">= 16"):
        build_backbone("cnn", input_shape=(128, 12, 1))
    with pytest.raises(ValueError, match="width"):
        backbones.cnn_channels(0)


def test_cnn_tagger_keras_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    m = build_tagger(3, model="cnn", cnn_width=0.25, att_head=2, target_length=TARGET,
                     freqm=0, timem=0)
    m.save(tmp_path / "cnn.keras")
    back = keras.models.load_model(tmp_path / "cnn.keras")
    x = {"waveform": np.random.default_rng(0).normal(size=(2, 10480)).astype(np.float32),
         "num_samples": np.array([10480, 8000], np.int32)}
    np.testing.assert_array_equal(m.predict_on_batch(x), back.predict_on_batch(x))


@pytest.fixture(scope="module")
def tiny_tagger():
    keras.utils.set_random_seed(0)
    return build_tagger(4, eff_b=0, att_head=2, target_length=TARGET, freqm=8, timem=10,
                        seed=1)


def test_tagger_equals_classifier_on_expected_fbank(shared, tiny_tagger):
    batch, n, waves, _ = _batch(shared)
    scores = tiny_tagger({"waveform": batch, "num_samples": n}).numpy()
    assert scores.shape == (len(CLIPS), 4) and scores.dtype == np.float32
    fb = np.stack([(_pad(kaldi_fbank(w - w.mean()).numpy(), TARGET) - params.DATASET_MEAN)
                   / params.DATASET_STD for w in waves])
    expected = tiny_tagger.get_layer("classifier")(fb).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    # classifier by hand: transpose to [mel, time, 1], backbone, mean over frequency, heads
    clf = tiny_tagger.get_layer("classifier")
    feat = clf.get_layer("backbone")(np.transpose(fb, (0, 2, 1))[..., None]).numpy()
    by_hand = clf.get_layer("pooling")(feat.mean(axis=1)).numpy()
    np.testing.assert_allclose(scores, by_hand, rtol=1e-4, atol=1e-5)
    # embeddings: mean over frequency and time of the backbone output
    emb = embedding_model(tiny_tagger)({"waveform": batch, "num_samples": n}).numpy()
    np.testing.assert_allclose(emb, feat.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    emb_clf = embedding_model(clf)(fb).numpy()
    np.testing.assert_allclose(emb_clf, emb, rtol=1e-4, atol=1e-5)


def test_embedding_needs_a_backbone_and_a_pooling_head():
    """A model without the classifier's backbone → pooling structure is refused, one line."""
    x = keras.Input((8, 4))
    plain = keras.Model(x, keras.layers.Dense(3, name="pooling")(x), name="plain")
    with pytest.raises(ValueError, match="no backbone → pooling structure"):
        classifier_with_embedding(plain)
    with pytest.raises(ValueError, match="neither a tagger"):
        embedding_model(plain)
    from psla_tf.export import ExportError, _dual_classifier
    with pytest.raises(ExportError, match="no backbone → pooling structure"):
        _dual_classifier(plain)


def test_tagger_jit_and_keras_round_trip(tiny_tagger, tmp_path):
    rng = np.random.default_rng(2)
    inputs = {"waveform": rng.normal(0, 0.1, (2, 12000)).astype(np.float32),
              "num_samples": np.array([12000, 7000], np.int32)}
    eager = tiny_tagger(inputs).numpy()
    jit = tf.function(lambda d: tiny_tagger(d, training=False), jit_compile=True)
    np.testing.assert_allclose(jit(inputs).numpy(), eager, rtol=1e-4, atol=1e-5)
    path = tmp_path / "tagger.keras"
    tiny_tagger.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(inputs).numpy(), tiny_tagger(inputs).numpy(), rtol=1e-6)
    front = loaded.get_layer("frontend")
    assert isinstance(front, AudioFrontend) and (front.freqm, front.timem) == (8, 10)
    assert isinstance(loaded.get_layer("classifier").get_layer("pooling"),
                      MultiHeadAttentionPooling)


def test_mixed_precision_keeps_float32_ends():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        tagger = build_tagger(3, eff_b=0, att_head=2, target_length=32)
        clf = tagger.get_layer("classifier")
        assert clf.get_layer("backbone").get_layer("stem_conv").compute_dtype == "float16"
        assert tagger.get_layer("frontend").compute_dtype == "float32"
        assert clf.get_layer("pooling").compute_dtype == "float32"
        out = tagger({"waveform": np.zeros((1, 8000), np.float32),
                      "num_samples": np.array([8000], np.int32)})
        assert out.dtype == tf.float32 and tagger.outputs[0].dtype == "float32"
        assert np.all(np.isfinite(out.numpy()))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_single_label_scores_keep_their_gradient_above_one(tmp_path):
    """--loss=ce output: ``form="scores"`` is p / Σp (NumPy) for multi-head scores above 1,
    and the CE loss pushes a wrong class scored 1.07 down (the ``logit`` form's clamp gives
    it no gradient); the tagger builds the ``scores`` form, and a layer saved without a
    form (models from before) loads as ``logit``, outputs unchanged."""
    from psla_tf.models.tagger import SingleLabelScores
    p = np.array([[0.2, 1.07, 0.5], [1e-9, 0.3, 0.9]], np.float32)
    want = np.maximum(p, params.CLAMP_EPS) / np.maximum(p, params.CLAMP_EPS).sum(1,
                                                                                  keepdims=True)
    np.testing.assert_allclose(SingleLabelScores(form="scores")(p), want, rtol=1e-6)
    grads = {}
    for form in SingleLabelScores.FORMS:
        x = tf.Variable(p[:1])
        with tf.GradientTape() as tape:
            loss = -tf.math.log(SingleLabelScores(form=form)(x)[0, 2])   # true class 2
        grads[form] = tape.gradient(loss, x).numpy()[0]
    assert grads["scores"][1] > 0.1          # descent lowers the wrong class's score
    assert grads["logit"][1] == 0.0          # clamped: nothing lowers it
    old = SingleLabelScores.from_config({"name": "single_label", "trainable": True})
    assert old.form == "logit"
    lg = np.log(np.clip(p, 1e-7, 1 - 1e-7)) - np.log1p(-np.clip(p, 1e-7, 1 - 1e-7))
    np.testing.assert_allclose(old(p), np.exp(lg) / np.exp(lg).sum(1, keepdims=True),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="form"):
        SingleLabelScores(form="softmax")
    model = build_tagger(3, model="cnn", cnn_width=0.25, att_head=2, target_length=40,
                         freqm=0, timem=0, single_label=True, pretrained="none")
    assert model.get_layer("single_label").form == "scores"
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    assert back.get_layer("single_label").form == "scores"
