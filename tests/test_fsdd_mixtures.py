"""The real-audio multi-label set (psla_tf/data/fsdd_mixtures.py) from FSDD recordings:
speaker-disjoint splits, 1-3 (1..max_digits) distinct digits per clip with labels = the digits
placed, Zipf-skewed digit frequencies, 3-s 16-kHz clips, the same clip for the same
(seed, split, i)."""
from __future__ import annotations

import json

import numpy as np
import soundfile as sf
from scipy import stats

from psla_tf.data import fsdd_mixtures as fm


def test_digit_probabilities_are_zipf():
    p = fm.digit_probabilities()
    assert np.isclose(p.sum(), 1.0) and np.allclose(p[0] / p, np.arange(1, 11))


def test_generated_set(shared, tmp_path):
    fsdd = shared("data", "fsdd", "recordings")
    paths = fm.generate(str(tmp_path / "set"), str(fsdd), counts={"train": 60, "eval": 20},
                        splits={"train": ("george", "jackson"), "eval": ("theo",)},
                        progress=False)
    mids, _ = fm.vocabulary()
    for split, speakers in (("train", {"george", "jackson"}), ("eval", {"theo"})):
        rows = json.load(open(paths[split]))["data"]
        assert len(rows) == {"train": 60, "eval": 20}[split]
        for r in rows:
            digits = sorted(e["digit"] for e in r["events"])
            assert r["labels"] == ",".join(mids[d] for d in digits)
            assert 1 <= len(digits) <= 3 and len(set(digits)) == len(digits)
            assert set(r["speakers"]) <= speakers
            x, sr = sf.read(str(tmp_path / "set" / r["wav"]))
            assert sr == 16000 and len(x) == 48000 and np.abs(x).max() <= 1.0
    # the same clip again from its (seed, split, index); a different index differs
    rec = fm.load_recordings(str(fsdd))
    a, da, _ = fm.make_clip(rec, ("george", "jackson"), 0, "train", 3)
    b, db, _ = fm.make_clip(rec, ("george", "jackson"), 0, "train", 3)
    c, _, _ = fm.make_clip(rec, ("george", "jackson"), 0, "train", 4)
    assert da == db and np.array_equal(a, b) and not np.array_equal(a, c)


def test_digit_frequencies_follow_the_skew(shared):
    rec = fm.load_recordings(str(shared("data", "fsdd", "recordings")))
    counts = np.zeros(10)
    n = 400
    for i in range(n):
        _, digits, _ = fm.make_clip(rec, ("lucas",), 1, "train", i)
        counts[digits] += 1
    # digit 0 (rank 1) is the most frequent and digit 9 among the rarest; Spearman ρ vs rank
    rho = stats.spearmanr(counts, -np.arange(10)).correlation
    assert counts[0] == counts.max() and rho > 0.8


def test_max_digits_sets_the_count_and_keeps_the_default_stream(shared):
    rec = fm.load_recordings(str(shared("data", "fsdd", "recordings")))
    n = 300
    counts = [len(fm.make_clip(rec, ("lucas",), 2, "train", i, max_digits=2)[1]) for i in range(n)]
    # 1 or 2 digits, each about half the clips (binomial test, p > 0.001 at seed 2)
    assert set(counts) == {1, 2}
    assert stats.binomtest(counts.count(2), n, 0.5).pvalue > 1e-3
    # max_digits=3 is the default set, clip for clip
    a, da, _ = fm.make_clip(rec, ("lucas",), 2, "train", 7)
    b, db, _ = fm.make_clip(rec, ("lucas",), 2, "train", 7, max_digits=3)
    assert da == db and np.array_equal(a, b)
