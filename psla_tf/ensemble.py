"""Ensembles and weight averaging across saved models (paper Sec. VI).

* :func:`average_predictions` / :func:`ensemble_table` — the ensemble of runs (Sec. VI-B,
  Table XI): the mean of the members' clip scores, and the table row: number of models,
  average member mAP, best member mAP, ensemble mAP.
* :func:`build_ensemble` — the same average as one Keras model (``psla_ensemble``; members
  ``member_0``, ``member_1``, … with the tagger's inputs), so an ensemble is saved, loaded,
  exported and served like a single tagger.
* :func:`average_checkpoints` — offline weight averaging (Sec. VI-A) of saved epoch
  checkpoints of one run: the equal average of every floating-point weight, BatchNorm
  moving statistics included, computed by the training callback
  :class:`psla_tf.training.callbacks.WeightAveraging` itself (one implementation).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import keras
import numpy as np

from psla_tf import metrics
from psla_tf.data.records import DataError
from psla_tf.prediction import Predictions, members_agree

__all__ = ["average_predictions", "ensemble_table", "build_ensemble", "average_checkpoints",
           "ENSEMBLE_NAME"]

ENSEMBLE_NAME = "psla_ensemble"


def average_predictions(preds: Sequence[Predictions], sources: Sequence[str] | None = None
                        ) -> Predictions:
    """Mean of the members' scores (same clips, same order, same class map)."""
    if len(preds) < 1:
        raise DataError("an ensemble needs at least one member")
    sources = list(sources or [f"member {i}" for i in range(len(preds))])
    members_agree(preds, sources)
    mean = np.mean(np.stack([np.asarray(p.scores, np.float64) for p in preds]), axis=0)
    first = preds[0]
    return Predictions(list(first.ids), mean.astype(np.float32), first.targets,
                       list(first.mids), list(first.names))


def ensemble_table(preds: Sequence[Predictions], sources: Sequence[str] | None = None
                   ) -> dict:
    """Table XI row of an ensemble of the members' predictions (needs targets)."""
    sources = list(sources or [f"member {i}" for i in range(len(preds))])
    ens = average_predictions(preds, sources)
    if ens.targets is None:
        raise DataError(f"{sources[0]} has no targets; the Table XI row needs labelled clips")
    member = [metrics.evaluate(p.targets, p.scores)["mAP"] for p in preds]
    result = metrics.evaluate(ens.targets, ens.scores)
    return {"num_models": len(preds), "avg_mAP": float(np.mean(member)),
            "best_mAP": float(np.max(member)), "ensemble_mAP": float(result["mAP"]),
            "ensemble_AUC": float(result["AUC"]), "ensemble_d_prime": float(result["d_prime"]),
            "members": [{"source": s, "mAP": float(m)} for s, m in zip(sources, member)]}


def format_table(row: dict) -> str:
    """The Table XI row as text."""
    head = f"{'# models':>8}  {'avg mAP':>8}  {'best mAP':>8}  {'ensemble mAP':>12}"
    line = (f"{row['num_models']:>8}  {row['avg_mAP']:>8.4f}  {row['best_mAP']:>8.4f}  "
            f"{row['ensemble_mAP']:>12.4f}")
    return head + "\n" + line


def build_ensemble(members: Sequence[keras.Model]) -> keras.Model:
    """One Keras model averaging the members' scores: inputs ``{"waveform", "num_samples"}``,
    sub-models ``member_i`` (the members' layers and weights, shared), output ``scores``."""
    if len(members) < 2:
        raise DataError(f"an ensemble model needs at least 2 members, got {len(members)}")
    c = {int(m.outputs[0].shape[-1]) for m in members}
    if len(c) != 1:
        raise DataError(f"members have different numbers of classes: {sorted(c)}")
    waveform = keras.Input((None,), name="waveform", dtype="float32")
    num_samples = keras.Input((), name="num_samples", dtype="int32")
    outs = []
    for i, m in enumerate(members):
        if not isinstance(m.input, dict) or set(m.input) != {"waveform", "num_samples"}:
            raise DataError(f"member {i} ({m.name}) is not a waveform tagger "
                            "(inputs waveform, num_samples)")
        sub = keras.Model(m.input, m.output, name=f"member_{i}")
        outs.append(sub({"waveform": waveform, "num_samples": num_samples}))
    mean = keras.layers.Average(name="average", dtype="float32")(outs)
    scores = keras.layers.Activation("linear", name="scores", dtype="float32")(mean)
    return keras.Model({"waveform": waveform, "num_samples": num_samples}, scores,
                       name=ENSEMBLE_NAME)


def _signature(model: keras.Model) -> list[tuple[tuple, str]]:
    """Shapes and dtypes of ``model.weights`` in order (variable paths carry auto-generated
    layer names that differ between loads, so they are not compared)."""
    return [(tuple(v.shape), str(v.dtype)) for v in model.weights]


def _first_difference(a: keras.Model, b: keras.Model) -> str:
    if len(a.weights) != len(b.weights):
        return f"{len(b.weights)} weights instead of {len(a.weights)}"
    for v, w in zip(a.weights, b.weights):
        if (tuple(v.shape), str(v.dtype)) != (tuple(w.shape), str(w.dtype)):
            return f"{w.path} {tuple(w.shape)} vs {v.path} {tuple(v.shape)}"
    return "none"


def average_checkpoints(paths: Sequence[str], progress: bool = True) -> keras.Model:
    """The equal weight average of the models ``paths`` name (epoch ``.weights.h5``
    checkpoints or ``.keras`` files of one architecture; Sec. VI-A).

    Every float weight — trainable, BatchNorm moving mean and variance — is averaged in
    float64 by :class:`~psla_tf.training.callbacks.WeightAveraging`; a checkpoint with other
    variables or shapes than the first is an error. Returns the first model holding the
    average.
    """
    from tqdm import tqdm

    from psla_tf.models.loading import load_tagger
    from psla_tf.training.callbacks import WeightAveraging
    paths = list(paths)
    if len(paths) < 2:
        raise DataError(f"weight averaging needs at least 2 checkpoints, got {len(paths)}")
    if len(set(os.path.abspath(p) for p in paths)) != len(paths):
        raise DataError("a checkpoint is listed twice (it would be counted twice)")
    model = load_tagger(paths[0])
    ref = _signature(model)
    averager = WeightAveraging(1, len(paths), verbose=0)
    averager.set_model(model)
    for e, p in enumerate(tqdm(paths, desc="average", unit="ckpt", disable=not progress,
                               file=sys.stderr)):
        m = model if e == 0 else load_tagger(p)
        if e:
            if _signature(m) != ref:
                raise DataError(f"{p} has another architecture than {paths[0]} "
                                f"({_first_difference(model, m)})")
            for v, w in zip(model.weights, m.weights):
                v.assign(w.numpy())
        averager.on_epoch_end(e)       # accumulates model.weights; the last one finalises
    for v, a in zip(model.weights, averager.averaged):
        v.assign(a)
    return model
