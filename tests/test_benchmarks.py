"""benchmarks/run.py and benchmarks/torch_reference.py: report writing, stage costs, one
pinned pipeline measurement end to end, the reference sampler weights, clean skips."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")
TORCH_REF = os.path.join(ROOT, "benchmarks", "torch_reference.py")


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load(RUN, "bench_run")


def _results(bench):
    return {"machine": {"cpu": "Test CPU", "cores": 2, "usable_cores": 2, "tensorflow": "2.21",
                        "keras": "3", "python": "3.11", "gpus": [],
                        "load_average_1min_at_start": 0.1, "date_utc": "2026-01-01 00:00"},
            "device": "cpu", "repeats": 5, "quick": False, "argv": "", "baseline":
                bench.baseline_section(),
            "pipeline": {"rows": [bench.row("x", 123.456, cores=2),
                                  bench.row("y", 2.5, "ratio", cores=2, note="target >= 2"),
                                  bench.row("z", None, cores=1, note="failed")],
                         "notes": "a note"}}


def test_stage_costs_are_differences_of_inverse_rates(bench):
    got = {"read": 1000.0, "parse": 500.0, "train_plain": 250.0, "sampling": 200.0,
           "mixup": 100.0, "fbank": 50.0, "masking": 40.0}
    costs = dict(bench.stage_costs(got))
    assert costs["read"] == pytest.approx(1.0)
    assert costs[bench.STAGE_COST["parse"]] == pytest.approx(1.0)        # 2 ms - 1 ms
    assert costs[bench.STAGE_COST["mixup"]] == pytest.approx(5.0)        # 10 - 5
    assert costs[bench.STAGE_COST["masking"]] == pytest.approx(5.0)      # 25 - 20
    # the per-stage costs add up to the whole pipeline's ms per clip
    assert sum(costs.values()) == pytest.approx(1000.0 / got["masking"])
    # a missing stage breaks the chain: no difference across the gap
    del got["sampling"]
    costs = dict(bench.stage_costs(got))
    assert bench.STAGE_COST["sampling"] not in costs
    assert bench.STAGE_COST["mixup"] not in costs
    assert costs[bench.STAGE_COST["fbank"]] == pytest.approx(10.0)


def test_markdown_and_build_md_replacement(bench, tmp_path):
    table = bench.to_markdown(_results(bench))
    assert "Test CPU, 2 cores" in table
    assert "| pipeline | x | 2 | 123.5 | clips/s |  |" in table
    assert "| pipeline | y | 2 | 2.50× |  | target >= 2 |" in table
    assert "| pipeline | z | 1 | n/a | clips/s | failed |" in table
    assert "| baseline | PyTorch reference-style pipeline, 2 DataLoader workers | 2 | 350.0" in table
    assert "pipeline: a note" in table
    md = tmp_path / "BUILD.md"
    md.write_text("# title\n\nintro\n")
    bench.write_build_md(str(md), "TABLE ONE")
    text = md.read_text()
    assert text.startswith("# title\n\nintro\n\n## Measured performance\n")
    assert f"{bench.BEGIN}\nTABLE ONE\n{bench.END}" in text
    md.write_text(text + "\n## After\nkept\n")
    bench.write_build_md(str(md), "TABLE TWO")
    text = md.read_text()
    assert "TABLE ONE" not in text and "TABLE TWO" in text
    assert text.count(bench.BEGIN) == 1 and text.endswith("## After\nkept\n")


def test_pipeline_child_measures_on_one_pinned_core(tmp_path):
    """One real measurement: the full pipeline (mixup, fbank + masking in tf.data) on tiny
    shards, in a child pinned to one CPU; clips/s positive and consistent with the runs."""
    from helpers_data import random_labels, random_waveforms, write_shards
    rng = np.random.default_rng(0)
    glob = write_shards(str(tmp_path), random_waveforms(24, rng, 16400, 16400),
                        random_labels(24, 5, rng), 5, num_shards=2)
    spec = {"kind": "pipeline", "variant": "masking", "glob": glob, "batch": 4, "frames": 100,
            "repeats": 3, "warmup_repeats": 1, "batches_per_repeat": 2, "cores": 1}
    proc = subprocess.run([sys.executable, RUN, "--child=" + json.dumps(spec)],
                          capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stderr[-2000:]
    r = json.loads(line[-1][7:])
    assert len(r["runs"]) == 3 and r["clips_per_s"] > 0
    assert r["clips_per_s"] == pytest.approx(float(np.median(r["runs"])), rel=1e-6)
    assert r["peak_rss_mb"] > 100  # TensorFlow is loaded


def test_run_child_keeps_a_result_printed_before_the_child_stalls(bench, monkeypatch):
    """A child that prints its RESULT line and then never exits (a tf.data teardown stall)
    still yields its result; one that stalls before printing fails with the reason."""
    def stalled(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=b'x\nRESULT {"a": 1}\n',
                                        stderr=b"")
    monkeypatch.setattr(bench.subprocess, "run", stalled)
    assert bench.run_child({"kind": "pipeline"}, 1, timeout=5) == {"a": 1}

    def silent(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=None, stderr=b"traced")
    monkeypatch.setattr(bench.subprocess, "run", silent)
    with pytest.raises(bench.ChildFailed, match="no exit within 5 s"):
        bench.run_child({"kind": "pipeline"}, 1, timeout=5)


def test_bad_flags_exit_2():
    for args in (["--sections=fbank,nope"], ["--cores=0"], ["--num_clips=10"]):
        proc = subprocess.run([sys.executable, RUN, *args, "--out=/nonexistent/never"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-500:])
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_reference_sampler_weights():
    """The reference's gen_weight: w_i = sum over i's labels of 1000 / (c_k + 0.01)."""
    ref = _load(TORCH_REF, "torch_reference")
    data = [{"labels": "a"}, {"labels": "a,b"}, {"labels": "c"}, {"labels": "a"}]
    index = {"a": 0, "b": 1, "c": 2}
    w = ref.sample_weights(data, index)
    ca, cb, cc = 3 + 0.01, 1 + 0.01, 1 + 0.01
    np.testing.assert_allclose(w, [1000 / ca, 1000 / ca + 1000 / cb, 1000 / cc, 1000 / ca])


@pytest.mark.skipif(importlib.util.find_spec("torchaudio") is not None,
                    reason="torchaudio is installed: the skip path does not apply")
def test_torch_section_skips_cleanly_without_torchaudio(bench):
    out = bench.bench_torch({"machine": {"usable_cores": 2}}, {})
    assert out["rows"] == [] and "skipped" in out["notes"] and "torchaudio" in out["notes"]
    proc = subprocess.run([sys.executable, TORCH_REF, "--synthetic=1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_torch_section_reports_a_missing_interpreter(bench):
    bench.FLAGS["torch_python"].value = "/nonexistent/python"
    try:
        out = bench.bench_torch({"machine": {"usable_cores": 2}}, {})
    finally:
        bench.FLAGS["torch_python"].value = None
    assert out["rows"] == [] and "skipped" in out["notes"] and "/nonexistent/python" in out["notes"]


def test_merged_section_names_when_it_was_measured(bench):
    res = _results(bench)
    res["pipeline"]["measured"] = "2025-01-01 00:00 UTC, 1-min load average at start 0.50, x"
    md = bench.to_markdown(res)
    assert "pipeline: measured 2025-01-01 00:00 UTC" in md and "a note" in md
    res["pipeline"]["measured"] = bench._measured(res["machine"], res["argv"])
    assert "pipeline: measured" not in bench.to_markdown(res)


def test_plain_fbank_baseline_is_the_same_features():
    """benchmarks/plain_fbank.py (the baseline of the fbank section) computes Kaldi's fbank."""
    import tensorflow as tf
    from psla_tf.features import kaldi_fbank
    plain = _load(os.path.join(ROOT, "benchmarks", "plain_fbank.py"), "plain_fbank")
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 8000)).astype(np.float32)
    got = plain.plain_fbank(tf.constant(x)).numpy()
    want = kaldi_fbank(x, dft="matmul").numpy()
    assert got.shape == want.shape == (2, 48, 128)
    assert np.abs(got - want).mean() < 1e-4


def test_op_time_by_stage_attributes_ops_to_name_scopes(bench):
    import tensorflow as tf
    x = tf.constant(np.random.default_rng(1).random((256, 512)).astype(np.float32))

    @tf.function
    def fn(x):
        with tf.name_scope("fft"):
            y = tf.signal.rfft(x)
        with tf.name_scope("mel"):
            return tf.linalg.matmul(tf.abs(y), tf.ones([257, 8]))
    fn(x)
    ms = bench.op_time_by_stage(lambda: fn(x).numpy(), 3, ("fft", "mel"))
    assert set(ms) == {"fft", "mel", "other"}
    assert ms["fft"] > 0 and ms["mel"] > 0


def test_train_stage_profile_splits_forward_backward_and_optimizer(bench):
    import keras
    import tensorflow as tf
    from psla_tf.models.batchnorm import fuse_batchnorm
    inner = keras.Input((16, 16, 1))
    h = keras.layers.Conv2D(8, 3, padding="same")(inner)
    h = keras.layers.DepthwiseConv2D(3, padding="same")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("swish")(h)
    backbone = fuse_batchnorm(keras.Model(inner, h, name="backbone"))
    x_in = keras.Input((16, 16, 1))
    pooled = keras.layers.GlobalAveragePooling2D(name="global_pool")(backbone(x_in))
    model = keras.Model(x_in, keras.layers.Dense(3, name="pooling")(pooled))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = tf.constant(np.random.default_rng(0).random((4, 16, 16, 1)).astype(np.float32))
    y = tf.zeros((4, 3))
    model.train_on_batch(x, y)
    ms = bench.op_time_by_stage(lambda: model.train_on_batch(x, y), 3, bench.TRAIN_STAGES,
                                bench.train_stage)
    assert set(ms) == set(bench.TRAIN_STAGES)
    for stage in ("backbone forward", "head forward", "backward: convolutions",
                  "backward: depthwise convolutions", "backward: BatchNorm",
                  "backward: activations", "optimizer"):
        assert ms[stage] > 0, stage
    assert ms["front end"] == 0


def test_fbank_rows_give_ratio_peak_share_and_stages(bench):
    child = {"clips_per_s": {"plain": 100.0, "kaldi_fbank": 250.0,
                             "kaldi_fbank, eager": 50.0},
             "cpu_ms_per_clip": {"plain": 20.0, "kaldi_fbank": 8.0, "kaldi_fbank, eager": 9.0},
             "ratio_vs_plain": 2.5, "cpu_ratio_vs_plain": 2.4,
             "parity_vs_plain": {"mean_abs": 1e-6, "max_abs": 2e-3},
             "stages_ms": {"kaldi_fbank": {"fft": 30.0, "mel": 10.0, "other": 0.0}},
             "peaks": {"gflops": 100.0, "gbytes_per_s": 10.0}}
    rows = {r["config"]: r for r in bench.fbank_rows(child, 2)}
    ratio = rows["kaldi_fbank / plain, side by side (median of per-round ratios)"]
    assert ratio["value"] == 2.5 and ratio["unit"] == "ratio" and "2.40" in ratio["note"]
    share = rows["kaldi_fbank: share of peak FLOP/s"]["value"]
    assert share == pytest.approx(100 * 250 * bench.FBANK_FLOPS_PER_CLIP / 100e9)
    bound = rows["kaldi_fbank: share of the roofline bound"]["value"]
    assert bound == pytest.approx(100 * 250 * max(bench.FBANK_FLOPS_PER_CLIP / 100e9,
                                                  bench.FBANK_BYTES_PER_CLIP / 10e9))
    assert rows["kaldi_fbank stage: fft"]["note"] == "75 % of op time"
    res = _results(bench)
    res["fbank"] = {"rows": list(rows.values()), "notes": ""}
    for line in bench.to_markdown(res).splitlines():
        if line.startswith("| fbank"):
            assert line.count("|") == 7, line          # no stray '|' inside a cell


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_pytorch") is None
                    or importlib.util.find_spec("torch") is None,
                    reason="torch + efficientnet_pytorch not installed (requirements-import.txt)")
def test_torch_train_step_times_the_reference_model():
    """--train_step: the reference's model and step on one batch, a RESULT line with its rate
    and the configuration it ran."""
    proc = subprocess.run([sys.executable, TORCH_REF, "--train_step", "--eff_b=0", "--heads=2",
                           "--frames=64", "--batch_size=2", "--cores=1", "--repeats=2",
                           "--batches_per_repeat=1", "--warmup_batches=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-800:]
    r = json.loads(proc.stdout.strip().splitlines()[-1][len("RESULT "):])
    assert r["clips_per_s"] > 0 and r["first_step_s"] > 0
    assert r["note"].startswith("EfficientNet-B0 + 2 heads, batch 2, 64 frames, 1 threads")
    bad = subprocess.run([sys.executable, TORCH_REF, "--train_step", "--frames=8"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


def test_torch_section_train_step_ratio(bench, tmp_path):
    """The torch section's train-step rows: the interpreter's RESULT as measured, and
    psla_tf's best step (measured in the same run) divided by it."""
    fake = tmp_path / "fake_torch.py"
    fake.write_text("import json, sys\nassert '--train_step' in sys.argv\n"
                    "print('RESULT ' + json.dumps({'clips_per_s': 4.0, 'first_step_s': 1.5, "
                    "'note': 'n'}))\n")
    ctx = {"model": {"eff_b": 2, "heads": 4, "frames": 1056, "batch": 8}, "repeats": 3,
           "train_best": 5.0}
    notes: list[str] = []
    rows = bench._torch_train_step(sys.executable, str(fake), ctx, 2, notes)
    assert notes == [] and [r["value"] for r in rows] == [4.0, 1.25]
    assert rows[1]["unit"] == "ratio" and rows[0]["cores"] == 2
    del ctx["train_best"]
    assert len(bench._torch_train_step(sys.executable, str(fake), ctx, 2, notes)) == 1
    fake.write_text("import sys\nsys.exit('boom')\n")
    assert bench._torch_train_step(sys.executable, str(fake), ctx, 2, notes) == []
    assert notes and "train step failed" in notes[0] and "boom" in notes[0]


def test_fsdd_classical_baseline_features():
    """benchmarks/fsdd_classical_baseline.py: c1..cN of the trimmed utterance, mean removed,
    at 8 time points — a copy at half the tempo (every frame twice) or with silence around it
    (at the log floor) gives nearly the same vector; a level change gives the same one."""
    import scipy.fft
    base = _load(os.path.join(ROOT, "benchmarks", "fsdd_classical_baseline.py"), "fsdd_base")
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 20)[:, None]
    word = np.sin(6 * t + np.linspace(0, 3, 128)[None]) + 0.05 * rng.normal(size=(20, 128))
    fb = np.full((64, 128), -15.9)
    fb[10:30] = word
    got = base.features(fb, 13)
    assert got.shape == (8 * 13,)
    c = scipy.fft.dct(word, type=2, axis=1, norm="ortho")[:, 1:14]
    c -= c.mean(0)
    want = np.stack([np.interp(np.linspace(0, 19, 8), np.arange(20), c[:, k])
                     for k in range(13)], 1).ravel()
    np.testing.assert_allclose(got, want, atol=1e-9)
    slow = np.full((64, 128), -15.9)
    slow[5:45] = np.repeat(word, 2, axis=0)
    assert np.linalg.norm(base.features(slow, 13) - got) < 0.1 * np.linalg.norm(got)
    np.testing.assert_allclose(base.features(fb + 3.0, 13), got, atol=1e-9)


def test_learning_report_time_to_accuracy_from_either_trainer(tmp_path):
    """Per-epoch elapsed time: recorded by the PyTorch trainer, read from a psla_tf run's
    TensorBoard log (metrics' wall times); the time to a reference's final ensemble mAP."""
    import tensorflow as tf
    rep = _load(os.path.join(ROOT, "benchmarks", "learning_report.py"), "learning_report")
    curve = [0.10, 0.20, 0.35, 0.50]
    torch_run = {"per_epoch": [{"epoch": e, "mAP": m, "seconds": 100.0 * e}
                               for e, m in enumerate(curve, 1)],
                 "ensemble": {"mAP": 0.30}, "seconds": 410.0}
    tf_run = {"per_epoch": [{"epoch": e, "mAP": m} for e, m in enumerate(curve, 1)]}
    assert rep.epoch_seconds(str(tmp_path / "none"), torch_run) == [100.0, 200.0, 300.0, 400.0]
    run = tmp_path / "tf"
    assert rep.epoch_seconds(str(run), tf_run) is None            # no TensorBoard log
    writer = tf.summary.create_file_writer(str(run / "tensorboard" / "train"))
    with writer.as_default():
        for e, m in enumerate(curve):
            tf.summary.scalar("epoch_eval_mAP", m, step=e)
            writer.flush()
    writer.close()
    secs = rep.epoch_seconds(str(run), tf_run)
    assert len(secs) == 4 and secs == sorted(secs) and secs[0] >= 0
    assert rep.time_to_accuracy(curve, [10.0, 20.0, 30.0, 40.0], 0.30) == (3, 30.0)
    assert rep.time_to_accuracy(curve, [10.0, 20.0, 30.0, 40.0], 0.60) is None
    table = rep.tta_table([("pt", torch_run, [100.0, 200.0, 300.0, 400.0]),
                           ("tf", tf_run, [10.0, 20.0, 30.0, 40.0]), ("x", tf_run, None)], "pt")
    assert "| pt | 3 | 300 s | 0.73× |" in table and "| tf | 3 | 30 s | 0.07× |" in table
    assert "| x | — | no per-epoch times | — |" in table
    with pytest.raises(SystemExit):
        rep.tta_table([("tf", tf_run, None)], "pt")


def test_train_kernels_ab_times_both_forms_of_one_option():
    """benchmarks/train_kernels_ab.py: both models train, one ratio per round and a median."""
    script = os.path.join(ROOT, "benchmarks", "train_kernels_ab.py")
    proc = subprocess.run([sys.executable, script, "--option=pointwise_matmul",
                           "--batch_size=2", "--target_length=32", "--num_classes=3",
                           "--steps=1", "--rounds=2"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("pointwise_matmul=False: ") and lines[1].startswith(
        "pointwise_matmul=True: ")
    ratios = lines[2].split(": ")[1].split(" (median ")
    assert len(ratios[0].split()) == 2 and float(ratios[1].rstrip(")")) > 0
