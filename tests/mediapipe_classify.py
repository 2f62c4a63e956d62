"""Run a .tflite through MediaPipe's AudioClassifier; run by tests/test_deploy.py with the
Python of a virtual environment that has only ``mediapipe`` (no psla_tf, no TensorFlow).

    python mediapipe_classify.py MODEL.tflite INPUTS.npz OUT.json [BLOCK]

INPUTS.npz: float32 16-kHz mono arrays. For each array the JSON has its AUDIO_CLIPS results
(one per chunk of the model's input length, the last zero-padded) and its AUDIO_STREAM results
(the array fed in blocks of BLOCK samples, default 4000; one result per full input length):
``{name: {"clips": [...], "stream": [...]}}``, each result ``{"timestamp_ms", "categories":
[{"index", "score", "category_name", "display_name"}]}`` with every category (sorted by
index). Also ``"mediapipe_version"``, ``"modules"`` (whether tensorflow / psla_tf are
importable in this environment) and ``"metadata"``: the model's TFLITE_METADATA decoded with
MediaPipe's own generated schema code (``metadata_schema_py_generated``), all fields.
"""
import importlib.util
import json
import sys
import threading

import numpy as np
import mediapipe as mp
from mediapipe.tasks.python import audio
from mediapipe.tasks.python.audio.core import audio_task_running_mode
from mediapipe.tasks.python.components.containers import audio_data as audio_data_module
from mediapipe.tasks.python.core import base_options as base_options_module

SAMPLE_RATE = 16000
RunningMode = audio_task_running_mode.AudioTaskRunningMode


def _result(r) -> dict:
    head = r.classifications[0]
    cats = sorted(head.categories, key=lambda c: c.index)
    return {"timestamp_ms": int(r.timestamp_ms or 0), "head_name": head.head_name,
            "categories": [{"index": int(c.index), "score": float(c.score),
                            "category_name": c.category_name, "display_name": c.display_name}
                           for c in cats]}


def _options(model: str, mode, callback=None):
    return audio.AudioClassifierOptions(
        base_options=base_options_module.BaseOptions(model_asset_path=model),
        running_mode=mode, max_results=-1, score_threshold=-1e30, result_callback=callback)


def classify_clips(model: str, x: np.ndarray) -> list[dict]:
    with audio.AudioClassifier.create_from_options(
            _options(model, RunningMode.AUDIO_CLIPS)) as classifier:
        data = audio_data_module.AudioData.create_from_array(x.astype(np.float32), SAMPLE_RATE)
        return [_result(r) for r in classifier.classify(data)]


def classify_stream(model: str, x: np.ndarray, block: int) -> list[dict]:
    got, lock = [], threading.Lock()

    def callback(result, timestamp_ms):
        with lock:
            got.append(_result(result))
    with audio.AudioClassifier.create_from_options(
            _options(model, RunningMode.AUDIO_STREAM, callback)) as classifier:
        for start in range(0, x.size, block):
            chunk = x[start:start + block].astype(np.float32)
            data = audio_data_module.AudioData.create_from_array(chunk, SAMPLE_RATE)
            classifier.classify_async(data, int(round(start * 1000 / SAMPLE_RATE)))
    return sorted(got, key=lambda r: r["timestamp_ms"])


def _plain(x):
    """A flatbuffers object-API value as JSON-able data."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "__dict__"):
        return {k: _plain(v) for k, v in vars(x).items()}
    return x


def read_metadata(model: str) -> dict | None:
    from mediapipe.tasks.metadata import metadata_schema_py_generated as md
    from mediapipe.tasks.metadata import schema_py_generated as fb
    buf = bytearray(open(model, "rb").read())
    m = fb.Model.GetRootAs(buf, 0)
    for i in range(m.MetadataLength()):
        if m.Metadata(i).Name() == b"TFLITE_METADATA":
            data = m.Buffers(m.Metadata(i).Buffer()).DataAsNumpy().tobytes()
            out = _plain(md.ModelMetadataT.InitFromObj(md.ModelMetadata.GetRootAs(data, 0)))
            out["identifier"] = data[4:8].decode("ascii")
            return out
    return None


def main(argv):
    model, inputs, out = argv[1:4]
    block = int(argv[4]) if len(argv) > 4 else 4000
    res = {"mediapipe_version": getattr(mp, "__version__", "?"),
           "modules": {m: importlib.util.find_spec(m) is not None
                       for m in ("tensorflow", "psla_tf", "ai_edge_litert")},
           "metadata": read_metadata(model)}
    with np.load(inputs) as z:
        for name in z.files:
            x = np.asarray(z[name], np.float32)
            res[name] = {"clips": classify_clips(model, x),
                         "stream": classify_stream(model, x, block)}
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv)
