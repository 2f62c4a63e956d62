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

With ``val_data`` the weight-averaged model and the ensemble are scored on the validation set
too, and ``summary['selection']`` / ``summary['chosen']`` record which set chose what and the
row with the best validation metric (``psla_tf.training.selection``); the eval set is only
ever reported.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from typing import Any

from psla_tf import atomic, compat, run_folder
from psla_tf.errors import ConfigError
from psla_tf.config import TrainConfig, fit_verbosity, flagfile_text, parse_flag_lines
from psla_tf.models.tagger import build_model
from psla_tf.training.plan import Resolved, check_config, describe, resolve
from psla_tf.training.selection import SUMMARY_KEYS, single_result, summary_table


# ----------------------------------------------------------------------------- building
def make_schedule(cfg: TrainConfig, steps_per_epoch: int):
    from psla_tf.training.schedule import PSLASchedule
    return PSLASchedule(cfg.lr, steps_per_epoch, cfg.n_epochs, cfg.lrscheduler_start,
                        cfg.lrscheduler_decay, cfg.lrscheduler_step, cfg.warmup_steps,
                        cfg.warmup_every)


# ----------------------------------------------------------------------------- resume
# flags that may change between a run and its resumption (they do not change the result)
_RESUME_FREE_FLAGS = ("verbose", "resume", "strategy", "tpu", "jit_compile", "deterministic",
                      "skip_corrupt_records", "eval_batch_size", "save_predictions",
                      "allow_cut_clips", "fbank_dft", "fused_batchnorm", "pointwise_matmul",
                      "swish_saved_sigmoid", "adapt_batchnorm", "adapt_epochs",
                      "adapt_pseudo_label_weight", "adapt_pseudo_labels",
                      "self_train_epochs", "self_train_lr", "self_train_neighbours",
                      "self_train_alpha", "records_in_memory_mb")


def check_resume_flags(cfg: TrainConfig, exp_dir: str) -> None:
    """Resuming with flags that change the result is an error (before anything is loaded).
    A flag the run's flags.txt lacks (written before the flag existed) counts as its default,
    which keeps the earlier behaviour."""
    path = run_folder.path(exp_dir, run_folder.FLAGS_FILE)
    if not os.path.exists(path):
        return

    with open(path, encoding="utf-8") as f:
        old = parse_flag_lines(f.read())
    new = parse_flag_lines(flagfile_text(cfg))
    default = parse_flag_lines(flagfile_text(TrainConfig()))
    diff = [f"--{k}: {old.get(k)} → {new.get(k)}" for k in sorted(set(old) | set(new))
            if k not in _RESUME_FREE_FLAGS and old.get(k, default.get(k)) != new.get(k)]
    if diff:
        raise ConfigError(f"{exp_dir} holds a run with other flags ({'; '.join(diff)}); "
                          "re-run with its flags (--flagfile=" + path + "), use a new "
                          "--exp_dir, or --noresume to start over")


# ----------------------------------------------------------------------------- run
def run(cfg: TrainConfig) -> dict[str, Any] | None:
    """Train per ``cfg``; returns the summary (None for ``dry_run``)."""
    out = train(cfg)
    return None if out is None else out[0]


def train(cfg: TrainConfig):
    """Train per ``cfg`` under its tf.distribute strategy; returns (summary, model), or None
    for ``dry_run``. Only the chief writes into ``exp_dir``; every worker resumes from it."""
    import tensorflow as tf

    from psla_tf.training import distribute

    check_config(cfg)
    strategy = None
    if not cfg.dry_run:  # multi-worker / TPU strategies must exist before any TF op
        distribute.set_deterministic(cfg.deterministic)
        try:
            strategy = distribute.make_strategy(cfg.strategy, cfg.tpu)
        except distribute.StrategyError as e:
            raise ConfigError(str(e)) from None
    r = resolve(cfg)
    cfg = r.cfg
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if cfg.batch_size % replicas:
        raise ConfigError(f"--batch_size {cfg.batch_size} (the global batch) is not divisible "
                          f"by the {replicas} replicas of --strategy={cfg.strategy}")
    chief = strategy is None or distribute.is_chief(strategy)
    multi_worker = strategy is not None and distribute.is_multi_worker(strategy)
    distribute.set_precision(cfg.mixed_precision)
    try:
        return _train(cfg, r, strategy or tf.distribute.get_strategy(), replicas, chief,
                      multi_worker)
    finally:
        distribute.set_precision("none")


@dataclasses.dataclass
class _Loop:
    """The per-epoch machinery of a run: evaluations, accumulators and the callback list."""
    evaluation: Any
    val_eval: Any
    retain_eval: Any
    ensemble: Any
    val_ensemble: Any
    wa: Any
    evaluations: list
    callbacks: list


def _build(cfg: TrainConfig, r: Resolved, strategy, replicas: int):
    """The model (in the strategy's scope), its ``--init_from`` / ``--append_classes``
    initialisation report and the ``--append_classes`` source model."""
    import keras
    import tensorflow as tf

    from psla_tf.models.backbones import PretrainedWeightsError
    from psla_tf.training import distribute
    keras.utils.set_random_seed(cfg.seed)  # deterministic initialisation
    # a dry run only counts parameters: the same architecture without fetching any weights
    build_cfg = dataclasses.replace(cfg, pretrained="none") if cfg.dry_run else cfg
    try:
        with strategy.scope():
            model = build_model(build_cfg, r.kd.num_classes)
    except PretrainedWeightsError as e:
        raise ConfigError(f"--pretrained={cfg.pretrained}: " + " ".join(str(e).split())
                          ) from None
    if replicas > 1 and cfg.sync_batchnorm:
        distribute.synchronise_batchnorm(model)
    init_report = source_model = None
    if cfg.append_classes:  # the source model's layers and its classes' head columns
        from psla_tf.training import finetune
        init_report, source_model = finetune.append_classes(model, cfg.init_from,
                                                            r.kd.model_mids)
    elif cfg.init_from:  # fine-tuning: copy matching layers, new heads for a new vocabulary
        from psla_tf.training import finetune
        init_report = finetune.init_from(model, cfg.init_from, target_mids=r.train.mids)
    new_head = not cfg.init_from or (init_report is not None
                                     and bool(init_report.heads_reinitialised))
    if cfg.head_bias_init == "prior" and new_head:   # (not with --append_classes: plan)
        _init_head_prior(model, cfg, r)
    # the input pipeline seeds every op explicitly (stateless from --seed); a global TF seed
    # would only change tf.data's seed handling (and breaks tensor-valued shuffle seeds)
    tf.random.set_seed(None)
    return model, init_report, source_model


def _init_head_prior(model, cfg: TrainConfig, r: Resolved) -> None:
    """``--head_bias_init=prior``: the new head's class biases at logit of each class's mean
    training target under the run's sampling (:func:`psla_tf.data.sampling.class_prior`)."""
    from psla_tf.data import record_index, sampling
    from psla_tf.models.pooling import init_class_prior
    index = record_index.load_record_index(r.train, skip_corrupt=cfg.skip_corrupt_records)
    weights = index.sampling_weights(r.train.class_counts) if cfg.balanced_sampling else None
    prior = sampling.class_prior(index.label_indptr, index.label_indices, index.num_classes,
                                 weights)
    init_class_prior(model.get_layer("classifier").get_layer("pooling"), prior)
    print(f"head: class biases at logit(prior), the mean training target per class "
          f"({prior.min():.4f}-{prior.max():.4f})", flush=True)


def _announce(cfg: TrainConfig, strategy, replicas: int, chief: bool, init_report) -> None:
    import keras

    from psla_tf.training import distribute
    print(f"strategy: {type(strategy).__name__}, {replicas} replica(s), global batch "
          f"{cfg.batch_size}, precision {keras.mixed_precision.global_policy().name}"
          + (", XLA" if cfg.jit_compile else "")
          + ("" if chief else f" (worker {distribute.worker_id(strategy)}: the chief writes)"),
          flush=True)
    if init_report is not None:
        print(init_report.describe(), flush=True)


def _prepare_run_folder(cfg: TrainConfig, r: Resolved, resuming: bool, init_report) -> None:
    """The chief's run folder: checkpoints folder, partial files of a killed run removed,
    flags.txt + provenance.json, labels.csv."""
    from psla_tf import provenance
    from psla_tf.data.records import write_label_csv
    from psla_tf.training import resume as resume_lib
    exp = cfg.exp_dir
    os.makedirs(os.path.join(exp, run_folder.CHECKPOINTS_DIR), exist_ok=True)
    resume_lib.clean_partial_files(exp)
    if not cfg.resume and os.path.exists(os.path.join(exp, resume_lib.STATE_FILE)):
        os.remove(os.path.join(exp, resume_lib.STATE_FILE))  # --noresume: start over
    if not resuming and os.path.exists(os.path.join(exp, "source_teacher.npz")):
        os.remove(os.path.join(exp, "source_teacher.npz"))  # another run's teacher
    # flags.txt (reproduces the run), library versions, manifest hashes, git commit
    provenance.write_provenance(exp, flagfile_text(cfg), [
        ("train", cfg.train_data), ("eval", cfg.eval_data), ("val", cfg.val_data)],
        extra={"normalisation": {"mean": cfg.dataset_mean, "std": cfg.dataset_std,
                                 "source": r.norm_source},
               "init_from": init_report.as_dict() if init_report is not None else None,
               "distillation": r.kd.summary(cfg)})
    # the vocabulary travels with the models (predict / infer / export read it from here)
    write_label_csv(run_folder.path(exp, run_folder.LABELS_FILE), r.kd.model_mids,
                    r.kd.model_names)


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int):
    """The recipe's optimizer: torch's Adam with coupled L2 ``--weight_decay`` on PSLA's
    warm-up and step schedule (Sec. II-B)."""
    from psla_tf.training.optim import TorchAdam
    return TorchAdam(make_schedule(cfg, steps_per_epoch), l2_weight_decay=cfg.weight_decay)


def _compile(model, cfg: TrainConfig, r: Resolved, strategy) -> None:
    from psla_tf.training import distill
    with strategy.scope():
        model.compile(optimizer=make_optimizer(cfg, r.steps_per_epoch),
                      loss=distill.make_loss(cfg, r.kd), jit_compile=bool(cfg.jit_compile))
        # the optimizer's slots now, not inside the first traced train step: a tf.function
        # that creates variables is traced twice (Keras defers this build to the trace on
        # the default strategy), which cost ~15 s per run for EfficientNet-B0 on CPU
        model.optimizer.build(model.trainable_variables)


def refresh_run_batchnorm(model, exp_dir: str, num_batches: int | None = None) -> int:
    """Re-estimate ``model``'s BatchNorm statistics as run ``exp_dir`` does for its weight
    average (its flags.txt: training data, augmentation, ``--wa_bn_batches`` unless
    ``num_batches`` is given). Returns the batches used (0: unchanged)."""
    import tensorflow as tf

    from psla_tf.config import config_from_flagfile
    cfg = config_from_flagfile(run_folder.path(exp_dir, run_folder.FLAGS_FILE))
    if num_batches is not None:
        cfg = dataclasses.replace(cfg, wa_bn_batches=int(num_batches))
    r = resolve(cfg)
    refresh = _bn_refresh(r.cfg, r, tf.distribute.get_strategy(), 1)
    return refresh(model) if refresh is not None else 0


def _bn_refresh(cfg: TrainConfig, r: Resolved, strategy, replicas: int):
    """``model -> batches``: the averaged model's BatchNorm statistics from
    ``--wa_bn_batches`` (at most one epoch of) fresh training batches; None when 0."""
    if not cfg.wa_bn_batches:
        return None
    from psla_tf.training.callbacks import refresh_batchnorm
    num = min(cfg.wa_bn_batches, r.steps_per_epoch)

    def refresh(model) -> int:
        with strategy.scope():  # the epoch after the last one: batches training never saw
            batches = train_pipeline(cfg, r, strategy, replicas, cfg.n_epochs, num_epochs=1)
            return refresh_batchnorm(model, batches, num, strategy if replicas > 1 else None,
                                     seed=cfg.seed)
    return refresh


def _make_loop(cfg: TrainConfig, r: Resolved, model, strategy, replicas: int,
               chief: bool) -> _Loop:
    """Per-epoch evaluation of eval / val / retain sets, checkpoint ensemble(s), weight
    averaging, backbone freezing and the failure callbacks, in the order they run."""
    import tensorflow as tf

    from psla_tf.data import pipeline
    from psla_tf.training import callbacks as cbs
    from psla_tf.training import resume as resume_lib
    exp, skip = cfg.exp_dir, cfg.skip_corrupt_records
    pred_dir = (os.path.join(exp, run_folder.PREDICTIONS_DIR) if cfg.save_predictions and chief
                else None)

    def scored(which: str, spec):
        ds = pipeline.make_eval_dataset(spec, cfg.eval_batch_size, r.clip_samples,
                                        skip_corrupt_records=skip,
                                        transform=r.kd.eval_transform(which))
        return cbs.EpochEvaluation(ds, which, pred_dir, verbose=1)

    evaluation = scored("eval", r.eval)
    val_eval = scored("val", r.val) if r.val is not None else None
    # --append_classes: the original classes on their own set
    retain_eval = scored("retain", r.kd.retain) if r.kd.retain is not None else None
    evaluations = [e for e in (evaluation, val_eval, retain_eval) if e is not None]
    # the ensemble's validation score (lets validation choose among the result rows)
    val_ensemble = (cbs.CheckpointEnsemble(val_eval, None, prefix="val_ens", verbose=0)
                    if val_eval is not None else None)
    # several replicas (not TPU): each process scores the whole set itself, in file order,
    # with no collective ops — the same numbers as one device, also for the partial last
    # batch (Keras' distributed predict splits it into empty per-replica batches)
    local = replicas > 1 and not isinstance(strategy, tf.distribute.TPUStrategy)
    for ev in evaluations:
        ev.local_predict = local
    # accumulators are saved with the epoch's commit (resume.ResumeCheckpoint), not alone
    ensemble = cbs.CheckpointEnsemble(evaluation, None)
    callbacks: list = [cbs.StopOnNonFiniteLoss(os.path.join(exp, run_folder.CHECKPOINTS_DIR)),
                       resume_lib.FaultInjection()]
    callbacks += list(evaluations) + [resume_lib.EvalFault(), ensemble]
    if val_ensemble is not None:
        callbacks.append(val_ensemble)
    wa = None
    if cfg.wa:
        wa = cbs.WeightAveraging(cfg.wa_start, cfg.wa_end,
                                 run_folder.path(exp, run_folder.WA_MODEL) if chief else None,
                                 None, evaluation, val_evaluation=val_eval,
                                 bn_refresh=_bn_refresh(cfg, r, strategy, replicas))
        callbacks.append(wa)
    if cfg.freeze_backbone_epochs:
        from psla_tf.training.finetune import FreezeBackbone, source_columns
        callbacks.insert(0, FreezeBackbone(cfg.freeze_backbone_epochs, pin=source_columns(
            model, len(r.kd.source_mids)) if cfg.append_classes else None))
    return _Loop(evaluation, val_eval, retain_eval, ensemble, val_ensemble, wa, evaluations,
                 callbacks)


def _restore_and_log(cfg: TrainConfig, model, strategy, loop: _Loop, resuming: bool,
                     chief: bool) -> int:
    """Restore a committed run (the epoch to start from) and add the log and per-epoch
    commit callbacks."""
    import keras

    from psla_tf.data import pipeline
    from psla_tf.training import resume as resume_lib
    exp = cfg.exp_dir
    initial_epoch = 0
    if resuming:
        with strategy.scope():
            state = resume_lib.restore(model, exp, loop.evaluations, loop.ensemble, loop.wa,
                                       val_ensemble=loop.val_ensemble)
        initial_epoch = int(state["epoch"])
        for name, v in state.get("corrupt_records", {}).get("shards", {}).items():
            pipeline.CORRUPT_SHARDS.setdefault(name, tuple(v))
        print(f"resuming after epoch {initial_epoch} from {exp}", flush=True)
    log_path = os.path.join(exp, "log.csv")
    if chief:
        resume_lib.truncate_log(log_path, initial_epoch)
        loop.callbacks += [
            keras.callbacks.CSVLogger(log_path, append=initial_epoch > 0),
            keras.callbacks.TensorBoard(os.path.join(exp, "tensorboard"), profile_batch=0)]
    skip = cfg.skip_corrupt_records
    loop.callbacks.append(resume_lib.ResumeCheckpoint(
        exp, loop.evaluations, loop.ensemble, loop.wa, write=chief,
        val_ensemble=loop.val_ensemble,
        extra_state=lambda: {"corrupt_records": pipeline.corrupt_summary()} if skip else {}))
    return initial_epoch


def train_pipeline(cfg: TrainConfig, r: Resolved, strategy, replicas: int,
                   initial_epoch: int = 0, num_epochs: int | None = None):
    """The training batches of epochs ``initial_epoch + 1`` .. (to ``--n_epochs``): one
    pipeline, or one per worker with per-replica batches under a strategy."""
    import tensorflow as tf

    from psla_tf.data import pipeline
    kwargs = dict(batch_size=cfg.batch_size, clip_samples=r.clip_samples,
                  balanced_sampling=cfg.balanced_sampling, mixup=cfg.mixup,
                  mixup_alpha=cfg.mixup_alpha, shuffle_buffer=cfg.shuffle_buffer,
                  sampling_order=cfg.sampling_order, group_batches=cfg.group_batches,
                  records_in_memory_mb=cfg.records_in_memory_mb,
                  random_gain_db=cfg.random_gain_db, random_speed=cfg.random_speed,
                  noise_prob=cfg.noise_prob,
                  noise_snr_db=(cfg.noise_snr_min_db, cfg.noise_snr_max_db),
                  noise_decay_db=(cfg.noise_decay_min_db, cfg.noise_decay_max_db),
                  seed=cfg.seed, initial_epoch=initial_epoch,
                  num_epochs=(cfg.n_epochs - initial_epoch if num_epochs is None
                              else num_epochs),
                  skip_corrupt_records=cfg.skip_corrupt_records)
    # labels into the model's vocabulary, teacher targets (built with each pipeline)
    targets = functools.partial(r.kd.train_transform, cfg.kd_temperature)
    if strategy is tf.distribute.get_strategy() and replicas == 1:
        return pipeline.make_train_dataset(r.train, transform=targets(), **kwargs)
    # one pipeline per worker, its own share and seeds; per-replica batches
    return strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.make_train_dataset(r.train, input_context=ctx,
                                                transform=targets(), **kwargs))


def _fit(cfg: TrainConfig, r: Resolved, model, strategy, replicas: int, multi_worker: bool,
         loop: _Loop, initial_epoch: int) -> None:
    """``model.fit`` over the training pipeline (one per worker under a strategy)."""
    import tensorflow as tf

    from psla_tf.data import pipeline
    train_ds = train_pipeline(cfg, r, strategy, replicas, initial_epoch)
    if multi_worker:
        # Keras 3.15's fit reduces a first batch across replicas to build the model
        # symbolically; MultiWorkerMirroredStrategy.reduce cannot take a dict of
        # PerReplica values. The model is built already: let fit take the strategy from
        # the scope instead (Keras falls back to tf.distribute.get_strategy()).
        compat.clear_distribute_strategy(model)
        compat.patch_keras_multi_worker_reduce()  # another Keras 3.15 gap, see there
    try:
        with strategy.scope():
            model.fit(train_ds, epochs=cfg.n_epochs, initial_epoch=initial_epoch,
                      steps_per_epoch=r.steps_per_epoch, callbacks=loop.callbacks,
                      verbose=fit_verbosity(cfg.verbose), shuffle=False)
    except tf.errors.OpError as e:
        err = pipeline.data_error_from(e)
        if err is not None:
            raise err from None
        raise


def _finish(loop: _Loop, model) -> None:
    """Resumed after the last epoch's commit: finish what the killed run did not."""
    wa, ensemble, val_ensemble = loop.wa, loop.ensemble, loop.val_ensemble
    if wa is not None and wa.epochs and wa.result is None:
        wa.set_model(model)
        wa.finalize()
    if ensemble.sum is not None and ensemble.result is None:
        ensemble.result = loop.evaluation.score(ensemble.scores)
    if val_ensemble is not None and val_ensemble.sum is not None and val_ensemble.result is None:
        val_ensemble.result = loop.val_eval.score(val_ensemble.scores)


def _previous_seconds(exp_dir: str, default: float) -> float:
    """The training time in the run folder's summary.json (``default`` without one)."""
    import json
    try:
        with open(run_folder.path(exp_dir, run_folder.SUMMARY_FILE)) as f:
            return float(json.load(f)["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def _adapted(cfg: TrainConfig, loop: _Loop, model, chief: bool
             ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``--adapt_batchnorm``: the exported model (weight average, else the last epoch) with
    its BatchNorm statistics re-estimated on each evaluated set's own clips, no labels
    (:mod:`psla_tf.models.adaptation`; ``--adapt_epochs``: then its BatchNorm γ, β by
    information maximisation and SHOT's pseudo-labels on them), scored on those clips; the
    eval set's adapted model is saved to ``adapted_model.keras``. Computed on a copy built
    outside any strategy. Returns the row and the adapted scores of each set (eval, val)."""
    if not cfg.adapt_batchnorm or not chief:
        return None, {}
    from psla_tf.models.adaptation import adapt_batchnorm
    from psla_tf.training import selection
    wa = loop.wa
    averaged = getattr(wa, "averaged", None) if wa is not None and wa.result else None
    wa_path = run_folder.path(cfg.exp_dir, run_folder.WA_MODEL)
    if averaged is None and wa is not None and wa.result and os.path.exists(wa_path):
        from psla_tf.models.loading import load_tagger   # a finished run, run again
        averaged = load_tagger(wa_path).get_weights()
    weights = averaged if averaged is not None else [v.numpy() for v in model.weights]
    copy = build_model(dataclasses.replace(cfg, pretrained="none"),
                       int(model.outputs[0].shape[-1]))
    row: dict[str, Any] = {"model": "weight_averaging" if averaged is not None else "final",
                           "im_epochs": cfg.adapt_epochs}
    if cfg.adapt_epochs:
        row["pseudo_label_weight"] = cfg.adapt_pseudo_label_weight
        row["pseudo_labels"] = cfg.adapt_pseudo_labels
    scores = {}
    for which, ev in (("eval", loop.evaluation), ("val", loop.val_eval)):
        if ev is None:
            continue
        copy.set_weights(weights)
        clips = adapt_batchnorm(copy, ev.dataset, im_epochs=cfg.adapt_epochs,
                                pseudo_label_weight=cfg.adapt_pseudo_label_weight,
                                pseudo_labels=cfg.adapt_pseudo_labels)
        scores[which] = ev.predict(copy)
        result = ev.score(scores[which])
        if which == "val":
            row.update(selection.val_fields(result))
            continue
        row.update({k: result[k] for k in SUMMARY_KEYS if k in result}, clips=clips)
        path = run_folder.path(cfg.exp_dir, run_folder.ADAPTED_MODEL)
        with atomic.atomic_path(path, ".keras") as tmp:
            copy.save(tmp)
    im = (f", {cfg.adapt_epochs} epochs of information maximisation (pseudo-label weight "
          f"{cfg.adapt_pseudo_label_weight:g}, {cfg.adapt_pseudo_labels})"
          if cfg.adapt_epochs else "")
    print(f"adapted ({row['model']}, BatchNorm statistics of the {row.get('clips')} "
          f"evaluated clips{im}): mAP {row['mAP']:.4f}"
          + (f" accuracy {row['accuracy']:.4f}" if "accuracy" in row else ""), flush=True)
    return row, scores


def _self_trained(cfg: TrainConfig, r: Resolved, loop: _Loop, row: dict[str, Any],
                  scores: dict[str, Any]) -> dict[str, Any]:
    """``--self_train_epochs``: each evaluated set's self-training run
    (:mod:`psla_tf.training.self_training`) replaces the ``adapted`` row's numbers for that set
    (and, for the eval set, ``adapted_model.keras``)."""
    from psla_tf.training import selection, self_training
    out = dict(row)
    for which, ev, spec, data in (("eval", loop.evaluation, r.eval, cfg.eval_data),
                                  ("val", loop.val_eval, r.val, cfg.val_data)):
        if ev is None:
            continue
        sub = self_training.self_train(cfg, which, spec, data, scores[which], ev.targets, run,
                                       ev.dataset)
        if which == "val":
            out.update(selection.val_fields(sub), val_self_training=sub["self_training"])
            continue
        out = {k: v for k, v in out.items() if k.startswith("val_")} | sub
        shutil.copyfile(os.path.join(cfg.exp_dir, sub["self_training"]["run"],
                                     run_folder.ADAPTED_MODEL),
                        run_folder.path(cfg.exp_dir, run_folder.ADAPTED_MODEL))
    print(f"adapted after self-training: mAP {out['mAP']:.4f}"
          + (f" accuracy {out['accuracy']:.4f}" if "accuracy" in out else ""), flush=True)
    return out


def _summary(cfg: TrainConfig, r: Resolved, loop: _Loop, model, source_model,
             replicas: int, seconds: float, adapted: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """summary.json of the run (module doc)."""
    from psla_tf.data import pipeline
    from psla_tf.training import distill, selection
    wa, ensemble, val_ensemble = loop.wa, loop.ensemble, loop.val_ensemble
    evaluation, val_eval = loop.evaluation, loop.val_eval
    summary: dict[str, Any] = {
        "metric": cfg.metric,
        "single": single_result(evaluation.history, val_eval.history if val_eval else None,
                                cfg.metric),
        "weight_averaging": ({k: wa.result[k] for k in SUMMARY_KEYS if k in wa.result}
                             | {"epochs": wa.epochs, "bn_batches": wa.bn_batches}
                             | selection.val_fields(wa.val_result)
                             if wa is not None and wa.result else None),
        "ensemble": ({k: ensemble.result[k] for k in SUMMARY_KEYS if k in ensemble.result}
                     | {"epochs": ensemble.epochs}
                     | selection.val_fields(val_ensemble.result if val_ensemble else None)
                     if ensemble.result else None),
        "adapted": adapted,
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
        "eval_classes_without_positives": [r.kd.model_mids[i]
                                           for i in r.eval_without_positives],
        "distillation": r.kd.summary(cfg),
        "append_classes": (distill.append_summary(r.kd, loop.retain_eval, wa, model,
                                                  source_model)
                           if cfg.append_classes else None),
        "replicas": replicas,
        "mixed_precision": cfg.mixed_precision,
        "xla": bool(model.jit_compile),   # what Keras compiled, not only what was asked
    }
    selection.add_selection(cfg, summary)   # which set chose what; the val-chosen row
    if cfg.skip_corrupt_records:
        summary["corrupt_records"] = pipeline.corrupt_summary()
        if summary["corrupt_records"]["shards"]:
            print(f"skipped {len(summary['corrupt_records']['shards'])} corrupt shard(s), "
                  f"{summary['corrupt_records']['records_lost']} record(s) lost: "
                  + ", ".join(summary["corrupt_records"]["shards"]), flush=True)
    return summary


def _train(cfg: TrainConfig, r: Resolved, strategy, replicas: int, chief: bool,
           multi_worker: bool):
    """One training run on this process (the chief writes the run folder)."""
    from psla_tf.training import distill
    from psla_tf.training import resume as resume_lib
    model, init_report, source_model = _build(cfg, r, strategy, replicas)
    print(describe(r, model.count_params()), flush=True)
    if cfg.dry_run:
        return None
    _announce(cfg, strategy, replicas, chief, init_report)
    exp = cfg.exp_dir
    resuming = cfg.resume and resume_lib.committed_epoch(exp) > 0
    if resuming:
        check_resume_flags(cfg, exp)
    if chief:
        _prepare_run_folder(cfg, r, resuming, init_report)
    if r.kd.teacher_mode == "source":  # --append_classes: the source model is the teacher
        table = distill.source_teacher(source_model, r.train, r.clip_samples,
                                       cfg.eval_batch_size,
                                       os.path.join(exp, "source_teacher.npz"),
                                       r.kd.source_mids, write=chief)
        r.kd.set_teacher(table, table.ids)
        r.kd.set_lambdas(cfg.kd_lambda, r.train.mids)
        print(distill.coverage_line(r.kd.coverage).strip(), flush=True)
    _compile(model, cfg, r, strategy)
    loop = _make_loop(cfg, r, model, strategy, replicas, chief)
    initial_epoch = _restore_and_log(cfg, model, strategy, loop, resuming, chief)
    t0 = time.time()
    if initial_epoch < cfg.n_epochs:
        _fit(cfg, r, model, strategy, replicas, multi_worker, loop, initial_epoch)
    seconds = time.time() - t0
    if initial_epoch >= cfg.n_epochs:     # a finished run again: its training time stays
        seconds = _previous_seconds(exp, seconds)
    _finish(loop, model)
    adapted, adapted_scores = _adapted(cfg, loop, model, chief)
    if adapted is not None and cfg.self_train_epochs:
        adapted = _self_trained(cfg, r, loop, adapted, adapted_scores)
    summary = _summary(cfg, r, loop, model, source_model, replicas, seconds, adapted)
    if chief:
        with atomic.atomic_path(run_folder.path(exp, run_folder.FINAL_MODEL), ".keras") as tmp:
            model.save(tmp)                  # the last epoch, whole (.keras)
        atomic.write_json(run_folder.path(exp, run_folder.SUMMARY_FILE), summary, indent=1)
        print(summary_table(summary), flush=True)
    return summary, model
