"""Any model form the tools take → a :class:`psla_tf.inference.Scorer` (one interface for
``--model`` of predict / infer / evaluate / ensemble and :func:`psla_tf.tag`).

Forms: the Keras ones of :mod:`psla_tf.models.loading` (a ``.keras`` file, an experiment
folder, an epoch checkpoint) and exported SavedModels (tools/export.py: ``DIR`` or
``DIR/<version>``, loaded through :func:`psla_tf.export.load_saved_model`).
"""
from __future__ import annotations


from psla_tf import inference
from psla_tf.errors import DataError, ModelLoadError
from psla_tf.models.loading import (find_label_csv, is_saved_model, load_tagger,
                                    load_vocabulary)

__all__ = ["load_scorer"]


def load_scorer(path: str, label_csv: str | None = None,
                vocabulary: tuple[list[str], list[str]] | None = None):
    """A :class:`psla_tf.inference.Scorer` for any model form the tools take.

    Keras forms (see the module doc) use ``label_csv``, else the ``labels.csv`` found beside
    the model, else ``vocabulary`` (e.g. the data's manifest) as the class map; a SavedModel
    carries its own. A model whose outputs do not match the class map is an error.
    """
    if is_saved_model(path):
        try:
            from psla_tf.export import load_saved_model
        except ImportError as e:
            raise ModelLoadError(f"{path!r} is a SavedModel but psla_tf.export is unavailable "
                                 f"({e})") from None
        try:
            serving = load_saved_model(path)
        except DataError:
            raise
        except Exception as e:
            raise ModelLoadError(f"could not load SavedModel {path!r}: "
                                 f"{type(e).__name__}: {e}") from e
        try:
            return inference.ServingScorer(serving, source=path)
        except inference.VocabularyMismatch as e:
            raise ModelLoadError(str(e)) from None
    model = load_tagger(path)
    if label_csv or find_label_csv(path) or vocabulary is None:
        mids, names = load_vocabulary(path, label_csv)
    else:
        mids, names = vocabulary
    try:
        return inference.KerasScorer(model, mids, names, source=path)
    except (inference.VocabularyMismatch, ValueError) as e:
        raise ModelLoadError(str(e)) from None
