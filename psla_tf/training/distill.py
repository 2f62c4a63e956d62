"""Knowledge-distillation loss (issue 19): labels and a teacher's soft targets.

The training pipeline (:mod:`psla_tf.data.teacher`) gives, per example, ``y = [labels (C),
teacher targets (C), has_teacher (1), has_labels (1)]``, ``[B, 2C + 2]``. With per-class
teacher weights ``λ_c`` (:func:`psla_tf.data.teacher.class_lambdas`: ``--kd_lambda`` where a
class has labels and a teacher score), ``w = λ_c · has_teacher`` and ``l = has_labels``:

* ``bce``: ``mean_c [(1 − w) l BCE(y_c, p_c) + w BCE(t_c, p_c)]`` — EfficientAT's
  ``(1 − λ) L_label + λ L_KD`` per class, on the clamped scores as :func:`optim.psla_bce`;
* ``ce`` (single-label students): ``(1 − w̄) l CE(argmax y) + w̄ · (−Σ_c q_c log p_c)``, with
  ``q = t / Σ t`` (the teacher's scores normalised over its classes) and ``w̄ = λ · has``.

A clip without a teacher score (``has_teacher`` 0) contributes its label loss only; a clip of
the unlabelled transfer set (``has_labels`` 0, ``--labelled_fraction``) its teacher term only
(nothing without a teacher). With every ``λ_c = 0`` and every clip labelled both reduce to the
label losses of :mod:`psla_tf.training.optim`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from psla_tf import params
from psla_tf.data.records import DataError

__all__ = ["DistillationLoss", "split_targets", "check_flags", "Plan", "plan", "make_loss",
           "source_teacher", "coverage_line", "append_summary", "source_normalisation"]


def split_targets(y_true, num_classes: int):
    """``[B, 2C + 2]`` → (labels [B, C], teacher [B, C], has_teacher [B, 1],
    has_labels [B, 1])."""
    c = int(num_classes)
    return (y_true[..., :c], y_true[..., c:2 * c], y_true[..., 2 * c:2 * c + 1],
            y_true[..., 2 * c + 1:2 * c + 2])


@keras.saving.register_keras_serializable(package="psla_tf")
class DistillationLoss(keras.losses.Loss):
    """Per-example distillation loss (see the module doc); Keras means it over the batch.

    Args:
      class_lambda: teacher weight per class ``[C]`` (all equal for ``ce``).
      loss: ``"bce"`` (multi-label) or ``"ce"`` (single-label).
    """

    def __init__(self, class_lambda: Sequence[float], loss: str = "bce",
                 name: str = "psla_distillation", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        if loss not in ("bce", "ce"):
            raise ValueError(f"loss must be bce or ce, got {loss!r}")
        self.class_lambda = [float(x) for x in class_lambda]
        self.loss_name = loss

    def call(self, y_true, y_pred):
        c = len(self.class_lambda)
        labels, teacher, has, has_labels = split_targets(ops.cast(y_true, "float32"), c)
        lam = ops.convert_to_tensor(self.class_lambda, "float32")
        if self.loss_name == "ce":
            p = ops.clip(ops.cast(y_pred, "float32"), params.CLAMP_EPS, 1.0)
            log_p = ops.log(p)
            hard = -ops.sum(ops.one_hot(ops.argmax(labels, axis=-1), c) * log_p, axis=-1)
            q = teacher / ops.maximum(ops.sum(teacher, axis=-1, keepdims=True),
                                      params.CLAMP_EPS)
            soft = -ops.sum(q * log_p, axis=-1)
            w = ops.max(lam) * has[..., 0]
            return (1.0 - w) * has_labels[..., 0] * hard + w * soft
        p = ops.clip(ops.cast(y_pred, "float32"), params.CLAMP_EPS, 1.0 - params.CLAMP_EPS)
        log_p, log_q = ops.log(p), ops.log(1.0 - p)
        bce_label = -(labels * log_p + (1.0 - labels) * log_q)
        bce_teacher = -(teacher * log_p + (1.0 - teacher) * log_q)
        w = lam * has                                     # [B, C]
        return ops.mean((1.0 - w) * has_labels * bce_label + w * bce_teacher, axis=-1)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(class_lambda=list(self.class_lambda), loss=self.loss_name)
        return config


# ----------------------------------------------------------------------------- run plan
def check_flags(cfg) -> str | None:
    """The first problem of the distillation / --append_classes flags of a TrainConfig (a
    one-line message), or None."""
    if not 0.0 <= cfg.kd_lambda <= 1.0:
        return f"--kd_lambda must be in [0, 1], got {cfg.kd_lambda}"
    if cfg.kd_temperature <= 0:
        return f"--kd_temperature must be > 0, got {cfg.kd_temperature}"
    if not 0.0 < cfg.labelled_fraction <= 1.0:
        return f"--labelled_fraction must be in (0, 1], got {cfg.labelled_fraction}"
    if cfg.labelled_fraction < 1.0 and cfg.sampling_order != "iid":
        from psla_tf.data.teacher import TRANSFER_SET_NEEDS_IID
        return TRANSFER_SET_NEEDS_IID
    if cfg.labelled_fraction < 1.0 and cfg.append_classes:
        return "--labelled_fraction and --append_classes cannot be combined"
    if cfg.append_classes:
        if not cfg.init_from:
            return ("--append_classes needs --init_from=MODEL: the trained model whose "
                    "classes are kept")
        if cfg.loss != "bce":
            return ("--append_classes needs --loss=bce (a softmax over old + new classes "
                    "would change the original classes' scores)")
    elif cfg.retain_eval_data:
        return "--retain_eval_data is for --append_classes runs"
    return None


@dataclasses.dataclass
class Plan:
    """Vocabularies and teacher of a run (resolved before training).

    ``model_mids``: the model's classes (the data's; with ``--append_classes`` the source
    model's followed by the new ones). ``label_maps``: per set (train / eval / val / retain)
    the model column of each of its classes, or None when its vocabulary is the model's.
    ``teacher_mode``: None, ``files`` (``--teacher_scores=FILE,…``), ``stored`` (the
    shards' feature) or ``source`` (``--append_classes`` without ``--teacher_scores``: the
    source model scores the training set when training starts). ``labelled_keys``: with
    ``--labelled_fraction`` < 1, the record keys of the training clips that keep their
    labels (the others are the unlabelled transfer set); ``labelled`` counts both.
    """
    model_mids: list[str]
    model_names: list[str]
    label_maps: dict[str, np.ndarray | None]
    source_mids: list[str] | None = None
    retain: Any = None
    teacher_mode: str | None = None
    teacher: Any = None
    columns: np.ndarray | None = None
    class_lambda: np.ndarray | None = None
    coverage: dict[str, Any] | None = None
    labelled_keys: np.ndarray | None = None
    labelled: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.model_mids)

    @property
    def active(self) -> bool:
        """The loss uses teacher targets."""
        return self.class_lambda is not None and bool((self.class_lambda > 0).any())

    def train_transform(self, temperature: float):
        """The training pipeline's :class:`ExampleTargets` (None: nothing to do). Call it
        where the dataset is built."""
        from psla_tf.data.teacher import ExampleTargets
        lm = self.label_maps.get("train")
        if not self.active and lm is None and self.labelled_keys is None:
            return None
        return ExampleTargets(self.num_classes, lm, self.teacher if self.active else None,
                              self.columns, temperature, self.labelled_keys)

    @property
    def distillation_loss(self) -> bool:
        """The targets carry a teacher or a labelled subset (:class:`DistillationLoss`)."""
        return self.active or self.labelled_keys is not None

    def set_labelled(self, fraction: float, keys: np.ndarray, ids: Sequence[str]) -> None:
        """``--labelled_fraction`` < 1: keep the labels of :func:`teacher.labelled_subset`
        (``keys`` / ``ids``: :func:`teacher.training_keys_and_ids` of the training set)."""
        from psla_tf.data import teacher as tlib
        keep = tlib.labelled_subset(ids, fraction)
        if not keep.any():
            raise DataError(f"--labelled_fraction={fraction:g} keeps the labels of none of "
                            f"the {len(ids)} training clips")
        self.labelled_keys = keys[keep]
        self.labelled = {"labelled_fraction": float(fraction),
                         "labelled_clips": int(keep.sum()),
                         "unlabelled_clips": int((~keep).sum())}

    def eval_transform(self, which: str):
        from psla_tf.data.teacher import ExampleTargets
        lm = self.label_maps.get(which)
        return None if lm is None else ExampleTargets(self.num_classes, lm)

    def set_teacher(self, teacher, data_ids: Sequence[str] | None = None) -> None:
        """Attach a TeacherTable / StoredTeacher; coverage from ``data_ids`` (tables)."""
        from psla_tf.data import teacher as tlib
        self.teacher = teacher
        self.columns = tlib.column_map(teacher.mids, teacher.num_classes, self.model_mids)
        if isinstance(teacher, tlib.TeacherTable):
            self.coverage = tlib.coverage(data_ids, teacher.ids)
        else:
            self.coverage = {"with_teacher": teacher.with_teacher,
                             "without_teacher": teacher.without_teacher,
                             "missing_examples": []}

    def set_lambdas(self, kd_lambda: float, train_mids: Sequence[str]) -> None:
        from psla_tf.data.teacher import class_lambdas
        labelled = np.isin(np.asarray(self.model_mids), np.asarray(list(train_mids)))
        self.class_lambda = class_lambdas(kd_lambda, self.columns >= 0, labelled)

    def describe(self, cfg) -> list[str]:
        out = []
        if self.labelled is not None:
            n = self.labelled["unlabelled_clips"]
            out.append(f"  labelled subset: labels of {self.labelled['labelled_clips']} of "
                       f"{self.labelled['labelled_clips'] + n} training clips kept "
                       f"(--labelled_fraction={cfg.labelled_fraction:g}); the other {n} "
                       + ("train on the teacher only" if self.active else
                          "add no loss (no teacher)"))
        if self.source_mids is not None:
            out.append(f"  append classes: {len(self.source_mids)} classes of "
                       f"{cfg.init_from} kept, {self.num_classes - len(self.source_mids)} "
                       f"new from the training data → {self.num_classes} outputs")
        if self.teacher_mode is None:
            if cfg.teacher_scores:
                out.append("  distillation: --kd_lambda=0, the teacher is not used")
            return out
        what = {"files": cfg.teacher_scores, "stored": "the training shards' teacher feature",
                "source": f"{cfg.init_from} (scored at the start of training)"}
        out.append(f"  distillation: teacher {what[self.teacher_mode]}, kd_lambda "
                   f"{cfg.kd_lambda:g}, temperature {cfg.kd_temperature:g}"
                   + (f", {getattr(self.teacher, 'kind', 'scores')}" if self.teacher else ""))
        if self.columns is not None:
            n = int((self.columns >= 0).sum())
            out.append(f"  teacher scores {n} of the model's {self.num_classes} classes"
                       + ("" if n == self.num_classes else
                          " (the others learn from labels only)"))
        if self.coverage is not None:
            out.append(coverage_line(self.coverage))
        return out

    def summary(self, cfg) -> dict[str, Any] | None:
        if self.teacher_mode is None:
            if not cfg.teacher_scores and self.labelled is None:
                return None
            return {"used": False, "kd_lambda": cfg.kd_lambda, **(self.labelled or {})}
        out = {"used": True, "teacher": self.teacher_mode, "kd_lambda": cfg.kd_lambda,
               "kd_temperature": cfg.kd_temperature,
               "kind": getattr(self.teacher, "kind", None),
               "sources": getattr(self.teacher, "sources", None),
               "classes_taught": (None if self.columns is None
                                  else [self.model_mids[i] for i in
                                        np.flatnonzero(self.columns >= 0)]),
               "class_lambda": (None if self.class_lambda is None
                                else [float(x) for x in self.class_lambda])}
        if self.coverage is not None:
            out.update(self.coverage)
        out.update(self.labelled or {})
        return out


def coverage_line(cov: dict[str, Any]) -> str:
    n = cov["with_teacher"] + cov["without_teacher"]
    line = (f"  teacher scores for {cov['with_teacher']} of {n} training clips; "
            f"{cov['without_teacher']} without train on labels only")
    if cov.get("missing_examples"):
        line += " (e.g. " + ", ".join(cov["missing_examples"][:3]) + ")"
    return line


def _label_map(mids: Sequence[str], model_mids: Sequence[str], what: str) -> np.ndarray | None:
    """Model column of each class of a set (None: same vocabulary as the model)."""
    if list(mids) == list(model_mids):
        return None
    col = {m: i for i, m in enumerate(model_mids)}
    unknown = [m for m in mids if m not in col]
    if unknown:
        raise DataError(f"--{what}: {len(unknown)} classes are not among the model's "
                        f"{len(model_mids)} ({', '.join(unknown[:5])})")
    return np.array([col[m] for m in mids], np.int64)


def plan(cfg, train, ev, val) -> Plan:
    """Vocabularies, label maps and (for files / stored) the teacher of a run."""
    from psla_tf.data import records
    from psla_tf.data import teacher as tlib
    model_mids, model_names = list(train.mids), list(train.names)
    source_mids = None
    if cfg.append_classes:
        from psla_tf.models import loading
        try:
            source_mids, source_names = loading.load_vocabulary(cfg.init_from)
        except loading.ModelLoadError as e:
            raise DataError(f"--append_classes: {e}") from None
        new = [(m, n) for m, n in zip(train.mids, train.names) if m not in set(source_mids)]
        if not new:
            raise DataError(f"--append_classes: every class of --train_data is already one of "
                            f"{cfg.init_from}'s {len(source_mids)}; fine-tune without "
                            "--append_classes")
        model_mids = list(source_mids) + [m for m, _ in new]
        model_names = list(source_names) + [n for _, n in new]
    maps = {"train": _label_map(train.mids, model_mids, "train_data")}
    for name, spec in (("eval", ev), ("val", val)):
        if spec is None:
            continue
        if not cfg.append_classes and list(spec.mids) != list(train.mids):
            raise DataError(f"--{name}_data and --train_data have different vocabularies "
                            f"({spec.num_classes} vs {train.num_classes} classes or a "
                            "different order); prepare both with the same --label_csv")
        maps[name] = _label_map(spec.mids, model_mids, f"{name}_data")
    p = Plan(model_mids, model_names, maps, source_mids)
    if cfg.retain_eval_data:
        p.retain = records.load_data_spec(cfg.retain_eval_data)
        maps["retain"] = _label_map(p.retain.mids, model_mids, "retain_eval_data")
    keys_ids = None                                # the training set's, read once
    if cfg.labelled_fraction < 1.0:
        keys_ids = tlib.training_keys_and_ids(train)
        p.set_labelled(cfg.labelled_fraction, *keys_ids)
        p.class_lambda = np.zeros(p.num_classes)   # until a teacher sets its weights
    if not cfg.teacher_scores and not cfg.append_classes:
        return p
    if cfg.kd_lambda == 0 and not cfg.append_classes:
        return p                                   # the teacher would have weight 0
    if cfg.teacher_scores == tlib.STORED:
        p.teacher_mode = "stored"
        p.set_teacher(tlib.stored_teacher(train))
    elif cfg.teacher_scores:
        p.teacher_mode = "files"
        p.set_teacher(tlib.load_teacher(cfg.teacher_scores.split(",")),
                      (keys_ids or tlib.training_keys_and_ids(train))[1])
    else:
        p.teacher_mode = "source"
        p.columns = np.array([i if i < len(source_mids) else -1
                              for i in range(len(model_mids))], np.int64)
    p.set_lambdas(cfg.kd_lambda, train.mids)
    return p


def make_loss(cfg, p: Plan):
    """The training loss: :class:`DistillationLoss` when the plan uses a teacher or an
    unlabelled transfer set."""
    if p.distillation_loss:
        return DistillationLoss(p.class_lambda, cfg.loss)
    from psla_tf.training.optim import make_loss as label_loss
    return label_loss(cfg.loss, cfg.label_smoothing)


def source_teacher(source_model, spec, clip_samples: int, batch_size: int, path: str,
                   mids: Sequence[str], write: bool = True):
    """``--append_classes``: the source model's scores on the training set (as evaluation
    sees the clips: no augmentation), cached in ``path`` (an .npz like tools/predict.py's)
    so a resumed run reuses them. Returns a TeacherTable."""
    import tensorflow as tf
    from psla_tf.data import pipeline
    from psla_tf.data import teacher as tlib
    if not os.path.exists(path):
        ds = pipeline.make_eval_dataset(spec, batch_size, clip_samples, with_ids=True)
        step = tf.function(lambda x: source_model(x, training=False))
        ids, scores = [], []
        for feats, _ in ds:
            ids.extend(x.decode("utf-8") for x in feats.pop("id").numpy().tolist())
            feats.pop("key", None)
            scores.append(np.asarray(step(feats), np.float32))
        if not write:
            return tlib.TeacherTable(ids, np.concatenate(scores), list(mids), "scores", [])
        tmp = path + ".tmp.npz"
        np.savez(tmp, ids=np.asarray(ids, dtype=str), scores=np.concatenate(scores),
                 mids=np.asarray(list(mids), dtype=str))
        os.replace(tmp, path)
    return tlib.load_teacher([path])


def _scores(model, dataset) -> np.ndarray:
    from psla_tf.training.callbacks import inputs_only
    return np.asarray(model.predict(inputs_only(dataset), verbose=0), np.float32)


def append_summary(p: Plan, retain_eval, wa, model, source_model) -> dict[str, Any]:
    """``--append_classes`` in summary.json: the class counts and, with
    ``--retain_eval_data``, the original classes' mAP on their own set — the source model,
    the last epoch and the weight-averaged model — and the largest change of an original
    class's score (``max_abs_score_change``: 0 up to round-off when everything of the source
    stayed frozen)."""
    from psla_tf import metrics
    n = len(p.source_mids)
    out: dict[str, Any] = {"source_classes": n, "new_classes": p.num_classes - n,
                           "new_mids": p.model_mids[n:]}
    if retain_eval is None:
        return out
    targets = retain_eval.targets[:, :n]
    source = _scores(source_model, retain_eval.dataset)
    final = _scores(model, retain_eval.dataset)[:, :n]
    res = {"source_mAP": metrics.evaluate(targets, source)["mAP"],
           "final_mAP": metrics.evaluate(targets, final)["mAP"],
           "max_abs_score_change": float(np.max(np.abs(final - source)))}
    if wa is not None and wa.averaged is not None:
        live = [np.asarray(v.numpy()) for v in model.weights]
        try:
            for v, a in zip(model.weights, wa.averaged):
                v.assign(a)
            averaged = _scores(model, retain_eval.dataset)[:, :n]
        finally:
            for v, w in zip(model.weights, live):
                v.assign(w)
        res["weight_averaging_mAP"] = metrics.evaluate(targets, averaged)["mAP"]
        res["weight_averaging_max_abs_score_change"] = float(np.max(np.abs(averaged - source)))
    res["mAP_drop"] = res["source_mAP"] - res.get("weight_averaging_mAP", res["final_mAP"])
    out["retain_eval"] = res
    print(f"original {n} classes on --retain_eval_data: mAP {res['source_mAP']:.4f} (source) "
          f"→ {res.get('weight_averaging_mAP', res['final_mAP']):.4f} "
          f"({'weight averaging' if 'weight_averaging_mAP' in res else 'last epoch'}); "
          f"largest score change {res['max_abs_score_change']:.2e}", flush=True)
    return out


#: front-end options the source model's front end fixes for --append_classes, with their
#: "off" values (what a config saved before the option existed means)
_KEPT_FRONT_END = {"clip_norm": "none", "num_ceps": 0, "high_freq": 0.0, "trim_onset_db": 0.0,
                   "num_mel_bins": params.NUM_MEL_BINS}


def source_normalisation(cfg) -> tuple[float, float]:
    """``--append_classes``: the source model's fbank mean / std (its front end is kept, so
    its classes' scores stay its own). Its ``--clip_norm``, ``--num_ceps``, ``--high_freq``,
    ``--trim_onset_db`` and ``--num_mel_bins`` must be the run's; a different
    ``--target_length`` is allowed (the source's scores then change with the input length)."""
    from psla_tf.models import loading
    try:
        fe = loading.load_tagger(cfg.init_from).get_layer("frontend").get_config()
    except (loading.ModelLoadError, ValueError) as e:
        raise DataError(f"--append_classes: {cfg.init_from}: {e}") from None
    for option, default in _KEPT_FRONT_END.items():   # the layer's defaults = the flags'
        theirs, ours = fe.get(option, default), getattr(cfg, option, default)
        if type(default)(theirs) != type(default)(ours):
            shown = f"{theirs:g}" if isinstance(default, float) else theirs
            raise DataError(f"--append_classes: the source model was trained with "
                            f"--{option}={shown}; pass the same")
    if int(fe["target_length"]) != cfg.target_length:
        print(f"note: --append_classes: the source model's input is {fe['target_length']} "
              f"frames, this run's {cfg.target_length}: its classes' scores change with the "
              "input length", flush=True)
    return float(fe["dataset_mean"]), float(fe["dataset_std"])
