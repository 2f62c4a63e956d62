"""The run-folder contract: what a training run writes into its experiment folder, and where.
Every module that writes or reads a run's files names them through here (TensorFlow-free).

    EXP/flags.txt                      resolved flags (``python main.py --flagfile=EXP/flags.txt``)
    EXP/provenance.json                code, library versions and data the run used
    EXP/labels.csv                     the model's vocabulary (index,mid,display_name)
    EXP/checkpoints/epoch_NNN.weights.h5   each epoch's weights (1-based NNN)
    EXP/checkpoints/state_NNN.npz      the last committed epoch's optimizer / RNG state
    EXP/train_state.json               the last committed epoch (resume)
    EXP/predictions/{set}_epoch_NNN.npy    each epoch's scores on a set (eval, val, ...)
    EXP/predictions/{set}_targets.npy      that set's targets
    EXP/wa_model.keras                 the weight-averaged model (paper Sec. VI-A)
    EXP/final_model.keras              the last epoch's model
    EXP/summary.json                   the results (single / WA / ensemble rows)
"""
from __future__ import annotations

import glob
import json
import os

FLAGS_FILE = "flags.txt"
PROVENANCE_FILE = "provenance.json"
LABELS_FILE = "labels.csv"
STATE_FILE = "train_state.json"
SUMMARY_FILE = "summary.json"
WA_MODEL = "wa_model.keras"
FINAL_MODEL = "final_model.keras"
ADAPTED_MODEL = "adapted_model.keras"   # --adapt_batchnorm: adapted to the eval clips
MODELS = (WA_MODEL, FINAL_MODEL)   # a run folder as a --model: the first that exists
CHECKPOINTS_DIR = "checkpoints"
PREDICTIONS_DIR = "predictions"


def checkpoint_name(epoch: int) -> str:
    """``epoch_NNN.weights.h5`` of a 1-based epoch."""
    return f"epoch_{epoch:03d}.weights.h5"


def checkpoint_path(exp_dir: str, epoch: int) -> str:
    return os.path.join(exp_dir, CHECKPOINTS_DIR, checkpoint_name(epoch))


def state_path(exp_dir: str, epoch: int) -> str:
    return os.path.join(exp_dir, CHECKPOINTS_DIR, f"state_{epoch:03d}.npz")


def prediction_name(prefix: str, epoch: int) -> str:
    """``{prefix}_epoch_NNN.npy``: one epoch's score matrix of a set (``prefix``: eval, val)."""
    return f"{prefix}_epoch_{epoch:03d}.npy"


def targets_name(prefix: str) -> str:
    return f"{prefix}_targets.npy"


def path(exp_dir: str, name: str) -> str:
    """``exp_dir/name`` for one of the file names above (e.g. ``path(exp, SUMMARY_FILE)``)."""
    return os.path.join(exp_dir, name)


def prune_checkpoints(exp_dir: str) -> int:
    """Delete a finished run's per-epoch weights except the last committed epoch's (the one
    ``train_state.json`` names: resume and ``--adapt_batchnorm`` on the run still work; the
    weight average, ensemble and predictions are kept elsewhere); returns the bytes freed.
    ``tools/average_weights.py`` over other epochs then needs the run again."""
    with open(path(exp_dir, STATE_FILE)) as f:
        keep = json.load(f)["checkpoint"]
    freed = 0
    for p in glob.glob(os.path.join(exp_dir, CHECKPOINTS_DIR, "epoch_*.weights.h5")):
        if os.path.basename(p) != keep:
            freed += os.path.getsize(p)
            os.remove(p)
    return freed
