"""tf.data autotuning on vs off: the per-clip fbank map alone, and the whole training pipeline.

Each measurement runs in a fresh Python process (a new tf.data runtime), the two settings
alternating, so the process-to-process spread falls on both alike:

* ``map``: one 10-s clip repeated, ``map(kaldi_fbank, num_parallel_calls=2)``, batch 32;
  clips/s over ``--clips`` clips of a fresh iterator;
* ``pipeline``: ``make_train_dataset`` with fbank + masking in tf.data (the ``masking``
  variant of ``benchmarks/run.py``), batch 100, on the shards ``--data``; median clips/s of 5
  timed runs of 15 batches after 16 warm-up batches, and the process CPU time per clip.

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


def child(kind: str, autotune: bool, data: str, clips: int) -> dict:
    import numpy as np
    import tensorflow as tf
    from psla_tf import features
    opts = tf.data.Options()
    opts.autotune.enabled = autotune
    if kind == "map":
        x = tf.constant(np.random.default_rng(0).standard_normal(160_000).astype(np.float32))
        ds = tf.data.Dataset.from_tensors(0.1 * x).repeat(clips).map(
            lambda a: features.kaldi_fbank(a[tf.newaxis])[0], num_parallel_calls=2).batch(32)
        ds = ds.with_options(opts)
        t = time.perf_counter()
        for _ in ds:
            pass
        return {"clips_per_s": clips / (time.perf_counter() - t)}
    from psla_tf.data import pipeline
    from psla_tf.models.frontend import AudioFrontend
    frontend = AudioFrontend(1056, freqm=48, timem=192, seed=0)
    ds = pipeline.make_train_dataset(
        data, batch_size=100, clip_samples=pipeline.clip_samples_for_frames(1056),
        mixup=0.5, seed=0, num_epochs=10_000, features_in_pipeline=True,
        frontend=lambda w, n: frontend(w, n, training=True)).with_options(opts)
    it = iter(ds)
    for _ in range(16):
        next(it)
    runs, cpu = [], time.process_time()
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(15):
            next(it)
        runs.append(1500 / (time.perf_counter() - t))
    return {"clips_per_s": statistics.median(runs),
            "cpu_ms_per_clip": 1000 * (time.process_time() - cpu) / 7500}


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
        print(json.dumps(child(args.child, bool(args.autotune), args.data, args.clips)),
              flush=True)
        os._exit(0)   # no teardown of the endless iterator (it can stall: benchmarks/run.py)
    got: dict[str, list[float]] = {}
    for kind in args.kinds.split(","):
        for _ in range(args.pairs):
            for autotune in (1, 0):
                out = subprocess.run(
                    [sys.executable, __file__, f"--child={kind}", f"--autotune={autotune}",
                     f"--data={args.data}", f"--clips={args.clips}"],
                    capture_output=True, text=True, timeout=600, check=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                row.update(kind=kind, autotune=bool(autotune))
                print(json.dumps(row), flush=True)
                got.setdefault(f"{kind}_autotune_{'on' if autotune else 'off'}", []).append(
                    row["clips_per_s"])
    print(json.dumps({k: round(statistics.median(v), 1) for k, v in got.items()}))


if __name__ == "__main__":
    main()
