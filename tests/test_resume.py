"""Exact resume after real kills (issue 7, section 3).

main.py runs in subprocesses that SIGKILL themselves (``PSLA_FAULT``, see
psla_tf/training/resume.py) mid-epoch, during evaluation and half-way through writing a
checkpoint; each re-run of the same command resumes from the last committed epoch. With
--deterministic the final summary.json must equal an uninterrupted run's: every metric within
1e-6 (in practice bit-identical), the same per-epoch history, weight-averaging and ensemble
epochs; the final weights within 1e-6.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from test_train_e2e import ROOT, _write_set
from psla_tf.training import plan

# The small CNN (--model=cnn at quarter width): the backbone that traces fastest (each of the
# five processes traces the training step); the generator states resume restores are the
# SpecAugment masks' and the backbone's dropout's
ARGS = ["--n_epochs=3", "--batch_size=4", "--eval_batch_size=8", "--lr=1e-3",
        "--warmup_steps=4", "--warmup_every=2", "--lrscheduler_start=1",
        "--lrscheduler_step=1", "--wa_start=2", "--wa_end=3", "--model=cnn",
        "--cnn_width=0.25", "--att_head=2", "--target_length=48", "--freqm=8", "--timem=8",
        "--shuffle_buffer=16", "--verbose=2",
        "--deterministic", "--bn_momentum=0.9", "--pretrained=none"]
TOL = 1e-6


def _start(exp, data, fault=None):
    train, ev = data
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PSLA_FAULT", None)
    if fault:
        env["PSLA_FAULT"] = fault
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"),
                             f"--train_data={train}", f"--eval_data={ev}",
                             f"--exp_dir={exp}", *ARGS], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p, timeout=900):
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def _committed(exp):
    path = os.path.join(exp, "train_state.json")
    return json.load(open(path))["epoch"] if os.path.exists(path) else 0


def _strip(summary):
    return {k: v for k, v in summary.items() if k != "seconds"}


def _assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=TOL), path
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_data")
    return _write_set(str(d / "train"), 16, 0), _write_set(str(d / "eval"), 9, 1)


def test_kills_then_resume_equal_uninterrupted(data, tmp_path):
    ref_exp, exp = str(tmp_path / "ref"), str(tmp_path / "killed")
    ref = _start(ref_exp, data)  # the uninterrupted run, alongside the killed ones
    # 1. killed after batch 2 of epoch 2 (mid-epoch): epoch 1 is committed
    rc, out = _finish(_start(exp, data, "batch:2:2"))
    assert rc == -signal.SIGKILL, out[-3000:]
    assert _committed(exp) == 1
    # 2. resumes after epoch 1, killed while epoch 2 is evaluated
    rc, out = _finish(_start(exp, data, "eval:2"))
    assert rc == -signal.SIGKILL, out[-3000:]
    assert "resuming after epoch 1" in out
    assert _committed(exp) == 1
    # 3. resumes, killed half-way through writing epoch 2's checkpoint
    rc, out = _finish(_start(exp, data, "checkpoint:2"))
    assert rc == -signal.SIGKILL, out[-3000:]
    assert _committed(exp) == 1
    partial = os.path.join(exp, "checkpoints", "tmp-epoch_002.weights.h5")
    assert os.path.exists(partial)  # the half-written file is left behind ...
    assert not os.path.exists(os.path.join(exp, "checkpoints", "epoch_002.weights.h5"))
    # 4. resumes and finishes (the partial file is deleted, never loaded)
    rc, out = _finish(_start(exp, data))
    assert rc == 0, out[-3000:]
    assert "resuming after epoch 1" in out
    assert not os.path.exists(partial)
    rc, ref_out = _finish(ref)
    assert rc == 0, ref_out[-3000:]

    a = json.load(open(os.path.join(ref_exp, "summary.json")))
    b = json.load(open(os.path.join(exp, "summary.json")))
    assert b["weight_averaging"]["epochs"] == [2, 3] and b["ensemble"]["epochs"] == [1, 2, 3]
    _assert_same(_strip(a), _strip(b))
    # the log has one row per epoch, no duplicates from the killed attempts
    la = open(os.path.join(ref_exp, "log.csv")).read().splitlines()
    lb = open(os.path.join(exp, "log.csv")).read().splitlines()
    assert len(la) == len(lb) == 4 and [r.split(",")[0] for r in lb[1:]] == ["0", "1", "2"]
    # final and averaged models: the same weights
    import keras

    import psla_tf.models.tagger  # noqa: F401  (registers the custom layers)
    for name in ("final_model.keras", "wa_model.keras"):
        wa = keras.saving.load_model(os.path.join(ref_exp, name), compile=False).get_weights()
        wb = keras.saving.load_model(os.path.join(exp, name), compile=False).get_weights()
        for x, y in zip(wa, wb):
            np.testing.assert_allclose(x, y, atol=TOL)
    # the state of only the committed epoch is kept
    assert sorted(f for f in os.listdir(os.path.join(exp, "checkpoints"))
                  if f.startswith("state_")) == ["state_003.npz"]


def test_resume_with_other_flags_is_refused(data, tmp_path):
    """Re-running into a folder with other result-changing flags: an error, nothing loaded."""
    from psla_tf import config
    from psla_tf.training import trainer
    train, ev = data
    exp = str(tmp_path / "exp")
    os.makedirs(exp)
    cfg = trainer.TrainConfig(train_data=train, eval_data=ev, exp_dir=exp, n_epochs=2,
                              batch_size=4, wa_start=1, wa_end=2, eff_b=0, target_length=48,
                              pretrained="none")
    cfg_r = plan.resolve(cfg).cfg
    open(os.path.join(exp, "flags.txt"), "w").write(config.flagfile_text(cfg_r))
    json.dump({"epoch": 1}, open(os.path.join(exp, "train_state.json"), "w"))
    with pytest.raises(trainer.ConfigError, match=r"--lr: 0\.0001 → 0\.001"):
        trainer.check_resume_flags(plan.resolve(
            trainer.TrainConfig(**{**cfg.__dict__, "lr": 1e-3})).cfg, exp)
    # flags that do not change the result may differ
    trainer.check_resume_flags(plan.resolve(
        trainer.TrainConfig(**{**cfg.__dict__, "verbose": 2, "strategy": "mirrored",
                                "fused_batchnorm": False})).cfg, exp)
    # the adapted row and its self-training run after training: free on a finished run
    trainer.check_resume_flags(dataclasses.replace(
        cfg_r, adapt_batchnorm=True, adapt_epochs=10, self_train_epochs=3,
        self_train_lr=1e-3), exp)
    # a run written before a flag existed ran with its default: only a new value differs
    text = config.flagfile_text(cfg_r).replace("--num_mel_bins=128\n", "")
    assert "num_mel_bins" not in text
    open(os.path.join(exp, "flags.txt"), "w").write(text)
    trainer.check_resume_flags(cfg_r, exp)
    with pytest.raises(trainer.ConfigError, match=r"--num_mel_bins: None → 64"):
        trainer.check_resume_flags(plan.resolve(
            trainer.TrainConfig(**{**cfg.__dict__, "num_mel_bins": 64})).cfg, exp)
