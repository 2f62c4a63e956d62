"""What a training run will do, settled before anything heavy: the flags checked against
each other (:func:`check_config`) and against the data (:func:`resolve`: manifests, the
vocabulary plan, normalisation statistics, clip length), and the plan printed
(:func:`describe`). ``main.py --dry_run`` stops here."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from psla_tf import params
from psla_tf.config import TrainConfig
from psla_tf.data.records import DataError
from psla_tf.errors import ConfigError
from psla_tf.training.selection import METRIC_KEYS

__all__ = ["Resolved", "check_config", "resolve", "describe", "normalisation_stats",
           "cut_clip_problems"]


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
    _check_schedule(cfg)
    _check_input(cfg)
    _check_strategy(cfg)
    _check_objective(cfg)


def _check_schedule(cfg: TrainConfig) -> None:
    """Paths, epochs, batch sizes, learning-rate schedule and weight-averaging window."""
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
        if cfg.wa_bn_batches < 0:
            raise ConfigError(f"--wa_bn_batches must be ≥ 0, got {cfg.wa_bn_batches}")
        if cfg.wa_end > cfg.n_epochs:
            raise ConfigError(f"--wa_end ({cfg.wa_end}) > --n_epochs ({cfg.n_epochs}); "
                              "set --wa_end to at most --n_epochs or --nowa")


def _check_input(cfg: TrainConfig) -> None:
    """Sampling, mixup, augmentation, input length and normalisation."""
    if not 0 <= cfg.mixup <= 1 or cfg.mixup_alpha <= 0:
        raise ConfigError("--mixup must be in [0, 1] and --mixup_alpha > 0")
    if cfg.sampling_order not in ("iid", "stream"):
        raise ConfigError(f"--sampling_order must be iid or stream, got {cfg.sampling_order!r}")
    if cfg.group_batches and cfg.sampling_order != "iid":
        raise ConfigError("--group_batches draws each batch from one prepared set: it needs "
                          "--sampling_order=iid")
    if cfg.random_gain_db < 0:
        raise ConfigError(f"--random_gain_db must be ≥ 0, got {cfg.random_gain_db}")
    if not 0 <= cfg.random_speed < 1:
        raise ConfigError(f"--random_speed must be in [0, 1), got {cfg.random_speed}")
    if not 0 <= cfg.noise_prob <= 1:
        raise ConfigError(f"--noise_prob must be in [0, 1], got {cfg.noise_prob:g}")
    if not 0 <= cfg.noise_decay_min_db <= cfg.noise_decay_max_db:
        raise ConfigError(f"--noise_decay_min_db ({cfg.noise_decay_min_db:g}) and "
                          f"--noise_decay_max_db ({cfg.noise_decay_max_db:g}) need "
                          "0 <= min <= max")
    if cfg.noise_snr_max_db < cfg.noise_snr_min_db:
        raise ConfigError(f"--noise_snr_max_db ({cfg.noise_snr_max_db:g}) must be ≥ "
                          f"--noise_snr_min_db ({cfg.noise_snr_min_db:g})")
    if not 0 <= cfg.bn_momentum < 1:
        raise ConfigError(f"--bn_momentum must be in [0, 1), got {cfg.bn_momentum}")
    if cfg.target_length < 1 or cfg.freqm < 0 or cfg.timem < 0 or cfg.time_shift < 0:
        raise ConfigError("--target_length must be ≥ 1, --freqm, --timem and --time_shift ≥ 0")
    if not 3 <= cfg.num_mel_bins <= params.FFT_LENGTH // 2:
        raise ConfigError(f"--num_mel_bins must be in [3, {params.FFT_LENGTH // 2}], got "
                          f"{cfg.num_mel_bins}")
    if cfg.num_ceps > cfg.num_mel_bins:
        raise ConfigError(f"--num_ceps ({cfg.num_ceps}) must not exceed --num_mel_bins "
                          f"({cfg.num_mel_bins})")
    if not 0 <= cfg.vtlp < 0.5:
        raise ConfigError(f"--vtlp must be in [0, 0.5), got {cfg.vtlp:g}")
    if cfg.trim_onset_db < 0:
        raise ConfigError(f"--trim_onset_db must be ≥ 0 (0 off), got {cfg.trim_onset_db:g}")
    if cfg.head_bias_init not in ("reference", "prior"):
        raise ConfigError(f"--head_bias_init must be reference or prior, got "
                          f"{cfg.head_bias_init!r}")
    if cfg.head_bias_init == "prior" and cfg.append_classes:
        raise ConfigError("--head_bias_init=prior contradicts --append_classes (the appended "
                          "head keeps the source model's biases); leave it out")
    if (cfg.dataset_mean is None) != (cfg.dataset_std is None):
        raise ConfigError("give both --dataset_mean and --dataset_std, or neither")
    if cfg.dataset_std is not None and cfg.dataset_std <= 0:
        raise ConfigError("--dataset_std must be > 0")


def _check_strategy(cfg: TrainConfig) -> None:
    """Distribution strategy, XLA, determinism and precision."""
    from psla_tf.training import distribute
    if cfg.strategy not in distribute.STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(distribute.STRATEGIES)}")
    if cfg.tpu and cfg.strategy not in ("auto", "tpu"):
        raise ConfigError(f"--tpu={cfg.tpu} contradicts --strategy={cfg.strategy}")
    if cfg.jit_compile and cfg.deterministic:   # Keras would drop XLA without a word
        raise ConfigError("--jit_compile and --deterministic cannot be combined: Keras turns "
                          "XLA off while op determinism is enabled")
    if cfg.self_train_epochs and cfg.strategy == "multi_worker":
        raise ConfigError("--self_train_epochs runs its fine-tuning on the chief alone: not "
                          "with --strategy=multi_worker (self-train after the run, on one "
                          "machine)")
    if cfg.strategy == "multi_worker" and not os.environ.get("TF_CONFIG"):
        raise ConfigError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                          "(cluster and this task; see docs/scale.md)")
    try:
        distribute.check_precision(cfg.mixed_precision,
                                   "tpu" if cfg.tpu or cfg.strategy == "tpu" else "")
    except distribute.StrategyError as e:
        raise ConfigError(str(e)) from None


def _check_objective(cfg: TrainConfig) -> None:
    """Metric, fine-tuning and distillation."""
    if cfg.self_train_neighbours and not cfg.self_train_epochs:
        raise ConfigError("--self_train_neighbours propagates self-training's pseudo-labels: "
                          "add --self_train_epochs")
    if cfg.self_train_epochs and not (cfg.adapt_batchnorm and cfg.wa and cfg.loss == "ce"):
        raise ConfigError("--self_train_epochs fine-tunes the weight average on the adapted "
                          "model's pseudo-labels: it needs --adapt_batchnorm, --wa and a "
                          "single-label model (--loss=ce)")
    if cfg.metric not in METRIC_KEYS:
        raise ConfigError(f"--metric must be one of {sorted(METRIC_KEYS)}, got {cfg.metric!r}")
    if cfg.freeze_backbone_epochs < 0:
        raise ConfigError("--freeze_backbone_epochs must be ≥ 0")
    from psla_tf.training import distill
    problem = distill.check_flags(cfg)
    if problem:
        raise ConfigError(problem)
    if cfg.freeze_backbone_epochs and not cfg.init_from and cfg.pretrained == "none":
        raise ConfigError(f"--freeze_backbone_epochs={cfg.freeze_backbone_epochs} needs a "
                          "pretrained model to fine-tune: pass --init_from=MODEL (a psla_tf "
                          ".keras model or run folder, e.g. an AudioSet model; the "
                          "configs/custom_*.flags and esc50.flags recipes fine-tune one), or "
                          "train from scratch with --freeze_backbone_epochs=0 --lr=1e-3")


@dataclasses.dataclass
class Resolved:
    cfg: TrainConfig
    train: Any
    eval: Any
    val: Any
    steps_per_epoch: int
    clip_samples: int
    norm_source: str
    eval_without_positives: list = dataclasses.field(default_factory=list)
    cut_clips: list = dataclasses.field(default_factory=list)  # lines for describe()
    kd: Any = None  # distill.Plan: the model's vocabulary, label maps, teacher


def resolve(cfg: TrainConfig) -> Resolved:
    """Check flags and data; fill dataset_mean/std and clip_samples."""
    from psla_tf.data import pipeline
    check_config(cfg)
    train = _load_spec(cfg.train_data, "train_data")
    ev = _load_spec(cfg.eval_data, "eval_data")
    val = _load_spec(cfg.val_data, "val_data") if cfg.val_data else None
    from psla_tf.training import distill
    kd = distill.plan(cfg, train, ev, val)   # vocabularies (--append_classes), teacher
    steps = pipeline.steps_per_epoch(train.num_examples, cfg.batch_size)
    if steps < 1:
        raise ConfigError(f"--batch_size {cfg.batch_size} is larger than the training set "
                          f"({train.num_examples} examples)")
    if ev.num_examples < 1:
        raise DataError("--eval_data holds no examples")
    if cfg.label_smoothing and kd.distillation_loss:
        raise ConfigError("--label_smoothing smooths the labels of the plain loss: not with a "
                          "teacher's targets or --labelled_fraction")
    if cfg.adapt_epochs and not cfg.adapt_batchnorm:
        raise ConfigError("--adapt_epochs adapts the 'adapted' row: add --adapt_batchnorm")
    if cfg.adapt_epochs and cfg.loss != "ce":
        raise ConfigError("--adapt_epochs (information maximisation) needs a single-label "
                          "model (--loss=ce)")
    if cfg.self_train_epochs:
        if kd.distillation_loss or cfg.append_classes:
            raise ConfigError("--self_train_epochs: not with a teacher, --labelled_fraction "
                              "or --append_classes")
        if any(kd.label_maps.get(w) is not None for w in ("eval", "val")):
            raise ConfigError("--self_train_epochs trains on the evaluated clips: --eval_data "
                              "and --val_data need the training set's vocabulary")
        from psla_tf.label_propagation import MAX_CLIPS
        for flag, spec in (("eval_data", ev), ("val_data", val)):
            if cfg.self_train_neighbours and spec is not None and spec.num_examples > MAX_CLIPS:
                raise ConfigError(f"--self_train_neighbours compares every pair of clips: at "
                                  f"most {MAX_CLIPS} in --{flag} (it has {spec.num_examples}); "
                                  "split the set by speaker or device, or leave it at 0")
    if cfg.adapt_batchnorm:
        from psla_tf.models.adaptation import MIN_ADAPT_CLIPS
        for flag, spec in (("eval_data", ev), ("val_data", val)):
            if spec is not None and spec.num_examples < MIN_ADAPT_CLIPS:
                raise ConfigError(f"--adapt_batchnorm needs at least {MIN_ADAPT_CLIPS} clips "
                                  f"in --{flag} (it has {spec.num_examples})")
    # classes with no positive eval example have no AP/AUC: excluded from mAP, reported now
    ev_map = kd.label_maps.get("eval")
    counts = np.zeros(kd.num_classes, np.int64)
    counts[np.arange(ev.num_classes) if ev_map is None else ev_map] = ev.class_counts
    no_pos = [i for i, c in enumerate(counts) if int(c) == 0]
    if len(ev.class_counts) and not any(int(c) for c in ev.class_counts):
        raise DataError("--eval_data has no positive example of any class: mAP is undefined")
    cfg = dataclasses.replace(cfg)
    if cfg.append_classes and cfg.dataset_mean is None:  # the source's front end, unchanged
        cfg.dataset_mean, cfg.dataset_std = distill.source_normalisation(cfg)
        source = "the --init_from model (--append_classes keeps its front end)"
    elif cfg.dataset_mean is None:
        stats = normalisation_stats(train)
        if stats is not None:
            cfg.dataset_mean, cfg.dataset_std = stats
            source = "train manifest"
        else:
            cfg.dataset_mean, cfg.dataset_std = params.DATASET_MEAN, params.DATASET_STD
            source = "AudioSet defaults (the train manifest has no fbank statistics)"
    else:
        source = "flags"
    sets = [("train_data", train), ("eval_data", ev), ("val_data", val),
            ("retain_eval_data", kd.retain)]
    cut = cut_clip_problems([(n, s) for n, s in sets if s is not None], cfg.target_length)
    if cut and not cfg.allow_cut_clips:
        raise DataError(cut[0])
    clip = cfg.clip_samples
    if clip is None:
        clip = pipeline.clip_samples_for_frames(cfg.target_length)
        longest = max(int(round(m.max_seconds * m.sample_rate))
                      for _, s in sets if s is not None for m in s.manifests)
        clip = max(min(clip, longest), params.FRAME_LENGTH)
        cfg.clip_samples = clip
    return Resolved(cfg, train, ev, val, steps, clip, source, no_pos, cut, kd)


def cut_clip_problems(sets: list[tuple[str, Any]], target_length: int) -> list[str]:
    """One line per manifest whose clips were cut at preparation (``make_tfrecords
    --max_seconds``) to fewer than 90 % of the model input's ``target_length`` frames
    (:func:`psla_tf.data.records.clips_cut_short`; whole shorter clips are zero-padded as the
    paper pads them, so only manifests that really cut a clip count)."""
    from psla_tf.data.records import clips_cut_short
    need_s = (target_length - 1) * params.FRAME_SHIFT / params.SAMPLE_RATE + \
        params.FRAME_LENGTH / params.SAMPLE_RATE
    out = []
    for name, spec in sets:
        for m, frames in clips_cut_short(spec, target_length):
            out.append(f"--{name}: {m.num_cut} clip(s) of {m.path} were cut at preparation to "
                       f"{m.max_seconds:g} s ({frames} frames), shorter than the model input "
                       f"of {target_length} frames ({need_s:.2f} s, --target_length): prepare "
                       f"them again with tools/make_tfrecords.py --target_length="
                       f"{target_length} (keeps {need_s:.2f} s), lower --target_length, or "
                       "pass --allow_cut_clips if the shorter clips are intended")
    return out


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
        out.append(f"  parameters: {num_params:,}"
                   + (f" (counted without loading --pretrained={cfg.pretrained})"
                      if cfg.dry_run and cfg.pretrained != "none" else ""))
    longest = {n: max(m.max_seconds for m in s.manifests)
               for n, s in (("train", r.train), ("eval", r.eval), ("val", r.val)) if s}
    out.append(f"  input: {cfg.target_length} frames, {r.clip_samples} samples per clip; "
               "clips kept at preparation up to " + ", ".join(f"{n} {v:g} s"
                                                               for n, v in longest.items()))
    for line in r.cut_clips:
        out.append("  allowed by --allow_cut_clips: " + line)
    if r.eval_without_positives:
        names = [r.kd.model_names[i] or r.kd.model_mids[i] for i in r.eval_without_positives]
        out.append(f"  eval set: {len(names)} of {r.kd.num_classes} classes have no positive "
                   "example and are excluded from mAP/AUC: " + ", ".join(names[:20])
                   + (" ..." if len(names) > 20 else ""))
    lrs = epoch_learning_rates(cfg.lr, cfg.n_epochs, cfg.lrscheduler_start,
                               cfg.lrscheduler_decay, cfg.lrscheduler_step)
    out.append(f"  warm-up: {cfg.warmup_steps} steps, lr raised every {cfg.warmup_every} "
               f"steps (= {cfg.warmup_steps / r.steps_per_epoch:.2f} epochs)")
    out.append("  per-epoch lr: " + ", ".join(f"{e}:{lr:.4g}" for e, lr in
                                               enumerate(lrs, start=1)))
    bn = (f", BatchNorm statistics from {min(cfg.wa_bn_batches, r.steps_per_epoch)} "
          "training batches" if cfg.wa_bn_batches else "")
    out.append(f"  weight averaging: epochs {cfg.wa_start}-{cfg.wa_end}{bn}" if cfg.wa
               else "  weight averaging: off")
    out += r.kd.describe(cfg)
    return "\n".join(out)
