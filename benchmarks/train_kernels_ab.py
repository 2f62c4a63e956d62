"""A training-kernel option on and off, side by side in one process (docs/performance.md).

    python benchmarks/train_kernels_ab.py --option=pointwise_matmul --batch_size=16 \
        --target_length=64 --num_classes=10 --eff_b=0 --steps=8 --rounds=6

Builds the tagger (EfficientNet-B``eff_b`` + 4 heads) twice, with ``--option`` (a boolean
argument of ``build_tagger``: ``pointwise_matmul``, ``fused_batchnorm`` or
``swish_saved_sigmoid``) off and on, gives both the same weights, and times
``train_on_batch`` on one fixed batch in rounds that alternate the two models (each round:
``--steps`` steps of each), so drifts in the machine's speed reach both alike. Prints the
ms per step of each round and the per-round ratio off / on (> 1: the option is faster); the
median ratio is the figure to quote.
"""
from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np

from psla_tf.models.tagger import build_tagger
from psla_tf.training.optim import TorchAdam

OPTIONS = ("pointwise_matmul", "fused_batchnorm", "swish_saved_sigmoid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--option", choices=OPTIONS, default="pointwise_matmul")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--target_length", type=int, default=64)
    ap.add_argument("--num_classes", type=int, default=10)
    ap.add_argument("--eff_b", type=int, default=0)
    ap.add_argument("--steps", type=int, default=8, help="steps per model and round")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    models = {}
    for on in (False, True):
        keras.utils.set_random_seed(0)
        m = build_tagger(args.num_classes, eff_b=args.eff_b, att_head=4,
                         target_length=args.target_length, seed=0, **{args.option: on})
        m.compile(optimizer=TorchAdam(1e-4), loss="binary_crossentropy")
        models[on] = m
    models[True].set_weights(models[False].get_weights())
    rng = np.random.default_rng(0)
    n = args.target_length * 160 + 240
    x = {"waveform": rng.uniform(-0.3, 0.3, (args.batch_size, n)).astype(np.float32),
         "num_samples": np.full((args.batch_size,), n, np.int32)}
    y = (rng.uniform(size=(args.batch_size, args.num_classes)) < 0.2).astype(np.float32)
    for m in models.values():       # trace and warm up
        for _ in range(3):
            m.train_on_batch(x, y)
    ms: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for on, m in models.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                m.train_on_batch(x, y)
            ms[on].append((time.perf_counter() - t0) / args.steps * 1e3)
    ratios = [a / b for a, b in zip(ms[False], ms[True])]
    for on in (False, True):
        print(f"{args.option}={on}: " + " ".join(f"{v:.0f}" for v in ms[on])
              + f" ms/step (median {statistics.median(ms[on]):.1f})")
    print("ratio off / on per round: " + " ".join(f"{r:.3f}" for r in ratios)
          + f" (median {statistics.median(ratios):.3f})")


if __name__ == "__main__":
    main()
