"""psla_tf.errors: one TensorFlow-free module whose PslaError every user-facing error derives
from (exit status 2; a diverged run 1), each still the built-in exception it was; the old
import locations name the same classes; one AudioError for decoding and inference."""
from __future__ import annotations

import subprocess
import sys

import pytest

from psla_tf import errors


def test_errors_module_loads_no_tensorflow():
    out = subprocess.run([sys.executable, "-c", "import sys, psla_tf.errors, psla_tf.training."
                          "flags; print('tensorflow' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_every_error_is_a_psla_error_and_keeps_its_builtin_base():
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) == 11
    for c in classes:
        assert issubclass(c, errors.PslaError), c
        if c is not errors.PslaError:
            assert issubclass(c, RuntimeError if c is errors.NonFiniteLossError
                              else ValueError), c
    assert errors.PslaError.exit_code == errors.DataError.exit_code == 2
    assert errors.NonFiniteLossError.exit_code == 1
    assert issubclass(errors.AudioError, errors.DataError)


@pytest.mark.parametrize("module,name", [
    ("psla_tf.data.records", "DataError"),
    ("psla_tf.data.prepare", "AudioError"),
    ("psla_tf.inference", "AudioError"),
    ("psla_tf.inference", "VocabularyMismatch"),
    ("psla_tf.export", "ExportError"),
    ("psla_tf.models.loading", "ModelLoadError"),
    ("psla_tf.models.torch_import", "CheckpointImportError"),
    ("psla_tf.models.backbones", "PretrainedWeightsError"),
    ("psla_tf.training.distribute", "StrategyError"),
    ("psla_tf.training.callbacks", "NonFiniteLossError"),
    ("psla_tf.training.trainer", "ConfigError"),
])
def test_old_import_locations_name_the_same_class(module, name):
    import importlib
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_prepare_subclass_derives_too():
    from psla_tf.data.prepare import PreparationFailed
    assert issubclass(PreparationFailed, errors.DataError)
