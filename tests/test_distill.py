"""Knowledge distillation, the library parts (issue 19): teacher files → targets, the loss,
the pipeline's teacher targets under mixup (both sampling orders), and the teacher stored in
shards by tools/add_teacher_scores.py against the in-memory lookup. Fast (no training); the
trainer runs are in tests/test_distill_train.py."""
from __future__ import annotations

import os

import numpy as np
import pytest

from helpers_cli import run_script
from helpers_data import random_labels, random_waveforms, write_shards
from psla_tf.data import pipeline, records
from psla_tf.data import teacher as tlib
from psla_tf.data.records import DataError
from psla_tf.training import distill
from psla_tf.training.optim import psla_bce, psla_ce

C = 4
MIDS = [f"/m/c{k}" for k in range(C)]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _save(path, ids, arr, kind="scores", mids=MIDS):
    d = {"ids": np.asarray(ids, dtype=str), kind: np.asarray(arr, np.float32)}
    if mids is not None:
        d["mids"] = np.asarray(mids, dtype=str)
    np.savez(path, **d)
    return str(path)


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("kind,temperature", [("scores", 1.0), ("scores", 2.0),
                                              ("logits", 1.0), ("logits", 3.0)])
def test_targets_tf_equal_numpy_reference(kind, temperature):
    rng = np.random.default_rng(0)
    raw = (rng.uniform(-0.2, 1.3, (50, C)) if kind == "scores" else rng.normal(0, 3, (50, C)))
    got = tlib.targets_tf(raw, kind, temperature).numpy()
    if kind == "logits":   # independent truth: the logistic function of z / T
        want = _sigmoid(raw / temperature)
    elif temperature == 1.0:  # multi-head PSLA scores can exceed 1: clipped
        want = np.minimum(np.maximum(raw, 0.0), 1.0)
    else:
        p = np.clip(raw, 1e-7, float(np.float32(1 - 1e-7)))  # the float32 clamp
        want = _sigmoid(np.log(p / (1 - p)) / temperature)
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(tlib.targets_numpy(raw, kind, temperature), want, atol=1e-12)
    assert got.min() >= 0 and got.max() <= 1


def test_load_teacher_averages_per_clip_over_the_files_that_list_it(tmp_path):
    a = _save(tmp_path / "a.npz", ["x", "y", "z"], [[.1, .2, .3, .4], [1.2, 0, 0, 0],
                                                    [.5, .5, .5, .5]])
    b = _save(tmp_path / "b.npz", ["z", "w"], [[.1, .1, .1, .1], [.9, .8, .7, .6]])
    t = tlib.load_teacher([a, b])
    got = dict(zip(t.ids, t.values.tolist()))
    assert set(got) == {"x", "y", "z", "w"}
    np.testing.assert_allclose(got["z"], [.3] * 4, atol=1e-7)   # mean of the two files
    np.testing.assert_allclose(got["y"], [1.2, 0, 0, 0], atol=1e-7)  # raw, clipped later
    np.testing.assert_allclose(got["w"], [.9, .8, .7, .6], atol=1e-7)
    assert t.kind == "scores" and [s["clips"] for s in t.sources] == [3, 2]
    assert all(len(s["sha256"]) == 64 for s in t.sources)


def test_teacher_file_errors(tmp_path):
    a = _save(tmp_path / "a.npz", ["x"], [[.1] * C])
    lg = _save(tmp_path / "l.npz", ["x"], [[.1] * C], kind="logits")
    other = _save(tmp_path / "o.npz", ["x"], [[.1] * 3], mids=MIDS[:3])
    np.savez(tmp_path / "bad.npz", ids=np.asarray(["x"]), values=np.zeros((1, C)))
    dup = _save(tmp_path / "d.npz", ["x", "x"], [[.1] * C] * 2)
    for files, msg in [([a, lg], "mix kinds"), ([a, other], "different classes"),
                       ([str(tmp_path / "bad.npz")], r"'scores' \(or 'logits'\)"),
                       ([dup], "more than once"), ([str(tmp_path / "no.npz")], "not found")]:
        with pytest.raises(DataError, match=msg):
            tlib.load_teacher(files)


def test_column_map_and_class_lambdas():
    cols = tlib.column_map(["/m/c2", "/m/x", "/m/c0"], 3, MIDS)
    assert cols.tolist() == [2, -1, 0, -1]
    assert tlib.column_map(None, C, MIDS).tolist() == list(range(C))
    with pytest.raises(DataError, match="no common mid"):
        tlib.column_map(["/m/x"], 1, MIDS)
    with pytest.raises(DataError, match="names no mids"):
        tlib.column_map(None, 3, MIDS)
    lam = tlib.class_lambdas(0.3, cols >= 0, np.array([True, True, False, False]))
    # labelled + taught: λ; taught only (appended run's old classes): 1; labels only: 0
    np.testing.assert_allclose(lam, [0.3, 0.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- loss
def _bce(t, p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def test_distillation_loss_bce_matches_formula():
    rng = np.random.default_rng(1)
    b = 6
    labels = (rng.uniform(size=(b, C)) < 0.4).astype(np.float32)
    teacher = rng.uniform(size=(b, C)).astype(np.float32)
    has = np.array([1, 1, 0, 1, 0, 1], np.float32)
    known = np.array([1, 0, 1, 1, 0, 1], np.float32)     # has_labels: clips 1, 4 unlabelled
    pred = rng.uniform(0.01, 0.99, (b, C)).astype(np.float32)
    lam = np.array([0.5, 0.5, 1.0, 0.0], np.float32)
    y = np.concatenate([labels, teacher, has[:, None], known[:, None]], 1)
    got = distill.DistillationLoss(lam)(y, pred).numpy()
    w = lam[None] * has[:, None]
    want = np.mean((1 - w) * known[:, None] * _bce(labels, pred) + w * _bce(teacher, pred),
                   axis=1).mean()
    assert got == pytest.approx(want, rel=1e-5)
    # clip 4 (no label, no teacher) adds nothing; clip 1 only its teacher term
    per = distill.DistillationLoss(lam, reduction=None)(y, pred).numpy()
    assert per[4] == 0.0
    assert per[1] == pytest.approx(np.mean(lam * _bce(teacher[1], pred[1])), rel=1e-5)
    # λ = 0, every clip labelled: the label BCE of the recipe exactly
    y[:, -1] = 1.0
    zero = distill.DistillationLoss(np.zeros(C))(y, pred).numpy()
    assert zero == pytest.approx(float(np.mean(psla_bce(labels, pred))), rel=1e-6)
    # and it serialises (final_model.keras carries the compile config)
    cfg = distill.DistillationLoss(lam).get_config()
    assert distill.DistillationLoss.from_config(cfg).class_lambda == lam.tolist()


def test_distillation_loss_ce_matches_formula():
    rng = np.random.default_rng(2)
    b = 5
    labels = np.eye(C, dtype=np.float32)[rng.integers(0, C, b)]
    teacher = rng.uniform(size=(b, C)).astype(np.float32)
    has = np.array([1, 0, 1, 1, 0], np.float32)
    known = np.array([1, 1, 0, 1, 1], np.float32)
    pred = rng.dirichlet(np.ones(C), b).astype(np.float32)
    y = np.concatenate([labels, teacher, has[:, None], known[:, None]], 1)
    got = distill.DistillationLoss([0.4] * C, "ce")(y, pred).numpy()
    q = teacher / teacher.sum(1, keepdims=True)
    hard = -np.log(pred[np.arange(b), labels.argmax(1)])
    soft = -(q * np.log(pred)).sum(1)
    w = 0.4 * has
    assert got == pytest.approx(np.mean((1 - w) * known * hard + w * soft), rel=1e-5)
    y[:, -1] = 1.0
    zero = distill.DistillationLoss([0.0] * C, "ce")(y, pred).numpy()
    assert zero == pytest.approx(float(np.mean(psla_ce(labels, pred))), rel=1e-6)


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("kd_shards")
    rng = np.random.default_rng(3)
    n = 40
    glob = write_shards(str(d), random_waveforms(n, rng), random_labels(n, C, rng), C,
                        num_shards=3)
    ids = [f"clip{i:05d}" for i in range(n)]
    scored = [i for i in ids if i not in ("clip00003", "clip00017")]  # two without a score
    raw = rng.uniform(-0.1, 1.2, (len(scored), C)).astype(np.float32)  # > 1: multi-head
    path = _save(d / "teacher.npz", scored, raw)
    return glob, path, dict(zip(scored, raw)), d


def _batches(glob, transform, order, **kw):
    ds = pipeline.make_train_dataset(glob, batch_size=8, clip_samples=2000, mixup=0.5,
                                     mixup_alpha=1.0, sampling_order=order, with_ids=True,
                                     seed=5, num_epochs=2, shuffle_buffer=16,
                                     transform=transform, **kw)
    return [(f, y.numpy()) for f, y in ds]


@pytest.mark.parametrize("order", ["iid", "stream"])
def test_pipeline_teacher_targets_mixed_with_the_waveforms_lambda(shards, order):
    glob, path, raw, _ = shards
    spec = records.load_data_spec(glob)
    table = tlib.load_teacher([path])
    tr = tlib.ExampleTargets(C, teacher=table, teacher_columns=np.arange(C))
    with_t = _batches(glob, tr, order)
    plain = _batches(glob, None, order)
    assert len(with_t) == len(plain) == 2 * pipeline.steps_per_epoch(spec.num_examples, 8)
    seen_missing = seen_mixed = 0
    for (f, y), (f0, y0) in zip(with_t, plain):
        # the teacher changes nothing of the order, the mixing or the labels
        for k in ("id", "partner_id", "mix_lambda"):
            np.testing.assert_array_equal(f[k].numpy(), f0[k].numpy())
        np.testing.assert_array_equal(f["waveform"].numpy(), f0["waveform"].numpy())
        assert y.shape == (8, 2 * C + 2)
        assert (y[:, -1] == 1.0).all()                   # every clip keeps its labels
        np.testing.assert_array_equal(y[:, :C], y0)
        for b in range(8):
            cid = f["id"][b].numpy().decode()
            pid = f["partner_id"][b].numpy().decode()
            lam = float(f["mix_lambda"][b])
            t_i = np.clip(raw[cid], 0, 1) if cid in raw else None
            has = t_i is not None
            if pid:
                seen_mixed += 1
                t_j = np.clip(raw[pid], 0, 1) if pid in raw else None
                has = has and t_j is not None
                want = lam * t_i + (1 - lam) * t_j if has else np.zeros(C)
            else:
                want = t_i if has else np.zeros(C)
            seen_missing += not has
            assert y[b, 2 * C] == float(has)
            np.testing.assert_allclose(y[b, C:2 * C], want, atol=1e-6)
    assert seen_missing and seen_mixed


def test_label_map_moves_labels_into_the_model_vocabulary(shards):
    glob = shards[0]
    tr = tlib.ExampleTargets(C + 3, label_map=np.array([3, 4, 5, 6]))
    ds = pipeline.make_eval_dataset(glob, 16, 2000, transform=tr)
    ref = pipeline.make_eval_dataset(glob, 16, 2000)
    for (_, y), (_, y0) in zip(ds, ref):
        y, y0 = y.numpy(), y0.numpy()
        assert y.shape[1] == C + 3
        np.testing.assert_array_equal(y[:, 3:], y0)
        assert not y[:, :3].any()


# ----------------------------------------------------------------------------- stored
def test_add_teacher_scores_tool_equals_in_memory_lookup(shards, tmp_path):
    glob, path, raw, d = shards
    half = _save(tmp_path / "half.npz", list(raw), np.stack(list(raw.values())) * 0.5)
    out = str(tmp_path / "kd" / "train")
    p = run_script("add_teacher_scores.py", f"--data={glob}", f"--teacher_scores={path},{half}",
                   f"--output={out}", "--noprogress")
    assert p.returncode == 0, p.stderr
    assert "for 38 of 40 clips; 2 without" in p.stdout
    man = records.read_manifest(records.manifest_path(out))
    t = man.extra["teacher"]
    assert (t["with_teacher"], t["without_teacher"], t["kind"], t["mids"]) == (38, 2, "scores",
                                                                               MIDS)
    assert sorted(t["missing_examples"]) == ["clip00003", "clip00017"]
    src = records.load_data_spec(glob)
    assert man.class_counts == src.class_counts.tolist() and man.num_examples == 40
    assert os.path.exists(out + ".index.npz")
    # every record: the same features plus the averaged raw teacher (0.75 x the file's)
    new = list(records.iter_examples(man.shard_paths()))
    old = list(records.iter_examples(src.files))
    for a, b in zip(new, old):
        assert a["id"] == b["id"] and a["labels"] == b["labels"]
        assert a["waveform_int16"].tobytes() == b["waveform_int16"].tobytes()
        if a["id"] in raw:
            np.testing.assert_allclose(a["teacher"], 0.75 * raw[a["id"]], rtol=1e-6)
        else:
            assert a["teacher"] is None
    # training batches from the stored feature = those of the in-memory table, both orders
    stored = tlib.stored_teacher(records.load_data_spec(out + "-*.tfrecord"))
    assert (stored.with_teacher, stored.without_teacher) == (38, 2)
    table = tlib.load_teacher([path, half])
    for order in ("iid", "stream"):
        a = _batches(out + "-*.tfrecord", tlib.ExampleTargets(
            C, teacher=stored, teacher_columns=np.arange(C)), order)
        b = _batches(glob, tlib.ExampleTargets(C, teacher=table,
                                               teacher_columns=np.arange(C)), order)
        for (fa, ya), (fb, yb) in zip(a, b):
            np.testing.assert_array_equal(fa["id"].numpy(), fb["id"].numpy())
            np.testing.assert_allclose(ya, yb, atol=1e-7)


def test_add_teacher_scores_errors(shards, tmp_path):
    glob, path, _, _ = shards
    bad = _save(tmp_path / "bad.npz", ["clip00001"], [[.1]], mids=["/m/other"])
    for args, msg in [([f"--data={glob}", f"--teacher_scores={bad}",
                        f"--output={tmp_path}/o"], "none of the data's classes"),
                      ([f"--data={glob}", f"--output={tmp_path}/o"], "--teacher_scores is "
                                                                      "required")]:
        p = run_script("add_teacher_scores.py", *args)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and last.startswith("error: ") and msg in last, p.stderr
        assert "Traceback" not in p.stderr


def test_stored_teacher_requires_the_manifest_entry(shards):
    with pytest.raises(DataError, match="add_teacher_scores"):
        tlib.stored_teacher(records.load_data_spec(shards[0]))


# ----------------------------------------------------------------------------- transfer set
def test_labelled_subset_is_a_fixed_fraction_of_the_ids():
    ids = [f"clip{i:06d}.wav" for i in range(20000)]
    keep = tlib.labelled_subset(ids, 0.3)
    # binomial(20000, 0.3): sd 64.8; within 4 sd
    assert abs(int(keep.sum()) - 6000) < 4 * np.sqrt(20000 * 0.3 * 0.7)
    # per id: the same whatever the order or the other ids; nested in larger fractions
    order = np.random.default_rng(0).permutation(len(ids))
    np.testing.assert_array_equal(tlib.labelled_subset([ids[i] for i in order], 0.3),
                                  keep[order])
    assert not (keep & ~tlib.labelled_subset(ids, 0.5)).any()
    assert tlib.labelled_subset(ids, 1.0).all()
    with pytest.raises(ValueError):
        tlib.labelled_subset(ids, 0.0)


def test_transfer_set_weights_use_the_labelled_clips_only():
    rng = np.random.default_rng(4)
    n = 50
    lists = random_labels(n, C, rng)
    labels = np.zeros((n, C))
    for i, ks in enumerate(lists):
        labels[i, ks] = 1.0
    labelled = rng.uniform(size=n) < 0.4

    class Index:                                  # the CSR labels of a RecordIndex
        num_records, num_classes = n, C
        label_indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]
                                      ).astype(np.int64)
        label_indices = np.concatenate(lists).astype(np.int32)

        def sampling_weights(self, counts):
            from psla_tf.data.record_index import RecordIndex
            return RecordIndex.sampling_weights(self, counts)
    w = pipeline._transfer_set_weights(Index(), labelled)
    counts = labels[labelled].sum(0)
    want = (labels / np.where(counts > 0, counts, np.inf)).sum(1)   # Procedure 1
    np.testing.assert_allclose(w[labelled], want[labelled], rtol=1e-12)
    np.testing.assert_allclose(w[~labelled], want[labelled].mean(), rtol=1e-12)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_pipeline_transfer_set_examples_lose_their_labels(shards, with_teacher):
    glob, path, raw, _ = shards
    spec = records.load_data_spec(glob)
    keys, ids = tlib.training_keys_and_ids(spec)
    from psla_tf.data import record_index          # the sampler's rows are these keys
    np.testing.assert_array_equal(record_index.load_record_index(spec).keys(), keys)
    keep = tlib.labelled_subset(ids, 0.5)
    known = dict(zip(ids, keep))
    teacher = tlib.load_teacher([path]) if with_teacher else None
    tr = tlib.ExampleTargets(C, teacher=teacher, teacher_columns=np.arange(C),
                             labelled_keys=keys[keep])
    got = _batches(glob, tr, "iid", balanced_sampling=False)
    plain = _batches(glob, None, "iid", balanced_sampling=False)
    seen = set()
    for (f, y), (f0, y0) in zip(got, plain):
        np.testing.assert_array_equal(f["id"].numpy(), f0["id"].numpy())  # same order
        assert y.shape == (8, 2 * C + 2)
        for b in range(8):
            cid = f["id"][b].numpy().decode()
            pid = f["partner_id"][b].numpy().decode()
            has = known[cid] and (not pid or known[pid])
            seen.add(has)
            assert y[b, -1] == float(has)
            np.testing.assert_array_equal(y[b, :C], y0[b] if has else np.zeros(C))
            if not with_teacher:
                assert not y[b, C:2 * C + 1].any()
    assert seen == {True, False}
    with pytest.raises(DataError, match="--sampling_order=iid"):
        _batches(glob, tr, "stream")
