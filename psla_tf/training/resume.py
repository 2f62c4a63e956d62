"""Exact resume after a kill (issue 7): one atomic commit per finished epoch.

After every epoch the chief writes, in this order,

1. ``checkpoints/epoch_NNN.weights.h5`` — the model's weights (temp file, then ``os.replace``);
2. ``checkpoints/state_NNN.npz`` — everything else training needs to continue exactly: the
   optimizer's variables (step counter → the LR schedule, Adam moments, loss scale), the
   model's random-generator states (SpecAugment masks, dropout), the checkpoint-ensemble and
   weight-averaging accumulators;
3. ``train_state.json`` — the commit: the epoch, the evaluation histories, the state file's
   name. Written last and atomically, it only ever names completely written files.

A re-run of the same command (``--resume``, the default) loads the committed epoch and
continues with the next one; the input pipeline is a stateless function of (seed, epoch), so
the batches are the same as in an uninterrupted run. A kill anywhere before the commit (mid
epoch, during evaluation, while writing a checkpoint) costs the unfinished epoch, which is
trained again; temp files of a killed write are deleted and never loaded; ``log.csv`` is cut
back to the committed epochs.

``PSLA_FAULT=point:epoch[:batch]`` (for the resilience tests) makes the process SIGKILL itself
at ``batch`` (after that batch of that 1-based epoch), ``eval`` (in the middle of the epoch's
evaluation) or ``checkpoint`` (half-way through writing the epoch's checkpoint).
"""
from __future__ import annotations

import glob
import json
import os
import signal
from typing import Any

import keras
import numpy as np

from psla_tf import atomic
from psla_tf import run_folder
from psla_tf.data.records import DataError

STATE_FILE = run_folder.STATE_FILE
checkpoint_path = run_folder.checkpoint_path


# ----------------------------------------------------------------------------- fault injection
def _fault_spec() -> tuple[str, int, int | None] | None:
    raw = os.environ.get("PSLA_FAULT", "")
    if not raw:
        return None
    parts = raw.split(":")
    return parts[0], int(parts[1]), (int(parts[2]) if len(parts) > 2 else None)


def inject_fault(point: str, epoch: int, batch: int | None = None) -> None:
    """SIGKILL this process if ``PSLA_FAULT`` names this point (1-based epoch / batch)."""
    spec = _fault_spec()
    if spec and spec[0] == point and spec[1] == epoch and (spec[2] is None or spec[2] == batch):
        os.kill(os.getpid(), signal.SIGKILL)


class FaultInjection(keras.callbacks.Callback):
    """Applies ``PSLA_FAULT=batch:E:B`` (a kill after batch B of epoch E)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        inject_fault("batch", self._epoch, batch + 1)


class EvalFault(keras.callbacks.Callback):
    """Applies ``PSLA_FAULT=eval:E`` (placed right after the epoch's evaluation callback)."""

    def on_epoch_end(self, epoch, logs=None):
        inject_fault("eval", epoch + 1)


# ----------------------------------------------------------------------------- state
def _extra_variables(model) -> list:
    """Model variables that are not weights: the random-generator states."""
    ids = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in ids]


class ResumeCheckpoint(keras.callbacks.Callback):
    """Commits the finished epoch (see the module doc). Must be the last epoch-end callback
    that changes state (after evaluation, ensemble, weight averaging and the CSV log)."""

    def __init__(self, exp_dir: str, evaluations: list, ensemble=None, weight_averaging=None,
                 extra_state: Any = None, write: bool = True, val_ensemble=None):
        super().__init__()
        self.exp_dir = exp_dir
        self.evaluations = evaluations
        self.ensemble = ensemble
        self.val_ensemble = val_ensemble
        self.wa = weight_averaging
        self.extra_state = extra_state or (lambda: {})
        self.write = write

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        e = epoch + 1
        if not self.write:  # non-chief workers: the chief writes
            return
        ckpt = checkpoint_path(self.exp_dir, e)
        tmp = os.path.join(os.path.dirname(ckpt), "tmp-" + run_folder.checkpoint_name(e))
        self.model.save_weights(tmp)
        if _fault_spec() and _fault_spec()[:2] == ("checkpoint", e):
            with open(tmp, "r+b") as f:  # leave a half-written file behind, then die
                f.truncate(os.path.getsize(tmp) // 2)
            inject_fault("checkpoint", e)
        os.replace(tmp, ckpt)
        arrays: dict[str, Any] = {}
        opt = self.model.optimizer
        for i, v in enumerate(opt.variables):
            arrays[f"opt{i}"] = np.asarray(v.numpy())
        for i, v in enumerate(_extra_variables(self.model)):
            arrays[f"rng{i}"] = np.asarray(v.numpy())
        if self.ensemble is not None and self.ensemble.sum is not None:
            arrays["ens_sum"] = self.ensemble.sum
            arrays["ens_epochs"] = np.asarray(self.ensemble.epochs, np.int64)
        if self.val_ensemble is not None and self.val_ensemble.sum is not None:
            arrays["val_ens_sum"] = self.val_ensemble.sum
            arrays["val_ens_epochs"] = np.asarray(self.val_ensemble.epochs, np.int64)
        if self.wa is not None and self.wa.sums is not None:
            arrays["wa_epochs"] = np.asarray(self.wa.epochs, np.int64)
            for i, s in enumerate(self.wa.sums):
                arrays[f"wa{i}"] = s
            arrays["wa_num"] = np.asarray(len(self.wa.sums))
        atomic.save_npz(run_folder.state_path(self.exp_dir, e), **arrays)
        state = {"epoch": e, "state": os.path.basename(run_folder.state_path(self.exp_dir, e)),
                 "checkpoint": os.path.basename(ckpt),
                 "num_optimizer_variables": len(opt.variables),
                 "histories": [ev.history for ev in self.evaluations]}
        state.update(self.extra_state())
        atomic.write_json(os.path.join(self.exp_dir, STATE_FILE), state, indent=1)
        for old in glob.glob(os.path.join(self.exp_dir, run_folder.CHECKPOINTS_DIR, "state_*.npz")):
            if old != run_folder.state_path(self.exp_dir, e):  # only the committed state is kept
                os.remove(old)


def clean_partial_files(exp_dir: str) -> list[str]:
    """Delete temp files a killed write left behind (they are never loaded); returns them."""
    pats = ("*.tmp", "*.tmp.*", "tmp-*", os.path.join(run_folder.CHECKPOINTS_DIR, "tmp-*"),
            os.path.join(run_folder.CHECKPOINTS_DIR, "*.tmp.*"),
            os.path.join(run_folder.PREDICTIONS_DIR, "*.tmp.*"))
    found = sorted({p for pat in pats for p in glob.glob(os.path.join(exp_dir, pat))})
    for p in found:
        if os.path.isfile(p):
            os.remove(p)
    return found


def committed_epoch(exp_dir: str) -> int:
    """The last committed epoch in ``exp_dir`` (0 when there is none)."""
    path = os.path.join(exp_dir, STATE_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["epoch"])


def restore(model, exp_dir: str, evaluations: list, ensemble=None,
            weight_averaging=None, val_ensemble=None) -> dict[str, Any]:
    """Load the committed epoch into ``model`` (weights, optimizer, RNG) and the callbacks;
    returns the commit's JSON (``epoch`` = the epoch to continue after)."""
    with open(os.path.join(exp_dir, STATE_FILE)) as f:
        state = json.load(f)
    model.load_weights(os.path.join(exp_dir, run_folder.CHECKPOINTS_DIR, state["checkpoint"]))
    opt = model.optimizer
    opt.build(model.trainable_variables)
    path = os.path.join(exp_dir, run_folder.CHECKPOINTS_DIR, state["state"])
    with np.load(path) as z:
        n_opt = sum(1 for k in z.files if k.startswith("opt"))
        if n_opt != len(opt.variables):
            raise DataError(f"{path} holds {n_opt} optimizer variables, this run's optimizer "
                            f"has {len(opt.variables)}: resume with the run's own flags or "
                            "use a new --exp_dir")
        for i, v in enumerate(opt.variables):
            v.assign(z[f"opt{i}"])
        for i, v in enumerate(_extra_variables(model)):
            if f"rng{i}" in z.files:
                v.assign(z[f"rng{i}"])
        if ensemble is not None and "ens_sum" in z.files:
            ensemble.sum = z["ens_sum"].astype(np.float64)
            ensemble.epochs = [int(x) for x in z["ens_epochs"]]
        if val_ensemble is not None and "val_ens_sum" in z.files:
            val_ensemble.sum = z["val_ens_sum"].astype(np.float64)
            val_ensemble.epochs = [int(x) for x in z["val_ens_epochs"]]
        if weight_averaging is not None and "wa_num" in z.files:
            weight_averaging.sums = [z[f"wa{i}"] for i in range(int(z["wa_num"]))]
            weight_averaging.epochs = [int(x) for x in z["wa_epochs"]]
    for ev, h in zip(evaluations, state["histories"]):
        ev.history = list(h)
    return state


def truncate_log(path: str, epochs: int) -> None:
    """Keep the CSV log's header and its first ``epochs`` rows (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = lines[:1 + epochs]
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
