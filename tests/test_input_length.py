"""Preparation and training agree on the input length (issue 15.1) and the first errors a
user meets are one line (issue 15.7).

* make_tfrecords keeps clips up to the model input of --target_length (at least 10 s):
  FSD50K's 3000 frames keep 30 s, --max_seconds=10 cuts;
* main.py (every recipe: the check is in plan.resolve) refuses train/eval/val shards cut
  at preparation below 90 % of the model input, naming the set and --allow_cut_clips; the
  flag accepts them and --dry_run reports it; AudioSet's 10-s cut for a 10.56-s input passes;
* predict refuses shards cut below the model's input the same way;
* --dry_run with --pretrained=imagenet fetches nothing (downloads are made to fail here), and
  a run that needs ImageNet weights it cannot get ends with one line, exit 2.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import soundfile as sf

from psla_tf.data import records
from psla_tf.data.records import DataError
from psla_tf.training import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIDS = ["/m/a", "/m/b"]


def _shards(prefix: str, n: int, max_seconds: float, num_cut: int, seconds: float) -> str:
    """n clips of ``seconds`` s as a preparation with ``max_seconds`` / ``num_cut`` wrote them."""
    import tensorflow as tf
    rng = np.random.default_rng(0)
    shard = records.shard_name(prefix, 0, 1)
    counts = np.zeros(2, int)
    with tf.io.TFRecordWriter(shard) as w:
        for i in range(n):
            k = i % 2
            counts[k] += 1
            pcm = rng.integers(-3000, 3000, int(seconds * 16000)).astype("<i2")
            w.write(records.make_example(f"c{i}.wav", pcm, [k], [MIDS[k]]))
    records.Manifest(num_examples=n, shards=[{"file": os.path.basename(shard),
                                              "num_examples": n}], mids=MIDS, names=["a", "b"],
                     class_counts=counts.tolist(), max_seconds=max_seconds, num_cut=num_cut,
                     fbank_mean=-6.0, fbank_std=4.0, fbank_frames=100 * n
                     ).write(records.manifest_path(prefix))
    return prefix + "-*.tfrecord"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("length")
    return {"cut10": _shards(str(d / "cut10"), 4, 10.0, 2, 0.5),
            "whole30": _shards(str(d / "whole30"), 4, 30.015, 0, 0.5),
            "whole10": _shards(str(d / "whole10"), 4, 10.0, 0, 0.5)}


# a proxy on a closed port: any download attempt fails at once (and nothing is cached)
def _offline_env(tmp):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
               KERAS_HOME=str(tmp / "keras_home"))
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[k] = "http://127.0.0.1:9"
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    return env


@pytest.fixture(scope="module")
def runs(sets, tmp_path_factory):
    """main.py runs of this file: name → CompletedProcess. The --dry_run runs go through the
    command in-process (offline proxies set meanwhile), each when a test first asks for it;
    the ImageNet run needs a process of its own (KERAS_HOME is read when Keras starts), started
    now."""
    from helpers_cli import lazy_runs
    from helpers_proc import Background
    d = tmp_path_factory.mktemp("length_runs")
    env = _offline_env(d)
    fsd = ["--flagfile=" + os.path.join(ROOT, "configs", "fsd50k.flags"), "--eff_b=0",
           "--batch_size=2"]
    dry = {
        "fsd_cut10": [*fsd, f"--train_data={sets['cut10']}", f"--eval_data={sets['whole30']}",
                      "--dry_run"],
        "fsd_eval_cut10": [*fsd, f"--train_data={sets['whole30']}",
                           f"--eval_data={sets['cut10']}", "--dry_run"],
        "fsd_whole30": [*fsd, f"--train_data={sets['whole30']}",
                        f"--eval_data={sets['whole30']}", f"--val_data={sets['whole10']}",
                        "--dry_run"],
        "fsd_allowed": [*fsd, f"--train_data={sets['cut10']}", f"--eval_data={sets['cut10']}",
                        "--allow_cut_clips", "--dry_run"],
    }
    imagenet = [f"--train_data={sets['whole30']}", f"--eval_data={sets['whole30']}",
                "--pretrained=imagenet", "--eff_b=0", "--att_head=1", "--target_length=64",
                "--batch_size=2", "--n_epochs=1", "--wa_start=1", "--wa_end=1"]
    bg = Background(str(d / "logs"))
    bg.start("imagenet_offline", [sys.executable, os.path.join(ROOT, "main.py"), *imagenet,
                                  f"--exp_dir={d / 'imagenet_offline'}"], env=env, cwd=ROOT)
    offline = {k: v for k, v in env.items() if "proxy" in k.lower()}
    get = lazy_runs("main.py", {name: [*args, f"--exp_dir={d / name}"]
                                for name, args in dry.items()}, env=offline)
    yield lambda name: (bg.result(name, timeout=600) if name == "imagenet_offline"
                        else get(name))
    bg.close()


def _one_error_line(p):
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return err[0]


def test_fsd50k_recipe_refuses_clips_cut_at_10_s(runs, sets):
    line = _one_error_line(runs("fsd_cut10"))
    assert line.startswith("error: --train_data: 2 clip(s) of") and "cut at preparation to 10 s" \
        in line
    assert "3000 frames" in line and "--target_length" in line and "--allow_cut_clips" in line
    line = _one_error_line(runs("fsd_eval_cut10"))
    assert line.startswith("error: --eval_data:")


def test_fsd50k_recipe_accepts_30_s_data_and_dry_run_fetches_nothing(runs):
    p = runs("fsd_whole30")
    assert p.returncode == 0, p.stderr[-3000:]
    # whole 10-s clips (nothing cut) are zero-padded to 30 s as in the paper: accepted too
    assert "input: 3000 frames, 480240 samples per clip" in p.stdout
    assert "train 30.015 s, eval 30.015 s, val 10 s" in p.stdout
    assert "counted without loading --pretrained=imagenet" in p.stdout
    assert "pretrained = imagenet" in p.stdout


def test_allow_cut_clips_accepts_and_dry_run_reports_it(runs):
    p = runs("fsd_allowed")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("allowed by --allow_cut_clips: --") == 2  # train and eval


def test_imagenet_weights_unavailable_is_one_line(runs):
    line = _one_error_line(runs("imagenet_offline"))
    assert line.startswith("error: --pretrained=imagenet: could not obtain ImageNet weights")
    assert "pretrained=PATH" in line or "--pretrained" in line


def test_every_recipe_checks_in_resolve(sets, tmp_path):
    """The check lives in plan.resolve (every recipe and tools/cross_validate.py go
    through it); the 90 % rule: AudioSet's 10-s cut passes a 1056-frame input, not 1200."""
    import dataclasses
    from psla_tf.training import trainer
    base = trainer.TrainConfig(train_data=sets["cut10"], eval_data=sets["whole30"],
                               exp_dir=str(tmp_path), batch_size=2, wa=False)
    r = plan.resolve(dataclasses.replace(base, target_length=1056))
    assert r.cut_clips == []                     # 998 of 1056 frames: ≥ 90 %
    assert r.clip_samples == 169200              # 1056 frames (the eval set keeps 30 s)
    with pytest.raises(DataError, match="--train_data: 2 clip.*1200 frames"):
        plan.resolve(dataclasses.replace(base, target_length=1200))
    r = plan.resolve(dataclasses.replace(base, target_length=3000, allow_cut_clips=True))
    assert len(r.cut_clips) == 1 and r.clip_samples == 480240   # eval keeps 30.015 s


def test_make_tfrecords_keeps_the_model_input(tmp_path):
    """Default --max_seconds = the input of --target_length (≥ 10 s): 3000 frames keep 12-s
    clips whole; --max_seconds=10 cuts them (and main.py would then refuse them)."""
    from helpers_cli import run_script
    t = np.arange(12 * 16000) / 16000.0
    lines = ["path,labels"]
    for i in range(2):
        sf.write(tmp_path / f"c{i}.wav", 0.2 * np.sin(2 * np.pi * 440 * t), 16000,
                 subtype="PCM_16")
        lines.append(f"{tmp_path / f'c{i}.wav'},{'ab'[i]}")
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    for name, extra in (("whole", []), ("cut", ["--max_seconds=10"])):
        p = run_script("make_tfrecords.py", f"--input={tmp_path / 'l.csv'}",
                       f"--output_prefix={tmp_path / name}", "--target_length=3000",
                       "--no_stats", "--noprogress", *extra)
        assert p.returncode == 0, p.stderr[-2000:]
    whole = records.read_manifest(str(tmp_path / "whole.manifest.json"))
    cut = records.read_manifest(str(tmp_path / "cut.manifest.json"))
    assert whole.max_seconds == pytest.approx(30.015) and whole.num_cut == 0
    assert whole.total_seconds == pytest.approx(24.0)
    assert cut.max_seconds == 10.0 and cut.num_cut == 2
    spec = records.load_data_spec(str(tmp_path / "cut-*.tfrecord"))
    assert records.clips_cut_short(spec, 3000) == [(spec.manifests[0], 998)]
    # the preparation wrote the record index the i.i.d. order reads (no pass needed)
    assert os.path.exists(tmp_path / "whole.index.npz")


def test_predict_refuses_shards_cut_below_the_model_input(sets):
    from psla_tf import prediction
    spec = records.load_data_spec(sets["cut10"])
    with pytest.raises(DataError, match="cut at preparation to 10 s.*--allow_cut_clips"):
        prediction.check_cut_clips(spec, 480240)
    prediction.check_cut_clips(spec, 480240, allow=True)
    prediction.check_cut_clips(spec, 160000)   # a 10-s model on 10-s clips
