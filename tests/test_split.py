"""Splits (psla_tf/data/splits.py, tools/split.py): reproducibility, stratification, groups,
folds, round trip through the listing formats."""
from __future__ import annotations

import collections
import csv
import json
import os

import numpy as np
import pytest

from psla_tf.data import sources, splits
from psla_tf.data.records import DataError
from helpers_cli import run_script


def _rows(n=400, seed=1):
    """Multi-label rows: class 'rare' on 20 clips, 'mid' on 100, 'common' on most."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        mids = ["common"] if rng.random() < 0.8 else []
        if i % 4 == 0:
            mids.append("mid")
        if i % 20 == 3:
            mids.append("rare")
        rows.append(sources.Row(id=f"c{i}.wav", path=f"/x/c{i}.wav", mids=tuple(mids), line=i + 2))
    return rows


def test_split_reproducible_and_partition():
    rows = _rows()
    a = splits.split_rows(rows, 0.1, 0.2, seed=3)
    b = splits.split_rows(list(reversed(rows)), 0.1, 0.2, seed=3)
    c = splits.split_rows(rows, 0.1, 0.2, seed=4)
    ids = {k: {r.id for r in v} for k, v in a.items()}
    assert ids == {k: {r.id for r in v} for k, v in b.items()}  # order-independent
    assert ids != {k: {r.id for r in v} for k, v in c.items()}  # seed matters
    assert sum(len(v) for v in ids.values()) == len(rows)
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    # input order kept inside a split
    pos = {r.id: i for i, r in enumerate(rows)}
    assert [pos[r.id] for r in a["train"]] == sorted(pos[r.id] for r in a["train"])


def test_split_stratified_per_label():
    rows = _rows()
    parts = splits.split_rows(rows, 0.1, 0.2, seed=0)
    n = len(rows)
    for mid in ("rare", "mid"):
        total = sum(mid in r.mids for r in rows)
        for name, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
            got = sum(mid in r.mids for r in parts[name])
            # rarest-label strata are split to within one clip; 'mid' also occurs in clips
            # whose stratum is 'rare' (5 of them), so allow that many more
            assert abs(got - frac * total) <= 1 + (5 if mid == "mid" else 0), (mid, name, got)
    assert abs(len(parts["test"]) - 0.2 * n) <= 4
    # a random (unstratified) split of the 20 'rare' clips misses the 10% val share often;
    # stratified gives exactly 2
    assert sum("rare" in r.mids for r in parts["val"]) == 2


def test_group_regex_keeps_speakers_together():
    speakers = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    rows = [sources.Row(id=f"{d}_{s}_{k}.wav", path=f"/r/{d}_{s}_{k}.wav", mids=(str(d),), line=1)
            for s in speakers for d in range(10) for k in range(3)]
    parts = splits.split_rows(rows, 0.0, 1 / 6, seed=0, group_regex=r"^\d+_([a-z]+)_")
    spk = {k: {r.id.split("_")[1] for r in v} for k, v in parts.items()}
    assert len(spk["test"]) == 1 and len(spk["train"]) == 5 and not spk["val"]
    assert not (spk["train"] & spk["test"])
    with pytest.raises(DataError, match="does not match"):
        splits.split_rows(rows, 0.0, 0.2, group_regex=r"^zzz")


def test_fold_split_and_cli_roundtrip(tmp_path):
    lst = tmp_path / "meta.csv"
    with open(lst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "category"])
        for i in range(20):
            w.writerow([f"audio/{i}.wav", i % 5 + 1, f"cls{i % 4}"])
    out = tmp_path / "lists" / "esc"
    r = run_script("split.py", f"--input={lst}", "--fold_column=fold", "--test_fold=2",
                   f"--output_prefix={out}")
    assert r.returncode == 0, r.stderr
    test_rows, header = sources.read_plain_csv(str(out) + "_test.csv")
    train_rows, _ = sources.read_plain_csv(str(out) + "_train.csv")
    assert header == ["filename", "fold", "category"]
    assert {r.record["fold"] for r in test_rows} == {"2"} and len(test_rows) == 4
    assert len(train_rows) == 16 and "2" not in {r.record["fold"] for r in train_rows}
    # paths rewritten relative to the new folder still point at the same files
    orig = {r.path for r in sources.read_plain_csv(str(lst))[0]}
    assert {os.path.normpath(r.path) for r in test_rows + train_rows} == {os.path.normpath(p) for p in orig}
    voc = open(str(out) + "_labels.csv").read().splitlines()
    assert voc[0] == "index,mid,display_name" and len(voc) == 5


def test_split_datafile_cli_same_format(tmp_path):
    rows = _rows(60)
    data = {"data": [{"wav": r.id, "labels": ",".join(r.mids)} for r in rows]}
    lst = tmp_path / "train.json"
    lst.write_text(json.dumps(data))
    out = tmp_path / "s"
    args = [f"--input={lst}", "--val_fraction=0.2", "--test_fraction=0.2", "--seed=7",
            f"--output_prefix={out}"]
    assert run_script("split.py", *args).returncode == 0
    got = {k: [r.id for r in sources.read_datafile(f"{out}_{k}.json")] for k in splits.SPLIT_NAMES}
    want = splits.split_rows(sources.read_datafile(str(lst)), 0.2, 0.2, seed=7)
    assert got == {k: [r.id for r in v] for k, v in want.items()}
    assert sorted(sum(got.values(), [])) == sorted(r.id for r in rows)
    bad = run_script("split.py", args[0], "--val_fraction=0.6", "--test_fraction=0.6",
                     f"--output_prefix={out}")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "fraction" in bad.stderr


# ----------------------------------------------------------------------------- make_tfrecords
def _make_tfrecords(*args):
    return run_script("make_tfrecords.py", "--noprogress", *args)


def test_make_tfrecords_folder_with_stratified_split(tmp_path):
    """--audio_folder + --test_fraction: one command → labels.csv (mid = folder name) and
    train/test shard sets, stratified per class, disjoint, covering every clip."""
    import soundfile as sf
    from psla_tf.data import records
    rng = np.random.default_rng(0)
    for c, f0 in (("bell", 900.0), ("hum", 120.0)):
        (tmp_path / "audio" / c).mkdir(parents=True)
        for i in range(5):
            t = np.arange(4000) / 8000.0
            sf.write(tmp_path / "audio" / c / f"{i}.wav",
                     0.3 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.normal(size=t.size), 8000,
                     subtype="PCM_16")
    out = tmp_path / "data" / "mine"
    r = _make_tfrecords(f"--audio_folder={tmp_path / 'audio'}", "--test_fraction=0.2",
                        f"--output_prefix={out}", "--target_length=60")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "written to" in r.stdout and "labels.csv" in r.stdout
    with open(tmp_path / "data" / "labels.csv") as f:
        assert f.read().splitlines() == ["index,mid,display_name", "0,bell,bell", "1,hum,hum"]
    ids = {}
    for part in ("train", "test"):
        m = records.read_manifest(f"{out}_{part}.manifest.json")
        assert m.mids == ["bell", "hum"] and m.fbank_mean is not None
        ids[part] = {ex["id"] for ex in records.iter_examples(m.shard_paths())}
        assert m.listed == m.num_examples == len(ids[part])
    assert ids["train"].isdisjoint(ids["test"])
    assert ids["train"] | ids["test"] == {f"{c}/{i}.wav" for c in ("bell", "hum")
                                          for i in range(5)}
    assert sorted(i.split("/")[0] for i in ids["test"]) == ["bell", "hum"]  # 1 per class
    assert not os.path.exists(f"{out}.manifest.json")


def test_make_tfrecords_fold_column_speaker_split_real_audio(tmp_path, shared):
    """FSDD as a user would: a CSV path,label,speaker and --fold_column=speaker: the test set
    is exactly the held-out speaker's clips."""
    from psla_tf.data import records
    rec = shared("data", "fsdd", "recordings")
    lines = ["path,label,speaker"]
    for d in ("3", "7"):
        for s in ("jackson", "theo", "nicolas"):
            for n in (0, 1):
                lines.append(f"{rec / f'{d}_{s}_{n}.wav'},{d},{s}")
    (tmp_path / "fsdd.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "d" / "fsdd"
    r = _make_tfrecords(f"--input={tmp_path / 'fsdd.csv'}", "--fold_column=speaker",
                        "--test_fold=theo", f"--output_prefix={out}", "--target_length=100")
    assert r.returncode == 0, r.stderr[-2000:]
    test_ids = {ex["id"] for ex in records.iter_examples(
        records.read_manifest(f"{out}_test.manifest.json").shard_paths())}
    train_ids = {ex["id"] for ex in records.iter_examples(
        records.read_manifest(f"{out}_train.manifest.json").shard_paths())}
    assert test_ids == {l.split(",")[0] for l in lines[1:] if l.endswith(",theo")}
    assert len(train_ids) == 8 and not any("_theo_" in i for i in train_ids)
    # a fold value that no row has: one-line error, exit 2, nothing written
    r = _make_tfrecords(f"--input={tmp_path / 'fsdd.csv'}", "--fold_column=speaker",
                        "--test_fold=nobody", f"--output_prefix={tmp_path / 'e' / 'x'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:")
    assert "nobody" in r.stderr and not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- grouped validation
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")


def _speaker_rows(per=3):
    """FSDD-like rows: 6 speakers × 10 digits × ``per`` takes, speaker in a CSV column."""
    return [sources.Row(id=f"{d}_{s}_{k}.wav", path=f"/r/{d}_{s}_{k}.wav", mids=(str(d),),
                        line=1, record={"path": f"{d}_{s}_{k}.wav", "speaker": s})
            for s in SPEAKERS for d in range(10) for k in range(per)]


def _speakers(parts):
    return {k: {r.id.split("_")[1] for r in v} for k, v in parts.items()}


def test_val_fraction_takes_whole_groups_of_the_fold_column():
    """--fold_column=speaker --test_fold=theo --val_fraction=0.2: test is theo, validation is
    one whole other speaker (20 % of the 5 remaining), no speaker in two splits."""
    rows = _speaker_rows()
    parts = splits.make_splits(rows, val_fraction=0.2, fold_column="speaker", test_fold="theo")
    spk = _speakers(parts)
    assert spk["test"] == {"theo"} and len(spk["val"]) == 1 and len(spk["train"]) == 4
    assert spk["train"] | spk["val"] | spk["test"] == set(SPEAKERS)
    assert len(parts["val"]) == 30 and len(parts["test"]) == 30 and len(parts["train"]) == 120
    # the same groups by file name give the same split; the seed picks another speaker
    by_name = splits.make_splits(rows, val_fraction=0.2, group_regex=r"^\d+_([a-z]+)_",
                                 test_fold="theo")
    assert _speakers(by_name) == spk
    others = {frozenset(_speakers(splits.make_splits(
        rows, val_fraction=0.2, seed=s, fold_column="speaker", test_fold="theo"))["val"])
        for s in range(8)}
    assert len(others) > 1 and all(len(v) == 1 and "theo" not in v for v in others)
    # fractions of whole groups without a named test fold (the old split_rows semantics)
    both = splits.make_splits(rows, 1 / 6, 1 / 6, fold_column="speaker")
    assert [len(v) for v in _speakers(both).values()] == [4, 1, 1]
    # input order kept inside each split
    pos = {r.id: i for i, r in enumerate(rows)}
    assert [pos[r.id] for r in parts["train"]] == sorted(pos[r.id] for r in parts["train"])


def test_val_fold_names_groups():
    rows = _speaker_rows(per=1)
    parts = splits.make_splits(rows, fold_column="speaker", test_fold="theo",
                               val_fold="jackson,lucas")
    assert _speakers(parts) == {"train": {"george", "nicolas", "yweweler"},
                                "val": {"jackson", "lucas"}, "test": {"theo"}}
    parts = splits.make_splits(rows, test_fraction=0.0, group_regex=r"^\d+_([a-z]+)_",
                               val_fold="george")
    assert _speakers(parts) == {"train": set(SPEAKERS) - {"george"}, "val": {"george"}}
    bad = [
        (dict(val_fold="theo"), "--fold_column"),                       # no groups defined
        (dict(fold_column="speaker", test_fold="theo", val_fold="theo"), "both"),
        (dict(fold_column="speaker", val_fold="nobody"), "nobody"),
        (dict(fold_column="speaker", val_fold="george", val_fraction=0.2), "not both"),
        (dict(fold_column="speaker", test_fold="theo", test_fraction=0.2), "not both"),
        (dict(fold_column="speaker", group_regex="x", test_fold="theo"), "not both"),
        (dict(fold_column="speaker"), "--test_fold"),
        (dict(fold_column="speaker", test_fold=" , "), "at least one"),
        (dict(fold_column="mic", test_fold="a"), "not a column"),
        (dict(fold_column="speaker", test_fold=",".join(SPEAKERS)), "no training clips"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(DataError, match=msg):
            splits.make_splits(rows, **kwargs)


def test_split_cli_val_fold_and_grouped_val_fraction(tmp_path):
    lst = tmp_path / "fsdd.csv"
    with open(lst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "speaker"])
        for r in _speaker_rows(per=1):
            w.writerow([r.record["path"], r.mids[0], r.record["speaker"]])
    tool = [f"--input={lst}", "--fold_column=speaker", "--test_fold=theo"]
    r = run_script("split.py", *tool, "--val_fold=lucas", f"--output_prefix={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr
    got = {k: {x.record["speaker"] for x in sources.read_plain_csv(f"{tmp_path / 'a'}_{k}.csv")[0]}
           for k in splits.SPLIT_NAMES}
    assert got == {"train": set(SPEAKERS) - {"theo", "lucas"}, "val": {"lucas"}, "test": {"theo"}}
    # --val_fraction=0.2 of the 5 other speakers takes one whole speaker
    r = run_script("split.py", *tool, "--val_fraction=0.2", f"--output_prefix={tmp_path / 'b'}")
    assert r.returncode == 0, r.stderr
    val = {x.record["speaker"] for x in sources.read_plain_csv(f"{tmp_path / 'b'}_val.csv")[0]}
    assert len(val) == 1 and "theo" not in val
    r = run_script("split.py", *tool, "--val_fold=theo", f"--output_prefix={tmp_path / 'c'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")
