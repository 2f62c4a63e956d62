"""The run-folder contract (psla_tf/run_folder.py): the file names a training run writes, named
in one module that the writers and readers share (TensorFlow-free)."""
from __future__ import annotations

import os
import subprocess
import sys

from psla_tf import run_folder


def test_names_are_the_documented_layout():
    assert run_folder.checkpoint_path("exp", 7) == os.path.join("exp", "checkpoints",
                                                                "epoch_007.weights.h5")
    assert run_folder.state_path("exp", 12) == os.path.join("exp", "checkpoints",
                                                            "state_012.npz")
    assert run_folder.prediction_name("eval", 3) == "eval_epoch_003.npy"
    assert run_folder.targets_name("val") == "val_targets.npy"
    assert run_folder.path("exp", run_folder.SUMMARY_FILE) == os.path.join("exp",
                                                                           "summary.json")
    assert run_folder.MODELS == ("wa_model.keras", "final_model.keras")
    assert (run_folder.FLAGS_FILE, run_folder.LABELS_FILE, run_folder.STATE_FILE,
            run_folder.PROVENANCE_FILE) == ("flags.txt", "labels.csv", "train_state.json",
                                            "provenance.json")
    for name in ("FLAGS_FILE", "LABELS_FILE", "WA_MODEL", "SUMMARY_FILE", "STATE_FILE"):
        assert name in run_folder.__doc__ or getattr(run_folder, name) in run_folder.__doc__


def test_writers_and_readers_share_it():
    from psla_tf import provenance
    from psla_tf.models import loading
    from psla_tf.training import resume
    assert loading.FLAGS_FILE is provenance.FLAGS_FILE is run_folder.FLAGS_FILE
    assert loading.LABELS_FILE is run_folder.LABELS_FILE
    assert loading._EXP_MODELS is run_folder.MODELS
    assert resume.STATE_FILE is run_folder.STATE_FILE
    assert resume.checkpoint_path is run_folder.checkpoint_path
    assert provenance.PROVENANCE_FILE is run_folder.PROVENANCE_FILE


def test_loads_no_tensorflow():
    out = subprocess.run([sys.executable, "-c", "import sys, psla_tf.run_folder; "
                          "print('tensorflow' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_prune_checkpoints_keeps_the_committed_epoch(tmp_path):
    """Only the checkpoint train_state.json names stays; state, predictions and models stay."""
    import json
    ck = tmp_path / run_folder.CHECKPOINTS_DIR
    ck.mkdir()
    for e in (1, 2, 3):
        (ck / run_folder.checkpoint_name(e)).write_bytes(b"x" * 100 * e)
    (ck / "state_003.npz").write_bytes(b"s")
    (tmp_path / run_folder.WA_MODEL).write_bytes(b"m")
    (tmp_path / run_folder.STATE_FILE).write_text(json.dumps(
        {"epoch": 3, "checkpoint": run_folder.checkpoint_name(3)}))
    assert run_folder.prune_checkpoints(str(tmp_path)) == 300
    assert sorted(os.listdir(ck)) == [run_folder.checkpoint_name(3), "state_003.npz"]
    assert (tmp_path / run_folder.WA_MODEL).exists()
    assert run_folder.prune_checkpoints(str(tmp_path)) == 0
