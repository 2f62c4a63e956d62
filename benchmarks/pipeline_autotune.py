"""tf.data autotuning on vs off: the per-clip fbank map alone, and the whole training pipeline.

Each measurement runs in a fresh Python process (a new tf.data runtime), the two settings
alternating, so the process-to-process spread falls on both alike:

* ``map``: one 10-s clip repeated, ``map(kaldi_fbank, num_parallel_calls=2)``, batch 32;
  clips/s over ``--clips`` clips of a fresh iterator;
* ``pipeline``: ``benchmarks/run.py``'s ``masking`` pipeline child (fbank + masking in
  tf.data, batch 100, pinned to 2 cores) on the shards ``--data``; median clips/s of 5 timed
  runs of 15 batches after warm-up, and the process CPU time per clip.

    python benchmarks/pipeline_autotune.py --data='bench_out/data_1000/train-*.tfrecord' \
        --pairs=5

(``bench_out/data_1000`` is written by ``python benchmarks/run.py --sections=pipeline``.)
Prints one JSON line per measurement, then one with the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")


def map_child(autotune: bool, clips: int) -> dict:
    """clips/s of the bare per-clip fbank map (in this process)."""
    import numpy as np
    import tensorflow as tf
    from psla_tf import features
    opts = tf.data.Options()
    opts.autotune.enabled = autotune
    x = tf.constant(np.random.default_rng(0).standard_normal(160_000).astype(np.float32))
    ds = tf.data.Dataset.from_tensors(0.1 * x).repeat(clips).map(
        lambda a: features.kaldi_fbank(a[tf.newaxis])[0], num_parallel_calls=2).batch(32)
    ds = ds.with_options(opts)
    t = time.perf_counter()
    for _ in ds:
        pass
    return {"clips_per_s": clips / (time.perf_counter() - t)}


def measure(kind: str, autotune: bool, data: str, clips: int) -> dict:
    """One measurement in a fresh process: this script's map child, or run.py's pipeline
    child (the ``masking`` variant)."""
    if kind == "map":
        cmd = [sys.executable, __file__, "--child=map", f"--autotune={int(autotune)}",
               f"--clips={clips}"]
    else:
        spec = {"kind": "pipeline", "variant": "masking", "glob": data, "batch": 100,
                "repeats": 5, "warmup_repeats": 1, "batches_per_repeat": 15, "cores": 2,
                "autotune": autotune}
        cmd = [sys.executable, RUN, "--child=" + json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    r = json.loads(next(x for x in out.splitlines()[::-1] if x.startswith("RESULT "))[7:])
    return {k: r[k] for k in ("clips_per_s", "cpu_ms_per_clip") if k in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="bench_out/data_1000/train-*.tfrecord")
    ap.add_argument("--pairs", type=int, default=5, help="on/off pairs per kind")
    ap.add_argument("--kinds", default="map,pipeline")
    ap.add_argument("--clips", type=int, default=1500, help="clips per map measurement")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--autotune", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(map_child(bool(args.autotune), args.clips)), flush=True)
        os._exit(0)   # no teardown of the endless iterator (it can stall: benchmarks/run.py)
    got: dict[str, list[float]] = {}
    for kind in args.kinds.split(","):
        for _ in range(args.pairs):
            for autotune in (1, 0):
                row = measure(kind, bool(autotune), args.data, args.clips)
                row.update(kind=kind, autotune=bool(autotune))
                print(json.dumps(row), flush=True)
                got.setdefault(f"{kind}_autotune_{'on' if autotune else 'off'}", []).append(
                    row["clips_per_s"])
    print(json.dumps({k: round(statistics.median(v), 1) for k, v in got.items()}))


if __name__ == "__main__":
    main()
