"""k-fold cross-validation (psla_tf/training/cross_validation.py, tools/cross_validate.py).

Truth: the folds written from the CSV (which clip is in which shard set), accuracy and mAP
recomputed with NumPy/sklearn from each fold's saved predictions, mean and std with NumPy.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf

from psla_tf import metrics
from psla_tf.data import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FREQS = {"low": 300.0, "mid": 1100.0, "high": 3500.0}


def _listing(d, folds=("1", "2"), per=2):
    rng = np.random.default_rng(0)
    t = np.arange(6400) / 16000.0
    (d / "audio").mkdir()
    lines = ["filename,fold,category"]
    for fold in folds:
        for cat, f in FREQS.items():
            for i in range(per):
                name = f"{fold}-{cat}-{i}.wav"
                w = 0.3 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6))
                sf.write(d / "audio" / name, w + 0.02 * rng.normal(size=t.size), 16000,
                         subtype="PCM_16")
                lines.append(f"{name},{fold},{cat}")
    (d / "meta.csv").write_text("\n".join(lines) + "\n")
    return d / "meta.csv"


def _cfg(exp):
    from psla_tf.training.trainer import TrainConfig
    return dataclasses.replace(
        TrainConfig(), exp_dir=str(exp), n_epochs=1, batch_size=4, eval_batch_size=6,
        lr=1e-3, warmup_steps=2, warmup_every=1, wa=False, balanced_sampling=False, mixup=0.0,
        freqm=8, timem=8, target_length=40, eff_b=0, att_head=2, loss="ce",
        metric="accuracy", shuffle_buffer=12, verbose=0, pretrained="none")


def test_two_folds_mean_std_and_resume(tmp_path, capsys):
    from psla_tf.training import cross_validation as cv
    csv_path = _listing(tmp_path)
    exp = tmp_path / "exp"
    res = cv.cross_validate(_cfg(exp), str(csv_path), "fold", audio_root=str(tmp_path / "audio"),
                            target_length=40, progress=False)
    # the folds: each fold's shard set holds exactly that fold's clips
    vocab = records.read_label_csv(str(exp / "data" / "labels.csv"))
    assert vocab[0] == ["high", "low", "mid"]
    for k in ("1", "2"):
        ids = {ex["id"] for ex in records.iter_examples(
            records.expand_glob(str(exp / "data" / f"fold_{k}-*.tfrecord")))}
        assert ids == {f"{k}-{c}-{i}.wav" for c in FREQS for i in range(2)}
    accs, maps = {}, {}
    for k in ("1", "2"):
        pred = exp / f"fold_{k}" / "predictions"
        t = np.load(pred / "eval_targets.npy")
        s = np.load(pred / "eval_epoch_001.npy")
        accs[k] = float(np.mean(s.argmax(1) == t.argmax(1)))
        maps[k] = metrics.evaluate(t, s)["mAP"]
        summary = json.loads((exp / f"fold_{k}" / "summary.json").read_text())
        # trained on the other fold only
        assert summary["train_examples"] == 6 and summary["eval_examples"] == 6
    agg = res["aggregate"]["single"]
    assert agg["accuracy"]["per_fold"] == pytest.approx(accs)
    assert agg["accuracy"]["mean"] == pytest.approx(np.mean(list(accs.values())))
    assert agg["accuracy"]["std"] == pytest.approx(np.std(list(accs.values())))
    assert agg["mAP"]["mean"] == pytest.approx(np.mean(list(maps.values())), abs=1e-6)
    assert json.loads((exp / "cv_summary.json").read_text())["aggregate"] == \
        json.loads(json.dumps(res["aggregate"]))
    text = cv.report(res)
    assert "2-fold cross-validation" in text and "accuracy" in text and "±" in text
    # a re-run trains nothing and gives the same result
    capsys.readouterr()
    again = cv.cross_validate(_cfg(exp), str(csv_path), "fold",
                              audio_root=str(tmp_path / "audio"), target_length=40,
                              progress=False)
    assert capsys.readouterr().out.count("finished earlier") == 2
    assert again["aggregate"] == res["aggregate"]


def test_aggregate_against_numpy():
    from psla_tf.training.cross_validation import aggregate
    per = {str(k): {"single": {"accuracy": a, "mAP": m}} for k, (a, m) in
           enumerate([(0.8, 0.7), (0.9, 0.75), (0.85, 0.9)], start=1)}
    out = aggregate(per, "accuracy")["single"]
    assert out["accuracy"]["mean"] == pytest.approx(np.mean([0.8, 0.9, 0.85]))
    assert out["accuracy"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.85]))
    assert out["mAP"]["std"] == pytest.approx(np.std([0.7, 0.75, 0.9]))


def test_tool_bad_inputs_are_one_line_errors(tmp_path):
    from helpers_proc import Background
    csv_path = _listing(tmp_path, folds=("1",), per=1)
    (tmp_path / "two").mkdir()
    csv_two = _listing(tmp_path / "two", folds=("1", "2"), per=1)
    cases = [
        ([f"--input={csv_path}", "--fold_column=split"], "not a column"),
        ([f"--input={csv_path}", "--fold_column=fold"], "at least 2 folds"),
        ([f"--input={tmp_path / 'none.csv'}"], "not found"),
    ]
    # the four tool runs start together (they overlap), each checked as it was
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    tool = [sys.executable, os.path.join(ROOT, "tools", "cross_validate.py")]
    bg = Background(str(tmp_path / "logs"))
    for i, (args, _) in enumerate(cases):
        bg.start(f"case{i}", [*tool, *args, f"--exp_dir={tmp_path / f'e{i}'}", "--eff_b=0"],
                 env=env)
    bg.start("esc50", [*tool, f"--flagfile={os.path.join(ROOT, 'configs', 'esc50.flags')}",
                       f"--input={csv_two}", f"--audio_root={tmp_path / 'two' / 'audio'}",
                       f"--exp_dir={tmp_path / 'e2'}"], env=env)
    try:
        for i, (args, msg) in enumerate(cases):
            r = bg.result(f"case{i}", 300)
            assert r.returncode == 2, (args, r.stderr[-2000:])
            err = r.stderr.strip().splitlines()
            assert err[-1].startswith("error:") and msg in err[-1], (args, err[-3:])
            assert "Traceback" not in r.stderr
        # the ESC-50 recipe fine-tunes: without --init_from it stops before preparing anything
        r = bg.result("esc50", 300)
    finally:
        bg.close()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "pass --init_from=MODEL" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "e2" / "data").exists()
