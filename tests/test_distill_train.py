"""Knowledge distillation in the trainer (issue 19): main.py with --teacher_scores reports the
clips without a teacher score, resumes exactly after a kill, trains under mixed precision, and
a MirroredStrategy run over 2 logical CPUs equals the single-device run; --kd_lambda=0 is the
plain recipe and --teacher_scores=stored reads the shards' teacher (both checked without
training). Tiny data (16 clips, 2 epochs); main.py's command runs in-process, except the run
that is killed (a subprocess)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from helpers_cli import lazy_runs, run_script
from helpers_proc import Background
from test_distribute import BASE, _spawn, _wait, _weights
from test_resume import _assert_same, _strip
from test_train_e2e import ROOT, TINY, _write_set
from psla_tf.errors import ConfigError
from psla_tf.training import plan

MIDS = ["/m/a", "/m/b", "/m/c"]
MISSING = ("clip3.wav", "clip7.wav")
ARGS = TINY + ["--deterministic", "--bn_momentum=0.9", "--kd_lambda=0.6"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PSLA_FAULT", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("kd_train")
    train, ev = _write_set(str(d / "train"), 16, 0), _write_set(str(d / "eval"), 9, 1)
    ids = [f"clip{i}.wav" for i in range(16) if f"clip{i}.wav" not in MISSING]
    rng = np.random.default_rng(0)
    teacher = str(d / "teacher.npz")   # multi-head-like scores, some above 1
    np.savez(teacher, ids=np.asarray(ids), scores=rng.uniform(0, 1.1, (len(ids), 3))
             .astype(np.float32), mids=np.asarray(MIDS))
    return d, train, ev, teacher


@pytest.fixture(scope="module")
def setup(data):
    """The training runs: the one killed by PSLA_FAULT starts now in a subprocess; the others
    run in-process when a test first asks for them (the tests below read them)."""
    d, train, ev, teacher = data
    bg = Background(d / "logs")
    main = [f"--train_data={train}", f"--eval_data={ev}", f"--teacher_scores={teacher}"]
    bg.start("killed", [sys.executable, os.path.join(ROOT, "main.py"), *main, *ARGS,
                        f"--exp_dir={d / 'killed'}"], env=_env(PSLA_FAULT="batch:2:2"), cwd=ROOT)
    runs = lazy_runs("main.py", {
        "kd": main + ARGS + [f"--exp_dir={d / 'kd'}"],
        "f16": main + TINY + ["--mixed_precision=mixed_float16", "--nowa",
                              f"--exp_dir={d / 'f16'}"],
        "resumed": main + ARGS + [f"--exp_dir={d / 'killed'}"],
        "transfer": main + ARGS + ["--labelled_fraction=0.5", f"--exp_dir={d / 'transfer'}"]})
    yield d, train, ev, teacher, bg, runs
    bg.close()


def _ok(runs, name):
    r = runs(name)
    assert r.returncode == 0, (name, r.stdout[-3000:], r.stderr[-3000:])
    return r


def test_kd_run_counts_clips_without_teacher(setup):
    d, *_, runs = setup
    r = _ok(runs, "kd")
    line = "teacher scores for 14 of 16 training clips; 2 without train on labels only"
    assert line in r.stdout
    s = json.load(open(d / "kd" / "summary.json"))
    kd = s["distillation"]
    assert kd["used"] and kd["teacher"] == "files" and kd["kind"] == "scores"
    assert (kd["with_teacher"], kd["without_teacher"]) == (14, 2)
    assert sorted(kd["missing_examples"]) == sorted(MISSING)
    assert kd["class_lambda"] == [0.6] * 3 and kd["classes_taught"] == MIDS
    assert len(kd["sources"][0]["sha256"]) == 64
    flags = open(d / "kd" / "flags.txt").read()
    assert "--kd_lambda=0.6" in flags and "--teacher_scores=" in flags
    assert np.isfinite(s["weight_averaging"]["mAP"])


def test_kd_resume_after_kill_equals_uninterrupted(setup):
    d, *_, bg, runs = setup
    r = bg.result("killed", timeout=1800)
    assert r.returncode != 0                      # SIGKILL after batch 2 of epoch 2
    res = _ok(runs, "resumed")
    assert "resuming after epoch 1" in res.stdout
    ref = json.load(open(d / "kd" / "summary.json")) if _ok(runs, "kd") else None
    got = json.load(open(d / "killed" / "summary.json"))
    _assert_same(_strip(ref), _strip(got))


def test_kd_mixed_float16_trains(setup):
    d, *_, runs = setup
    _ok(runs, "f16")
    s = json.load(open(d / "f16" / "summary.json"))
    assert s["mixed_precision"] == "mixed_float16" and s["distillation"]["used"]
    log = open(d / "f16" / "log.csv").read().splitlines()
    i = log[0].split(",").index("loss")
    assert all(np.isfinite(float(row.split(",")[i])) for row in log[1:])


def test_kd_mirrored_equals_single_device(data, tmp_path):
    """The small float64 tagger of test_distribute with a teacher: one device vs mirrored
    over 2 logical CPUs (same pipeline stream, teacher targets included)."""
    d, train, ev, teacher = data
    base = dict(BASE, train_data=train, eval_data=ev, teacher_scores=teacher, kd_lambda=0.6)

    def run(name, **kw):
        return {"runs": [{"cfg": dict(base, exp_dir=str(tmp_path / name), **kw),
                          "out": str(tmp_path / f"{name}.npz"), "tiny": "float64"}]}
    _wait({"single": _spawn(run("single"), tmp_path, "single"),
           "mirrored": _spawn(dict(run("mirrored", strategy="mirrored"), logical_cpus=2),
                              tmp_path, "mirrored")}, tmp_path)
    w1, s1, r1 = _weights(tmp_path / "single.npz")
    w2, s2, r2 = _weights(tmp_path / "mirrored.npz")
    assert (r1, r2) == (1, 2)
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=1e-6)
    a = json.load(open(tmp_path / "single" / "summary.json"))
    b = json.load(open(tmp_path / "mirrored" / "summary.json"))
    assert a["distillation"]["used"] and b["distillation"]["with_teacher"] == 14


# ----------------------------------------------------------------------------- no training
def _cfg(train, ev, tmp_path, **kw):
    from psla_tf.training import trainer
    return trainer.TrainConfig(train_data=train, eval_data=ev, exp_dir=str(tmp_path / "x"),
                               n_epochs=2, batch_size=4, wa_start=1, wa_end=2, eff_b=0,
                               target_length=48, pretrained="none", **kw)


def test_kd_lambda_zero_is_the_plain_recipe(data, tmp_path):
    from psla_tf.training import distill
    from psla_tf.training.optim import psla_bce
    _, train, ev, teacher = data
    r = plan.resolve(_cfg(train, ev, tmp_path, teacher_scores=teacher, kd_lambda=0.0))
    assert not r.kd.active and r.kd.train_transform(1.0) is None
    assert distill.make_loss(r.cfg, r.kd) is psla_bce
    assert r.kd.summary(r.cfg) == {"used": False, "kd_lambda": 0.0}
    on = plan.resolve(_cfg(train, ev, tmp_path, teacher_scores=teacher, kd_lambda=0.3))
    assert on.kd.active and isinstance(distill.make_loss(on.cfg, on.kd),
                                       distill.DistillationLoss)


def test_stored_teacher_is_resolved_from_the_manifest(data, tmp_path):
    from psla_tf.data.teacher_shards import add_teacher_scores
    _, train, ev, teacher = data
    add_teacher_scores(train, [teacher], str(tmp_path / "kd" / "train"), progress=False)
    r = plan.resolve(_cfg(str(tmp_path / "kd" / "train-*.tfrecord"), ev, tmp_path,
                             teacher_scores="stored"))
    assert r.kd.teacher_mode == "stored" and r.kd.active
    assert (r.kd.coverage["with_teacher"], r.kd.coverage["without_teacher"]) == (14, 2)
    from psla_tf.data.records import DataError
    with pytest.raises(DataError, match="add_teacher_scores"):
        plan.resolve(_cfg(train, ev, tmp_path, teacher_scores="stored"))


def test_transfer_set_run_reports_its_labelled_clips(setup):
    from psla_tf.data import teacher as tlib
    d, train, *_, runs = setup
    r = _ok(runs, "transfer")
    n = int(tlib.labelled_subset([f"clip{i}.wav" for i in range(16)], 0.5).sum())
    assert 0 < n < 16
    assert (f"labels of {n} of 16 training clips kept (--labelled_fraction=0.5); the other "
            f"{16 - n} train on the teacher only") in r.stdout
    kd = json.load(open(d / "transfer" / "summary.json"))["distillation"]
    assert kd["used"] and (kd["labelled_clips"], kd["unlabelled_clips"]) == (n, 16 - n)
    assert kd["labelled_fraction"] == 0.5


def test_transfer_set_without_teacher_weight_trains_on_the_labelled_clips(data, tmp_path):
    from psla_tf.training import distill
    _, train, ev, teacher = data
    r = plan.resolve(_cfg(train, ev, tmp_path, teacher_scores=teacher, kd_lambda=0.0,
                          labelled_fraction=0.5))
    assert not r.kd.active and r.kd.distillation_loss
    loss = distill.make_loss(r.cfg, r.kd)
    assert isinstance(loss, distill.DistillationLoss) and loss.class_lambda == [0.0] * 3
    tr = r.kd.train_transform(1.0)
    assert tr.teacher is None and len(tr.labelled_keys) == r.kd.labelled["labelled_clips"]
    assert r.kd.summary(r.cfg)["used"] is False
    assert any("add no loss (no teacher)" in line for line in r.kd.describe(r.cfg))
    full = plan.resolve(_cfg(train, ev, tmp_path))            # default 1: nothing changes
    assert full.kd.labelled_keys is None and full.kd.train_transform(1.0) is None


@pytest.mark.parametrize("kw,msg", [
    (dict(labelled_fraction=0.0), "--labelled_fraction must be in"),
    (dict(labelled_fraction=0.5, sampling_order="stream"), "needs --sampling_order=iid"),
    (dict(labelled_fraction=0.5, append_classes=True), "cannot be combined"),
    (dict(kd_lambda=1.5), "--kd_lambda must be in"),
    (dict(kd_temperature=0.0), "--kd_temperature must be > 0"),
    (dict(append_classes=True), "--append_classes needs --init_from"),
    (dict(retain_eval_data="x-*.tfrecord"), "--retain_eval_data is for --append_classes")])
def test_kd_flag_errors(data, tmp_path, kw, msg):
    _, train, ev, _ = data
    with pytest.raises(ConfigError, match=msg):
        plan.check_config(_cfg(train, ev, tmp_path, **kw))


def test_kd_main_errors_are_one_line(data, tmp_path):
    _, train, ev, _ = data
    bad = str(tmp_path / "missing.npz")
    p = run_script("main.py", f"--train_data={train}", f"--eval_data={ev}",
                   f"--teacher_scores={bad}", f"--exp_dir={tmp_path / 'e'}", *TINY)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"error: teacher scores file not found: {bad}"


@pytest.mark.parametrize("recipe", ["demo_kd", "kd_mobile_b0", "kd_mobile_mobilenetv2",
                                    "demo_append_fsdd"])
def test_kd_recipes_parse(recipe):
    """The distillation / append recipes parse into valid TrainConfigs."""
    from absl import flags
    from psla_tf.training.flags import config_from_flags, define_flags
    from psla_tf.training.plan import check_config
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["main.py", f"--flagfile={os.path.join(ROOT, 'configs', recipe + '.flags')}",
        "--train_data=t", "--eval_data=e", "--exp_dir=x"])
    c = config_from_flags(fv)
    check_config(c)
    assert c.teacher_scores or c.append_classes
    if recipe.startswith("kd_mobile"):
        assert c.teacher_scores == "stored" and c.model in ("efficientnet", "mobilenet_v2")
        assert c.att_head == 1
