"""Find and load a trained psla_tf tagger: a ``.keras`` file, an experiment folder, or an
epoch checkpoint (``.weights.h5``) of one, and the vocabulary that goes with it.

Accepted ``path`` forms (what ``--model`` of the tools takes):

* ``model.keras`` — a whole saved model (``final_model.keras``, ``wa_model.keras``, or any
  model saved by the tools); the vocabulary is the ``labels.csv`` in the same folder;
* ``EXP_DIR`` — a training run's folder (``main.py --exp_dir``): its weight-averaged model
  ``wa_model.keras`` if the run made one, else ``final_model.keras``;
* ``EXP_DIR/checkpoints/epoch_NNN.weights.h5`` — one epoch of a run: the model is rebuilt
  from the run's ``flags.txt`` and ``labels.csv``, then the weights are loaded.

Exported SavedModels (tools/export.py: ``DIR`` or ``DIR/<version>``) are not Keras models;
:func:`psla_tf.scoring.load_scorer` takes every form, SavedModels included.
"""
from __future__ import annotations

import dataclasses
import os

import keras

from psla_tf import run_folder
from psla_tf.config import config_from_flagfile
from psla_tf.data.records import read_label_csv
from psla_tf.errors import ConfigError, ModelLoadError

__all__ = ["ModelLoadError", "resolve_model_path", "find_label_csv", "load_tagger",
           "load_vocabulary", "is_saved_model"]

LABELS_FILE = run_folder.LABELS_FILE
FLAGS_FILE = run_folder.FLAGS_FILE
_EXP_MODELS = run_folder.MODELS


def _exp_dir_of(path: str) -> str | None:
    """The experiment folder a path belongs to (the folder holding flags.txt), if any."""
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for cand in (d, os.path.dirname(d)):
        if os.path.exists(os.path.join(cand, FLAGS_FILE)):
            return cand
    return None


def resolve_model_path(path: str) -> str:
    """The concrete ``.keras`` / ``.weights.h5`` file ``path`` stands for."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"model {path!r} does not exist")
    if os.path.isdir(path):
        for name in _EXP_MODELS:
            cand = os.path.join(path, name)
            if os.path.exists(cand):
                return cand
        if is_saved_model(path):
            raise ModelLoadError(f"{path!r} is an exported SavedModel, not a Keras model "
                                 "(the tools accept it through psla_tf.scoring.load_scorer)")
        raise ModelLoadError(f"folder {path!r} holds none of {', '.join(_EXP_MODELS)} "
                             "(pass a .keras file, an experiment folder of a finished run, or "
                             "a checkpoints/epoch_NNN.weights.h5 file)")
    if path.endswith(".keras") or path.endswith(".weights.h5"):
        return path
    raise ModelLoadError(f"{path!r}: expected a .keras file, an experiment folder or a "
                         ".weights.h5 checkpoint")


def find_label_csv(path: str) -> str | None:
    """``labels.csv`` beside the model file or in its experiment folder, if present."""
    path = os.fspath(path)
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for cand in (d, _exp_dir_of(path)):
        if cand and os.path.exists(os.path.join(cand, LABELS_FILE)):
            return os.path.join(cand, LABELS_FILE)
    return None


def load_vocabulary(path: str, label_csv: str | None = None) -> tuple[list[str], list[str]]:
    """(mids, names) for the model at ``path`` (``label_csv`` overrides the lookup)."""
    csv = label_csv or find_label_csv(path)
    if csv is None:
        raise ModelLoadError(f"no {LABELS_FILE} beside {path!r} or in its experiment folder; "
                             "pass --label_csv")
    return read_label_csv(csv)


def load_tagger(path: str, compile: bool = False) -> keras.Model:
    """Load the tagger ``path`` names (see the module doc); inference-ready, not compiled."""
    import psla_tf.models.tagger  # noqa: F401  (registers the custom layers)
    file = resolve_model_path(path)
    if file.endswith(".keras"):
        try:
            return keras.saving.load_model(file, compile=compile)
        except Exception as e:
            raise ModelLoadError(f"could not load {file!r}: {type(e).__name__}: {e}") from e
    exp = _exp_dir_of(file)
    if exp is None:
        raise ModelLoadError(f"checkpoint {file!r} is not inside an experiment folder with "
                             f"{FLAGS_FILE}; the architecture cannot be rebuilt")
    from psla_tf.models.tagger import build_model
    try:
        cfg = config_from_flagfile(os.path.join(exp, FLAGS_FILE))
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    mids, _ = load_vocabulary(exp)
    cfg = dataclasses.replace(cfg, pretrained="none")
    model = build_model(cfg, len(mids))
    try:
        model.load_weights(file)
    except Exception as e:
        raise ModelLoadError(f"checkpoint {file!r} does not match the model of {exp}/"
                             f"{FLAGS_FILE}: {type(e).__name__}: {e}") from e
    return model


def is_saved_model(path: str) -> bool:
    """``path`` is an exported SavedModel: ``DIR/<version>/saved_model.pb`` or ``DIR`` holding
    numeric version folders with one."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return True
    return any(name.isdigit() and os.path.exists(os.path.join(path, name, "saved_model.pb"))
               for name in os.listdir(path))
