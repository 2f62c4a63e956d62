"""psla_tf benchmark (issue 8): one command, JSON + a markdown table in docs/performance.md.

    python benchmarks/run.py [--sections=fbank,pipeline,train,infer,rss,prepare,torch]
                             [--device=cpu|gpu] [--cores=1,2] [--out=bench_out]
                             [--pipeline_variants=masking,...] [--torch_python=PY]
                             [--write_build_md] [--quick]

    # issue 18's two side-by-side figures on 2 cores:
    python benchmarks/run.py --sections=fbank --cores=2
    python benchmarks/run.py --sections=pipeline,torch --cores=2 --pipeline_variants=masking \
        --torch_python=/path/to/bench-venv/bin/python

Every figure is for 10-s 16-kHz clips and is the median of ``--repeats`` timed runs after
warm-up runs that are not counted. Each measurement runs in a fresh Python process pinned to
the first k CPUs (``os.sched_setaffinity``, i.e. what ``taskset -c 0-(k-1)`` does) with
TensorFlow's intra-/inter-op pools and tf.data's private thread pool set to k threads, so
"k cores" means k cores (the input pipeline's per-clip variants: k clips in parallel in a
process set up by ``psla_tf.data.pipeline.configure_input_host``, each op on one thread as
the reference's DataLoader workers run torch; ``masking_tf_defaults`` is the same pipeline
with TensorFlow's and glibc's defaults; ``masking_offsets`` reads each record at its byte
offset instead of looking it up in the records held in memory, the default for this set).
That process's peak RSS is recorded beside each figure.

Sections:

* ``fbank``    kaldi_fbank at batch 32 side by side with the plain tf.signal implementation
               (benchmarks/plain_fbank.py): the ratio, the op time per stage of both, the share
               of the machine's peak (measured matmul FLOP/s and copy bandwidth); the matmul
               DFT, the rfft path without the CPU loop, eager, jit_compile; on 1 core and on
               all ``--cores``; kaldi-native-fbank (C++) on one thread.
* ``pipeline`` the training input pipeline, batch 100, stage by stage (read → parse →
               sampling → mixup → fbank → masking) and the variants: fbank at the front of the
               model, fbank per clip before batching, fbank under XLA, rfft DFT.
* ``train``    one training step, EfficientNet-B2 + 4 heads, batch 8, 1056 frames: eager,
               tf.function, jit_compile, mixed_bfloat16 (GPU: batch 100, float32 and
               mixed_float16), tf.function with Keras' BatchNorm ops instead of the fused
               kernel (and the ratio), the op time per stage of the tf.function steps
               (front end, forward, backward by kind, optimizer), and model.fit fed by the
               real pipeline.
* ``infer``    a 10-s clip through the tagger: Keras, SavedModel, each TFLite variant of
               ``psla_tf.export`` (when importable); single-clip latency, batched throughput.
* ``rss``      peak RSS of a training run (model.fit on the pipeline) and of the pipeline.
* ``prepare``  tools/make_tfrecords' preparation, 1 and 2 workers (44.1-kHz stereo wav in).
* ``torch``    the PyTorch reference-style pipeline (benchmarks/torch_reference.py) on the
               same clips, when torch and torchaudio are installed (requirements-bench.txt).

The issue's stated PyTorch figures (same 2-core AMD EPYC class machine) are listed as the
baseline, with psla_tf's ratios to them. ``--quick`` checks the whole script end to end in a
few minutes (few clips, 1 repeat, EfficientNet-B0 at 100 frames): its figures are not the
benchmark's and the table says so.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
ALL_SECTIONS = ["fbank", "pipeline", "train", "infer", "rss", "prepare", "torch"]
flags.DEFINE_list("sections", ALL_SECTIONS, "Which measurements to run (comma-separated).")
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"],
                  "Where the model runs. gpu: training at batch 100 (float32, mixed_float16) "
                  "and whether the CPU input pipeline keeps up (>= 1.2x the step's clips/s).")
flags.DEFINE_list("cores", ["1", "2"], "Core counts for the pipeline (and fbank) figures.")
flags.DEFINE_list("pipeline_variants", [], "Only these variants of the pipeline section "
                  "(default: all; e.g. masking for the figure the PyTorch pipeline is compared "
                  "with).")
flags.DEFINE_string("out", "bench_out", "Folder for results.json, results.md and the data.")
flags.DEFINE_integer("repeats", 5, "Timed runs per figure (the median is reported).")
flags.DEFINE_integer("batches_per_repeat", 3, "Batches per timed run of the pipeline, rss and "
                     "PyTorch figures (batch 100; more: steadier figures on a noisy machine).",
                     lower_bound=1)
flags.DEFINE_integer("num_clips", 1000, "10-s clips in the benchmark set (written once, kept "
                     "in --out/data).")
flags.DEFINE_boolean("write_build_md", False,
                     "Replace the table between the benchmark markers in --build_md "
                     "(docs/performance.md).")
flags.DEFINE_string("build_md", os.path.join(ROOT, "docs", "performance.md"),
                    "The markdown page whose benchmark table --write_build_md replaces.")
flags.DEFINE_boolean("quick", False, "End-to-end check: 200 clips, 1 repeat, fewer batches, "
                     "EfficientNet-B0 at 100 frames. Not the benchmark's figures.")
flags.DEFINE_boolean("merge", False,
                     "Keep the sections of an earlier --out/results.json that this run does not "
                     "measure (each keeps the note of when, how and under what load it ran).")
flags.DEFINE_string("torch_python", None,
                    "Python interpreter with torch + torchaudio for the 'torch' section (e.g. a "
                    "separate venv made from requirements-bench.txt); default: this one.")
flags.DEFINE_string("child", None, "Internal: run one measurement (JSON spec) and print it.")

CLIP = 160000  # 10 s at 16 kHz
NUM_CLASSES = 527
BEGIN, END = "<!-- BENCHMARK TABLE BEGIN -->", "<!-- BENCHMARK TABLE END -->"
BASELINE_SOURCE = ("issue 8 (PyTorch in the reference's style on a 2-core AMD EPYC machine, "
                   "median of repeated runs)")
BASELINE = {"pipeline_2": 350.0, "pipeline_1": 210.0, "train_b8": 2.2}


# ============================================================================ helpers
def machine() -> dict[str, Any]:
    """CPU model, cores, TF/Keras/Python versions and visible GPUs."""
    import keras
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
    gpus = []
    for d in tf.config.list_physical_devices("GPU"):
        try:
            gpus.append(tf.config.experimental.get_device_details(d).get("device_name", d.name))
        except Exception:  # noqa: BLE001
            gpus.append(d.name)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "gpus": gpus,
            "load_average_1min_at_start": load,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` uncounted calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def peak_rss_mb() -> float:
    """This process's peak resident set size (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def row(config: str, value: float | None, unit: str = "clips/s", *, cores: Any = "",
        note: str = "", **extra) -> dict[str, Any]:
    return {"config": config, "value": value, "unit": unit, "cores": cores, "note": note,
            **extra}


class ChildFailed(RuntimeError):
    pass


def run_child(spec: dict[str, Any], cores: int | None, timeout: float = 1800,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh process pinned to ``cores`` CPUs; its result dict."""
    spec = dict(spec, cores=cores)
    cmd = [sys.executable, os.path.abspath(__file__), "--child=" + json.dumps(spec)]
    full_env = dict(os.environ, **(env or {}))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=full_env)
        out, err, how = proc.stdout, proc.stderr, f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as e:   # a result printed before the stall still counts
        out, err, how = _text(e.stdout), _text(e.stderr), f"no exit within {timeout:g} s"
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (err or out).strip().splitlines()[-15:]
    raise ChildFailed(f"{spec.get('kind')} {spec.get('variant', spec.get('mode', ''))} "
                      f"(cores={cores}) failed, {how}:\n  " + "\n  ".join(tail))


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _pin(cores: int | None) -> None:
    """Pin this process to the first ``cores`` CPUs and size TF's thread pools to match."""
    if cores:
        allowed = sorted(os.sched_getaffinity(0))
        if cores > len(allowed):
            raise SystemExit(f"error: {cores} cores asked for, {len(allowed)} usable")
        os.sched_setaffinity(0, allowed[:cores])
    import tensorflow as tf
    if cores:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(cores)


def _quick_settings() -> dict[str, Any]:
    if FLAGS.quick:
        return {"eff_b": 0, "heads": 1, "frames": 100, "batch": 2, "gpu_batch": 8}
    return {"eff_b": 2, "heads": 4, "frames": 1056, "batch": 8, "gpu_batch": 100}


# ============================================================================ data
def ensure_data(out: str, num_clips: int) -> dict[str, str]:
    """``num_clips`` 10-s 16-kHz mono wav clips with AudioSet-like labels, a PSLA datafile
    listing them, and TFRecord shards of them written by the library's preparation
    (psla_tf.data.prepare, what tools/make_tfrecords.py runs). Kept between runs."""
    import numpy as np
    import soundfile as sf
    from psla_tf.data import records
    from psla_tf.data.prepare import prepare
    from psla_tf.data.sources import read_datafile

    # absolute: the datafile lists the wav paths, which readers resolve against its folder
    data_dir = os.path.join(os.path.abspath(out), f"data_{num_clips}")
    wav_dir = os.path.join(data_dir, "wav")
    datafile = os.path.join(data_dir, "train.json")
    prefix = os.path.join(data_dir, "train")
    mids, names = _vocabulary()
    if not os.path.exists(datafile):
        os.makedirs(wav_dir, exist_ok=True)
        rng = np.random.default_rng(0)
        label_sets = _label_sets(mids, num_clips, rng)
        t = np.arange(CLIP) / 16000.0
        entries = []
        from tqdm import tqdm
        for i in tqdm(range(num_clips), desc="benchmark clips", unit="clip"):
            path = os.path.join(wav_dir, f"clip{i:05d}.wav")
            if not os.path.exists(path):
                f0 = rng.uniform(100, 4000)
                x = 0.1 * rng.standard_normal(CLIP) + 0.2 * np.sin(2 * np.pi * f0 * t)
                tmp = path + ".tmp.wav"
                sf.write(tmp, np.clip(x, -1, 1).astype(np.float32), 16000, subtype="PCM_16")
                os.replace(tmp, path)
            entries.append({"wav": path, "labels": ",".join(label_sets[i])})
        tmp = datafile + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"data": entries}, f)
        os.replace(tmp, datafile)
    if not os.path.exists(records.manifest_path(prefix)):
        rows = read_datafile(datafile)
        prepare(rows, (mids, names), prefix, num_shards=8, workers=min(2, os.cpu_count() or 1),
                stats=False, progress=True)
    written = records.load_data_spec(prefix + "-*.tfrecord").num_examples
    if written != num_clips:
        raise SystemExit(f"error: the benchmark set {prefix} has {written} of {num_clips} clips "
                         f"(see {prefix}.failures.csv); delete {data_dir} and run again")
    return {"datafile": datafile, "glob": prefix + "-*.tfrecord", "dir": data_dir}


def _vocabulary() -> tuple[list[str], list[str]]:
    """AudioSet's 527-class vocabulary from ../shared when present, else placeholders."""
    from psla_tf.data.records import read_label_csv
    path = os.path.join(os.path.dirname(ROOT), "shared", "data", "audioset",
                        "class_labels_indices.csv")
    if os.path.exists(path):
        return read_label_csv(path)
    mids = [f"/m/bench{k:03d}" for k in range(NUM_CLASSES)]
    return mids, [f"class {k}" for k in range(NUM_CLASSES)]


def _label_sets(mids: list[str], n: int, rng) -> list[list[str]]:
    """Label sets drawn from AudioSet's balanced-train label lists when ../shared has them
    (real multi-label statistics), else Zipf-skewed sets of 1-3 classes."""
    import csv
    path = os.path.join(os.path.dirname(ROOT), "shared", "data", "audioset",
                        "balanced_train_segments.csv")
    known = set(mids)
    pool: list[list[str]] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            for r in csv.reader(f, skipinitialspace=True):
                if r and not r[0].startswith("#") and len(r) >= 4:
                    labs = [m for m in r[3].split(",") if m in known]
                    if labs:
                        pool.append(labs)
    if pool:
        return [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    p = (1.0 + rng.permutation(len(mids))) ** -1.2
    p /= p.sum()
    return [sorted({mids[k] for k in rng.choice(len(mids), int(rng.integers(1, 4)), p=p)})
            for _ in range(n)]


# ============================================================================ children
# work model of one 10-s clip (998 frames) for the share of the machine's peak: a 512-point
# real FFT ≈ 2.5 N log2 N = 11,520 flops per frame, the mel sum 2 × 504 nonzero weights, the
# frame's DC removal / pre-emphasis / window ≈ 5 flops per sample, |X|² 2 per bin; compulsory
# memory traffic: the waveform read once (640 kB) and the features written once (511 kB)
FBANK_FRAMES = 998
FBANK_FLOPS_PER_CLIP = FBANK_FRAMES * (2.5 * 512 * 9 + 2 * 504 + 5 * 400 + 2 * 257)
FBANK_BYTES_PER_CLIP = 4 * (CLIP + FBANK_FRAMES * 128)
FBANK_STAGES = ("signal", "frames", "fft", "power", "mel", "log")


def machine_peaks(cores: int) -> dict[str, float]:
    """What these ``cores`` can do at best, measured here: float32 GFLOP/s of a large matmul
    (TensorFlow / oneDNN, the fastest kernel this process has) and GB/s of large memory copies
    (one NumPy copy per core, 256 MB each way in all, read + write counted)."""
    import threading
    import numpy as np
    import tensorflow as tf
    a = tf.constant(np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32))

    @tf.function
    def mm(a):
        acc = tf.zeros([])
        for i in range(8):      # distinct operands: no common subexpression to fold
            acc += tf.reduce_sum(tf.linalg.matmul(a + float(i), a)[:1, :1])
        return acc
    t = statistics.median(timed(lambda: mm(a).numpy(), 5, warmup=2))
    gflops = 8 * 2 * 2048 ** 3 / t / 1e9
    n = 64 * 2 ** 20 // max(cores, 1)                        # float32 elements per core
    src = [np.ones(n, np.float32) for _ in range(cores)]
    dst = [np.empty(n, np.float32) for _ in range(cores)]

    def copy_all():
        threads = [threading.Thread(target=np.copyto, args=(d, s)) for d, s in zip(dst, src)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    t = statistics.median(timed(copy_all, 7, warmup=2))
    return {"gflops": gflops, "gbytes_per_s": 2 * 4 * n * cores / t / 1e9}


def op_time_by_stage(fn: Callable[[], Any], calls: int, stages: tuple[str, ...],
                     stage_of: Callable[[list[str], str], str] | None = None) -> dict:
    """Run ``fn`` ``calls`` times under the TensorFlow profiler; the op time (ms per call) of
    each stage, an op's stage being the first of ``stages`` among its name scopes (ops of
    none: "other": loop control, output assembly), or ``stage_of(scopes, op_type)`` where
    given (its stages must be among ``stages``). Op time is summed over threads, so it can
    exceed the wall time when ops overlap."""
    import glob
    import shutil
    import tempfile
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    logdir = tempfile.mkdtemp(prefix="fbank_profile_")
    try:
        tf.profiler.experimental.start(logdir)
        for _ in range(calls):
            fn()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0],
                  "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    ps: dict[str, int] = {s: 0 for s in stages + ("other",)}
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        meta = plane.event_metadata
        for line in plane.lines:
            for ev in line.events:
                name = meta[ev.metadata_id].name
                op, sep, kind = name.rpartition(":")
                # TF op events are "scope/…/op_name:OpType"; runtime events have "::" or spaces
                if (not sep or "::" in name or " " in name
                        or not kind.lstrip("_")[:1].isupper()):
                    continue
                scopes = op.split("/")
                stage = (stage_of(scopes, kind.lstrip("_")) if stage_of
                         else next((s for s in scopes if s in stages), "other"))
                ps[stage] += ev.duration_ps
    return {s: v / 1e9 / calls for s, v in ps.items()}


def child_fbank(spec: dict) -> dict:
    """kaldi_fbank side by side with the plain tf.signal implementation (benchmarks/
    plain_fbank.py), batch 32 of 10-s clips, measured in rounds (each round runs every
    variant once; the ratio is the median of the per-round ratios, so load that drifts
    during the run affects both alike); where the time goes per stage (profiler); the share
    of the machine's peak; kaldi-native-fbank on one thread."""
    import numpy as np
    import tensorflow as tf
    # benchmarks/ is sys.path[0]: the child process runs this file as a script
    from plain_fbank import STAGES as PLAIN_STAGES, plain_fbank
    from psla_tf.features import kaldi_fbank
    repeats, batch = spec["repeats"], spec["batch"]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(-0.5, 0.5, (batch, CLIP)).astype(np.float32))
    fns = {
        "plain": tf.function(plain_fbank),
        "kaldi_fbank": tf.function(lambda w: kaldi_fbank(w)),
        "kaldi_fbank, dft=matmul": tf.function(lambda w: kaldi_fbank(w, dft="matmul")),
        "kaldi_fbank, rfft as one batch (chunk_samples=0)":
            tf.function(lambda w: kaldi_fbank(w, chunk_samples=0)),
        "kaldi_fbank, jit_compile": tf.function(lambda w: kaldi_fbank(w), jit_compile=True),
        "kaldi_fbank, eager": kaldi_fbank,
    }
    calls = {k: (lambda f=f: f(x).numpy()) for k, f in fns.items()}
    ref = calls["plain"]()
    diff = np.abs(calls["kaldi_fbank"]() - ref)
    for call in calls.values():       # warm-up: tracing, oneDNN primitives, allocator
        call()
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, call in calls.items():
            t, c = time.perf_counter(), time.process_time()
            call()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    out: dict[str, Any] = {
        "clips_per_s": {k: batch / statistics.median(v) for k, v in wall.items()},
        "cpu_ms_per_clip": {k: 1000 * statistics.median(v) / batch for k, v in cpu.items()},
        "ratio_vs_plain": statistics.median(p / f for p, f in zip(wall["plain"],
                                                                  wall["kaldi_fbank"])),
        "cpu_ratio_vs_plain": statistics.median(p / f for p, f in zip(cpu["plain"],
                                                                      cpu["kaldi_fbank"])),
        "parity_vs_plain": {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())},
    }
    if spec.get("profile", True):
        calls_p = max(3, repeats)
        out["stages_ms"] = {
            "kaldi_fbank": op_time_by_stage(calls["kaldi_fbank"], calls_p, FBANK_STAGES),
            "plain": op_time_by_stage(calls["plain"], calls_p, PLAIN_STAGES)}
    if spec.get("peaks", True) and spec.get("cores"):
        out["peaks"] = machine_peaks(spec["cores"])
    if spec.get("knf"):
        try:
            import kaldi_native_fbank as knf
        except ImportError:
            out["clips_per_s"]["kaldi-native-fbank"] = None
        else:
            opts = knf.FbankOptions()
            opts.frame_opts.dither = 0.0
            opts.frame_opts.window_type = "hanning"
            # Kaldi's C++ refuses 128 bins at a 512-point FFT (filter 3 would be empty, which
            # torchaudio tolerates); 80 bins is the nearest it accepts: the mel sum is a small
            # part of the cost, so the speed comparison stands.
            opts.mel_opts.num_bins = 80
            opts.mel_opts.high_freq = 0
            clip = x[0].numpy().tolist()

            def one():
                f = knf.OnlineFbank(opts)
                f.accept_waveform(16000, clip)
                f.input_finished()
                return [f.get_frame(i) for i in range(f.num_frames_ready)]
            out["clips_per_s"]["kaldi-native-fbank"] = 1 / statistics.median(
                timed(one, repeats, warmup=1))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


PIPELINE_VARIANTS = {
    # name: (description, cumulative stage?)
    "read": "TFRecord read (8 shards interleaved), batch 100",
    "parse": "+ parse (int16 → float), pad/cut, batch (make_eval_dataset)",
    "train_plain": "training pipeline: a random permutation of the records, each read by "
                   "itself, parse, pad, batch (no balanced sampling, no mixup)",
    "sampling": "+ balanced sampling (i.i.d. draws, P(i) = w_i / W)",
    "mixup": "+ mixup (rate 0.5): the waveform batches the trainer feeds the model",
    "fbank": "+ fbank in tf.data (per clip before batching; the front end's default DFT, "
             "auto = rfft on the host CPU; no masking)",
    "masking": "+ frequency/time masking in tf.data: the reference's whole per-clip work",
    "masking_tf_defaults": "masking without configure_input_host: each op split over "
                           "TensorFlow's intra-op pool of k threads, glibc's default malloc",
    "masking_offsets": "masking with each record read at its byte offset "
                       "(records_in_memory_mb=0; by default this set is held in memory)",
    "model_frontend": "mixup pipeline + fbank & masking at the front of the model "
                      "(AudioFrontend as a tf.function on the consumer side, dft auto)",
    "batched": "fbank + masking in tf.data as one vectorised map per batch of 100 (after "
               "batching)",
    "xla": "fbank + masking in tf.data under jit_compile",
    "matmul": "fbank (folded-matmul DFT, the accelerator front end's) + masking in tf.data",
}
# Variants whose work is one vectorised call per batch, as the model's front end: their ops
# use TensorFlow's intra-op pool of k threads. Every other variant works clip by clip with
# `cores` clips in parallel (tf.data's map) in a process set up by
# psla_tf.data.pipeline.configure_input_host (each op on one thread — the PyTorch
# reference-style pipeline's DataLoader workers likewise run torch on one thread each — and
# freed buffers reused), except "masking_tf_defaults", the same per-clip pipeline with
# TensorFlow's and glibc's defaults, for comparison.
DEFAULT_HOST_VARIANTS = ("model_frontend", "batched", "masking_tf_defaults")


def input_host(variant: str) -> bool:
    """Whether a pipeline child runs configure_input_host (the per-clip variants)."""
    return variant not in DEFAULT_HOST_VARIANTS


STAGES = ["read", "parse", "train_plain", "sampling", "mixup", "fbank", "masking"]
STAGE_COST = {"read": "read", "parse": "parse + pad + batch",
              "train_plain": "random-order reads of single records",
              "sampling": "balanced sampling", "mixup": "mixup (partner read + parse + mix)",
              "fbank": "fbank (mean removal, Kaldi fbank, pad to 1056 frames)",
              "masking": "frequency + time masking"}


def child_pipeline(spec: dict) -> dict:
    """clips/s of one pipeline variant on ``spec['cores']`` cores."""
    import tensorflow as tf
    from psla_tf.data import pipeline
    from psla_tf.data.records import load_data_spec
    from psla_tf.models.frontend import AudioFrontend
    variant, batch = spec["variant"], spec["batch"]
    data = load_data_spec(spec["glob"])
    cores = spec.get("cores")
    frames = spec.get("frames", 1056)
    clip_samples = pipeline.clip_samples_for_frames(frames)
    # the front end's default DFT (auto: the rfft path on CPU / GPU, as the trainer's model
    # front end); the folded matmul (TPU, exports) is measured as its own variant
    dft = "matmul" if variant == "matmul" else "auto"
    masking = variant != "fbank"
    frontend_layer = AudioFrontend(frames, freqm=48 if masking else 0,
                                   timem=192 if masking else 0, seed=0, dft=dft)

    def frontend(w, n):
        return frontend_layer(w, n, training=True)
    if variant == "xla":
        frontend = tf.function(frontend, jit_compile=True)

    def train_ds(**kw):
        args = dict(batch_size=batch, clip_samples=clip_samples, balanced_sampling=True,
                    mixup=0.5, seed=0, num_epochs=10_000)
        args.update(kw)
        return pipeline.make_train_dataset(data, **args)

    consumer = None
    if variant == "read":
        ds = tf.data.TFRecordDataset(data.files, buffer_size=pipeline.READ_BUFFER_BYTES,
                                     num_parallel_reads=tf.data.AUTOTUNE).repeat()
        ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    elif variant == "parse":
        ds = pipeline.make_eval_dataset(data, batch, clip_samples).unbatch().repeat()
        ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    elif variant == "train_plain":
        ds = train_ds(balanced_sampling=False, mixup=0.0)
    elif variant == "sampling":
        ds = train_ds(mixup=0.0)
    elif variant == "mixup":
        ds = train_ds()
    elif variant in ("fbank", "masking", "masking_tf_defaults", "xla", "matmul"):
        ds = train_ds(features_in_pipeline=True, frontend=frontend)
    elif variant == "masking_offsets":
        ds = train_ds(features_in_pipeline=True, frontend=frontend, records_in_memory_mb=0)
    elif variant == "model_frontend":
        ds = train_ds()
        consumer = tf.function(lambda f: frontend(f["waveform"], f["num_samples"]))
    elif variant == "batched":
        ds = train_ds(prefetch=0)

        def whole(f, y):
            return frontend(f["waveform"], f["num_samples"]), y
        ds = ds.map(whole, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.prefetch(tf.data.AUTOTUNE)
    else:
        raise SystemExit(f"error: unknown pipeline variant {variant!r}")
    opts = tf.data.Options()
    opts.autotune.enabled = spec.get("autotune", True)
    if cores:
        opts.threading.private_threadpool_size = cores
    ds = ds.with_options(opts)
    it = iter(ds)

    def step():
        el = next(it)
        if consumer is not None:
            el = consumer(el[0])
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, el)

    def run_batches():
        for _ in range(spec["batches_per_repeat"]):
            step()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(max(spec["warmup_repeats"], 0)):
        run_batches()
    c0 = time.process_time()
    ts = timed(run_batches, spec["repeats"], warmup=0)
    cpu = time.process_time() - c0
    clips = spec["batches_per_repeat"] * batch
    return {"clips_per_s": clips / statistics.median(ts), "runs": [clips / t for t in ts],
            "cpu_ms_per_clip": 1000.0 * cpu / (clips * spec["repeats"]),
            "first_batch_s": first, "peak_rss_mb": peak_rss_mb()}


def _spec_tagger(spec: dict):
    """The tagger a train / infer child measures: ``spec``'s model (default efficientnet),
    ``eff_b``, ``heads``, ``frames``, ``fused_batchnorm``, ``pointwise_matmul`` and
    ``swish_saved_sigmoid`` (default on), 527 classes."""
    from psla_tf.models.tagger import build_tagger
    return build_tagger(NUM_CLASSES, model=spec.get("model", "efficientnet"),
                        eff_b=spec["eff_b"], att_head=spec["heads"],
                        target_length=spec["frames"], seed=0,
                        fused_batchnorm=spec.get("fused_batchnorm", True),
                        pointwise_matmul=spec.get("pointwise_matmul", True),
                        swish_saved_sigmoid=spec.get("swish_saved_sigmoid", True))


def _train_model(spec: dict):
    import keras
    if spec.get("precision") and spec["precision"] != "float32":
        keras.mixed_precision.set_global_policy(spec["precision"])
    from psla_tf.training.optim import TorchAdam, make_loss
    keras.utils.set_random_seed(0)
    model = _spec_tagger(spec)
    model.compile(optimizer=TorchAdam(1e-4), loss=make_loss("bce"),
                  jit_compile=spec["mode"] == "jit_compile",
                  run_eagerly=spec["mode"] == "eager")
    return model


def child_train(spec: dict) -> dict:
    """Seconds per training step (in-memory batch), or model.fit on the real pipeline."""
    import numpy as np
    import tensorflow as tf
    from psla_tf.data import pipeline
    if spec.get("device") == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise SystemExit("error: --device=gpu but TensorFlow sees no GPU")
    model = _train_model(spec)
    batch = spec["batch"]
    samples = pipeline.clip_samples_for_frames(spec["frames"])
    if spec["mode"] == "fit":
        data = pipeline.make_train_dataset(spec["glob"], batch_size=batch, clip_samples=samples,
                                           seed=0, num_epochs=10_000)
        times: list[float] = []
        ends: list[float] = []

        class Clock(__import__("keras").callbacks.Callback):
            def on_train_batch_begin(self, b, logs=None):
                self.t = time.perf_counter()

            def on_train_batch_end(self, b, logs=None):
                ends.append(time.perf_counter())
                times.append(ends[-1] - self.t)
        warm = spec["warmup_steps"]
        steps = warm + spec["repeats"] * spec["steps_per_repeat"]
        model.fit(data, epochs=1, steps_per_epoch=steps, callbacks=[Clock()], verbose=0)
        kept = times[warm:]
        # from the end of the last warm-up step to the end of the last step: the kept steps
        # and the gaps between them (waiting for input), not the set-up before the first step
        # (dataset and record index building, tracing)
        kept_wall = ends[-1] - ends[warm - 1] if warm else sum(kept)
        return {"clips_per_s": batch / statistics.median(kept),
                "wall_clips_per_s": batch * len(kept) / max(kept_wall, 1e-9),
                "peak_rss_mb": peak_rss_mb()}
    rng = np.random.default_rng(0)
    x = {"waveform": rng.uniform(-0.5, 0.5, (batch, samples)).astype(np.float32),
         "num_samples": np.full((batch,), samples, np.int32)}
    y = (rng.random((batch, NUM_CLASSES)) < 0.01).astype(np.float32)
    x = tf.nest.map_structure(tf.constant, x)
    y = tf.constant(y)

    def steps():
        for _ in range(spec["steps_per_repeat"]):
            loss = model.train_on_batch(x, y)
        float(np.asarray(loss))
    t0 = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - t0
    ts = timed(steps, spec["repeats"], warmup=1)
    out = {"clips_per_s": batch * spec["steps_per_repeat"] / statistics.median(ts),
           "first_step_s": first, "peak_rss_mb": peak_rss_mb()}
    if spec.get("profile"):
        out["stages_ms"] = op_time_by_stage(lambda: model.train_on_batch(x, y),
                                            spec["profile"], TRAIN_STAGES, train_stage)
    return out


TRAIN_STAGES = ("front end", "backbone forward", "head forward", "backward: convolutions",
                "backward: depthwise convolutions", "backward: BatchNorm",
                "backward: activations", "backward: other", "optimizer", "other")


def train_stage(scopes: list[str], op_type: str) -> str:
    """The stage of one op of a Keras train step, from its name scopes and type: the forward
    pass by layer (the model's scopes), the backward pass (``gradient_tape/…``, and the
    unscoped ops of the activations' custom gradients) by kind, the optimizer's update."""
    if scopes[0] == "gradient_tape" or (len(scopes) == 1 and op_type in (
            "Sigmoid", "Mul", "Sub", "AddV2", "AddN")):
        if "Depthwise" in op_type:
            return "backward: depthwise convolutions"
        if "Conv2D" in op_type:
            return "backward: convolutions"
        if "BatchNorm" in op_type:
            return "backward: BatchNorm"
        if op_type in ("Sigmoid", "Mul", "Sub", "AddV2") and len(scopes) == 1:
            return "backward: activations"
        return "backward: other"
    if "adam" in scopes[0].lower() or "optimizer" in scopes[0].lower():
        return "optimizer"
    if "frontend" in "/".join(scopes):
        return "front end"
    if any(s.startswith("backbone") for s in scopes):
        return "backbone forward"
    if any(s.startswith(("pooling", "frequency_mean", "global_pool")) for s in scopes):
        return "head forward"
    return "other"


def child_infer(spec: dict) -> dict:
    """Per-clip latency (batch 1) and batched throughput of one 10-s clip through the tagger:
    Keras, SavedModel, and each TFLite variant psla_tf.export offers."""
    import numpy as np
    import tensorflow as tf
    model = _spec_tagger(spec)
    samples = CLIP if spec["frames"] >= 998 else (spec["frames"] - 1) * 160 + 400
    rng = np.random.default_rng(0)

    def inputs(b):
        return {"waveform": rng.uniform(-0.5, 0.5, (b, samples)).astype(np.float32),
                "num_samples": np.full((b,), samples, np.int32)}
    x1, xb = inputs(1), inputs(spec["batch"])
    repeats = spec["repeats"]
    out: dict[str, Any] = {}
    notes: list[str] = []

    def measure(name, call1, callb):
        lat = statistics.median(timed(lambda: call1(x1), repeats, warmup=2))
        thr = statistics.median(timed(lambda: callb(xb), repeats, warmup=1))
        out[name] = {"latency_ms": 1000 * lat, "clips_per_s": spec["batch"] / thr}

    measure("Keras (predict_on_batch)", model.predict_on_batch, model.predict_on_batch)
    sm_dir = os.path.join(spec["scratch"], "savedmodel")
    try:
        import shutil
        shutil.rmtree(sm_dir, ignore_errors=True)
        try:  # the deployment export (psla_tf.export, issue 5) when this build has it
            from psla_tf.export import export_saved_model, load_saved_model
        except ImportError:
            model.export(sm_dir, format="tf_saved_model", verbose=False)
            serve = tf.saved_model.load(sm_dir).signatures["serving_default"]
            name = "SavedModel (keras model.export)"

            def call(x):
                return serve(waveform=tf.constant(x["waveform"]),
                             num_samples=tf.constant(x["num_samples"]))
        else:
            mids = [f"/m/{k}" for k in range(NUM_CLASSES)]
            export_saved_model(model, sm_dir, mids, mids, clip_samples=samples)
            call_sm = load_saved_model(sm_dir)
            name = "SavedModel (psla_tf.export, serving_lengths)"

            def call(x):
                return call_sm(x["waveform"], x["num_samples"])
        measure(name, call, call)
    except Exception as e:  # noqa: BLE001
        notes.append(f"SavedModel: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    notes.extend(_tflite_variants(model, spec, measure, x1, xb))
    return {"results": out, "notes": notes, "peak_rss_mb": peak_rss_mb()}


def _tflite_variants(model, spec, measure, x1, xb) -> list[str]:
    """Each TFLite variant of psla_tf.export_tflite (issue 5), run with the LiteRT interpreter
    on ``spec['cores']`` threads; the model takes one fixed-length clip per invoke, so the
    batched figure is clip after clip."""
    try:
        from psla_tf import export_tflite as ex
    except ImportError as e:
        return [f"TFLite: psla_tf.export_tflite is not importable in this build ({e}); skipped"]
    import numpy as np
    notes = []
    samples = x1["waveform"].shape[1]
    mids = [f"/m/{k}" for k in range(NUM_CLASSES)]
    rng = np.random.default_rng(1)
    calibration = [rng.uniform(-0.5, 0.5, samples).astype(np.float32)
                   for _ in range(spec.get("calibration_clips", 8))]
    for variant in ex.QUANTIZATIONS:
        path = os.path.join(spec["scratch"], f"model_{variant}.tflite")
        try:
            ex.export_tflite(model, path, mids, mids, quantize=variant,
                             seconds=samples / 16000.0, clip_samples=samples,
                             calibration=calibration if variant == "int8" else None)
            size_mb = os.path.getsize(path) / 1e6
            threads = sorted({1, spec.get("cores") or os.cpu_count() or 1})
            for t in threads:  # the per-variant figures: 1 thread and all cores
                tagger = ex.TFLiteTagger(path, num_threads=t)

                def call(x, tagger=tagger):
                    return tagger(x["waveform"][0])

                def call_b(x, tagger=tagger):
                    for w in x["waveform"]:
                        tagger(w)
                measure(f"TFLite {variant}, {size_mb:.1f} MB (LiteRT, {t} thread"
                        f"{'s' if t > 1 else ''}, clip by clip)", call, call_b)
        except Exception as e:  # noqa: BLE001
            notes.append(f"TFLite {variant}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}")
    return notes


def child_main(spec: dict) -> None:
    _pin(spec.get("cores"))
    if spec.get("input_host"):   # before TensorFlow runs: intra-op pool 1, heap reuse
        from psla_tf.data import pipeline
        pipeline.configure_input_host()
    kind = spec["kind"]
    fn = {"fbank": child_fbank, "pipeline": child_pipeline, "train": child_train,
          "infer": child_infer}[kind]
    result = fn(spec)
    print("RESULT " + json.dumps(result), flush=True)
    sys.stderr.flush()
    # no interpreter teardown: destroying a tf.data iterator over an endless dataset
    # sometimes never returns on a 2-core VM (2 of 8 pipeline children, 2026-12-03)
    os._exit(0)


# ============================================================================ sections
def _core_list(results: dict) -> list[int]:
    usable = results["machine"]["usable_cores"] or 1
    cores = sorted({int(c) for c in FLAGS.cores})
    for c in cores:
        if c > usable:
            print(f"(only {usable} usable cores: the {c}-core figures are skipped)")
    return [c for c in cores if c <= usable]


def fbank_rows(r: dict, cores: Any) -> list[dict[str, Any]]:
    """Table rows of one fbank child's result (``r``) on ``cores``."""
    rows = []
    for name, v in r["clips_per_s"].items():
        if name == "kaldi-native-fbank":
            rows.append(row("kaldi-native-fbank (C++, 1 thread, 80 bins)", v, cores=1,
                            note="" if v is not None else "not installed "
                            "(pip install kaldi-native-fbank)"))
            continue
        label = ("plain tf.signal fbank (benchmarks/plain_fbank.py), tf.function"
                 if name == "plain" else name + ("" if "eager" in name or "jit" in name
                                                 else ", tf.function"))
        rows.append(row(f"{label}, batch 32", v, cores=cores,
                        cpu_ms_per_clip=r["cpu_ms_per_clip"].get(name)))
    p = r["parity_vs_plain"]
    rows.append(row("kaldi_fbank / plain, side by side (median of per-round ratios)",
                    r["ratio_vs_plain"], "ratio", cores=cores,
                    note=f"target >= 1.4; process CPU time ratio {r['cpu_ratio_vs_plain']:.2f}; "
                         f"abs. difference mean {p['mean_abs']:.1e}, max {p['max_abs']:.1e}"))
    peaks = r.get("peaks")
    if peaks:
        cps = r["clips_per_s"]["kaldi_fbank"]
        flops = cps * FBANK_FLOPS_PER_CLIP / 1e9
        gbps = cps * FBANK_BYTES_PER_CLIP / 1e9
        floor = max(FBANK_FLOPS_PER_CLIP / (peaks["gflops"] * 1e9),
                    FBANK_BYTES_PER_CLIP / (peaks["gbytes_per_s"] * 1e9))   # s per clip
        rows.append(row("machine peak: float32 matmul", peaks["gflops"], "GFLOP/s",
                        cores=cores, note="measured here (TF/oneDNN 2048² matmul)"))
        rows.append(row("machine peak: memory copy", peaks["gbytes_per_s"], "GB/s",
                        cores=cores, note="measured here (read + write)"))
        rows.append(row("kaldi_fbank: share of peak FLOP/s", 100 * flops / peaks["gflops"],
                        "% of peak", cores=cores,
                        note=f"{flops:.1f} GFLOP/s at {FBANK_FLOPS_PER_CLIP / 1e6:.1f} "
                             "MFLOP per clip (FFT 2.5 N log2 N)"))
        rows.append(row("kaldi_fbank: share of the roofline bound", 100 * floor * cps,
                        "% of bound", cores=cores,
                        note=f"bound {1 / floor:,.0f} clips/s = max(FLOPs / peak, "
                             f"{FBANK_BYTES_PER_CLIP / 1e6:.2f} MB in+out / bandwidth); "
                             f"{gbps:.2f} GB/s compulsory traffic"))
    for who, stages in (r.get("stages_ms") or {}).items():
        total = sum(stages.values())
        for stage, ms in stages.items():
            rows.append(row(f"{who} stage: {stage}", ms, "ms op time / batch", cores=cores,
                            note=f"{100 * ms / total:.0f} % of op time" if total else ""))
    return rows


def bench_fbank(results: dict, ctx: dict) -> dict:
    rows, notes = [], []
    cores = _core_list(results)
    runs: list[tuple[Any, int | None, dict]] = [
        (k, k, {"CUDA_VISIBLE_DEVICES": ""}) for k in sorted({1, max(cores or [1])})]
    if FLAGS.device == "gpu":
        runs.append(("GPU", None, {}))
    for k, pin, env in runs:
        cpu = pin is not None          # the profile and the peaks are the CPU's
        r = run_child({"kind": "fbank", "repeats": ctx["repeats"], "batch": 32,
                       "knf": k == 1, "peaks": cpu, "profile": cpu}, pin, env=env)
        rows += fbank_rows(r, k)
    best1 = max((r["value"] for r in rows if r["cores"] == 1 and r["value"]
                 and r["unit"] == "clips/s" and r["config"].startswith("kaldi_fbank")),
                default=None)
    knf = next((r["value"] for r in rows if r["config"].startswith("kaldi-native")), None)
    if best1 and knf:
        rows.append(row("kaldi_fbank (best, 1 core) / kaldi-native-fbank (1 thread)",
                        best1 / knf, "ratio", cores=1, note="target >= 0.5"))
    notes.append("batch 32 of 10-s clips (uniform noise); variants run in rounds (each round "
                 "times every variant once), the kaldi_fbank / plain ratio is the median of "
                 "the rounds' ratios; stages: op time from the TensorFlow profiler by name "
                 "scope (kaldi_fbank: signal = pad, pre-emphasis, frame means; frames = cut, "
                 "zero-pad, DC removal + window; other = loop control and output assembly)")
    return {"rows": rows, "notes": notes}


def stage_costs(clips_per_s: dict[str, float]) -> list[tuple[str, float]]:
    """Per-stage cost (ms per clip) from the cumulative stages' clips/s: the first stage's
    1000 / rate, then each stage's 1000 / rate minus the previous one's. A stage that was not
    measured breaks the chain (the next stage has no predecessor to subtract)."""
    out, prev = [], None
    for s in STAGES:
        if s not in clips_per_s or not clips_per_s[s]:
            prev = None
            continue
        ms = 1000.0 / clips_per_s[s]
        if prev is not None:
            out.append((STAGE_COST[s], ms - prev))
        elif s == STAGES[0]:
            out.append((STAGE_COST[s], ms))
        prev = ms
    return out


def bench_pipeline(results: dict, ctx: dict) -> dict:
    rows, notes = [], []
    cores = _core_list(results)
    variants = [v for v in PIPELINE_VARIANTS
                if not FLAGS.pipeline_variants or v in FLAGS.pipeline_variants]
    env = {"CUDA_VISIBLE_DEVICES": ""}  # the input pipeline runs on the CPU
    if FLAGS.device == "gpu":
        cores = [results["machine"]["usable_cores"]]
        variants = ["mixup", "masking"]
    per_core: dict[int, dict[str, float]] = {}
    cpu_rates: dict[int, dict[str, float]] = {}  # clips per CPU-second (all threads)
    for k in cores:
        per_core[k] = {}
        for v in variants:
            spec = {"kind": "pipeline", "variant": v, "glob": ctx["data"]["glob"], "batch": 100,
                    "repeats": ctx["repeats"], "warmup_repeats": 1,
                    "batches_per_repeat": ctx["batches_per_repeat"],
                    "input_host": input_host(v)}
            try:
                r = run_child(spec, k, env=env)
            except ChildFailed as e:
                notes.append(str(e).splitlines()[0])
                print(e)
                rows.append(row(PIPELINE_VARIANTS[v], None, cores=k, note="failed"))
                continue
            per_core[k][v] = r["clips_per_s"]
            cpu_rates.setdefault(k, {})[v] = 1000.0 / r["cpu_ms_per_clip"]
            rows.append(row(PIPELINE_VARIANTS[v], r["clips_per_s"], cores=k,
                            variant=v, peak_rss_mb=r["peak_rss_mb"],
                            cpu_ms_per_clip=r["cpu_ms_per_clip"],
                            first_batch_s=r["first_batch_s"], runs=r["runs"]))
            print(f"  {v} on {k} core(s): {r['clips_per_s']:.1f} clips/s", flush=True)
    for k, got in per_core.items():
        for name, ms in stage_costs(got):
            rows.append(row(f"stage cost: {name}", ms, "ms/clip", cores=k))
        for name, ms in stage_costs(cpu_rates.get(k, {})):
            rows.append(row(f"stage CPU time: {name}", ms, "CPU ms/clip", cores=k,
                            note="process CPU time, robust to other load"))
        if "masking" in got and k in (1, 2):
            ratio = got["masking"] / BASELINE[f"pipeline_{k}"]
            rows.append(row("full pipeline (fbank + masking in tf.data) / PyTorch stated",
                            ratio, "ratio", cores=k, note="target >= 2"))
    ctx["pipeline"] = per_core
    return {"rows": rows, "notes": notes}


def bench_train(results: dict, ctx: dict) -> dict:
    rows, notes = [], []
    q = ctx["model"]
    gpu = FLAGS.device == "gpu"
    # (mode, precision, fused BatchNorm, 1x1 convolutions as matrix products); a False row
    # takes Keras' own BatchNorm ops / Conv2D for the 1x1 convolutions
    if gpu:
        modes = [("tf.function", "float32", True, True), ("tf.function", "float32", False, True),
                 ("tf.function", "float32", True, False), ("jit_compile", "float32", True, True),
                 ("tf.function", "mixed_float16", True, True),
                 ("jit_compile", "mixed_float16", True, True)]
        batch, cores = q["gpu_batch"], None
    else:
        modes = [("eager", "float32", True, True), ("tf.function", "float32", True, True),
                 ("tf.function", "float32", False, True), ("tf.function", "float32", True, False),
                 ("jit_compile", "float32", True, True),
                 ("tf.function", "mixed_bfloat16", True, True)]
        batch = q["batch"]
        cores = max(_core_list(results) or [1])
    desc = f"EfficientNet-B{q['eff_b']} + {q['heads']} heads, batch {batch}, {q['frames']} frames"
    best, by_kernels = 0.0, {}
    for mode, prec, fused, pointwise in modes:
        name = (f"train step, {mode}, {prec}" + ("" if fused else ", Keras BatchNorm ops")
                + ("" if pointwise else ", Conv2D for 1x1 convolutions"))
        spec = {"kind": "train", "mode": mode, "precision": prec, "batch": batch,
                "eff_b": q["eff_b"], "heads": q["heads"], "frames": q["frames"],
                "repeats": ctx["repeats"], "steps_per_repeat": 1 if not gpu else 5,
                "device": FLAGS.device, "fused_batchnorm": fused,
                "pointwise_matmul": pointwise,
                "profile": 3 if (mode, prec, pointwise) == ("tf.function", "float32", True)
                else 0}
        try:
            r = run_child(spec, cores)
        except ChildFailed as e:
            notes.append(str(e).splitlines()[0])
            print(e)
            rows.append(row(name, None, cores=cores or "all", note="failed"))
            continue
        best = max(best, r["clips_per_s"])
        if (mode, prec) == ("tf.function", "float32"):
            by_kernels[fused, pointwise] = r["clips_per_s"]
        rows.append(row(name, r["clips_per_s"], cores=cores or "all",
                        first_step_s=r["first_step_s"], peak_rss_mb=r["peak_rss_mb"]))
        print(f"  {name}: {r['clips_per_s']:.2f} clips/s", flush=True)
        for stage, ms in r.get("stages_ms", {}).items():
            if ms:
                rows.append(row(f"{name}: op time, {stage}", ms, "ms/step", cores=cores or "all",
                                note="TensorFlow profiler, summed over threads"))
    ours = by_kernels.get((True, True))
    for key, what in (((False, True), "fused BatchNorm / Keras BatchNorm ops"),
                      ((True, False), "1x1 convolutions as matrix products / Conv2D")):
        if ours and by_kernels.get(key):
            rows.append(row(f"train step, {what} (tf.function, float32)",
                            ours / by_kernels[key], "ratio", cores=cores or "all"))
    ctx["train_best"] = best
    if not gpu and best and not FLAGS.quick:
        rows.append(row("best train step / PyTorch stated (2.2 clips/s)",
                        best / BASELINE["train_b8"], "ratio", cores=cores, note="target >= 1"))
    if gpu and best and ctx.get("pipeline"):
        got = next(iter(ctx["pipeline"].values()))
        for v, what in (("mixup", "fbank on the GPU in the model (the trainer's path)"),
                        ("masking", "fbank + masking in tf.data on the CPU")):
            if v in got:
                rows.append(row(f"CPU pipeline / best GPU step, {what}", got[v] / best, "ratio",
                                cores="all", note="keeps up if >= 1.2"))
    return {"rows": rows, "notes": notes, "model": desc}


def bench_infer(results: dict, ctx: dict) -> dict:
    q = ctx["model"]
    cores = max(_core_list(results) or [1]) if FLAGS.device == "cpu" else None
    spec = {"kind": "infer", "eff_b": q["eff_b"], "heads": q["heads"], "frames": q["frames"],
            "batch": 32 if not FLAGS.quick else 4, "repeats": ctx["repeats"],
            "scratch": os.path.abspath(os.path.join(FLAGS.out, "infer_scratch"))}
    r = run_child(spec, cores)
    rows = []
    for name, v in r["results"].items():
        rows.append(row(f"{name}: one clip", v["latency_ms"], "ms/clip", cores=cores or "all"))
        rows.append(row(f"{name}: batch {spec['batch']}", v["clips_per_s"],
                        cores=cores or "all"))
    return {"rows": rows, "notes": "; ".join(r["notes"]),
            "model": f"EfficientNet-B{q['eff_b']} + {q['heads']} heads, "
                     f"{min(CLIP, (q['frames'] - 1) * 160 + 400) / 16000:g}-s clip"}


def bench_rss(results: dict, ctx: dict) -> dict:
    q = ctx["model"]
    gpu = FLAGS.device == "gpu"
    cores = None if gpu else max(_core_list(results) or [1])
    batch = q["gpu_batch"] if gpu else q["batch"]
    rows, notes = [], []
    spec = {"kind": "train", "mode": "fit", "precision": "float32", "batch": batch,
            "eff_b": q["eff_b"], "heads": q["heads"], "frames": q["frames"],
            "glob": ctx["data"]["glob"], "repeats": ctx["repeats"], "steps_per_repeat": 1,
            "warmup_steps": 2, "device": FLAGS.device}
    try:
        r = run_child(spec, cores)
        rows.append(row(f"training run (model.fit on the pipeline, B{q['eff_b']}, batch {batch})",
                        r["peak_rss_mb"], "MB peak RSS", cores=cores or "all"))
        rows.append(row(f"training run throughput (model.fit on the pipeline, batch {batch})",
                        r["wall_clips_per_s"], cores=cores or "all",
                        note="wall clock incl. waits for input"))
    except ChildFailed as e:
        notes.append(str(e).splitlines()[0])
        print(e)
    spec = {"kind": "pipeline", "variant": "masking", "glob": ctx["data"]["glob"], "batch": 100,
            "repeats": ctx["repeats"], "warmup_repeats": 1,
            "batches_per_repeat": ctx["batches_per_repeat"],
            "input_host": input_host("masking")}
    r = run_child(spec, cores, env={"CUDA_VISIBLE_DEVICES": ""})
    rows.append(row("input pipeline alone (fbank + masking in tf.data, batch 100)",
                    r["peak_rss_mb"], "MB peak RSS", cores=cores or "all",
                    note="includes two 1000-record shuffle buffers (~320 kB per 10-s clip)"))
    return {"rows": rows, "notes": notes}


def bench_prepare(results: dict, ctx: dict) -> dict:
    from psla_tf.data.prepare import benchmark_prepare
    n = 8 if FLAGS.quick else 120
    workdir = os.path.join(FLAGS.out, "prepare_scratch")
    rows = []
    for stats in (True, False):
        res = benchmark_prepare(workdir, num_clips=n, seconds=10.0, sample_rate=44100,
                                workers_list=tuple(c for c in (1, 2)
                                                   if c <= results["machine"]["usable_cores"]),
                                stats=stats)
        for w, cps in res.items():
            rows.append(row(f"make_tfrecords, {w} worker(s), "
                            f"{'with' if stats else 'without'} fbank statistics", cps, cores=w))
    return {"rows": rows, "notes": f"{n} clips of 10 s, 44.1 kHz stereo PCM-16 wav → 16-kHz "
                                   "int16 TFRecords (decode, soxr HQ resampling, write); wall clock "
                                   "including the worker processes' start-up (TensorFlow import)"}


def bench_torch(results: dict, ctx: dict) -> dict:
    python = FLAGS["torch_python"].value or sys.executable  # readable before flag parsing
    try:
        probe = subprocess.run([python, "-c", "import importlib.util as u; print(' '.join(m for m "
                                "in ('torch', 'torchaudio') if u.find_spec(m) is None))"],
                               capture_output=True, text=True)
    except OSError as e:
        return {"rows": [], "notes": f"skipped: --torch_python={python}: {e.strerror}"}
    if probe.returncode != 0:
        return {"rows": [], "notes": f"skipped: --torch_python={python} does not run"}
    missing = probe.stdout.split()
    if missing:
        return {"rows": [], "notes": f"skipped: {' and '.join(missing)} not installed "
                "(pip install -r requirements-bench.txt: ~7 GB with the default CUDA wheels, far "
                "less from the CPU index it names); the PyTorch rows above are the issue's "
                "stated baseline"}
    rows, notes = [], []
    script = os.path.join(ROOT, "benchmarks", "torch_reference.py")
    for k in _core_list(results):
        cmd = [python, script, "--datafile", ctx["data"]["datafile"], "--workers",
               str(k), "--cores", str(k), "--repeats", str(ctx["repeats"]),
               "--batches_per_repeat", str(ctx["batches_per_repeat"])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        line = _result_line(proc)
        if line is None:
            notes.append(f"{k} worker(s) failed: "
                         + " | ".join((proc.stderr or "").strip().splitlines()[-3:]))
            continue
        r = json.loads(line[7:])
        rows.append(row("PyTorch reference-style pipeline, measured here", r["clips_per_s"],
                        cores=k, note=r.get("note", "")))
        ours = ctx.get("pipeline", {}).get(k, {}).get("masking")
        if ours:
            rows.append(row("psla_tf full pipeline / PyTorch measured here",
                            ours / r["clips_per_s"], "ratio", cores=k, note="target >= 2.5"))
    rows += _torch_train_step(python, script, ctx, max(_core_list(results) or [1]), notes)
    return {"rows": rows, "notes": "; ".join(notes)}


def _result_line(proc: subprocess.CompletedProcess) -> str | None:
    """The last ``RESULT {json}`` line a torch_reference.py run printed, or None."""
    return next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")),
                None)


def _torch_train_step(python: str, script: str, ctx: dict, cores: int,
                      notes: list[str]) -> list[dict[str, Any]]:
    """The reference's training step (torch_reference.py --train_step) with the 'train'
    section's model, batch and frames, and psla_tf's best step / it when both ran."""
    q = ctx["model"]
    cmd = [python, script, "--train_step", "--eff_b", str(q["eff_b"]), "--heads",
           str(q["heads"]), "--frames", str(q["frames"]), "--batch_size", str(q["batch"]),
           "--cores", str(cores), "--repeats", str(ctx["repeats"]),
           "--batches_per_repeat", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    line = _result_line(proc)
    if line is None:
        notes.append("train step failed: "
                     + " | ".join((proc.stderr or "").strip().splitlines()[-3:]))
        return []
    r = json.loads(line[7:])
    out = [row("PyTorch reference-style train step, measured here", r["clips_per_s"],
               cores=cores, first_step_s=r["first_step_s"], note=r["note"])]
    if ctx.get("train_best"):
        out.append(row("psla_tf best train step / PyTorch train step measured here",
                       ctx["train_best"] / r["clips_per_s"], "ratio", cores=cores,
                       note="same model, batch and frames; psla_tf's step includes fbank"))
    return out


def baseline_section() -> dict:
    return {"rows": [
        row("PyTorch reference-style pipeline, 2 DataLoader workers", BASELINE["pipeline_2"],
            cores=2, note="stated"),
        row("PyTorch reference-style pipeline, 1 DataLoader worker", BASELINE["pipeline_1"],
            cores=1, note="stated"),
        row("PyTorch EfficientNet-B2 + 4 heads train step, batch 8, 1056 frames",
            BASELINE["train_b8"], cores=2, note="stated")],
        "notes": f"source: {BASELINE_SOURCE}; not measured by this script"}


SECTIONS = {"fbank": bench_fbank, "pipeline": bench_pipeline, "train": bench_train,
            "infer": bench_infer, "rss": bench_rss, "prepare": bench_prepare,
            "torch": bench_torch}


# ============================================================================ report
def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "ratio":
        return f"{v:.2f}×"
    if unit.startswith("MB"):
        return f"{v:,.0f}"
    if unit.startswith("%"):
        return f"{v:.1f}"
    if unit.startswith("ms"):
        return f"{v:,.2f}"
    return f"{v:,.1f}" if v >= 10 else f"{v:,.2f}"


def _measured(m: dict, argv: str) -> str:
    return (f"{m['date_utc']} UTC, 1-min load average at start "
            f"{m['load_average_1min_at_start']:.2f}, `python benchmarks/run.py {argv}`")


def to_markdown(results: dict) -> str:
    m = results["machine"]
    head = (f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
            f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, Python {m['python']}; GPUs: "
            f"{', '.join(m['gpus']) or 'none'}; device {results['device']}; "
            f"{m['date_utc']} UTC, 1-min load average at start {m['load_average_1min_at_start']}. "
            f"Median of {results['repeats']} timed runs after warm-up; 10-s 16-kHz clips; "
            f"`python benchmarks/run.py {results['argv']}`.")
    lines = []
    if results.get("quick"):
        lines.append("**QUICK RUN (--quick): few clips, 1 repeat, EfficientNet-B0 at 100 frames "
                     "— an end-to-end check, not the benchmark's figures.**")
        lines.append("")
    lines += [head, "", "| section | configuration | cores | value | unit | note |",
              "| --- | --- | --- | --- | --- | --- |"]
    for section in ["baseline"] + ALL_SECTIONS:
        body = results.get(section)
        if not isinstance(body, dict):
            continue
        label = section + (f" ({body['model']})" if body.get("model") else "")
        for r in body.get("rows", []):
            unit = r["unit"] if r["unit"] not in ("ratio",) else ""
            lines.append(f"| {label} | {r['config']} | {r['cores']} | "
                         f"{_fmt(r['value'], r['unit'])} | {unit} | {r.get('note', '')} |")
    head_measured = _measured(m, results["argv"])
    for section in ["baseline"] + ALL_SECTIONS:
        body = results.get(section)
        if not isinstance(body, dict):
            continue
        notes = body.get("notes") or ""
        notes = notes if isinstance(notes, str) else "; ".join(notes)
        if body.get("measured") and body["measured"] != head_measured:
            notes = f"measured {body['measured']}" + (f"; {notes}" if notes else "")
        if notes:
            lines += ["", f"{section}: {notes}"]
    return "\n".join(lines)


def write_build_md(path: str, table: str) -> None:
    """Replace the text between the benchmark markers (add the section if missing)."""
    with open(path) as f:
        text = f.read()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Measured performance\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv):
    del argv
    if FLAGS.child:
        child_main(json.loads(FLAGS.child))
        return 0
    unknown = [s for s in FLAGS.sections if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; choose from {ALL_SECTIONS}",
              file=sys.stderr)
        return 2
    unknown = [v for v in FLAGS.pipeline_variants if v not in PIPELINE_VARIANTS]
    if unknown:
        print(f"error: unknown pipeline variant(s) {unknown}; choose from "
              f"{list(PIPELINE_VARIANTS)}", file=sys.stderr)
        return 2
    try:
        if any(int(c) < 1 for c in FLAGS.cores):
            raise ValueError
    except ValueError:
        print(f"error: --cores must be positive integers, got {FLAGS.cores}", file=sys.stderr)
        return 2
    if FLAGS.repeats < 1 or FLAGS.num_clips < 100:
        print("error: --repeats must be >= 1 and --num_clips >= 100 (one batch of 100)",
              file=sys.stderr)
        return 2
    os.makedirs(FLAGS.out, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "device": FLAGS.device,
                               "repeats": 1 if FLAGS.quick else FLAGS.repeats,
                               "quick": FLAGS.quick, "argv": " ".join(sys.argv[1:]),
                               "baseline": baseline_section()}
    if FLAGS.device == "gpu" and not results["machine"]["gpus"]:
        print("error: --device=gpu but TensorFlow sees no GPU (install tensorflow[and-cuda])",
              file=sys.stderr)
        return 2
    previous = os.path.join(FLAGS.out, "results.json")
    if FLAGS.merge and os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        if bool(old.get("quick")) != bool(FLAGS.quick) or old.get("device") != FLAGS.device:
            print("error: --merge: the earlier results differ in --quick / --device",
                  file=sys.stderr)
            return 2
        for name in ALL_SECTIONS:
            if name in old and name not in FLAGS.sections:
                results[name] = old[name]
                results[name].setdefault("measured", _measured(old["machine"], old["argv"]))
    num_clips = 200 if FLAGS.quick else FLAGS.num_clips
    ctx: dict[str, Any] = {"repeats": results["repeats"], "model": _quick_settings(),
                           "batches_per_repeat": 1 if FLAGS.quick else FLAGS.batches_per_repeat}
    if {"pipeline", "rss", "torch"} & set(FLAGS.sections):
        ctx["data"] = ensure_data(FLAGS.out, num_clips)
    for name in ALL_SECTIONS:  # fixed order: torch compares with the pipeline figures
        if name not in FLAGS.sections:
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        try:
            results[name] = SECTIONS[name](results, ctx)
        except ChildFailed as e:
            print(e, file=sys.stderr)
            results[name] = {"rows": [], "notes": str(e).splitlines()[0]}
        results[name]["seconds"] = round(time.time() - t0, 1)
        results[name]["measured"] = _measured(results["machine"], results["argv"])
        for r in results[name]["rows"]:
            print(f"  {r['config']} [{r['cores']} cores]: {_fmt(r['value'], r['unit'])} "
                  f"{'' if r['unit'] == 'ratio' else r['unit']}", flush=True)
        tmp = os.path.join(FLAGS.out, "results.json.tmp")
        with open(tmp, "w") as f:  # after each section: a killed run keeps what it measured
            json.dump(results, f, indent=1)
        os.replace(tmp, os.path.join(FLAGS.out, "results.json"))
    table = to_markdown(results)
    with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if FLAGS.write_build_md:
        write_build_md(FLAGS.build_md, table)
        print(f"wrote the table into {FLAGS.build_md}")
    return 0


if __name__ == "__main__":
    app.run(main)
