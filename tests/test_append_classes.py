"""--append_classes (issue 16, "grow a vocabulary without losing it"): a trained 3-class
tagger fine-tuned on data with 2 new classes (and one of its own) becomes one 5-output model
whose run folder, checkpoints and SavedModel export carry old + new labels. With the backbone
frozen for the whole run the original classes' scores equal the source model's (≤ 1e-6,
computed here from both models); fine-tuned, the source model's scores on the training clips
are the teacher targets of its classes. Tiny data; main.py's command runs in-process."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_cli import lazy_runs, run_script
from helpers_models import (CLIP_SAMPLES, SMALL_MODEL, SMALL_MODEL_FLAGS, TARGET_LENGTH,
                            make_tagger, save_tagger)
from test_train_e2e import _write_set
from psla_tf.training import plan

OLD = ["/m/c0", "/m/c1", "/m/c2"]          # save_tagger's vocabulary
NEW_DATA = ["/m/c1", "/m/x", "/m/y"]       # one shared class, two new
ARGS = ["--n_epochs=2", "--batch_size=4", "--eval_batch_size=8", "--lr=1e-3",
        "--warmup_steps=2", "--warmup_every=1", "--lrscheduler_start=1", "--lrscheduler_step=1",
        "--wa_start=1", "--wa_end=2", *SMALL_MODEL_FLAGS, "--att_head=2",
        f"--target_length={TARGET_LENGTH}", "--freqm=8", "--timem=8", "--verbose=2",
        "--pretrained=none", "--bn_momentum=0.9", "--append_classes"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("append")
    src = save_tagger(make_tagger(3, seed=1, att_head=2), str(d / "source"))
    old_eval = _write_set(str(d / "old_eval"), 9, 2, mids=OLD)
    train = _write_set(str(d / "new_train"), 16, 3, mids=NEW_DATA)
    ev = _write_set(str(d / "new_eval"), 9, 4, mids=NEW_DATA)
    base = [f"--train_data={train}", f"--eval_data={ev}", f"--init_from={src}",
            f"--retain_eval_data={old_eval}", *ARGS]
    runs = lazy_runs("main.py", {
        "frozen": base + ["--freeze_backbone_epochs=2", f"--exp_dir={d / 'frozen'}"],
        "tuned": base + ["--freeze_backbone_epochs=1", "--kd_lambda=0.5",
                         f"--exp_dir={d / 'tuned'}"]})
    return d, src, old_eval, train, runs


def _ok(runs, name):
    r = runs(name)
    assert r.returncode == 0, (name, r.stdout[-3000:], r.stderr[-3000:])
    return r


def _scores(model, data):
    """The model's scores of the clips of ``data`` as evaluation batches them (called eagerly
    batch by batch: no prediction function to trace for each model)."""
    from psla_tf.data import pipeline
    from psla_tf.training.callbacks import inputs_only
    ds = pipeline.make_eval_dataset(data, 8, CLIP_SAMPLES)
    return np.concatenate([np.asarray(model(x, training=False), np.float64)
                           for x in inputs_only(ds)])


def test_frozen_backbone_keeps_the_original_scores(runs):
    d, src, old_eval, _, get = runs
    r = _ok(get, "frozen")
    assert "append classes: 3 classes of" in r.stdout
    from psla_tf.data.records import read_label_csv
    from psla_tf.models.loading import load_tagger
    from psla_tf.scoring import load_scorer
    mids, _ = read_label_csv(str(d / "frozen" / "labels.csv"))
    assert mids == OLD + ["/m/x", "/m/y"]
    source = _scores(load_tagger(src), old_eval)
    for name in ("wa_model.keras", "final_model.keras", "checkpoints/epoch_001.weights.h5"):
        got = _scores(load_tagger(str(d / "frozen" / name)), old_eval)
        assert got.shape == (9, 5)
        assert np.max(np.abs(got[:, :3] - source)) <= 1e-6, name
    assert list(load_scorer(str(d / "frozen")).mids) == mids
    s = json.load(open(d / "frozen" / "summary.json"))["append_classes"]
    assert (s["source_classes"], s["new_classes"], s["new_mids"]) == (3, 2, ["/m/x", "/m/y"])
    assert s["retain_eval"]["max_abs_score_change"] <= 1e-6
    assert np.isfinite(s["retain_eval"]["source_mAP"])  # (the random source ties its scores:
    #                                                      its mAP moves with round-off)


def test_export_carries_old_and_new_labels(runs, tmp_path):
    d, *_, get = runs
    _ok(get, "frozen")
    out = tmp_path / "sm"
    p = run_script("export.py", f"--model={d / 'frozen'}", f"--saved_model_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    from psla_tf.scoring import load_scorer
    assert list(load_scorer(str(out)).mids) == OLD + ["/m/x", "/m/y"]


def test_fine_tuned_learns_old_classes_from_the_source_model(runs):
    d, src, _, train, get = runs
    _ok(get, "tuned")
    from psla_tf.models.loading import load_tagger
    # the teacher: the source model's scores of the training clips (as evaluation sees them)
    with np.load(d / "tuned" / "source_teacher.npz") as z:
        ids, scores, mids = list(z["ids"]), z["scores"], list(z["mids"])
    assert mids == OLD and len(ids) == 16
    np.testing.assert_allclose(scores, _scores(load_tagger(src), train), atol=1e-5)
    s = json.load(open(d / "tuned" / "summary.json"))
    kd = s["distillation"]
    assert kd["teacher"] == "source" and (kd["with_teacher"], kd["without_teacher"]) == (16, 0)
    # c1 is labelled in the new data: kd_lambda; c0, c2 only taught: 1; new classes: labels
    assert kd["class_lambda"] == [1.0, 0.5, 1.0, 0.0, 0.0]
    assert s["append_classes"]["retain_eval"]["max_abs_score_change"] > 1e-6  # it trained
    assert np.isfinite(s["append_classes"]["retain_eval"]["weight_averaging_mAP"])


def test_append_classes_errors(runs, tmp_path):
    from psla_tf.data.records import DataError
    from psla_tf.training import trainer
    d, src, old_eval, train, _ = runs
    cfg = dict(train_data=old_eval, eval_data=old_eval, exp_dir=str(tmp_path / "e"),
               n_epochs=2, batch_size=4, wa_start=1, wa_end=2, **SMALL_MODEL, att_head=2,
               target_length=TARGET_LENGTH, pretrained="none", append_classes=True,
               init_from=src)
    with pytest.raises(DataError, match="already one of"):   # nothing new to append
        plan.resolve(trainer.TrainConfig(**cfg))
    with pytest.raises(trainer.ConfigError, match="--loss=bce"):
        plan.check_config(trainer.TrainConfig(**dict(cfg, loss="ce")))


@pytest.mark.parametrize("option,value,shown", [
    ("clip_norm", "cmvn", "--clip_norm=cmvn"), ("num_ceps", 13, "--num_ceps=13"),
    ("high_freq", 4000.0, "--high_freq=4000"), ("trim_onset_db", 30.0, "--trim_onset_db=30"),
    ("num_mel_bins", 64, "--num_mel_bins=64")])
def test_append_classes_needs_the_source_models_front_end(tmp_path, option, value, shown):
    """--append_classes keeps the source model's front end: a run with another value of one
    of its options is a one-line DataError; the same value gives the source's mean/std."""
    from psla_tf.data.records import DataError
    from psla_tf.models.tagger import build_tagger
    from psla_tf.training import distill, trainer
    path = str(tmp_path / "source.keras")
    build_tagger(3, model="cnn", cnn_width=0.25, att_head=1, target_length=32, freqm=0,
                 timem=0, dataset_mean=-5.0, dataset_std=4.0, **{option: value}).save(path)
    with pytest.raises(DataError, match=shown):
        distill.source_normalisation(trainer.TrainConfig(init_from=path, target_length=32))
    assert distill.source_normalisation(trainer.TrainConfig(
        init_from=path, target_length=32, **{option: value})) == (-5.0, 4.0)
