"""Registration of psla_tf's custom Keras objects without importing Keras early.

``keras.models.load_model`` finds a custom class only once the module defining it (with
``@keras.saving.register_keras_serializable(package="psla_tf")``) has been imported.
``import psla_tf`` must make that true, yet stay light (the command line's ``--help`` and
TensorFlow-free tools import psla_tf): so the modules are imported as soon as Keras is
loaded — at once if it already is, else right after the first ``import keras`` (or
``import tensorflow``, which imports Keras) completes, through an import hook that removes
itself afterwards.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

# the modules whose classes psla_tf's .keras files name
KERAS_MODULES = ("psla_tf.augment", "psla_tf.features", "psla_tf.models.frontend",
                 "psla_tf.models.pooling", "psla_tf.models.batchnorm", "psla_tf.models.pointwise",
                 "psla_tf.models.activations", "psla_tf.models.tagger",
                 "psla_tf.training.optim",
                 "psla_tf.training.schedule", "psla_tf.training.distill")


def register_keras_objects() -> None:
    """Import every module that registers a psla_tf Keras object (needs Keras)."""
    for name in KERAS_MODULES:
        importlib.import_module(name)


def _initializing(name: str, finished: str | None) -> bool:
    """``name`` is in the middle of its own import (``finished`` has just run to its end)."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return name != finished and getattr(spec, "_initializing", False)


def _ready(finished: str | None = None) -> bool:
    """Keras and TensorFlow (if imported) are loaded completely, and no psla_tf module is
    half-imported (registering then could import a module that needs a name the half-imported
    one has not defined yet, e.g. ``from psla_tf.features import DFTS``)."""
    if "keras" not in sys.modules:
        return False
    return not any(_initializing(name, finished) for name in list(sys.modules)
                   if name in ("keras", "tensorflow") or name.startswith("psla_tf."))


class _AfterKerasImport(importlib.abc.MetaPathFinder):
    """Wraps the loaders of keras, tensorflow (which imports Keras half-way through its own
    import) and psla_tf's modules, so that the first time one finishes with everything
    :func:`_ready`, the psla_tf Keras modules are imported; then leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in ("keras", "tensorflow") and not fullname.startswith("psla_tf."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path and _ready(finished=fullname):
                sys.meta_path.remove(self)
                register_keras_objects()

        loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


def register_when_keras_loads() -> None:
    """Register now if Keras is loaded, else as soon as it is."""
    if _ready():
        register_keras_objects()
    elif not any(isinstance(f, _AfterKerasImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterKerasImport())
