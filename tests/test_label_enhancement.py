"""Label enhancement (paper Sec. V, Algorithm 2) against an independent loop implementation on
the real AudioSet balanced label list, hand-made ontologies for each rule, and the file formats
(datafiles, TFRecords) of tools/enhance_labels.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from psla_tf import label_enhancement as le
from psla_tf.data import records, sources
from psla_tf.data.records import DataError
from psla_tf.ontology import load_ontology, ontology_from_entries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- reference
def ref_thresholds(pred: np.ndarray, target: np.ndarray, mode: str) -> list[float]:
    """As the paper's Procedure 1, class by class (NaN for a class nobody is labelled with)."""
    out = []
    for k in range(pred.shape[1]):
        v = pred[np.where(target[:, k] == 1)[0], k]
        if v.size == 0:
            out.append(float("nan"))
        elif mode == "mean":
            out.append(float(np.mean(v)))
        elif mode == "median":
            out.append(float(np.median(v)))
        else:
            out.append(float(np.percentile(v, int(mode))))
    return out


def ref_graph(ontology_entries: list[dict]):
    """child map and full-ancestor map, built as plainly as possible (abstract: no child_ids)."""
    child = {}
    parent: dict[str, list[str]] = {}
    for c in ontology_entries:
        kids = [] if c.get("restrictions") == ["abstract"] else list(c["child_ids"])
        child[c["id"]] = kids
        for k in kids:
            parent.setdefault(k, []).append(c["id"])

    def ancestors(m: str) -> set:
        out, stack = set(), list(parent.get(m, []))
        while stack:
            p = stack.pop()
            if p not in out and p != m:
                out.add(p)
                stack.extend(parent.get(p, []))
        return out
    return child, {m["id"]: ancestors(m["id"]) for m in ontology_entries}


def ref_enhance(label_mids, pred, thr, vocab, child, anc, kind):
    """Procedure 2 for one fix type, loop by loop; returns new label sets and pair counts
    credited to the first original label that adds each class (as the reference scripts)."""
    idx = {m: i for i, m in enumerate(vocab)}
    out, pairs = [], {}
    for i, labels in enumerate(label_mids):
        new = list(labels)
        for lab in labels:
            cands = []
            if kind in ("type1", "both"):
                cands += child.get(lab, [])
            if kind in ("type2", "both"):
                cands += sorted(anc.get(lab, set()))
            for c in cands:
                if c in idx and c not in new and pred[i, idx[c]] > thr[idx[c]]:
                    new.append(c)
                    pairs[(lab, c)] = pairs.get((lab, c), 0) + 1
        out.append(set(new))
    return out, pairs


# ----------------------------------------------------------------------------- real AudioSet
@pytest.fixture(scope="module")
def audioset(request):
    from tests.conftest import shared_path
    base = shared_path("data", "audioset")
    vocab, names = records.read_label_csv(str(base / "class_labels_indices.csv"))
    listing = sources.read_listing(str(base / "balanced_train_segments.csv"))
    labels = le.mids_to_indices(listing.mids, vocab, listing.ids, "balanced")
    with open(base / "ontology.json") as f:
        entries = json.load(f)
    target = le.multi_hot(labels, len(vocab)).astype(np.float64)
    rng = np.random.default_rng(0)
    pred = np.clip(target * 0.3 + rng.random(target.shape) * 0.7, 0, 1)  # float64, as np.loadtxt
    return dict(vocab=vocab, names=names, listing=listing, labels=labels, entries=entries,
                target=target, pred=pred, onto=load_ontology(str(base / "ontology.json")))


def test_real_ontology_facts(audioset):
    onto, vocab = audioset["onto"], audioset["vocab"]
    assert len(vocab) == 527 and len(audioset["listing"].ids) > 20000
    assert not any(m in onto.abstract for m in vocab)  # why the two abstract readings agree
    # "Music genre" is abstract: its children are no children of anything through it
    genre = next(m for m, n in onto.names.items() if n == "Music genre")
    rock = next(m for m, n in onto.names.items() if n == "Rock music")
    music = next(m for m, n in onto.names.items() if n == "Music")
    assert genre in onto.abstract and onto.children(genre) == ()
    assert music not in onto.ancestors(rock) and genre in onto.children(music)


@pytest.mark.parametrize("mode", le.THRESHOLD_MODES)
def test_real_audioset_matches_loop_reference(audioset, mode):
    vocab, pred, target = audioset["vocab"], audioset["pred"], audioset["target"]
    thr_ref = ref_thresholds(pred, target, mode)
    thr = le.class_thresholds(pred, audioset["labels"], mode)
    np.testing.assert_array_equal(thr, np.array(thr_ref))  # same arithmetic: exact
    child, anc = ref_graph(audioset["entries"])
    mids = audioset["listing"].mids
    results = {}
    for fix in le.FIX_TYPES:
        edges = le.vocabulary_edges(audioset["onto"], vocab, fix)
        got = le.enhance_labels(audioset["labels"], pred, edges, threshold=mode, fix=fix)
        got_sets = [set(vocab[j] for j in row) for row in got.labels]
        if fix == "both":
            want = [a | b for a, b in zip(results["type1"], results["type2"])]
        else:
            want, want_pairs = ref_enhance(mids, pred, thr_ref, vocab, child, anc, fix)
            report = le.enhancement_report(got, vocab, audioset["names"], top=10 ** 6)
            got_pairs = {(p["source_mid"], p["added_mid"]): p["count"]
                         for p in report["top_pairs"]}
            assert got_pairs == want_pairs
        assert got_sets == want, f"{mode}/{fix}"
        results[fix] = got_sets
        n_added = sum(len(w) for w in want) - got.num_original
        assert got.num_added == n_added
        if mode in ("10", "5"):
            assert n_added > 1000  # the check is not vacuous
    # both = union of type1 and type2; each type adds something the other does not
    assert any(a - b for a, b in zip(results["type1"], results["type2"]))
    assert any(b - a for a, b in zip(results["type1"], results["type2"]))


# ----------------------------------------------------------------------------- tiny ontologies
def _onto(spec: dict[str, tuple[list[str], bool]]):
    """{id: (child_ids, abstract)} → Ontology."""
    return ontology_from_entries([
        {"id": k, "name": k.upper(), "child_ids": kids,
         "restrictions": ["abstract"] if ab else []} for k, (kids, ab) in spec.items()])


def _run(onto, vocab, labels, scores, fix, thresholds):
    edges = le.vocabulary_edges(onto, vocab, fix)
    r = le.enhance_labels(labels, np.array(scores, float), edges, fix=fix,
                          thresholds=np.array(thresholds, float))
    return [[vocab[j] for j in row] for row in r.added], r


def test_abstract_parent_gives_no_edges():
    vocab = ["g", "c"]
    for abstract, expect in ((True, [[], []]), (False, [["g"], []])):
        onto = _onto({"g": (["p"], False), "p": (["c"], abstract), "c": ([], False)})
        added, _ = _run(onto, vocab, [[1], [0]], [[0.9, 0.9], [0.9, 0.9]], "type2", [0.5, 0.5])
        assert added == expect
    # Type I only goes to direct children; p is not in the vocabulary
    onto = _onto({"g": (["p"], False), "p": (["c"], False), "c": ([], False)})
    assert _run(onto, vocab, [[0]], [[0.9, 0.9]], "type1", [0.5, 0.5])[0] == [[]]
    # an abstract class in a vocabulary is still the child of its non-abstract parent
    onto = _onto({"g": (["p"], False), "p": (["c"], True), "c": ([], False)})
    added, _ = _run(onto, ["g", "p", "c"], [[0], [1]], [[0.9] * 3] * 2, "both", [0.5] * 3)
    assert added == [["p"], ["g"]]


def test_multi_parent_child_and_crediting():
    onto = _onto({"a": (["c"], False), "b": (["c"], False), "c": ([], False)})
    vocab = ["a", "b", "c"]
    added, _ = _run(onto, vocab, [[2]], [[0.9, 0.9, 0.9]], "type2", [0.5] * 3)
    assert added == [["a", "b"]]
    added, _ = _run(onto, vocab, [[2]], [[0.9, 0.4, 0.9]], "type2", [0.5] * 3)
    assert added == [["a"]]
    # c proposed by both written labels: added once, credited to the first written (b)
    added, r = _run(onto, vocab, [[1, 0]], [[0.9, 0.9, 0.9]], "type1", [0.5] * 3)
    assert added == [["c"]] and r.added_pairs.tolist() == [[0, 1, 2, le.RELATION_CHILD]]
    assert r.labels == [[1, 0, 2]]


def test_deep_ancestors_and_child_outside_vocabulary():
    onto = _onto({"a": (["y"], False), "y": (["z"], False), "z": ([], False)})
    vocab = ["a", "z"]
    assert _run(onto, vocab, [[0]], [[0.9, 0.9]], "type1", [0.5, 0.5])[0] == [[]]
    assert _run(onto, vocab, [[1]], [[0.9, 0.9]], "type2", [0.5, 0.5])[0] == [["a"]]
    onto = _onto({"a": (["y", "z"], False), "y": ([], False), "z": ([], False)})
    assert _run(onto, vocab, [[0]], [[0.9, 0.9]], "type1", [0.5, 0.5])[0] == [["z"]]


def test_threshold_is_strict_and_computed_from_original_labels():
    onto = _onto({"p": (["c"], False), "c": ([], False)})
    vocab = ["p", "c"]
    edges = le.vocabulary_edges(onto, vocab, "type1")
    labels = [[0, 1], [0, 1], [0], [0]]  # t_c = mean(0.25, 0.75) = 0.5 exactly
    scores = np.array([[0.9, 0.25], [0.9, 0.75], [0.9, 0.5], [0.9, 0.5000001]])
    r = le.enhance_labels(labels, scores, edges, threshold="mean", fix="type1")
    assert r.thresholds[1] == 0.5
    assert r.added == [[], [], [], [1]]


def test_percentile_thresholds_linear_interpolation():
    scores = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    labels = [[0]] * 5
    assert le.class_thresholds(scores, labels, "25")[0] == pytest.approx(1.0)
    assert le.class_thresholds(scores, labels, "10")[0] == pytest.approx(0.4)
    assert le.class_thresholds(scores, labels, "5")[0] == pytest.approx(0.2)
    assert le.class_thresholds(scores, labels, "median")[0] == 2.0


def test_class_without_labelled_clips_is_never_added():
    onto = _onto({"p": (["c"], False), "c": ([], False)})
    vocab = ["p", "c"]
    edges = le.vocabulary_edges(onto, vocab, "both")
    r = le.enhance_labels([[0], [0]], np.array([[0.5, 1.0], [0.7, 1.0]]), edges, fix="both")
    assert np.isnan(r.thresholds[1]) and r.thresholds[0] == pytest.approx(0.6)
    assert r.added == [[], []]
    report = le.enhancement_report(r, vocab, ["P", "C"])
    assert report["classes_without_threshold"] == 1 and report["labels_added"] == 0


def test_both_is_union_of_type1_and_type2():
    onto = _onto({"r": (["m"], False), "m": (["l1", "l2"], False), "l1": ([], False),
                  "l2": ([], False)})
    vocab = ["r", "m", "l1", "l2"]
    rng = np.random.default_rng(1)
    labels = [list(rng.choice(4, size=rng.integers(1, 3), replace=False)) for _ in range(200)]
    scores = rng.random((200, 4))
    res = {}
    for fix in le.FIX_TYPES:
        edges = le.vocabulary_edges(onto, vocab, fix)
        res[fix] = le.enhance_labels(labels, scores, edges, threshold="25", fix=fix)
    for i in range(200):
        assert set(res["both"].labels[i]) == set(res["type1"].labels[i]) | set(
            res["type2"].labels[i])
    assert res["type1"].num_added > 0 and res["type2"].num_added > 0


# ----------------------------------------------------------------------------- files and tool
def _tiny_world(tmp_path):
    entries = [{"id": "/x/p", "name": "Parent", "child_ids": ["/x/c"], "restrictions": []},
               {"id": "/x/c", "name": "Child", "child_ids": [], "restrictions": []},
               {"id": "/x/o", "name": "Other", "child_ids": [], "restrictions": []}]
    onto = tmp_path / "ontology.json"
    onto.write_text(json.dumps(entries))
    vocab = ["/x/p", "/x/c", "/x/o"]
    label_csv = tmp_path / "labels.csv"
    records.write_label_csv(str(label_csv), vocab, ["Parent", "Child", "Other"])
    ids = [f"clips/a{i}.wav" for i in range(6)]
    labels = [[0], [0, 1], [0, 1], [1, 0], [0], [2]]
    # t_c = mean(0.8, 0.6, 0.7) = 0.7, t_p = mean(.5, .5, .5, .5, .9) = 0.58: clip 0 gains c
    # (0.9 > 0.7), clip 4 does not (0.65); clip 5 gains nothing (o has no edges); clips 1-3
    # already have both
    scores = np.array([[0.5, 0.9, 0.0], [0.5, 0.8, 0.0], [0.5, 0.6, 0.], [0.5, 0.7, 0.],
                       [0.9, 0.65, 0.0], [0.99, 0.99, 0.9]])
    npz = tmp_path / "scores.npz"
    np.savez(npz, ids=np.array(ids[::-1]), scores=scores[::-1],
             targets=le.multi_hot(labels, 3)[::-1].astype(np.float32))
    return dict(onto=str(onto), vocab=vocab, label_csv=str(label_csv), ids=ids, labels=labels,
                scores=scores, npz=str(npz))


def test_json_datafile_round_trip(tmp_path):
    w = _tiny_world(tmp_path)
    data = {"data": [{"wav": i, "labels": ",".join(w["vocab"][j] for j in lab), "extra": n}
                     for n, (i, lab) in enumerate(zip(w["ids"], w["labels"]))]}
    src = tmp_path / "train.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "out" / "train_le.json"
    rep = le.run_enhancement(str(src), w["npz"], w["onto"], str(out), label_csv=w["label_csv"],
                             threshold="mean", fix="both")
    got = json.loads(out.read_text())["data"]
    assert [e["wav"] for e in got] == w["ids"] and [e["extra"] for e in got] == list(range(6))
    assert got[0]["labels"] == "/x/p,/x/c"
    assert [e["labels"] for e in got[1:]] == [e["labels"] for e in data["data"][1:]]
    assert rep["labels_added"] == 1 and rep["labels_before"] == 9
    assert rep["top_pairs"][0]["source_name"] == "Parent"
    assert rep["top_pairs"][0]["added_name"] == "Child"
    assert os.path.exists(str(out) + ".report.json") and os.path.exists(str(out) + ".report.md")


def test_csv_formats_round_trip(tmp_path):
    w = _tiny_world(tmp_path)
    plain = tmp_path / "train.csv"
    plain.write_text("path,labels,fold\n" + "".join(
        f'{i},"{",".join(w["vocab"][j] for j in lab)}",{n}\n'
        for n, (i, lab) in enumerate(zip(w["ids"], w["labels"]))))
    le.run_enhancement(str(plain), w["npz"], w["onto"], str(tmp_path / "o.csv"),
                       label_csv=w["label_csv"])
    back = sources.read_listing(str(tmp_path / "o.csv"))
    assert back.ids == w["ids"] and back.mids[0] == ["/x/p", "/x/c"]
    assert back.rows[3].record["fold"] == "3"
    # AudioSet segment CSV: ids {YTID}_{start}
    aset = tmp_path / "seg.csv"
    yt = [f"Y{i}" for i in range(6)]
    aset.write_text("# comment\n# YTID, start_seconds, end_seconds, positive_labels\n" + "".join(
        f'{y}, 30.000, 40.000, "{",".join(w["vocab"][j] for j in lab)}"\n'
        for y, lab in zip(yt, w["labels"])))
    np.savez(tmp_path / "s2.npz", ids=np.array([f"{y}_30.000" for y in yt]), scores=w["scores"])
    le.run_enhancement(str(aset), str(tmp_path / "s2.npz"), w["onto"], str(tmp_path / "o2.csv"),
                       label_csv=w["label_csv"])
    back = sources.read_listing(str(tmp_path / "o2.csv"))
    assert back.fmt == "audioset" and back.ids == [f"{y}_30.000" for y in yt]
    assert back.mids[0] == ["/x/p", "/x/c"] and back.mids[1:] == [
        [w["vocab"][j] for j in lab] for lab in w["labels"][1:]]
    assert (tmp_path / "o2.csv").read_text().startswith("# comment\n")


def test_missing_and_extra_ids_are_errors(tmp_path, capsys):
    w = _tiny_world(tmp_path)
    data = {"data": [{"wav": i, "labels": ",".join(w["vocab"][j] for j in lab)}
                     for i, lab in zip(w["ids"], w["labels"])]}
    src = tmp_path / "train.json"
    src.write_text(json.dumps(data))
    np.savez(tmp_path / "m.npz", ids=np.array(w["ids"][:5] + ["ghost.wav"]), scores=w["scores"])
    with pytest.raises(DataError) as e:
        le.run_enhancement(str(src), str(tmp_path / "m.npz"), w["onto"], str(tmp_path / "o.json"),
                           label_csv=w["label_csv"])
    assert "clips/a5.wav" in str(e.value) and "ghost.wav" in str(e.value)
    assert not (tmp_path / "o.json").exists()
    bad_t = le.multi_hot(w["labels"], 3).astype(np.float32)
    bad_t[2, 2] = 1
    np.savez(tmp_path / "t.npz", ids=np.array(w["ids"]), scores=w["scores"], targets=bad_t)
    with pytest.raises(DataError, match="targets disagree"):
        le.run_enhancement(str(src), str(tmp_path / "t.npz"), w["onto"], str(tmp_path / "o.json"),
                           label_csv=w["label_csv"])
    # the command line prints the message and exits non-zero without a traceback
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "enhance_labels_tool", os.path.join(ROOT, "tools", "enhance_labels.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.FLAGS(["enhance_labels", f"--train_data={src}", f"--scores={tmp_path / 'm.npz'}",
                f"--ontology={w['onto']}", f"--label_csv={w['label_csv']}",
                f"--output={tmp_path / 'o.json'}"])
    assert tool.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ghost.wav" in err and "Traceback" not in err


def test_tfrecord_round_trip(tmp_path):
    w = _tiny_world(tmp_path)
    rng = np.random.default_rng(3)
    waves = [rng.integers(-3000, 3000, size=1600 + 100 * i).astype("<i2") for i in range(6)]
    prefix = str(tmp_path / "in" / "train")
    os.makedirs(tmp_path / "in")
    shards = []
    for s, part in enumerate([range(0, 4), range(4, 6)]):
        name = records.shard_name(prefix, s, 2)
        import tensorflow as tf
        with tf.io.TFRecordWriter(name) as wr:
            for i in part:
                wr.write(records.make_example(w["ids"][i], waves[i], w["labels"][i],
                                              [w["vocab"][j] for j in w["labels"][i]]))
        shards.append({"file": os.path.basename(name), "num_examples": len(part)})
    counts = le.multi_hot(w["labels"], 3).sum(0).tolist()
    records.Manifest(num_examples=6, shards=shards, mids=w["vocab"],
                     names=["Parent", "Child", "Other"], class_counts=counts, total_seconds=1.5,
                     fbank_mean=-5.0, fbank_std=4.0, fbank_frames=123, listed=7,
                     extra={"note": "kept"}).write(records.manifest_path(prefix))
    out = str(tmp_path / "out" / "train_le")
    rep = le.run_enhancement(prefix + "-*.tfrecord", w["npz"], w["onto"], out)
    assert rep["labels_added"] == 1
    man = records.read_manifest(records.manifest_path(out))
    assert man.class_counts == [5, 4, 1] and counts == [5, 3, 1]
    assert (man.fbank_mean, man.fbank_std, man.fbank_frames, man.listed) == (-5.0, 4.0, 123, 7)
    assert man.extra["note"] == "kept" and man.extra["label_enhancement"]["labels_added"] == 1
    assert [s["num_examples"] for s in man.shards] == [4, 2]
    got = list(records.iter_examples(man.shard_paths()))
    orig = list(records.iter_examples(sorted(records.expand_glob(prefix + "-*.tfrecord"))))
    for g, o, i in zip(got, orig, range(6)):
        assert g["id"] == o["id"] == w["ids"][i]
        assert g["waveform_int16"].tobytes() == o["waveform_int16"].tobytes()
        assert g["num_samples"] == o["num_samples"]
    assert got[0]["labels"] == [0, 1] and got[0]["mids"] == ["/x/p", "/x/c"]
    assert [g["labels"] for g in got[1:]] == w["labels"][1:]
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "out"))
    # the copy's record index (i.i.d. order) is written with it: a scan of the new shards
    from psla_tf.data import record_index
    index = record_index.read_index(record_index.index_path(out))
    for path in man.shard_paths():
        e, scan = index[os.path.basename(path)], record_index.scan_shard(path)
        assert e.size == scan.size and e.lengths.tolist() == scan.lengths.tolist()
        assert e.labels.tolist() == scan.labels.tolist()
    assert index["train_le-00000-of-00002.tfrecord"].labels.tolist()[:2] == [0, 1]


def test_predict_scores_file_and_class_map_check(tmp_path):
    """A scores file as tools/predict.py writes it (ids, scores, targets, mids, names) is
    accepted; one whose stored class map differs from the vocabulary is refused."""
    from psla_tf.prediction import Predictions, save_scores
    w = _tiny_world(tmp_path)
    data = {"data": [{"wav": i, "labels": ",".join(w["vocab"][j] for j in lab)}
                     for i, lab in zip(w["ids"], w["labels"])]}
    src = tmp_path / "train.json"
    src.write_text(json.dumps(data))
    hot = le.multi_hot(w["labels"], 3).astype(np.float32)
    good = tmp_path / "pred.npz"
    save_scores(str(good), Predictions(w["ids"], w["scores"].astype(np.float32), hot,
                                       w["vocab"], ["Parent", "Child", "Other"]))
    rep = le.run_enhancement(str(src), str(good), w["onto"], str(tmp_path / "o.json"),
                             label_csv=w["label_csv"])
    assert rep["labels_added"] == 1
    bad = tmp_path / "other_vocab.npz"
    save_scores(str(bad), Predictions(w["ids"], w["scores"].astype(np.float32), hot,
                                      ["/x/c", "/x/p", "/x/o"], ["Child", "Parent", "Other"]))
    with pytest.raises(DataError, match="class map"):
        le.run_enhancement(str(src), str(bad), w["onto"], str(tmp_path / "o2.json"),
                           label_csv=w["label_csv"])


def test_esc50_style_csv_end_to_end_with_the_tool(tmp_path):
    """An ESC-50-style listing (``filename,fold,target,category,…``: the labels column is
    ``category``, as tools/make_tfrecords.py reads it) goes through tools/enhance_labels.py;
    the output keeps every column, row and value but ``category``, and make_tfrecords'
    reader and preparation take it."""
    import csv
    import soundfile as sf
    from helpers_cli import run_script
    from psla_tf.data import prepare
    onto = tmp_path / "ontology.json"
    onto.write_text(json.dumps([
        {"id": "animal", "name": "Animal", "child_ids": ["dog", "cat"], "restrictions": []},
        {"id": "dog", "name": "Dog", "child_ids": [], "restrictions": []},
        {"id": "cat", "name": "Cat", "child_ids": [], "restrictions": []},
        {"id": "rain", "name": "Rain", "child_ids": [], "restrictions": []}]))
    vocab = ["animal", "dog", "cat", "rain"]
    records.write_label_csv(str(tmp_path / "labels.csv"), vocab, vocab)
    category = ["dog", "dog", "cat", "animal", "animal", "rain"]
    header = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    rng = np.random.default_rng(5)
    rows = []
    for i, c in enumerate(category):
        name = f"{i % 5 + 1}-{100 + i}-A-{vocab.index(c)}.wav"
        sf.write(tmp_path / name, rng.uniform(-0.3, 0.3, 1600 + 160 * i), 16000,
                 subtype="PCM_16")
        rows.append([name, str(i % 5 + 1), str(vocab.index(c)), c, str(i % 2 == 0),
                     f"{100 + i}", "A"])
    with open(tmp_path / "esc50.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    # t_animal = mean(.6, .8) = .7, t_dog = mean(.9, .7) = .8, t_cat = .9 (one clip):
    # Type II adds animal to clips 0 (.9) and 2 (.75), not 1 (.5); Type I adds dog to clip 3
    # (.85 > .8), cat to clip 4 (.95 > .9), not cat to 3 (.5) nor dog to 4 (.1); rain: no edges
    scores = np.array([[.9, .9, 0, 0], [.5, .7, 0, 0], [.75, 0, .9, 0], [.6, .85, .5, 0],
                       [.8, .1, .95, 0], [.99, .99, .99, .4]], np.float32)
    np.savez(tmp_path / "scores.npz", ids=np.array([r[0] for r in rows]), scores=scores)
    out = tmp_path / "enhanced" / "esc50_le.csv"
    res = run_script("enhance_labels.py", f"--train_data={tmp_path / 'esc50.csv'}",
                     f"--scores={tmp_path / 'scores.npz'}", f"--ontology={onto}",
                     f"--label_csv={tmp_path / 'labels.csv'}", "--threshold=mean",
                     "--fix=both", f"--output={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    with open(out, newline="") as f:
        got = list(csv.reader(f))
    want = [["dog", "animal"], ["dog"], ["cat", "animal"], ["animal", "dog"],
            ["animal", "cat"], ["rain"]]
    assert got[0] == header and len(got) == 7
    for g, r, w in zip(got[1:], rows, want):
        assert g[:3] + g[4:] == r[:3] + r[4:] and g[3] == ",".join(w)
    report = json.loads((tmp_path / "enhanced" / "esc50_le.csv.report.json").read_text())
    assert (report["labels_before"], report["labels_added"]) == (6, 4)
    # make_tfrecords' reader and preparation accept the enhanced listing
    (tmp_path / "enhanced" / "esc50_le.csv").replace(tmp_path / "esc50_le.csv")
    back = sources.read_rows(str(tmp_path / "esc50_le.csv"))
    assert [list(r.mids) for r in back] == want
    man = prepare.prepare(back, (vocab, vocab), str(tmp_path / "shards" / "esc"), stats=False,
                          progress=False)
    assert man.num_examples == 6 and man.class_counts == [4, 3, 2, 1]
    # a folder of class sub-folders has no label column to rewrite: one clear error
    (tmp_path / "folder" / "dog").mkdir(parents=True)
    with pytest.raises(DataError, match="no label column"):
        sources.read_listing(str(tmp_path / "folder"))
