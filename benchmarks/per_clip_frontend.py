"""The pipeline's per-clip front end, on the clip itself vs on the clip padded to the input.

``features_in_pipeline`` computes the fbank of each clip before batching. A 10-s clip is
160,000 samples; the 1056-frame input is 169,120. Padded first (the waveform-batch layout),
the front end copies the clip and computes 58 frames of padding that it then zeroes; on the
clip itself it pads its frames instead (``AudioFrontend``; the same log-mel values within
float32 rounding: the FFT's blocking depends on the frame count). Both
forms run as ``tf.function`` on one 10-s clip, 1 thread, in alternating rounds; reported: the
process CPU time per clip (median of rounds) and the median of the per-round ratios.

    python benchmarks/per_clip_frontend.py --rounds=7 --calls=100

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=100, help="front-end calls per form per round")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length")
    args = ap.parse_args()
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from psla_tf import params
    from psla_tf.data import pipeline
    from psla_tf.models.frontend import AudioFrontend

    frontend = AudioFrontend(params.TARGET_LENGTH, freqm=params.FREQM, timem=params.TIMEM, seed=0)
    clip_samples = pipeline.clip_samples_for_frames(params.TARGET_LENGTH)
    n = int(args.seconds * params.SAMPLE_RATE)
    x = tf.constant(np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.1)

    @tf.function
    def padded(x):
        m = tf.shape(x)[0]
        return frontend(tf.pad(x, [[0, clip_samples - m]])[tf.newaxis], m[tf.newaxis],
                        training=True)

    @tf.function
    def on_clip(x):
        return frontend(x[tf.newaxis], tf.shape(x)[0][tf.newaxis], training=True)

    no_mask = AudioFrontend(params.TARGET_LENGTH, freqm=0, timem=0)
    diff = float(np.max(np.abs(
        no_mask(tf.pad(x, [[0, clip_samples - n]])[tf.newaxis], tf.constant([n]))
        - no_mask(x[tf.newaxis], tf.constant([n])))))
    forms = {"padded": padded, "on_clip": on_clip}
    cpu: dict[str, list[float]] = {k: [] for k in forms}
    for f in forms.values():
        f(x)
    for _ in range(args.rounds):
        for name, f in forms.items():
            t = time.process_time()
            for _ in range(args.calls):
                f(x)
            cpu[name].append(1000.0 * (time.process_time() - t) / args.calls)
    ratios = [a / b for a, b in zip(cpu["padded"], cpu["on_clip"])]
    print(json.dumps({"clip_seconds": args.seconds, "cpu_ms_per_clip": {
        k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "padded_over_on_clip": round(statistics.median(ratios), 3),
        "max_abs_difference": diff}))


if __name__ == "__main__":
    main()
