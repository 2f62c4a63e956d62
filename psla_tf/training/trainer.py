"""The PSLA training job (Sec. II-B, VI): what ``main.py`` runs.

:func:`run` validates the configuration against the data before anything heavy happens,
builds the tagger, trains with ``model.fit`` (BCE, torch-exact Adam with coupled L2, warm-up +
MultiStepLR), evaluates every epoch, keeps the checkpoint ensemble and the weight average
as training goes, and writes ``{exp_dir}/summary.json``:

* ``single`` — without validation data, the mean of the eval metrics of the last
  min(5, E) epochs (the paper's AudioSet convention; each metric averaged separately, as
  the reference averages its result rows); with ``val_data``, the eval metrics of the
  epoch with the best validation mAP (FSD50K);
* ``weight_averaging`` — the averaged model of epochs wa_start..wa_end on the eval set;
* ``ensemble`` — the average of all epochs' eval scores.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from psla_tf import params
from psla_tf.data.records import DataError

SUMMARY_KEYS = ("mAP", "AUC", "d_prime", "accuracy")
METRIC_KEYS = {"map": "mAP", "accuracy": "accuracy"}  # --metric → summary key


class ConfigError(ValueError):
    """A bad flag combination, reported before training starts."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; defaults = the paper's full-AudioSet recipe."""
    train_data: str | None = None
    eval_data: str | None = None
    val_data: str | None = None
    exp_dir: str | None = None
    n_epochs: int = 30
    batch_size: int = 100
    eval_batch_size: int = 100
    lr: float = 1e-4
    warmup_steps: int = 1000
    warmup_every: int = 50
    lrscheduler_start: int = 10
    lrscheduler_step: int = 5
    lrscheduler_decay: float = 0.5
    wa: bool = True
    wa_start: int = 16
    wa_end: int = 30
    balanced_sampling: bool = True
    mixup: float = params.MIXUP
    mixup_alpha: float = params.MIXUP_ALPHA
    freqm: int = params.FREQM
    timem: int = params.TIMEM
    target_length: int = params.TARGET_LENGTH
    clip_samples: int | None = None
    dataset_mean: float | None = None
    dataset_std: float | None = None
    model: str = "efficientnet"
    eff_b: int = 2
    att_head: int = 4
    pretrained: str = "none"
    stem_init: str = "random"
    bn_momentum: float = 0.99
    loss: str = "bce"
    metric: str = "map"
    init_from: str | None = None
    freeze_backbone_epochs: int = 0
    shuffle_buffer: int = 1000
    seed: int = 0
    save_predictions: bool = True
    resume: bool = True
    dry_run: bool = False
    demo: bool = False
    demo_dir: str = "demo_data"
    verbose: int = 1


# ----------------------------------------------------------------------------- checks
def _load_spec(glob: str, what: str):
    from psla_tf.data import records
    try:
        return records.load_data_spec(glob)
    except DataError as e:
        raise DataError(f"--{what}: {e}") from None


def normalisation_stats(spec) -> tuple[float, float] | None:
    """Pooled fbank mean/std of the train manifests (None unless all have them)."""
    parts = [(m.fbank_mean, m.fbank_std, m.fbank_frames or 1) for m in spec.manifests]
    if not parts or any(p[0] is None or p[1] is None for p in parts):
        return None
    n = sum(p[2] for p in parts)
    mean = sum(p[0] * p[2] for p in parts) / n
    second = sum((p[1] ** 2 + p[0] ** 2) * p[2] for p in parts) / n
    return float(mean), float(math.sqrt(max(second - mean ** 2, 0.0)))


def check_config(cfg: TrainConfig) -> None:
    """Flag errors that need no data (raises ConfigError with what to fix)."""
    if not cfg.exp_dir:
        raise ConfigError("--exp_dir is required")
    if not cfg.train_data or not cfg.eval_data:
        raise ConfigError("--train_data and --eval_data are required (or use --demo)")
    if cfg.n_epochs < 1:
        raise ConfigError(f"--n_epochs must be ≥ 1, got {cfg.n_epochs}")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise ConfigError("--batch_size and --eval_batch_size must be ≥ 1")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0 or cfg.warmup_every < 1:
        raise ConfigError("--warmup_steps must be ≥ 0 and --warmup_every ≥ 1")
    if cfg.lrscheduler_step < 1 or not 0 < cfg.lrscheduler_decay <= 1:
        raise ConfigError("--lrscheduler_step must be ≥ 1 and 0 < --lrscheduler_decay ≤ 1")
    if cfg.wa:
        if not 1 <= cfg.wa_start <= cfg.wa_end:
            raise ConfigError(f"need 1 ≤ --wa_start ≤ --wa_end, got {cfg.wa_start}, "
                              f"{cfg.wa_end}")
        if cfg.wa_end > cfg.n_epochs:
            raise ConfigError(f"--wa_end ({cfg.wa_end}) > --n_epochs ({cfg.n_epochs}); "
                              "set --wa_end to at most --n_epochs or --nowa")
    if not 0 <= cfg.mixup <= 1 or cfg.mixup_alpha <= 0:
        raise ConfigError("--mixup must be in [0, 1] and --mixup_alpha > 0")
    if not 0 <= cfg.bn_momentum < 1:
        raise ConfigError(f"--bn_momentum must be in [0, 1), got {cfg.bn_momentum}")
    if cfg.target_length < 1 or cfg.freqm < 0 or cfg.timem < 0:
        raise ConfigError("--target_length must be ≥ 1, --freqm and --timem ≥ 0")
    if (cfg.dataset_mean is None) != (cfg.dataset_std is None):
        raise ConfigError("give both --dataset_mean and --dataset_std, or neither")
    if cfg.dataset_std is not None and cfg.dataset_std <= 0:
        raise ConfigError("--dataset_std must be > 0")
    if cfg.metric not in METRIC_KEYS:
        raise ConfigError(f"--metric must be one of {sorted(METRIC_KEYS)}, got {cfg.metric!r}")
    if cfg.freeze_backbone_epochs < 0:
        raise ConfigError("--freeze_backbone_epochs must be ≥ 0")
    if cfg.freeze_backbone_epochs and not cfg.init_from and cfg.pretrained == "none":
        raise ConfigError("--freeze_backbone_epochs needs a pretrained backbone "
                          "(--init_from or --pretrained)")


@dataclasses.dataclass
class Resolved:
    cfg: TrainConfig
    train: Any
    eval: Any
    val: Any
    steps_per_epoch: int
    clip_samples: int
    norm_source: str


def resolve(cfg: TrainConfig) -> Resolved:
    """Check flags and data; fill dataset_mean/std and clip_samples."""
    from psla_tf.data import pipeline
    check_config(cfg)
    train = _load_spec(cfg.train_data, "train_data")
    ev = _load_spec(cfg.eval_data, "eval_data")
    val = _load_spec(cfg.val_data, "val_data") if cfg.val_data else None
    for name, spec in (("eval_data", ev), ("val_data", val)):
        if spec is not None and list(spec.mids) != list(train.mids):
            raise DataError(f"--{name} and --train_data have different vocabularies "
                            f"({spec.num_classes} vs {train.num_classes} classes or a "
                            "different order); prepare both with the same --label_csv")
    steps = pipeline.steps_per_epoch(train.num_examples, cfg.batch_size)
    if steps < 1:
        raise ConfigError(f"--batch_size {cfg.batch_size} is larger than the training set "
                          f"({train.num_examples} examples)")
    if ev.num_examples < 1:
        raise DataError("--eval_data holds no examples")
    cfg = dataclasses.replace(cfg)
    if cfg.dataset_mean is None:
        stats = normalisation_stats(train)
        if stats is not None:
            cfg.dataset_mean, cfg.dataset_std = stats
            source = "train manifest"
        else:
            cfg.dataset_mean, cfg.dataset_std = params.DATASET_MEAN, params.DATASET_STD
            source = "AudioSet defaults (the train manifest has no fbank statistics)"
    else:
        source = "flags"
    clip = cfg.clip_samples
    if clip is None:
        clip = pipeline.clip_samples_for_frames(cfg.target_length)
        longest = max(int(round(m.max_seconds * m.sample_rate)) for m in train.manifests)
        clip = max(min(clip, longest), params.FRAME_LENGTH)
        cfg.clip_samples = clip
    return Resolved(cfg, train, ev, val, steps, clip, source)


# ----------------------------------------------------------------------------- building
def build_model(cfg: TrainConfig, num_classes: int):
    from psla_tf.models.tagger import build_tagger
    return build_tagger(num_classes, model=cfg.model, eff_b=cfg.eff_b, att_head=cfg.att_head,
                        pretrained=cfg.pretrained, stem_init=cfg.stem_init,
                        bn_momentum=cfg.bn_momentum,
                        target_length=cfg.target_length, freqm=cfg.freqm, timem=cfg.timem,
                        dataset_mean=cfg.dataset_mean, dataset_std=cfg.dataset_std,
                        seed=cfg.seed, single_label=cfg.loss == "ce")


def make_schedule(cfg: TrainConfig, steps_per_epoch: int):
    from psla_tf.training.schedule import PSLASchedule
    return PSLASchedule(cfg.lr, steps_per_epoch, cfg.n_epochs, cfg.lrscheduler_start,
                        cfg.lrscheduler_decay, cfg.lrscheduler_step, cfg.warmup_steps,
                        cfg.warmup_every)


def flagfile_text(cfg: TrainConfig) -> str:
    """A flagfile that reproduces the run (resolved values; demo data as plain globs)."""
    lines = ["# resolved flags of this run: python main.py --flagfile=flags.txt"]
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.name in ("dry_run", "demo", "demo_dir"):
            continue
        if v is None:
            continue
        if isinstance(v, bool):
            lines.append(f"--{f.name}" if v else f"--no{f.name}")
        else:
            lines.append(f"--{f.name}={v}")
    return "\n".join(lines) + "\n"


def describe(r: Resolved, num_params: int | None) -> str:
    from psla_tf.training.schedule import epoch_learning_rates
    cfg = r.cfg
    out = ["resolved configuration:"]
    for f in dataclasses.fields(TrainConfig):
        out.append(f"  {f.name} = {getattr(cfg, f.name)}")
    out.append(f"  normalisation: mean {cfg.dataset_mean:.4f}, std {cfg.dataset_std:.4f} "
               f"from {r.norm_source}")
    out.append(f"  train examples {r.train.num_examples}, eval {r.eval.num_examples}"
               + (f", val {r.val.num_examples}" if r.val else "")
               + f", classes {r.train.num_classes}, steps/epoch {r.steps_per_epoch}")
    if num_params is not None:
        out.append(f"  parameters: {num_params:,}")
    lrs = epoch_learning_rates(cfg.lr, cfg.n_epochs, cfg.lrscheduler_start,
                               cfg.lrscheduler_decay, cfg.lrscheduler_step)
    out.append(f"  warm-up: {cfg.warmup_steps} steps, lr raised every {cfg.warmup_every} "
               f"steps (= {cfg.warmup_steps / r.steps_per_epoch:.2f} epochs)")
    out.append("  per-epoch lr: " + ", ".join(f"{e}:{lr:.4g}" for e, lr in
                                               enumerate(lrs, start=1)))
    out.append(f"  weight averaging: epochs {cfg.wa_start}-{cfg.wa_end}" if cfg.wa
               else "  weight averaging: off")
    return "\n".join(out)


def summary_table(summary: dict[str, Any]) -> str:
    rows = [("single", summary.get("single")), ("weight averaging",
                                                summary.get("weight_averaging")),
            ("checkpoint ensemble", summary.get("ensemble"))]
    acc = summary.get("metric") == "accuracy"
    out = [f"{'':22s} " + (f"{'accuracy':>8s} " if acc else "")
           + f"{'mAP':>8s} {'AUC':>8s} {'d-prime':>8s}"]
    for name, r in rows:
        if r:
            out.append(f"{name:22s} " + (f"{r.get('accuracy', float('nan')):8.4f} " if acc
                                         else "")
                       + f"{r['mAP']:8.4f} {r['AUC']:8.4f} {r['d_prime']:8.4f}")
    cov = summary.get("coverage")
    if cov:
        out.append("coverage: " + "; ".join(f"{k} {v['written']} of {v['listed']} listed clips"
                                            for k, v in cov.items()))
    return "\n".join(out)


def single_result(eval_history: list[dict], val_history: list[dict] | None,
                  metric: str = "map") -> dict:
    """'single' row of the summary (see the module doc); with validation data the epoch is
    selected on ``metric`` (map or accuracy)."""
    keys = [k for k in SUMMARY_KEYS if all(k in h for h in eval_history)]
    if val_history:
        key = METRIC_KEYS[metric]
        best = max(range(len(val_history)), key=lambda i: val_history[i][key])
        out = {k: float(eval_history[best][k]) for k in keys}
        out.update(epoch=int(eval_history[best]["epoch"]), selected_on="val")
        out[f"val_{key}"] = float(val_history[best][key])
        return out
    last = eval_history[-5:]
    out = {k: float(np.mean([h[k] for h in last])) for k in keys}
    out["epochs"] = [int(h["epoch"]) for h in last]
    return out


# ----------------------------------------------------------------------------- resume
class _ResumeState:
    """Saves the optimizer state and evaluation histories after every epoch (atomically)."""

    def __init__(self, path: str, evaluations: list):
        import keras

        class _Cb(keras.callbacks.Callback):
            def on_epoch_end(cb, epoch, logs=None):
                opt = cb.model.optimizer
                from psla_tf.training.callbacks import _atomic_savez
                _atomic_savez(path + ".npz", **{f"v{i}": np.asarray(v.numpy())
                                                for i, v in enumerate(opt.variables)})
                state = {"epoch": epoch + 1,
                         "histories": [ev.history for ev in evaluations]}
                from psla_tf.training.callbacks import write_json_atomic
                write_json_atomic(path, state)
        self.callback = _Cb()


def _restore(model, exp_dir: str, evaluations: list, state_path: str) -> int:
    """Load the last finished epoch's weights + optimizer state; returns that epoch."""
    with open(state_path) as f:
        state = json.load(f)
    epoch = int(state["epoch"])
    model.load_weights(os.path.join(exp_dir, "checkpoints", f"epoch_{epoch:03d}.weights.h5"))
    opt = model.optimizer
    opt.build(model.trainable_variables)
    with np.load(state_path + ".npz") as z:
        if len(z.files) != len(opt.variables):
            raise DataError(f"{state_path}.npz does not match this model's optimizer")
        for i, v in enumerate(opt.variables):
            v.assign(z[f"v{i}"])
    for ev, h in zip(evaluations, state["histories"]):
        ev.history = list(h)
    return epoch


# ----------------------------------------------------------------------------- run
def run(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train per ``cfg``; returns the summary (None for ``dry_run``)."""
    import keras
    import tensorflow as tf

    from psla_tf.data import pipeline
    from psla_tf.training import callbacks as cbs
    from psla_tf.training.optim import TorchAdam, make_loss

    r = resolve(cfg)
    cfg = r.cfg
    keras.utils.set_random_seed(cfg.seed)  # deterministic initialisation
    model = build_model(cfg, r.train.num_classes)
    init_report = None
    if cfg.init_from:  # fine-tuning: copy matching layers, new heads for a new vocabulary
        from psla_tf.training import finetune
        init_report = finetune.init_from(model, cfg.init_from, target_mids=r.train.mids)
    # the input pipeline seeds every op explicitly (stateless from --seed); a global TF seed
    # would only change tf.data's seed handling (and breaks tensor-valued shuffle seeds)
    tf.random.set_seed(None)
    if cfg.dry_run:
        print(describe(r, model.count_params()))
        return None
    print(describe(r, model.count_params()), flush=True)
    if init_report is not None:
        print(init_report.describe(), flush=True)
    exp = cfg.exp_dir
    ckpt_dir = os.path.join(exp, "checkpoints")
    pred_dir = os.path.join(exp, "predictions") if cfg.save_predictions else None
    os.makedirs(ckpt_dir, exist_ok=True)
    # flags.txt (reproduces the run), library versions, manifest hashes, git commit
    from psla_tf import provenance
    provenance.write_provenance(exp, flagfile_text(cfg), [
        ("train", cfg.train_data), ("eval", cfg.eval_data), ("val", cfg.val_data)],
        extra={"normalisation": {"mean": cfg.dataset_mean, "std": cfg.dataset_std,
                                 "source": r.norm_source},
               "init_from": init_report.as_dict() if init_report is not None else None})
    # the vocabulary travels with the models (predict / infer / export read it from here)
    from psla_tf.data.records import write_label_csv
    write_label_csv(os.path.join(exp, "labels.csv"), r.train.mids, r.train.names)

    model.compile(optimizer=TorchAdam(make_schedule(cfg, r.steps_per_epoch)),
                  loss=make_loss(cfg.loss), jit_compile=False)

    eval_ds = pipeline.make_eval_dataset(r.eval, cfg.eval_batch_size, r.clip_samples)
    evaluation = cbs.EpochEvaluation(eval_ds, "eval", pred_dir, verbose=1)
    evaluations = [evaluation]
    val_eval = None
    if r.val is not None:
        val_ds = pipeline.make_eval_dataset(r.val, cfg.eval_batch_size, r.clip_samples)
        val_eval = cbs.EpochEvaluation(val_ds, "val", pred_dir, verbose=1)
        evaluations.append(val_eval)
    ensemble = cbs.CheckpointEnsemble(evaluation, os.path.join(exp, "ensemble_state.npz"))
    callbacks: list = list(evaluations) + [ensemble]
    wa = None
    if cfg.wa:
        wa = cbs.WeightAveraging(cfg.wa_start, cfg.wa_end,
                                 os.path.join(exp, "wa_model.keras"),
                                 os.path.join(exp, "wa_state.npz"), evaluation)
        callbacks.append(wa)
    if cfg.freeze_backbone_epochs:
        from psla_tf.training.finetune import FreezeBackbone
        callbacks.insert(0, FreezeBackbone(cfg.freeze_backbone_epochs))
    state_path = os.path.join(exp, "train_state.json")
    initial_epoch = 0
    if cfg.resume and os.path.exists(state_path):
        initial_epoch = _restore(model, exp, evaluations, state_path)
        ensemble.restore()
        if wa is not None:
            wa.restore()
        print(f"resuming after epoch {initial_epoch} from {exp}", flush=True)
    callbacks += [
        keras.callbacks.ModelCheckpoint(os.path.join(ckpt_dir, "epoch_{epoch:03d}.weights.h5"),
                                        save_weights_only=True),
        _ResumeState(state_path, evaluations).callback,
        keras.callbacks.CSVLogger(os.path.join(exp, "log.csv"), append=initial_epoch > 0),
        keras.callbacks.TensorBoard(os.path.join(exp, "tensorboard"), profile_batch=0),
    ]
    t0 = time.time()
    if initial_epoch < cfg.n_epochs:
        train_ds = pipeline.make_train_dataset(
            r.train, batch_size=cfg.batch_size, clip_samples=r.clip_samples,
            balanced_sampling=cfg.balanced_sampling, mixup=cfg.mixup,
            mixup_alpha=cfg.mixup_alpha, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
            initial_epoch=initial_epoch, num_epochs=cfg.n_epochs - initial_epoch)
        try:
            model.fit(train_ds, epochs=cfg.n_epochs, initial_epoch=initial_epoch,
                      steps_per_epoch=r.steps_per_epoch, callbacks=callbacks,
                      verbose=cfg.verbose, shuffle=False)
        except tf.errors.OpError as e:
            err = pipeline.data_error_from(e)
            if err is not None:
                raise err from None
            raise
    seconds = time.time() - t0
    final_path = os.path.join(exp, "final_model.keras")  # the last epoch, whole (.keras)
    model.save(final_path + ".tmp.keras")
    os.replace(final_path + ".tmp.keras", final_path)
    summary: dict[str, Any] = {
        "metric": cfg.metric,
        "single": single_result(evaluation.history, val_eval.history if val_eval else None,
                                cfg.metric),
        "weight_averaging": ({k: wa.result[k] for k in SUMMARY_KEYS if k in wa.result} | {"epochs": wa.epochs}
                             if wa is not None and wa.result else None),
        "ensemble": ({k: ensemble.result[k] for k in SUMMARY_KEYS if k in ensemble.result}
                     | {"epochs": ensemble.epochs} if ensemble.result else None),
        "epochs": cfg.n_epochs,
        "train_examples": r.train.num_examples,
        "eval_examples": r.eval.num_examples,
        "seconds": seconds,
        "per_epoch": evaluation.history,
        "normalisation": {"mean": cfg.dataset_mean, "std": cfg.dataset_std,
                          "source": r.norm_source},
        "coverage": {name: {"written": spec.num_examples, "listed": spec.listed}
                     for name, spec in (("train", r.train), ("eval", r.eval), ("val", r.val))
                     if spec is not None},
        "init_from": cfg.init_from,
    }
    cbs.write_json_atomic(os.path.join(exp, "summary.json"), summary)
    print(summary_table(summary), flush=True)
    return summary
