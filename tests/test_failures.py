"""Failures become clear messages (issue 7, section 4).

* NaN/Inf loss: the run stops naming the step and epoch; the last committed checkpoint stays
  (in-process with a tiny Keras model whose data turns NaN in epoch 2, and end-to-end through
  main.py with a normalisation that overflows: exit 1, one line, no traceback).
* a truncated shard: an error naming it (exit 2); with --skip_corrupt_records the run
  finishes and the skipped shard and lost records are logged and in summary.json.
* an empty glob, a missing manifest, different vocabularies, eval classes without positives
  (excluded, reported; all classes → error), contradictory flags: errors raised by
  ``trainer.train`` before a model is built.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from test_train_e2e import MIDS, TINY, _write_set

from psla_tf.data import records
from psla_tf.data.records import DataError
from psla_tf.training import trainer
from psla_tf.training import plan


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fail_data")
    return _write_set(str(d / "train"), 16, 0), _write_set(str(d / "eval"), 9, 1), d


def _cfg(data, tmp_path, **kw):
    train, ev, _ = data
    base = dict(train_data=train, eval_data=ev, exp_dir=str(tmp_path / "exp"), n_epochs=2,
                batch_size=4, eval_batch_size=8, wa_start=1, wa_end=2, model="cnn", cnn_width=0.25,
                att_head=2, target_length=48, freqm=8, timem=8, shuffle_buffer=16, pretrained="none")
    base.update(kw)
    return trainer.TrainConfig(**base)


# ----------------------------------------------------------------------------- NaN / Inf
def test_nan_loss_names_step_and_epoch_and_keeps_last_checkpoint(tmp_path):
    import keras
    import tensorflow as tf

    from psla_tf.training import resume
    from psla_tf.training.callbacks import NonFiniteLossError, StopOnNonFiniteLoss

    x = np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32)
    x[4 * 3 + 1] = np.nan  # epoch 2 (3 batches of 4 per epoch), its first batch
    y = np.ones((24, 1), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    exp = str(tmp_path)
    os.makedirs(os.path.join(exp, "checkpoints"))
    cbs = [StopOnNonFiniteLoss(os.path.join(exp, "checkpoints")),
           resume.ResumeCheckpoint(exp, [])]
    with pytest.raises(NonFiniteLossError,
                       match=r"loss is nan at step 4 \(epoch 2, batch 1\); the last good "
                             r"checkpoint is epoch 1"):
        model.fit(ds.take(3).concatenate(ds.skip(3)), epochs=3, steps_per_epoch=3,
                  callbacks=cbs, verbose=0)
    assert resume.committed_epoch(exp) == 1
    assert sorted(os.listdir(os.path.join(exp, "checkpoints"))) == [
        "epoch_001.weights.h5", "state_001.npz"]
    good = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    good.load_weights(os.path.join(exp, "checkpoints", "epoch_001.weights.h5"))
    assert all(np.all(np.isfinite(w)) for w in good.get_weights())


def test_nan_loss_end_to_end_exit_1(main_runs):
    p, exp = main_runs["nan"]()
    assert p.returncode == 1, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "at step 1 (epoch 1, batch 1)" in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not os.path.exists(f"{exp}/train_state.json")


# ----------------------------------------------------------------------------- corrupt shards
@pytest.fixture(scope="module")
def corrupt(data, tmp_path_factory):
    """Two train shards, the second cut in the middle of a record."""
    d = tmp_path_factory.mktemp("corrupt")
    from helpers_data import write_shards
    rng = np.random.default_rng(3)
    t = np.arange(6400) / 16000.0
    waves, labels = [], []
    for i in range(16):
        labels.append([i % 3])
        waves.append(records.float_to_int16(0.3 * np.sin(2 * np.pi * (300 + 900 * (i % 3))
                                                         * t) + 0.05 * rng.normal(size=t.size)))
    glob = write_shards(str(d), waves, labels, 3, num_shards=2)
    m = records.read_manifest(records.manifest_path(str(d / "train")))
    m.mids, m.names, m.max_seconds = list(MIDS), [x.strip("/") for x in MIDS], 0.4
    m.write(records.manifest_path(str(d / "train")))
    bad = os.path.join(str(d), m.shards[1]["file"])
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:
        f.truncate(size // 2 + 7)
    return glob, bad


@pytest.fixture(scope="module")
def main_runs(data, corrupt, tmp_path_factory):
    """The three main.py runs of this file, in-process through the command's ``main()``
    (helpers_cli), each made when a test first asks for it:
    name → () → (CompletedProcess, exp_dir)."""
    from helpers_cli import lazy_runs
    train, ev, _ = data
    glob, _ = corrupt
    d = tmp_path_factory.mktemp("main_runs")
    runs = {  # normalised fbank overflows
        "nan": [f"--train_data={train}", f"--eval_data={ev}", *TINY, "--dataset_mean=0",
                "--dataset_std=1e-38"],
        "corrupt": [f"--train_data={glob}", f"--eval_data={ev}", *TINY, "--n_epochs=1",
                    "--wa_end=1"],
        "skip": [f"--train_data={glob}", f"--eval_data={ev}", *TINY, "--n_epochs=1",
                 "--wa_end=1", "--skip_corrupt_records"],
    }
    get = lazy_runs("main.py", {name: [*args, f"--exp_dir={d / name / 'x'}"]
                                for name, args in runs.items()})
    return {name: (lambda name=name: (get(name), str(d / name / "x"))) for name in runs}


def test_corrupt_shard_error_names_it(corrupt, main_runs):
    glob, bad = corrupt
    p, _ = main_runs["corrupt"]()
    assert p.returncode == 2, p.stderr[-3000:]
    assert "error: corrupt or truncated TFRecord shard" in p.stderr and bad in p.stderr
    assert "Traceback" not in p.stderr


def test_skip_corrupt_records_counts_and_logs(corrupt, main_runs):
    glob, bad = corrupt
    p, exp = main_runs["skip"]()
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.load(open(f"{exp}/summary.json"))
    read, listed = s["corrupt_records"]["shards"][bad]
    assert listed == 8 and 0 <= read < 8
    assert s["corrupt_records"]["records_lost"] == listed - read
    assert f"skipped 1 corrupt shard(s), {listed - read} record(s) lost: {bad}" in p.stdout
    assert "corrupt or truncated TFRecord shard" in p.stderr  # logged when it happens


# ----------------------------------------------------------------------------- before training
def test_empty_glob(data, tmp_path):
    with pytest.raises(DataError, match="--train_data: no TFRecord shards match"):
        trainer.train(_cfg(data, tmp_path, train_data=str(tmp_path / "none-*.tfrecord")))


def test_missing_manifest(data, tmp_path):
    train, _, d = data
    src = train.replace("-*.tfrecord", "-00000-of-00001.tfrecord")
    shutil.copy(src, tmp_path / "lone-00000-of-00001.tfrecord")
    with pytest.raises(DataError, match="manifest"):
        trainer.train(_cfg(data, tmp_path, train_data=str(tmp_path / "lone-*.tfrecord")))


def test_vocabulary_mismatch(data, tmp_path):
    other = _write_set(str(tmp_path / "other"), 4, 2, ["/m/x", "/m/b", "/m/c"])
    with pytest.raises(DataError, match="different vocabularies"):
        trainer.train(_cfg(data, tmp_path, eval_data=other))


def test_eval_classes_without_positives_reported(data, tmp_path, capsys):
    # every eval clip labelled /m/a or /m/b only: /m/c has no positive
    from helpers_data import write_shards
    rng = np.random.default_rng(5)
    waves = [rng.integers(-3000, 3000, 6400).astype("<i2") for _ in range(6)]
    ev = write_shards(str(tmp_path), waves, [[i % 2] for i in range(6)], 3, num_shards=1,
                      prefix="ev2")
    m = records.read_manifest(records.manifest_path(str(tmp_path / "ev2")))
    assert list(m.class_counts) == [3, 3, 0]
    m.mids, m.names = list(MIDS), [x.strip("/") for x in MIDS]
    m.write(records.manifest_path(str(tmp_path / "ev2")))
    r = plan.resolve(_cfg(data, tmp_path, eval_data=ev))
    assert r.eval_without_positives == [2]
    assert trainer.train(_cfg(data, tmp_path, eval_data=ev, dry_run=True)) is None
    out = capsys.readouterr().out
    assert "eval set: 1 of 3 classes have no positive example and are excluded from " \
           "mAP/AUC: m/c" in out
    m.class_counts = [0, 0, 0]
    m.write(records.manifest_path(str(tmp_path / "ev2")))
    with pytest.raises(DataError, match="no positive example of any class"):
        trainer.train(_cfg(data, tmp_path, eval_data=ev))


@pytest.mark.parametrize("kw,message", [
    (dict(wa_start=3, wa_end=3), r"--wa_end \(3\) > --n_epochs \(2\)"),
    (dict(wa_start=2, wa_end=1), "wa_start ≤ --wa_end"),
    (dict(strategy="mirrored", tpu="my-tpu"), "contradicts --strategy=mirrored"),
    (dict(strategy="tpu", mixed_precision="mixed_float16"), "use --mixed_precision=mixed_bf"),
    (dict(strategy="multi_worker"), "needs the TF_CONFIG"),
    (dict(jit_compile=True, deterministic=True), "cannot be combined"),
    (dict(batch_size=64), "larger than the training set"),
])
def test_contradictory_flags_fail_before_training(data, tmp_path, monkeypatch, kw, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(trainer.ConfigError, match=message):
        trainer.train(_cfg(data, tmp_path, **kw))
    assert not os.path.exists(tmp_path / "exp")  # nothing written, nothing built
