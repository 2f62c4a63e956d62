"""tf.distribute, mixed precision and XLA (issue 7, sections 1-2), on CPU.

Each configuration trains in a child process (logical devices and TF_CONFIG must be set
before TensorFlow starts): ``python tests/test_distribute.py CONFIG_JSON``.

* MirroredStrategy over 2 logical CPU devices vs one device: same data stream (one input
  pipeline feeding both replicas in turn), synchronised BatchNorm, losses scaled per replica
  and gradients summed. The model is a small conv+BN tagger (the real front end), once with
  a float64 classifier: losses bit-identical, weights within 1.5e-9, eval scores, weight
  averaging and ensemble identical (asserted: 1e-5 relative); once in float32: losses and
  metrics within 1e-5 relative, weights and eval scores within 1e-4 absolute (Adam's
  per-element normalisation turns float32 round-off of near-zero gradient elements into
  up to ~1e-5 per step; measured 3.3e-5). MobileNetV2 is not used here: at random
  initialisation its gradients change by 1-5 % (several BN layers in a row with small
  variances, parameters such as a BN beta before a 1x1 conv + BN whose true gradient is 0)
  under a 1e-6 relative perturbation of the input on one device, and Adam turns that into
  ±lr steps, so two float32 runs that differ only in summation order part after a step.
* MultiWorkerMirroredStrategy, 2 worker processes on 127.0.0.1 (the small tagger, 1 epoch):
  identical weights and eval scores on both workers (|Δ| ≤ 1e-6); checkpoints, the
  weight-averaged and final models and summary.json from the chief only.
* mixed_float16 / mixed_bfloat16 / --jit_compile train to finite losses and their eval
  scores stay within 0.05 (max |Δ|) of the float32 run; XLA (float32, fused) within 5e-3.

SpecAugment is off and the equality tests' model has no dropout, so their only randomness is
the input pipeline's, which is identical for any replica count. The precision tests use the
quarter-width ``cnn`` backbone with 2 attention heads (the fastest real tagger to trace).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from psla_tf.training import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

BASE = dict(n_epochs=2, batch_size=8, eval_batch_size=8, lr=1e-3, warmup_steps=2,
            warmup_every=1, lrscheduler_start=1, lrscheduler_step=1, wa=True, wa_start=1,
            wa_end=2, model="cnn", cnn_width=0.25, att_head=2, target_length=48, freqm=0, timem=0,
            shuffle_buffer=16, verbose=2, deterministic=True, bn_momentum=0.9, pretrained="none")


# ----------------------------------------------------------------------------- child
def _tiny_model(cfg, num_classes, dtype="float32"):
    """A small tagger for the equality tests: the real front end (float32), then a nested
    classifier in ``dtype``: two (conv without bias → BatchNorm → ReLU) blocks, global
    average pooling and a sigmoid layer (scores cast back to float32)."""
    import keras
    from psla_tf.models.frontend import AudioFrontend
    waveform = keras.Input((None,), name="waveform", dtype="float32")
    num_samples = keras.Input((), name="num_samples", dtype="int32")
    fbank = AudioFrontend(cfg.target_length, 128, cfg.freqm, cfg.timem, cfg.dataset_mean,
                          cfg.dataset_std, seed=cfg.seed, name="frontend")(waveform, num_samples)
    layers = keras.layers
    inner = keras.Sequential([
        keras.Input((cfg.target_length, 128)), layers.Reshape((cfg.target_length, 128, 1)),
        layers.Conv2D(8, 3, strides=2, use_bias=False, dtype=dtype),
        layers.BatchNormalization(momentum=cfg.bn_momentum, dtype=dtype),
        layers.ReLU(dtype=dtype),
        layers.Conv2D(16, 3, strides=2, use_bias=False, dtype=dtype),
        layers.BatchNormalization(momentum=cfg.bn_momentum, dtype=dtype),
        layers.ReLU(dtype=dtype), layers.GlobalAveragePooling2D(dtype=dtype),
        layers.Dense(num_classes, activation="sigmoid", dtype=dtype),
        layers.Activation("linear", dtype="float32")], name="classifier")
    return keras.Model({"waveform": waveform, "num_samples": num_samples}, inner(fbank),
                       name="tiny_tagger")


def _child(spec: dict) -> None:
    import tensorflow as tf
    # collectives block an inter-op thread per replica while they wait for the others; the
    # default pool (one thread per core) can deadlock on a 2-core CI machine
    tf.config.threading.set_inter_op_parallelism_threads(16)
    if spec.get("logical_cpus"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * spec["logical_cpus"])
    if spec.get("tf_config"):
        os.environ["TF_CONFIG"] = json.dumps(spec["tf_config"])
    import keras
    keras.config.disable_traceback_filtering()
    from psla_tf.training import trainer
    real_build = trainer.build_model
    for run in spec["runs"]:
        dtype = run.get("tiny")  # the equality tests' small model, in this dtype
        trainer.build_model = (real_build if dtype is None else
                               lambda cfg, n, dtype=dtype: _tiny_model(cfg, n, dtype))
        cfg = trainer.TrainConfig(**run["cfg"])
        summary, model = trainer.train(cfg)
        np.savez(run["out"], *[np.asarray(v.numpy()) for v in model.weights],
                 scores=_scores(model, plan.resolve(cfg).clip_samples, cfg.eval_data),
                 replicas=summary["replicas"])


def _scores(model, clip_samples, eval_data):
    """Eval scores computed locally (no collectives), in file order."""
    import tensorflow as tf
    from psla_tf.data import pipeline
    from psla_tf.training.callbacks import inputs_only
    step = tf.function(lambda x: model(x, training=False))
    ds = inputs_only(pipeline.make_eval_dataset(eval_data, 8, clip_samples))
    return np.concatenate([np.asarray(step(x)) for x in ds])


# ----------------------------------------------------------------------------- parent
def _spawn(spec: dict, tmp, name: str) -> subprocess.Popen:
    path = os.path.join(str(tmp), f"{name}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    log = open(os.path.join(str(tmp), f"{name}.log"), "w")
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), path], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait(procs: dict, tmp, timeout=900) -> None:
    for name, p in procs.items():
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            rc = "timeout"
        log = open(os.path.join(str(tmp), f"{name}.log")).read()
        assert rc == 0, f"{name}: rc {rc}\n{log[-4000:]}"


def _weights(path):
    with np.load(path) as z:
        ws = [z[f"arr_{i}"] for i in range(len(z.files) - 2)]
        return ws, z["scores"], int(z["replicas"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_train_e2e import _write_set
    d = tmp_path_factory.mktemp("dist")
    return _write_set(str(d / "train"), 32, 0), _write_set(str(d / "eval"), 9, 1)


@pytest.fixture(scope="module")
def equality_runs(data, tmp_path_factory):
    """The small tagger (float64 and float32 classifier) on one device (both in one process)
    and mirrored over 2 logical CPUs (a process per dtype: a second MirroredStrategy in a
    process reuses the collective instance keys of the first, which TF rejects when the dtype
    changes); two processes at a time."""
    tmp = tmp_path_factory.mktemp("eq")
    train, ev = data
    base = dict(BASE, train_data=train, eval_data=ev)

    def run(name, bits, **kw):
        return {"cfg": dict(base, exp_dir=str(tmp / f"{name}{bits}"), **kw),
                "out": str(tmp / f"{name}{bits}.npz"), "tiny": f"float{bits}"}

    def mirrored(bits):
        return {"runs": [run("mirrored", bits, strategy="mirrored")], "logical_cpus": 2}
    single = _spawn({"runs": [run("single", 64), run("single", 32)]}, tmp, "single")
    _wait({"mirrored64": _spawn(mirrored(64), tmp, "mirrored64")}, tmp)
    _wait({"single": single, "mirrored32": _spawn(mirrored(32), tmp, "mirrored32")}, tmp)
    return tmp


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The small CNN tagger on one device, one epoch: float32, float16, bfloat16, XLA (one
    process; epoch 1 does not depend on --n_epochs)."""
    tmp = tmp_path_factory.mktemp("runs")
    train, ev = data
    base = dict(BASE, train_data=train, eval_data=ev, n_epochs=1, wa=False)

    def run(name, **kw):
        return {"cfg": dict(base, exp_dir=str(tmp / name), **kw), "out": str(tmp / f"{name}.npz")}
    # XLA without op determinism (Keras turns XLA off under it, and the trainer refuses both)
    spec = {"runs": [run("f32"), run("f16", mixed_precision="mixed_float16"),
                     run("bf16", mixed_precision="mixed_bfloat16"),
                     run("xla", jit_compile=True, deterministic=False)]}
    _wait({"precision": _spawn(spec, tmp, "precision")}, tmp)
    return tmp


def _log_column(path, name):
    lines = open(path).read().splitlines()
    i = lines[0].split(",").index(name)
    return np.array([float(line.split(",")[i]) for line in lines[1:]])


def _compare_runs(runs, bits, weight_atol, score_atol=1e-6):
    single, mirrored = runs / f"single{bits}", runs / f"mirrored{bits}"
    w1, s1, r1 = _weights(f"{single}.npz")
    w2, s2, r2 = _weights(f"{mirrored}.npz")
    assert (r1, r2) == (1, 2)
    assert len(w1) == len(w2)
    # the training loss of both epochs, as logged
    l1, l2 = (_log_column(d / "log.csv", "loss") for d in (single, mirrored))
    assert len(l1) == len(l2) == 2
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    # every variable: kernels, BatchNorm gammas/betas and moving statistics
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=weight_atol)
    np.testing.assert_allclose(s2, s1, rtol=1e-5, atol=score_atol)  # eval scores, final model
    a = json.load(open(single / "summary.json"))
    b = json.load(open(mirrored / "summary.json"))
    for part in ("single", "weight_averaging", "ensemble"):
        assert b[part]["epochs"] == a[part]["epochs"]
        for k in ("mAP", "AUC", "d_prime"):
            assert b[part][k] == pytest.approx(a[part][k], rel=1e-5, abs=1e-6), (part, k)
    for h1, h2 in zip(a["per_epoch"], b["per_epoch"]):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)  # eval BCE per epoch
    for e in (1, 2):  # per-epoch eval scores, the checkpoint ensemble's inputs
        p1, p2 = (np.load(d / "predictions" / f"eval_epoch_{e:03d}.npy")
                  for d in (single, mirrored))
        np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=score_atol)


def test_mirrored_equals_single_device(equality_runs):
    """float64 classifier: everything equal to round-off (weights to 1e-5 relative)."""
    _compare_runs(equality_runs, 64, weight_atol=1e-8)


def test_mirrored_equals_single_device_float32(equality_runs):
    """float32: losses, metrics, WA and ensemble within 1e-5 relative; the weights within
    1e-4 absolute (Adam normalises each gradient element, so the round-off of an element
    whose gradient is near zero moves it by up to a fraction of lr = 1e-3 per step; measured
    max |Δw| 3.3e-5 after 8 steps) and so the final model's eval scores within 1e-4
    (measured 2.9e-5 on the i.i.d. order's batches)."""
    _compare_runs(equality_runs, 32, weight_atol=1e-4, score_atol=1e-4)


# XLA: float32 arithmetic, fused and reordered; one epoch of Adam amplifies the round-off
# (measured 2.9e-3 on the small CNN; MobileNetV2 1.7e-3, an order of magnitude below its
# half-precision runs' 0.02-0.05)
@pytest.mark.parametrize("name,tol", [("f16", 0.05), ("bf16", 0.05), ("xla", 5e-3)])
def test_precision_and_xla_within_tolerance_of_float32(runs, name, tol):
    ref = np.load(runs / "f32" / "predictions" / "eval_epoch_001.npy")  # float32, epoch 1
    ws, scores, _ = _weights(runs / f"{name}.npz")
    assert all(np.all(np.isfinite(w)) for w in ws)
    s = json.load(open(runs / name / "summary.json"))
    assert s["mixed_precision"] == {"f16": "mixed_float16", "bf16": "mixed_bfloat16"}.get(
        name, "none")
    assert s["xla"] == (name == "xla")   # compiled with XLA indeed (not dropped by Keras)
    log = open(runs / name / "log.csv").read().splitlines()
    loss = float(log[1].split(",")[log[0].split(",").index("loss")])
    assert np.isfinite(loss)
    assert scores.dtype == np.float32  # outputs stay float32 under a mixed policy
    print(f"{name}: max |scores - float32| = {float(np.max(np.abs(scores - ref))):.3g}")
    assert float(np.max(np.abs(scores - ref))) <= tol


def test_multi_worker_identical_weights_chief_writes(data, tmp_path):
    train, ev = data
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = {}
    for i in range(2):
        exp = str(tmp_path / f"exp{i}")  # the non-chief must not create its folder at all
        spec = {"tf_config": {"cluster": cluster, "task": {"type": "worker", "index": i}},
                "runs": [{"cfg": dict(BASE, train_data=train, eval_data=ev, exp_dir=exp,
                                      strategy="multi_worker", n_epochs=1, wa_end=1),
                          "out": str(tmp_path / f"w{i}.npz"), "tiny": "float32"}]}
        procs[f"worker{i}"] = _spawn(spec, tmp_path, f"worker{i}")
    _wait(procs, tmp_path)
    w0, s0, r0 = _weights(tmp_path / "w0.npz")
    w1, s1, r1 = _weights(tmp_path / "w1.npz")
    assert r0 == r1 == 2
    for a, b in zip(w0, w1):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(s0, s1, atol=1e-6)
    assert os.path.exists(tmp_path / "exp0" / "summary.json")
    assert os.path.exists(tmp_path / "exp0" / "checkpoints" / "epoch_001.weights.h5")
    # saved by the chief alone (these saves used to wait on a collective the other worker
    # never joined: see psla_tf.compat.warm_keras_saving_skipsets)
    assert os.path.exists(tmp_path / "exp0" / "wa_model.keras")
    assert os.path.exists(tmp_path / "exp0" / "final_model.keras")
    assert not os.path.exists(tmp_path / "exp1"), os.listdir(tmp_path / "exp1")
    assert "the chief writes" in open(tmp_path / "worker1.log").read()


def test_model_save_creates_no_variables_after_warm_up(tmp_path, monkeypatch):
    """Keras 3.15 builds an ``Optimizer(1.0)`` (variables: a collective broadcast under
    MultiWorkerMirroredStrategy) on every ``model.save``; after
    ``warm_keras_saving_skipsets`` it does not."""
    import keras
    from keras.src.optimizers import optimizer as optimizer_module

    from psla_tf import compat
    compat.warm_keras_saving_skipsets()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    built = []
    init = optimizer_module.Optimizer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        init(self, *args, **kwargs)
    monkeypatch.setattr(optimizer_module.Optimizer, "__init__", counting_init)
    model.save(str(tmp_path / "m.keras"))
    assert built == []


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        _child(json.load(f))
