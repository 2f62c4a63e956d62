"""Deployment to phones: TFLite / LiteRT models that take the raw 16-kHz waveform.

``export_tflite`` converts the same waveform → scores graph as the SavedModel
(:func:`psla_tf.export.serve`: front end of Sec. II-C, CNN, attention pooling of Fig. 2) for a
fixed input of ``seconds`` (default 10 s) and batch 1:

* input ``waveform`` float32 ``[1, seconds · 16000]`` in [-1, 1]; output ``scores`` ``[1, C]``;
* ``quantize``: ``none`` (float32), ``float16`` (float16 weights), ``dynamic`` (int8 weights,
  float activations; the depthwise kernels and the small kernels of the early layers stay
  float32, ``float_kernel_elements``), ``int8`` (full-integer: int8 weights and activations, calibrated on a
  representative set of TFRecord clips; the input and output stay float32 so callers feed
  audio unchanged).

The front end converts with builtin ops only: the DFT is the constant ``[400, 514]`` matmul of
``kaldi_fbank(dft="matmul")`` (TFLite has no general RFFT kernel), framing is a strided slice.
Half precision: the mel energies of a full-scale clip reach ~1e5, beyond float16's 65504,
so the TFLite front end is built with ``power_scale`` (magnitudes divided by 16 before
squaring, 2 ln 16 added back after the log): the same function, finite in float16.

Models carry TFLite Model Metadata (:mod:`psla_tf.tflite_metadata`: audio input at 16 kHz,
1 channel; the ``scores`` output labelled by ``mids.txt`` and ``labels.txt``; name,
description, version, licence), so MediaPipe's AudioClassifier and the TFLite Task Library
load them as they are. The label files and ``psla_tf.json`` are packed into the ``.tflite``
(an uncompressed zip appended to the flatbuffer, the TFLite associated-file convention;
MediaPipe and ``zipfile`` read it), and written beside it as ``OUT.labels.txt`` and
``OUT.json`` (sample rate, input samples, class MIDs and names, quantisation).
"""
from __future__ import annotations

import json
import os
import time
import zipfile
from typing import Callable, Iterable, Sequence

import numpy as np
import tensorflow as tf
import keras

from psla_tf import atomic, compat, params, tflite_metadata
from psla_tf.export import ExportError, ExportSpec, ScoringModel, default_clip_samples, serve

__all__ = ["QUANTIZATIONS", "FLOAT16_POWER_SCALE", "export_tflite", "calibration_clips",
           "TFLiteTagger", "read_embedded_labels", "compare_with_keras"]

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
# int8: op types kept in float32 (front end: framing, DFT / mel matmuls, log; attention
# pooling: its division by the attention sum fails when the sum quantises to 0)
INT8_FLOAT_OPS = ("BATCH_MATMUL", "FULLY_CONNECTED", "LOG", "DIV", "MAXIMUM", "SELECT_V2",
                  "SUM", "EXP", "LOGISTIC", "STRIDED_SLICE", "SUB", "GATHER", "SPLIT", "ABS",
                  "MINIMUM", "CAST")
FLOAT16_POWER_SCALE = 16.0
# dynamic: TF op types whose kernels stay float32. The hybrid depthwise kernel quantises its
# input per tensor, across channels whose ranges differ by orders of magnitude after the
# folded BatchNorm; keeping the 16 depthwise kernels float (~0.5 MB of a B0) cut the mean
# score error by ~40% on both demo models measured (docs/deployment.md)
DYNAMIC_FLOAT_OPS = ("DepthwiseConv2dNative",)
# dynamic: kernels (convolution / dense / einsum) with fewer weights than this stay float32 as
# well. The int8 weights, not the dynamically quantised activations, make most of dynamic's
# score error (int8 weights alone in a float graph: 86 % of it on the demo model), and per
# weight they cost the most in the early, small layers (EfficientNet-B0 blocks 1-4 and 5a's
# expansion: 11 % of the weights, 60 % of the error); docs/deployment.md has the measured size /
# error trade-off per threshold
DYNAMIC_FLOAT_MAX_ELEMENTS = params.DYNAMIC_FLOAT_MAX_ELEMENTS
KERNEL_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2", "Einsum")


def _configure_frontends(model: keras.Model, scale: float, runtime_matrices: bool):
    """Set ``power_scale`` / ``runtime_matrices`` on every front end of ``model``; returns
    what restores them."""
    from psla_tf.export import _members
    fronts = [m.get_layer("frontend") for m in _members(model)]
    old = [(f.power_scale, getattr(f, "runtime_matrices", False)) for f in fronts]
    for f in fronts:
        f.power_scale, f.runtime_matrices = float(scale), bool(runtime_matrices)
    return fronts, old


def calibration_clips(pattern: str, num_samples: int, limit: int = 100) -> list[np.ndarray]:
    """Up to ``limit`` clips of the TFRecord shards matching ``pattern`` as float32
    ``[num_samples]`` waveforms (cut / zero-padded), for int8 calibration."""
    from psla_tf.data import records
    spec = records.load_data_spec(pattern)
    out = []
    for ex in records.iter_examples(spec.files, spec.compression):
        w = ex["waveform_int16"].astype(np.float32) / 32768.0
        x = np.zeros(num_samples, np.float32)
        x[:min(num_samples, w.size)] = w[:num_samples]
        out.append(x)
        if len(out) >= limit:
            break
    if not out:
        raise ExportError(f"no calibration clips in {pattern!r}")
    return out


def _check_args(quantize: str, seconds: float, float_kernel_elements: int,
                calibration) -> int:
    """The export's arguments checked → the TFLite input length in samples."""
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    input_samples = int(round(seconds * params.SAMPLE_RATE))
    if input_samples < params.FRAME_LENGTH:
        raise ExportError(f"tflite_seconds must give >= {params.FRAME_LENGTH} samples, got "
                          f"{input_samples}")
    if float_kernel_elements < 0:
        raise ExportError(f"float_kernel_elements must be >= 0, got {float_kernel_elements}")
    if quantize == "int8" and calibration is None:
        raise ExportError("int8 quantisation needs calibration data (--calibration_data)")
    return input_samples


def _frozen_scorer(scorer: "ScoringModel", spec: "ExportSpec", input_samples: int,
                   quantize: str):
    """The serving graph ``waveform [1, input_samples] → {"scores": [1, C]}`` as a concrete
    function with the weights frozen into constants (converted with the trackable object,
    the Keras 3 variables stay resource variables without an initialiser in the
    flatbuffer)."""
    @tf.function(input_signature=[tf.TensorSpec([1, input_samples], tf.float32,
                                                name="waveform")], autograph=False)
    def infer(waveform):
        n = tf.constant([input_samples], tf.int32)
        if quantize == "int8":   # the waveform itself must not become 8-bit audio
            waveform = _opaque_to_quantizer(waveform)
        scores, _ = serve(scorer, spec, waveform, n)
        return {"scores": scores}
    return compat.freeze_function(infer.get_concrete_function())


def _converter(concrete) -> "tf.lite.TFLiteConverter":
    """A TFLite converter of a :func:`_frozen_scorer` function. Its weights are constants, so
    there is no variable for a trackable object to keep alive; an empty one is passed so that
    the converter does not warn on stderr that none was given."""
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete],
                                                           trackable_obj=tf.Module())


def _convert_int8(concrete, calibration: Iterable[np.ndarray], input_samples: int,
                  progress: Callable[[int], None] | None) -> bytes:
    """Selective int8: the CNN runs in int8; the front end stays float32 (8-bit frames or
    spectra lose the log spectrum's dynamic range: the demo model's mAP fell by 0.23 with an
    int8 front end), and so do the op types of INT8_FLOAT_OPS."""
    clips = list(calibration)

    def representative():
        for i, c in enumerate(clips):
            x = np.zeros([1, input_samples], np.float32)
            c = np.asarray(c, np.float32).reshape(-1)[:input_samples]
            x[0, :c.size] = c
            if progress:
                progress(i)
            yield [x]

    converter = _converter(concrete)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
    float_flat = _converter(concrete).convert()
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_ops=list(INT8_FLOAT_OPS),
        denylisted_nodes=_frontend_tensor_names(float_flat))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative, debug_options=options)
    return debugger.get_nondebug_quantized_model()


def _convert(concrete, quantize: str, float_kernel_elements: int, calibration,
             input_samples: int, progress) -> tuple[bytes, int]:
    """(flatbuffer, number of kernels kept float32 by ``dynamic``) of one variant."""
    float_kernels = 0
    if quantize == "dynamic":
        concrete, float_kernels = _float_kernels(
            concrete, lambda op, kernel: (op in DYNAMIC_FLOAT_OPS
                                          or kernel.size < float_kernel_elements))
    if quantize == "int8":
        flat = _convert_int8(concrete, calibration, input_samples, progress)
    else:
        converter = _converter(concrete)
        converter.optimizations = [] if quantize == "none" else [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        flat = converter.convert()
    return _fold_opaque_constants(flat), float_kernels


def _write_with_sidecars(flat: bytes, out_path: str, meta: dict, info: dict,
                         mids: Sequence[str], names: Sequence[str]) -> bytes:
    """Metadata + associated files into the flatbuffer; ``OUT``, ``OUT.labels.txt`` and
    ``OUT.json`` written atomically. Returns the final flatbuffer."""
    flat = tflite_metadata.attach_metadata(flat, tflite_metadata.build_metadata(info))
    flat = _append_associated_files(flat, {
        tflite_metadata.NAMES_FILE: "\n".join(names) + "\n",
        tflite_metadata.MIDS_FILE: "\n".join(mids) + "\n",
        "psla_tf.json": json.dumps(meta, indent=1)})
    atomic.write_bytes(out_path, flat)
    base = os.path.splitext(out_path)[0]
    atomic.write_text(base + ".labels.txt", "\n".join(names) + "\n")
    atomic.write_json(base + ".json", meta, indent=1)
    return flat


def export_tflite(model: keras.Model, out_path: str, mids: Sequence[str], names: Sequence[str],
                  *, quantize: str = "none", seconds: float = 10.0,
                  clip_samples: int | None = None, windowed: bool = False, window: int = 0,
                  hop: int = 0, clip_scores: bool = False,
                  calibration: Iterable[np.ndarray] | None = None,
                  float_kernel_elements: int = DYNAMIC_FLOAT_MAX_ELEMENTS,
                  progress: Callable[[int], None] | None = None,
                  model_info: dict | None = None) -> dict:
    """Convert ``model`` to ``out_path`` (+ sidecars); returns the metadata written to
    ``OUT.json``. ``calibration``: float32 waveforms of ``seconds`` (int8 only).
    ``float_kernel_elements`` (dynamic only): kernels with fewer weights stay float32 (0: only
    the depthwise kernels do). ``model_info``: ``name``, ``description``, ``version``,
    ``license``, ``author`` for the TFLite Model Metadata (:mod:`psla_tf.tflite_metadata`)."""
    input_samples = _check_args(quantize, seconds, float_kernel_elements, calibration)
    spec = ExportSpec(int(clip_samples or default_clip_samples(model)), windowed, window, hop)
    # quantised variants: keep the front end's DFT / mel matrices out of weight quantisation
    # (float16 coefficients leak ~-66 dB, int8 destroys the log spectrum's dynamic range)
    fronts, old = _configure_frontends(model, FLOAT16_POWER_SCALE, quantize != "none")
    try:
        scorer = ScoringModel(model, clip_scores)
        if len(mids) != scorer.num_classes or len(names) != len(mids):
            raise ExportError(f"the vocabulary has {len(mids)} classes, the model "
                              f"{scorer.num_classes} outputs")
        concrete = _frozen_scorer(scorer, spec, input_samples, quantize)
        flat, float_kernels = _convert(concrete, quantize, float_kernel_elements, calibration,
                                       input_samples, progress)
    finally:
        for f, (scale, runtime) in zip(fronts, old):
            f.power_scale, f.runtime_matrices = scale, runtime
    meta = {"format": "psla_tf.tflite/1", "sample_rate": params.SAMPLE_RATE,
            "input_samples": input_samples, "clip_samples": spec.clip_samples,
            "windowed": spec.windowed, "window": spec.window, "hop": spec.hop,
            "quantize": quantize, "clip_scores": bool(clip_scores), "num_classes": len(mids),
            **({"float_kernel_elements": int(float_kernel_elements),
                "float_kernels": float_kernels} if quantize == "dynamic" else {}),
            "input": "waveform float32 [1, input_samples], mono 16 kHz in [-1, 1]",
            "output": "scores float32 [1, num_classes]", "mids": list(mids),
            "names": list(names)}
    info = tflite_metadata.tagger_metadata(
        len(mids), input_samples=input_samples, sample_rate=params.SAMPLE_RATE,
        quantize=quantize, bounded=_scores_bounded(model, clip_scores), **(model_info or {}))
    flat = _write_with_sidecars(flat, out_path, meta, info, mids, names)
    meta["size_bytes"] = len(flat)
    return meta


def _float_kernels(concrete, keep_float: Callable[[str, np.ndarray], bool]):
    """(``concrete`` (a frozen function) with the constant kernels (input 1) of the ops of
    KERNEL_OPS for which ``keep_float(op type, kernel)`` holds stored as int32 bit patterns and
    bitcast back at run time (plus an int32 zero computed from the input, so the converter
    cannot fold it): the weight quantiser only sees float constants, so those ops keep exact
    float32 kernels; how many kernels that was)."""
    from tensorflow.core.framework import attr_value_pb2
    gd = concrete.graph.as_graph_def()
    nodes = {n.name: n for n in gd.node}
    placeholders = [n.name for n in gd.node if n.op == "Placeholder"]
    if len(placeholders) != 1:
        raise ExportError(f"expected one input, found {placeholders}")
    f32 = attr_value_pb2.AttrValue(type=tf.float32.as_datatype_enum)
    i32 = attr_value_pb2.AttrValue(type=tf.int32.as_datatype_enum)

    def add(name, op, inputs, **attrs):
        node = gd.node.add()
        node.name, node.op = name, op
        node.input.extend(inputs)
        for k, v in attrs.items():
            node.attr[k].CopyFrom(v)

    def const(name, value):
        add(name, "Const", [], dtype=attr_value_pb2.AttrValue(
            type=tf.as_dtype(value.dtype).as_datatype_enum),
            value=attr_value_pb2.AttrValue(tensor=tf.make_tensor_proto(value)))

    const("float_kernels/zero_f", np.zeros((), np.float32))
    const("float_kernels/axes", np.arange(2, dtype=np.int32))
    add("float_kernels/abs", "Abs", [placeholders[0]], T=f32)
    add("float_kernels/min", "Minimum", ["float_kernels/abs", "float_kernels/zero_f"], T=f32)
    add("float_kernels/sum", "Sum", ["float_kernels/min", "float_kernels/axes"], T=f32,
        Tidx=i32, keep_dims=attr_value_pb2.AttrValue(b=False))
    add("float_kernels/zero", "Cast", ["float_kernels/sum"], SrcT=f32, DstT=i32,
        Truncate=attr_value_pb2.AttrValue(b=False))
    kept = 0
    for node in [n for n in gd.node if n.op in KERNEL_OPS]:
        src = node.input[1].split(":")[0]
        while nodes[src].op == "Identity":
            src = nodes[src].input[0].split(":")[0]
        if nodes[src].op != "Const" or nodes[src].attr["dtype"].type != tf.float32.as_datatype_enum:
            continue
        kernel = tf.make_ndarray(nodes[src].attr["value"].tensor)
        if not keep_float(node.op, kernel):
            continue
        if src + "/float_kernel" not in nodes:   # a kernel shared by several ops: once
            kept += 1
            const(src + "/float_bits", np.ascontiguousarray(kernel).view(np.int32))
            add(src + "/float_add", "AddV2", [src + "/float_bits", "float_kernels/zero"], T=i32)
            add(src + "/float_kernel", "Bitcast", [src + "/float_add"], T=i32, type=f32)
            nodes[src + "/float_kernel"] = gd.node[-1]
        node.input[1] = src + "/float_kernel"
    outputs = [t.name for t in concrete.outputs]
    return compat.prune_graph_def(gd, placeholders[0] + ":0", outputs), kept


def _fold_opaque_constants(flat: bytes) -> bytes:
    """The converted model with every float32 tensor hidden from the quantiser as int32 bits
    (``_float_kernels``, the front end's ``runtime_matrices``) stored as a constant again.

    The quantiser is done by now; left as ADD(int32 bits, input-derived 0) → BITCAST (→ the
    TRANSPOSE / RESHAPE the converter adds for kernel layouts), those kernels are computed
    on every invoke and XNNPACK does not accelerate convolutions / matmuls whose weights are
    not constant (dynamic ran ~2x slower than float32). The chain is evaluated here — bit for
    bit the same values — and its ops, the zero's ops and the int32 copies are dropped."""
    fb = compat.tflite_schema()
    model = compat.read_tflite_model(flat)
    ops_by_name = fb.BuiltinOperator
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    if ops_by_name.BITCAST not in codes:
        return flat

    def data(sg, t):
        b = sg.tensors[t].buffer
        raw = model.buffers[b].data if b > 0 else None
        return None if raw is None or len(raw) == 0 else np.asarray(raw, np.uint8)

    changed = False
    for sg in model.subgraphs:
        ops = sg.operators
        producer = {t: op for op in ops for t in op.outputs}
        consumers: dict[int, list] = {}
        for op in ops:
            for t in op.inputs:
                consumers.setdefault(t, []).append(op)
        drop = set()
        for bitcast in [op for op in ops if codes[op.opcodeIndex] == ops_by_name.BITCAST]:
            add = producer.get(bitcast.inputs[0])
            if add is None or codes[add.opcodeIndex] != ops_by_name.ADD:
                continue
            bits = [t for t in add.inputs if data(sg, t) is not None
                    and sg.tensors[t].type == fb.TensorType.INT32]
            zero = [producer.get(t) for t in add.inputs if t not in bits]
            if len(bits) != 1 or len(zero) != 1 or zero[0] is None \
                    or codes[zero[0].opcodeIndex] != ops_by_name.CAST:
                continue
            value = data(sg, bits[0]).view(np.float32).reshape(sg.tensors[bits[0]].shape)
            value, chain, t = _layout_chain(fb, sg, codes, consumers, data, bitcast, value)
            chain.append(add)
            if list(value.shape) != list(sg.tensors[t].shape) \
                    or sg.tensors[t].type != fb.TensorType.FLOAT32:
                continue
            buf = fb.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(value, np.float32).tobytes(), np.uint8)
            model.buffers.append(buf)
            sg.tensors[t].buffer = len(model.buffers) - 1
            drop.update(id(op) for op in chain)
        if not drop:
            continue
        changed = True
        sg.operators = [op for op in ops if id(op) not in drop]
        _drop_dead_ops(sg)      # the zero's ABS / MINIMUM / SUM / CAST
    if not changed:
        return flat
    _release_unused_buffers(model)
    return compat.write_tflite_model(model)


def _layout_chain(fb, sg, codes, consumers, data, bitcast, value: np.ndarray):
    """Follow BITCAST → the converter's TRANSPOSE / RESHAPE ops (each the only consumer),
    applying them to ``value``: (final value, the chain's ops, the chain's output tensor)."""
    ops_by_name = fb.BuiltinOperator
    chain, t = [bitcast], bitcast.outputs[0]
    while len(consumers.get(t, [])) == 1 and t not in sg.outputs:
        nxt = consumers[t][0]
        code = codes[nxt.opcodeIndex]
        if code == ops_by_name.TRANSPOSE and data(sg, nxt.inputs[1]) is not None:
            perm = data(sg, nxt.inputs[1]).view(
                np.int64 if sg.tensors[nxt.inputs[1]].type == fb.TensorType.INT64
                else np.int32)
            value = np.transpose(value, perm)
        elif code == ops_by_name.RESHAPE:
            value = value.reshape(sg.tensors[nxt.outputs[0]].shape)
        else:
            break
        chain.append(nxt)
        t = nxt.outputs[0]
    return value, chain, t


def _drop_dead_ops(sg) -> None:
    """Remove ops none of whose outputs is used, until none is left."""
    while True:
        used = {t for op in sg.operators for t in op.inputs} | set(sg.outputs)
        dead = [op for op in sg.operators if not any(t in used for t in op.outputs)]
        if not dead:
            return
        sg.operators = [op for op in sg.operators if op not in dead]


def _release_unused_buffers(model) -> None:
    """Empty the buffers no live tensor reads any more (e.g. the int32 copies)."""
    live = {sg.tensors[t].buffer for sg in model.subgraphs
            for t in ({t for op in sg.operators for t in op.inputs if t >= 0}
                      | set(sg.inputs) | set(sg.outputs))}
    for sg in model.subgraphs:
        for tensor in sg.tensors:
            if tensor.buffer not in live and tensor.buffer > 0:
                model.buffers[tensor.buffer].data = None


def _opaque_to_quantizer(x: tf.Tensor) -> tf.Tensor:
    """``x`` unchanged, through an int32 bitcast the int8 quantiser cannot see through (it
    would otherwise quantise the model input itself to int8 — 8-bit audio — for the first
    slicing op)."""
    zero = tf.cast(tf.reduce_sum(tf.minimum(tf.abs(x[:, :1]), 0.0)), tf.int32)  # 0, from x
    return tf.bitcast(tf.bitcast(x, tf.int32) + zero, tf.float32)


def _frontend_tensor_names(float_flat: bytes) -> list[str]:
    """Names of the tensors a float ``.tflite`` computes before its first convolution (the
    front end of Sec. II-C), for the int8 quantiser's node denylist."""
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=float_flat)
    names = []
    for op_name, outputs in compat.tflite_ops(it):
        if op_name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            break
        names += outputs
    return names


def _scores_bounded(model: keras.Model, clip_scores: bool) -> bool:
    """Whether the exported scores lie in [0, 1]: clipped, softmax (``--loss=ce``), or
    sigmoid of a single head (several heads are summed with learned weights)."""
    from psla_tf.export import _members
    from psla_tf.models.pooling import MultiHeadAttentionPooling
    if clip_scores:
        return True
    for m in _members(model):
        if any(layer.name == "single_label" for layer in m.layers):
            continue
        if any(isinstance(layer, MultiHeadAttentionPooling)
               for layer in m.get_layer("classifier").layers):
            return False
    return True


def _append_associated_files(flat: bytes, files: dict[str, str]) -> bytes:
    """Pack ``files`` as an uncompressed zip after the flatbuffer, offsets counted from the
    start of the file (as TFLite Support's metadata populator writes it; interpreters
    ignore trailing bytes; the zip's central directory is found from the end)."""
    import io
    buf = io.BytesIO(bytes(flat))
    buf.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_STORED) as z:   # not a zip yet: appends
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


def read_embedded_labels(path: str) -> tuple[list[str], dict]:
    """(label names, psla_tf metadata) packed into a ``.tflite`` by export_tflite."""
    with zipfile.ZipFile(path) as z:
        names = z.read("labels.txt").decode("utf-8").splitlines()
        meta = json.loads(z.read("psla_tf.json").decode("utf-8"))
    return names, meta


class TFLiteTagger:
    """A ``.tflite`` written by export_tflite, run with the LiteRT interpreter
    (``ai_edge_litert``), or ``tf.lite.Interpreter`` with ``runtime="tf"``."""

    def __init__(self, path: str, num_threads: int = 1, runtime: str = "litert"):
        if runtime == "litert":
            from ai_edge_litert.interpreter import Interpreter
        elif runtime == "tf":
            Interpreter = tf.lite.Interpreter
        else:
            raise ValueError(f"runtime must be 'litert' or 'tf', got {runtime!r}")
        self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self.input_samples = int(self._in["shape"][-1])

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        """``waveform [S]`` or ``[1, S]`` float32 (cut / zero-padded to the input length)
        → scores ``[C]``."""
        w = np.asarray(waveform, np.float32).reshape(-1)[:self.input_samples]
        x = np.zeros([1, self.input_samples], np.float32)
        x[0, :w.size] = w
        self.interpreter.set_tensor(self._in["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._out["index"])[0].copy()

    def latency(self, repeats: int = 10) -> float:
        """Median seconds per invoke on a fixed input (after one warm-up run)."""
        x = np.zeros([1, self.input_samples], np.float32)
        self(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            self.interpreter.set_tensor(self._in["index"], x)
            self.interpreter.invoke()
            times.append(time.perf_counter() - t)
        return float(np.median(times))


def compare_with_keras(model: keras.Model, tflite_path: str, pattern: str,
                       limit: int | None = None, batch_size: int = 16,
                       progress: Callable[[int], None] | None = None) -> dict:
    """Scores of the ``.tflite`` (run by LiteRT) against the Keras model's float32 export
    graph on the clips of the TFRecord shards ``pattern`` — each cut / zero-padded to the
    model's input length, as a caller of the ``.tflite`` feeds it: the largest, mean and 99th
    percentile absolute score difference, and both models' mAP on the clips' labels (the
    issue's checks: 1e-4 float32, 1e-2 float16 / dynamic, mAP within 0.01 for int8)."""
    from psla_tf import metrics
    from psla_tf.data import records
    meta = json.loads(open(os.path.splitext(tflite_path)[0] + ".json").read())
    n_in = int(meta["input_samples"])
    spec = ExportSpec(int(meta["clip_samples"]), bool(meta["windowed"]), int(meta["window"]),
                      int(meta["hop"]))
    scorer = ScoringModel(model, bool(meta["clip_scores"]))
    if scorer.num_classes != int(meta["num_classes"]):
        raise ExportError(f"{tflite_path} has {meta['num_classes']} classes, the model "
                          f"{scorer.num_classes}")
    tagger = TFLiteTagger(tflite_path)
    keras_fn = tf.function(lambda w: serve(scorer, spec, w, tf.fill([tf.shape(w)[0]], n_in))[0])
    data = records.load_data_spec(pattern)
    if data.num_classes != scorer.num_classes:
        raise ExportError(f"{pattern} has {data.num_classes} classes, the model "
                          f"{scorer.num_classes}")
    waves, targets, got, ref = [], [], [], []

    def flush():
        if waves:
            ref.append(keras_fn(np.stack(waves)).numpy())
            waves.clear()
    for i, ex in enumerate(records.iter_examples(data.files, data.compression)):
        if limit is not None and i >= limit:
            break
        w = ex["waveform_int16"].astype(np.float32)[:n_in] / 32768.0
        x = np.zeros(n_in, np.float32)
        x[:w.size] = w
        got.append(tagger(x))
        waves.append(x)
        t = np.zeros(scorer.num_classes, np.float32)
        t[ex["labels"]] = 1.0
        targets.append(t)
        if len(waves) == batch_size:
            flush()
        if progress:
            progress(i)
    flush()
    if not got:
        raise ExportError(f"no clips in {pattern!r}")
    got, ref, targets = np.stack(got), np.concatenate(ref), np.stack(targets)
    d = np.abs(got - ref)
    out = {"tflite": tflite_path, "quantize": meta["quantize"], "data": pattern,
           "clips": len(got), "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
           "p99_abs_diff": float(np.percentile(d, 99))}
    if targets.sum(0).min() > 0 or targets.sum(0).max() > 0:
        k, t = metrics.evaluate(targets, ref)["mAP"], metrics.evaluate(targets, got)["mAP"]
        out.update(keras_mAP=float(k), tflite_mAP=float(t), mAP_diff=float(t - k))
    return out
