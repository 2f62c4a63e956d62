"""End-to-end: main.py (its command, run in-process) trains two epochs on tiny shards written
here, then summary.json is checked against the saved per-epoch predictions (Sec. II-B, VI)."""
import json
import os

import numpy as np
import pytest

from psla_tf import metrics
from psla_tf.data import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIDS = ["/m/a", "/m/b", "/m/c"]
FREQS = [300.0, 1200.0, 3000.0]


def _write_set(prefix, n, seed, mids=MIDS):
    rng = np.random.default_rng(seed)
    t = np.arange(6400) / 16000.0  # 0.4 s → 38 frames
    counts = np.zeros(len(mids), int)
    examples = []
    for i in range(n):
        labels = sorted({i % len(mids)} | ({(i + 1) % len(mids)} if i % 4 == 0 else set()))
        w = 0.05 * rng.normal(size=t.size)
        for k in labels:
            w += 0.3 * np.sin(2 * np.pi * FREQS[k] * t + rng.uniform(0, 6))
        counts[labels] += 1
        examples.append(records.make_example(f"clip{i}.wav", records.float_to_int16(w),
                                             labels, [mids[k] for k in labels]))
    shard = records.shard_name(prefix, 0, 1)
    import tensorflow as tf
    with tf.io.TFRecordWriter(shard) as wr:
        for ex in examples:
            wr.write(ex)
    m = records.Manifest(num_examples=n, shards=[{"file": os.path.basename(shard),
                                                  "num_examples": n}],
                         mids=list(mids), names=[m.strip("/") for m in mids],
                         class_counts=counts.tolist(), max_seconds=0.4,
                         fbank_mean=-6.0, fbank_std=4.0, fbank_frames=38 * n)
    m.write(records.manifest_path(prefix))
    return prefix + "-*.tfrecord"


# (the quarter-width cnn: the backbone that traces fastest, ~1/7 of EfficientNet-B0's time;
# what these runs check does not depend on the backbone)
TINY = ["--n_epochs=2", "--batch_size=4", "--eval_batch_size=8", "--lr=1e-3",
        "--warmup_steps=4", "--warmup_every=2", "--lrscheduler_start=1",
        "--lrscheduler_step=1", "--wa_start=1", "--wa_end=2", "--model=cnn",
        "--cnn_width=0.25", "--att_head=2", "--target_length=48", "--freqm=8", "--timem=8", "--shuffle_buffer=16", "--verbose=2",
        "--pretrained=none"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return (_write_set(str(d / "train"), 16, 0), _write_set(str(d / "eval"), 9, 1), d)


BAD_FLAGS = [
    (["--wa_start=3"], "wa_start"),
    (["--train_data=/nonexistent/x-*.tfrecord"], "no TFRecord shards"),
    (["--batch_size=64"], "larger than the training set"),
    (["--eval_data=OTHER"], "different vocabularies"),
    (["--trim_onset_db=-3"], "--trim_onset_db must be"),
    (["--vtlp=0.5"], "--vtlp must be"),
    (["--noise_prob=0.5", "--noise_snr_min_db=20", "--noise_snr_max_db=10"],
     "--noise_snr_max_db (10) must be"),
    (["--head_bias_init=prior", "--append_classes"], "contradicts --append_classes"),
    (["--label_smoothing=0.1", "--labelled_fraction=0.5"], "smooths the labels"),
]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """This file's main.py runs, in-process through the command's ``main()``
    (helpers_cli.run_script), each made when a test first asks for it:
    name → (CompletedProcess, exp_dir)."""
    from helpers_cli import lazy_runs
    train, ev, d = data
    out = tmp_path_factory.mktemp("runs")
    base = [f"--train_data={train}", f"--eval_data={ev}"]
    args = {"two_epoch": ([*base, f"--exp_dir={out / 'exp'}", *TINY], str(out / "exp")),
            "dry_run": ([*base, f"--exp_dir={out}/x",
                         "--flagfile=" + os.path.join(ROOT, "configs", "balanced.flags"),
                         "--eff_b=0", "--att_head=1", "--target_length=48", "--batch_size=4",
                         "--pretrained=none", "--dry_run"], f"{out}/x")}
    args["prior_head"] = ([*base, f"--exp_dir={out}/prior", *TINY, "--head_bias_init=prior",
                           "--dry_run"], None)
    for extra, message in BAD_FLAGS:
        if extra == ["--eval_data=OTHER"]:
            other = _write_set(str(d / "other"), 4, 2, ["/m/x", "/m/b", "/m/c"])
            extra = [f"--eval_data={other}"]
        args[message] = ([*base, f"--exp_dir={out / message.replace(' ', '_')}/x", *TINY,
                          *extra, "--dry_run"], None)
    get = lazy_runs("main.py", {name: a for name, (a, _) in args.items()})
    return lambda name: (get(name), args[name][1])


def test_two_epoch_run(runs):
    p, exp = runs("two_epoch")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.load(open(os.path.join(exp, "summary.json")))
    assert s["epochs"] == 2 and s["train_examples"] == 16 and s["eval_examples"] == 9
    pred = os.path.join(exp, "predictions")
    targets = np.load(os.path.join(pred, "eval_targets.npy"))
    per_epoch = [np.load(os.path.join(pred, f"eval_epoch_{e:03d}.npy")) for e in (1, 2)]
    assert targets.shape == per_epoch[0].shape == (9, 3)
    ens = metrics.evaluate(targets, np.mean(per_epoch, axis=0))
    single = [metrics.evaluate(targets, p_) for p_ in per_epoch]
    for k in ("mAP", "AUC", "d_prime"):
        assert s["ensemble"][k] == pytest.approx(ens[k], abs=1e-6)
        assert s["single"][k] == pytest.approx(np.mean([r[k] for r in single]), abs=1e-6)
        assert np.isfinite(s["weight_averaging"][k])
    assert s["weight_averaging"]["epochs"] == [1, 2]
    assert s["weight_averaging"]["bn_batches"] == 4   # --wa_bn_batches capped at one epoch
    assert s["normalisation"] == {"mean": -6.0, "std": 4.0, "source": "train manifest"}
    for f in ("wa_model.keras", "final_model.keras", "labels.csv", "log.csv", "flags.txt", "checkpoints/epoch_001.weights.h5",
              "checkpoints/epoch_002.weights.h5"):
        assert os.path.exists(os.path.join(exp, f)), f
    log = open(os.path.join(exp, "log.csv")).read().splitlines()
    assert "eval_mAP" in log[0] and "ens_mAP" in log[0] and len(log) == 3
    assert "weight averaging" in p.stdout and "checkpoint ensemble" in p.stdout
    flags_txt = open(os.path.join(exp, "flags.txt")).read()
    assert "--dataset_mean=-6.0" in flags_txt and "--n_epochs=2" in flags_txt


def test_dry_run_prints_plan(runs):
    p, x = runs("dry_run")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "36:0.0005" in p.stdout and "41:0.00025" in p.stdout and "35:0.001" in p.stdout
    assert "weight averaging: epochs 41-60" in p.stdout
    assert "parameters:" in p.stdout and "steps/epoch 4" in p.stdout
    assert not os.path.exists(f"{x}/summary.json")


@pytest.mark.parametrize("extra,message", BAD_FLAGS)
def test_bad_flags_fail_cleanly(runs, extra, message):
    p, _ = runs(message)  # main.py *TINY *extra --dry_run
    assert p.returncode != 0
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_average_weights_rebuilds_the_runs_weight_average(runs, tmp_path):
    """tools/average_weights.py on the run folder gives wa_model.keras: the averaged weights
    with BatchNorm statistics re-estimated on the run's training batches (the same draws);
    with --bn_batches=0 the moving statistics are the checkpoints' plain average."""
    from helpers_cli import run_script
    from psla_tf.models.loading import load_tagger
    p, exp = runs("two_epoch")
    assert p.returncode == 0, p.stderr[-3000:]
    wa = load_tagger(exp)                                        # wa_model.keras
    for bn, out in ((None, tmp_path / "wa.keras"), (0, tmp_path / "plain.keras")):
        args = [f"--checkpoints={exp}", "--epochs=1-2", f"--output={out}", "--noprogress"]
        r = run_script("average_weights.py", *args, *([f"--bn_batches={bn}"] if bn == 0 else []))
        assert r.returncode == 0, r.stderr[-2000:]
        assert ("BatchNorm statistics from 4 training batches" in r.stdout) == (bn is None)
    rebuilt = load_tagger(str(tmp_path / "wa.keras"))
    plain = load_tagger(str(tmp_path / "plain.keras"))
    ckpts = [load_tagger(os.path.join(exp, "checkpoints", f"epoch_{e:03d}.weights.h5"))
             for e in (1, 2)]
    moving = 0
    for v, w, q, a, b in zip(wa.weights, rebuilt.weights, plain.weights,
                             *[c.weights for c in ckpts]):
        np.testing.assert_allclose(w.numpy(), v.numpy(), rtol=1e-5, atol=1e-6, err_msg=v.path)
        mean = (a.numpy().astype(np.float64) + b.numpy()) / 2
        np.testing.assert_allclose(q.numpy(), mean, rtol=1e-6, atol=1e-7, err_msg=v.path)
        if "moving" in v.path:
            moving += 1
            assert not np.allclose(v.numpy(), mean, rtol=1e-4, atol=1e-5), v.path
    assert moving > 0


def test_head_bias_init_prior_starts_at_the_balanced_stream_prior(runs):
    """--head_bias_init=prior: the run's new head starts at the mean target of Algorithm 1's
    draws, computed here from _write_set's labels with dense NumPy."""
    p, _ = runs("prior_head")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    hot = np.zeros((16, 3))
    for i in range(16):
        hot[i, [i % 3] + ([(i + 1) % 3] if i % 4 == 0 else [])] = 1.0
    w = hot @ (1.0 / hot.sum(0))                     # w_i = sum_k 1 / c_k
    prior = (w @ hot) / w.sum()
    assert "class biases at logit(prior)" in p.stdout
    assert f"({prior.min():.4f}-{prior.max():.4f})" in p.stdout, p.stdout[-2000:]
