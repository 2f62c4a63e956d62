"""Deployment where users are (issue 20): the TFLite variants load in MediaPipe's
AudioClassifier (TFLite Model Metadata) and the ONNX export runs in ONNX Runtime.

The tagger is the smallest one of tests/helpers_models.py (EfficientNet-B0, 2 heads, 64
frames = 10480 samples), untrained, with its BatchNorm statistics taken from real audio (FSDD
digits) so that its scores depend on the input (with random statistics every clip scores the
same to 1e-6 and a comparison would prove nothing). Audio: FSDD recordings (8 kHz → 16 kHz)
and the 7-s AudioSet clip of ../shared/data.

MediaPipe runs in its own virtual environment with only ``mediapipe`` installed (no psla_tf,
no TensorFlow), as a user has it: ``PSLA_MEDIAPIPE_PYTHON`` (its python), default
``.venv-mediapipe/bin/python`` (what .ci/run creates). Tolerances (issue 20): MediaPipe vs
LiteRT 1e-5 on the same input, every variant; ONNX Runtime vs Keras 1e-4.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from tests.conftest import shared_path
from tests.helpers_models import CLIP_SAMPLES, make_tagger, save_tagger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000
MIDS = ["/m/09x0r", "/m/05zppz", "/m/0ytgt", "/m/01h8n0", "/m/0bt9lr"]
NAMES = ["Speech", "Male speech, man speaking", "Child speech, kid speaking", "Conversation",
         "Dog"]
VARIANTS = ("none", "float16", "dynamic", "int8")
MP_PYTHON = os.environ.get("PSLA_MEDIAPIPE_PYTHON",
                           os.path.join(ROOT, ".venv-mediapipe", "bin", "python"))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)


def _read(path: str, sr_out: int = SR) -> np.ndarray:
    import soundfile as sf
    import soxr
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(1)
    return (soxr.resample(x, sr, sr_out) if sr != sr_out else x).astype(np.float32)


def _fsdd(n: int, step: int = 37) -> list[np.ndarray]:
    folder = shared_path("data", "fsdd", "recordings")
    files = sorted(os.listdir(folder))[::step][:n]
    return [_read(str(folder / f)) for f in files]


def _fit(x: np.ndarray, n: int = CLIP_SAMPLES) -> np.ndarray:
    out = np.zeros(n, np.float32)
    out[:min(n, x.size)] = x[:n]
    return out


def _calibrate_batchnorm(model, waves: np.ndarray) -> None:
    """Moving statistics of every BatchNorm := its batch statistics on ``waves`` (one
    training-mode pass with momentum 0: each layer sees the previous layers' normalised
    output, as after training)."""
    import keras
    bns = [layer for layer in model._flatten_layers() if   # noqa: SLF001
           isinstance(layer, keras.layers.BatchNormalization)]
    old = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 0.0
    model({"waveform": waves, "num_samples": np.full(len(waves), waves.shape[1], np.int32)},
          training=True)
    for b, m in zip(bns, old):
        b.momentum = m


@pytest.fixture(scope="module")
def audio():
    """Real 16-kHz test audio: a digit (shorter than the input), three digits one after the
    other (several chunks) and the 7-s AudioSet clip."""
    digits = _fsdd(3, step=101)
    return {"digit": digits[0], "digits": np.concatenate(digits),
            "audioset": _read(str(shared_path("data", "clips", "R9_ZSCveAHg_7s.wav")))}


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    """(model, its .keras path, name → the tool run on it: tools/export.py in-process, made
    when a test first asks for it)."""
    from psla_tf.data.records import write_label_csv
    from tests.helpers_cli import lazy_runs
    model = make_tagger(num_classes=len(MIDS), att_head=2)
    _calibrate_batchnorm(model, np.stack([_fit(x) for x in _fsdd(32)]))
    d = tmp_path_factory.mktemp("deploy_model")
    path = save_tagger(model, str(d))
    write_label_csv(os.path.join(d, "labels.csv"), MIDS, NAMES)
    runs = lazy_runs("export.py", {
        "export": [f"--model={path}", f"--onnx={d / 'psla.onnx'}", f"--tflite={d / 'cli.tflite'}",
                   "--tflite_seconds=1", "--model_license=MIT", "--model_version=7",
                   "--model_name=cli tagger"],
        "bad_opset": [f"--model={path}", f"--onnx={d / 'x.onnx'}", "--onnx_opset=11"]})
    return model, path, runs


@pytest.fixture(scope="module")
def variants(tagger, tmp_path_factory):
    """The four TFLite variants, exported in-process with explicit model information."""
    from psla_tf import export_tflite
    model = tagger[0]
    d = tmp_path_factory.mktemp("deploy_tflite")
    calib = [_fit(x) for x in _fsdd(4, step=53)]
    out = {}
    for q in VARIANTS:
        out[q] = str(d / f"m_{q}.tflite")
        export_tflite.export_tflite(
            model, out[q], MIDS, NAMES, quantize=q, seconds=CLIP_SAMPLES / SR,
            calibration=calib if q == "int8" else None,
            model_info=dict(name="test tagger", version="3", license="CC-BY-4.0",
                            author="tests"))
    return out


def _litert(path: str, x: np.ndarray) -> np.ndarray:
    from psla_tf.export_tflite import TFLiteTagger
    return TFLiteTagger(path)(x)


# ----------------------------------------------------------------------------- metadata
def test_metadata_fields_and_label_files(variants):
    from psla_tf import export_tflite, tflite_metadata
    for q, path in variants.items():
        md = tflite_metadata.read_metadata(open(path, "rb").read())
        assert (md["name"], md["version"], md["license"], md["author"]) == (
            "test tagger", "3", "CC-BY-4.0", "tests")
        assert md["min_parser_version"] == "1.3.0" and md["description"]
        (sub,) = md["subgraphs"]
        (inp,) = sub["inputs"]
        assert (inp["content"], inp["sample_rate"], inp["channels"]) == (
            "AudioProperties", SR, 1)
        (out,) = sub["outputs"]
        assert out["name"] == "scores" and "stats" not in out      # 2 heads: not bounded
        files = [(f["name"], f["type"], f["locale"]) for f in out["associated_files"]]
        assert files == [("mids.txt", tflite_metadata.TENSOR_AXIS_LABELS, None),
                         ("labels.txt", tflite_metadata.TENSOR_AXIS_LABELS, "en")]
        with zipfile.ZipFile(path) as z:
            assert z.read("mids.txt").decode().splitlines() == MIDS
            assert z.read("labels.txt").decode().splitlines() == NAMES
            assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        # the zip's offsets count from the start of the file (as TFLite Support's populator
        # writes them): the end record points at the central directory itself
        data = open(path, "rb").read()
        end = data.rfind(b"PK\x05\x06")
        central = struct.unpack("<I", data[end + 16:end + 20])[0]
        assert data[central:central + 4] == b"PK\x01\x02"
        names, meta = export_tflite.read_embedded_labels(path)
        assert names == NAMES and meta["mids"] == MIDS and meta["quantize"] == q


def test_attach_metadata_leaves_the_graph_alone():
    """A converted model and the same with metadata attached: same tensors, same outputs."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    from psla_tf import tflite_metadata

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    def f(x):
        return tf.nn.sigmoid(tf.matmul(x, tf.constant(np.arange(24, dtype=np.float32)
                                                       .reshape(8, 3) / 10)))
    flat = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()]).convert()
    md = tflite_metadata.build_metadata(tflite_metadata.tagger_metadata(
        3, input_samples=8, sample_rate=SR, quantize="none", bounded=True))
    with_md = tflite_metadata.attach_metadata(flat, md)
    assert tflite_metadata.read_metadata(flat) is None
    got = tflite_metadata.read_metadata(with_md)
    assert got["subgraphs"][0]["outputs"][0]["stats"] == {"max": [1.0], "min": [0.0]}
    # attaching again replaces, not duplicates
    again = tflite_metadata.attach_metadata(with_md, md)
    from tensorflow.lite.python import schema_py_generated as fb
    m = fb.Model.GetRootAs(bytearray(again), 0)
    assert [m.Metadata(i).Name() for i in range(m.MetadataLength())].count(
        b"TFLITE_METADATA") == 1
    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    outs = []
    for content in (flat, with_md):
        it = Interpreter(model_content=bytes(content))
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]))
    np.testing.assert_array_equal(outs[0], outs[1])


# ----------------------------------------------------------------------------- MediaPipe
def _mediapipe_python() -> str:
    if not os.path.exists(MP_PYTHON):
        pytest.skip(f"needs a virtual environment with mediapipe at {MP_PYTHON} (.ci/run "
                    "creates .venv-mediapipe; or set PSLA_MEDIAPIPE_PYTHON)")
    return MP_PYTHON


@pytest.fixture(scope="module")
def mediapipe_runs(variants, audio, tmp_path_factory):
    """Each variant through MediaPipe's AudioClassifier (clips and stream mode) in the
    mediapipe-only environment; {variant: the script's JSON}."""
    python = _mediapipe_python()
    d = tmp_path_factory.mktemp("mediapipe")
    inputs = str(d / "inputs.npz")
    np.savez(inputs, **audio)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    procs = {}
    for q, path in variants.items():
        out = str(d / f"{q}.json")
        procs[q] = (out, subprocess.Popen(
            [python, os.path.join(ROOT, "tests", "mediapipe_classify.py"), path, inputs, out,
             "4000"], cwd=str(d), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    res = {}
    for q, (out, p) in procs.items():
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, f"{q}: {log[-3000:]}"
        res[q] = json.load(open(out))
    return res


def test_mediapipe_environment_has_no_psla_tf_or_tensorflow(mediapipe_runs):
    for run in mediapipe_runs.values():
        assert run["modules"] == {"tensorflow": False, "psla_tf": False,
                                  "ai_edge_litert": False}, run["modules"]


def test_mediapipe_reads_the_metadata_with_its_own_schema(mediapipe_runs):
    """The metadata as MediaPipe's generated schema code decodes it."""
    for q, run in mediapipe_runs.items():
        md = run["metadata"]
        assert md["identifier"] == "M001" and md["minParserVersion"] == "1.3.0"
        assert (md["name"], md["version"], md["license"]) == ("test tagger", "3", "CC-BY-4.0")
        (sub,) = md["subgraphMetadata"]
        content = sub["inputTensorMetadata"][0]["content"]
        assert content["contentPropertiesType"] == 4     # ContentProperties.AudioProperties
        assert content["contentProperties"] == {"sampleRate": SR, "channels": 1}
        files = sub["outputTensorMetadata"][0]["associatedFiles"]
        assert [(f["name"], f["type"], f["locale"]) for f in files] == [
            ("mids.txt", 2, None), ("labels.txt", 2, "en")]     # 2: TENSOR_AXIS_LABELS


@pytest.mark.parametrize("q", VARIANTS)
def test_mediapipe_scores_equal_litert(mediapipe_runs, variants, audio, q):
    """Clips mode: one result per input-length chunk (the last zero-padded), each equal to
    LiteRT's scores on that chunk within 1e-5, labelled with the MIDs and display names.
    Stream mode (blocks of 4000 samples): the same chunks (the tail flushed at the end)."""
    worst = 0.0
    for name, x in audio.items():
        chunks = [x[i:i + CLIP_SAMPLES] for i in range(0, x.size, CLIP_SAMPLES)]
        ref = np.stack([_litert(variants[q], c) for c in chunks])
        for mode in ("clips", "stream"):
            got = mediapipe_runs[q][name][mode]
            assert len(got) == len(chunks), (name, mode, len(got), len(chunks))
            for k, r in enumerate(got):
                assert r["head_name"] == "scores"
                cats = r["categories"]
                assert [c["index"] for c in cats] == list(range(len(MIDS)))
                assert [c["category_name"] for c in cats] == MIDS
                assert [c["display_name"] for c in cats] == NAMES
                s = np.asarray([c["score"] for c in cats])
                worst = max(worst, float(np.abs(s - ref[k]).max()))
            if mode == "clips":
                assert [r["timestamp_ms"] for r in got] == [
                    int(i * CLIP_SAMPLES * 1000 / SR) for i in range(len(chunks))]
    print(f"{q}: MediaPipe vs LiteRT max |d| {worst:.2e}")
    assert worst <= 1e-5
    # the scores depend on the input (a constant model would pass trivially)
    spread = np.ptp(np.stack([_litert(variants[q], x) for x in audio.values()]), axis=0)
    assert spread.max() > 1e-2


# ----------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx_export(tagger):
    """tools/export.py --onnx (and --tflite in the same run, to check the metadata flags)."""
    pytest.importorskip("tf2onnx", reason="ONNX export needs tf2onnx (requirements-deploy.txt)")
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (requirements-deploy.txt)")
    p = tagger[2]("export")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = os.path.dirname(tagger[1])
    return os.path.join(d, "psla.onnx"), os.path.join(d, "cli.tflite")


def test_export_tool_metadata_flags(onnx_export):
    from psla_tf import tflite_metadata
    md = tflite_metadata.read_metadata(open(onnx_export[1], "rb").read())
    assert (md["name"], md["version"], md["license"]) == ("cli tagger", "7", "MIT")
    assert md["subgraphs"][0]["inputs"][0]["sample_rate"] == SR


def test_onnx_runtime_matches_keras_on_real_audio(onnx_export, tagger, audio, tmp_path):
    """ONNX Runtime in a fresh process that never imports psla_tf, TensorFlow or Keras: a batch of different
    lengths per run (one clip shorter than the input: zero-padded; the 7-s clip: cut),
    against the Keras model on the same clips padded / cut as in training (1e-4)."""
    model = tagger[0]
    onnx_path, _ = onnx_export
    clips = [audio["digit"], audio["digits"], audio["audioset"]]
    np.savez(tmp_path / "in.npz", *clips)
    code = f"""
        import json, sys, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({onnx_path!r}, providers=["CPUExecutionProvider"])
        z = np.load({str(tmp_path / 'in.npz')!r})
        xs = [z[f"arr_{{i}}"] for i in range(len(z.files))]
        out = [s.run(["scores"], {{"waveform": x[None]}})[0][0].tolist() for x in xs]
        same = np.stack([xs[0], xs[0] * 0.5])                 # a batch of two
        out.append(s.run(["scores"], {{"waveform": same}})[0].tolist())
        meta = s.get_modelmeta().custom_metadata_map
        print(json.dumps({{"scores": out, "meta": dict(meta),
                          "inputs": [(i.name, i.shape) for i in s.get_inputs()],
                          "outputs": [(o.name, o.shape) for o in s.get_outputs()]}}))
        # an editable install keeps psla_tf findable; what matters is that nothing loaded it
        assert not [m for m in sys.modules if m.split(".")[0] in ("psla_tf", "tensorflow", "keras")]
    """
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, env=env, cwd="/", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["inputs"] == [["waveform", ["batch", "samples"]]]
    assert res["outputs"] == [["scores", ["batch", len(MIDS)]]]
    assert json.loads(res["meta"]["mids"]) == MIDS and json.loads(res["meta"]["names"]) == NAMES
    assert res["meta"]["sample_rate"] == str(SR) and res["meta"]["license"] == "MIT"
    waves = [_fit(x) for x in clips] + [_fit(clips[0]), _fit(clips[0] * 0.5)]
    n = [min(x.size, CLIP_SAMPLES) for x in clips] + [min(clips[0].size, CLIP_SAMPLES)] * 2
    ref = model({"waveform": np.stack(waves), "num_samples": np.asarray(n, np.int32)},
                training=False).numpy()
    got = np.asarray(res["scores"][:3] + res["scores"][3])
    d = np.abs(got - ref).max()
    print(f"ONNX Runtime vs Keras max |d| {d:.2e}")
    assert d <= 1e-4
    assert np.ptp(ref, axis=0).max() > 1e-2          # the clips score differently
    assert open(os.path.splitext(onnx_path)[0] + ".labels.txt").read().splitlines() == NAMES


def test_onnx_bad_opset_is_a_one_line_error(tagger):
    p = tagger[2]("bad_opset")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: --onnx_opset")


def test_onnx_refuses_windowed(tagger, tmp_path):
    from psla_tf import export_onnx
    from psla_tf.export import ExportError
    with pytest.raises(ExportError, match="windowed"):
        export_onnx.export_onnx(tagger[0], str(tmp_path / "w.onnx"), MIDS, NAMES, windowed=True)
    assert not os.path.exists(tmp_path / "w.onnx")
