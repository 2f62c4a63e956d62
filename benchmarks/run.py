"""psla_tf benchmark: one command, JSON + a markdown table written into BUILD.md.

    python benchmarks/run.py [--sections=fbank,pipeline,train,infer,rss,prepare,torch]
                             [--device=cpu|gpu] [--out=bench_out] [--write_build_md]

Every figure is clips/s of 10-s 16-kHz clips (median of ``--repeats`` timed runs after a
warm-up), measured on this machine (described in the output). Sections that need an optional
package (kaldi-native-fbank, torch/torchaudio: ``requirements-bench.txt``) are skipped with a
note when it is missing.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sections", ["fbank", "pipeline", "train", "infer", "rss", "prepare", "torch"],
                  "Which measurements to run.")
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where the model runs.")
flags.DEFINE_string("out", "bench_out", "Folder for results.json, results.md and scratch data.")
flags.DEFINE_integer("repeats", 5, "Timed runs per figure (median reported).")
flags.DEFINE_boolean("write_build_md", False, "Replace the benchmark table in BUILD.md.")
flags.DEFINE_integer("num_clips", 300, "10-s clips in the synthetic benchmark set.")

CLIP = 160000  # 10 s at 16 kHz
BEGIN, END = "<!-- BENCHMARK TABLE BEGIN -->", "<!-- BENCHMARK TABLE END -->"


def machine() -> dict[str, Any]:
    import tensorflow as tf
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu, "cores": os.cpu_count(), "tensorflow": tf.__version__,
            "python": platform.python_version(), "gpus": gpus}


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_fbank(results: dict, repeats: int) -> None:
    import numpy as np
    import tensorflow as tf
    from psla_tf.features import kaldi_fbank
    rng = np.random.default_rng(0)
    batch = tf.constant(rng.uniform(-0.5, 0.5, (32, CLIP)).astype(np.float32))
    rows = {}
    for dft in ("matmul", "rfft"):
        eager = lambda: kaldi_fbank(batch, dft=dft).numpy()  # noqa: E731
        fn = tf.function(lambda x: kaldi_fbank(x, dft=dft))
        xla = tf.function(lambda x: kaldi_fbank(x, dft=dft), jit_compile=True)
        rows[f"eager ({dft})"] = 32 / timed(eager, repeats)
        rows[f"tf.function ({dft})"] = 32 / timed(lambda: fn(batch).numpy(), repeats)
        rows[f"jit_compile ({dft})"] = 32 / timed(lambda: xla(batch).numpy(), repeats)
    try:
        import kaldi_native_fbank as knf
        opts = knf.FbankOptions()
        opts.frame_opts.dither = 0.0
        opts.frame_opts.window_type = "hanning"
        # Kaldi's C++ refuses 128 bins at a 512-point FFT (filter 3 would be empty, which
        # torchaudio tolerates); 80 bins is the nearest it accepts: the mel sum is a small
        # part of the cost, so the speed comparison stands.
        opts.mel_opts.num_bins = 80
        opts.mel_opts.high_freq = 0
        clip = batch[0].numpy()

        def one():
            f = knf.OnlineFbank(opts)
            f.accept_waveform(16000, clip.tolist())
            f.input_finished()
            return [f.get_frame(i) for i in range(f.num_frames_ready)]
        rows["kaldi-native-fbank (C++, 1 thread, 80 bins)"] = 1 / timed(one, repeats)
    except ImportError:
        rows["kaldi-native-fbank (C++, 1 thread, 80 bins)"] = None
    results["fbank"] = {"batch": 32, "clips_per_s": rows}


SECTIONS = {"fbank": bench_fbank}


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, TensorFlow {m['tensorflow']}, "
             f"Python {m['python']}; GPUs: {', '.join(m['gpus']) or 'none'}. "
             f"Median of {results['repeats']} runs after warm-up; 10-s clips.", "",
             "| section | configuration | clips/s |", "| --- | --- | --- |"]
    for section, body in results.items():
        if not isinstance(body, dict) or "clips_per_s" not in body:
            continue
        for name, value in body["clips_per_s"].items():
            shown = "n/a (not installed)" if value is None else f"{value:,.1f}"
            lines.append(f"| {section} | {name} | {shown} |")
    for section, body in results.items():
        if isinstance(body, dict) and "notes" in body:
            lines.append("")
            lines.append(f"{section}: {body['notes']}")
    return "\n".join(lines)


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "repeats": FLAGS.repeats}
    for name in FLAGS.sections:
        if name not in SECTIONS:
            print(f"(section {name!r} not available in this build; skipped)")
            continue
        print(f"== {name}", flush=True)
        SECTIONS[name](results, FLAGS.repeats)
        print(json.dumps(results[name], indent=1), flush=True)
    with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = to_markdown(results)
    with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if FLAGS.write_build_md:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "BUILD.md")
        text = open(path).read()
        block = f"{BEGIN}\n{table}\n{END}"
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text += "\n## Benchmarks\n\n" + block + "\n"
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)
