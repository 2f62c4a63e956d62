"""The i.i.d. order's records read at their offsets vs held in memory (``--records_in_memory_mb``).

The input pipeline (balanced i.i.d. draws, mixup 0.5; ``--variant=masking`` adds the fbank and
masks per clip in tf.data, ``mixup`` stops at the waveform batches the CPU trainer feeds the
model) on prepared 10-s clips, in a process set up by ``configure_input_host`` on ``--cores``
cores: each record read at its byte offset (``records_in_memory_mb=0``) and looked up in the
records held in memory (the default for a set under 1,024 MB). The two forms alternate in one
process, a fresh iterator per round (this VM's speed drifts between processes by more than the
effect); reported: clips/s and process CPU ms per clip (medians of the rounds) and the median
of the per-round ratios. Data: ``benchmarks/run.py`` writes it (``--out``/data_1000).

    python benchmarks/records_in_memory.py --glob='bench_out/data_1000/train-*.tfrecord' \
        --variant=masking --rounds=8

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
    ap.add_argument("--glob", required=True, help="prepared training shards")
    ap.add_argument("--variant", choices=["mixup", "masking"], default="masking")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batches", type=int, default=15, help="timed batches of 100 per round")
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    from psla_tf.data import pipeline
    pipeline.configure_input_host()
    import tensorflow as tf

    from psla_tf import params
    from psla_tf.data.records import load_data_spec
    from psla_tf.models.frontend import AudioFrontend

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    data = load_data_spec(args.glob)
    frontend = AudioFrontend(params.TARGET_LENGTH, freqm=params.FREQM, timem=params.TIMEM,
                             seed=0)
    batch = 100

    def batches(in_memory_mb: int):
        kw = dict(batch_size=batch, clip_samples=pipeline.clip_samples_for_frames(),
                  mixup=0.5, seed=0, num_epochs=10_000, records_in_memory_mb=in_memory_mb)
        if args.variant == "masking":
            kw.update(features_in_pipeline=True,
                      frontend=lambda w, n: frontend(w, n, training=True))
        opts = tf.data.Options()
        opts.threading.private_threadpool_size = args.cores
        return iter(pipeline.make_train_dataset(data, **kw).with_options(opts))

    def consume(it, k: int) -> None:
        for _ in range(k):
            tf.nest.map_structure(lambda t: t.numpy(), next(it))

    forms = {"offsets": 0, "in_memory": params.RECORDS_IN_MEMORY_MB}
    rate: dict[str, list[float]] = {k: [] for k in forms}
    cpu: dict[str, list[float]] = {k: [] for k in forms}
    for r in range(args.rounds):
        for name in (list(forms) if r % 2 == 0 else list(reversed(forms))):
            it = batches(forms[name])
            consume(it, 4)                                  # trace, fill the buffers
            c0, t0 = time.process_time(), time.perf_counter()
            consume(it, args.batches)
            clips = args.batches * batch
            rate[name].append(clips / (time.perf_counter() - t0))
            cpu[name].append(1000.0 * (time.process_time() - c0) / clips)
            del it
    ratios = [m / o for m, o in zip(rate["in_memory"], rate["offsets"])]
    print(json.dumps({
        "variant": args.variant, "cores": args.cores, "rounds": args.rounds,
        "clips_per_s": {k: round(statistics.median(v), 1) for k, v in rate.items()},
        "cpu_ms_per_clip": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "ratio_per_round": [round(x, 3) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 3)}))


if __name__ == "__main__":
    main()
