"""Bounded memory (issue 7, section 5): the input pipeline's memory depends on its flags
(shuffle buffer, prefetch, parallelism), not on the dataset size.

main.py trains one epoch on N = 40 and on 10 N = 400 clips of 20 s (24 vs 244 MB of
waveforms, shards of 5 clips: 8 vs 80 shards, so both sets fill the interleave's cycle of 8
shards) with the same flags and eval set; the peak RSS of the two processes (the child's
``VmHWM``, run side by side) must agree within 15 % (the issue's criterion) and, so that a
set held in memory fails even against the ~1.2 GB baseline, grow by less than the larger
set's extra 220 MB. The model is MobileNetV2 (a keras.applications backbone: a realistic
baseline for the 15 % criterion). Both run with ``--records_in_memory_mb=100``: the small
set is held in memory, the large one is read record by record (above the budget), so the test
also checks that the budget holds.
Measured on the shared machine: 1157 vs 1171 MB (+14 MB, +1.2 %; EfficientNet-B0 with one
head: 1466 vs 1468 MB).
Before the interleave was bounded (see ``pipeline._traversal``), the shards opened ahead,
each with a 4 MB read buffer, grew with the shard count: 1868 vs 2156 MB (+15.4 %) with
2 vs 20 shards of 20 clips.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from test_train_e2e import MIDS, ROOT

from psla_tf.data import records

SECONDS = 20.0
PER_SHARD = 5  # 3.2 MB shards: the small set (8 shards) already fills the interleave cycle


def _write(prefix: str, n: int, seed: int) -> str:
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(MIDS), int)
    shards = []
    num_shards = max(1, n // PER_SHARD)
    per = n // num_shards
    for s in range(num_shards):
        path = records.shard_name(prefix, s, num_shards)
        with tf.io.TFRecordWriter(path) as w:
            for i in range(s * per, (s + 1) * per):
                k = i % len(MIDS)
                counts[k] += 1
                wave = rng.integers(-4000, 4000, int(SECONDS * 16000)).astype("<i2")
                w.write(records.make_example(f"c{i}.wav", wave, [k], [MIDS[k]]))
        shards.append({"file": os.path.basename(path), "num_examples": per})
    records.Manifest(num_examples=per * num_shards, shards=shards, mids=list(MIDS),
                     names=[m.strip("/") for m in MIDS], class_counts=counts.tolist(),
                     max_seconds=SECONDS, fbank_mean=-6.0, fbank_std=4.0,
                     fbank_frames=1000 * n).write(records.manifest_path(prefix))
    return prefix + "-*.tfrecord"


def _peak_rss_mb(train: str, ev: str, exp: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    # the child prints its own peak (VmHWM) at exit: ru_maxrss from wait4 would include the
    # pytest parent's peak, which Linux carries across fork + exec
    wrapper = ("import atexit, runpy, sys\n"
               "def hwm():\n"
               "    l = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
               "    print('PEAK_RSS_KB', l.split()[1], flush=True)\n"
               "atexit.register(hwm)\n"
               "sys.argv = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.Popen(
        [sys.executable, "-c", wrapper, os.path.join(ROOT, "main.py"), f"--train_data={train}",
         f"--eval_data={ev}", f"--exp_dir={exp}", "--n_epochs=1", "--batch_size=20",
         "--eval_batch_size=8", "--nowa", "--model=mobilenet_v2", "--target_length=48",
         "--shuffle_buffer=32", "--verbose=0", "--nosave_predictions", "--mixup=0.5",
         "--pretrained=none", "--records_in_memory_mb=100"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_rss(p: subprocess.Popen, timeout: float = 400) -> float:
    import select
    out = []
    # drain stdout while waiting (a full pipe would block the child)
    while True:
        r, _, _ = select.select([p.stdout], [], [], timeout)
        if not r:
            p.kill()
            raise AssertionError("timed out")
        chunk = p.stdout.read()
        if not chunk:
            break
        out.append(chunk)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0, "".join(out)[-3000:]
    text = "".join(out)
    assert "PEAK_RSS_KB" in text, text[-3000:]
    return int(text.split("PEAK_RSS_KB")[-1].split()[0]) / 1024.0  # kB → MB


def test_peak_rss_independent_of_dataset_size(tmp_path):
    ev = _write(str(tmp_path / "eval"), 8, 9)
    small = _write(str(tmp_path / "small"), 40, 1)
    large = _write(str(tmp_path / "large"), 400, 2)
    p_small = _peak_rss_mb(small, ev, str(tmp_path / "exp_small"))
    p_large = _peak_rss_mb(large, ev, str(tmp_path / "exp_large"))
    rss_small, rss_large = _wait_rss(p_small), _wait_rss(p_large)
    data_mb = 400 * SECONDS * 16000 * 2 / 2 ** 20
    extra_mb = (400 - 40) * SECONDS * 16000 * 2 / 2 ** 20
    print(f"peak RSS: N=40 {rss_small:.0f} MB, N=400 {rss_large:.0f} MB "
          f"(the larger set holds {data_mb:.0f} MB of waveforms)")
    assert abs(rss_large - rss_small) <= 0.15 * rss_small, (rss_small, rss_large)
    # discriminating: holding the larger set (even serialised, int16) adds >= extra_mb on top
    # of the run-to-run noise (measured growth of the streaming pipeline: 51-146 MB)
    assert rss_large - rss_small < extra_mb, (rss_small, rss_large, extra_mb)
