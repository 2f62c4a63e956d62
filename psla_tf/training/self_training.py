"""Self-training on the evaluated clips' pseudo-labels (``--self_train_epochs``; not in PSLA).

After a run's ``adapted`` row (:func:`psla_tf.models.adaptation.adapt_batchnorm`: the weight
average adapted to an evaluated set's own clips), each clip of that set is labelled with the
adapted model's top class (``--self_train_neighbours``: of its scores propagated over the
clips' DTW neighbours, :mod:`psla_tf.label_propagation`), and the weight-averaged model is
fine-tuned for a few epochs on the training set plus those pseudo-labelled clips (Lee, 2013;
the self-training step of SHOT++, Liang et al., 2021), at a constant learning rate, its epochs
weight-averaged, then adapted again as the run adapts. The evaluated set's labels are never read (only reported: the
pseudo-labels' accuracy).

Each self-training is a run of its own in ``{exp_dir}/self_training_{eval|val}/`` (its
``summary.json``, its pseudo-labelled shards ``pseudo-*.tfrecord``); the parent run's
``adapted`` row (and ``adapted_model.keras``) become its adapted row (and model).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Callable, Iterable

import numpy as np

from psla_tf import run_folder
from psla_tf.config import TrainConfig

__all__ = ["SELF_TRAIN_DIR", "pseudo_label_shards", "propagated_scores", "self_train_config",
           "self_train"]

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
        wa=True, wa_start=1, wa_end=epochs, self_train_epochs=0, self_train_neighbours=0,
        resume=False)


def propagated_scores(cfg: TrainConfig, scores: np.ndarray, waveforms: np.ndarray
                      ) -> np.ndarray:
    """``scores`` ``[N, C]`` of the evaluated ``waveforms`` ``[N, samples]`` propagated over
    their ``cfg.self_train_neighbours`` DTW neighbours (cepstra of the run's mel banks)."""
    from psla_tf import label_propagation, params
    return label_propagation.propagate_scores(
        waveforms, scores, k=cfg.self_train_neighbours, alpha=cfg.self_train_alpha,
        sample_rate=params.SAMPLE_RATE, num_mel_bins=cfg.num_mel_bins, high_freq=cfg.high_freq)


def self_train(cfg: TrainConfig, which: str, spec, data: str, scores: np.ndarray,
               targets: np.ndarray, run: Callable[[TrainConfig], dict[str, Any]],
               clips: Iterable[tuple[dict[str, Any], Any]] | None = None) -> dict[str, Any]:
    """Pseudo-label the evaluated set ``which`` (``spec``, glob ``data``) by ``scores`` (the
    adapted model's; with ``cfg.self_train_neighbours``, propagated over the neighbours of its
    ``clips``, the evaluation dataset's ``({"waveform": [B, samples], ...}, labels)``
    batches), run the self-training (:func:`self_train_config`) with ``run`` (the trainer's)
    and return its ``adapted`` row with a ``self_training`` entry (epochs, lr, the
    pseudo-labels' accuracy against ``targets``, the run folder, its seconds)."""
    out = os.path.join(cfg.exp_dir, SELF_TRAIN_DIR.format(which))
    if os.path.isdir(out):
        shutil.rmtree(out)   # a self-training is redone whole with its run
    os.makedirs(out)
    truth = np.asarray(targets).argmax(axis=1)
    entry: dict[str, Any] = {"epochs": cfg.self_train_epochs, "lr": cfg.self_train_lr}
    source = "the adapted model"
    if cfg.self_train_neighbours:
        if clips is None:
            raise ValueError("--self_train_neighbours needs the evaluated clips")
        waveforms = np.concatenate([x["waveform"].numpy() for x, _ in clips])
        entry.update(neighbours=cfg.self_train_neighbours, alpha=cfg.self_train_alpha,
                     model_label_accuracy=float(np.mean(np.argmax(scores, axis=1) == truth)))
        scores = propagated_scores(cfg, scores, waveforms)
        source += f", propagated over {cfg.self_train_neighbours} DTW neighbours"
    labels = pseudo_label_shards(spec, scores, os.path.join(out, PSEUDO_PREFIX))
    print(f"self-training on {which}: {len(labels)} clips pseudo-labelled by {source}, "
          f"{cfg.self_train_epochs} epochs at lr {cfg.self_train_lr:g} → {out}", flush=True)
    summary = run(self_train_config(cfg, which, data,
                                    os.path.join(out, PSEUDO_PREFIX) + "-*.tfrecord*"))
    row = dict(summary["adapted"])
    row["self_training"] = entry | {
        "pseudo_label_accuracy": float(np.mean(labels == truth)),
        "run": os.path.basename(out), "seconds": summary["seconds"]}
    return row
