"""Input listings → rows (clip id, audio path, label MIDs) for data preparation.

PSLA (paper Sec. IV) trains on AudioSet and FSD50K clip lists; this module reads the listing
formats those recipes (and small custom sets) come in:

* ``datafile`` — the reference's JSON ``{"data": [{"wav": path, "labels": "mid1,mid2"}]}``;
* ``audioset`` — an AudioSet segment CSV ``YTID, start_seconds, end_seconds, positive_labels``
  (official ``#`` comment header or a plain header line), audio found under ``audio_dir`` by
  ``filename_pattern`` (``{YTID}``, ``{start}``, ``{end}``; the numbers as written in the CSV,
  ``{start:d}`` / ``{start_int}`` as integers, ``{start:.1f}`` any float format);
* ``csv`` — a plain CSV with a header naming a path column (``path``/``filename``/``file``/
  ``wav``) and a labels column (``labels``/``label``/``category``), labels separated by ``,``
  (quoted) or ``;``; extra columns (e.g. ESC-50's ``fold``) are kept for splitting;
* ``folder`` — a directory whose sub-folders are single-label classes.

The clip id (the TFRecord ``id`` feature) is the audio path exactly as written in the input
(AudioSet: ``{YTID}_{start_seconds}``; folder: ``classname/file.wav``). Relative paths resolve
against the listing file's folder.

:func:`read_listing` / :func:`write_listing` read a datafile, AudioSet CSV or plain CSV and
write it back with only its labels changed (same columns, rows, order, comment lines):
label enhancement (paper Sec. V, ``tools/enhance_labels.py``) rewrites a listing this way.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import re
from typing import Any, Iterable, Sequence

from psla_tf.atomic import write_text
from psla_tf.data.records import DataError, read_label_csv

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
PATH_COLUMNS = ("path", "filename", "file", "wav")
LABEL_COLUMNS = ("labels", "label", "category", "positive_labels")
FORMATS = ("auto", "datafile", "audioset", "csv", "folder")


@dataclasses.dataclass(frozen=True)
class Row:
    """One clip of a listing: ``id`` (TFRecord id), resolved ``path``, label ``mids``.

    ``line`` is the 1-based line (CSV) or entry number (JSON) for error messages; ``record``
    is the row as read (original field values) so splits can write it back unchanged.
    """
    id: str
    path: str
    mids: tuple[str, ...]
    line: int = 0
    record: Any = None


def split_labels(text: str) -> tuple[str, ...]:
    """``"a,b"`` / ``"a; b"`` / ``" a , b "`` → ``("a", "b")`` (empty list for ``""``)."""
    return tuple(p.strip() for p in re.split(r"[,;]", text or "") if p.strip())


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) or "://" in path else os.path.join(base, path)


# ----------------------------------------------------------------------------- formats
def _load_datafile(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("data"), list):
        raise DataError(f'{path}: expected {{"data": [{{"wav": ..., "labels": ...}}]}}')
    return d


def read_datafile(path: str) -> list[Row]:
    """PSLA datafile JSON ``{"data": [{"wav": ..., "labels": "m1,m2"}, ...]}``."""
    return _datafile_rows(_load_datafile(path), path)


def _datafile_rows(d: dict[str, Any], path: str) -> list[Row]:
    """Rows of a parsed datafile; ``record`` is the entry dict itself (not a copy)."""
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    for n, entry in enumerate(d["data"], start=1):
        if not isinstance(entry, dict) or "wav" not in entry:
            raise DataError(f"{path}: entry {n} has no 'wav' field: {entry!r}")
        labels = entry.get("labels", "")
        mids = tuple(labels) if isinstance(labels, list) else split_labels(str(labels))
        wav = str(entry["wav"])
        rows.append(Row(id=wav, path=_resolve(wav, base), mids=mids, line=n, record=entry))
    return rows


class _Number:
    """A CSV number that formats as written (``{start}``) or with a spec (``{start:d}``)."""

    def __init__(self, text: str):
        self.text = text.strip()

    def __format__(self, spec: str) -> str:
        if not spec:
            return self.text
        if spec.endswith("d"):
            return format(int(round(float(self.text))), spec)
        return format(float(self.text), spec)

    def __str__(self) -> str:
        return self.text


def _data_lines(path: str) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [(n, line) for n, line in enumerate(f.read().splitlines(), start=1)]


def _csv_fields(line: str) -> list[str]:
    return [c.strip() for c in next(csv.reader(io.StringIO(line), skipinitialspace=True))]


def is_audioset_csv(path: str) -> bool:
    for _, line in _data_lines(path)[:5]:
        s = line.lstrip("# ").strip()
        if s:
            fields = _csv_fields(s)
            if fields and fields[0] == "YTID":
                return True
            if not line.startswith("#"):
                return False
    return False


def read_audioset_csv(path: str, audio_dir: str,
                      filename_pattern: str = "{YTID}.wav") -> list[Row]:
    """AudioSet segment CSV (official ``#`` headers, quoted label lists, spaces after commas).

    id = ``{YTID}_{start_seconds}`` with start as written (``--PJHxphWEs_30.000``); path =
    ``audio_dir/filename_pattern`` filled with ``YTID``, ``start``, ``end`` (also
    ``start_int``/``end_int``).
    """
    if not audio_dir:
        raise DataError("AudioSet segment CSV input needs --audio_dir (where the clips are)")
    rows = []
    for n, line in _data_lines(path):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        fields = _csv_fields(s)
        if fields[0] == "YTID":
            continue  # plain header line
        if len(fields) < 4:
            raise DataError(f"{path}:{n}: expected YTID, start_seconds, end_seconds, "
                            f"positive_labels, got {s!r}")
        ytid, start, end, labels = fields[0], fields[1], fields[2], fields[3]
        try:
            values = {"YTID": ytid, "start": _Number(start), "end": _Number(end),
                      "start_int": int(round(float(start))), "end_int": int(round(float(end)))}
        except ValueError:
            raise DataError(f"{path}:{n}: start/end are not numbers: {s!r}") from None
        try:
            name = filename_pattern.format(**values)
        except (KeyError, ValueError, IndexError) as e:
            raise DataError(f"bad --filename_pattern {filename_pattern!r}: {e} (use {{YTID}}, "
                            "{start}, {end}, {start_int}, {end_int})") from None
        rows.append(Row(id=f"{ytid}_{start}", path=os.path.join(audio_dir, name),
                        mids=split_labels(labels), line=n,
                        record=[ytid, start, end, labels]))
    return rows


def _pick(columns: Sequence[str], names: Sequence[str]) -> str | None:
    lower = {c.strip().lower(): c for c in columns}
    for n in names:
        if n in lower:
            return lower[n]
    return None


def read_plain_csv(path: str, audio_root: str | None = None) -> tuple[list[Row], list[str]]:
    """Plain CSV with a header (path column + labels column + any extra columns).

    Relative paths resolve against ``audio_root`` (default: the CSV's folder). Returns rows
    and the header (so splits can write the same columns back).
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = list(reader.fieldnames or [])
        pcol, lcol = _pick(header, PATH_COLUMNS), _pick(header, LABEL_COLUMNS)
        if pcol is None or lcol is None:
            raise DataError(f"{path}: a plain CSV needs a header with a path column "
                            f"({'/'.join(PATH_COLUMNS)}) and a labels column "
                            f"({'/'.join(LABEL_COLUMNS)}); got {header}")
        base = audio_root or os.path.dirname(os.path.abspath(path))
        rows = []
        for rec in reader:
            n = reader.line_num
            p = (rec.get(pcol) or "").strip()
            if not p:
                raise DataError(f"{path}:{n}: empty path")
            rows.append(Row(id=p, path=_resolve(p, base), mids=split_labels(rec.get(lcol) or ""),
                            line=n, record=dict(rec)))
    return rows, header


def read_audio_folder(folder: str) -> list[Row]:
    """``folder/classname/…/file.ext`` → single-label rows, id ``classname/…/file.ext``."""
    if not os.path.isdir(folder):
        raise DataError(f"--audio_folder {folder} is not a directory")
    rows = []
    for cls in sorted(os.listdir(folder)):
        cdir = os.path.join(folder, cls)
        if not os.path.isdir(cdir) or cls.startswith("."):
            continue
        for root, dirs, files in os.walk(cdir):
            dirs.sort()
            for fn in sorted(files):
                if fn.lower().endswith(AUDIO_EXTENSIONS):
                    full = os.path.join(root, fn)
                    rel = os.path.relpath(full, folder).replace(os.sep, "/")
                    rows.append(Row(id=rel, path=full, mids=(cls,), line=len(rows) + 1))
    if not rows:
        raise DataError(f"--audio_folder {folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) "
                        "in class sub-folders")
    return rows


def detect_format(input_path: str) -> str:
    if os.path.isdir(input_path):
        return "folder"
    if input_path.lower().endswith(".json"):
        return "datafile"
    if is_audioset_csv(input_path):
        return "audioset"
    return "csv"


def read_rows(input_path: str, fmt: str = "auto", audio_dir: str | None = None,
              filename_pattern: str = "{YTID}.wav") -> list[Row]:
    """Read any supported listing (see module docstring) → rows in input order."""
    if fmt not in FORMATS:
        raise DataError(f"unknown input format {fmt!r}; one of {FORMATS}")
    if not os.path.exists(input_path):
        raise DataError(f"input not found: {input_path}")
    if fmt == "auto":
        fmt = detect_format(input_path)
    if fmt == "folder":
        return read_audio_folder(input_path)
    if fmt == "datafile":
        return read_datafile(input_path)
    if fmt == "audioset":
        return read_audioset_csv(input_path, audio_dir or "", filename_pattern)
    return read_plain_csv(input_path)[0]


# ----------------------------------------------------------------------------- rewriting
@dataclasses.dataclass
class Listing:
    """A listing as read by :func:`read_listing`: its format (``datafile`` / ``audioset`` /
    ``csv``), path, rows, and what writing it back needs (the parsed JSON document, the file's
    lines, or the CSV header)."""
    fmt: str
    path: str
    rows: list[Row]
    document: Any = None          # datafile: the JSON dict; audioset: the file's lines
    header: list[str] | None = None   # csv: the columns

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.rows]

    @property
    def mids(self) -> list[list[str]]:
        return [list(r.mids) for r in self.rows]


def read_listing(path: str, fmt: str = "auto") -> Listing:
    """A datafile, AudioSet segment CSV or plain CSV (the parsers of :func:`read_rows`, the
    same column rules) kept so that :func:`write_listing` can write it back. Audio paths are
    not needed: AudioSet rows resolve under ``.`` (their ids are ``{YTID}_{start}``)."""
    if not os.path.exists(path):
        raise DataError(f"input not found: {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "datafile":
        d = _load_datafile(path)
        return Listing(fmt, path, _datafile_rows(d, path), document=d)
    if fmt == "audioset":
        lines = [line for _, line in _data_lines(path)]
        return Listing(fmt, path, read_audioset_csv(path, "."), document=lines)
    if fmt == "csv":
        rows, header = read_plain_csv(path)
        return Listing(fmt, path, rows, header=header)
    if fmt == "folder":
        raise DataError(f"{path} is a folder of class sub-folders: it has no label column to "
                        "rewrite; list it as a CSV (path,labels) first")
    raise DataError(f"unknown input format {fmt!r}; one of {FORMATS}")


def write_listing(listing: Listing, new_mids: Sequence[Sequence[str]], path: str) -> None:
    """Write ``listing`` with its labels replaced by ``new_mids`` (one list per row), in its own
    format: every other field, line and column unchanged (datafile: ``labels`` stays a string
    or a list as it was; AudioSet: comment lines kept; CSV: labels joined with ``;`` if the
    input used it, else ``,``). Atomic (temp file + rename)."""
    if len(new_mids) != len(listing.rows):
        raise ValueError(f"{len(new_mids)} label lists for {len(listing.rows)} rows")
    buf = io.StringIO()
    if listing.fmt == "datafile":
        d = copy.deepcopy(listing.document)
        for e, m in zip(d["data"], new_mids):
            e["labels"] = list(m) if isinstance(e.get("labels"), list) else ",".join(m)
        json.dump(d, buf, indent=1)
    elif listing.fmt == "audioset":
        out = list(listing.document)
        for r, m in zip(listing.rows, new_mids):
            fields = _csv_fields(out[r.line - 1].strip())
            out[r.line - 1] = ", ".join(fields[:3]) + ', "' + ",".join(m) + '"' + "".join(
                ", " + f for f in fields[4:])
        buf.write("\n".join(out) + "\n")
    elif listing.fmt == "csv":
        lcol = _pick(listing.header or [], LABEL_COLUMNS)
        records = [r.record for r in listing.rows]
        sep = ";" if any(";" in (rec.get(lcol) or "") for rec in records) else ","
        w = csv.DictWriter(buf, fieldnames=listing.header, lineterminator="\n")
        w.writeheader()
        for rec, m in zip(records, new_mids):
            w.writerow({**rec, lcol: sep.join(m)})
    else:
        raise DataError(f"cannot write a listing of format {listing.fmt!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- vocabulary
def build_vocabulary(rows: Sequence[Row], label_csv: str | None = None
                     ) -> tuple[list[str], list[str]]:
    """The vocabulary (mids, names): ``label_csv`` if given, else the sorted set of labels seen
    (names = MIDs, which for folder input are the folder names)."""
    if label_csv:
        return read_label_csv(label_csv)
    mids = sorted({m for r in rows for m in r.mids})
    if not mids:
        raise DataError("no labels in the input and no --label_csv: cannot build a vocabulary")
    return mids, list(mids)


VOCABULARY_FILE = "labels.csv"


def output_vocabulary(rows: Sequence[Row], label_csv: str | None, output_dir: str
                      ) -> tuple[list[str], list[str], str]:
    """The vocabulary for preparing ``rows`` into ``output_dir`` and a line saying where it
    came from.

    With ``label_csv``: that file. Without: ``output_dir/labels.csv`` (``index,mid,
    display_name``; mid = display name = the label as written, e.g. the class folder's
    name) — reused when it already exists and holds every label of ``rows`` (so a train and
    a test set prepared into one folder share one vocabulary), else written from the sorted
    set of labels seen. A ``labels.csv`` there that lacks some of the labels is an error
    (never silently replaced).
    """
    from psla_tf.data.records import write_label_csv
    if label_csv:
        mids, names = read_label_csv(label_csv)
        return mids, names, f"vocabulary: {len(mids)} classes from {label_csv}"
    path = os.path.join(output_dir, VOCABULARY_FILE)
    seen = build_vocabulary(rows)
    if os.path.exists(path):
        mids, names = read_label_csv(path)
        lacking = sorted(set(seen[0]) - set(mids))
        if lacking:
            raise DataError(f"{path} already holds a vocabulary of {len(mids)} classes without "
                            f"{', '.join(map(repr, lacking[:10]))}; prepare into another folder, "
                            f"delete {path}, or pass --label_csv")
        return mids, names, f"vocabulary: {len(mids)} classes from the existing {path}"
    os.makedirs(output_dir, exist_ok=True)
    write_label_csv(path, *seen)  # atomic (temp file + rename)
    return seen[0], seen[1], f"vocabulary: {len(seen[0])} classes written to {path}"


def check_rows(rows: Sequence[Row], mids: Sequence[str], source: str = "input") -> None:
    """Raise DataError (before anything is written) on unknown MIDs or duplicate ids."""
    if not rows:
        raise DataError(f"{source} lists no clips")
    known = set(mids)
    unknown: dict[str, list[int]] = {}
    for r in rows:
        for m in r.mids:
            if m not in known:
                unknown.setdefault(m, []).append(r.line)
    if unknown:
        lines = [f"  {m!r} on line(s) {_fmt_lines(ls)}" for m, ls in sorted(unknown.items())]
        raise DataError(f"{len(unknown)} label(s) in {source} are not in the vocabulary "
                        f"({len(known)} classes); fix the labels or pass the right "
                        "--label_csv:\n" + "\n".join(lines))
    seen: dict[str, int] = {}
    dups = []
    for r in rows:
        if r.id in seen:
            dups.append(f"  {r.id!r} on lines {seen[r.id]} and {r.line}")
        else:
            seen[r.id] = r.line
    if dups:
        raise DataError(f"{len(dups)} duplicate clip id(s) in {source}:\n" + "\n".join(dups[:20])
                        + ("\n  ..." if len(dups) > 20 else ""))


def _fmt_lines(lines: Iterable[int], limit: int = 20) -> str:
    lines = list(lines)
    s = ", ".join(str(x) for x in lines[:limit])
    return s + (f", ... ({len(lines)} in all)" if len(lines) > limit else "")
