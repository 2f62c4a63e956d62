"""Deployment to ONNX Runtime: the waveform → scores graph as an ONNX model.

``export_onnx`` converts the same computation as the SavedModel's ``serving_default``
(:func:`psla_tf.export.serve`: Kaldi front end of Sec. II-C as a constant DFT matmul, CNN,
attention pooling of Fig. 2) with tf2onnx:

* input ``waveform`` float32 ``[batch, samples]`` (both dimensions dynamic; mono 16 kHz in
  [-1, 1], at least 400 samples): shorter clips than the training length are zero-padded,
  longer ones cut;
* output ``scores`` float32 ``[batch, C]``.

Not ``windowed``: tf2onnx converts the window pooling's masked max (``tf.where`` with -inf)
into arithmetic (0 · -inf = NaN), so longer inputs are cut to the training length; score
windows in the caller as ``tools/infer.py`` does.

The class list travels in the model (``metadata_props``: ``mids`` and ``names`` as JSON
lists, ``sample_rate``, ``clip_samples``; ONNX Runtime: ``session.get_modelmeta()
.custom_metadata_map``) and beside it as ``OUT.labels.txt`` (display names) and ``OUT.json``.

Converter constraints (tf2onnx 1.17, TF 2.21): the graph is frozen from a ``tf.function``
(Keras 3 models are not converted directly); the default opset is 17 (13-18 accepted: the
attention pooling's ``einsum`` needs ONNX ``Einsum``, opset >= 12, and tf2onnx knows opsets up
to 18); tf2onnx's ``einsum_optimizer`` is not run — it rewrites the pooling's
``btd,hdc->bhtc`` einsum into a ``Gemm`` of mismatched shapes that ONNX Runtime refuses — so
the model keeps ONNX ``Einsum`` nodes; every TF op must have an ONNX mapping (a conversion
that would drop one fails). The runtime assertions of the SavedModel (at least 400 samples)
are not in the ONNX graph.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Sequence

import numpy as np
import tensorflow as tf
import keras

from psla_tf import params
from psla_tf.export import ExportError, ExportSpec, ScoringModel, default_clip_samples, serve

__all__ = ["DEFAULT_OPSET", "OPSETS", "export_onnx", "OnnxTagger"]

DEFAULT_OPSET = 17
OPSETS = range(13, 19)


def _optimizers() -> OrderedDict:
    """tf2onnx's default optimisers in their order, without ``einsum_optimizer``."""
    from tf2onnx import optimizer as o
    return OrderedDict([
        ("optimize_transpose", o.TransposeOptimizer),
        ("remove_redundant_upsample", o.UpsampleOptimizer),
        ("fold_constants", o.ConstFoldOptimizer),
        ("const_dequantize_optimizer", o.ConstDequantizeOptimizer),
        ("loop_optimizer", o.LoopOptimizer),
        ("merge_duplication", o.MergeDuplicatedNodesOptimizer),
        ("reshape_optimizer", o.ReshapeOptimizer),
        ("global_pool_optimizer", o.GlobalPoolOptimizer),
        ("q_dq_optimizer", o.QDQOptimizer),
        ("remove_identity", o.IdentityOptimizer),
        ("remove_back_to_back", o.BackToBackOptimizer)])


def _name_dims(model_proto, names: Sequence[str]) -> None:
    """Give the input's dynamic dimensions readable names (``batch``, ``samples``) and the
    output's batch dimension the same name."""
    inp = model_proto.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(inp, names):
        d.dim_param = name
    out = model_proto.graph.output[0].type.tensor_type.shape.dim
    if out and not out[0].HasField("dim_value"):
        out[0].dim_param = names[0]


def _to_onnx(concrete, opset: int):
    """A concrete serving function → an optimised ONNX ModelProto (tf2onnx, on the CPU)."""
    import tf2onnx
    from tf2onnx import optimizer, tf_loader, tfonnx
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in concrete.outputs]
    with tf.device("/cpu:0"):
        frozen = tf_loader.from_function(concrete, inputs, outputs)
        with tf.Graph().as_default() as graph:
            tf.import_graph_def(frozen, name="")
            try:
                g = tfonnx.process_tf_graph(graph, continue_on_error=False, opset=opset,
                                            input_names=inputs, output_names=outputs,
                                            tensors_to_rename={inputs[0]: "waveform",
                                                               outputs[0]: "scores"})
            except Exception as e:   # an op without ONNX mapping, a shape tf2onnx refuses
                raise ExportError(f"tf2onnx could not convert the model: "
                                  f"{type(e).__name__}: {e}") from e
            g = optimizer.optimize_graph(g, catch_errors=True, optimizers=_optimizers())
            proto = g.make_model(f"psla_tf tagger (tf2onnx {tf2onnx.__version__})")
    return proto


def _set_metadata(proto, meta: dict, info: dict, spec: "ExportSpec", mids: Sequence[str],
                  names: Sequence[str]) -> None:
    """Producer, version, doc string and ``metadata_props`` (name, version, license, author,
    sample rate, clip length, vocabulary, the psla_tf metadata)."""
    proto.producer_name = "psla_tf"
    proto.model_version = int(info["version"]) if str(info.get("version", "")).isdigit() else 1
    proto.doc_string = info.get("description") or (
        f"PSLA audio tagger: 16-kHz mono waveform [batch, samples] -> {len(mids)} class scores "
        "(Kaldi log-mel front end inside)")
    props = {"name": info.get("name") or "psla_tf audio tagger",
             "version": str(info.get("version") or "1"), "license": info.get("license", ""),
             "author": info.get("author") or "psla_tf",
             "sample_rate": str(params.SAMPLE_RATE), "clip_samples": str(spec.clip_samples),
             "mids": json.dumps(list(mids)), "names": json.dumps(list(names)),
             "psla_tf": json.dumps(meta)}
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def export_onnx(model: keras.Model, out_path: str, mids: Sequence[str], names: Sequence[str],
                *, opset: int = DEFAULT_OPSET, clip_samples: int | None = None,
                windowed: bool = False, window: int = 0, hop: int = 0,
                clip_scores: bool = False, model_info: dict | None = None) -> dict:
    """Convert ``model`` (a tagger or an ensemble) to ``out_path`` (+ ``OUT.labels.txt``,
    ``OUT.json``); returns the metadata written to ``OUT.json``. ``model_info``: ``name``,
    ``description``, ``version``, ``license``, ``author`` (stored in ``metadata_props``)."""
    if windowed:
        raise ExportError("--windowed is not available with --onnx: tf2onnx turns the window "
                          "pooling's masked max (tf.where with -inf) into arithmetic that gives "
                          "NaN; export without it and score windows in the caller (or use the "
                          "SavedModel)")
    if int(opset) not in OPSETS:
        raise ExportError(f"onnx opset must be in {OPSETS.start}..{OPSETS.stop - 1}, got {opset}")
    try:   # after the checks of the request: a refused option is reported either way
        import tf2onnx  # noqa: F401  (converts in _to_onnx)
    except ImportError as e:
        raise ExportError(f"ONNX export needs tf2onnx and onnx (pip install -r "
                          f"requirements-deploy.txt): {e}") from e
    scorer = ScoringModel(model, clip_scores)
    if len(mids) != scorer.num_classes or len(names) != len(mids):
        raise ExportError(f"the vocabulary has {len(mids)} classes, the model "
                          f"{scorer.num_classes} outputs")
    spec = ExportSpec(int(clip_samples or default_clip_samples(model)), windowed, window, hop)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="waveform")],
                 autograph=False)
    def infer(waveform):
        n = tf.fill([tf.shape(waveform)[0]], tf.shape(waveform)[1])
        scores, _ = serve(scorer, spec, waveform, n)
        return {"scores": tf.identity(scores, name="scores")}

    proto = _to_onnx(infer.get_concrete_function(), int(opset))
    _name_dims(proto, ["batch", "samples"])
    info = dict(model_info or {})
    meta = {"format": "psla_tf.onnx/1", "sample_rate": params.SAMPLE_RATE,
            "clip_samples": spec.clip_samples, "windowed": spec.windowed,
            "window": spec.window, "hop": spec.hop, "clip_scores": bool(clip_scores),
            "num_classes": len(mids), "opset": int(opset),
            "input": "waveform float32 [batch, samples], mono 16 kHz in [-1, 1], "
                     f">= {params.FRAME_LENGTH} samples",
            "output": "scores float32 [batch, num_classes]", "mids": list(mids),
            "names": list(names)}
    _set_metadata(proto, meta, info, spec, mids, names)
    from psla_tf import atomic
    atomic.write_bytes(out_path, proto.SerializeToString())
    base = os.path.splitext(out_path)[0]
    atomic.write_text(base + ".labels.txt", "\n".join(names) + "\n")
    atomic.write_json(base + ".json", meta, indent=1)
    meta["size_bytes"] = os.path.getsize(out_path)
    return meta


class OnnxTagger:
    """A ``.onnx`` written by export_onnx, run with ONNX Runtime (CPU):
    ``tagger(waveform [B, S] or [S])`` → scores ``[B, C]``; ``mids``, ``names``."""

    def __init__(self, path: str, num_threads: int = 0):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = int(num_threads)
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        self.mids = json.loads(props.get("mids", "[]"))
        self.names = json.loads(props.get("names", "[]"))
        self.sample_rate = int(props.get("sample_rate", params.SAMPLE_RATE))

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        w = np.asarray(waveform, np.float32)
        return self.session.run(["scores"], {"waveform": w[None] if w.ndim == 1 else w})[0]
