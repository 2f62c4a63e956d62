"""Fine-tuning from a trained psla_tf model (paper Sec. III: pretraining helps; the reference's
ESC-50 / Speech Commands recipes start from an ImageNet/AudioSet model).

* :func:`init_from` loads every matching layer of a source model — a ``.keras`` file, an
  experiment folder or an ``epoch_NNN.weights.h5`` checkpoint, anything
  :func:`psla_tf.models.loading.load_tagger` accepts — into a freshly built tagger. Layers
  are matched by their path of names (``classifier/backbone/block1a_dwconv``) and copied
  when every weight has the same shape. The classification head (``classifier/pooling``:
  the attention/mean pooling's classification and attention projections, or MobileNetV2's
  dense layer) is copied only when the source's vocabulary equals the target's (same MIDs,
  same order); otherwise it keeps its fresh initialisation and the report says so.
* :class:`FreezeBackbone` — a Keras callback that keeps the backbone frozen for the first
  ``epochs`` epochs (only the head trains), then unfreezes it. Keras runs a frozen
  (``trainable=False``) BatchNormalization in inference mode, so the backbone's moving
  statistics are kept too while frozen.
* :func:`append_classes` (``--append_classes``, growing a vocabulary): the model has the
  source's classes first, then the new ones. Everything of the source is copied, its head
  into the first columns (per-class kernels and biases; the multi-head weights ``w_h`` whole);
  the new classes' columns keep their fresh initialisation. While the backbone is frozen,
  :class:`FreezeBackbone` also pins those source columns (:func:`source_columns`, put back
  after every step), so the original classes' scores stay exactly the source model's.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import keras
import numpy as np

__all__ = ["HEAD_LAYERS", "InitReport", "init_from", "FreezeBackbone", "backbone_of"]

HEAD_LAYERS = ("pooling",)  # the classification / attention head(s) of build_classifier


@dataclasses.dataclass
class InitReport:
    """What :func:`init_from` did (also printed by :meth:`describe`)."""
    source: str
    copied: list[str] = dataclasses.field(default_factory=list)
    heads_reinitialised: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)   # shape differs
    missing: list[str] = dataclasses.field(default_factory=list)      # not in the source
    same_vocabulary: bool = False
    source_classes: int | None = None
    target_classes: int | None = None
    copied_params: int = 0
    total_params: int = 0
    heads_extended: list[str] = dataclasses.field(default_factory=list)  # --append_classes

    def describe(self) -> str:
        lines = [f"init_from {self.source}: copied {len(self.copied)} layers "
                 f"({self.copied_params:,} of {self.total_params:,} parameters)"]
        if self.heads_reinitialised:
            lines.append(f"  vocabulary differs ({self.source_classes} source classes → "
                         f"{self.target_classes} target classes): re-initialised head(s) "
                         + ", ".join(self.heads_reinitialised))
        elif self.same_vocabulary:
            lines.append("  same vocabulary: the classification head is copied too")
        if self.heads_extended:
            lines.append(f"  append classes: the {self.source_classes} source classes' head "
                         f"columns copied into " + ", ".join(self.heads_extended) + ", "
                         f"{self.target_classes - self.source_classes} new columns "
                         "initialised")
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} layer(s) kept their initialisation "
                         "(weight shapes differ): " + ", ".join(self.mismatched[:10])
                         + (" ..." if len(self.mismatched) > 10 else ""))
        if self.missing:
            lines.append(f"  {len(self.missing)} layer(s) not in the source: "
                         + ", ".join(self.missing[:10])
                         + (" ..." if len(self.missing) > 10 else ""))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def weighted_layers(model: keras.Layer, prefix: str = "") -> Iterator[tuple[str, keras.Layer]]:
    """(path, layer) of every leaf layer with weights; nested models are walked by name."""
    for layer in getattr(model, "layers", []):
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from weighted_layers(layer, path + "/")
        elif layer.weights:
            yield path, layer


def _is_head(path: str) -> bool:
    return path.split("/")[-1] in HEAD_LAYERS


def init_from(model: keras.Model, source: str | keras.Model,
              target_mids: Sequence[str] | None = None,
              source_mids: Sequence[str] | None = None) -> InitReport:
    """Copy every matching layer of ``source`` into ``model`` (see the module doc).

    ``source``: a path for :func:`~psla_tf.models.loading.load_tagger` or a Keras model.
    ``target_mids`` / ``source_mids``: the vocabularies; when ``source`` is a path its
    ``labels.csv`` is looked up if ``source_mids`` is None. Without both vocabularies the
    head is copied only when the class counts agree and no vocabulary is known to differ.
    """
    from psla_tf.models import loading
    name = source if isinstance(source, str) else source.name
    if isinstance(source, str):
        src_model = loading.load_tagger(source)
        if source_mids is None:
            try:
                source_mids = loading.load_vocabulary(source)[0]
            except loading.ModelLoadError:
                source_mids = None
    else:
        src_model = source
    src_layers = dict(weighted_layers(src_model))
    report = InitReport(source=str(name))
    src_heads = [lay for p, lay in src_layers.items() if _is_head(p)]
    report.target_classes = _num_classes(model)
    report.source_classes = _num_classes(src_model)
    if target_mids is not None and source_mids is not None:
        same = list(target_mids) == list(source_mids)
    else:
        same = report.target_classes == report.source_classes and bool(src_heads)
    report.same_vocabulary = same
    for path, layer in weighted_layers(model):
        report.total_params += sum(int(np.prod(w.shape)) for w in layer.weights)
        if _is_head(path) and not same:
            report.heads_reinitialised.append(path)
            continue
        src = src_layers.get(path)
        if src is None:
            report.missing.append(path)
            continue
        theirs = src.get_weights()
        ours = layer.get_weights()
        if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
            report.mismatched.append(path)
            continue
        layer.set_weights(theirs)
        report.copied.append(path)
        report.copied_params += sum(int(np.prod(w.shape)) for w in ours)
    if not report.copied:
        from psla_tf.data.records import DataError
        raise DataError(f"--init_from {name}: no layer matches this model (is it a psla_tf "
                        "tagger with the same --model / --eff_b?)")
    return report


def _num_classes(model: keras.Model) -> int | None:
    try:
        return int(model.outputs[0].shape[-1])
    except (AttributeError, IndexError, TypeError):
        return None


def backbone_of(model: keras.Model) -> keras.Layer:
    """The ``backbone`` sub-model of a tagger (or of a classifier)."""
    for layer in model.layers:
        if layer.name == "backbone":
            return layer
        if isinstance(layer, keras.Model):
            try:
                return backbone_of(layer)
            except ValueError:
                pass
    raise ValueError(f"model {model.name!r} has no 'backbone' layer")


class FreezeBackbone(keras.callbacks.Callback):
    """Train only the head for the first ``epochs`` epochs, then the whole model.

    The optimizer is built on all variables before freezing so its slots (and the
    coupled L2 of :class:`~psla_tf.training.optim.TorchAdam`) cover the backbone once it
    is unfrozen; the train function is re-traced at each switch (Keras captures the
    trainable variables when tracing). Resuming after epoch ``e`` freezes only if
    ``e < epochs``.
    """

    def __init__(self, epochs: int, verbose: int = 1,
                 pin: list[tuple[keras.Variable, int]] | None = None):
        super().__init__()
        if epochs < 0:
            raise ValueError(f"freeze epochs must be >= 0, got {epochs}")
        self.epochs = int(epochs)
        self.verbose = verbose
        self.frozen = False
        self.pin = pin or []
        self._pinned: list[tuple[keras.Variable, int, np.ndarray]] = []

    def _set(self, frozen: bool) -> None:
        backbone_of(self.model).trainable = not frozen
        self.frozen = frozen
        # --append_classes: the source classes' head columns as they are now
        self._pinned = ([(v, n, np.asarray(v.numpy())[..., :n].copy()) for v, n in self.pin]
                        if frozen else [])
        self.model.make_train_function(force=True)

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        for v, n, value in self._pinned:  # put the pinned columns back after the step
            cur = np.array(v.numpy())
            cur[..., :n] = value
            v.assign(cur)

    def on_train_begin(self, logs=None) -> None:
        opt = self.model.optimizer
        if opt is not None and not opt.built:
            opt.build(self.model.trainable_variables)

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        want = epoch < self.epochs
        if want != self.frozen:
            self._set(want)
            if self.verbose:
                print(f"epoch {epoch + 1}: backbone {'frozen' if want else 'unfrozen'}"
                      + (f" (until epoch {self.epochs})" if want else ""), flush=True)

    def on_train_end(self, logs=None) -> None:
        if self.frozen:  # the saved model is a normal, fully trainable one
            backbone_of(self.model).trainable = True
            self.frozen = False


def _copy_columns(ours: keras.Variable, theirs: np.ndarray, n: int, path: str) -> None:
    """Source head weight → ours: whole when shaped alike, else into the first n columns."""
    cur = np.asarray(ours.numpy())
    if cur.shape == theirs.shape:
        ours.assign(theirs)
    elif cur.shape[:-1] == theirs.shape[:-1] and theirs.shape[-1] == n <= cur.shape[-1]:
        cur[..., :n] = theirs
        ours.assign(cur)
    else:
        from psla_tf.data.records import DataError
        raise DataError(f"--append_classes: head {path} weight {ours.path} has shape "
                        f"{cur.shape}, the source's {theirs.shape}: not the same head "
                        "(same --model / --att_head as the source?)")


def append_classes(model: keras.Model, source: str, target_mids: Sequence[str]
                   ) -> tuple[InitReport, keras.Model]:
    """Initialise ``model`` (source classes first, then new ones: ``target_mids``) from the
    trained ``source`` (a path :func:`init_from` takes). Returns the report and the loaded
    source model (the teacher of its classes)."""
    from psla_tf.models import loading
    src_model = loading.load_tagger(source)
    source_mids = loading.load_vocabulary(source)[0]
    n = len(source_mids)
    if list(target_mids[:n]) != list(source_mids):
        raise ValueError("target_mids must start with the source's classes")
    report = init_from(model, src_model, target_mids=target_mids, source_mids=source_mids)
    report.source = str(source)
    src_layers = dict(weighted_layers(src_model))
    for path, layer in weighted_layers(model):
        if not _is_head(path):
            continue
        src = src_layers.get(path)
        if src is None:
            from psla_tf.data.records import DataError
            raise DataError(f"--append_classes: {source} has no head {path}")
        for ours, theirs in zip(layer.weights, src.get_weights()):
            _copy_columns(ours, np.asarray(theirs), n, path)
        report.heads_reinitialised.remove(path)
        report.heads_extended.append(path)
        report.copied_params += sum(int(np.prod(w.shape)) for w in src.get_weights())
    return report, src_model


def source_columns(model: keras.Model, num_source: int) -> list[tuple[keras.Variable, int]]:
    """The head weights that carry the first ``num_source`` classes, each with the column
    count to pin (the whole weight for shared ones such as the multi-head weights)."""
    out = []
    num_classes = _num_classes(model)
    for path, layer in weighted_layers(model):
        if _is_head(path):
            for w in layer.weights:
                last = int(w.shape[-1])
                shared = "head_weight" in w.path or last != num_classes
                out.append((w, last if shared else num_source))
    return out
