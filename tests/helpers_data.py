"""Tiny TFRecord shard sets for data-pipeline tests (written with records.make_example)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from psla_tf.data import records


def write_shards(out_dir: str, waveforms: Sequence[np.ndarray], labels: Sequence[Sequence[int]],
                 num_classes: int, num_shards: int = 4, prefix: str = "train",
                 compression: str = "", ids: Sequence[str] | None = None) -> str:
    """Write examples in contiguous blocks over ``num_shards`` shards plus a manifest.

    ``waveforms`` are int16 arrays; example i goes to shard i * num_shards // n in order, so
    file order = example order. Returns the shard glob.
    """
    n = len(waveforms)
    mids = [f"/m/c{k}" for k in range(num_classes)]
    names = [f"class {k}" for k in range(num_classes)]
    counts = np.zeros(num_classes, np.int64)
    base = os.path.join(out_dir, prefix)
    bounds = [i * n // num_shards for i in range(num_shards + 1)]
    shards = []
    opts = tf.io.TFRecordOptions(compression_type=compression or None)
    for s in range(num_shards):
        path = records.shard_name(base, s, num_shards, compression)
        with tf.io.TFRecordWriter(path, opts) as w:
            for i in range(bounds[s], bounds[s + 1]):
                labs = sorted(set(int(k) for k in labels[i]))
                counts[labs] += 1
                cid = ids[i] if ids is not None else f"clip{i:05d}"
                w.write(records.make_example(cid, waveforms[i], labs, [mids[k] for k in labs]))
        shards.append({"file": os.path.basename(path), "num_examples": bounds[s + 1] - bounds[s]})
    records.Manifest(num_examples=n, shards=shards, mids=mids, names=names,
                     class_counts=counts.tolist(), compression=compression,
                     max_seconds=10.0).write(records.manifest_path(base))
    suffix = ".tfrecord.gz" if compression == "GZIP" else ".tfrecord"
    return f"{base}-*-of-{num_shards:05d}{suffix}"


def random_labels(n: int, num_classes: int, rng: np.random.Generator,
                  skew: float = 1.5, max_labels: int = 3) -> list[list[int]]:
    """Imbalanced multi-label sets: class k chosen with probability ∝ (k + 1) ** -skew."""
    p = (np.arange(num_classes) + 1.0) ** -skew
    p /= p.sum()
    out = []
    for _ in range(n):
        m = int(rng.integers(1, max_labels + 1))
        out.append(sorted(set(rng.choice(num_classes, size=m, p=p).tolist())))
    return out


def random_waveforms(n: int, rng: np.random.Generator, min_len: int = 1500,
                     max_len: int = 2500) -> list[np.ndarray]:
    """int16 noise clips of random lengths (short, for fast tests)."""
    return [rng.integers(-8000, 8000, size=int(rng.integers(min_len, max_len + 1)))
            .astype("<i2") for _ in range(n)]
