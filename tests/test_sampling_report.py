"""tools/sampling_report.py (paper Figs. 5, 6): the files it writes, and the unseen fraction of
the real training stream against the paper's formulas.

Expectation (i.i.d. draws, DESIGN.md "Sampling"): each epoch draws N examples with P(i) = p_i
and, with mixup rate m, every mixed example takes a partner uniformly from the N clips, so
P(i never used in E epochs) = (1 - p_i)^(N E) (1 - m/N)^(N E) ≈ e^(-E N p_i) e^(-m E) — the
paper's e^(-mE) (Fig. 6: ~5 % of AudioSet unseen after 5 epochs at m = 0.5). Tolerance: 4
standard deviations of a mean of independent Bernoulli(q_i) (σ ≈ 0.014 on 1,000 examples) plus
0.005 for the exponential approximation.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from helpers_cli import run_script
from helpers_data import random_labels, random_waveforms, write_shards
from psla_tf.data import report, sampling

C = 8
N = 1000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(12)
    labels = random_labels(N, C, rng, skew=2.0, max_labels=2)
    d = tmp_path_factory.mktemp("report")
    glob = write_shards(str(d), random_waveforms(N, rng, 16, 40), labels, C, num_shards=4)
    return glob, labels


def _paper_unseen(labels, epochs, mixup):
    """Per example: P(unseen after e epochs) = e^(-e N p_i) e^(-m e), e = 1..epochs."""
    counts = np.zeros(C)
    for row in labels:
        counts[row] += 1
    w = sampling.balanced_sampling_weights(labels, counts)
    rate = sampling.poisson_rates(w, len(labels))          # N p_i
    return [np.exp(-e * rate) * np.exp(-mixup * e) for e in range(1, epochs + 1)]


@pytest.mark.parametrize("mixup", [0.0, 0.5])
def test_unseen_fraction_matches_expectation(data, mixup):
    glob, labels = data
    r = report.sampling_report(glob, 5, mixup=mixup, balanced_sampling=True, batch_size=20,
                               seed=4, clip_samples=16, progress=False, shuffle_buffer=50)
    for e, q in enumerate(_paper_unseen(labels, 5, mixup)):
        sd = np.sqrt(np.sum(q * (1 - q))) / N
        assert abs(r["tally"].unseen[e] - q.mean()) < 4 * sd + 0.005, (e, r["tally"].unseen)
        # the report's exact i.i.d. expectation agrees with the paper's form
        assert r["expected_unseen"][e] == pytest.approx(q.mean(), abs=0.005)
    if mixup == 0.0:
        # skewed labels: balanced sampling leaves many frequent-class clips unseen (Fig. 6)
        assert r["tally"].unseen[-1] > 0.15
    else:
        # the same draws counted without partners: the "without mixup" curve of the run
        q0 = _paper_unseen(labels, 5, 0.0)[-1]
        assert abs(r["tally"].unseen_without_mixup[-1] - q0.mean()) < 4 * np.sqrt(
            np.sum(q0 * (1 - q0))) / N + 0.005


def test_tool_writes_csvs_and_plots(data, tmp_path):
    glob, labels = data
    out = tmp_path / "rep"
    p = run_script("sampling_report.py", f"--train_data={glob}", "--epochs=3", "--mixup=0.5",
                   f"--out_dir={out}", "--batch_size=20", "--balanced_sampling", "--noprogress")
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out / "class_frequency.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "mid", "name", "count", "expected_per_epoch",
                             "observed_per_epoch"]
    assert len(rows) == C
    counts = np.zeros(C)
    for row in labels:
        counts[row] += 1
    np.testing.assert_array_equal([int(r["count"]) for r in rows], counts)
    # expected per epoch = N Σ_i p_i [k ∈ labels(i)] (exact); observed within Poisson noise
    exp = np.array([float(r["expected_per_epoch"]) for r in rows])
    obs = np.array([float(r["observed_per_epoch"]) for r in rows])
    hot = np.zeros((N, C))
    for i, row in enumerate(labels):
        hot[i, row] = 1
    w = sampling.balanced_sampling_weights(labels, counts)
    np.testing.assert_allclose(exp, N * (w / w.sum()) @ hot, rtol=1e-4)
    np.testing.assert_allclose(obs, exp, rtol=0.3)
    # balancing lifts the rare classes far above their raw share (count)
    assert exp[-1] / exp[0] > 5 * counts[-1] / counts[0]
    with open(out / "unseen.csv") as f:
        unseen = list(csv.DictReader(f))
    assert [u["epoch"] for u in unseen] == ["1", "2", "3"]
    fr = [float(u["unseen_fraction"]) for u in unseen]
    assert fr == sorted(fr, reverse=True) and 0 <= fr[-1] < 1
    assert list(unseen[0]) == ["epoch", "unseen_fraction", "unseen_without_mixup",
                               "expected_unseen", "expected_unseen_without_mixup"]
    assert all(float(u["unseen_without_mixup"]) >= float(u["unseen_fraction"]) for u in unseen)
    with open(out / "order.csv") as f:
        order = list(csv.DictReader(f))
    assert [o["epoch"] for o in order] == ["1", "2", "3"]
    assert {"repeat_pairs", "repeat_pairs_expected", "gap_ratio_mean", "gap_ks_pvalue",
            "copies_pvalue", "partners_pvalue"} <= set(order[0])
    with open(out / "histograms.csv") as f:
        hist = list(csv.DictReader(f))
    assert {h["what"] for h in hist} == {"copies", "partners"}
    for e in ("1", "2", "3"):  # every clip counted once per epoch in each histogram
        for what in ("copies", "partners"):
            assert sum(int(h["observed"]) for h in hist if h["epoch"] == e
                       and h["what"] == what) == N
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert len(pngs) >= 2, pngs
    assert all(os.path.getsize(out / f) > 5000 for f in pngs)


def test_tool_bad_glob_is_a_clear_error(tmp_path):
    p = run_script("sampling_report.py", f"--train_data={tmp_path}/none-*.tfrecord",
                   "--epochs=1", f"--out_dir={tmp_path}/o")
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr
