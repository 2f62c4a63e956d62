"""Self-training on the evaluated clips' pseudo-labels (``--self_train_epochs``; not in PSLA).

After a run's ``adapted`` row (:func:`psla_tf.models.adaptation.adapt_batchnorm`: the weight
average adapted to an evaluated set's own clips), each clip of that set is labelled with the
adapted model's top class, and the weight-averaged model is fine-tuned for a few epochs on the
training set plus those pseudo-labelled clips (Lee, 2013; the self-training step of SHOT++,
Liang et al., 2021), at a constant learning rate, its epochs weight-averaged, then adapted
again as the run adapts. The evaluated set's labels are never read (only reported: the
pseudo-labels' accuracy).

Each self-training is a run of its own in ``{exp_dir}/self_training_{eval|val}/`` (its
``summary.json``, its pseudo-labelled shards ``pseudo-*.tfrecord``); the parent run's
``adapted`` row (and ``adapted_model.keras``) become its adapted row (and model).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Callable

import numpy as np

from psla_tf import run_folder
from psla_tf.config import TrainConfig

__all__ = ["SELF_TRAIN_DIR", "pseudo_label_shards", "self_train_config", "self_train"]

SELF_TRAIN_DIR = "self_training_{}"   # {} = eval | val
PSEUDO_PREFIX = "pseudo"


def pseudo_label_shards(spec, scores: np.ndarray, prefix: str) -> np.ndarray:
    """Copy ``spec``'s shards to ``{prefix}-i-of-n`` with each record's labels replaced by the
    top class of its row of ``scores`` ``[N, C]`` (records in file order, as the evaluation
    pipeline reads them); the manifest counts the pseudo-labels. Returns the ``[N]`` labels."""
    from psla_tf.data.shard_copy import relabel_shards, write_copy_manifest
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != spec.num_examples:
        raise ValueError(f"scores {scores.shape} for {spec.num_examples} records")
    labels = scores.argmax(axis=1)
    shards = relabel_shards(spec, [[int(k)] for k in labels], prefix, progress=False)
    write_copy_manifest(spec, prefix, shards,
                        np.bincount(labels, minlength=len(spec.mids)).tolist(),
                        {"pseudo_labels": "top class of the adapted model (self-training)"})
    return labels


def self_train_config(cfg: TrainConfig, which: str, data: str, pseudo_glob: str) -> TrainConfig:
    """The self-training run's configuration: ``cfg``'s model and augmentation, started from
    ``cfg``'s weight-averaged model, trained on ``cfg.train_data`` + ``pseudo_glob`` for
    ``cfg.self_train_epochs`` epochs at ``cfg.self_train_lr`` (no warm-up, no decay), every
    epoch averaged, scored and adapted on ``data`` (the evaluated set ``which``)."""
    epochs = cfg.self_train_epochs
    return dataclasses.replace(
        cfg, exp_dir=os.path.join(cfg.exp_dir, SELF_TRAIN_DIR.format(which)),
        init_from=run_folder.path(cfg.exp_dir, run_folder.WA_MODEL), pretrained="none",
        head_bias_init="reference", freeze_backbone_epochs=0,
        train_data=f"{cfg.train_data},{pseudo_glob}", eval_data=data, val_data=None,
        n_epochs=epochs, lr=cfg.self_train_lr, warmup_steps=0, lrscheduler_start=epochs + 1,
        wa=True, wa_start=1, wa_end=epochs, self_train_epochs=0, resume=False)


def self_train(cfg: TrainConfig, which: str, spec, data: str, scores: np.ndarray,
               targets: np.ndarray, run: Callable[[TrainConfig], dict[str, Any]]
               ) -> dict[str, Any]:
    """Pseudo-label the evaluated set ``which`` (``spec``, glob ``data``) by ``scores`` (the
    adapted model's), run the self-training (:func:`self_train_config`) with ``run`` (the
    trainer's) and return its ``adapted`` row with a ``self_training`` entry (epochs, lr, the
    pseudo-labels' accuracy against ``targets``, the run folder, its seconds)."""
    out = os.path.join(cfg.exp_dir, SELF_TRAIN_DIR.format(which))
    if os.path.isdir(out):
        shutil.rmtree(out)   # a self-training is redone whole with its run
    os.makedirs(out)
    prefix = os.path.join(out, PSEUDO_PREFIX)
    labels = pseudo_label_shards(spec, scores, prefix)
    print(f"self-training on {which}: {len(labels)} clips pseudo-labelled by the adapted model, "
          f"{cfg.self_train_epochs} epochs at lr {cfg.self_train_lr:g} → {out}", flush=True)
    summary = run(self_train_config(cfg, which, data, f"{prefix}-*.tfrecord*"))
    row = dict(summary["adapted"])
    row["self_training"] = {"epochs": cfg.self_train_epochs, "lr": cfg.self_train_lr,
                            "pseudo_label_accuracy": float(np.mean(
                                labels == np.asarray(targets).argmax(axis=1))),
                            "run": os.path.basename(out), "seconds": summary["seconds"]}
    return row
