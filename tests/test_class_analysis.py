"""The paper's class-level analyses (issue 15.6): Table IX (another vocabulary through a
class map), Sec. VII-B (correlation of class-wise APs between models), Table VII (class AP
against class properties) — psla_tf.class_analysis and tools/evaluate.py against
sklearn / scipy computed here."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score

from test_predict import run_tool

from psla_tf import class_analysis as ca
from psla_tf.data.records import DataError
from psla_tf.prediction import Predictions, save_scores

S_MIDS = ["/m/dog", "/m/bark", "/m/cat", "/m/rain", "/m/car", "/m/music"]
S_NAMES = ["Dog", "Bark", "Cat", "Rain", "Car", "Music"]
T_NAMES = ["dog", "cat", "rain", "clock tick"]        # ESC-50-like; "clock tick" unmapped
N = 80


def _setup(tmp_path, seed=0):
    """Source-vocabulary scores (an 'AudioSet model') on a single-label target set."""
    rng = np.random.default_rng(seed)
    y_class = rng.integers(0, 4, N)
    target = np.eye(4, dtype=np.float32)[y_class]
    scores = rng.random((N, 6)).astype(np.float32)
    # informative: the mapped source classes rise with the target class
    for src, t in ((0, 0), (1, 0), (2, 1), (3, 2)):
        scores[:, src] += 0.6 * target[:, t] * rng.random(N)
    ids = [f"esc/{i}.wav" for i in range(N)]
    save_scores(str(tmp_path / "a.npz"), Predictions(ids, scores, None, S_MIDS, S_NAMES))
    lines = ["path,labels"] + [f"{ids[i]},{T_NAMES[y_class[i]]}" for i in range(N)]
    (tmp_path / "esc.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "map.csv").write_text("target,source\ndog,Dog\ndog,/m/bark\ncat,Cat\n"
                                      "rain,/m/rain\n")
    return ids, scores, target


def _sk_mapped(scores, target):
    """The mapping written out: dog = max(Dog, Bark), cat, rain; clips of 'clock tick' out."""
    keep = target[:, 3] == 0
    s = np.stack([scores[:, [0, 1]].max(1), scores[:, 2], scores[:, 3]], 1)[keep]
    y = target[keep][:, :3]
    return [average_precision_score(y[:, k], s[:, k]) for k in range(3)], keep.sum()


def test_class_map_matches_sklearn(tmp_path):
    ids, scores, target = _setup(tmp_path)
    pred = Predictions(ids, scores, None, S_MIDS, S_NAMES)
    t_ids, t_y, t_mids, _ = ca.read_target_labels(str(tmp_path / "esc.csv"))
    assert t_mids == ["cat", "clock tick", "dog", "rain"]  # the listing's labels, sorted
    cmap = ca.build_class_map(str(tmp_path / "map.csv"), (S_MIDS, S_NAMES), (t_mids, t_mids))
    assert cmap.sources == [[2], [], [0, 1], [3]] and cmap.unmapped == [1]
    mapped, info = ca.apply_class_map(pred, cmap, t_ids, t_y)
    assert mapped.mids == ["cat", "dog", "rain"]
    aps, kept = _sk_mapped(scores, target)                 # dog, cat, rain
    from psla_tf import metrics
    got = metrics.evaluate(mapped.targets, mapped.scores)["AP"]
    np.testing.assert_allclose(got, [aps[1], aps[0], aps[2]], atol=1e-6)
    assert info["clips_evaluated"] == kept and info["clips_without_mapped_label"] == N - kept
    assert [u["name"] for u in info["unmapped"]] == ["clock tick"]
    # by name: case ignored; "clock tick" and "bark" stay unmapped for the target's names
    by_name = ca.build_class_map("name", (S_MIDS, S_NAMES), (t_mids, t_mids))
    assert by_name.sources == [[2], [], [0], [3]]
    by_mid = ca.build_class_map("mid", (S_MIDS, S_NAMES), (["/m/cat", "/x"], ["c", "x"]))
    assert by_mid.sources == [[2], []]
    with pytest.raises(DataError, match="no class of the evaluated set"):
        ca.build_class_map("mid", (S_MIDS, S_NAMES), (["/x"], ["x"]))


def test_correlations_match_scipy():
    rng = np.random.default_rng(3)
    a = rng.random(30)
    b = a + 0.1 * rng.normal(size=30)
    a[4] = np.nan                                   # a class without AP is left out
    c = ca.ap_correlation(a, b)
    ok = np.isfinite(a)
    assert c["classes"] == 29
    assert c["pearson"] == pytest.approx(stats.pearsonr(a[ok], b[ok])[0], abs=1e-12)
    assert c["spearman"] == pytest.approx(stats.spearmanr(a[ok], b[ok])[0], abs=1e-12)
    props = {"count": rng.integers(1, 100, 30).astype(float)}
    p = ca.property_correlations(a, props)["count"]
    assert p["pearson"] == pytest.approx(stats.pearsonr(a[ok], props["count"][ok])[0])


def test_class_info_reads_audioset_quality(tmp_path):
    (tmp_path / "qa.csv").write_text("label_id,num_rated,num_true\n/m/dog,10,9\n/m/cat,10,5\n"
                                     "/m/unknown,10,1\n/m/rain,8,8\n")
    v = ca.read_class_info(str(tmp_path / "qa.csv"), S_MIDS, S_NAMES)
    np.testing.assert_allclose(v["quality"][[0, 2, 3]], [0.9, 0.5, 1.0])
    assert np.isnan(v["quality"][1])


def test_cli_class_map_correlation_and_properties(tmp_path):
    ids, scores, target = _setup(tmp_path)
    rng = np.random.default_rng(9)
    save_scores(str(tmp_path / "b.npz"), Predictions(
        ids, (scores + 0.3 * rng.random(scores.shape)).astype(np.float32), None, S_MIDS,
        S_NAMES))
    (tmp_path / "info.csv").write_text("name,train_clips\ndog,50\ncat,20\nrain,5\n")
    out = tmp_path / "rep"
    r = run_tool("evaluate.py", f"--scores={tmp_path / 'a.npz'}",
                 f"--target_data={tmp_path / 'esc.csv'}", f"--class_map={tmp_path / 'map.csv'}",
                 f"--compare_scores={tmp_path / 'b.npz'}",
                 f"--class_info={tmp_path / 'info.csv'}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "metrics.json").read_text())
    aps, kept = _sk_mapped(scores, target)
    aps = [aps[1], aps[0], aps[2]]                         # the mapped order: cat, dog, rain
    assert s["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert s["num_examples"] == kept and s["num_classes"] == 3
    assert [u["name"] for u in s["class_map"]["unmapped"]] == ["clock tick"]
    assert "1 unmapped" in r.stdout and "unmapped: clock tick" in r.stdout
    b = np.load(tmp_path / "b.npz")["scores"]
    aps_b, _ = _sk_mapped(b, target)
    aps_b = [aps_b[1], aps_b[0], aps_b[2]]
    assert s["ap_correlation"]["pearson"] == pytest.approx(stats.pearsonr(aps, aps_b)[0],
                                                           abs=1e-6)
    with open(out / "classes.csv") as f:
        rows = {r["name"]: float(r["AP"]) for r in csv.DictReader(f)}
    clips = {"dog": 50, "cat": 20, "rain": 5}
    names = ["dog", "cat", "rain"]
    want = stats.pearsonr([rows[n] for n in names], [clips[n] for n in names])[0]
    assert s["class_correlations"]["train_clips"]["pearson"] == pytest.approx(want, abs=1e-6)
    assert "Pearson" in r.stdout
    # --class_map without --target_data: one line, exit 2
    r = run_tool("evaluate.py", f"--scores={tmp_path / 'a.npz'}", "--class_map=mid",
                 f"--out_dir={out}")
    assert r.returncode == 2 and "go together" in r.stderr and "Traceback" not in r.stderr
