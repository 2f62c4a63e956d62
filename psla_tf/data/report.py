"""What the training pipeline actually draws (paper Figs. 5 and 6), counted on its output and
set beside what i.i.d. draws give.

:func:`sampling_report` runs :func:`psla_tf.data.pipeline.make_train_dataset` itself (the
training code path, ``with_ids=True``) and tallies, batch by batch:

* per example: how often it was drawn and how often it was a mixup partner; the unseen
  fraction per epoch counting only drawn examples (= the same run without mixup: the draws do
  not depend on mixup) and counting partners too (Fig. 6);
* the order: pairs of copies of one clip inside a batch, the spacing of a clip's first two
  copies in the epoch, the histogram of copies per clip and of partner uses per clip.

The i.i.d. reference, for an epoch of L draws of which M are mixed, P(i) = p_i (balanced:
w_i / W; otherwise every clip once, in random order):

* copies of clip i ~ Binomial(L, p_i); repeat pairs per batch of B: B(B-1)/2 * sum_i p_i^2;
* partner uses of a clip ~ Binomial(M, 1/N) (≈ Poisson(m) when L = N);
* given k copies, their positions are a uniform k-subset of the L positions: the gap g between
  two consecutive copies has P(g >= x) = C(L - x + 1, k) / C(L, k) and mean (L + 1) / (k + 1);
* P(i unseen after E epochs) = (1 - p_i)^(L E) without mixup, times (1 - m/N)^(L E) with it —
  the paper's e^(-E N p_i) e^(-m E) for L = N.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import special, stats

from psla_tf.data import pipeline, sampling
from psla_tf.data.records import DataSpec

__all__ = ["LabelIndex", "read_label_index", "SamplingTally", "sampling_report",
           "draw_probabilities", "expected_unseen", "gap_survival", "gap_pit",
           "write_class_frequency_csv", "write_unseen_csv", "write_order_csv",
           "write_histograms_csv", "plot_report"]


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

    def sampling_weights(self, class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
        """w_i = sum_{k in labels(i)} 1/c_k (Algorithm 1, Procedure 1), float64 [N]."""
        inv = sampling.inverse_class_counts(class_counts)
        rows = np.repeat(np.arange(self.num_examples), np.diff(self.indptr))
        w = np.zeros(self.num_examples, np.float64)
        np.add.at(w, rows, inv[self.indices])
        return w


def read_label_index(data: str | DataSpec, progress: bool = True) -> LabelIndex:
    """Keys (as the pipeline makes them) and labels of every record, from the shards' record
    index (:mod:`psla_tf.data.record_index`: cached beside the manifest, else one pass)."""
    from psla_tf.data import record_index
    spec = pipeline.resolve_data(data)
    idx = record_index.load_record_index(spec, progress=progress)
    return LabelIndex(keys=idx.keys(), indptr=idx.label_indptr,
                      indices=idx.label_indices.astype(np.int64), num_classes=spec.num_classes)


# ----------------------------------------------------------------------------- i.i.d. math
def draw_probabilities(index: LabelIndex, class_counts: Sequence[int] | np.ndarray,
                       balanced: bool) -> np.ndarray | None:
    """p_i of one draw (balanced: w_i / W), or None without balanced sampling."""
    if not balanced:
        return None
    w = index.sampling_weights(class_counts)
    return w / w.sum()


def expected_unseen(p: np.ndarray | None, num_examples: int, draws: int, epochs: int,
                    mixup: float = 0.0) -> np.ndarray:
    """E[fraction never used] after epochs 1..``epochs`` of ``draws`` i.i.d. draws each.

    Balanced (``p`` given): mean_i (1 - p_i)^(L e) (1 - m/N)^(L e). Without balanced
    sampling each epoch uses the first L of a random permutation: ((N - L)/N)^e for the
    drawn examples, times the same partner factor.
    """
    n = int(num_examples)
    e = np.arange(1, epochs + 1, dtype=np.float64)
    partner = np.exp(draws * e * np.log1p(-mixup / n)) if mixup > 0 else np.ones_like(e)
    if p is None:
        return ((n - draws) / n) ** e * partner
    log_q = np.log1p(-np.minimum(p, 1 - 1e-16))
    return np.array([np.mean(np.exp(draws * ee * log_q)) for ee in e]) * partner


def gap_survival(x: np.ndarray, k: np.ndarray, draws: int) -> np.ndarray:
    """P(gap >= x) between consecutive copies of a clip with k copies in L = ``draws``
    i.i.d. positions: C(L - x + 1, k) / C(L, k) (1 for x <= 1)."""
    x = np.asarray(x, np.float64)
    k = np.asarray(k, np.float64)
    m = draws - x + 1
    ok = m >= k
    logs = np.where(ok, special.gammaln(np.maximum(m, k) + 1) - special.gammaln(k + 1)
                    - special.gammaln(np.maximum(m - k, 0) + 1), -np.inf)
    logs -= special.gammaln(draws + 1) - special.gammaln(k + 1) - special.gammaln(draws - k + 1)
    return np.where(x <= 1, 1.0, np.exp(logs))


def gap_pit(gaps: np.ndarray, k: np.ndarray, draws: int, rng: np.random.Generator
            ) -> np.ndarray:
    """Randomised probability integral transform of the gaps: U(0, 1) under i.i.d. draws."""
    upper = 1.0 - gap_survival(gaps + 1, k, draws)   # P(G <= g)
    lower = 1.0 - gap_survival(gaps, k, draws)       # P(G <= g - 1)
    return lower + rng.random(len(gaps)) * (upper - lower)


def _binomial_histogram(n: int, p: np.ndarray, kmax: int) -> np.ndarray:
    """E[#clips with k successes], k = 0..kmax-1 and >= kmax last (sum_i Binom(n, p_i))."""
    k = np.arange(kmax)
    out = np.zeros(kmax + 1)
    for chunk in np.array_split(p, max(1, len(p) // 100_000)):
        pmf = stats.binom.pmf(k[None, :], n, chunk[:, None])
        out[:kmax] += pmf.sum(0)
    out[kmax] = len(p) - out[:kmax].sum()
    return np.maximum(out, 0.0)


def _chi2_pvalue(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0
                 ) -> float | None:
    """Pearson chi-square p-value after pooling the tail bins with expectation < 5."""
    obs, exp = list(np.asarray(observed, float)), list(np.asarray(expected, float))
    while len(exp) > 1 and exp[-1] < min_expected:  # pool the tail into the bin before
        tail_e, tail_o = exp.pop(), obs.pop()
        exp[-1] += tail_e
        obs[-1] += tail_o
    o, e = np.array(obs), np.array(exp)
    keep = e > 0
    if keep.sum() < 2:
        return None
    o, e = o[keep], e[keep]
    e = e * o.sum() / e.sum()
    return float(stats.chi2.sf(((o - e) ** 2 / e).sum(), len(e) - 1))


# ----------------------------------------------------------------------------- tally
class SamplingTally:
    """Counts of the stream, batch by batch, and per-epoch statistics (see module doc).

    ``p``: i.i.d. draw probabilities (None without balanced sampling); ``mixup``: the rate.
    """

    def __init__(self, index: LabelIndex, p: np.ndarray | None = None, mixup: float = 0.0,
                 batch_size: int | None = None, seed: int = 0):
        n = index.num_examples
        self.index, self.p, self.mixup, self.batch_size = index, p, float(mixup), batch_size
        self.draws = np.zeros(n, np.int64)          # as the drawn example i (all epochs)
        self.partner_uses = np.zeros(n, np.int64)   # as a mixup partner j (all epochs)
        self.used = np.zeros(n, bool)               # drawn or partner
        self.drawn = np.zeros(n, bool)              # drawn (= used without mixup)
        self.unseen: list[float] = []
        self.unseen_without_mixup: list[float] = []
        self.epochs: list[dict[str, Any]] = []
        self._rng = np.random.default_rng(seed)
        self._new_epoch()

    def _new_epoch(self) -> None:
        n = self.index.num_examples
        self._copies = np.zeros(n, np.int64)
        self._partners = np.zeros(n, np.int64)
        self._first = np.full(n, -1, np.int64)
        self._second = np.full(n, -1, np.int64)
        self._pos = 0
        self._repeat_pairs = 0
        self._max_in_batch = 0
        self._mixed = 0

    def update(self, keys: np.ndarray, partner_keys: np.ndarray | None = None) -> None:
        """One batch, in stream order."""
        rows = self.index.positions(keys)
        positions = self._pos + np.arange(len(rows))
        self._pos += len(rows)
        # first and second position of each clip in the epoch (rows may repeat in a batch)
        for r, q in zip(rows.tolist(), positions.tolist()):
            if self._first[r] < 0:
                self._first[r] = q
            elif self._second[r] < 0:
                self._second[r] = q
        np.add.at(self._copies, rows, 1)
        _, mult = np.unique(rows, return_counts=True)
        self._repeat_pairs += int((mult * (mult - 1) // 2).sum())
        self._max_in_batch = max(self._max_in_batch, int(mult.max()) if len(mult) else 0)
        self.used[rows] = True
        self.drawn[rows] = True
        if partner_keys is not None:
            pk = np.asarray(partner_keys, np.int64)
            pk = pk[pk >= 0]
            self._mixed += int(pk.size)
            if pk.size:
                prow = self.index.positions(pk)
                np.add.at(self._partners, prow, 1)
                self.used[prow] = True

    def end_epoch(self) -> float:
        """Close the epoch: its statistics go to ``epochs``; returns the unseen fraction."""
        n = self.index.num_examples
        self.draws += self._copies
        self.partner_uses += self._partners
        frac = 1.0 - float(self.used.mean()) if n else 0.0
        self.unseen.append(frac)
        self.unseen_without_mixup.append(1.0 - float(self.drawn.mean()) if n else 0.0)
        self.epochs.append(self._epoch_stats())
        self._new_epoch()
        return frac

    def _epoch_stats(self) -> dict[str, Any]:
        n, L, M = self.index.num_examples, self._pos, self._mixed
        B = self.batch_size or L
        steps = L // B if B else 0
        out: dict[str, Any] = {"epoch": len(self.epochs) + 1, "draws": L, "mixed": M}
        # copies per clip
        kmax = int(max(self._copies.max(), 1)) + 1
        obs = np.bincount(np.minimum(self._copies, kmax), minlength=kmax + 1).astype(float)
        if self.p is not None:
            exp = _binomial_histogram(L, self.p, kmax)
            pair_exp = steps * B * (B - 1) / 2 * float(np.sum(self.p ** 2))
        else:
            exp = np.zeros(kmax + 1)
            exp[0], exp[1] = n - min(L, n), min(L, n)
            pair_exp = 0.0
        out.update(copies_observed=obs, copies_expected=exp,
                   copies_pvalue=_chi2_pvalue(obs, exp),
                   repeat_pairs=self._repeat_pairs, repeat_pairs_expected=pair_exp,
                   max_copies_in_batch=self._max_in_batch)
        # partner uses per clip ~ Binomial(M, 1/N)
        if M:
            jmax = int(self._partners.max()) + 1
            pobs = np.bincount(np.minimum(self._partners, jmax), minlength=jmax + 1)
            pexp = np.zeros(jmax + 1)
            pexp[:jmax] = n * stats.binom.pmf(np.arange(jmax), M, 1.0 / n)
            pexp[jmax] = max(n - pexp[:jmax].sum(), 0.0)
            out.update(partners_observed=pobs.astype(float), partners_expected=pexp,
                       partners_pvalue=_chi2_pvalue(pobs, pexp))
        # spacing of a clip's first two copies
        two = np.flatnonzero(self._second >= 0)
        if two.size:
            k = self._copies[two]
            gaps = (self._second[two] - self._first[two]).astype(np.float64)
            ratio = gaps * (k + 1) / (L + 1)       # mean 1 under i.i.d. positions
            within = float(np.mean(gaps < B))
            within_exp = float(np.mean(1.0 - gap_survival(np.full(k.shape, B), k, L)))
            pit = gap_pit(gaps, k, L, self._rng)
            out.update(clips_with_copies=int(two.size), gap_ratio_mean=float(ratio.mean()),
                       gap_within_batch=within, gap_within_batch_expected=within_exp,
                       gap_ks_pvalue=float(stats.kstest(pit, "uniform").pvalue)
                       if two.size > 1 else None)
        return out

    def observed_class_frequency(self) -> np.ndarray:
        """Mean number of drawn examples (not partners) labelled k per epoch."""
        epochs = max(1, len(self.epochs))
        return self.index.class_totals(self.draws) / epochs


def sampling_report(train_data: str | DataSpec, epochs: int, *, mixup: float = 0.0,
                    balanced_sampling: bool = True, batch_size: int = 100, seed: int = 0,
                    initial_epoch: int = 0, shuffle_buffer: int = 1000,
                    sampling_order: str = "iid", clip_samples: int = 400,
                    stream_csv: str | None = None, progress: bool = True) -> dict:
    """Run the training pipeline for ``epochs`` epochs and tally what it draws.

    ``clip_samples`` only sets the padded waveform length of the batches, which does not
    influence what is drawn; it is small by default to keep the run light. ``stream_csv``
    writes the stream itself: ``epoch,position,id,partner`` per example in training order
    (epochs counted from 1 as in the training log, positions from 0 within the epoch,
    ``partner`` empty when not mixed).
    Returns a dict with ``spec``, ``index``, ``tally``, ``expected`` (per class per epoch),
    ``expected_unseen`` / ``expected_unseen_without_mixup`` (i.i.d.), ``p`` and ``steps``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    spec = pipeline.resolve_data(train_data)
    index = read_label_index(spec, progress=progress)
    p = draw_probabilities(index, spec.class_counts, balanced_sampling)
    steps = pipeline.steps_per_epoch(spec.num_examples, batch_size)
    draws = steps * batch_size
    expected = (p * draws) @ index.multi_hot() if p is not None else index.class_totals(
        np.full(index.num_examples, draws / max(1, index.num_examples)))
    ds = pipeline.make_train_dataset(
        spec, batch_size=batch_size, clip_samples=clip_samples,
        balanced_sampling=balanced_sampling, mixup=mixup, seed=seed,
        initial_epoch=initial_epoch, num_epochs=epochs, with_ids=True,
        shuffle_buffer=shuffle_buffer, sampling_order=sampling_order)
    ds = ds.map(lambda f, y: (f["key"], f["partner_key"], f["id"], f["partner_id"]))
    tally = SamplingTally(index, p, mixup, batch_size, seed)
    it = ds.as_numpy_iterator()
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=steps * epochs, desc="sampling", unit="batch")
    out = None
    writer = None
    if stream_csv:
        os.makedirs(os.path.dirname(os.path.abspath(stream_csv)), exist_ok=True)
        out = open(stream_csv + ".tmp", "w", newline="", encoding="utf-8")
        writer = csv.writer(out)
        writer.writerow(["epoch", "position", "id", "partner"])
    try:
        for step, (keys, pkeys, ids, pids) in enumerate(it, start=1):
            if writer is not None:
                epoch = initial_epoch + (step - 1) // steps + 1
                first = ((step - 1) % steps) * batch_size
                for j, (a, b) in enumerate(zip(ids.tolist(), pids.tolist())):
                    writer.writerow([epoch, first + j, a.decode("utf-8"), b.decode("utf-8")])
            tally.update(keys, pkeys)
            if step % steps == 0:
                tally.end_epoch()
    finally:
        if out is not None:
            out.close()
    if stream_csv:
        os.replace(stream_csv + ".tmp", stream_csv)
    n = index.num_examples
    return {"spec": spec, "index": index, "tally": tally, "expected": expected, "p": p,
            "steps": steps, "draws": draws,
            "expected_unseen": expected_unseen(p, n, draws, epochs, mixup),
            "expected_unseen_without_mixup": expected_unseen(p, n, draws, epochs, 0.0)}


# ----------------------------------------------------------------------------- outputs
def write_class_frequency_csv(path: str, spec: DataSpec, expected: np.ndarray,
                              observed: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "mid", "name", "count", "expected_per_epoch",
                    "observed_per_epoch"])
        for k in range(spec.num_classes):
            w.writerow([k, spec.mids[k], spec.names[k], int(spec.class_counts[k]),
                        f"{expected[k]:.6g}", f"{observed[k]:.6g}"])


def write_unseen_csv(path: str, unseen: Iterable[float], initial_epoch: int = 0,
                     without_mixup: Sequence[float] | None = None,
                     expected: Sequence[float] | None = None,
                     expected_without_mixup: Sequence[float] | None = None) -> None:
    """``epoch,unseen_fraction`` (+ the fraction without mixup and the i.i.d. expectations)."""
    unseen = list(unseen)
    cols = {"unseen_without_mixup": without_mixup, "expected_unseen": expected,
            "expected_unseen_without_mixup": expected_without_mixup}
    cols = {k: list(v) for k, v in cols.items() if v is not None}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "unseen_fraction", *cols])
        for i, u in enumerate(unseen):
            w.writerow([initial_epoch + i + 1, f"{u:.6f}",
                        *(f"{v[i]:.6f}" for v in cols.values())])


ORDER_COLUMNS = ("epoch", "draws", "mixed", "repeat_pairs", "repeat_pairs_expected",
                 "max_copies_in_batch", "copies_pvalue", "clips_with_copies",
                 "gap_ratio_mean", "gap_within_batch", "gap_within_batch_expected",
                 "gap_ks_pvalue", "partners_pvalue")


def write_order_csv(path: str, tally: SamplingTally, initial_epoch: int = 0) -> None:
    """One row per epoch: the order statistics next to their i.i.d. expectations."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ORDER_COLUMNS)
        for e in tally.epochs:
            row = dict(e, epoch=initial_epoch + e["epoch"])
            w.writerow([_fmt(row.get(c)) for c in ORDER_COLUMNS])


def write_histograms_csv(path: str, tally: SamplingTally, initial_epoch: int = 0) -> None:
    """``what,epoch,k,observed,expected``: clips drawn k times / used as partner k times."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["what", "epoch", "k", "observed", "expected"])
        for e in tally.epochs:
            for what in ("copies", "partners"):
                if f"{what}_observed" not in e:
                    continue
                obs, exp = e[f"{what}_observed"], e[f"{what}_expected"]
                for k in range(len(obs)):
                    label = f">={k}" if k == len(obs) - 1 else str(k)
                    w.writerow([what, initial_epoch + e["epoch"], label, int(obs[k]),
                                f"{exp[k]:.4f}"])


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def plot_report(out_dir: str, spec: DataSpec, expected: np.ndarray, observed: np.ndarray,
                unseen: list[float], title: str = "", *,
                unseen_without_mixup: Sequence[float] | None = None,
                expected_unseen: Sequence[float] | None = None,
                expected_unseen_without_mixup: Sequence[float] | None = None,
                mixup: float = 0.0, initial_epoch: int = 0) -> list[str]:
    """Fig. 5 (class frequency sorted by count) and Fig. 6 (unseen fraction per epoch, with
    and without mixup, observed and i.i.d. expected) as PNGs."""
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
    e = np.arange(initial_epoch + 1, initial_epoch + len(unseen) + 1)
    if unseen_without_mixup is not None:
        ax.plot(e, 100.0 * np.asarray(unseen_without_mixup), "o", color="tab:red",
                label="mixup rate 0 (observed)")
    if expected_unseen_without_mixup is not None:
        ax.plot(e, 100.0 * np.asarray(expected_unseen_without_mixup), "-", color="tab:red",
                alpha=0.6, label="mixup rate 0 (i.i.d. expectation)")
    if mixup > 0:
        ax.plot(e, 100.0 * np.asarray(unseen), "s", color="tab:blue",
                label=f"mixup rate {mixup:g} (observed)")
        if expected_unseen is not None:
            ax.plot(e, 100.0 * np.asarray(expected_unseen), "-", color="tab:blue", alpha=0.6,
                    label=f"mixup rate {mixup:g} (i.i.d. expectation)")
    elif unseen_without_mixup is None:
        ax.plot(e, 100.0 * np.asarray(unseen), "o-", label="observed")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("unseen examples (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Unseen examples (Fig. 6) {title}".strip())
    fig.tight_layout()
    p = os.path.join(out_dir, "unseen.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths
