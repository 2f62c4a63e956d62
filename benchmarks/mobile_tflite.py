"""Size and CPU latency of every TFLite variant of the mobile recipes (issue 5, docs/deployment.md,
"Size and latency"): the architectures of configs/mobile_*.flags (random weights, 527 classes,
10-s input), each exported with psla_tf.export_tflite and run by the LiteRT interpreter.

  python benchmarks/mobile_tflite.py [--recipes=mobile_b0,mobile_mobilenetv2] [--repeats=10]

Prints a markdown table (size, median latency of one 10-s clip at 1 and 2 threads, after a
warm-up) and writes it with the raw numbers to --out. Latency does not depend on the weights;
int8 calibrates on a few random clips. Run it on a quiet machine.
"""
from __future__ import annotations

import json
import os
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

flags.DEFINE_list("recipes", ["mobile_b0", "mobile_mobilenetv2"], "configs/<name>.flags to build.")
flags.DEFINE_integer("repeats", 10, "Timed invocations per figure (the median is reported).")
flags.DEFINE_integer("num_classes", 527, "Output classes (AudioSet: 527).")
flags.DEFINE_string("out", "bench_out/mobile_tflite.json", "Where to write the results.")
FLAGS = flags.FLAGS


def _recipe_model(name: str, num_classes: int):
    """The recipe's architecture with random weights (pretrained=none: the weights do not
    change size or latency)."""
    from psla_tf.config import read_flagfile
    from psla_tf.models.tagger import build_tagger
    path = os.path.join(ROOT, "configs", f"{name}.flags")
    if not os.path.exists(path):
        raise app.UsageError(f"no recipe {path}")
    f = read_flagfile(path)
    return build_tagger(num_classes, model=f.get("model", "efficientnet"),
                        eff_b=int(f.get("eff_b", 2)), att_head=int(f.get("att_head", 4)),
                        target_length=int(f.get("target_length", 1056)), seed=0)


def main(argv):
    del argv
    import numpy as np
    from psla_tf import export_tflite as ex
    results = {}
    mids = [f"/m/{k}" for k in range(FLAGS.num_classes)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in FLAGS.recipes:
            model = _recipe_model(recipe, FLAGS.num_classes)
            calibration = [rng.uniform(-0.5, 0.5, 160000).astype(np.float32) for _ in range(8)]
            for q in ex.QUANTIZATIONS:
                path = os.path.join(tmp, f"{recipe}_{q}.tflite")
                ex.export_tflite(model, path, mids, mids, quantize=q, seconds=10.0,
                                 calibration=calibration if q == "int8" else None)
                r = {"size_mb": os.path.getsize(path) / 1e6}
                for t in (1, 2):
                    r[f"ms_{t}_thread"] = 1000 * ex.TFLiteTagger(path, num_threads=t).latency(
                        FLAGS.repeats)
                results[f"{recipe}/{q}"] = r
                print(f"{recipe:20s} {q:8s} {r['size_mb']:6.1f} MB  "
                      f"{r['ms_1_thread']:6.1f} ms (1 thread)  {r['ms_2_thread']:6.1f} ms "
                      f"(2 threads)", flush=True)
    lines = ["| variant | " + " | ".join(f"{r}: size | 1 thread | 2 threads"
                                         for r in FLAGS.recipes) + " |",
             "| --- |" + " --- | --- | --- |" * len(FLAGS.recipes)]
    for q in ex.QUANTIZATIONS:
        cells = []
        for rec in FLAGS.recipes:
            r = results[f"{rec}/{q}"]
            cells += [f"{r['size_mb']:.1f} MB", f"{r['ms_1_thread']:.0f} ms",
                      f"{r['ms_2_thread']:.0f} ms"]
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as fh:
        json.dump({"results": results, "table": table}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
