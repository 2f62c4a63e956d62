"""psla_tf's exceptions, in one TensorFlow-free module.

Every error psla_tf raises for a problem the user can fix derives from :class:`PslaError`;
the command line prints it as one ``error: ...`` line and exits with its ``exit_code``
(2: a user error). Each class also derives from the built-in exception it replaced
(``ValueError`` / ``RuntimeError``), so ``except ValueError`` keeps catching it. The modules
that raise them re-export them under their old names (``psla_tf.data.records.DataError``,
``psla_tf.training.trainer.ConfigError``, ...).
"""
from __future__ import annotations


class PslaError(Exception):
    """Base of psla_tf's user-facing errors: the message says what is wrong and what to do."""
    exit_code = 2


class ConfigError(PslaError, ValueError):
    """A bad flag combination, reported before training starts."""


class DataError(PslaError, ValueError):
    """A user-facing problem with data files (bad glob, missing manifest, mismatch...)."""


class AudioError(DataError):
    """An audio file that cannot be used (missing, unreadable, empty, truncated, NaN/Inf)."""


class ModelLoadError(DataError):
    """The model path does not name a loadable psla_tf model (message says what to pass)."""


class CheckpointImportError(DataError):
    """The checkpoint cannot be read or does not fit the requested architecture."""


class PretrainedWeightsError(PslaError, ValueError):
    """Pretrained weights could not be obtained or do not fit the backbone."""


class StrategyError(PslaError, ValueError):
    """A strategy that cannot be set up with the given flags / environment."""


class VocabularyMismatch(PslaError, ValueError):
    """The model's number of outputs differs from its vocabulary's number of classes."""


class ExportError(PslaError, ValueError):
    """A model or option that cannot be exported (the message says why)."""


class NonFiniteLossError(PslaError, RuntimeError):
    """The training loss became NaN or Inf (the last good checkpoint stays): exit status 1,
    a failed run rather than a wrong command."""
    exit_code = 1
