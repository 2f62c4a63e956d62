"""Ensembles (score averaging, Table XI, the psla_ensemble Keras model) and offline weight
averaging of epoch checkpoints (Sec. VI), against NumPy / sklearn computed here."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from psla_tf import params
from helpers_models import CLIP_SAMPLES, SMALL_MODEL, make_tagger, save_tagger
from test_predict import run_tool

C = 5


def sk_map(t, s):
    return np.mean([average_precision_score(t[:, k], s[:, k]) for k in range(t.shape[1])
                    if t[:, k].any()])


def test_score_average_and_table_xi(tmp_path):
    from psla_tf import ensemble
    from psla_tf.prediction import Predictions, load_scores, save_scores
    rng = np.random.default_rng(5)
    t = (rng.random((80, C)) < 0.3).astype(np.float32)
    t[0] = 1
    paths, raw = [], []
    for i in range(3):
        s = np.clip(t * 0.3 + rng.random((80, C)), 0, 1).astype(np.float32)
        raw.append(s)
        paths.append(str(tmp_path / f"m{i}.npz"))
        save_scores(paths[-1], Predictions([f"c{j}" for j in range(80)], s, t,
                                           [f"/m/{k}" for k in range(C)], list("abcde")))
    preds = [load_scores(p) for p in paths]
    ens = ensemble.average_predictions(preds, paths)
    np.testing.assert_allclose(ens.scores, np.mean(raw, axis=0), atol=1e-7)
    row = ensemble.ensemble_table(preds, paths)
    member = [sk_map(t, s) for s in raw]
    assert row["num_models"] == 3
    assert row["avg_mAP"] == pytest.approx(np.mean(member), abs=1e-6)
    assert row["best_mAP"] == pytest.approx(np.max(member), abs=1e-6)
    assert row["ensemble_mAP"] == pytest.approx(sk_map(t, np.mean(raw, axis=0)), abs=1e-6)
    # the tool: table printed, scores written, JSON row
    out, js = tmp_path / "ens.npz", tmp_path / "row.json"
    r = run_tool("ensemble.py", "--scores=" + ",".join(paths), f"--output={out}", f"--json={js}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "# models" in r.stdout and "ensemble mAP" in r.stdout
    assert f"{row['ensemble_mAP']:.4f}" in r.stdout.splitlines()[-1]
    np.testing.assert_allclose(load_scores(str(out)).scores, ens.scores)
    assert json.loads(js.read_text())["best_mAP"] == pytest.approx(row["best_mAP"])
    # members over different clips are refused with a clear error
    save_scores(str(tmp_path / "other.npz"), Predictions(
        [f"x{j}" for j in range(80)], raw[0], t, [f"/m/{k}" for k in range(C)], list("abcde")))
    r = run_tool("ensemble.py", f"--scores={paths[0]},{tmp_path / 'other.npz'}")
    assert r.returncode == 2 and "clips differ" in r.stderr and "Traceback" not in r.stderr


def test_ensemble_model_is_the_mean_and_round_trips(tmp_path):
    import keras
    from psla_tf import ensemble
    from psla_tf.models.loading import load_tagger
    from psla_tf.scoring import load_scorer
    a, b = make_tagger(C, seed=1), make_tagger(C, seed=2, att_head=1)
    e = ensemble.build_ensemble([a, b])
    assert e.name == "psla_ensemble"
    assert [lay.name for lay in e.layers if lay.name.startswith("member_")] == [
        "member_0", "member_1"]
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (3, CLIP_SAMPLES)).astype(np.float32)
    n = np.array([CLIP_SAMPLES, 5000, 900], np.int32)
    x = {"waveform": w, "num_samples": n}
    want = (a(x).numpy() + b(x).numpy()) / 2
    np.testing.assert_allclose(e(x).numpy(), want, atol=1e-6)
    path = save_tagger(e, str(tmp_path / "ens"), "ensemble.keras")
    back = load_tagger(path)
    np.testing.assert_allclose(back(x).numpy(), want, atol=1e-6)
    scorer = load_scorer(path)          # the tools take an ensemble like any model
    assert scorer.clip_samples == CLIP_SAMPLES
    np.testing.assert_allclose(scorer(w, n), want, atol=1e-6)
    with pytest.raises(Exception, match="at least 2"):
        ensemble.build_ensemble([a])
    with pytest.raises(Exception, match="different numbers of classes"):
        ensemble.build_ensemble([a, make_tagger(C + 1, seed=3)])
    del keras


def _run_with_checkpoints(tmp_path, epochs=3):
    """An experiment folder as main.py writes it, with epoch checkpoints whose weights
    (BN statistics included) differ."""
    from psla_tf.data.records import write_label_csv
    from psla_tf.config import TrainConfig, flagfile_text
    from psla_tf.models.tagger import build_model
    cfg = TrainConfig(**SMALL_MODEL, att_head=2, target_length=64, freqm=0,
                      timem=0, dataset_mean=params.DATASET_MEAN,
                      dataset_std=params.DATASET_STD, pretrained="none")
    exp = tmp_path / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "flags.txt").write_text(flagfile_text(cfg))
    write_label_csv(str(exp / "labels.csv"), [f"/m/c{k}" for k in range(C)],
                    [f"class {k}" for k in range(C)])
    model = build_model(dataclasses.replace(cfg), C)
    weights = []
    for e in range(1, epochs + 1):
        src = make_tagger(C, seed=10 + e)
        model.set_weights(src.get_weights())
        model.save_weights(str(exp / "checkpoints" / f"epoch_{e:03d}.weights.h5"))
        weights.append([np.asarray(v, np.float64) for v in src.get_weights()])
    return exp, weights


def test_average_weights_tool(tmp_path):
    from psla_tf.models.loading import load_tagger, load_vocabulary
    exp, weights = _run_with_checkpoints(tmp_path)
    out = tmp_path / "avg" / "wa.keras"
    # another architecture (other number of heads) is refused; so is a missing epoch
    other = make_tagger(C, seed=0, att_head=1)
    odd = save_tagger(other, str(tmp_path / "odd"))
    bad = [([f"--checkpoints={exp / 'checkpoints' / 'epoch_001.weights.h5'},{odd}"],
            "another architecture"),
           ([f"--checkpoints={exp}", "--epochs=2-5"], "checkpoints missing"),
           # this run folder names no training data: no BatchNorm statistics from it
           ([f"--checkpoints={exp}", "--epochs=1-3"], "--bn_batches=0 keeps the averaged")]
    r = run_tool("average_weights.py", f"--checkpoints={exp}", "--epochs=1-3",
                 f"--output={out}", "--noprogress", "--bn_batches=0")
    assert r.returncode == 0, r.stderr[-2000:]
    model = load_tagger(str(out))
    want = [np.mean([w[i] for w in weights], axis=0) for i in range(len(weights[0]))]
    got = model.get_weights()
    names = [v.path for v in model.weights]
    assert any("moving_variance" in n for n in names)
    for n_, g, w in zip(names, got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=n_)
    assert load_vocabulary(str(out))[0] == [f"/m/c{k}" for k in range(C)]
    for args, msg in bad:
        r = run_tool("average_weights.py", *args, f"--output={tmp_path / 'x.keras'}",
                     "--noprogress")
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, \
            r.stderr[-1500:]
    assert not os.path.exists(tmp_path / "x.keras")
    from psla_tf.data.records import DataError
    from psla_tf.ensemble import average_checkpoints
    with pytest.raises(DataError, match="listed twice"):
        ckpt = str(exp / "checkpoints" / "epoch_001.weights.h5")
        average_checkpoints([ckpt, ckpt], progress=False)
