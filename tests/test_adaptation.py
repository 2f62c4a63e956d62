"""BatchNorm adaptation to a new domain (psla_tf/models/adaptation.py, tools/adapt.py).

Truth: BatchNorm's definition. With the statistics of one batch, the adapted model in
inference mode computes what the original model computes in training mode on that batch
(batch statistics at every layer; front end and dropout as in inference); the statistics of
several batches are the equal average of the single-batch ones (each batch's forward uses its
own statistics); nothing but the moving statistics changes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from helpers_models import CLIP_SAMPLES, make_tagger, save_tagger


def _batches(seed, n=2, b=4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = (rng.normal(0, 0.1, (b, CLIP_SAMPLES)) * rng.uniform(0.2, 3.0, (b, 1))
             ).astype(np.float32)
        out.append({"waveform": w, "num_samples": np.full(b, CLIP_SAMPLES, np.int32)})
    return out


def _stats(model):
    from psla_tf.models.batchnorm import batchnorm_layers
    return [(layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy())
            for layer in batchnorm_layers(model.get_layer("classifier"))]


def _training_mode_reference(model, x):
    """The original model with batch statistics everywhere (BatchNorm's training mode), the
    front end in inference mode and dropout off — computed without the adapter."""
    import keras
    clf = model.get_layer("classifier")
    drops = [d for d in clf._flatten_layers(include_self=False, recursive=True)
             if isinstance(d, keras.layers.Dropout)]
    rates = [d.rate for d in drops]
    saved = [v.numpy() for v in model.weights]
    try:
        for d in drops:
            d.rate = 0.0
        fb = model.get_layer("frontend")(x["waveform"], x["num_samples"], training=False)
        scores = clf(fb, training=True)
        if "single_label" in {layer.name for layer in model.layers}:
            scores = model.get_layer("single_label")(scores)
        return np.asarray(scores)
    finally:
        for d, r in zip(drops, rates):
            d.rate = r
        for v, w in zip(model.weights, saved):    # the training-mode call moved the stats
            v.assign(w)


@pytest.mark.parametrize("arch", ["cnn", "efficientnet"])
def test_one_batch_adapted_equals_batch_statistics(arch):
    """cnn: Keras BatchNorm and dropout; efficientnet: the fused BatchNorm and drop-connect."""
    from psla_tf.models.adaptation import adapt_batchnorm
    model = make_tagger(3, seed=1, model=arch)
    x = _batches(0, n=1, b=6)[0]
    want = _training_mode_reference(model, x)
    before = model(x, training=False).numpy()
    others = {v.path: v.numpy() for v in model.weights
              if "moving_" not in v.path}
    assert adapt_batchnorm(model, [x], min_clips=2) == 6
    got = model(x, training=False).numpy()
    assert np.abs(got - before).max() > 1e-3                  # the statistics did change
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    for v in model.weights:                                    # only the moving statistics
        if "moving_" not in v.path:
            np.testing.assert_array_equal(v.numpy(), others[v.path])
    import keras
    drops = [d for d in model._flatten_layers(recursive=True)
             if isinstance(d, keras.layers.Dropout)]
    assert drops and all(d.rate > 0 for d in drops)            # rates put back
    from psla_tf.models.batchnorm import batchnorm_layers
    assert all(layer.momentum > 0 for layer in batchnorm_layers(model))


def test_several_batches_average_the_single_batch_statistics():
    """Weighted by clips: a partial last batch counts for its clips."""
    from psla_tf.models.adaptation import adapt_batchnorm
    xs = _batches(3, n=3, b=4)
    xs[2] = {k: v[:2] for k, v in xs[2].items()}
    w = np.array([4, 4, 2], np.float64)[:, None]
    singles = []
    for x in xs:
        m = make_tagger(3, seed=2)
        adapt_batchnorm(m, [x], min_clips=2)
        singles.append(_stats(m))
    m = make_tagger(3, seed=2)
    assert adapt_batchnorm(m, [(x, None) for x in xs], min_clips=2) == 10   # (x, y) tuples
    for k, (mean, var) in enumerate(_stats(m)):
        np.testing.assert_allclose(mean, (w * [s[k][0] for s in singles]).sum(0) / w.sum(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, (w * [s[k][1] for s in singles]).sum(0) / w.sum(),
                                   rtol=1e-5, atol=1e-6)


def test_too_few_clips_and_other_models_are_refused_unchanged():
    import keras
    from psla_tf.models.adaptation import BatchNormAdapter, adapt_batchnorm
    model = make_tagger(3, seed=4)
    before = _stats(model)
    with pytest.raises(ValueError, match="at least 16 clips"):
        adapt_batchnorm(model, _batches(0, n=1, b=4))
    for (m0, v0), (m1, v1) in zip(before, _stats(model)):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v0, v1)
    assert all(d.rate > 0 for d in model._flatten_layers(recursive=True)
               if isinstance(d, keras.layers.Dropout))
    with pytest.raises(ValueError, match="single psla_tf tagger"):
        BatchNormAdapter(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="vocabulary lists 2 classes"):
        BatchNormAdapter(model, ["/m/a", "/m/b"], ["a", "b"])


def _shards(tmp_path, n, seed, level):
    """``n`` int16 noise clips of rising level in one shard of 3 classes: (clips, glob)."""
    from helpers_data import write_shards
    rng = np.random.default_rng(seed)
    waves = [np.clip(rng.normal(0, level * (k + 1), CLIP_SAMPLES) * 32767, -32767, 32767
                     ).astype(np.int16) for k in range(n)]
    (tmp_path / "data").mkdir()
    return waves, write_shards(str(tmp_path / "data"), waves, [[k % 3] for k in range(n)], 3,
                               num_shards=1, prefix="new")


def test_adapt_tool_writes_the_adapted_model(tmp_path):
    """tools/adapt.py on shards (and on a folder of wav files): the written model is the
    library's adaptation of the same clips, with a labels.csv beside it; predict takes it."""
    from helpers_cli import command
    from helpers_models import write_wav
    from psla_tf.data import pipeline
    from psla_tf.models.adaptation import adapt_batchnorm
    from psla_tf.models.loading import load_tagger
    model = make_tagger(3, seed=5)
    src = save_tagger(model, str(tmp_path / "model"))
    waves, shards = _shards(tmp_path, 20, seed=0, level=0.01)
    out = tmp_path / "adapted" / "speaker.keras"
    with command("psla_tf.cli.adapt") as adapt:
        r = adapt(f"--model={src}", f"--data={shards}", f"--output={out}", "--batch_size=8",
                  "--noprogress")
        assert r.code == 0, r.err
        assert "BatchNorm statistics of 20 clips" in r.out
        folder = tmp_path / "wavs"
        (folder / "speaker").mkdir(parents=True)
        for k, w in enumerate(waves[:17]):
            write_wav(str(folder / "speaker" / f"c{k}.wav"), w, 16000)
        r2 = adapt(f"--model={src}", f"--data={folder}", f"--output={tmp_path / 'w.keras'}",
                   "--noprogress")
        r3 = adapt(f"--model={src}", f"--data={folder}", "--min_clips=18",
                   f"--output={tmp_path / 'x.keras'}", "--noprogress")
    assert r2.code == 0 and "of 17 clips" in r2.out, r2.err
    assert r3.code == 2 and r3.error_lines == [
        f"error: --data {folder}: BatchNorm adaptation needs at least 18 clips of the new "
        "domain, got 17"], r3.err
    assert not os.path.exists(tmp_path / "x.keras")
    assert (tmp_path / "adapted" / "labels.csv").exists()
    want = load_tagger(src)
    adapt_batchnorm(want, pipeline.make_eval_dataset(shards, 8, CLIP_SAMPLES))
    got = load_tagger(str(out))
    for (m0, v0), (m1, v1) in zip(_stats(want), _stats(got)):
        np.testing.assert_allclose(m1, m0, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-7)
    with command("psla_tf.cli.predict") as predict:
        r = predict(f"--model={out}", f"--data={shards}", f"--output={tmp_path / 's.npz'}",
                    "--noprogress")
    assert r.code == 0, r.err


# ------------------------------------------------------------ information maximisation
def test_information_maximisation_loss_is_shots_formula():
    """mean_i H(p_i) − H(mean_i p_i), written out in NumPy."""
    from psla_tf.models.adaptation import information_maximisation_loss
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(5, 0.7), size=8).astype(np.float32)
    h = lambda q: -(q * np.log(q)).sum(-1)                      # noqa: E731
    want = h(p).mean() - h(p.mean(0))
    np.testing.assert_allclose(float(information_maximisation_loss(p)), want, rtol=1e-5)
    one_hot = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4]]       # confident and diverse
    np.testing.assert_allclose(float(information_maximisation_loss(one_hot)), -np.log(5),
                               rtol=1e-5)
    same = np.tile(np.eye(5, dtype=np.float32)[:1], (5, 1))     # confident, one class
    assert abs(float(information_maximisation_loss(same))) < 1e-5


def _single_label_clips(seed, n=24):
    rng = np.random.default_rng(seed)
    w = (rng.normal(0, 0.1, (n, CLIP_SAMPLES)) * rng.uniform(0.2, 3.0, (n, 1))
         ).astype(np.float32)
    num = rng.integers(CLIP_SAMPLES // 2, CLIP_SAMPLES + 1, n).astype(np.int32)
    w[np.arange(CLIP_SAMPLES)[None, :] >= num[:, None]] = 0.0
    return w, num


def _confident(model, seed=0):
    """Larger class kernels: a random tagger's scores are near-uniform otherwise."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "cla_kernel" in v.path:
            v.assign(rng.normal(0, 1.0, v.shape).astype("float32"))
    return model


def test_information_maximisation_moves_only_batchnorm_scale_and_offset():
    """The IM loss on the clips falls (IM alone); every weight but BatchNorm γ, β is
    unchanged (the moving statistics included); multi-label taggers are refused unchanged."""
    from psla_tf.models.adaptation import (information_maximisation_loss,
                                           maximise_information)
    model = _confident(make_tagger(4, seed=6, single_label=True))
    w, n = _single_label_clips(0)
    x = {"waveform": w, "num_samples": n}
    before = {v.path: v.numpy() for v in model.weights}
    loss0 = float(information_maximisation_loss(model(x, training=False)))
    losses = maximise_information(model, w, n, epochs=6, batch_size=8, learning_rate=1e-2,
                                  pseudo_label_weight=0.0)
    loss1 = float(information_maximisation_loss(model(x, training=False)))
    assert len(losses) == 6 and loss1 < loss0 - 0.01 and losses[-1] < losses[0], (
        loss0, loss1, losses)
    moved = {v.path for v in model.weights if not np.array_equal(v.numpy(), before[v.path])}
    assert moved and all(p.endswith(("/gamma", "/beta")) for p in moved), sorted(moved)
    from psla_tf.models.batchnorm import batchnorm_layers
    affine = {v.path for layer in batchnorm_layers(model.get_layer("classifier"))
              for v in (layer.gamma, layer.beta)}
    assert moved <= affine
    multi = make_tagger(4, seed=6)
    before = [v.numpy() for v in multi.weights]
    with pytest.raises(ValueError, match="single-label"):
        maximise_information(multi, w, n, epochs=1)
    from psla_tf.models.adaptation import adapt_batchnorm
    with pytest.raises(ValueError, match="single-label"):
        adapt_batchnorm(multi, [x], min_clips=2, im_epochs=1)
    for v, b in zip(multi.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_encoder_scope_moves_the_backbone_not_the_head():
    """scope="encoder" (SHOT's choice): the IM loss falls, backbone weights move (convolution
    kernels included), the pooling head and every moving statistic stay; a wrong scope is
    refused before anything moves."""
    from psla_tf.models.adaptation import (adaptable_variables, information_maximisation_loss,
                                           maximise_information)
    model = _confident(make_tagger(4, seed=6, single_label=True))
    w, n = _single_label_clips(0)
    x = {"waveform": w, "num_samples": n}
    before = {v.path: v.numpy() for v in model.weights}
    with pytest.raises(ValueError, match="adaptation scope 'all'"):
        maximise_information(model, w, n, epochs=1, scope="all")
    from psla_tf.models.adaptation import adapt_batchnorm
    with pytest.raises(ValueError, match="adaptation scope 'all'"):
        adapt_batchnorm(model, [x], min_clips=2, im_epochs=1, scope="all")
    assert all(np.array_equal(v.numpy(), before[v.path]) for v in model.weights)
    loss0 = float(information_maximisation_loss(model(x, training=False)))
    losses = maximise_information(model, w, n, epochs=6, batch_size=8, learning_rate=1e-3,
                                  pseudo_label_weight=0.0, scope="encoder")
    loss1 = float(information_maximisation_loss(model(x, training=False)))
    assert loss1 < loss0 - 0.01 and losses[-1] < losses[0], (loss0, loss1, losses)
    moved = {v.path for v in model.weights if not np.array_equal(v.numpy(), before[v.path])}
    head = {v.path for v in model.get_layer("classifier").get_layer("pooling").weights}
    adaptable = {v.path for v in adaptable_variables(model, "encoder")}
    assert not moved & head and moved <= adaptable and not adaptable & head
    assert any(p.endswith("/kernel") for p in moved), sorted(moved)
    assert not any("moving" in p for p in moved)
    bn = {v.path for v in adaptable_variables(model, "batchnorm")}
    assert bn < adaptable and all(p.endswith(("/gamma", "/beta")) for p in bn)


def test_adapt_batchnorm_with_im_epochs_is_statistics_then_im():
    """adapt_batchnorm(im_epochs=k) = adapt_batchnorm, then maximise_information over the
    same clips (cut at their num_samples and padded back: the same arrays)."""
    from psla_tf.models.adaptation import adapt_batchnorm, maximise_information
    w, n = _single_label_clips(1, n=20)
    batches = [{"waveform": w[i:i + 8], "num_samples": n[i:i + 8]} for i in (0, 8, 16)]
    got = _confident(make_tagger(3, seed=7, single_label=True))
    assert adapt_batchnorm(got, batches, min_clips=2, im_epochs=2) == 20
    want = _confident(make_tagger(3, seed=7, single_label=True))
    adapt_batchnorm(want, batches, min_clips=2)
    maximise_information(want, w, n, epochs=2)
    start = _confident(make_tagger(3, seed=7, single_label=True))
    assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in zip(got.weights,
                                                                     start.weights))
    for a, b in zip(got.weights, want.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ SHOT's pseudo-labels
def _shot_reference(probs, features):
    """SHOT's obtain_label (their code): 1 appended, rows normalised, scipy cosine cdist to
    soft centroids, then to the hard labels' centroids over the classes that have clips."""
    from scipy.spatial.distance import cdist
    f = np.concatenate([features, np.ones((len(features), 1))], 1)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    aff = probs
    centroids = aff.T @ f / (1e-8 + aff.sum(0)[:, None])
    labels = cdist(f, centroids, "cosine").argmin(1)
    aff = np.eye(probs.shape[1])[labels]
    present = np.where(aff.sum(0) > 0)[0]
    centroids = aff.T @ f / (1e-8 + aff.sum(0)[:, None])
    return present[cdist(f, centroids[present], "cosine").argmin(1)]


def test_shot_pseudo_labels_are_shots_and_correct_the_classifier():
    """Equal to SHOT's own procedure written with scipy (random cases, one with an empty
    class); on well-separated clusters whose classifier is wrong on 30 % of the clips, the
    centroids label every clip by its cluster."""
    from psla_tf.models.adaptation import shot_pseudo_labels
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, c, d = int(rng.integers(5, 60)), int(rng.integers(2, 8)), int(rng.integers(2, 16))
        probs = rng.dirichlet(np.full(c, 0.3), size=n)
        if trial % 4 == 0:
            probs[:, 0] = 1e-9                                  # a class no clip takes
            probs /= probs.sum(1, keepdims=True)
        features = rng.normal(0, 1, (n, d)) + rng.normal(0, 1, (1, d))
        np.testing.assert_array_equal(shot_pseudo_labels(probs, features),
                                      _shot_reference(probs, features))
    truth = np.repeat(np.arange(4), 25)
    centres = rng.normal(0, 5, (4, 12))
    features = centres[truth] + rng.normal(0, 0.5, (100, 12))
    guess = np.where(rng.random(100) < 0.3, rng.integers(0, 4, 100), truth)
    probs = 0.55 * np.eye(4)[guess] + 0.45 / 4
    assert np.mean(probs.argmax(1) == truth) < 0.85
    np.testing.assert_array_equal(shot_pseudo_labels(probs, features), truth)


def test_balanced_assignment_is_the_balanced_optimum_and_skips_left_out_classes():
    """Against the exact balanced assignment (scipy's linear_sum_assignment with each class
    N/C times): at a small regularisation the same class for >= 95 % of the items and every
    class within +-2 of N/C; a class of -inf scores gets no item."""
    from scipy.optimize import linear_sum_assignment

    from psla_tf.models.adaptation import balanced_assignment
    rng = np.random.default_rng(1)
    n, c = 60, 6
    for _ in range(10):
        scores = rng.uniform(size=(n, c))
        _, slot = linear_sum_assignment(-np.repeat(scores, n // c, axis=1))
        labels = balanced_assignment(scores, epsilon=0.005)
        assert np.mean(labels == slot // (n // c)) >= 0.95
        assert np.abs(np.bincount(labels, minlength=c) - n // c).max() <= 2
    scores = rng.uniform(size=(40, 5))
    scores[:, 2] = -np.inf
    counts = np.bincount(balanced_assignment(scores), minlength=5)
    assert counts[2] == 0 and np.abs(counts[[0, 1, 3, 4]] - 10).max() <= 2
    with pytest.raises(ValueError, match="every class"):
        balanced_assignment(np.full((4, 3), -np.inf))


def test_balanced_pseudo_labels_separate_a_digit_heard_as_its_neighbour():
    """Two classes' clusters close together, the classifier hearing one as the other (its
    true class second, 0.3): over 20 fixed-seed cases the balanced assignment labels more
    clips right than the nearest centroid (mean accuracy +0.05 or more) and spreads them
    evenly (each class 25 +- 5 of 100); an unknown assignment is refused."""
    from psla_tf.models.adaptation import shot_pseudo_labels
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 25)
    centroid, balanced = [], []
    for _ in range(20):
        centres = rng.normal(0, 5, (4, 12))
        centres[1] = centres[0] + rng.normal(0, 1, 12)
        features = centres[truth] + rng.normal(0, 1, (100, 12))
        probs = 0.55 * np.eye(4)[truth] + 0.45 / 4
        probs[truth == 1] = [0.5, 0.3, 0.1, 0.1]
        centroid.append(np.mean(shot_pseudo_labels(probs, features) == truth))
        labels = shot_pseudo_labels(probs, features, assign="balanced")
        balanced.append(np.mean(labels == truth))
        assert np.abs(np.bincount(labels, minlength=4) - 25).max() <= 5
    assert np.mean(balanced) >= np.mean(centroid) + 0.05
    with pytest.raises(ValueError, match="pseudo-label assignment"):
        shot_pseudo_labels(probs, features, assign="nearest")


def test_scores_and_embedding_is_the_model_and_its_embedding():
    """One pass → the tagger's scores and embedding_model's embedding (both architectures)."""
    from psla_tf.models.tagger import embedding_model, scores_and_embedding
    w, n = _single_label_clips(2, n=6)
    for model in (make_tagger(4, seed=3, single_label=True), make_tagger(3, seed=4)):
        scores, emb = scores_and_embedding(model)({"waveform": w, "num_samples": n})
        x = {"waveform": w, "num_samples": n}
        np.testing.assert_allclose(np.asarray(scores), np.asarray(model(x)), atol=1e-6)
        np.testing.assert_allclose(np.asarray(emb), np.asarray(embedding_model(model)(x)),
                                   atol=1e-6)


def test_pseudo_label_term_joins_the_im_loss():
    """One step over all clips: the loss is IM(p) + β·mean_i(−log p_i[ŷ_i]) with ŷ SHOT's
    labels of the model before the step (scipy reference); β = 0 is IM alone, and β
    changes the adapted weights."""
    import tensorflow as tf
    from psla_tf.models.adaptation import (information_maximisation_loss,
                                           maximise_information, shot_pseudo_labels)
    from psla_tf.models.tagger import embedding_model
    w, n = _single_label_clips(3, n=12)
    x = {"waveform": w, "num_samples": n}
    start = _confident(make_tagger(4, seed=9, single_label=True))
    p = np.asarray(start(x, training=False), np.float64)
    labels = _shot_reference(p, np.asarray(embedding_model(start)(x, training=False)))
    im = float(information_maximisation_loss(tf.constant(p, tf.float32)))
    ce = -np.mean(np.log(np.clip(p[np.arange(12), labels], 1e-8, 1.0)))
    results = {}
    for beta in (0.0, 0.3):
        model = _confident(make_tagger(4, seed=9, single_label=True))
        loss = maximise_information(model, w, n, epochs=1, batch_size=12,
                                    pseudo_label_weight=beta)
        # IM is a difference of two O(1) entropies (≤ log 4) that cancel for a confident
        # model: float32 leaves ~1e-7 absolute, so the tolerance is absolute as well
        np.testing.assert_allclose(loss[0], im + beta * ce, rtol=1e-4, atol=1e-6)
        results[beta] = [v.numpy() for v in model.weights]
    assert any(not np.allclose(a, b) for a, b in zip(results[0.0], results[0.3]))
    # the balanced assignment's labels in the same term
    balanced = shot_pseudo_labels(p, np.asarray(embedding_model(start)(x, training=False)),
                                  assign="balanced")
    ce = -np.mean(np.log(np.clip(p[np.arange(12), balanced], 1e-8, 1.0)))
    model = _confident(make_tagger(4, seed=9, single_label=True))
    loss = maximise_information(model, w, n, epochs=1, batch_size=12,
                                pseudo_label_weight=0.3, pseudo_labels="balanced")
    np.testing.assert_allclose(loss[0], im + 0.3 * ce, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="pseudo_label_weight"):
        maximise_information(model, w, n, epochs=1, pseudo_label_weight=-1)
    with pytest.raises(ValueError, match="pseudo_labels"):
        maximise_information(model, w, n, epochs=1, pseudo_labels="nearest")


def test_clip_sample_is_uniform_and_keeps_stream_order():
    """Reservoir sampling: every clip kept with probability capacity / n (binomial tolerance,
    fixed seeds), kept clips in stream order, cut at num_samples and zero-padded."""
    from psla_tf.models.adaptation import ClipSample
    n, cap, trials = 20, 5, 800
    counts = np.zeros(n)
    for seed in range(trials):
        s = ClipSample(cap, seed=seed)
        for start in range(0, n, 6):
            ids = np.arange(start, min(start + 6, n))
            s.add(np.repeat(ids[:, None].astype(np.float32) + 1, 4, 1), np.full(len(ids), 4))
        w, num = s.arrays()
        kept = w[:, 0] - 1
        assert len(kept) == cap and np.all(np.diff(kept) > 0)
        counts[kept.astype(int)] += 1
    p = cap / n
    sd = np.sqrt(trials * p * (1 - p))
    assert np.all(np.abs(counts - trials * p) < 4.5 * sd), counts   # 4.5 sd per clip
    s = ClipSample(10)
    s.add(np.ones((2, 6), np.float32), np.array([3, 6]))
    w, num = s.arrays(min_samples=8)
    np.testing.assert_array_equal(w, [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(num, [3, 6])


def test_adapt_tool_epochs_is_the_library_and_refuses_multi_label(tmp_path):
    """tools/adapt.py --epochs --pseudo_label_weight --pseudo_labels on a single-label
    tagger = adapt_batchnorm(im_epochs, pseudo_label_weight, pseudo_labels) on the same shards; on a multi-label
    tagger: one error line, nothing written."""
    from helpers_cli import command
    from psla_tf.data import pipeline
    from psla_tf.models.adaptation import adapt_batchnorm
    from psla_tf.models.loading import load_tagger
    src = save_tagger(_confident(make_tagger(3, seed=8, single_label=True)),
                      str(tmp_path / "single"))
    multi = save_tagger(make_tagger(3, seed=8), str(tmp_path / "multi"))
    _, shards = _shards(tmp_path, 18, seed=1, level=0.02)
    out = tmp_path / "im.keras"
    with command("psla_tf.cli.adapt") as adapt:
        r = adapt(f"--model={src}", f"--data={shards}", f"--output={out}", "--batch_size=8",
                  "--epochs=2", "--pseudo_label_weight=0.1", "--pseudo_labels=balanced",
                  "--noprogress")
        r2 = adapt(f"--model={multi}", f"--data={shards}", "--epochs=2",
                   f"--output={tmp_path / 'x.keras'}", "--noprogress")
    assert r.code == 0 and "IM epochs" in r.out, r.err
    assert r2.code == 2 and len(r2.error_lines) == 1 and "single-label" in r2.error_lines[0]
    assert not os.path.exists(tmp_path / "x.keras")
    want = load_tagger(src)
    adapt_batchnorm(want, pipeline.make_eval_dataset(shards, 8, CLIP_SAMPLES), im_epochs=2,
                    pseudo_label_weight=0.1, pseudo_labels="balanced")
    got = load_tagger(str(out))
    for a, b in zip(got.weights, want.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    # --scope=encoder --learning_rate: the library's encoder adaptation
    with command("psla_tf.cli.adapt") as adapt:
        r = adapt(f"--model={src}", f"--data={shards}", f"--output={tmp_path / 'enc.keras'}",
                  "--batch_size=8", "--epochs=2", "--scope=encoder", "--learning_rate=1e-4",
                  "--noprogress")
    assert r.code == 0 and "encoder weights by 2 IM epochs" in r.out, r.err
    want = load_tagger(src)
    adapt_batchnorm(want, pipeline.make_eval_dataset(shards, 8, CLIP_SAMPLES), im_epochs=2,
                    scope="encoder", learning_rate=1e-4)
    got = load_tagger(str(tmp_path / "enc.keras"))
    moved = 0
    for a, b, c in zip(got.weights, want.weights, load_tagger(src).weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        moved += a.path.endswith("/kernel") and not np.allclose(a.numpy(), c.numpy())
    assert moved
