"""Preparation throughput (clips/s) with 1 and 2 workers on 10-s 44.1-kHz stereo clips.

Usage: python benchmarks/prepare_bench.py [num_clips] [workdir]
"""
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from psla_tf.data.prepare import benchmark_prepare  # noqa: E402

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    workdir = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="prepare_bench_")
    for stats in (True, False):
        res = benchmark_prepare(workdir, num_clips=n, seconds=10.0, sample_rate=44100,
                                workers_list=(1, 2), stats=stats)
        for w, cps in res.items():
            print(f"workers={w} stats={stats}: {cps:.2f} clips/s ({n} clips of 10 s, 44.1 kHz stereo)")
