"""Per-epoch evaluation, weight averaging and checkpoint ensemble (paper Sec. II-B, VI).

* :class:`EpochEvaluation` — after every epoch, scores of the evaluation set → mAP, mean AUC,
  d′, BCE loss and top-1 accuracy written into the epoch ``logs`` (so CSVLogger / TensorBoard record them)
  and, optionally, the score matrix to ``{predictions_dir}/{prefix}_epoch_{e:03d}.npy``.
* :class:`CheckpointEnsemble` — Sec. VI-B: the average of every epoch's evaluation scores
  (epochs 1..E), accumulated as training goes; its metrics are logged each epoch.
* :class:`WeightAveraging` — Sec. VI-A: the equal average of all weights (``model.weights``:
  trainable weights and BatchNorm moving statistics, not optimizer state) of the epoch-end
  models from ``wa_start`` to ``wa_end`` inclusive (1-based epochs), accumulated in float64.
  The reference loads the start epoch and then adds start..end again, counting the start
  epoch twice; we implement the equal average the paper describes.
  :func:`refresh_batchnorm` then re-estimates the averaged model's BatchNorm statistics on
  training batches (SWA's BN update; the trainer's ``--wa_bn_batches``, not in the reference).

Accumulators save their state to an ``.npz`` (atomically: temp file + rename) after every
epoch and restore it with :meth:`restore`, so a killed run can resume without double counting.
"""
from __future__ import annotations

import os
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from psla_tf import atomic
from psla_tf import metrics, run_folder
from psla_tf.errors import NonFiniteLossError
from psla_tf.models.batchnorm import BatchNormStatistics, batchnorm_layers  # noqa: F401


def inputs_only(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``(features, labels)`` batches → features only (for ``model.predict``)."""
    return dataset.map(lambda x, y: x)


def collect_targets(dataset: tf.data.Dataset) -> np.ndarray:
    """Concatenate the label batches of a ``(features, labels)`` dataset."""
    return np.concatenate([y.numpy() for y in dataset.map(lambda x, y: y)], axis=0)


class EpochEvaluation(keras.callbacks.Callback):
    """Evaluate on a held-out set after every epoch (Sec. II-B) and log the metrics.

    Logs ``{prefix}_mAP``, ``{prefix}_AUC``, ``{prefix}_d_prime``, ``{prefix}_loss``,
    ``{prefix}_accuracy``.
    ``history`` keeps one dict per epoch; ``last_scores`` the latest score matrix.
    """

    def __init__(self, dataset: tf.data.Dataset, prefix: str = "eval",
                 predictions_dir: str | None = None, targets: np.ndarray | None = None,
                 verbose: int = 1):
        super().__init__()
        self.dataset = dataset
        self.prefix = prefix
        self.predictions_dir = predictions_dir
        self.targets = collect_targets(dataset) if targets is None else np.asarray(targets)
        self.verbose = verbose
        self.history: list[dict[str, float]] = []
        self.last_scores: np.ndarray | None = None
        self.last_epoch: int | None = None
        if predictions_dir:
            os.makedirs(predictions_dir, exist_ok=True)
            atomic.save_npy(os.path.join(predictions_dir, run_folder.targets_name(prefix)),
                             self.targets.astype(np.float32))

    #: predict on this process's default device with a plain loop instead of
    #: ``model.predict`` (set under MultiWorkerMirroredStrategy: every worker scores the whole
    #: set itself, with no collective ops, so the result equals a single-device run)
    local_predict: bool = False

    def predict(self, model: keras.Model | None = None) -> np.ndarray:
        """Scores of the whole set ``[N, C]`` (inference mode: no masking)."""
        model = model or self.model
        if self.local_predict:
            fns = self.__dict__.setdefault("_local_fns", {})  # one trace per model
            step = fns.get(id(model))
            if step is None:
                step = fns[id(model)] = tf.function(lambda x: model(x, training=False))
            scores = np.concatenate([np.asarray(step(x)) for x in inputs_only(self.dataset)])
        else:
            scores = model.predict(inputs_only(self.dataset), verbose=0)
        scores = np.asarray(scores, np.float32)
        if scores.shape != self.targets.shape:
            raise ValueError(f"{self.prefix}: scores {scores.shape} vs targets "
                             f"{self.targets.shape}")
        return scores

    def score(self, scores: np.ndarray) -> dict[str, float]:
        """mAP / AUC / d′ / loss of a score matrix against this set's targets."""
        out = metrics.scalar_metrics(metrics.evaluate(self.targets, scores))
        out["loss"] = metrics.bce(self.targets, scores)
        out["accuracy"] = metrics.accuracy(self.targets, scores)  # top-1 (single-label sets)
        return out

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        scores = self.predict()
        result = self.score(scores)
        self.last_scores, self.last_epoch = scores, epoch + 1
        self.history.append(dict(result, epoch=epoch + 1))
        if self.predictions_dir:
            atomic.save_npy(os.path.join(self.predictions_dir,
                                          run_folder.prediction_name(self.prefix, epoch + 1)),
                             scores)
        if logs is not None:
            for k, v in result.items():
                logs[f"{self.prefix}_{k}"] = v
        if self.verbose:
            print(f"epoch {epoch + 1}: {self.prefix} mAP {result['mAP']:.4f} "
                  f"AUC {result['AUC']:.4f} d' {result['d_prime']:.3f} "
                  f"loss {result['loss']:.4f} accuracy {result['accuracy']:.4f}", flush=True)


class CheckpointEnsemble(keras.callbacks.Callback):
    """Average of every epoch's scores of ``evaluation``'s set (Sec. VI-B), as training goes.

    Must come after ``evaluation`` in the callback list. Logs ``ens_mAP``/``ens_AUC``/
    ``ens_d_prime``; ``result`` holds the latest ensemble metrics.
    """

    def __init__(self, evaluation: EpochEvaluation, state_path: str | None = None,
                 prefix: str = "ens", verbose: int = 1):
        super().__init__()
        self.evaluation = evaluation
        self.state_path = state_path
        self.prefix = prefix
        self.verbose = verbose
        self.sum: np.ndarray | None = None
        self.epochs: list[int] = []
        self.result: dict[str, float] | None = None

    @property
    def scores(self) -> np.ndarray | None:
        return None if self.sum is None else (self.sum / len(self.epochs)).astype(np.float32)

    def restore(self, path: str | None = None) -> bool:
        """Load accumulated state from ``path`` (default ``state_path``); False if absent."""
        path = path or self.state_path
        if not path or not os.path.exists(path):
            return False
        with np.load(path) as z:
            self.sum = z["sum"].astype(np.float64)
            self.epochs = [int(e) for e in z["epochs"]]
        return True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        e = epoch + 1
        if self.evaluation.last_epoch != e:
            raise RuntimeError("CheckpointEnsemble must follow its EpochEvaluation")
        if e not in self.epochs:
            s = self.evaluation.last_scores.astype(np.float64)
            self.sum = s if self.sum is None else self.sum + s
            self.epochs.append(e)
            if self.state_path:
                atomic.save_npz(self.state_path, sum=self.sum, epochs=np.asarray(self.epochs))
        self.result = self.evaluation.score(self.scores)
        if logs is not None:
            for k in ("mAP", "AUC", "d_prime"):
                logs[f"{self.prefix}_{k}"] = self.result[k]
        if self.verbose:
            print(f"epoch {e}: checkpoint ensemble of {len(self.epochs)} epochs "
                  f"mAP {self.result['mAP']:.4f}", flush=True)


def _is_float(v: keras.Variable) -> bool:
    return "float" in str(v.dtype)


def refresh_batchnorm(model: keras.Model, batches, num_batches: int,
                      strategy: tf.distribute.Strategy | None = None, seed: int = 0) -> int:
    """Set each BatchNorm layer's moving mean and variance to the equal average of its
    training-mode batch statistics over ``num_batches`` batches.

    SWA's BatchNorm update (Izmailov et al., 2018, Sec. 3.2): an average of weights is none
    of the averaged models, so the average of their moving statistics need not match it.
    ``batches`` yields what the training pipeline yields (``(inputs, targets)`` tuples or
    inputs; per-replica values under ``strategy``); the model runs as in a training step
    (augmentation and drop-connect included), its random draws from ``seed`` (the model's
    random-seed states are put back afterwards), nothing else changes. Returns the number of
    batches used (fewer when ``batches`` ends first; 0 leaves the statistics unchanged).
    """
    layers = batchnorm_layers(model)
    if not layers or num_batches <= 0:
        return 0
    # random seeds (masking, drop-connect) are variables but not weights: keep them as they are
    weights = {id(v) for v in model.weights}
    seeds = [(v, v.numpy()) for v in model.variables if id(v) not in weights]
    for k, (v, value) in enumerate(seeds):  # the same draws whatever ran before
        if v.path.endswith("seed_generator_state"):
            v.assign(np.asarray([seed + k, 0], value.dtype))
    stats = BatchNormStatistics(layers)
    stats.begin()
    step = tf.function(lambda x: model(x, training=True))
    done = False
    try:
        for batch in batches:
            if stats.count == num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if strategy is not None:
                strategy.run(step, args=(x,))
            else:
                step(x)
            stats.accumulate()
        done = True
    finally:
        n = stats.finish(assign=done)
        for v, value in seeds:
            v.assign(value)
    return n


class WeightAveraging(keras.callbacks.Callback):
    """Equal average of the epoch-end weights from ``wa_start`` to ``wa_end`` (Sec. VI-A).

    Averages every floating-point variable of ``model.weights`` (BatchNorm moving mean and
    variance included; integer variables, if any, keep the last value). When epoch
    ``wa_end`` ends (or training ends early after ``wa_start``) the averaged model is saved to
    ``save_path`` and, given ``evaluation``, evaluated (``result``) — and given
    ``val_evaluation`` also on the validation set (``val_result``); the live model then gets
    its own weights back, so training and the "single" results are unaffected.
    ``bn_refresh(model) -> batches`` (e.g. :func:`refresh_batchnorm` over training batches)
    re-estimates the averaged model's BatchNorm statistics before it is saved
    (``bn_batches`` records how many batches it used).
    """

    def __init__(self, wa_start: int, wa_end: int, save_path: str | None = None,
                 state_path: str | None = None, evaluation: EpochEvaluation | None = None,
                 verbose: int = 1, val_evaluation: EpochEvaluation | None = None,
                 bn_refresh: Callable[[keras.Model], int] | None = None):
        super().__init__()
        self.bn_refresh = bn_refresh
        self.bn_batches = 0
        if not 1 <= wa_start <= wa_end:
            raise ValueError(f"need 1 ≤ wa_start ≤ wa_end, got {wa_start}, {wa_end}")
        self.wa_start, self.wa_end = int(wa_start), int(wa_end)
        self.save_path = save_path
        self.state_path = state_path
        self.evaluation = evaluation
        self.val_evaluation = val_evaluation
        self.verbose = verbose
        self.sums: list[np.ndarray] | None = None
        self.epochs: list[int] = []
        self.result: dict[str, float] | None = None
        self.val_result: dict[str, float] | None = None
        self.averaged: list[np.ndarray] | None = None

    def restore(self, path: str | None = None) -> bool:
        path = path or self.state_path
        if not path or not os.path.exists(path):
            return False
        with np.load(path) as z:
            n = int(z["num_arrays"])
            self.sums = [z[f"w{i}"] for i in range(n)]
            self.epochs = [int(e) for e in z["epochs"]]
        return True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        e = epoch + 1
        if not self.wa_start <= e <= self.wa_end or e in self.epochs:
            return
        values = [np.asarray(v.numpy(), np.float64) if _is_float(v) else None
                  for v in self.model.weights]
        if self.sums is None:
            self.sums = [v if v is not None else np.zeros(0) for v in values]
        else:
            if len(self.sums) != len(values):
                raise ValueError("the model's weights changed during weight averaging")
            for s, v in zip(self.sums, values):
                if v is not None:
                    s += v
        self.epochs.append(e)
        if self.state_path:
            atomic.save_npz(self.state_path, num_arrays=len(self.sums),
                          epochs=np.asarray(self.epochs),
                          **{f"w{i}": s for i, s in enumerate(self.sums)})
        if e == self.wa_end:
            self.finalize()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.epochs and self.averaged is None:
            self.finalize()

    def average(self) -> list[np.ndarray]:
        """The averaged weights (in ``model.weights`` order, each in its variable's dtype)."""
        if not self.epochs:
            raise ValueError("no epoch in the weight-averaging window has finished")
        n = len(self.epochs)
        out = []
        for s, v in zip(self.sums, self.model.weights):
            out.append((s / n).astype(v.dtype) if _is_float(v) else np.asarray(v.numpy()))
        return out

    def finalize(self) -> None:
        """Save (and evaluate) the averaged model, then put the live weights back."""
        self.averaged = self.average()
        live = [np.asarray(v.numpy()) for v in self.model.weights]
        try:
            for v, a in zip(self.model.weights, self.averaged):
                v.assign(a)
            if self.bn_refresh is not None:
                self.bn_batches = self.bn_refresh(self.model)
                self.averaged = [np.asarray(v.numpy()) for v in self.model.weights]
            if self.save_path:
                os.makedirs(os.path.dirname(os.path.abspath(self.save_path)), exist_ok=True)
                with atomic.atomic_path(self.save_path, ".keras") as tmp:
                    self.model.save(tmp)
            if self.evaluation is not None:
                self.result = self.evaluation.score(self.evaluation.predict(self.model))
                self.result["epochs"] = list(self.epochs)
                if self.verbose:
                    bn = (f", BatchNorm statistics from {self.bn_batches} training batches"
                          if self.bn_batches else "")
                    print(f"weight averaging of epochs {self.epochs[0]}-{self.epochs[-1]} "
                          f"({len(self.epochs)} models{bn}): mAP {self.result['mAP']:.4f}",
                          flush=True)
            if self.val_evaluation is not None:
                v = self.val_evaluation
                self.val_result = v.score(v.predict(self.model))
        finally:
            for v, w in zip(self.model.weights, live):
                v.assign(w)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop at the first batch whose loss is NaN/Inf with a message naming the step and
    epoch; nothing of that epoch is committed, so the last good checkpoint stays."""

    def __init__(self, checkpoint_dir: str | None = None):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(np.asarray(loss))
        if np.isfinite(loss):
            return
        step = int(np.asarray(self.model.optimizer.iterations))
        last = self._epoch - 1
        where = (f"; the last good checkpoint is epoch {last} in {self.checkpoint_dir}"
                 if last and self.checkpoint_dir else "")
        self.model.stop_training = True
        raise NonFiniteLossError(
            f"training loss is {loss} at step {step} (epoch {self._epoch}, batch {batch + 1})"
            f"{where}; lower --lr or check the data and the normalisation flags")
