"""tools/evaluate.py and psla_tf.evaluation against sklearn computed here."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from test_predict import run_tool

N, C = 60, 7


def scores_file(path, seed, targets=None, empty_class=3):
    from psla_tf.prediction import Predictions, save_scores
    rng = np.random.default_rng(seed)
    if targets is None:
        targets = (rng.random((N, C)) < 0.3).astype(np.float32)
        targets[:, empty_class] = 0                       # a class without positives
    # informative scores: positives shifted up by a class-dependent amount
    scores = rng.random((N, C)) + targets * np.linspace(0.1, 1.0, C)
    scores = (scores / scores.max()).astype(np.float32)
    p = Predictions([f"id{i}" for i in range(N)], scores, targets,
                    [f"/m/k{k}" for k in range(C)], [f"name {k}" for k in range(C)])
    save_scores(str(path), p)
    return p


def sk_metrics(t, s, skip):
    keep = [k for k in range(C) if k not in skip]
    ap = {k: average_precision_score(t[:, k], s[:, k]) for k in keep}
    auc = {k: roc_auc_score(t[:, k], s[:, k]) for k in keep}
    m_auc = np.mean(list(auc.values()))
    return ap, auc, np.mean(list(ap.values())), m_auc, np.sqrt(2) * stats.norm.ppf(m_auc)


def test_report_matches_sklearn(tmp_path):
    from psla_tf import evaluation, prediction
    p = scores_file(tmp_path / "a.npz", 0)
    q = prediction.load_scores(str(tmp_path / "a.npz"))
    rep = evaluation.evaluation_report([q], q.mids, q.names)
    ap, auc, m_ap, m_auc, dp = sk_metrics(p.targets, p.scores, {3})
    s = rep["summary"]
    assert s["mAP"] == pytest.approx(m_ap, abs=1e-6)
    assert s["AUC"] == pytest.approx(m_auc, abs=1e-6)
    assert s["d_prime"] == pytest.approx(dp, abs=1e-5)
    assert [e["mid"] for e in s["excluded_from_mAP"]] == ["/m/k3"]
    assert s["num_classes_evaluated"] == C - 1
    rows = rep["classes"]
    assert [r["index"] for r in rows[:-1]] == sorted(ap, key=lambda k: -ap[k])
    assert rows[-1]["index"] == 3 and rows[-1]["AP"] is None and rows[-1]["positives"] == 0
    for r in rows[:-1]:
        assert r["AP"] == pytest.approx(ap[r["index"]], abs=1e-6)
        assert r["AUC"] == pytest.approx(auc[r["index"]], abs=1e-6)
        assert r["positives"] == int(p.targets[:, r["index"]].sum())


def test_accuracy_for_single_label_clips_only(tmp_path):
    """One label per clip: accuracy = sklearn's accuracy_score of the argmaxes, printed by the
    tool; multi-label clips: no accuracy."""
    from sklearn.metrics import accuracy_score
    from psla_tf import evaluation, prediction
    one_hot = np.eye(C, dtype=np.float32)[np.arange(N) % C]
    p = scores_file(tmp_path / "s.npz", 2, targets=one_hot)
    want = accuracy_score(one_hot.argmax(1), p.scores.argmax(1))
    assert 0 < want < 1
    s = evaluation.evaluation_report([p], p.mids, p.names)["summary"]
    assert s["accuracy"] == pytest.approx(want, abs=1e-12)
    r = run_tool("evaluate.py", f"--scores={tmp_path / 's.npz'}", f"--out_dir={tmp_path / 'r'}")
    assert r.returncode == 0 and f"accuracy {want:.4f}" in r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["accuracy"] == s["accuracy"]
    multi = scores_file(tmp_path / "m.npz", 0)
    assert "accuracy" not in evaluation.evaluation_report([multi], multi.mids,
                                                          multi.names)["summary"]


def test_runs_mean_and_std(tmp_path):
    """Several runs of the same clips: per-class AP = mean over runs, with std (Fig. 7)."""
    from psla_tf import evaluation, prediction
    a = scores_file(tmp_path / "a.npz", 0)
    b = scores_file(tmp_path / "b.npz", 1, targets=a.targets)
    preds = [prediction.load_scores(str(tmp_path / f)) for f in ("a.npz", "b.npz")]
    rep = evaluation.evaluation_report(preds, a.mids, a.names)
    ap_a = sk_metrics(a.targets, a.scores, {3})[0]
    ap_b = sk_metrics(b.targets, b.scores, {3})[0]
    for r in rep["classes"][:-1]:
        k = r["index"]
        assert r["AP"] == pytest.approx((ap_a[k] + ap_b[k]) / 2, abs=1e-6)
        assert r["AP_std"] == pytest.approx(abs(ap_a[k] - ap_b[k]) / 2, abs=1e-6)
    assert rep["summary"]["mAP"] == pytest.approx(
        (np.mean(list(ap_a.values())) + np.mean(list(ap_b.values()))) / 2, abs=1e-6)
    # different clips or targets are refused
    scores_file(tmp_path / "c.npz", 2)                  # other random targets
    from psla_tf.data.records import DataError
    with pytest.raises(DataError, match="targets differ"):
        evaluation.evaluation_report([preds[0], prediction.load_scores(str(tmp_path / "c.npz"))],
                                     a.mids, a.names)


def test_cli_writes_json_csv_png(tmp_path):
    import matplotlib.image as mpimg
    p = scores_file(tmp_path / "a.npz", 0)
    scores_file(tmp_path / "b.npz", 1, targets=p.targets)
    out = tmp_path / "rep"
    r = run_tool("evaluate.py", f"--scores={tmp_path / 'a.npz'},{tmp_path / 'b.npz'}",
                 f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mean of 2 runs" in r.stdout and "name 3" in r.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert len(summary["runs"]) == 2 and "mAP_std" in summary
    with open(out / "classes.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "mid", "name", "positives", "AP", "AP_std", "AUC"]
    aps = [float(r["AP"]) for r in rows if r["AP"]]
    assert aps == sorted(aps, reverse=True) and rows[-1]["AP"] == ""
    img = mpimg.imread(out / "sorted_ap.png")
    assert img.shape[0] > 100 and img.shape[1] > 300 and img.std() > 0.01
    assert not any(n.endswith(".tmp") or ".tmp." in n for n in os.listdir(out))

    # errors: no targets, mismatched label_csv, missing file
    from psla_tf.prediction import Predictions, save_scores
    save_scores(str(tmp_path / "nolab.npz"), Predictions(["a"], np.zeros((1, C), np.float32),
                                                         None, p.mids, p.names))
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/x,x\n")
    for args, msg in [([f"--scores={tmp_path / 'nolab.npz'}"], "has no targets"),
                      ([f"--scores={tmp_path / 'a.npz'}", f"--label_csv={tmp_path / 'labels.csv'}"],
                       "does not match"),
                      ([f"--scores={tmp_path / 'zz.npz'}"], "not found")]:
        r = run_tool("evaluate.py", *args, f"--out_dir={tmp_path / 'x'}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert r.stderr.strip().splitlines()[-1].startswith("error:") and msg in r.stderr


def _manifest_for(tmp_path, p, written, listed):
    """Shards of ``written`` clips (the scores' vocabulary) whose manifest lists ``listed``."""
    import tensorflow as tf
    from psla_tf.data import records
    prefix = str(tmp_path / "eval")
    shard = records.shard_name(prefix, 0, 1)
    counts = np.zeros(C, int)
    with tf.io.TFRecordWriter(shard) as w:
        for i in range(written):
            labs = [int(k) for k in np.flatnonzero(p.targets[i % N] >= 0.5)]
            counts[labs] += 1
            w.write(records.make_example(f"id{i}", np.zeros(800, np.int16), labs,
                                         [p.mids[k] for k in labs]))
    records.Manifest(num_examples=written, shards=[{"file": os.path.basename(shard),
                                                    "num_examples": written}],
                     mids=list(p.mids), names=list(p.names), class_counts=counts.tolist(),
                     max_seconds=0.05, listed=listed).write(records.manifest_path(prefix))
    return prefix + "-*.tfrecord"


def test_coverage_stated_next_to_map(tmp_path):
    """Issue 6: when the input listed more clips than were found, the report says how many
    of how many next to mAP (printed and in metrics.json)."""
    from psla_tf import evaluation, prediction
    from psla_tf.data.records import DataError
    p = scores_file(tmp_path / "a.npz", 0)
    q = prediction.load_scores(str(tmp_path / "a.npz"))
    # without a listed count: evaluated clips only, fraction unknown
    s = evaluation.evaluation_report([q], q.mids, q.names)["summary"]
    assert s["coverage"] == {"evaluated": N, "listed": None, "fraction": None,
                             "complete": False}
    assert evaluation.coverage_text(s["coverage"]).startswith(f"on {N} clips (listed count")
    s = evaluation.evaluation_report([q], q.mids, q.names, listed=N + 4, written=N + 1)["summary"]
    assert s["coverage"]["fraction"] == pytest.approx(N / (N + 4))
    text = evaluation.coverage_text(s["coverage"])
    assert text.startswith(f"on {N} of {N + 4} listed clips (93.8 %)"), text
    assert "3 listed clips were not found" in text and "1 prepared clips have no score" in text
    assert evaluation.evaluation_report([q], q.mids, q.names, listed=N)["summary"][
        "coverage"]["complete"]
    with pytest.raises(DataError, match="only 5 listed"):
        evaluation.evaluation_report([q], q.mids, q.names, listed=5)

    # the CLI: --data reads listed/written from the shards' manifests
    glob = _manifest_for(tmp_path, p, written=N, listed=N + 4)
    out = tmp_path / "rep"
    r = run_tool("evaluate.py", f"--scores={tmp_path / 'a.npz'}", f"--data={glob}",
                 f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    map_line = next(line for line in r.stdout.splitlines() if line.startswith("mAP"))
    assert f"on {N} of {N + 4} listed clips (93.8 %)" in map_line, r.stdout
    assert "4 listed clips were not found" in map_line and "warning" in r.stdout
    cov = json.loads((out / "metrics.json").read_text())["coverage"]
    assert (cov["evaluated"], cov["listed"], cov["written"], cov["complete"]) == (
        N, N + 4, N, False)
    assert cov["source"] == glob
    # --listed instead of --data (two CLI runs only: each starts TensorFlow)
    r = run_tool("evaluate.py", f"--scores={tmp_path / 'a.npz'}", f"--listed={N}",
                 f"--out_dir={out}")
    assert r.returncode == 0 and f"on {N} of {N} listed clips (100.0 %)" in r.stdout
    assert "warning" not in r.stdout
