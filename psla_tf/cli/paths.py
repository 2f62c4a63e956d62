"""What each command's path flags hold, and the checks run on them before the command starts.

Every command module declares ``PATHS = {flag name: PathFlag(kind, ...)}`` (``POSITIONAL``
for the file arguments of ``psla-infer``). :func:`check_inputs` runs on the parsed flags
before the command does any work (and before TensorFlow is loaded): a missing path, an empty
file, a folder where a file is expected, a file of another kind (audio where a listing is
expected, a listing where shards are expected, text where a model is expected), a glob that
matches nothing, an output whose folder cannot be written — each is one
:class:`~psla_tf.errors.DataError` line saying what is wrong and what to pass instead. The
checks are shallow (a file's first bytes, never a whole data set); the command itself checks
contents (vocabularies, sample counts, manifests). ``tests/test_error_matrix.py`` generates
its bad-input cases from the same declarations, so a new flag joins the matrix by being
declared here.

Output rules (:attr:`PathFlag.overwrite`): ``replace`` — an existing file is replaced
atomically (written to a temporary name, then renamed: a failed run leaves the old file
intact); ``refuse`` — an existing output is an error unless the command's ``--overwrite`` is
given; ``resume`` — a training run's folder: ``--resume`` continues it, otherwise the run
starts over in it; ``merge`` — a folder the command adds its files to (same names replaced).
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import json
import os
import zipfile
from typing import Any, Iterable, Mapping

from psla_tf.errors import DataError

# input kinds
MODEL = "model"          # .keras file, training run folder, epoch checkpoint, SavedModel folder
SHARDS = "shards"        # TFRecord shard glob(s), manifest beside them
DATA = "data"            # SHARDS (a name with .tfrecord) or LISTING
LISTING = "listing"      # datafile .json, AudioSet / plain CSV, or a folder of class folders
AUDIO = "audio"          # an audio file (any format soundfile reads)
SCORES = "scores"        # score .npz of psla-predict / psla-ensemble
LABEL_CSV = "label_csv"  # index,mid,display_name
TABLE = "table"          # another CSV
JSON = "json"            # a JSON document (ontology)
TORCH = "torch"          # a PyTorch .pth checkpoint
WEIGHTS = "weights"      # a Keras weights file (.h5 / .weights.h5)
FOLDER = "folder"        # an existing folder of inputs
# output kinds
OUT_FILE = "output_file"
OUT_DIR = "output_dir"
OUT_PREFIX = "output_prefix"  # DIR/name: files DIR/name-... are written

INPUT_KINDS = (MODEL, SHARDS, DATA, LISTING, AUDIO, SCORES, LABEL_CSV, TABLE, JSON, TORCH,
               WEIGHTS, FOLDER)
OUTPUT_KINDS = (OUT_FILE, OUT_DIR, OUT_PREFIX)
POSITIONAL = "*"
"""Key of the command's positional arguments in ``PATHS``."""

_SNIFF = 4096
_JSON_PARSE_LIMIT = 64 << 20  # bytes: larger JSON documents are left to the command


@dataclasses.dataclass(frozen=True)
class PathFlag:
    """A flag naming files: its ``kind``; ``many``: comma-separated values; ``keywords``:
    values that are not paths (``stored``, ``mid``); ``what``: the noun in messages;
    ``folder_ok`` (LISTING): a folder of class sub-folders is accepted; ``overwrite``
    (outputs): ``replace`` / ``refuse`` / ``resume`` / ``merge`` (module doc); ``hint``:
    what to pass instead, when the kind's general advice does not fit the flag."""
    kind: str
    many: bool = False
    keywords: tuple[str, ...] = ()
    what: str | None = None
    folder_ok: bool = True
    overwrite: str = "replace"
    hint: str | None = None

    def __post_init__(self):
        assert self.kind in INPUT_KINDS + OUTPUT_KINDS, self.kind
        assert self.overwrite in ("replace", "refuse", "resume", "merge"), self.overwrite

    @property
    def is_output(self) -> bool:
        return self.kind in OUTPUT_KINDS


def _label(name: str) -> str:
    return "argument" if name == POSITIONAL else f"--{name}"


def values(name: str, spec: PathFlag, fv: Any, argv: list[str]) -> list[str]:
    """The paths ``name`` holds (empty when unset); keywords and URLs left out."""
    if name == POSITIONAL:
        raw = list(argv[1:])
    else:
        v = fv[name].value
        if v in (None, ""):
            return []
        raw = [p.strip() for p in str(v).split(",")] if spec.many else [str(v)]
    return [p for p in raw if p and p not in spec.keywords and "://" not in p]


TRAINING = {
    "train_data": PathFlag(SHARDS, many=True),
    "eval_data": PathFlag(SHARDS, many=True),
    "val_data": PathFlag(SHARDS, many=True),
    "retain_eval_data": PathFlag(SHARDS, many=True),
    "init_from": PathFlag(MODEL),
    "teacher_scores": PathFlag(SCORES, many=True, keywords=("stored",), what="teacher scores"),
    "pretrained": PathFlag(WEIGHTS, keywords=("none", "None", "imagenet")),
    "demo_dir": PathFlag(OUT_DIR, overwrite="merge"),
    "exp_dir": PathFlag(OUT_DIR, overwrite="resume"),
}
"""The training flags' paths (psla-train, psla-cross-validate)."""


# ----------------------------------------------------------------------------- sniffing
_AUDIO_MAGIC = ((b"RIFF", "WAV"), (b"fLaC", "FLAC"), (b"OggS", "Ogg"), (b"ID3", "MP3"),
                (b"FORM", "AIFF"), (b"\xff\xfb", "MP3"), (b"\xff\xf3", "MP3"),
                (b"\xff\xf2", "MP3"), (b".snd", "AU"))


def describe(path: str) -> str:
    """What a file looks like from its first bytes: 'an audio file (WAV)', 'a zip archive
    (.keras / .npz)', 'an HDF5 file', 'a text file', 'a binary file', 'an empty file'."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if not head:
        return "an empty file"
    for magic, name in _AUDIO_MAGIC:
        if head.startswith(magic):
            return f"an audio file ({name})"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (.keras / .npz / .pth)"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (.h5)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head[:1] == b"\x80" and len(head) > 1 and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                b"\x05"):
        return "a Python pickle"
    if _is_text(head):
        return "a text file"
    return "a binary file"


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a multi-byte character cut by the sniff length
    return True


# ----------------------------------------------------------------------------- inputs
def _must_exist(path: str, label: str, noun: str, hint: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{noun} not found: {path} ({label}; {hint})")


def _must_be_file(path: str, label: str, noun: str, hint: str) -> str:
    """``path`` is a non-empty file; returns what it looks like (:func:`describe`)."""
    if os.path.isdir(path):
        raise DataError(f"{label} {path} is a folder; {hint}")
    try:
        kind = describe(path)
    except OSError as e:
        raise DataError(f"{label} {path}: cannot read it ({e.strerror})") from None
    if kind == "an empty file":
        raise DataError(f"{label} {path} is empty (0 bytes); {hint}")
    return kind


def _check_text(path: str, label: str, noun: str, hint: str) -> None:
    kind = _must_be_file(path, label, noun, hint)
    if kind != "a text file":
        raise DataError(f"{label} {path} is {kind}, not {noun}; {hint}")


def _check_listing(path: str, label: str, spec: PathFlag, hint: str) -> None:
    _must_exist(path, label, "listing", hint)
    if os.path.isdir(path):
        if not spec.folder_ok:
            raise DataError(f"{label} {path} is a folder; {hint}")
        if not any(os.path.isdir(os.path.join(path, d)) for d in os.listdir(path)):
            raise DataError(f"{label} {path} is a folder without class sub-folders; {hint}")
        return
    kind = _must_be_file(path, label, "a listing", hint)
    if kind.startswith("an audio file"):
        raise DataError(f"{label} {path} is {kind}, not a listing; {hint}; to tag audio "
                        "files give them to psla-infer")
    if kind != "a text file":
        raise DataError(f"{label} {path} is {kind}, not a listing; {hint}")
    if path.lower().endswith(".json"):
        _check_json(path, label, "a listing", hint)


def _check_json(path: str, label: str, noun: str, hint: str) -> None:
    if os.path.getsize(path) > _JSON_PARSE_LIMIT:
        return
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except ValueError as e:
        raise DataError(f"{label} {path} is not valid JSON (truncated?): {e}; {hint}") from None


def _check_shards(pattern: str, label: str, hint: str) -> None:
    has_magic = any(c in pattern for c in "*?[")
    # a glob skips the files beside the shards (manifest, index, sidecars), as the reader does
    found = sorted(f for f in globlib.glob(pattern) if not f.endswith(_NOT_SHARDS)) \
        if has_magic else ([pattern] if os.path.exists(pattern) else [])
    if not found:
        raise DataError(f"no TFRecord shards match {pattern!r} ({label}; {hint})")
    for f in found[:4]:
        if os.path.isdir(f):
            raise DataError(f"{label} {f} is a folder; {hint}")
        kind = describe(f)
        if kind == "an empty file":
            raise DataError(f"{label} {f} is empty (0 bytes): an interrupted psla-prepare? "
                            "prepare the shards again")
        if kind == "a text file":
            what = ("a listing" if f.lower().endswith((".csv", ".json", ".tsv", ".txt"))
                    else "a text file")
            raise DataError(f"{label} {f} is {what}, not a TFRecord shard; {hint} (make shards "
                            "from a listing with psla-prepare)")
        if kind != "a binary file":
            raise DataError(f"{label} {f} is {kind}, not a TFRecord shard; {hint}")


_NOT_SHARDS = (".json", ".csv", ".tmp", ".index.npz")


def _check_model(path: str, label: str, hint: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"model {path!r} does not exist ({label}; {hint})")
    if os.path.isdir(path):
        if not _holds_model(path):
            raise DataError(f"{label} {path} is a folder without a model (no wa_model.keras or "
                            "final_model.keras of a finished run, no exported SavedModel); "
                            f"{hint}")
        return
    kind = _must_be_file(path, label, "a model", hint)
    if path.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise DataError(f"{label} {path} is not a Keras model: a .keras file is a zip "
                            f"archive, this is {kind} (truncated or another kind of file?)")
    elif path.endswith(".h5"):
        if not kind.startswith("an HDF5"):
            raise DataError(f"{label} {path} is {kind}, not an HDF5 weights checkpoint "
                            "(truncated or another kind of file?)")
    else:
        raise DataError(f"{label} {path} is {kind}; {hint}")


def _holds_model(folder: str) -> bool:
    """A finished run's folder or an exported SavedModel (DIR or DIR/<version>)."""
    from psla_tf import run_folder
    names = run_folder.MODELS + ("saved_model.pb",)
    if any(os.path.isfile(os.path.join(folder, n)) for n in names):
        return True
    return any(n.isdigit() and os.path.isfile(os.path.join(folder, n, "saved_model.pb"))
               for n in os.listdir(folder))


def _check_scores(path: str, label: str, spec: PathFlag, hint: str) -> None:
    noun = spec.what or "scores"
    if not os.path.exists(path):
        raise DataError(f"{noun} file not found: {path}")
    kind = _must_be_file(path, label, f"a {noun} .npz", hint)
    if not zipfile.is_zipfile(path):
        raise DataError(f"{label} {path} is {kind}, not a {noun} .npz (truncated or another "
                        f"kind of file?); {hint}")
    try:
        with zipfile.ZipFile(path) as z:
            arrays = sorted(n[:-4] for n in z.namelist() if n.endswith(".npy"))
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{label} {path}: cannot read the .npz ({e}); {hint}") from None
    if "ids" not in arrays or not {"scores", "logits"} & set(arrays):
        raise DataError(f"{label} {path} has the arrays {arrays}, not ids + scores (or "
                        f"logits); {hint}")


_HINTS = {
    MODEL: "pass a .keras file, a training run's folder, a checkpoints/epoch_NNN.weights.h5 "
           "of a run or an exported SavedModel folder",
    SHARDS: "pass TFRecord shards made by psla-prepare, e.g. 'data/train-*.tfrecord' (quote "
            "the glob)",
    LISTING: "pass a listing: a PSLA datafile .json, an AudioSet or plain CSV (path,labels) "
             "or a folder of class sub-folders",
    AUDIO: "pass audio files (WAV, FLAC, Ogg, ...)",
    SCORES: "pass the .npz written by psla-predict or psla-ensemble",
    LABEL_CSV: "pass a class map CSV index,mid,display_name",
    TABLE: "pass a CSV file",
    JSON: "pass a JSON file",
    TORCH: "pass the reference's PyTorch .pth checkpoint",
    WEIGHTS: "pass a Keras weights file (.h5) saved with save_weights()",
    FOLDER: "pass an existing folder",
}


def check_input(name: str, spec: PathFlag, path: str) -> None:
    """One input path of flag ``name`` (raises DataError)."""
    label, kind = _label(name), spec.kind
    if kind == DATA:
        first = os.path.basename(path)
        kind = SHARDS if ".tfrecord" in first else LISTING
        hint = ("pass TFRecord shards (a glob like 'data/eval-*.tfrecord') or a listing "
                "(.json datafile, .csv, or a folder of class sub-folders)")
    else:
        hint = _HINTS[kind]
    hint = spec.hint or hint
    if kind == SHARDS:
        _check_shards(path, label, hint)
    elif kind == LISTING:
        _check_listing(path, label, spec, hint)
    elif kind == MODEL:
        _check_model(path, label, hint)
    elif kind == SCORES:
        _check_scores(path, label, spec, hint)
    elif kind == FOLDER:
        if not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
            raise DataError(f"{label} {path} {what}; {hint}")
    else:
        noun = spec.what or {AUDIO: "audio file", LABEL_CSV: "label CSV", TABLE: "CSV file",
                             JSON: "JSON file", TORCH: "checkpoint",
                             WEIGHTS: "weights file"}[kind]
        if not os.path.exists(path):
            if name == POSITIONAL:
                raise DataError(f"{noun} not found: {path} ({hint})")
            raise DataError(f"{label} {path!r} does not exist ({noun} not found; {hint})")
        if kind == AUDIO:
            _must_be_file(path, label, noun, hint)
        elif kind in (TORCH, WEIGHTS):
            k = _must_be_file(path, label, noun, hint)
            ok = (("a zip", "a Python pickle") if kind == TORCH else ("an HDF5", "a zip"))
            if not k.startswith(ok):
                raise DataError(f"{label} {path} is {k}, not a {noun} (truncated or another "
                                f"kind of file?); {hint}")
        else:
            _check_text(path, label, f"a {noun}", hint)
            if kind == JSON:
                _check_json(path, label, f"a {noun}", hint)


# ----------------------------------------------------------------------------- outputs
def _existing_ancestor(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    return d


def check_output(name: str, spec: PathFlag, path: str) -> None:
    """One output path: not a folder where a file goes (or the reverse), and its folder can
    be created and written."""
    label = _label(name)
    if spec.kind == OUT_FILE and (os.path.isdir(path) or path.endswith(os.sep)):
        raise DataError(f"{label} {path} is a folder; give a file path")
    if spec.kind == OUT_DIR and os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{label} {path} is a file; give a folder (it is created if needed)")
    if spec.kind == OUT_PREFIX and (path.endswith(os.sep) or not os.path.basename(path)):
        raise DataError(f"{label} {path!r} must be DIR/name (files DIR/name-... are written)")
    anc = _existing_ancestor(path if spec.kind != OUT_DIR else os.path.join(path, "x"))
    if not os.path.isdir(anc):
        raise DataError(f"cannot write {label} {path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise DataError(f"cannot write {label} {path}: no permission to write in {anc}; "
                        "choose another folder")


def check_paths(declared: Mapping[str, PathFlag], fv: Any, argv: list[str]) -> None:
    """Every declared path flag that is set (inputs, then outputs); raises DataError."""
    for name, spec in declared.items():
        for p in values(name, spec, fv, argv):
            if spec.is_output:
                check_output(name, spec, p)
            else:
                check_input(name, spec, p)


# ----------------------------------------------------------------------------- clean-up
@dataclasses.dataclass
class OutputGuard:
    """What the outputs' folders held before a run, so a failed run's new files next to
    an output (the output itself, ``{output}.tmp*``, ``.{output}*``) and the empty folders it
    created can be removed. Folders with other new content stay (e.g. a training run's
    checkpoints: ``--resume`` continues from them)."""
    entries: dict[str, set[str] | None]  # folder → names before (None: did not exist)
    files: list[str]
    dirs: list[str]

    @classmethod
    def snapshot(cls, declared: Mapping[str, PathFlag], fv: Any, argv: list[str]
                 ) -> "OutputGuard":
        files, dirs, entries = [], [], {}
        for name, spec in declared.items():
            if not spec.is_output:
                continue
            for p in values(name, spec, fv, argv):
                p = os.path.abspath(p)
                (dirs if spec.kind == OUT_DIR else files).append(p)
                for d in _parents(p if spec.kind == OUT_DIR else os.path.dirname(p)):
                    entries.setdefault(d, set(os.listdir(d)) if os.path.isdir(d) else None)
        return cls(entries, files, dirs)

    def clean(self) -> None:
        """Remove what a failed run left: new files named after a file output, then new
        empty folders (deepest first)."""
        for f in self.files:
            d, base = os.path.dirname(f), os.path.basename(f)
            before = self.entries.get(d)
            if not os.path.isdir(d):
                continue
            for n in os.listdir(d):
                if (before is None or n not in before) and (
                        n == base or n.startswith(base + ".tmp") or n.startswith("." + base)):
                    p = os.path.join(d, n)
                    if os.path.isfile(p):
                        os.remove(p)
        for d in sorted(self.entries, key=len, reverse=True):
            if self.entries[d] is None and os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)


def _parents(d: str) -> Iterable[str]:
    """``d`` and its ancestors up to the first that exists."""
    while True:
        yield d
        if os.path.exists(d):
            return
        parent = os.path.dirname(d)
        if parent == d:
            return
        d = parent
