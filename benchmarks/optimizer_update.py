"""TorchAdam's two update forms side by side: the fused ``ResourceApplyAdam`` per variable
(the default) and the op-by-op form (``TorchAdam(fused=False)``, ~30 graph ops per variable). Each form runs in a fresh process pinned to the same cores; reported: the first
``train_on_batch`` (trace + Grappler + first step) and the median of the next steps.

    python benchmarks/optimizer_update.py --eff_b=0 --batch_size=32 --target_length=300
    python benchmarks/optimizer_update.py --eff_b=2 --batch_size=8 --target_length=1056 \\
        --num_classes=527

Prints one JSON line per form and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(form: str, eff_b: int, batch_size: int, target_length: int, num_classes: int,
            steps: int) -> dict:
    """Build B``eff_b`` + 4 heads, compile with TorchAdam in ``form``, time train_on_batch."""
    import keras
    import numpy as np

    from psla_tf.data.pipeline import clip_samples_for_frames
    from psla_tf.models.tagger import build_tagger
    from psla_tf.training import optim
    keras.utils.set_random_seed(0)
    model = build_tagger(num_classes, eff_b=eff_b, att_head=4, target_length=target_length,
                         freqm=0, timem=0)
    opt = optim.TorchAdam(1e-4, fused=form == "fused")
    model.compile(optimizer=opt, loss=optim.psla_bce)
    n = clip_samples_for_frames(target_length)
    rng = np.random.default_rng(0)
    x = {"waveform": (0.1 * rng.standard_normal((batch_size, n))).astype("float32"),
         "num_samples": np.full([batch_size], n, "int32")}
    y = (rng.random((batch_size, num_classes)) < 0.1).astype("float32")
    t0 = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    return {"form": form, "first_call_s": round(first, 2),
            "step_s": round(float(np.median(times)), 3), "steps": steps,
            "variables": len(model.trainable_variables)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eff_b", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--target_length", type=int, default=300)
    p.add_argument("--num_classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--child", choices=("fused", "ops"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(measure(a.child, a.eff_b, a.batch_size, a.target_length,
                                             a.num_classes, a.steps)), flush=True)
        return
    rows = {}
    for form in ("ops", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), f"--child={form}",
               *[f"--{k}={getattr(a, k)}" for k in
                 ("eff_b", "batch_size", "target_length", "num_classes", "steps")]]
        out = subprocess.run(cmd, capture_output=True, text=True,
                             preexec_fn=lambda: os.sched_setaffinity(0, range(a.cores)))
        line = next((s for s in out.stdout.splitlines() if s.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"error: the {form} run failed:\n{out.stderr[-3000:]}")
        rows[form] = json.loads(line[len("RESULT "):])
        print(json.dumps(rows[form]))
    load = os.getloadavg()[0]
    print(f"fused / op-by-op: first call {rows['fused']['first_call_s'] / rows['ops']['first_call_s']:.2f}x, "
          f"step {rows['fused']['step_s'] / rows['ops']['step_s']:.2f}x "
          f"(B{a.eff_b} + 4 heads, batch {a.batch_size}, {a.target_length} frames, "
          f"{a.cores} cores, 1-min load {load:.2f} at the end)")


if __name__ == "__main__":
    main()
