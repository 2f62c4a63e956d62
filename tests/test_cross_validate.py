"""k-fold cross-validation (psla_tf/training/cross_validation.py, tools/cross_validate.py).

Truth: the folds written from the CSV (which clip is in which shard set), accuracy and mAP
recomputed with NumPy/sklearn from each fold's saved predictions, mean and std with NumPy.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import soundfile as sf

from psla_tf import metrics
from psla_tf.data import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FREQS = {"low": 300.0, "mid": 1100.0, "high": 3500.0}


def _listing(d, folds=("1", "2"), per=2):
    rng = np.random.default_rng(0)
    t = np.arange(6400) / 16000.0
    (d / "audio").mkdir()
    lines = ["filename,fold,category"]
    for fold in folds:
        for cat, f in FREQS.items():
            for i in range(per):
                name = f"{fold}-{cat}-{i}.wav"
                w = 0.3 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6))
                sf.write(d / "audio" / name, w + 0.02 * rng.normal(size=t.size), 16000,
                         subtype="PCM_16")
                lines.append(f"{name},{fold},{cat}")
    (d / "meta.csv").write_text("\n".join(lines) + "\n")
    return d / "meta.csv"


def _cfg(exp):
    """A one-epoch run of the backbone that traces fastest (the quarter-width cnn: what is
    checked here is the folds and their aggregation, not the backbone)."""
    from psla_tf.training.trainer import TrainConfig
    return dataclasses.replace(
        TrainConfig(), exp_dir=str(exp), n_epochs=1, batch_size=4, eval_batch_size=6,
        lr=1e-3, warmup_steps=2, warmup_every=1, wa=False, balanced_sampling=False, mixup=0.0,
        freqm=8, timem=8, target_length=40, model="cnn", cnn_width=0.25,
        att_head=1, loss="ce",
        metric="accuracy", shuffle_buffer=12, verbose=0, pretrained="none")


def test_two_folds_mean_std_and_resume(tmp_path, capsys):
    from psla_tf.training import cross_validation as cv
    csv_path = _listing(tmp_path)
    exp = tmp_path / "exp"
    res = cv.cross_validate(_cfg(exp), str(csv_path), "fold", audio_root=str(tmp_path / "audio"),
                            target_length=40, progress=False)
    # the folds: each fold's shard set holds exactly that fold's clips
    vocab = records.read_label_csv(str(exp / "data" / "labels.csv"))
    assert vocab[0] == ["high", "low", "mid"]
    for k in ("1", "2"):
        ids = {ex["id"] for ex in records.iter_examples(
            records.expand_glob(str(exp / "data" / f"fold_{k}-*.tfrecord")))}
        assert ids == {f"{k}-{c}-{i}.wav" for c in FREQS for i in range(2)}
    accs, maps = {}, {}
    for k in ("1", "2"):
        pred = exp / f"fold_{k}" / "predictions"
        t = np.load(pred / "eval_targets.npy")
        s = np.load(pred / "eval_epoch_001.npy")
        accs[k] = float(np.mean(s.argmax(1) == t.argmax(1)))
        maps[k] = metrics.evaluate(t, s)["mAP"]
        summary = json.loads((exp / f"fold_{k}" / "summary.json").read_text())
        # trained on the other fold only
        assert summary["train_examples"] == 6 and summary["eval_examples"] == 6
    agg = res["aggregate"]["single"]
    assert agg["accuracy"]["per_fold"] == pytest.approx(accs)
    assert agg["accuracy"]["mean"] == pytest.approx(np.mean(list(accs.values())))
    assert agg["accuracy"]["std"] == pytest.approx(np.std(list(accs.values())))
    assert agg["mAP"]["mean"] == pytest.approx(np.mean(list(maps.values())), abs=1e-6)
    assert json.loads((exp / "cv_summary.json").read_text())["aggregate"] == \
        json.loads(json.dumps(res["aggregate"]))
    text = cv.report(res)
    assert "2-fold cross-validation" in text and "accuracy" in text and "±" in text
    # a re-run trains nothing and gives the same result
    capsys.readouterr()
    again = cv.cross_validate(_cfg(exp), str(csv_path), "fold",
                              audio_root=str(tmp_path / "audio"), target_length=40,
                              progress=False)
    assert capsys.readouterr().out.count("finished earlier") == 2
    assert again["aggregate"] == res["aggregate"]


def test_aggregate_against_numpy():
    from psla_tf.training.cross_validation import aggregate
    per = {str(k): {"single": {"accuracy": a, "mAP": m}} for k, (a, m) in
           enumerate([(0.8, 0.7), (0.9, 0.75), (0.85, 0.9)], start=1)}
    out = aggregate(per, "accuracy")["single"]
    assert out["accuracy"]["mean"] == pytest.approx(np.mean([0.8, 0.9, 0.85]))
    assert out["accuracy"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.85]))
    assert out["mAP"]["std"] == pytest.approx(np.std([0.7, 0.75, 0.9]))


def test_tool_bad_inputs_are_one_line_errors(tmp_path):
    csv_path = _listing(tmp_path, folds=("1",), per=1)
    (tmp_path / "two").mkdir()
    csv_two = _listing(tmp_path / "two", folds=("1", "2"), per=1)
    cases = [
        ([f"--input={csv_path}", "--fold_column=split"], "not a column"),
        ([f"--input={csv_path}", "--fold_column=fold"], "at least 2 folds"),
        ([f"--input={tmp_path / 'none.csv'}"], "not found"),
        # audio not where the listing says: stops at the first group, no empty set left
        ([f"--input={csv_two}", "--fold_column=fold", f"--audio_root={tmp_path}",
          "--val_groups=0"],
         "fold 1: none of the 3 clips could be prepared (first: "),
    ]
    from helpers_cli import run_script
    for i, (args, msg) in enumerate(cases):
        r = run_script("cross_validate.py", *args, f"--exp_dir={tmp_path / f'e{i}'}", "--eff_b=0")
        assert r.returncode == 2, (args, r.stderr[-2000:])
        err = r.stderr.strip().splitlines()
        assert err[-1].startswith("error:") and msg in err[-1], (args, err[-3:])
        assert "Traceback" not in r.stderr
    assert not [f for f in os.listdir(tmp_path / "e3" / "data") if f.startswith("fold_")]
    # the ESC-50 recipe fine-tunes: without --init_from it stops before preparing anything
    r = run_script("cross_validate.py",
                   f"--flagfile={os.path.join(ROOT, 'configs', 'esc50.flags')}",
                   f"--input={csv_two}", f"--audio_root={tmp_path / 'two' / 'audio'}",
                   f"--exp_dir={tmp_path / 'e2'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "pass --init_from=MODEL" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "e2" / "data").exists()


# ----------------------------------------------------------------------------- nested (issue 16)
def test_fold_plans_rotation_fraction_and_errors():
    from psla_tf.data import sources
    from psla_tf.data.records import DataError
    from psla_tf.training.cross_validation import fold_plans
    g = ["a", "b", "c", "d"]
    p = fold_plans(g, val_groups=1)
    assert p["a"] == {"test": ["a"], "val": ["b"], "train": ["c", "d"]}
    assert p["d"] == {"test": ["d"], "val": ["a"], "train": ["b", "c"]}   # wraps round
    assert fold_plans(g, val_groups=2)["c"] == {"test": ["c"], "val": ["d", "a"], "train": ["b"]}
    assert all(v["val"] == [] and len(v["train"]) == 3 for v in fold_plans(g).values())
    # --val_fraction: whole groups of the other groups' clips (10 clips per group, one label)
    keys = [k for k in g for _ in range(10)]
    rows = [sources.Row(id=f"{k}{i}.wav", path=f"/x/{k}{i}.wav", mids=(str(i % 2),), line=1)
            for i, k in enumerate(keys)]
    p = fold_plans(g, keys, rows, val_fraction=0.34, seed=1)
    for t, plan in p.items():
        assert plan["test"] == [t] and len(plan["val"]) == 1 and len(plan["train"]) == 2
        assert sorted(plan["val"] + plan["train"] + [t]) == g
    for kwargs, msg in ((dict(val_groups=3), "at least 5 groups"),
                        (dict(val_groups=1, val_fraction=0.2), "not both"),
                        (dict(val_fraction=0.05), "leaves at least one"),
                        (dict(val_groups=-1), ">= 0")):
        with pytest.raises(DataError, match=msg):
            fold_plans(g, keys, rows, **kwargs)


def test_chosen_row_follows_validation_not_eval():
    """The chosen row is the best on validation even where another row is best on the eval
    (test) set; ties go to the exported weight-averaged model; no val data → nothing chosen."""
    from psla_tf.training import selection
    from psla_tf.training.trainer import TrainConfig
    cfg = TrainConfig(val_data="v", metric="accuracy")
    s = {"single": {"accuracy": 0.99, "epoch": 3, "val_accuracy": 0.70},
         "weight_averaging": {"accuracy": 0.80, "epochs": [2, 3], "val_accuracy": 0.75},
         "ensemble": {"accuracy": 0.85, "epochs": [1, 2, 3], "val_accuracy": 0.72}}
    out = selection.add_selection(cfg, json.loads(json.dumps(s)))
    assert out["chosen"]["row"] == "weight_averaging" and out["chosen"]["accuracy"] == 0.80
    assert out["selection"]["set"] == "val" and not out["selection"]["eval_used_for_choices"]
    s["ensemble"]["val_accuracy"] = 0.75                      # tie: the exported model wins
    assert selection.chosen_row(s, "accuracy") == "weight_averaging"
    s["single"]["val_accuracy"] = 0.76
    assert selection.chosen_row(s, "accuracy") == "single"
    text = "\n".join(selection.selection_lines(selection.add_selection(cfg, s)))
    assert "validation set" in text and "epoch 3: best validation accuracy" in text
    plain = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("val_")} for k, v in s.items()}
    plain["single"] = {"accuracy": 0.9, "epochs": [1, 2, 3]}
    out = selection.add_selection(TrainConfig(metric="accuracy"), plain)
    assert out["chosen"] is None and out["selection"]["set"] is None
    assert "nothing (no --val_data)" in "\n".join(selection.selection_lines(out))


def _ids(glob):
    return {ex["id"] for ex in records.iter_examples(records.expand_glob(glob))}


def _flags(path):
    out = {}
    for line in open(path).read().splitlines():
        if line.startswith("--") and "=" in line:
            k, v = line[2:].split("=", 1)
            out[k] = v
    return out


def test_nested_leave_one_group_out(tmp_path, capsys):
    """3 groups, --val_groups=1, folds 1 and 3 run (3 validates on 1: the rotation wraps):
    each fold trains on one group, validates on the next and tests on its own; the test
    group's clips never reach its training or validation set; the 'single' epoch and the
    chosen row are recomputed from the saved validation scores alone; table, CSV, plot and
    report; the finished folds' per-epoch weights but the last removed; a re-run with another
    validation plan is refused."""
    from psla_tf.data.records import DataError
    from psla_tf.training import cross_validation as cv
    csv_path = _listing(tmp_path, folds=("1", "2", "3"), per=2)
    exp = tmp_path / "exp"
    cfg = dataclasses.replace(_cfg(exp), n_epochs=2, wa=True, wa_start=1, wa_end=2)
    run = ["1", "3"]
    res = cv.cross_validate(cfg, str(csv_path), "fold", audio_root=str(tmp_path / "audio"),
                            target_length=40, progress=False, val_groups=1, folds=run)
    assert res["nested"] and not res["complete"] and res["folds"] == run
    nxt = {"1": "2", "2": "3", "3": "1"}
    assert not (exp / "fold_2").exists()
    for k in run:
        fold = exp / f"fold_{k}"
        plan = json.loads((fold / "cv_fold.json").read_text())
        assert plan == {"test": [k], "val": [nxt[k]],
                        "train": [g for g in ("1", "2", "3") if g not in (k, nxt[k])]}
        fl = _flags(fold / "flags.txt")
        test_ids, train_ids, val_ids = (_ids(fl["eval_data"]), _ids(fl["train_data"]),
                                        _ids(fl["val_data"]))
        assert test_ids == {f"{k}-{c}-{i}.wav" for c in FREQS for i in range(2)}
        assert {i.split("-")[0] for i in val_ids} == {nxt[k]}
        assert not test_ids & (train_ids | val_ids) and not train_ids & val_ids
        # selection from the saved validation scores alone
        pred = fold / "predictions"
        vt = np.load(pred / "val_targets.npy")
        vs = [np.load(pred / f"val_epoch_{e:03d}.npy") for e in (1, 2)]
        es = [np.load(pred / f"eval_epoch_{e:03d}.npy") for e in (1, 2)]
        et = np.load(pred / "eval_targets.npy")
        vacc = [float(np.mean(s.argmax(1) == vt.argmax(1))) for s in vs]
        best = int(np.argmax(vacc))                            # earliest on ties
        summary = json.loads((fold / "summary.json").read_text())
        assert summary["single"]["epoch"] == best + 1
        assert summary["single"]["accuracy"] == pytest.approx(
            float(np.mean(es[best].argmax(1) == et.argmax(1))))
        ens_val = float(np.mean(np.mean(vs, 0).argmax(1) == vt.argmax(1)))
        assert summary["ensemble"]["val_accuracy"] == pytest.approx(ens_val)
        vals = {"single": vacc[best], "ensemble": ens_val,
                "weight_averaging": summary["weight_averaging"]["val_accuracy"]}
        top = max(vals.values())
        want = next(r for r in ("weight_averaging", "ensemble", "single") if vals[r] == top)
        assert summary["chosen"]["row"] == want
        assert summary["chosen"]["accuracy"] == summary[want]["accuracy"]
        assert summary["selection"]["set"] == "val"
        # a finished fold keeps only its last epoch's weights (--keep_checkpoints: all)
        assert sorted(p for p in os.listdir(fold / "checkpoints") if p.endswith(".h5")) == \
            ["epoch_002.weights.h5"]
    agg = res["aggregate"]
    chosen = {k: json.loads((exp / f"fold_{k}" / "summary.json").read_text())["chosen"]
              ["accuracy"] for k in run}
    assert agg["chosen"]["accuracy"]["per_fold"] == pytest.approx(chosen)
    assert agg["chosen"]["accuracy"]["std"] == pytest.approx(np.std(list(chosen.values())))
    worst = min(chosen, key=chosen.get)
    assert res["headline"]["row"] == "chosen" and res["headline"]["worst_group"] == worst
    rows = list(csv.DictReader(open(exp / "cv_table.csv")))
    assert [r["test_group"] for r in rows] == run
    assert [float(r["chosen"]) for r in rows] == pytest.approx(list(chosen.values()), abs=1e-4)
    assert [r["val_groups"] for r in rows] == ["2", "1"]
    md = (exp / "cv_table.md").read_text()
    assert md.startswith("| test group |") and f"worst group {worst}" in md
    assert (exp / "cv_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = cv.report(res)
    assert "nested" in text and "worst group" in text and "| test group |" in text
    capsys.readouterr()
    again = cv.cross_validate(cfg, str(csv_path), "fold", audio_root=str(tmp_path / "audio"),
                              target_length=40, progress=False, val_groups=1, folds=run)
    assert capsys.readouterr().out.count("finished earlier") == 2
    assert again["aggregate"] == res["aggregate"]
    with pytest.raises(DataError, match="another split"):
        cv.cross_validate(cfg, str(csv_path), "fold", audio_root=str(tmp_path / "audio"),
                          target_length=40, progress=False, folds=run)


def _two_at_once(target, *args) -> list[int | None]:
    """Exit codes of two spawned processes running ``target(*args, barrier)``, released
    together by the barrier."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=target, args=(*args, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    return [p.exitcode for p in procs]


def _prepare_side_by_side(csv_path: str, audio: str, data_dir: str, barrier) -> None:
    """One of two commands preparing the same folder at once (the --folds halves)."""
    from psla_tf.data import sources
    from psla_tf.training import cross_validation as cv
    rows, fold_of, groups, _ = cv._read_groups(csv_path, audio, "fold", None, None)
    mids, names, _ = sources.output_vocabulary(rows, None, data_dir)
    barrier.wait()
    cv._prepare_groups(rows, fold_of, groups, (mids, names), data_dir, workers=1,
                       max_seconds=10.0, target_length=40, progress=False)


def test_commands_side_by_side_prepare_one_at_a_time(tmp_path):
    """Two processes preparing one data folder at the same moment (started together behind a
    barrier) both succeed, and every group's shards hold its clips exactly once."""
    csv_path = _listing(tmp_path, folds=("1", "2"), per=8)
    data_dir = str(tmp_path / "exp" / "data")
    assert _two_at_once(_prepare_side_by_side,
                        str(csv_path), str(tmp_path / "audio"), data_dir) == [0, 0]
    for k in ("1", "2"):
        ids = [ex["id"] for ex in records.iter_examples(
            records.expand_glob(os.path.join(data_dir, f"fold_{k}-*.tfrecord")))]
        assert sorted(ids) == sorted(f"{k}-{c}-{i}.wav" for c in FREQS for i in range(8))


def test_adapted_row_is_the_model_adapted_to_the_held_out_group(tmp_path):
    """--adapt_batchnorm, not nested: each fold's 'adapted' row is its last-epoch model (no
    weight averaging here) with BatchNorm statistics of the held-out group's clips
    (adapted_model.keras, equal to psla_tf.models.adaptation on those clips), scored on
    them; it is the headline row; with validation data it carries the validation-adapted
    metrics and takes part in the choice."""
    from psla_tf.data import pipeline
    from psla_tf.models.adaptation import adapt_batchnorm
    from psla_tf.models.batchnorm import batchnorm_layers
    from psla_tf.models.loading import load_tagger
    from psla_tf.training import cross_validation as cv
    from psla_tf.training import selection
    from psla_tf.training.trainer import TrainConfig
    csv_path = _listing(tmp_path, per=6)
    exp = tmp_path / "exp"
    cfg = dataclasses.replace(_cfg(exp), adapt_batchnorm=True)
    res = cv.cross_validate(cfg, str(csv_path), "fold", audio_root=str(tmp_path / "audio"),
                            target_length=40, progress=False)
    for k in ("1", "2"):
        fold = exp / f"fold_{k}"
        summary = json.loads((fold / "summary.json").read_text())
        row = summary["adapted"]
        assert row["model"] == "final" and row["clips"] == 18
        eval_glob = _flags(fold / "flags.txt")["eval_data"]
        ds = pipeline.make_eval_dataset(eval_glob, cfg.eval_batch_size,
                                        pipeline.clip_samples_for_frames(40))
        want = load_tagger(str(fold / "final_model.keras"))
        adapt_batchnorm(want, ds, min_clips=2)
        got = load_tagger(str(fold / "adapted_model.keras"))
        for a, b in zip(batchnorm_layers(want), batchnorm_layers(got)):
            np.testing.assert_allclose(b.moving_mean.numpy(), a.moving_mean.numpy(),
                                       rtol=1e-4, atol=1e-6)
        y = np.concatenate([t.numpy() for _, t in ds])
        s = np.concatenate([got(x, training=False).numpy() for x, _ in ds])
        assert row["accuracy"] == pytest.approx(float(np.mean(s.argmax(1) == y.argmax(1))))
        assert "adapted" in summary["selection"]["rows"]
    assert res["headline"]["row"] == "adapted"
    assert "adapted" in (exp / "cv_table.md").read_text()
    # a finished fold run again without the row gets it; its training time stays
    from psla_tf.config import config_from_flagfile
    from psla_tf.training.trainer import train
    fold = exp / "fold_1"
    before = json.loads((fold / "summary.json").read_text())
    (fold / "adapted_model.keras").unlink()
    again = train(dataclasses.replace(config_from_flagfile(str(fold / "flags.txt")),
                                      verbose=0))[0]
    assert again["seconds"] == before["seconds"] > 0
    assert again["adapted"]["accuracy"] == pytest.approx(before["adapted"]["accuracy"])
    assert (fold / "adapted_model.keras").exists()
    # --adapt_epochs: the row's model is then also adapted by information maximisation
    # (with SHOT's pseudo-labels at --adapt_pseudo_label_weight, --adapt_pseudo_labels)
    im = train(dataclasses.replace(config_from_flagfile(str(fold / "flags.txt")),
                                   verbose=0, adapt_epochs=2, adapt_pseudo_label_weight=0.1,
                                   adapt_pseudo_labels="balanced"))[0]
    assert im["adapted"]["im_epochs"] == 2 and im["seconds"] == before["seconds"]
    assert im["adapted"]["pseudo_label_weight"] == 0.1
    assert im["adapted"]["pseudo_labels"] == "balanced"
    ds1 = pipeline.make_eval_dataset(_flags(fold / "flags.txt")["eval_data"],
                                     cfg.eval_batch_size, pipeline.clip_samples_for_frames(40))
    want = load_tagger(str(fold / "final_model.keras"))
    adapt_batchnorm(want, ds1, min_clips=2, im_epochs=2, pseudo_label_weight=0.1,
                    pseudo_labels="balanced")
    got = load_tagger(str(fold / "adapted_model.keras"))
    for a, b in zip(want.weights, got.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)
    from psla_tf.errors import ConfigError
    from psla_tf.training.plan import resolve
    few = dataclasses.replace(cfg, train_data=eval_glob, eval_data=eval_glob.replace(
        "fold_2", "fold_1"), exp_dir=str(tmp_path / "few"), batch_size=2)
    resolve(few)                                               # 18 clips: enough
    with pytest.raises(ConfigError, match="add --adapt_batchnorm"):
        resolve(dataclasses.replace(few, adapt_batchnorm=False, adapt_epochs=2))
    with pytest.raises(ConfigError, match="single-label"):
        resolve(dataclasses.replace(few, loss="bce", metric="map", adapt_epochs=2))
    with pytest.raises(ConfigError, match="at least 19 clips in --eval_data"):
        import psla_tf.models.adaptation as adaptation
        old, adaptation.MIN_ADAPT_CLIPS = adaptation.MIN_ADAPT_CLIPS, 19
        try:
            resolve(few)
        finally:
            adaptation.MIN_ADAPT_CLIPS = old
    # --self_train_neighbours builds an [N, N] graph: a set above its size limit is refused
    import psla_tf.label_propagation as label_propagation
    prop = dataclasses.replace(few, wa=True, wa_start=1, wa_end=1, self_train_epochs=1,
                               self_train_neighbours=5)
    resolve(prop)
    old, label_propagation.MAX_CLIPS = label_propagation.MAX_CLIPS, 17
    try:
        with pytest.raises(ConfigError, match="at most 17 in --eval_data"):
            resolve(prop)
        resolve(dataclasses.replace(prop, self_train_neighbours=0))   # without it: fine
    finally:
        label_propagation.MAX_CLIPS = old
    # the validation-adapted metrics take part in the choice; ties prefer unadapted rows
    s = {"single": {"accuracy": 0.7, "epoch": 1, "val_accuracy": 0.70},
         "weight_averaging": {"accuracy": 0.8, "epochs": [1], "val_accuracy": 0.75},
         "ensemble": {"accuracy": 0.8, "epochs": [1], "val_accuracy": 0.72},
         "adapted": {"accuracy": 0.9, "model": "weight_averaging", "val_accuracy": 0.80}}
    out = selection.add_selection(TrainConfig(val_data="v", metric="accuracy"), s)
    assert out["chosen"]["row"] == "adapted" and out["chosen"]["accuracy"] == 0.9
    s["adapted"]["val_accuracy"] = 0.75
    assert selection.chosen_row(s, "accuracy") == "weight_averaging"


def _write_labels_repeatedly(path: str, barrier) -> None:
    from psla_tf.data.records import write_label_csv
    barrier.wait()
    for _ in range(300):
        write_label_csv(path, ["/m/a", "/m/b"], ["a", "b"])


def test_label_csv_written_by_two_processes_at_once(tmp_path):
    """Two processes writing one labels.csv at the same moment (the halves' preparation) both
    succeed and leave a whole file: each writes through a temporary file of its own."""
    from psla_tf.data.records import read_label_csv
    path = str(tmp_path / "labels.csv")
    assert _two_at_once(_write_labels_repeatedly, path) == [0, 0]
    assert read_label_csv(path) == (["/m/a", "/m/b"], ["a", "b"])
    assert sorted(os.listdir(tmp_path)) == ["labels.csv"]


@pytest.mark.parametrize("keep", [False, True])
def test_finished_fold_checkpoints_pruned_unless_kept(tmp_path, monkeypatch, keep):
    """_run_fold after a run that wrote three epochs: only the committed epoch's weights are
    left, or all three with keep_checkpoints (the run itself stubbed: what is checked is the
    wiring, the training is checked above)."""
    from psla_tf import run_folder
    from psla_tf.training import cross_validation as cv
    from psla_tf.training import trainer

    def fake_run(cfg):
        ck = os.path.join(cfg.exp_dir, run_folder.CHECKPOINTS_DIR)
        os.makedirs(ck)
        for e in (1, 2, 3):
            open(run_folder.checkpoint_path(cfg.exp_dir, e), "wb").write(b"w" * 10)
        with open(run_folder.path(cfg.exp_dir, run_folder.STATE_FILE), "w") as f:
            json.dump({"epoch": 3, "checkpoint": run_folder.checkpoint_name(3)}, f)
        return {"done": True}

    monkeypatch.setattr(trainer, "run", fake_run)
    plan = {"test": ["1"], "val": [], "train": ["2"]}
    summary = cv._run_fold(_cfg(tmp_path / "exp"), "1", plan, {"1": "p1", "2": "p2"},
                           keep_checkpoints=keep)
    assert summary == {"done": True}
    left = sorted(os.listdir(tmp_path / "exp" / "fold_1" / "checkpoints"))
    assert left == ([run_folder.checkpoint_name(e) for e in (1, 2, 3)] if keep
                    else [run_folder.checkpoint_name(3)])
