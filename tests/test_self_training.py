"""Self-training on the adapted model's pseudo-labels (--self_train_epochs,
psla_tf/training/self_training.py).

Truth: the pseudo-labels recomputed from the run's weight-averaged model adapted with
psla_tf.models.adaptation on the evaluated clips (the route test_cross_validate checks), the
shards' audio read back, the self-training run's own flags.txt and summary.json.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from test_cross_validate import _cfg, _flags, _listing


def _run(tmp_path, **kw):
    from psla_tf.training import cross_validation as cv
    csv_path = _listing(tmp_path, folds=("1", "2", "3"), per=6)
    exp = tmp_path / "exp"
    cfg = dataclasses.replace(_cfg(exp), n_epochs=2, wa=True, wa_start=1, wa_end=2,
                              adapt_batchnorm=True, **kw)
    cv.cross_validate(cfg, str(csv_path), "fold", folds=["1"], val_groups=1,
                      audio_root=str(tmp_path / "audio"), target_length=40, progress=False)
    return exp / "fold_1"


def test_self_training_trains_on_the_adapted_models_pseudo_labels(tmp_path):
    from psla_tf.data import pipeline, records
    from psla_tf.data.shard_copy import record_labels
    from psla_tf.models.adaptation import adapt_batchnorm
    from psla_tf.models.loading import load_tagger
    fold = _run(tmp_path, self_train_epochs=1, self_train_lr=3e-4)
    summary = json.loads((fold / "summary.json").read_text())
    flags = _flags(fold / "flags.txt")
    for which, data in (("eval", flags["eval_data"]), ("val", flags["val_data"])):
        sub = fold / f"self_training_{which}"
        # the pseudo-labels are the top classes of the WA model adapted to the set's clips
        ds = pipeline.make_eval_dataset(data, 6, pipeline.clip_samples_for_frames(40))
        adapted = load_tagger(str(fold / "wa_model.keras"))
        adapt_batchnorm(adapted, ds, min_clips=2)
        want = np.concatenate([adapted(x, training=False).numpy() for x, _ in ds]).argmax(1)
        truth = np.concatenate([t.numpy() for _, t in ds]).argmax(1)
        spec = records.load_data_spec(str(sub / "pseudo-*.tfrecord*"))
        ids, labels = record_labels(spec)
        np.testing.assert_array_equal([l[0] for l in labels], want)
        # the same clips, audio unchanged
        orig = {ex["id"]: ex for ex in records.iter_examples(records.expand_glob(data))}
        for ex in records.iter_examples(spec.files):
            np.testing.assert_array_equal(ex["waveform_int16"], orig[ex["id"]]["waveform_int16"])
        assert sorted(ids) == sorted(orig)
        # the run: from the WA model, on the training set + the pseudo-labelled clips
        sub_flags = _flags(sub / "flags.txt")
        assert sub_flags["init_from"] == str(fold / "wa_model.keras")
        assert sub_flags["train_data"] == f"{flags['train_data']},{sub}/pseudo-*.tfrecord*"
        assert sub_flags["eval_data"] == data and "val_data" not in sub_flags
        assert (sub_flags["n_epochs"], sub_flags["lr"], sub_flags["wa_end"]) == ("1", "0.0003",
                                                                                "1")
        sub_row = json.loads((sub / "summary.json").read_text())["adapted"]
        st = summary["adapted"]["self_training" if which == "eval" else "val_self_training"]
        assert st["pseudo_label_accuracy"] == pytest.approx(float(np.mean(want == truth)))
        assert st["epochs"] == 1 and st["run"] == sub.name and st["seconds"] > 0
        if which == "eval":   # the row and the model are the self-trained run's
            for k in ("accuracy", "mAP", "AUC"):
                assert summary["adapted"][k] == pytest.approx(sub_row[k])
            assert ((fold / "adapted_model.keras").read_bytes()
                    == (sub / "adapted_model.keras").read_bytes())
        else:
            assert summary["adapted"]["val_accuracy"] == pytest.approx(sub_row["accuracy"])


def test_self_training_added_to_a_finished_run(tmp_path):
    """A finished run rerun with --self_train_epochs and --self_train_neighbours (resume-free
    flags) keeps its training and gets the self-trained adapted row, its pseudo-labels the
    adapted model's scores propagated over the evaluated clips' DTW neighbours."""
    from psla_tf import label_propagation
    from psla_tf.config import config_from_flagfile
    from psla_tf.data import pipeline, records
    from psla_tf.data.shard_copy import record_labels
    from psla_tf.models.adaptation import adapt_batchnorm
    from psla_tf.models.loading import load_tagger
    from psla_tf.training.trainer import train
    fold = _run(tmp_path)
    before = json.loads((fold / "summary.json").read_text())
    assert "self_training" not in before["adapted"]
    cfg = dataclasses.replace(config_from_flagfile(str(fold / "flags.txt")), verbose=0,
                              self_train_epochs=1, self_train_neighbours=3, self_train_alpha=0.5)
    again = train(cfg)[0]
    assert again["seconds"] == before["seconds"] > 0
    assert again["single"] == before["single"]
    st = again["adapted"]["self_training"]
    assert st["epochs"] == 1 and (fold / st["run"] / "summary.json").exists()
    assert (st["neighbours"], st["alpha"]) == (3, 0.5)
    # the pseudo-labels: the adapted model's scores propagated (recomputed here)
    ds = pipeline.make_eval_dataset(cfg.eval_data, 6, pipeline.clip_samples_for_frames(40))
    adapted = load_tagger(str(fold / "wa_model.keras"))
    adapt_batchnorm(adapted, ds, min_clips=2)
    scores = np.concatenate([adapted(x, training=False).numpy() for x, _ in ds])
    waves = np.concatenate([x["waveform"].numpy() for x, _ in ds])
    want = label_propagation.propagate_scores(waves, scores, k=3, alpha=0.5, sample_rate=16000,
                                              num_mel_bins=cfg.num_mel_bins).argmax(1)
    truth = np.concatenate([t.numpy() for _, t in ds]).argmax(1)
    _, labels = record_labels(records.load_data_spec(str(fold / st["run"] / "pseudo-*.tfrecord*")))
    np.testing.assert_array_equal([l[0] for l in labels], want)
    assert st["pseudo_label_accuracy"] == pytest.approx(float(np.mean(want == truth)))
    assert st["model_label_accuracy"] == pytest.approx(float(np.mean(scores.argmax(1) == truth)))
    sub_row = json.loads((fold / st["run"] / "summary.json").read_text())["adapted"]
    assert again["adapted"]["accuracy"] == pytest.approx(sub_row["accuracy"])


def test_self_training_needs_the_adapted_weight_average(tmp_path):
    from psla_tf.errors import ConfigError
    from psla_tf.training.plan import check_config
    cfg = dataclasses.replace(_cfg(tmp_path / "exp"), self_train_epochs=1, train_data="t",
                              wa_start=1, wa_end=1, eval_data="e")
    check_config(dataclasses.replace(cfg, adapt_batchnorm=True, wa=True))
    for bad in (dict(), dict(adapt_batchnorm=True), dict(wa=True, adapt_batchnorm=True,
                                                         loss="bce"),
                dict(wa=True, adapt_batchnorm=True, strategy="multi_worker")):
        with pytest.raises(ConfigError, match="self_train_epochs"):
            check_config(dataclasses.replace(cfg, **bad))
    with pytest.raises(ConfigError, match="add --self_train_epochs"):
        check_config(dataclasses.replace(cfg, adapt_batchnorm=True, wa=True,
                                         self_train_epochs=0, self_train_neighbours=5))
