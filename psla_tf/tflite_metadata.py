"""TFLite Model Metadata for the exported audio taggers (what MediaPipe's AudioClassifier and
the TFLite Task Library read).

The metadata is a flatbuffer of the published schema ``metadata_schema.fbs`` (TFLite Support /
MediaPipe, file identifier ``M001``; tables ``ModelMetadata`` → ``SubGraphMetadata`` →
``TensorMetadata`` → ``Content`` / ``AssociatedFile``) stored in one buffer of the ``.tflite``
and named ``TFLITE_METADATA`` in the model's ``metadata`` list. The official writers
(tflite-support, ``mediapipe.tasks.python.metadata``) do not import beside TF 2.21, so the
flatbuffer is built here with the ``flatbuffers`` package, field slot by field slot as the
schema declares them. Associated files (label lists) are the uncompressed zip appended to the
model, which :func:`psla_tf.export_tflite.export_tflite` writes.

What an audio classifier needs (MediaPipe ``audio_tensor_specs.cc`` and
``classification_postprocessing_graph.cc``): one subgraph, one float32 input ``[1, N]`` whose
``TensorMetadata.content`` is ``AudioProperties(sample_rate, channels)``; float32 outputs with
one ``TensorMetadata`` each, whose first ``TENSOR_AXIS_LABELS`` file gives the category names
and whose ``TENSOR_AXIS_LABELS`` file of locale ``en`` gives the display names. No score
calibration process unit is written: MediaPipe reports the output tensor's values as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flatbuffers
import numpy as np
from flatbuffers import table as fb_table

from psla_tf import compat

__all__ = ["METADATA_NAME", "FILE_IDENTIFIER", "MIN_PARSER_VERSION", "AssociatedFile",
           "TensorInfo", "AudioClassifierMetadata", "build_metadata", "attach_metadata",
           "read_metadata", "TENSOR_AXIS_LABELS", "MIDS_FILE", "NAMES_FILE",
           "DISPLAY_NAMES_LOCALE", "tagger_metadata"]

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
# AudioProperties were added to the schema in 1.3.0 (metadata_version.cc); nothing newer is used
MIN_PARSER_VERSION = "1.3.0"

# enum values of metadata_schema.fbs
TENSOR_AXIS_LABELS = 2                       # AssociatedFileType
_CONTENT_FEATURE, _CONTENT_AUDIO = 1, 4      # ContentProperties: FeatureProperties, AudioProperties

# the label files in the model's zip: category names (MIDs) and display names. MediaPipe takes
# the first TENSOR_AXIS_LABELS file as the names and the one of its display_names_locale
# (default "en") as the display names
_PRECISION = {"none": "float32", "float16": "float16 weights",
              "dynamic": "int8 weights, float activations",
              "int8": "int8 weights and activations, float32 front end"}
MIDS_FILE = "mids.txt"
NAMES_FILE = "labels.txt"
DISPLAY_NAMES_LOCALE = "en"


@dataclasses.dataclass(frozen=True)
class AssociatedFile:
    """``AssociatedFile``: a file in the model's zip (``type`` an AssociatedFileType)."""
    name: str
    description: str = ""
    type: int = TENSOR_AXIS_LABELS
    locale: str = ""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """``TensorMetadata`` of one input / output. ``sample_rate`` > 0 marks an audio tensor
    (``AudioProperties``), else the content is ``FeatureProperties``; ``value_range`` fills
    ``Stats`` (min, max) when the values are known to be bounded."""
    name: str
    description: str = ""
    sample_rate: int = 0
    channels: int = 1
    value_range: tuple[float, float] | None = None
    files: tuple[AssociatedFile, ...] = ()


@dataclasses.dataclass(frozen=True)
class AudioClassifierMetadata:
    """``ModelMetadata`` of a one-subgraph audio classifier."""
    name: str
    description: str
    version: str
    license: str
    author: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


def tagger_metadata(num_classes: int, *, input_samples: int, sample_rate: int,
                    quantize: str, bounded: bool, name: str = "", description: str = "",
                    version: str = "", license: str = "", author: str = ""
                    ) -> AudioClassifierMetadata:
    """The metadata of a psla_tf TFLite tagger: input ``waveform`` float32
    ``[1, input_samples]`` (mono audio at ``sample_rate``), output ``scores`` ``[1, C]``
    labelled by MIDS_FILE (category names) and NAMES_FILE (display names). ``bounded``:
    the scores lie in [0, 1] (written as the output's Stats)."""
    seconds = input_samples / sample_rate
    desc = description or (
        f"PSLA audio tagger (Gong et al., PSLA, 2021): {seconds:g} s of mono "
        f"{sample_rate} Hz audio in [-1, 1] -> {num_classes} class scores "
        f"(Kaldi log-mel front end inside; {_PRECISION.get(quantize, quantize)})")
    scores_desc = ("class scores in [0, 1]" if bounded else
                   "class scores: sigmoid outputs of several attention heads summed with "
                   "learned weights, can exceed 1 slightly; rank by score")
    files = (AssociatedFile(MIDS_FILE, "class identifiers (MIDs), one per score"),
             AssociatedFile(NAMES_FILE, "class display names, one per score",
                            locale=DISPLAY_NAMES_LOCALE))
    return AudioClassifierMetadata(
        name=name or "psla_tf audio tagger", description=desc, version=version or "1",
        license=license, author=author or "psla_tf",
        inputs=(TensorInfo("waveform", f"{input_samples} samples of mono audio at "
                           f"{sample_rate} Hz in [-1, 1]; zero-pad shorter audio",
                           sample_rate=sample_rate, channels=1),),
        outputs=(TensorInfo("scores", scores_desc,
                            value_range=(0.0, 1.0) if bounded else None, files=files),))


# ----------------------------------------------------------------------------- writing
def _table(b: flatbuffers.Builder, fields: Sequence[tuple[int, str, object]]) -> int:
    """One table: ``fields`` = (slot, kind, value) with kind ``off`` (an offset already
    built), ``u8`` / ``i8`` / ``u32``; None values are left out (schema default)."""
    b.StartObject(max([s for s, _, _ in fields], default=-1) + 1)
    for slot, kind, value in fields:
        if value is None:
            continue
        if kind == "off":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "u8":
            b.PrependUint8Slot(slot, value, 0)
        elif kind == "i8":
            b.PrependInt8Slot(slot, value, 0)
        elif kind == "u32":
            b.PrependUint32Slot(slot, value, 0)
        else:
            raise ValueError(kind)
    return b.EndObject()


def _offsets(b: flatbuffers.Builder, offsets: Sequence[int]) -> int | None:
    if not offsets:
        return None
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _string(b: flatbuffers.Builder, s: str) -> int | None:
    return b.CreateString(s) if s else None


def _associated_file(b: flatbuffers.Builder, f: AssociatedFile) -> int:
    name, desc, locale = _string(b, f.name), _string(b, f.description), _string(b, f.locale)
    # AssociatedFile: name 0, description 1, type 2, locale 3, version 4
    return _table(b, [(0, "off", name), (1, "off", desc), (2, "i8", f.type or None),
                      (3, "off", locale)])


def _tensor(b: flatbuffers.Builder, t: TensorInfo) -> int:
    files = _offsets(b, [_associated_file(b, f) for f in t.files])
    if t.sample_rate > 0:
        # AudioProperties: sample_rate 0, channels 1
        props = _table(b, [(0, "u32", int(t.sample_rate)), (1, "u32", int(t.channels))])
        kind = _CONTENT_AUDIO
    else:
        props, kind = _table(b, []), _CONTENT_FEATURE   # FeatureProperties: no fields
    # Content: content_properties_type 0, content_properties 1, range 2
    content = _table(b, [(0, "u8", kind), (1, "off", props)])
    stats = None
    if t.value_range is not None:
        lo = b.CreateNumpyVector(np.asarray([t.value_range[0]], np.float32))
        hi = b.CreateNumpyVector(np.asarray([t.value_range[1]], np.float32))
        stats = _table(b, [(0, "off", hi), (1, "off", lo)])     # Stats: max 0, min 1
    name, desc = _string(b, t.name), _string(b, t.description)
    # TensorMetadata: name 0, description 1, dimension_names 2, content 3, process_units 4,
    # stats 5, associated_files 6
    return _table(b, [(0, "off", name), (1, "off", desc), (3, "off", content),
                      (5, "off", stats), (6, "off", files)])


def build_metadata(meta: AudioClassifierMetadata) -> bytes:
    """The ``ModelMetadata`` flatbuffer (identifier ``M001``) of ``meta``."""
    b = flatbuffers.Builder(1024)
    inputs = _offsets(b, [_tensor(b, t) for t in meta.inputs])
    outputs = _offsets(b, [_tensor(b, t) for t in meta.outputs])
    # SubGraphMetadata: name 0, description 1, input_tensor_metadata 2, output_tensor_metadata 3
    subgraph = _table(b, [(2, "off", inputs), (3, "off", outputs)])
    subgraphs = _offsets(b, [subgraph])
    strings = [_string(b, s) for s in (meta.name, meta.description, meta.version, meta.author,
                                       meta.license, MIN_PARSER_VERSION)]
    name, desc, version, author, lic, parser = strings
    # ModelMetadata: name 0, description 1, version 2, subgraph_metadata 3, author 4,
    # license 5, associated_files 6, min_parser_version 7
    root = _table(b, [(0, "off", name), (1, "off", desc), (2, "off", version),
                      (3, "off", subgraphs), (4, "off", author), (5, "off", lic),
                      (7, "off", parser)])
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def attach_metadata(flat: bytes, metadata: bytes) -> bytes:
    """The ``.tflite`` flatbuffer ``flat`` with ``metadata`` stored in a new buffer listed as
    ``TFLITE_METADATA`` in ``Model.metadata`` (an existing entry of that name is replaced).
    Interpreters ignore it; the graph, its tensors and weights are unchanged."""
    fb = compat.tflite_schema()
    model = compat.read_tflite_model(flat)
    buf = fb.BufferT()
    buf.data = np.frombuffer(metadata, np.uint8).copy()
    model.buffers.append(buf)
    entry = fb.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    old = [m for m in (model.metadata or []) if _text(m.name) != METADATA_NAME]
    model.metadata = old + [entry]
    return bytes(compat.write_tflite_model(model))


def _text(s) -> str:
    return s.decode("utf-8") if isinstance(s, bytes) else str(s or "")


# ----------------------------------------------------------------------------- reading
class _Reader:
    """Field access on one table of a flatbuffer by slot number (schema order)."""

    def __init__(self, buf: bytes, pos: int):
        self.t = fb_table.Table(bytearray(buf), pos)

    def _off(self, slot: int) -> int:
        return self.t.Offset(4 + 2 * slot)

    def string(self, slot: int) -> str | None:
        o = self._off(slot)
        return self.t.String(o + self.t.Pos).decode("utf-8") if o else None

    def scalar(self, slot: int, flags, default=0):
        o = self._off(slot)
        return self.t.Get(flags, o + self.t.Pos) if o else default

    def table(self, slot: int) -> "_Reader | None":
        o = self._off(slot)
        return _Reader(self.t.Bytes, self.t.Indirect(o + self.t.Pos)) if o else None

    def tables(self, slot: int) -> list["_Reader"]:
        o = self._off(slot)
        if not o:
            return []
        start, n = self.t.Vector(o), self.t.VectorLen(o)
        return [_Reader(self.t.Bytes, self.t.Indirect(start + 4 * i)) for i in range(n)]

    def floats(self, slot: int) -> list[float]:
        o = self._off(slot)
        if not o:
            return []
        return self.t.GetVectorAsNumpy(flatbuffers.number_types.Float32Flags, o).tolist()


def _read_tensor(r: _Reader) -> dict:
    from flatbuffers.number_types import Int8Flags, Uint8Flags, Uint32Flags
    out = {"name": r.string(0), "description": r.string(1)}
    content = r.table(3)
    if content is not None:
        kind = content.scalar(0, Uint8Flags)
        props = content.table(1)
        out["content"] = {_CONTENT_AUDIO: "AudioProperties",
                          _CONTENT_FEATURE: "FeatureProperties"}.get(kind, kind)
        if kind == _CONTENT_AUDIO and props is not None:
            out["sample_rate"] = props.scalar(0, Uint32Flags)
            out["channels"] = props.scalar(1, Uint32Flags)
    stats = r.table(5)
    if stats is not None:
        out["stats"] = {"max": stats.floats(0), "min": stats.floats(1)}
    out["associated_files"] = [{"name": f.string(0), "description": f.string(1),
                                "type": f.scalar(2, Int8Flags), "locale": f.string(3)}
                               for f in r.tables(6)]
    return out


def read_metadata(flat: bytes) -> dict | None:
    """The ``TFLITE_METADATA`` of a ``.tflite`` (its bytes) as a dict, None when absent."""
    model = compat.tflite_schema().Model.GetRootAs(bytearray(flat), 0)
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        if _text(m.Name()) != METADATA_NAME:
            continue
        data = model.Buffers(m.Buffer()).DataAsNumpy().tobytes()
        if data[4:8] != FILE_IDENTIFIER:
            raise ValueError(f"metadata identifier {data[4:8]!r}, expected {FILE_IDENTIFIER!r}")
        root = _Reader(data, flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0))
        return {"name": root.string(0), "description": root.string(1),
                "version": root.string(2), "author": root.string(4), "license": root.string(5),
                "min_parser_version": root.string(7),
                "subgraphs": [{"inputs": [_read_tensor(t) for t in s.tables(2)],
                               "outputs": [_read_tensor(t) for t in s.tables(3)]}
                              for s in root.tables(3)]}
    return None
