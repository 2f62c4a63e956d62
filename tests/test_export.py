"""Deployment (issue 5): SavedModel for TF Serving and TFLite/LiteRT variants of a demo model
trained here, each reloaded in a fresh process and compared with the Keras model on real
audio (../shared/data) and generated audio.

One small demo model (psla_tf.demo: 1-s clips, EfficientNet-B0, 4 attention heads) is trained
for a few epochs by main.py; everything else reuses it. Tolerances (issue 5): SavedModel and
float32 TFLite 1e-4, float16 / dynamic 1e-2, int8 mAP on the held-out demo split within 0.01.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import shared_path
from tests.helpers_cli import run_script
from tests.helpers_models import SMALL_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000
TARGET = 98                       # frames of a 1-s clip
CLIP = (TARGET - 1) * 160 + 400   # 15920 samples
TFLITE_SECONDS = 1.0
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)


def _run(args, timeout=600, cwd=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=cwd or ROOT)


def _fresh(code: str, timeout=300):
    """Run ``code`` in a fresh interpreter that does NOT see psla_tf (no custom objects)."""
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd="/")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _pad_cut(x: np.ndarray, n: int = CLIP) -> tuple[np.ndarray, int]:
    """NumPy twin of the training pipeline's pad/cut: (waveform [n], valid samples)."""
    out = np.zeros(n, np.float32)
    m = min(n, x.size)
    out[:m] = x[:m]
    return out, m


def _mixed_precision_code(d: str) -> str:
    return f"""
        import numpy as np, tensorflow as tf, keras
        from psla_tf import export
        from psla_tf.models.tagger import build_tagger
        keras.mixed_precision.set_global_policy("mixed_float16")
        with tf.distribute.MirroredStrategy().scope():   # (the small cnn: traces fastest)
            m = build_tagger(3, model="cnn", cnn_width=0.25, target_length=32, freqm=0,
                             timem=0, pretrained="none")
            m.compile(optimizer="adam", loss="binary_crossentropy")
        rng = np.random.default_rng(0)
        x = {{"waveform": (0.1 * rng.standard_normal((2, 5360))).astype(np.float32),
              "num_samples": np.full([2], 5360, np.int32)}}
        m.fit(x, (rng.random((2, 3)) > 0.5).astype(np.float32), epochs=1, verbose=0)
        assert m.get_layer("classifier").get_layer("backbone").compute_dtype == "float16"
        keras.mixed_precision.set_global_policy("float32")
        export.export_saved_model(m, {d + "/sm"!r}, ["/m/a", "/m/b", "/m/c"],
                                  ["a", "b", "c"])
        np.save({d + "/x.npy"!r}, x["waveform"])
        np.save({d + "/k.npy"!r}, m(x, training=False).numpy())
        """


def _bad_tool_cases(d: str) -> list[tuple[list[str], str]]:
    return [([], "--model is required"),
            ([f"--model={d}/missing.keras", f"--saved_model_dir={d}/o"], "does not exist"),
            ([f"--model={d}", "--tflite=x.tflite", "--quantize=int8"],
             "needs --calibration_data"),
            ([f"--model={d}"], "nothing to do")]


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """The mixed-precision mirrored build (a process of its own: a global dtype policy and a
    MirroredStrategy) starts with the module and overlaps its training."""
    from helpers_proc import Background
    d = str(tmp_path_factory.mktemp("background"))
    bg = Background(os.path.join(d, "logs"))
    bg.start("mixed_precision", [sys.executable, "-c", textwrap.dedent(_mixed_precision_code(d))],
             env=ENV, cwd=ROOT)
    yield types.SimpleNamespace(runs=bg, dir=d)
    bg.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, background):
    """Demo subset → shards → a few epochs of main.py (its command, in-process) → (exp_dir,
    eval glob, train glob).

    PSLA_EXPORT_TEST_DEMO=DIR reuses a DIR (with exp/ and shards/) this fixture made before
    (for working on these tests; the default trains afresh)."""
    reuse = os.environ.get("PSLA_EXPORT_TEST_DEMO")
    if reuse:
        return (f"{reuse}/exp", f"{reuse}/shards/eval-*.tfrecord",
                f"{reuse}/shards/train-*.tfrecord")
    from psla_tf import demo
    from psla_tf.data import prepare, records, sources
    d = tmp_path_factory.mktemp("demo")
    paths = demo.generate_demo_dataset(str(d / "audio"), num_train=160, num_eval=80,
                                       clip_seconds=1.0, seed=0, progress=False)
    vocab = records.read_label_csv(paths["label_csv"])
    for split in ("train", "eval"):
        prepare.prepare(sources.read_datafile(paths[split]), vocab, str(d / "shards" / split),
                        max_seconds=1.0, target_length=TARGET, progress=False)
    exp = str(d / "exp")
    p = run_script("main.py", f"--train_data={d}/shards/train-*.tfrecord",
                   f"--eval_data={d}/shards/eval-*.tfrecord", f"--exp_dir={exp}",
                   "--n_epochs=6", "--batch_size=16", "--eval_batch_size=40", "--lr=2e-3",
                   "--warmup_steps=10", "--warmup_every=2", "--lrscheduler_start=4",
                   "--lrscheduler_step=1", "--lrscheduler_decay=0.5", "--nowa",
                   "--balanced_sampling", "--mixup=0", "--freqm=12", "--timem=16",
                   f"--target_length={TARGET}", "--model=efficientnet", "--eff_b=0",
                   "--att_head=4", "--pretrained=none", "--shuffle_buffer=160", "--seed=0",
                   "--bn_momentum=0.9", "--verbose=0")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return exp, f"{d}/shards/eval-*.tfrecord", f"{d}/shards/train-*.tfrecord"


@pytest.fixture(scope="module")
def keras_model(trained):
    from psla_tf.models import loading
    return loading.load_tagger(trained[0])


def _audio_inputs() -> dict[str, np.ndarray]:
    """Real recordings (8-kHz FSDD digit → 16 kHz, a 7-s clip) and generated audio."""
    import soxr
    out = {}
    fsdd = sorted(os.listdir(shared_path("data", "fsdd", "recordings")))[0]
    x, sr = sf.read(str(shared_path("data", "fsdd", "recordings", fsdd)), dtype="float32",
                    always_2d=True)
    out["fsdd"] = soxr.resample(x.mean(1), sr, SR).astype(np.float32)
    x, sr = sf.read(str(shared_path("data", "clips", "R9_ZSCveAHg_7s.wav")), dtype="float32",
                    always_2d=True)
    x = x.mean(1)
    out["clip7s"] = (soxr.resample(x, sr, SR) if sr != SR else x).astype(np.float32)
    t = np.arange(SR) / SR
    out["tone"] = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out["noise"] = (0.1 * np.random.default_rng(3).standard_normal(12000)).astype(np.float32)
    return out


def _keras_scores(model, waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from psla_tf.models.tagger import embedding_model
    w, n = zip(*[_pad_cut(x) for x in waves])
    inputs = {"waveform": np.stack(w), "num_samples": np.asarray(n, np.int32)}
    return (model(inputs, training=False).numpy(),
            embedding_model(model)(inputs, training=False).numpy())


# ----------------------------------------------------------------------------- SavedModel
@pytest.fixture(scope="module")
def saved_model(trained, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serving") / "psla")
    p = run_script("export.py", f"--model={trained[0]}", f"--saved_model_dir={out}",
                   "--version=3")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "3", "saved_model.pb"))
    return out


def test_export_cli_keeps_tensorflow_log_lines_off_stderr(trained, tmp_path):
    """tools/export.py in its own process, SavedModel and TFLite: writing a SavedModel,
    TensorFlow logs INFO lines (absl format, "I1207 09:10:34.058479 ...
    functional_saver.py:440] ...", one of them listing hundreds of renamed signature
    inputs), and the TFLite converter warned that no trackable object was given (its weights
    are constants); the command's stderr stays free of both (real warnings still pass)."""
    p = _run([sys.executable, "tools/export.py", f"--model={trained[0]}",
              f"--saved_model_dir={tmp_path / 'sm'}", f"--tflite={tmp_path / 'm.tflite'}",
              f"--tflite_seconds={TFLITE_SECONDS}"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert os.path.exists(tmp_path / "sm" / "1" / "saved_model.pb")
    assert os.path.getsize(tmp_path / "m.tflite") > 0
    assert not re.search(r"^[IW]\d{4} ", p.stderr, re.M), p.stderr[:2000]


def test_saved_model_fresh_process_matches_keras(saved_model, keras_model, trained, tmp_path):
    audio = _audio_inputs()
    np.savez(tmp_path / "in.npz", **audio)
    p = _fresh(f"""
        import numpy as np, tensorflow as tf
        m = tf.saved_model.load({saved_model + "/3"!r})
        data = np.load({str(tmp_path / "in.npz")!r})
        out = {{}}
        for k in data.files:
            r = m.signatures["serving_default"](waveform=tf.constant(data[k][None]))
            out[k + "_scores"] = r["scores"].numpy()
            out[k + "_emb"] = r["embeddings"].numpy()
            assert r["scores"].dtype == tf.float32
        x = tf.constant(data["tone"][None])          # differentiable as loaded (the custom
        with tf.GradientTape() as tape:              # gradients, e.g. swish's, are saved)
            tape.watch(x)
            y = tf.reduce_sum(m.signatures["serving_default"](waveform=x)["scores"])
        g = tape.gradient(y, x).numpy()
        assert np.all(np.isfinite(g)) and np.any(g != 0)
        cn = m.signatures["class_names"]()
        md = m.signatures["metadata"]()
        out["mids"] = cn["mids"].numpy().astype(str)
        out["names"] = cn["names"].numpy().astype(str)
        out["meta"] = np.array([md["sample_rate"].numpy(), md["clip_samples"].numpy()])
        out["map_path"] = np.array(m.signatures["class_map_path"]()["class_map_path"].numpy())
        np.savez({str(tmp_path / "out.npz")!r}, **out)
        """)
    assert "unsaved custom gradients" not in p.stderr, p.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    for k, x in audio.items():
        s, e = _keras_scores(keras_model, [x])
        np.testing.assert_allclose(got[k + "_scores"], s, atol=1e-4, err_msg=k)
        np.testing.assert_allclose(got[k + "_emb"], e, atol=1e-4, err_msg=k)
    from psla_tf.data.records import read_label_csv
    mids, names = read_label_csv(os.path.join(trained[0], "labels.csv"))
    assert list(got["mids"]) == mids and list(got["names"]) == names
    assert got["meta"].tolist() == [SR, CLIP]
    assert got["map_path"].item().decode().endswith("/3/assets/class_map.csv")


def test_serving_tagger_batch_with_lengths(saved_model, keras_model):
    from psla_tf.export import load_saved_model
    st = load_saved_model(saved_model)            # highest version inside DIR
    assert st.path.endswith("/3") and st.sample_rate == SR and st.clip_samples == CLIP
    audio = _audio_inputs()
    waves = [audio["fsdd"], audio["tone"], audio["noise"], audio["clip7s"][:2000]]
    length = max(x.size for x in waves)
    batch = np.zeros((len(waves), length), np.float32)
    for i, x in enumerate(waves):
        batch[i, :x.size] = x
    r = st(batch, np.array([x.size for x in waves], np.int32))
    s, e = _keras_scores(keras_model, waves)
    np.testing.assert_allclose(r["scores"], s, atol=1e-4)
    np.testing.assert_allclose(r["embeddings"], e, atol=1e-4)
    assert r["embeddings"].shape == (4, 1280)


def test_saved_model_cli_run(saved_model, keras_model, tmp_path):
    x = _audio_inputs()["fsdd"][None]
    np.save(tmp_path / "wave.npy", x)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    p = _run([cli, "show", "--dir", saved_model + "/3", "--all"])
    assert p.returncode == 0, p.stderr[-2000:]
    for sig in ("serving_default", "serving_lengths", "class_names", "metadata"):
        assert f"signature_def['{sig}']" in p.stdout
    p = _run([cli, "run", "--dir", saved_model + "/3", "--tag_set", "serve",
              "--signature_def", "serving_default", "--inputs",
              f"waveform={tmp_path / 'wave.npy'}", "--outdir", str(tmp_path / "out")])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s, _ = _keras_scores(keras_model, [x[0]])
    np.testing.assert_allclose(np.load(tmp_path / "out" / "scores.npy"), s, atol=1e-4)


def test_saved_model_rejects_too_short_input(saved_model):
    import tensorflow as tf
    m = tf.saved_model.load(saved_model + "/3")
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least 400 samples"):
        m.signatures["serving_default"](waveform=tf.zeros([1, 399]))


def test_windowed_pools_windows_like_infer(keras_model):
    """--windowed: max over the windows inference.window_starts gives (NumPy reference)."""
    import tensorflow as tf
    from psla_tf import export, inference
    spec = export.ExportSpec(CLIP, windowed=True, window=8000, hop=4000)
    scorer = export.ScoringModel(keras_model)
    x = _audio_inputs()["clip7s"][:30000]
    lengths = np.array([30000, 8000, 9000], np.int32)
    batch = np.stack([x, x, x])
    s, e = export.serve(scorer, spec, tf.constant(batch), tf.constant(lengths))
    for b, n in enumerate(lengths):
        starts = inference.window_starts(int(n), 8000, 4000)
        wins = [x[st:min(st + 8000, n)] for st in starts]
        ks, ke = _keras_scores(keras_model, wins)
        np.testing.assert_allclose(s.numpy()[b], ks.max(0), atol=1e-5)
        np.testing.assert_allclose(e.numpy()[b], ke.mean(0), atol=1e-5)


def test_ensemble_scores_mean_and_embeddings_concat():
    import keras
    from psla_tf import export
    from psla_tf.models.tagger import build_tagger, embedding_model
    members = [build_tagger(3, **SMALL_MODEL, att_head=h, target_length=40, freqm=0, timem=0,
                            pretrained="none", name=f"member_{i}") for i, h in enumerate((1, 2))]
    w = keras.Input((None,), name="waveform")
    n = keras.Input((), name="num_samples", dtype="int32")
    ens = keras.Model({"waveform": w, "num_samples": n},
                      keras.layers.Average()([m({"waveform": w, "num_samples": n})
                                              for m in members]), name="psla_ensemble")
    rng = np.random.default_rng(0)
    inputs = {"waveform": (0.1 * rng.standard_normal((2, 6640))).astype(np.float32),
              "num_samples": np.array([6640, 3000], np.int32)}
    s, e = export.ScoringModel(ens)(inputs["waveform"], inputs["num_samples"])
    np.testing.assert_allclose(s.numpy(), ens(inputs).numpy(), atol=1e-6)
    want = np.concatenate([embedding_model(m)(inputs).numpy() for m in members], axis=1)
    np.testing.assert_allclose(e.numpy(), want, atol=1e-6)
    with pytest.raises(export.ExportError, match="neither a psla_tf tagger"):
        export.ScoringModel(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))


def _small_run_folder(exp: str, vocabulary: tuple[list[str], list[str]]) -> None:
    """A run folder as main.py writes it (flags.txt, labels.csv, checkpoints of epochs 4 and
    6) for the small cnn tagger on the demo's 1-s clips, with distinct random weights."""
    from psla_tf.config import TrainConfig, flagfile_text
    from psla_tf.data.records import write_label_csv
    from psla_tf.models.tagger import build_model
    from tests.helpers_models import make_tagger
    os.makedirs(f"{exp}/checkpoints")
    from psla_tf import params
    cfg = TrainConfig(**SMALL_MODEL, att_head=4, target_length=TARGET, freqm=0, timem=0,
                      pretrained="none", dataset_mean=params.DATASET_MEAN,
                      dataset_std=params.DATASET_STD)
    with open(f"{exp}/flags.txt", "w") as f:
        f.write(flagfile_text(cfg))
    write_label_csv(f"{exp}/labels.csv", *vocabulary)
    model = build_model(cfg, len(vocabulary[0]))
    for k in (4, 6):
        model.set_weights(make_tagger(len(vocabulary[0]), seed=k, att_head=4,
                                      target_length=TARGET).get_weights())
        model.save_weights(f"{exp}/checkpoints/epoch_{k:03d}.weights.h5")


def test_ensemble_of_checkpoints_exports_and_serves(trained, tmp_path):
    """tools/ensemble.py --export (two epoch checkpoints of a run folder; the small cnn
    tagger) → tools/export.py → a SavedModel that a fresh interpreter without psla_tf serves:
    its scores on the held-out clips equal the ensemble scores tools/ensemble.py computed
    through the evaluation pipeline."""
    from psla_tf.models import loading
    from psla_tf.prediction import load_scores
    eval_glob = trained[1]
    exp = str(tmp_path / "run")
    _small_run_folder(exp, loading.load_vocabulary(trained[0]))
    members = ",".join(f"{exp}/checkpoints/epoch_{k:03d}.weights.h5" for k in (4, 6))
    p = run_script("ensemble.py", f"--models={members}", f"--data={eval_glob}",
                   f"--output={tmp_path}/ens.npz", f"--export={tmp_path}/ens", "--noprogress")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = run_script("export.py", f"--model={tmp_path}/ens/ensemble.keras",
                   f"--saved_model_dir={tmp_path}/sm", f"--clip_samples={CLIP}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    waves = _eval_clips(eval_glob, limit=12)[0]
    w, n = zip(*[_pad_cut(x) for x in waves])
    np.save(tmp_path / "w.npy", np.stack(w))
    np.save(tmp_path / "n.npy", np.asarray(n, np.int32))
    _fresh(f"""
        import numpy as np, tensorflow as tf
        m = tf.saved_model.load({str(tmp_path / "sm" / "1")!r})
        out = m.signatures["serving_lengths"](
            waveform=tf.constant(np.load({str(tmp_path / "w.npy")!r})),
            num_samples=tf.constant(np.load({str(tmp_path / "n.npy")!r})))
        mids = m.signatures["class_names"]()["mids"].numpy().astype(str)
        np.save({str(tmp_path / "mids.npy")!r}, mids)
        np.save({str(tmp_path / "served.npy")!r}, out["scores"].numpy())
        np.save({str(tmp_path / "emb.npy")!r}, out["embeddings"].numpy())
        """)
    assert np.load(tmp_path / "mids.npy").tolist() == loading.load_vocabulary(exp)[0]
    want = load_scores(str(tmp_path / "ens.npz")).scores[:12]
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), want, atol=1e-4)
    emb = np.load(tmp_path / "emb.npy")
    assert emb.shape == (12, 2 * 128)   # the two members' cnn embeddings, concatenated


def test_mixed_precision_mirrored_export_serves_float32(background):
    """A model built and trained one step under mixed_float16 inside a MirroredStrategy scope
    (Scale issue) exports, reloads in a fresh process and serves float32 close to Keras."""
    d = background.dir
    p = background.runs.result("mixed_precision", 600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _fresh(f"""
        import numpy as np, tensorflow as tf
        m = tf.saved_model.load({d + "/sm/1"!r})
        r = m.signatures["serving_default"](waveform=tf.constant(np.load({d + "/x.npy"!r})))
        assert r["scores"].dtype == tf.float32 and r["embeddings"].dtype == tf.float32
        np.save({d + "/s.npy"!r}, r["scores"].numpy())
        """)
    np.testing.assert_allclose(np.load(d + "/s.npy"), np.load(d + "/k.npy"), atol=1e-3)


def test_tool_bad_inputs_exit_2(tmp_path):
    for args, msg in _bad_tool_cases(str(tmp_path)):
        p = run_script("export.py", *args)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert msg in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-2000:])


# ----------------------------------------------------------------------------- TFLite
TFL_IN = int(TFLITE_SECONDS * SR)


def _eval_clips(glob: str, limit: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(float waveforms, multi-hot targets [N, C]) of the clips of the shards ``glob``."""
    from psla_tf.data import records
    spec = records.load_data_spec(glob)
    waves, targets = [], []
    for ex in records.iter_examples(spec.files, spec.compression):
        if limit is not None and len(waves) == limit:
            break
        waves.append(ex["waveform_int16"].astype(np.float32) / 32768.0)
        t = np.zeros(spec.num_classes, np.float32)
        t[ex["labels"]] = 1.0
        targets.append(t)
    return waves, np.stack(targets)


def _tflite_reference(model, waves):
    """What the fixed-length TFLite model computes: the caller zero-pads/cuts to TFL_IN
    samples, all of which count as audio; the model then cuts to the training length."""
    fixed = [np.pad(x[:TFL_IN], (0, max(0, TFL_IN - x.size))) for x in waves]
    w = np.stack([f[:CLIP] for f in fixed]).astype(np.float32)
    return model({"waveform": w, "num_samples": np.full([len(w)], min(CLIP, TFL_IN), np.int32)},
                 training=False).numpy()


@pytest.fixture(scope="module")
def tflite_models(trained, keras_model, tmp_path_factory):
    from psla_tf import export_tflite
    from psla_tf.models import loading
    d = tmp_path_factory.mktemp("tflite")
    mids, names = loading.load_vocabulary(trained[0])
    out = {}
    for q in ("none", "float16", "dynamic"):
        out[q] = str(d / f"psla_{q}.tflite")
        export_tflite.export_tflite(keras_model, out[q], mids, names, quantize=q,
                                    seconds=TFLITE_SECONDS)
    out["int8"] = str(d / "psla_int8.tflite")
    p = run_script("export.py", f"--model={trained[0]}", f"--tflite={out['int8']}",
                   "--quantize=int8", f"--tflite_seconds={TFLITE_SECONDS}",
                   f"--calibration_data={trained[2]}", "--calibration_size=64", "--noprogress")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def _run_tflite_fresh(paths: dict, waves: np.ndarray, tmp_path, runtime: str) -> dict:
    """Scores of every model for every row of ``waves`` [N, TFL_IN], in a fresh process
    that has neither psla_tf nor (for litert) TensorFlow imported."""
    np.save(tmp_path / "waves.npy", waves)
    imp = ("from ai_edge_litert.interpreter import Interpreter" if runtime == "litert"
           else "import tensorflow as tf; Interpreter = tf.lite.Interpreter")
    _fresh(f"""
        import json, numpy as np
        {imp}
        paths = json.loads({json.dumps(json.dumps(paths))})
        waves = np.load({str(tmp_path / "waves.npy")!r})
        out = {{}}
        for q, p in paths.items():
            it = Interpreter(model_path=p, num_threads=2)
            it.allocate_tensors()
            i, o = it.get_input_details()[0], it.get_output_details()[0]
            assert i["dtype"] == np.float32 and list(i["shape"]) == [1, waves.shape[1]]
            rows = []
            for w in waves:
                it.set_tensor(i["index"], w[None].astype(np.float32))
                it.invoke()
                rows.append(it.get_tensor(o["index"])[0].copy())
            out[q] = np.stack(rows)
        np.savez({str(tmp_path / ("tfl_" + runtime + ".npz"))!r}, **out)
        """)
    return dict(np.load(tmp_path / f"tfl_{runtime}.npz"))


@pytest.mark.parametrize("runtime", ["litert", "tf"])
def test_tflite_variants_match_keras(tflite_models, keras_model, tmp_path, runtime):
    audio = _audio_inputs()
    waves = list(audio.values())
    fixed = np.stack([np.pad(x[:TFL_IN], (0, max(0, TFL_IN - x.size))) for x in waves])
    got = _run_tflite_fresh({q: tflite_models[q] for q in ("none", "float16")},
                            fixed.astype(np.float32), tmp_path, runtime)
    ref = _tflite_reference(keras_model, waves)
    np.testing.assert_allclose(got["none"], ref, atol=1e-4)
    np.testing.assert_allclose(got["float16"], ref, atol=1e-2)


def test_tflite_dynamic_within_1e2(tflite_models, keras_model, tmp_path):
    audio = _audio_inputs()
    waves = list(audio.values())
    fixed = np.stack([np.pad(x[:TFL_IN], (0, max(0, TFL_IN - x.size))) for x in waves])
    got = _run_tflite_fresh({"dynamic": tflite_models["dynamic"]}, fixed.astype(np.float32),
                            tmp_path, "litert")
    np.testing.assert_allclose(got["dynamic"], _tflite_reference(keras_model, waves),
                               atol=1e-2)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """400 more held-out clips of the demo generator (seed 1, never trained on): the int8 check
    compares mAPs, and on the fixture's 80 eval clips one swapped ranking moves a class's AP by
    ~0.01 (measured: the same int8 model -0.0069 there, -0.0021 on these 400)."""
    from psla_tf import demo
    from psla_tf.data import prepare, records, sources
    d = tmp_path_factory.mktemp("held_out")
    paths = demo.generate_demo_dataset(str(d / "audio"), num_train=1, num_eval=400,
                                       clip_seconds=1.0, seed=1, progress=False)
    prepare.prepare(sources.read_datafile(paths["eval"]),
                    records.read_label_csv(paths["label_csv"]), str(d / "shards" / "eval"),
                    max_seconds=1.0, target_length=TARGET, progress=False)
    return f"{d}/shards/eval-*.tfrecord"


def test_tflite_int8_map_within_001_of_keras(tflite_models, keras_model, held_out, tmp_path):
    from psla_tf import metrics
    waves, targets = _eval_clips(held_out)
    fixed = np.stack([np.pad(x[:TFL_IN], (0, max(0, TFL_IN - x.size))) for x in waves])
    got = _run_tflite_fresh({"int8": tflite_models["int8"]}, fixed.astype(np.float32),
                            tmp_path, "litert")
    ref = np.concatenate([_tflite_reference(keras_model, waves[i:i + 40])
                          for i in range(0, len(waves), 40)])
    keras_map = metrics.evaluate(targets, ref)["mAP"]
    int8_map = metrics.evaluate(targets, got["int8"])["mAP"]
    assert keras_map > 0.6, f"the demo model did not learn (mAP {keras_map:.3f})"
    assert abs(int8_map - keras_map) <= 0.01, (keras_map, int8_map)


def test_tflite_dynamic_keeps_depthwise_and_small_kernels_float(tflite_models, keras_model,
                                                               tmp_path):
    """dynamic: int8 weights for the larger 1x1 / dense kernels; float32 for the depthwise
    kernels (their hybrid kernel quantises its input per tensor across channels of very
    different ranges) and for every kernel of fewer than DYNAMIC_FLOAT_MAX_ELEMENTS weights (the
    early layers); the typical score error stays small (mean |d| < 1e-3)."""
    from ai_edge_litert.interpreter import Interpreter
    from psla_tf.export_tflite import DYNAMIC_FLOAT_MAX_ELEMENTS
    it = Interpreter(model_path=tflite_models["dynamic"])
    it.allocate_tensors()
    kernels = []
    for op in it._get_ops_details():
        # (BATCH_MATMUL: the front end's DFT / mel matrices, float32 in every variant)
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            w = it._get_tensor_details(op["inputs"][1], 0)
            kernels.append((op["op_name"], int(np.prod(w["shape"])), w["dtype"]))
    depthwise = [k for k in kernels if k[0] == "DEPTHWISE_CONV_2D"]
    assert depthwise and all(d == np.float32 for _, _, d in depthwise)
    small = [k for k in kernels if k[1] < DYNAMIC_FLOAT_MAX_ELEMENTS and k[0] == "CONV_2D"]
    large = [k for k in kernels if k[1] >= DYNAMIC_FLOAT_MAX_ELEMENTS and k[0] != "DEPTHWISE_CONV_2D"]
    assert len(small) >= 10 and all(d == np.float32 for _, _, d in small), small
    assert len(large) >= 20 and all(d == np.int8 for _, _, d in large), large
    meta = json.load(open(tflite_models["dynamic"][:-len(".tflite")] + ".json"))
    assert meta["float_kernel_elements"] == DYNAMIC_FLOAT_MAX_ELEMENTS
    # (+ small kernels TFLite lowers to other ops, e.g. the pooling's head weights)
    assert len(depthwise) + len(small) <= meta["float_kernels"] <= len(depthwise) + len(small) + 2
    audio = _audio_inputs()
    waves = list(audio.values())
    fixed = np.stack([np.pad(x[:TFL_IN], (0, max(0, TFL_IN - x.size))) for x in waves])
    got = _run_tflite_fresh({"dynamic": tflite_models["dynamic"]}, fixed.astype(np.float32),
                            tmp_path, "litert")["dynamic"]
    assert np.abs(got - _tflite_reference(keras_model, waves)).mean() < 1e-3


def test_tflite_kernels_are_constants(tflite_models):
    """Every convolution / matmul of every variant reads constant weights: the float32 kernels
    hidden from the quantiser as int32 bits are folded back after conversion (computed at run
    time, XNNPACK left them to the slow reference kernels: dynamic ran 2x slower than float32);
    only int8's input waveform keeps its two bitcasts (it is not a constant)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    for q, path in tflite_models.items():   # the graph as stored (no XNNPACK partitions)
        it = Interpreter(model_path=path, experimental_op_resolver_type=(
            OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
        it.allocate_tensors()
        ops = it._get_ops_details()
        producer = {t: op for op in ops for t in op["outputs"]}
        weights = [op["inputs"][1] for op in ops if op["op_name"] in (
            "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")]
        assert len(weights) > 60, q
        # (float16: a DEQUANTIZE of a constant float16 tensor, folded at load)
        computed = [w for w in weights if w in producer and not (
            producer[w]["op_name"] == "DEQUANTIZE" and producer[w]["inputs"][0] not in producer)]
        assert not computed, (q, [producer[w]["op_name"] for w in computed])
        assert sum(op["op_name"] == "BITCAST" for op in ops) == (2 if q == "int8" else 0), q
        assert not [op for op in ops if op["op_name"] == "ABS"] or q == "int8", q


def test_tflite_dynamic_float_kernel_elements_trades_size_for_error(tflite_models, keras_model,
                                                                    trained, tmp_path):
    """--float_kernel_elements=0 (only the depthwise kernels float) gives a smaller file and a
    larger score error on the held-out clips than the default; all kernels of the default's
    file that the flag keeps float are int8 in the other's."""
    from psla_tf import export_tflite
    from psla_tf.models import loading
    mids, names = loading.load_vocabulary(trained[0])
    path = str(tmp_path / "dyn0.tflite")
    meta = export_tflite.export_tflite(keras_model, path, mids, names, quantize="dynamic",
                                       seconds=TFLITE_SECONDS, float_kernel_elements=0)
    assert meta["float_kernels"] < json.load(
        open(tflite_models["dynamic"][:-len(".tflite")] + ".json"))["float_kernels"]
    assert os.path.getsize(path) < os.path.getsize(tflite_models["dynamic"])
    waves, _ = _eval_clips(trained[1], limit=60)
    ref = _tflite_reference(keras_model, waves)
    err = {}
    for name, p in (("default", tflite_models["dynamic"]), ("zero", path)):
        tagger = export_tflite.TFLiteTagger(p)
        err[name] = np.abs(np.stack([tagger(w) for w in waves]) - ref).mean()
    assert err["default"] < 0.8 * err["zero"], err
    with pytest.raises(export_tflite.ExportError, match="float_kernel_elements"):
        export_tflite.export_tflite(keras_model, path, mids, names, quantize="dynamic",
                                    seconds=TFLITE_SECONDS, float_kernel_elements=-1)


def test_compare_with_keras_matches_a_direct_computation(tflite_models, keras_model, trained):
    """tools/export.py --compare_data's numbers: max / mean |d| of the float16 model against
    the Keras model and both mAPs, recomputed here from the clips directly."""
    from psla_tf import export_tflite, metrics
    res = export_tflite.compare_with_keras(keras_model, tflite_models["float16"], trained[1],
                                           limit=24, batch_size=5)
    waves, targets = _eval_clips(trained[1], limit=24)
    tagger = export_tflite.TFLiteTagger(tflite_models["float16"])
    got = np.stack([tagger(w) for w in waves])
    ref = _tflite_reference(keras_model, waves)
    assert res["clips"] == 24
    # the tool runs Keras in batches of 5, this test in one batch of 24: float32 kernels round
    # differently per batch size (measured 3.1e-6 on a max |d| of 1.45e-3), hence atol 1e-5
    np.testing.assert_allclose(res["max_abs_diff"], np.abs(got - ref).max(), rtol=1e-3,
                               atol=1e-5)
    np.testing.assert_allclose(res["mean_abs_diff"], np.abs(got - ref).mean(), rtol=1e-3,
                               atol=1e-6)
    np.testing.assert_allclose(res["keras_mAP"], metrics.evaluate(targets, ref)["mAP"],
                               atol=1e-6)
    np.testing.assert_allclose(res["tflite_mAP"], metrics.evaluate(targets, got)["mAP"],
                               atol=1e-6)


def test_export_cli_compares_with_progress_and_no_size(trained, tmp_path):
    """tools/export.py --compare_data with its defaults (progress bar, every clip) writes the
    comparison (a bar without a total once made it fail)."""
    out = tmp_path / "f16.tflite"
    p = run_script("export.py", f"--model={trained[0]}", f"--tflite={out}",
                   "--quantize=float16", f"--tflite_seconds={TFLITE_SECONDS}",
                   f"--compare_data={trained[1]}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(tmp_path / "f16.compare.json"))
    assert res["clips"] > 0 and res["max_abs_diff"] < 0.05
    assert f"vs Keras on {res['clips']} clips" in p.stdout


def test_tflite_int8_keeps_waveform_and_frontend_float(tflite_models):
    """The int8 model quantises the CNN, not the audio: the input waveform and every front-end
    tensor (before the first convolution) stay float32 — an int8 input is 8-bit audio, whose
    quantisation noise floor replaces the quiet mel bands (it cost the demo model 0.23 mAP) —
    while the convolutions are int8."""
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=tflite_models["int8"])
    it.allocate_tensors()
    ops = it._get_ops_details()
    first_conv = next(i for i, op in enumerate(ops) if op["op_name"] == "CONV_2D")
    assert first_conv > 10
    assert ops[first_conv - 1]["op_name"] == "QUANTIZE"   # the fbank enters the int8 CNN
    for op in ops[:first_conv - 1]:
        assert op["op_name"] not in ("QUANTIZE", "DEQUANTIZE"), op
        for i in op["outputs"]:
            assert it._get_tensor_details(i, 0)["dtype"] in (np.float32, np.int32), op
    convs = [op for op in ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    int8_convs = [op for op in convs
                  if it._get_tensor_details(op["outputs"][0], 0)["dtype"] == np.int8]
    assert len(int8_convs) >= 0.9 * len(convs), (len(int8_convs), len(convs))


def test_tflite_float16_full_scale_square_wave(tflite_models, keras_model, tmp_path):
    """A full-scale 7-kHz square wave: its mel energies exceed float16's 65504 (so an unscaled
    float16 front end would overflow), yet the float16 model's scores are finite and within
    1e-2 of Keras, and every intermediate tensor of the model stays inside float16's range
    (the log's −inf for empty mel bands is the designed floor path, lifted by the next op)."""
    from psla_tf.features import kaldi_fbank
    t = np.arange(TFL_IN)
    square = np.where(np.sin(2 * np.pi * 7000 * t / SR) >= 0, 1.0, -1.0).astype(np.float32)
    assert np.exp(kaldi_fbank(square).numpy().max()) > 65504
    got = _run_tflite_fresh({"float16": tflite_models["float16"]}, square[None], tmp_path,
                            "litert")["float16"]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _tflite_reference(keras_model, [square]), atol=1e-2)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    # without the default XNNPACK delegate: a delegated node never fills the buffers of the
    # ops it absorbed (e.g. the float16 weights' DEQUANTIZE), so reading them would read
    # unwritten memory; the builtin kernels compute every tensor
    it = Interpreter(model_path=tflite_models["float16"], experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=(
                         OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], square[None])
    it.invoke()
    worst = 0.0
    for op in it._get_ops_details():
        for i in op["outputs"]:
            v = it.get_tensor(i)
            if v.dtype.kind == "f" and v.size:
                # log 0 = -inf of empty mel bands is the designed floor path (lifted by the
                # next MAXIMUM; XNNPACK may fuse it into a DELEGATE node); the scores above
                # are finite, so only NaN / +inf would be a fault here
                assert not np.any(np.isnan(v)) and not np.any(v == np.inf), op["op_name"]
                finite = v[np.isfinite(v)]
                worst = max(worst, float(np.abs(finite).max()) if finite.size else 0.0)
    assert worst < 65504, worst


def test_tflite_carries_labels_and_sample_rate(tflite_models, trained):
    from psla_tf import export_tflite
    from psla_tf.models import loading
    mids, names = loading.load_vocabulary(trained[0])
    for q, p in tflite_models.items():
        got, meta = export_tflite.read_embedded_labels(p)
        assert got == names and meta["sample_rate"] == SR and meta["quantize"] == q
        assert meta["input_samples"] == TFL_IN and meta["mids"] == mids
        side = json.load(open(os.path.splitext(p)[0] + ".json"))
        assert side == meta
        assert open(os.path.splitext(p)[0] + ".labels.txt").read().splitlines() == names


@pytest.mark.parametrize("quantize", ["none", "float16", "dynamic"])
def test_tflite_frontend_matches_torchaudio_reference(quantize):
    """The front end as the TFLite export builds it (matmul DFT, power_scale, runtime
    matrices for dynamic), converted alone and run by LiteRT, meets the Foundation fbank
    tests' tolerances against the torchaudio reference vectors."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    from psla_tf import export_tflite, features
    from tests.test_features import _check, _reference_files
    refs = [r for r in _reference_files() if r["waveform"].size >= 400][:3]
    for ref in refs:
        n = ref["waveform"].size
        fn = tf.function(lambda w: features.kaldi_fbank(
            w, dft="matmul", power_scale=export_tflite.FLOAT16_POWER_SCALE,
            runtime_matrices=quantize != "none"),
            input_signature=[tf.TensorSpec([n], tf.float32)])
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
        if quantize != "none":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            conv.target_spec.supported_types = [tf.float16]
        it = Interpreter(model_content=conv.convert())
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], ref["waveform"].astype(np.float32))
        it.invoke()
        _check(it.get_tensor(it.get_output_details()[0]["index"]), ref["fbank"],
               f"{ref['file']} (TFLite {quantize})")
