"""Tag audio files of any length, format, sample rate and channel count with a trained model.

Each file is streamed (bounded memory), mixed to mono, resampled to the model's sample rate
(16 kHz) and cut into windows of --window_seconds (default: the model's input length) every
--hop_seconds (default: half a window; the last window may be shorter); windows are scored
in batches and pooled to clip level by max (or mean). Prints the clip-level top-k with class
names and, per window, its top labels with start/end times; --json for machines;
--frame_level writes each file's attention time series (paper Fig. 2) for localisation.

Examples:
  python tools/infer.py --model=exp/full recording.flac
  python tools/infer.py --model=exp/full --top_k=5 --json long_meeting.wav > tags.json
  python tools/infer.py --model=serving/psla --frame_level --frame_dir=frames a.wav b.ogg

Exit status: 0 every file tagged; 1 some files could not be tagged (unreadable, too short,
NaN/Inf samples: one ``error:`` line each, the others are tagged); 2 a user error (a missing
file, a bad model or flag: one ``error:`` line, nothing tagged).
"""
import json
import os
import sys

from absl import flags

from psla_tf import cli
from psla_tf.cli.paths import AUDIO, LABEL_CSV, MODEL, OUT_DIR, POSITIONAL, PathFlag

FLAGS = flags.FLAGS
flags.DEFINE_string("model", os.environ.get("PSLA_MODEL"), "A .keras file, a training run's "
                    "folder, an epoch checkpoint of a run, or an exported SavedModel folder "
                    "(default: $PSLA_MODEL).")
flags.DEFINE_string("label_csv", None, "Class map of a Keras model without a labels.csv.")
flags.DEFINE_integer("top_k", 10, "Clip-level labels printed per file.", lower_bound=1)
flags.DEFINE_integer("window_top_k", 3, "Labels printed per window.", lower_bound=0)
flags.DEFINE_float("window_seconds", None, "Window length in seconds (default: the model's "
                   "input length, e.g. 10.58 s for AudioSet's 1056 frames; at most that).")
flags.DEFINE_float("hop_seconds", None, "Seconds between window starts (default: half the "
                   "window).")
flags.DEFINE_enum("pooling", "max", ["max", "mean"], "Clip-level pooling of window scores.")
flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.", lower_bound=1)
flags.DEFINE_bool("json", False, "Print one JSON document (files, windows, errors) instead "
                  "of text.")
flags.DEFINE_bool("frame_level", False, "Write per file {frame_dir}/{name}.frames.npz: "
                  "attention and frame_scores [windows, heads, frames, classes] with window "
                  "and frame start/end times (Keras models only).")
flags.DEFINE_string("frame_dir", "frame_level", "Folder for --frame_level output.")
PATHS = {POSITIONAL: PathFlag(AUDIO, many=True), "model": PathFlag(MODEL),
         "label_csv": PathFlag(LABEL_CSV)}


def _labels(scores, mids, names, k):
    import numpy as np
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"mid": mids[i], "name": names[i], "score": round(float(scores[i]), 6)}
            for i in order]


_USED = set()


def _frame_path(path, out_dir):
    """``{out_dir}/{name}.frames.npz``; ``{name}_2`` etc. when two inputs share a name."""
    base = os.path.splitext(os.path.basename(path))[0]
    out, i = os.path.join(out_dir, f"{base}.frames.npz"), 1
    while out in _USED:
        i += 1
        out = os.path.join(out_dir, f"{base}_{i}.frames.npz")
    _USED.add(out)
    return out


def main(argv: list[str] | None = None):
    """psla-infer (see the module doc); ``main()`` parses sys.argv."""
    if argv is None:
        cli.run(main)
    files = argv[1:]
    from psla_tf import inference
    from psla_tf.data.records import DataError
    from psla_tf.scoring import load_scorer
    if not files:
        raise DataError("give one or more audio files: infer.py --model=M AUDIO...")
    if not FLAGS.model:
        raise DataError("--model is required (or set $PSLA_MODEL)")
    if (FLAGS.hop_seconds is not None and FLAGS.hop_seconds <= 0) or FLAGS.top_k < 1 \
            or FLAGS.batch_size < 1 or FLAGS.window_top_k < 0:
        raise DataError("--hop_seconds must be > 0, --top_k and --batch_size >= 1, "
                        "--window_top_k >= 0")
    if FLAGS.window_seconds is not None and FLAGS.window_seconds <= 0:
        raise DataError("--window_seconds must be > 0")
    if FLAGS.frame_level:
        from psla_tf.cli.paths import check_output
        check_output("frame_dir", PathFlag(OUT_DIR, overwrite="merge"), FLAGS.frame_dir)
    scorer = load_scorer(FLAGS.model, FLAGS.label_csv)
    # the model's own input length unless --window_seconds is given
    window_seconds = (FLAGS.window_seconds if FLAGS.window_seconds is not None
                      else scorer.clip_samples / scorer.sample_rate)
    hop_seconds = FLAGS.hop_seconds if FLAGS.hop_seconds is not None else window_seconds / 2
    try:
        inference.window_samples(scorer, window_seconds)
    except ValueError as e:
        raise DataError(f"--window_seconds: {e}") from None
    frame_fn = None
    if FLAGS.frame_level:
        if scorer.kind != "keras":
            raise DataError("--frame_level needs a Keras model (.keras / run folder / "
                            "checkpoint), not an exported SavedModel")
        frame_fn = scorer.frame_level
    from tqdm import tqdm
    out, errors = [], []
    for path in tqdm(files, desc="files", unit="file", file=sys.stderr,
                     disable=len(files) < 2):
        writer = None if frame_fn is None else inference.FrameLevelWriter(
            frame_fn, _frame_path(path, FLAGS.frame_dir), scorer.target_length * 0.01,
            scorer.mids, scorer.names)
        try:
            r = inference.tag_file(scorer, path, window_seconds=window_seconds,
                                   hop_seconds=hop_seconds, batch_size=FLAGS.batch_size,
                                   pooling=FLAGS.pooling, sample_rate=scorer.sample_rate,
                                   frame_fn=writer)
        except (inference.AudioError, NotImplementedError) as e:
            if writer is not None:
                writer.abort()
            errors.append({"path": path, "error": str(e)})
            print(f"error: {cli.one_line(e)}", file=sys.stderr)
            continue
        entry = {"path": path, "duration": round(r.duration, 4),
                 "num_windows": len(r.windows), "pooling": FLAGS.pooling,
                 "clip": _labels(r.clip_scores, scorer.mids, scorer.names, FLAGS.top_k),
                 "windows": [{"start": round(w.start, 4), "end": round(w.end, 4),
                              "top": _labels(w.scores, scorer.mids, scorer.names,
                                             FLAGS.window_top_k)} for w in r.windows]}
        if writer is not None:
            entry["frame_level"] = writer.finish(r.windows)
        out.append(entry)
        if not FLAGS.json:
            _print_text(entry)
    if FLAGS.json:
        json.dump({"model": FLAGS.model, "window_seconds": window_seconds,
                   "hop_seconds": hop_seconds, "files": out, "errors": errors},
                  sys.stdout, indent=1)
        print()
    return 1 if errors else 0  # 1: some files could not be tagged (one error line each)


def _print_text(e):
    print(f"{e['path']}  ({e['duration']:.2f} s, {e['num_windows']} windows, "
          f"{e['pooling']} pooling)")
    for lab in e["clip"]:
        print(f"  {lab['score']:.4f}  {lab['name']}")
    for w in e["windows"]:
        tops = ", ".join(f"{lab['name']} {lab['score']:.3f}" for lab in w["top"])
        print(f"    {w['start']:8.2f}-{w['end']:8.2f} s  {tops}")
    if "frame_level" in e:
        print(f"  frame-level: {e['frame_level']}")


if __name__ == "__main__":
    main()
