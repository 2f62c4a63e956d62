"""Fine-tuning (psla_tf/training/finetune.py): --init_from copies every matching layer and
re-initialises the heads when the vocabulary differs; FreezeBackbone trains the head alone
first; the single-label (CE / accuracy) path end to end through main.py.

Truth: the source model's weight arrays (NumPy equality), the target's own fresh
initialisation, weights snapshotted after each epoch, accuracy recomputed with NumPy from the
saved predictions.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TL = 48  # frames


def _tagger(num_classes, seed, single_label=False, num_mel_bins=128):
    import keras
    from psla_tf.models.tagger import build_tagger
    keras.utils.set_random_seed(seed)
    m = build_tagger(num_classes, model="cnn", cnn_width=0.25, att_head=2, target_length=TL,
                     freqm=0, timem=0, single_label=single_label, pretrained="none",
                     num_mel_bins=num_mel_bins)
    rng = np.random.default_rng(seed)  # distinct BN statistics, so copying them is visible
    for v in m.weights:
        if "moving_variance" in v.path:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        elif "moving_mean" in v.path:
            v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
    return m


def _save(model, folder, mids):
    from psla_tf.data.records import write_label_csv
    os.makedirs(folder, exist_ok=True)
    write_label_csv(os.path.join(folder, "labels.csv"), mids, mids)
    path = os.path.join(folder, "model.keras")
    model.save(path)
    return path


def _by_path(model):
    from psla_tf.training.finetune import weighted_layers
    return {p: [np.array(w) for w in layer.get_weights()] for p, layer in weighted_layers(model)}


def _equal(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y)
                                    for x, y in zip(a, b))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    model = _tagger(3, seed=1)
    return model, _save(model, str(d), ["/m/a", "/m/b", "/m/c"])


def test_different_vocabulary_copies_backbone_and_renews_heads(source):
    from psla_tf.training.finetune import init_from
    src_model, path = source
    src = _by_path(src_model)
    # same number of classes but other classes: shapes match, the head must still be new
    target = _tagger(3, seed=2)
    fresh = _by_path(target)
    report = init_from(target, path, target_mids=["/m/x", "/m/y", "/m/z"])
    got = _by_path(target)
    assert report.heads_reinitialised == ["classifier/pooling"]
    assert not report.same_vocabulary and "re-initialised" in report.describe()
    backbone = [p for p in got if p.startswith("classifier/backbone/")]
    assert len(backbone) == 16       # every weighted layer: the cnn's 8 convolutions + 8 BNs
    for p in backbone:  # kernels, biases and BatchNorm moving statistics
        assert _equal(got[p], src[p]), p
        assert not _equal(got[p], fresh[p]) or not any(x.size for x in got[p]), p
    assert _equal(got["classifier/pooling"], fresh["classifier/pooling"])
    assert not _equal(got["classifier/pooling"], src["classifier/pooling"])
    assert report.copied_params + sum(x.size for x in fresh["classifier/pooling"]) == \
        report.total_params
    # 5 classes: also a new head (its shape differs), reported the same way
    target5 = _tagger(5, seed=3)
    r5 = init_from(target5, path, target_mids=[f"/m/{k}" for k in "vwxyz"])
    assert r5.heads_reinitialised == ["classifier/pooling"] and r5.source_classes == 3
    assert r5.target_classes == 5 and not r5.mismatched


def test_same_vocabulary_copies_everything(source):
    import keras
    from psla_tf.training.finetune import init_from
    src_model, path = source
    target = _tagger(3, seed=4)
    report = init_from(target, path, target_mids=["/m/a", "/m/b", "/m/c"])
    assert report.same_vocabulary and not report.heads_reinitialised
    assert report.copied_params == report.total_params
    x = {"waveform": np.random.default_rng(0).normal(0, 0.1, (2, 8000)).astype("float32"),
         "num_samples": np.array([8000, 6000], "int32")}
    np.testing.assert_allclose(keras.ops.convert_to_numpy(target(x)),
                               keras.ops.convert_to_numpy(src_model(x)), atol=1e-6)


def test_fewer_mel_bins_keep_every_weight(source):
    """--num_mel_bins=64 fine-tuned from a 128-bin model: every weight has the same shape
    (convolutions, BatchNorm, the pooling head), so everything is copied; the 64-bin model
    still scores its own input."""
    import keras
    from psla_tf.training.finetune import init_from
    src_model, path = source
    target = _tagger(3, seed=5, num_mel_bins=64)
    assert target.get_layer("frontend").num_mel_bins == 64
    report = init_from(target, path, target_mids=["/m/a", "/m/b", "/m/c"])
    assert report.copied_params == report.total_params and not report.mismatched
    src, got = _by_path(src_model), _by_path(target)
    assert all(_equal(got[p], src[p]) for p in got)
    x = {"waveform": np.random.default_rng(0).normal(0, 0.1, (2, 8000)).astype("float32"),
         "num_samples": np.array([8000, 6000], "int32")}
    assert keras.ops.convert_to_numpy(target(x)).shape == (2, 3)


def test_init_from_epoch_checkpoint(tmp_path, source):
    """An epoch_NNN.weights.h5 of a run: rebuilt from the run's flags.txt and labels.csv."""
    import dataclasses
    from psla_tf.data.records import write_label_csv
    from psla_tf.training.finetune import init_from
    from psla_tf.config import TrainConfig, flagfile_text
    src_model, _ = source
    exp = tmp_path / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    cfg = dataclasses.replace(TrainConfig(), model="cnn", cnn_width=0.25, att_head=2,
                              target_length=TL, freqm=0, timem=0, pretrained="none", train_data="x", eval_data="y", exp_dir=str(exp),
                              dataset_mean=-5.0, dataset_std=4.0)
    (exp / "flags.txt").write_text(flagfile_text(cfg))
    write_label_csv(str(exp / "labels.csv"), ["/m/a", "/m/b", "/m/c"], ["a", "b", "c"])
    ckpt = exp / "checkpoints" / "epoch_003.weights.h5"
    src_model.save_weights(str(ckpt))
    target = _tagger(4, seed=5)
    report = init_from(target, str(ckpt), target_mids=["/m/a", "/m/b", "/m/c", "/m/d"])
    assert report.heads_reinitialised == ["classifier/pooling"]
    src, got = _by_path(src_model), _by_path(target)
    assert all(_equal(got[p], src[p]) for p in got if "backbone" in p)


def test_init_from_errors(tmp_path):
    import keras
    from psla_tf.data.records import DataError
    from psla_tf.training.finetune import init_from
    with pytest.raises(DataError, match="does not exist"):
        init_from(_tagger(2, seed=0), str(tmp_path / "nope.keras"))
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    other.save(str(tmp_path / "other.keras"))
    with pytest.raises(DataError, match="no layer matches"):
        init_from(_tagger(2, seed=0), str(tmp_path / "other.keras"))


def test_freeze_backbone_trains_head_first():
    import keras
    from psla_tf.training.finetune import FreezeBackbone, backbone_of
    from psla_tf.training.optim import TorchAdam, make_loss
    model = _tagger(3, seed=6)
    model.compile(optimizer=TorchAdam(1e-3), loss=make_loss("bce"))
    rng = np.random.default_rng(0)
    n, s = 8, (TL - 1) * 160 + 400
    x = {"waveform": rng.normal(0, 0.1, (n, s)).astype("float32"),
         "num_samples": np.full(n, s, "int32")}
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, n)]
    snaps = [_by_path(model)]

    class Snap(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snaps.append(_by_path(self.model))

    freeze = FreezeBackbone(1, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, callbacks=[freeze, Snap()], verbose=0)
    bb = [p for p in snaps[0] if "/backbone/" in p]
    # epoch 1: backbone (weights and BN statistics) untouched, head trained
    assert all(_equal(snaps[1][p], snaps[0][p]) for p in bb)
    assert not _equal(snaps[1]["classifier/pooling"], snaps[0]["classifier/pooling"])
    # epoch 2: the backbone trains too; the model ends fully trainable
    changed = [p for p in bb if not _equal(snaps[2][p], snaps[1][p])]
    assert len(changed) > len(bb) // 2
    assert backbone_of(model).trainable and not freeze.frozen


# ----------------------------------------------------------------------------- end to end
def _write_set(prefix, n, seed, mids, freqs):
    """Single-label tones, one frequency per class, with a manifest (the trainer's input)."""
    import tensorflow as tf
    from psla_tf.data import records
    rng = np.random.default_rng(seed)
    t = np.arange(6400) / 16000.0
    counts = np.zeros(len(mids), int)
    shard = records.shard_name(prefix, 0, 1)
    with tf.io.TFRecordWriter(shard) as wr:
        for i in range(n):
            k = i % len(mids)
            w = 0.05 * rng.normal(size=t.size) + 0.3 * np.sin(2 * np.pi * freqs[k] * t)
            counts[k] += 1
            wr.write(records.make_example(f"c{i}.wav", records.float_to_int16(w), [k],
                                          [mids[k]]))
    records.Manifest(num_examples=n, shards=[{"file": os.path.basename(shard),
                                              "num_examples": n}],
                     mids=list(mids), names=list(mids), class_counts=counts.tolist(),
                     max_seconds=0.4, fbank_mean=-6.0, fbank_std=4.0, fbank_frames=38 * n,
                     listed=n + 2).write(records.manifest_path(prefix))
    return prefix + "-*.tfrecord"


def _main(*args):
    """main.py, in-process (helpers_cli.run_script)."""
    from helpers_cli import run_script
    return run_script("main.py", *args)


TINY = ["--n_epochs=2", "--batch_size=4", "--eval_batch_size=8", "--lr=1e-3",
        "--warmup_steps=2", "--warmup_every=1", "--lrscheduler_start=1",
        "--lrscheduler_step=1", "--nowa", "--model=cnn", "--cnn_width=0.25", "--att_head=2",
        "--target_length=48",
        "--freqm=0", "--timem=0", "--shuffle_buffer=16", "--verbose=2", "--mixup=0",
        "--nobalanced_sampling", "--pretrained=none"]


def test_main_init_from_new_vocabulary_ce_accuracy(tmp_path, source):
    """main.py --init_from (other vocabulary) --freeze_backbone_epochs --loss=ce
    --metric=accuracy: heads re-initialised and said so, softmax outputs, accuracy in the
    per-epoch results and the summary equal to NumPy on the saved predictions."""
    _, src_path = source
    mids = ["/m/lo", "/m/mid", "/m/hi", "/m/top"]
    freqs = [300.0, 900.0, 2500.0, 5000.0]
    tr = _write_set(str(tmp_path / "train"), 16, 0, mids, freqs)
    ev = _write_set(str(tmp_path / "eval"), 8, 1, mids, freqs)
    exp = tmp_path / "exp"
    r = _main(*TINY, "--loss=ce", "--metric=accuracy", f"--init_from={src_path}",
              "--freeze_backbone_epochs=1", f"--train_data={tr}", f"--eval_data={ev}",
              f"--exp_dir={exp}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "re-initialised head(s) classifier/pooling" in r.stdout
    assert "backbone frozen" in r.stdout and "backbone unfrozen" in r.stdout
    s = json.loads((exp / "summary.json").read_text())
    assert s["metric"] == "accuracy" and s["init_from"] == src_path
    assert s["coverage"]["train"] == {"written": 16, "listed": 18}
    targets = np.load(exp / "predictions" / "eval_targets.npy")
    accs = []
    for h in s["per_epoch"]:
        scores = np.load(exp / "predictions" / f"eval_epoch_{h['epoch']:03d}.npy")
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)  # softmax output
        accs.append(np.mean(scores.argmax(1) == targets.argmax(1)))
        assert h["accuracy"] == pytest.approx(accs[-1])
    assert s["single"]["accuracy"] == pytest.approx(np.mean(accs))
    assert "accuracy" in r.stdout.split("single")[0].splitlines()[-1]  # table header
    prov = json.loads((exp / "provenance.json").read_text())
    assert prov["init_from"]["heads_reinitialised"] == ["classifier/pooling"]


@pytest.mark.parametrize("recipe", ["custom_singlelabel", "custom_multilabel", "esc50",
                                    "fsdd"])
def test_recipes_parse_and_need_init_from(recipe):
    """configs/*.flags parse into a valid TrainConfig. The fine-tuning recipes (the head is
    trained alone first) refuse to start without --init_from with a message saying what to
    pass, and are valid with it or when training from scratch as the message suggests."""
    from absl import flags
    from psla_tf.training.flags import config_from_flags, define_flags
    from psla_tf.errors import ConfigError
    from psla_tf.training.plan import check_config
    path = os.path.join(ROOT, "configs", f"{recipe}.flags")

    def cfg(*extra):
        fv = flags.FlagValues()
        define_flags(fv)
        flags.DEFINE_float("max_seconds", 10.0, "tools/cross_validate.py's", flag_values=fv)
        fv(["main.py", f"--flagfile={path}", "--train_data=t", "--eval_data=e",
            "--exp_dir=x", *extra])
        return config_from_flags(fv)

    c = cfg()
    if c.freeze_backbone_epochs and not c.init_from:
        with pytest.raises(ConfigError, match=r"pass --init_from=MODEL .* from scratch with "
                                              r"--freeze_backbone_epochs=0"):
            check_config(c)
        check_config(cfg("--init_from=exp/audioset"))
        check_config(cfg("--freeze_backbone_epochs=0", "--lr=1e-3"))
    else:
        check_config(c)
    assert c.loss in ("ce", "bce") and (c.loss == "ce") == (c.metric == "accuracy")
