"""Input listings → rows (psla_tf/data/sources.py): every format, vocabulary, checks."""
from __future__ import annotations

import json
import os

import pytest

from psla_tf.data import sources
from psla_tf.data.records import DataError, read_label_csv

OFFICIAL = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
--ZhevVpy1s, 50.000, 60.000, "/m/012xff"
abc, 0.500, 10.500, "/m/09x0r"
"""


def test_audioset_official_header_and_patterns(tmp_path):
    p = tmp_path / "seg.csv"
    p.write_text(OFFICIAL)
    assert sources.detect_format(str(p)) == "audioset"
    rows = sources.read_rows(str(p), audio_dir="/a")
    assert [r.id for r in rows] == ["--PJHxphWEs_30.000", "--ZhevVpy1s_50.000", "abc_0.500"]
    assert rows[0].mids == ("/m/09x0r", "/t/dd00088") and rows[1].mids == ("/m/012xff",)
    assert rows[0].path == "/a/--PJHxphWEs.wav" and rows[0].line == 4
    rows = sources.read_rows(str(p), audio_dir="/a", filename_pattern="{YTID}_{start}_{end}.flac")
    assert rows[0].path == "/a/--PJHxphWEs_30.000_40.000.flac"
    rows = sources.read_rows(str(p), audio_dir="/a", filename_pattern="{YTID}_{start:d}.flac")
    assert rows[0].path == "/a/--PJHxphWEs_30.flac"
    rows = sources.read_rows(str(p), audio_dir="/a", filename_pattern="{YTID}_{start_int}-{end:.1f}.wav")
    assert rows[2].path == "/a/abc_0-10.5.wav"  # round(0.5) = 0 (banker's), as Python's int(round())
    with pytest.raises(DataError, match="filename_pattern"):
        sources.read_rows(str(p), audio_dir="/a", filename_pattern="{ytid}.wav")
    with pytest.raises(DataError, match="audio_dir"):
        sources.read_rows(str(p))


def test_real_audioset_csv(shared):
    path = shared("data", "audioset", "balanced_train_segments.csv")
    rows = sources.read_rows(str(path), audio_dir="audio")
    with open(path) as f:
        n_lines = sum(1 for line in f if line.strip() and not line.startswith(("#", "YTID")))
    assert len(rows) == n_lines > 20000
    assert rows[0].id == "--PJHxphWEs_30.000" and rows[0].mids == ("/m/09x0r", "/t/dd00088")
    mids, _ = read_label_csv(str(shared("data", "audioset", "class_labels_indices.csv")))
    sources.check_rows(rows, mids)  # every label known, ids unique
    assert all(r.mids for r in rows)


def test_datafile_relative_paths(tmp_path):
    d = tmp_path / "lists"
    d.mkdir()
    (d / "train.json").write_text(json.dumps({"data": [
        {"wav": "../audio/a.wav", "labels": "/m/1,/m/2"},
        {"wav": "/abs/b.flac", "labels": "/m/2"}]}))
    rows = sources.read_rows(str(d / "train.json"))
    assert [r.id for r in rows] == ["../audio/a.wav", "/abs/b.flac"]
    assert os.path.normpath(rows[0].path) == str(tmp_path / "audio" / "a.wav")
    assert rows[0].mids == ("/m/1", "/m/2")
    (d / "bad.json").write_text('{"items": []}')
    with pytest.raises(DataError, match="data"):
        sources.read_rows(str(d / "bad.json"))


def test_plain_csv_separators_and_vocabulary(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text('path,labels\nsub/x.wav,"dog, cat"\ny.wav,bird;dog\nz.wav,\n')
    assert sources.detect_format(str(p)) == "csv"
    rows = sources.read_rows(str(p))
    assert [r.mids for r in rows] == [("dog", "cat"), ("bird", "dog"), ()]
    assert rows[0].path == str(tmp_path / "sub" / "x.wav") and rows[0].id == "sub/x.wav"
    assert [r.line for r in rows] == [2, 3, 4]
    mids, names = sources.build_vocabulary(rows)
    assert mids == ["bird", "cat", "dog"] == names
    (tmp_path / "nohdr.csv").write_text("a.wav,dog\n")
    with pytest.raises(DataError, match="header"):
        sources.read_rows(str(tmp_path / "nohdr.csv"))


def test_audio_folder(tmp_path):
    for cls, files in {"dog": ["1.wav", "2.flac"], "cat": ["3.ogg", "notes.txt"]}.items():
        (tmp_path / cls).mkdir()
        for f in files:
            (tmp_path / cls / f).write_bytes(b"")
    rows = sources.read_rows(str(tmp_path))
    assert [(r.id, r.mids) for r in rows] == [("cat/3.ogg", ("cat",)), ("dog/1.wav", ("dog",)),
                                              ("dog/2.flac", ("dog",))]
    assert sources.build_vocabulary(rows)[0] == ["cat", "dog"]


def test_unknown_mids_and_duplicates_listed_with_lines():
    rows = [sources.Row("a", "a", ("/m/1",), 2), sources.Row("b", "b", ("/m/x", "/m/1"), 3),
            sources.Row("c", "c", ("/m/x",), 7), sources.Row("d", "d", ("/m/y",), 9)]
    with pytest.raises(DataError) as e:
        sources.check_rows(rows, ["/m/1"])
    msg = str(e.value)
    assert "'/m/x' on line(s) 3, 7" in msg and "'/m/y' on line(s) 9" in msg and "2 label(s)" in msg
    dup = [sources.Row("a", "a", (), 2), sources.Row("a", "a2", (), 5)]
    with pytest.raises(DataError, match=r"(?s)duplicate.*lines 2 and 5"):
        sources.check_rows(dup, ["/m/1"])


# ----------------------------------------------------------------------------- your own data
def test_output_vocabulary_written_reused_and_conflict(tmp_path):
    """No --label_csv: labels.csv (index,mid,display_name) is written into the output folder,
    reused by a later set prepared there, and never silently replaced."""
    import csv as csvlib
    rows = [sources.Row(id=f"{c}/{i}.wav", path=f"/x/{c}/{i}.wav", mids=(c,), line=i)
            for i, c in enumerate(["dog", "cat", "dog", "bird"])]
    mids, names, where = sources.output_vocabulary(rows, None, str(tmp_path / "data"))
    assert mids == names == ["bird", "cat", "dog"] and "written" in where
    with open(tmp_path / "data" / "labels.csv", newline="") as f:
        got = list(csvlib.reader(f))
    assert got == [["index", "mid", "display_name"], ["0", "bird", "bird"], ["1", "cat", "cat"],
                   ["2", "dog", "dog"]]
    # a test set lacking a class reuses the same vocabulary
    mids2, _, where2 = sources.output_vocabulary(rows[:2], None, str(tmp_path / "data"))
    assert mids2 == mids and "existing" in where2
    # a label outside it is an error naming it; the file stays as it was
    before = (tmp_path / "data" / "labels.csv").read_bytes()
    with pytest.raises(DataError, match="'cow'"):
        sources.output_vocabulary(rows + [sources.Row("cow/1.wav", "/x", ("cow",), 9)], None,
                                  str(tmp_path / "data"))
    assert (tmp_path / "data" / "labels.csv").read_bytes() == before
    # --label_csv given: read, nothing written
    mids3, _, _ = sources.output_vocabulary(rows, str(tmp_path / "data" / "labels.csv"),
                                            str(tmp_path / "other"))
    assert mids3 == mids and not (tmp_path / "other").exists()


def test_plain_csv_audio_root(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc.csv").write_text("filename,fold,category\n1-a.wav,1,dog\n")
    rows, header = sources.read_plain_csv(str(tmp_path / "meta" / "esc.csv"),
                                          audio_root=str(tmp_path / "audio"))
    assert rows[0].path == str(tmp_path / "audio" / "1-a.wav") and rows[0].id == "1-a.wav"
    assert rows[0].record["fold"] == "1" and header == ["filename", "fold", "category"]
