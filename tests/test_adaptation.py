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


def test_adapt_tool_writes_the_adapted_model(tmp_path):
    """tools/adapt.py on shards (and on a folder of wav files): the written model is the
    library's adaptation of the same clips, with a labels.csv beside it; predict takes it."""
    from helpers_cli import command
    from helpers_data import write_shards
    from helpers_models import write_wav
    from psla_tf.data import pipeline
    from psla_tf.models.adaptation import adapt_batchnorm
    from psla_tf.models.loading import load_tagger
    model = make_tagger(3, seed=5)
    src = save_tagger(model, str(tmp_path / "model"))
    rng = np.random.default_rng(0)
    waves = [np.clip(rng.normal(0, 0.01 * (k + 1), CLIP_SAMPLES) * 32767, -32767, 32767
                     ).astype(np.int16) for k in range(20)]
    (tmp_path / "data").mkdir()
    shards = write_shards(str(tmp_path / "data"), waves, [[k % 3] for k in range(20)], 3,
                          num_shards=1, prefix="new")
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
