"""Export a trained tagger for deployment: a TF Serving SavedModel, a TFLite/LiteRT model (with
the TFLite Model Metadata MediaPipe's AudioClassifier reads) and/or an ONNX model, all taking
the raw 16-kHz waveform (front end included).

Examples:
  python tools/export.py --model=exp/demo --saved_model_dir=serving/psla --version=1
  python tools/export.py --model=exp/demo --tflite=psla_f16.tflite --quantize=float16
  python tools/export.py --model=exp/demo --tflite=psla_int8.tflite --quantize=int8 \\
      --calibration_data='demo_data/records/train-*.tfrecord'
  python tools/export.py --model=exp/demo --onnx=psla.onnx      # needs requirements-deploy.txt

--model is anything psla_tf.models.loading.load_tagger accepts: a .keras file (also an
ensemble from tools/ensemble.py), an experiment folder, or checkpoints/epoch_NNN.weights.h5.
"""
import os

from absl import flags

from psla_tf import cli, params  # params: constants only, no TensorFlow
from psla_tf.cli.paths import LABEL_CSV, MODEL, OUT_DIR, OUT_FILE, SHARDS, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Trained model: .keras file, experiment folder or "
                    "checkpoints/epoch_NNN.weights.h5 (required).")
flags.DEFINE_string("label_csv", None, "Vocabulary CSV index,mid,display_name (default: the "
                    "labels.csv beside the model / in its experiment folder).")
flags.DEFINE_string("saved_model_dir", None, "Write a TF Serving SavedModel to "
                    "DIR/<version>/.")
flags.DEFINE_integer("version", 1, "SavedModel version folder (TF Serving serves the highest).",
                     lower_bound=0)
flags.DEFINE_bool("overwrite", False, "Replace an existing DIR/<version>/.")
flags.DEFINE_integer("clip_samples", None, "Training input length in samples (default: the "
                     "run's --clip_samples from flags.txt, else (target_length-1)*160+400).",
                     lower_bound=400)
flags.DEFINE_bool("windowed", False, "Score inputs longer than the training length as windows "
                  "(max-pooled scores, mean-pooled embeddings), like tools/infer.py; without "
                  "it longer inputs are cut.")
flags.DEFINE_float("window_seconds", None, "--windowed: window length (default: the training "
                   "length).")
flags.DEFINE_float("hop_seconds", None, "--windowed: hop between windows (default: half a "
                   "window).")
flags.DEFINE_bool("clip_scores", False, "Clip scores to [0, 1] (with several attention heads "
                  "the weighted head sum can exceed 1).")
flags.DEFINE_string("tflite", None, "Write a TFLite/LiteRT model here, with TFLite Model "
                    "Metadata (MediaPipe's AudioClassifier loads it; + OUT.labels.txt and "
                    "OUT.json beside it).")
flags.DEFINE_enum("quantize", "none", ["none", "float16", "dynamic", "int8"],
                  "TFLite quantisation: none (float32), float16 weights, dynamic (int8 weights), "
                  "int8 (full integer, needs --calibration_data).")
flags.DEFINE_float("tflite_seconds", None, "TFLite fixed input length in seconds (default: "
                   "the model's input length; with --windowed at least 10 s).")
flags.DEFINE_string("calibration_data", None, "int8: TFRecord shard glob of representative "
                    "clips (e.g. the training set).")
flags.DEFINE_integer("calibration_size", 100, "int8: number of calibration clips.", lower_bound=1)
flags.DEFINE_integer("float_kernel_elements", params.DYNAMIC_FLOAT_MAX_ELEMENTS, "dynamic: kernels with fewer weights stay "
                     "float32 (the early, small layers, where int8 weights cost the most "
                     "accuracy per byte saved; 0: only the depthwise kernels stay float). "
                     "Larger: more accurate and larger (docs/deployment.md).", lower_bound=0)
flags.DEFINE_integer("benchmark", 0, "After writing --tflite: time this many invocations on one "
                     "input with the LiteRT runtime at 1 and 2 threads and print the median "
                     "latency (0: skip).", lower_bound=0)
flags.DEFINE_string("compare_data", None, "After writing --tflite: score these TFRecord "
                    "shards (glob) with the .tflite and the Keras model; print the score "
                    "differences and both mAPs, and write them to OUT.compare.json.")
flags.DEFINE_integer("compare_size", None, "--compare_data: at most this many clips "
                     "(default: all).", lower_bound=1)
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar during int8 calibration.")
flags.DEFINE_string("onnx", None, "Write an ONNX model here (waveform [batch, samples] in, "
                    "scores [batch, C] out; + OUT.labels.txt and OUT.json beside it). Needs "
                    "tf2onnx and onnx (requirements-deploy.txt).")
flags.DEFINE_integer("onnx_opset", 17, "ONNX opset of --onnx (13-18).")
flags.DEFINE_string("model_name", None, "Model name in the TFLite Model Metadata / ONNX "
                    "metadata (default: 'psla_tf audio tagger').")
flags.DEFINE_string("model_description", None, "Model description in the metadata (default: "
                    "input, output and precision, generated).")
flags.DEFINE_string("model_version", "1", "Model version in the metadata.")
flags.DEFINE_string("model_license", "unspecified (set with tools/export.py --model_license)",
                    "Licence of the model, written into the metadata (e.g. 'CC-BY-4.0', as "
                    "your training data allows).")
flags.DEFINE_string("model_author", "psla_tf", "Author in the metadata.")

PATHS = {"model": PathFlag(MODEL), "label_csv": PathFlag(LABEL_CSV),
         "calibration_data": PathFlag(SHARDS, many=True),
         "compare_data": PathFlag(SHARDS, many=True),
         "saved_model_dir": PathFlag(OUT_DIR, overwrite="refuse"),
         "tflite": PathFlag(OUT_FILE), "onnx": PathFlag(OUT_FILE)}


def _clip_samples(model_path: str) -> int | None:
    """--clip_samples, else the run's (its flags.txt beside the model or one folder up)."""
    from psla_tf import config, run_folder
    if FLAGS.clip_samples:
        return FLAGS.clip_samples
    d = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    for cand in (d, os.path.dirname(d)):
        f = os.path.join(cand, run_folder.FLAGS_FILE)
        if os.path.exists(f):
            return config.config_from_flagfile(f).clip_samples
    return None


def check_flags() -> None:
    """The flag errors that need no file (before the paths are checked)."""
    from psla_tf.errors import DataError
    if not FLAGS.model:
        raise DataError("--model is required")
    if not FLAGS.saved_model_dir and not FLAGS.tflite and not FLAGS.onnx:
        raise DataError("nothing to do: give --saved_model_dir, --tflite and/or --onnx")
    if FLAGS.onnx and not 13 <= FLAGS.onnx_opset <= 18:
        raise DataError(f"--onnx_opset must be in 13..18, got {FLAGS.onnx_opset}")
    if FLAGS.quantize == "int8" and FLAGS.tflite and not FLAGS.calibration_data:
        raise DataError("--quantize=int8 needs --calibration_data (a TFRecord shard glob)")
    if (FLAGS.tflite_seconds is not None
            and FLAGS.tflite_seconds * params.SAMPLE_RATE < params.FRAME_LENGTH):
        raise DataError("--tflite_seconds must be at least 0.025 (one 25-ms frame)")
    for name in ("window_seconds", "hop_seconds"):
        v = getattr(FLAGS, name)
        if v is not None and v <= 0:
            raise DataError(f"--{name} must be positive")
    if FLAGS.saved_model_dir and not FLAGS.overwrite:
        out = os.path.join(FLAGS.saved_model_dir, str(FLAGS.version))
        if os.path.exists(out):
            raise DataError(f"{out} already exists (choose another --version or --overwrite)")


def _bar(desc: str, total: int | None):
    """A tqdm bar with --progress, else None."""
    if not FLAGS.progress:
        return None
    from tqdm import tqdm
    return tqdm(desc=desc, unit="clip", total=total)


def _tflite_seconds(model, clip_samples: int | None) -> float:
    """The TFLite input length: --tflite_seconds, else the model's own input length (at
    least AudioSet's 10 s with --windowed)."""
    from psla_tf import export
    if FLAGS.tflite_seconds is not None:
        return FLAGS.tflite_seconds
    seconds = (clip_samples or export.default_clip_samples(model)) / params.SAMPLE_RATE
    return max(seconds, 10.0) if FLAGS.windowed else seconds


def _write_tflite(model, mids, names, seconds: float, info: dict, kw: dict) -> None:
    """--tflite (with int8 calibration), then --benchmark and --compare_data."""
    from psla_tf import export_tflite
    calibration, bar = None, None
    if FLAGS.quantize == "int8":
        calibration = export_tflite.calibration_clips(
            FLAGS.calibration_data, int(round(seconds * params.SAMPLE_RATE)),
            FLAGS.calibration_size)
        bar = _bar("calibration", len(calibration))
    meta = export_tflite.export_tflite(
        model, FLAGS.tflite, mids, names, quantize=FLAGS.quantize,
        seconds=seconds, calibration=calibration,
        float_kernel_elements=FLAGS.float_kernel_elements,
        progress=(lambda i: bar.update(1)) if bar is not None else None, model_info=info, **kw)
    if bar is not None:
        bar.close()
    print(f"TFLite ({FLAGS.quantize}): {FLAGS.tflite} ({meta['size_bytes']} bytes, "
          f"input {meta['input_samples']} samples)")
    if FLAGS.benchmark > 0:
        for threads in (1, 2):
            t = export_tflite.TFLiteTagger(FLAGS.tflite, num_threads=threads).latency(
                FLAGS.benchmark)
            print(f"latency ({threads} thread{'s' if threads > 1 else ''}): "
                  f"{t * 1000:.1f} ms per {seconds:g}-s input")
    if FLAGS.compare_data:
        _compare_tflite(model)


def _compare_tflite(model) -> None:
    """--compare_data: the TFLite file's scores against Keras', written beside the file."""
    from psla_tf import atomic, export_tflite
    bar = _bar("compare", FLAGS.compare_size)
    res = export_tflite.compare_with_keras(
        model, FLAGS.tflite, FLAGS.compare_data, limit=FLAGS.compare_size,
        progress=(lambda i: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    path = os.path.splitext(FLAGS.tflite)[0] + ".compare.json"
    atomic.write_json(path, res, indent=1)
    line = (f"vs Keras on {res['clips']} clips: max |d| {res['max_abs_diff']:.2e}, "
            f"mean {res['mean_abs_diff']:.2e}, p99 {res['p99_abs_diff']:.2e}")
    if "mAP_diff" in res:
        line += (f"; mAP Keras {res['keras_mAP']:.4f}, TFLite "
                 f"{res['tflite_mAP']:.4f} ({res['mAP_diff']:+.4f})")
    print(line + f"  [{path}]")


def main(argv: list[str] | None = None):
    """psla-export (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    del argv
    from psla_tf import export
    from psla_tf.models import loading
    check_flags()
    mids, names = loading.load_vocabulary(FLAGS.model, FLAGS.label_csv)
    model = loading.load_tagger(FLAGS.model)
    clip_samples = _clip_samples(FLAGS.model)
    kw = dict(clip_samples=clip_samples, windowed=FLAGS.windowed,
              window=int(round((FLAGS.window_seconds or 0) * params.SAMPLE_RATE)),
              hop=int(round((FLAGS.hop_seconds or 0) * params.SAMPLE_RATE)),
              clip_scores=FLAGS.clip_scores)
    info = dict(name=FLAGS.model_name or "", description=FLAGS.model_description or "",
                version=FLAGS.model_version or "", license=FLAGS.model_license or "",
                author=FLAGS.model_author or "")
    if FLAGS.saved_model_dir:
        out = export.export_saved_model(model, FLAGS.saved_model_dir, mids, names,
                                        version=FLAGS.version, overwrite=FLAGS.overwrite,
                                        **kw)
        print(f"SavedModel: {out}")
    if FLAGS.tflite:
        _write_tflite(model, mids, names, _tflite_seconds(model, clip_samples), info, kw)
    if FLAGS.onnx:
        from psla_tf import export_onnx
        meta = export_onnx.export_onnx(model, FLAGS.onnx, mids, names,
                                       opset=FLAGS.onnx_opset, model_info=info, **kw)
        print(f"ONNX (opset {meta['opset']}): {FLAGS.onnx} ({meta['size_bytes']} bytes, "
              "input waveform [batch, samples])")


if __name__ == "__main__":
    main()
