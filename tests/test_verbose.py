"""--verbose's default (issue 17, logs): Keras' progress bar (1) on a terminal, one line per
epoch (2) when stdout is redirected to a file, so cluster logs hold no carriage returns or
escape codes; an explicit --verbose wins."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from psla_tf import config
from psla_tf.config import TrainConfig, fit_verbosity

_PRINT = "from psla_tf.config import fit_verbosity; print(fit_verbosity(None))"


def test_explicit_verbosity_wins():
    for v in (0, 1, 2):
        assert fit_verbosity(v, io.StringIO()) == v


def test_default_follows_the_terminal():
    assert fit_verbosity(None, io.StringIO()) == 2
    closed = io.StringIO()
    closed.close()
    assert fit_verbosity(None, closed) == 2
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert fit_verbosity(None, tty) == 1
    finally:
        os.close(master)
        os.close(slave)


def test_child_process_with_stdout_in_a_file_or_a_terminal(tmp_path):
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", _PRINT], stdout=f, check=True, timeout=60)
    assert log.read_text().strip() == "2"
    master, slave = os.openpty()
    try:
        subprocess.run([sys.executable, "-c", _PRINT], stdout=slave, check=True, timeout=60)
        assert os.read(master, 100).decode().strip() == "1"
    finally:
        os.close(master)
        os.close(slave)


def test_flag_default_and_help():
    from absl import flags
    from psla_tf.training import trainer
    from psla_tf.training.flags import config_from_flags, define_flags
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["main.py"])
    assert fv["verbose"].default is None and TrainConfig().verbose is None
    assert "terminal" in fv["verbose"].help and "redirected" in fv["verbose"].help
    cfg = config_from_flags(fv)
    assert cfg.verbose is None and "--verbose" not in config.flagfile_text(cfg)
    fv(["main.py", "--verbose=1"])
    assert config_from_flags(fv).verbose == 1


def test_keras_fit_with_the_default_writes_one_line_per_epoch(tmp_path):
    """What a redirected log then holds: Keras' verbose=2 output, no carriage returns."""
    code = ("import numpy as np, keras\n"
            "from psla_tf.config import fit_verbosity\n"
            "m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])\n"
            "m.compile(optimizer='sgd', loss='mse')\n"
            "x = np.ones((8, 2), np.float32)\n"
            "m.fit(x, x[:, :1], epochs=3, batch_size=2, verbose=fit_verbosity(None))\n")
    log = tmp_path / "fit.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.DEVNULL,
                       check=True, timeout=300,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    assert sum(line.startswith("Epoch ") for line in text.splitlines()) == 3
    assert sum("loss:" in line for line in text.splitlines()) == 3
