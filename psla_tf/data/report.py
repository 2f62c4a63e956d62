"""What the training pipeline actually draws (paper Figs. 5 and 6), counted on its output.

:func:`sampling_report` runs :func:`psla_tf.data.pipeline.make_train_dataset` with
``with_ids=True`` and tallies, per example, how often it was drawn and whether it was used at
all (a mixup partner counts as used), then compares the per-class draw counts with the exact
expectation N * sum_{i in class k} p_i (:func:`psla_tf.data.sampling.expected_class_frequency`).
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable

import numpy as np
import tensorflow as tf

from psla_tf.data import pipeline, records, sampling
from psla_tf.data.records import DataSpec

__all__ = ["LabelIndex", "read_label_index", "SamplingTally", "sampling_report",
           "write_class_frequency_csv", "write_unseen_csv", "plot_report"]


@dataclasses.dataclass
class LabelIndex:
    """Every training example's pipeline key and labels (CSR: ``indptr``, ``indices``)."""
    keys: np.ndarray      # int64 [N], sorted
    indptr: np.ndarray    # int64 [N + 1]
    indices: np.ndarray   # int64 [nnz]
    num_classes: int

    @property
    def num_examples(self) -> int:
        return int(self.keys.shape[0])

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key; raises if a key is unknown."""
        keys = np.asarray(keys, np.int64)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        if np.any(self.keys[pos] != keys):
            raise ValueError("pipeline produced keys that are not in the label index")
        return pos

    def multi_hot(self) -> np.ndarray:
        hot = np.zeros((self.num_examples, self.num_classes), np.float64)
        rows = np.repeat(np.arange(self.num_examples), np.diff(self.indptr))
        hot[rows, self.indices] = 1.0
        return hot

    def class_totals(self, per_example: np.ndarray) -> np.ndarray:
        """sum_{i : k in labels(i)} per_example[i] for every class k."""
        rows = np.repeat(np.arange(self.num_examples), np.diff(self.indptr))
        out = np.zeros(self.num_classes, np.float64)
        np.add.at(out, self.indices, np.asarray(per_example, np.float64)[rows])
        return out


def read_label_index(data: str | DataSpec, progress: bool = True) -> LabelIndex:
    """One pass over the shards parsing only the labels (keys as the pipeline makes them)."""
    spec = pipeline.resolve_data(data)
    reader = pipeline._Reader(spec)  # same keys and the same shard checks as training
    spec_labels = {"labels": records.FEATURE_SPEC["labels"]}

    def parse(key, rec):
        ex = tf.io.parse_single_example(rec, spec_labels)
        return key, tf.unique(tf.sparse.to_dense(ex["labels"]))[0]

    ds = tf.data.Dataset.range(len(spec.files)).flat_map(reader).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    keys, indices, lengths = [], [], []
    it = ds.as_numpy_iterator()
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=spec.num_examples, desc="labels", unit="clip")
    for key, labs in it:
        keys.append(key)
        indices.append(labs)
        lengths.append(len(labs))
    keys = np.asarray(keys, np.int64)
    order = np.argsort(keys, kind="stable")
    lengths = np.asarray(lengths, np.int64)[order]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = [indices[i] for i in order]
    ind = np.concatenate(flat).astype(np.int64) if flat else np.zeros(0, np.int64)
    return LabelIndex(keys=keys[order], indptr=indptr, indices=ind,
                      num_classes=spec.num_classes)


class SamplingTally:
    """Per-example draw counts and the unseen fraction after every epoch (Fig. 6)."""

    def __init__(self, index: LabelIndex):
        self.index = index
        self.draws = np.zeros(index.num_examples, np.int64)        # as the drawn example i
        self.partner_uses = np.zeros(index.num_examples, np.int64)  # as a mixup partner j
        self.used = np.zeros(index.num_examples, bool)
        self.unseen: list[float] = []
        self.epoch_draws: list[np.ndarray] = []
        self._current = np.zeros(index.num_examples, np.int64)

    def update(self, keys: np.ndarray, partner_keys: np.ndarray | None = None) -> None:
        pos = self.index.positions(keys)
        np.add.at(self._current, pos, 1)
        self.used[pos] = True
        if partner_keys is not None:
            pk = np.asarray(partner_keys, np.int64)
            pk = pk[pk >= 0]
            if pk.size:
                ppos = self.index.positions(pk)
                np.add.at(self.partner_uses, ppos, 1)
                self.used[ppos] = True

    def end_epoch(self) -> float:
        self.draws += self._current
        self.epoch_draws.append(self._current)
        self._current = np.zeros_like(self._current)
        frac = 1.0 - float(self.used.mean()) if self.used.size else 0.0
        self.unseen.append(frac)
        return frac

    def observed_class_frequency(self) -> np.ndarray:
        """Mean number of drawn examples (not partners) labelled k per epoch."""
        epochs = max(1, len(self.epoch_draws))
        return self.index.class_totals(self.draws) / epochs


def sampling_report(train_data: str | DataSpec, epochs: int, *, mixup: float = 0.0,
                    balanced_sampling: bool = True, batch_size: int = 100, seed: int = 0,
                    initial_epoch: int = 0, shuffle_buffer: int = 1000,
                    clip_samples: int = 400, progress: bool = True) -> dict:
    """Run the training pipeline for ``epochs`` epochs and tally what it draws.

    ``clip_samples`` only sets the padded waveform length of the batches, which does not
    influence what is drawn; it is small by default to keep the run light.
    Returns a dict with ``spec``, ``index``, ``tally``, ``expected`` (per class per epoch) and
    ``steps`` (batches per epoch).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    spec = pipeline.resolve_data(train_data)
    index = read_label_index(spec, progress=progress)
    expected = sampling.expected_class_frequency(
        index.multi_hot(), spec.class_counts, num_examples=spec.num_examples,
        balanced=balanced_sampling) if balanced_sampling else index.class_totals(
        np.ones(index.num_examples))
    steps = pipeline.steps_per_epoch(spec.num_examples, batch_size)
    ds = pipeline.make_train_dataset(
        spec, batch_size=batch_size, clip_samples=clip_samples,
        balanced_sampling=balanced_sampling, mixup=mixup, seed=seed,
        initial_epoch=initial_epoch, num_epochs=epochs, with_ids=True,
        shuffle_buffer=shuffle_buffer)
    ds = ds.map(lambda f, y: (f["key"], f["partner_key"]))
    tally = SamplingTally(index)
    it = ds.as_numpy_iterator()
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=steps * epochs, desc="sampling", unit="batch")
    for step, (keys, pkeys) in enumerate(it, start=1):
        tally.update(keys, pkeys)
        if step % steps == 0:
            tally.end_epoch()
    return {"spec": spec, "index": index, "tally": tally, "expected": expected,
            "steps": steps}


def write_class_frequency_csv(path: str, spec: DataSpec, expected: np.ndarray,
                              observed: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "mid", "name", "count", "expected_per_epoch",
                    "observed_per_epoch"])
        for k in range(spec.num_classes):
            w.writerow([k, spec.mids[k], spec.names[k], int(spec.class_counts[k]),
                        f"{expected[k]:.6g}", f"{observed[k]:.6g}"])


def write_unseen_csv(path: str, unseen: Iterable[float], initial_epoch: int = 0) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "unseen_fraction"])
        for e, u in enumerate(unseen, start=initial_epoch + 1):
            w.writerow([e, f"{u:.6f}"])


def plot_report(out_dir: str, spec: DataSpec, expected: np.ndarray, observed: np.ndarray,
                unseen: list[float], title: str = "") -> list[str]:
    """Fig. 5 (class frequency sorted by count) and Fig. 6 (unseen fraction) as PNGs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    order = np.argsort(-np.asarray(spec.class_counts), kind="stable")
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(order))
    ax.plot(x, np.asarray(spec.class_counts)[order], label="c_k (one traversal)")
    ax.plot(x, expected[order], label="expected per epoch")
    ax.plot(x, observed[order], ".", ms=3, label="observed per epoch")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("class (sorted by count)")
    ax.set_ylabel("examples per epoch")
    ax.set_title(f"Sampled class frequency {title}".strip())
    ax.legend()
    fig.tight_layout()
    p = os.path.join(out_dir, "class_frequency.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(unseen) + 1), 100.0 * np.asarray(unseen), "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("unseen examples (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Unseen examples {title}".strip())
    fig.tight_layout()
    p = os.path.join(out_dir, "unseen.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths
