"""Ontology-based label enhancement (paper Sec. V, Algorithm 2).

Procedure 1 (lines 1-2): a per-class label-modification threshold t_k from the teacher's scores
on the training clips *originally* labelled k: their mean (the paper's default), median, or
25th / 10th / 5th percentile (``numpy.percentile`` with its default linear interpolation, as
the reference). A class no clip is labelled with has no threshold (NaN) and is never added.

Procedure 2 (lines 3-8): for each clip and each original label k, the candidates are

* Type I  (``"type1"``): the direct children of k;
* Type II (``"type2"``): all ancestors of k (every depth, every parent link);
* ``"both"``: the union of the two, i.e. the union of the Type I and Type II results, each
  computed from the original labels (candidates never come from added labels);

restricted to vocabulary classes not among the clip's original labels; a candidate c is added
when score_c > t_c (strictly). Edges come from :mod:`psla_tf.ontology` (abstract classes give
no edges).

Statistics (Table VIII): labels before/after, % added, classes affected, and for each ontology
edge (source class → added class) how many labels it added. As in the reference, an added label
is credited to the first of the clip's original labels (in the order written) that proposes it,
so the edge counts sum to the number of added labels.

Everything is vectorised over (clip, label, edge) triples, so the full AudioSet (2 M clips)
is processed in seconds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from psla_tf.errors import DataError
from psla_tf.ontology import Ontology

THRESHOLD_MODES = ("mean", "median", "25", "10", "5")
FIX_TYPES = ("type1", "type2", "both")
RELATION_CHILD, RELATION_ANCESTOR = 1, 2  # Type I edge: source → child; Type II: → ancestor


# ----------------------------------------------------------------------------- labels
def _flatten(labels: Sequence[Sequence[int]], num_classes: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label lists → (clip index, position, class) of each distinct label, in written order."""
    lengths = np.fromiter((len(l) for l in labels), np.int64, count=len(labels))
    clip = np.repeat(np.arange(len(labels), dtype=np.int64), lengths)
    cls = (np.fromiter((int(c) for l in labels for c in l), np.int64, count=int(lengths.sum()))
           if lengths.sum() else np.zeros(0, np.int64))
    if cls.size and (cls.min() < 0 or cls.max() >= num_classes):
        bad = int(cls[(cls < 0) | (cls >= num_classes)][0])
        raise DataError(f"label index {bad} is outside the vocabulary of {num_classes} classes")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(labels) else lengths
    pos = np.arange(cls.size, dtype=np.int64) - np.repeat(starts, lengths)
    # drop repeated labels of a clip, keeping the first occurrence
    key = clip * num_classes + cls
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(cls.size, bool)
    keep[first] = True
    return clip[keep], pos[keep], cls[keep]


def multi_hot(labels: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Label index lists → bool multi-hot matrix [N, C]."""
    clip, _, cls = _flatten(labels, num_classes)
    out = np.zeros((len(labels), num_classes), bool)
    out[clip, cls] = True
    return out


# ----------------------------------------------------------------------------- Procedure 1
def class_thresholds(scores: np.ndarray, labels: Sequence[Sequence[int]] | np.ndarray,
                     mode: str = "mean") -> np.ndarray:
    """Algorithm 2 lines 1-2: t_k over the clips originally labelled k (NaN if none).

    ``labels``: index lists or a [N, C] multi-hot matrix; ``mode``: one of THRESHOLD_MODES.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    n, c = scores.shape
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold mode {mode!r} is not one of {THRESHOLD_MODES}")
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        hot = labels.astype(bool)
        clip, cls = np.nonzero(hot)
    else:
        clip, _, cls = _flatten(labels, c)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} label sets but {n} score rows")
    order = np.argsort(cls, kind="stable")
    clip, cls = clip[order], cls[order]
    bounds = np.searchsorted(cls, np.arange(c + 1))
    values = scores[clip, cls].astype(np.float64)
    t = np.full(c, np.nan)
    for k in range(c):
        v = values[bounds[k]:bounds[k + 1]]
        if v.size == 0:
            continue
        if mode == "mean":
            t[k] = v.mean()
        elif mode == "median":
            t[k] = np.median(v)
        else:
            t[k] = np.percentile(v, float(mode))
    return t


# ----------------------------------------------------------------------------- edges
def vocabulary_edges(ontology: Ontology, mids: Sequence[str], fix: str = "both"
                     ) -> np.ndarray:
    """Candidate edges ``[E, 3]`` = (source class, candidate class, relation) within ``mids``.

    Type I: source → direct child; Type II: source → each ancestor (all depths). Only classes
    in the vocabulary are endpoints (a child outside the vocabulary is skipped, not walked
    through, as in the reference; ancestors are walked through any class).
    """
    if fix not in FIX_TYPES:
        raise ValueError(f"fix type {fix!r} is not one of {FIX_TYPES}")
    index = {m: i for i, m in enumerate(mids)}
    edges: dict[tuple[int, int], int] = {}
    for s, mid in enumerate(mids):
        if fix in ("type1", "both"):
            for c in ontology.children(mid):
                if c in index and index[c] != s:
                    edges.setdefault((s, index[c]), RELATION_CHILD)
        if fix in ("type2", "both"):
            for a in ontology.ancestors(mid):
                if a in index and index[a] != s:
                    edges.setdefault((s, index[a]), RELATION_ANCESTOR)
    if not edges:
        return np.zeros((0, 3), np.int64)
    arr = np.array([(s, d, r) for (s, d), r in edges.items()], np.int64)
    return arr[np.lexsort((arr[:, 1], arr[:, 0]))]


# ----------------------------------------------------------------------------- Procedure 2
@dataclasses.dataclass
class Enhancement:
    """Result of :func:`enhance_labels`.

    ``labels``: enhanced index lists (original labels in their order, then the added ones by
    class index); ``added``: the added indices per clip; ``added_pairs``: [A, 4] rows
    (clip, source class, added class, relation) for every added label; ``thresholds``: t_k.
    """
    labels: list[list[int]]
    added: list[list[int]]
    added_pairs: np.ndarray
    thresholds: np.ndarray
    threshold_mode: str
    fix: str
    num_original: int

    @property
    def num_added(self) -> int:
        return int(self.added_pairs.shape[0])


def enhance_labels(labels: Sequence[Sequence[int]], scores: np.ndarray, edges: np.ndarray,
                   threshold: str = "mean", fix: str = "both",
                   thresholds: np.ndarray | None = None) -> Enhancement:
    """Algorithm 2: add ontology neighbours whose teacher score exceeds their class threshold.

    ``labels``: original class-index lists (one per clip, the rows of ``scores``);
    ``edges``: from :func:`vocabulary_edges` (for the same ``fix``); ``thresholds``: overrides
    Procedure 1 (t_k computed from ``scores`` and ``labels`` with ``threshold`` otherwise).
    """
    scores = np.asarray(scores)
    n, c = scores.shape
    if len(labels) != n:
        raise ValueError(f"{len(labels)} label sets but {n} score rows")
    if fix not in FIX_TYPES:
        raise ValueError(f"fix type {fix!r} is not one of {FIX_TYPES}")
    want = {"type1": {RELATION_CHILD}, "type2": {RELATION_ANCESTOR},
            "both": {RELATION_CHILD, RELATION_ANCESTOR}}[fix]
    edges = np.asarray(edges, np.int64).reshape(-1, 3)
    edges = edges[np.isin(edges[:, 2], list(want))]
    edges = edges[np.lexsort((edges[:, 1], edges[:, 0]))]
    t = class_thresholds(scores, labels, threshold) if thresholds is None else np.asarray(
        thresholds, np.float64)
    clip, pos, cls = _flatten(labels, c)
    # expand every original label into its outgoing edges: (clip, pos, source, candidate)
    starts = np.searchsorted(edges[:, 0], np.arange(c + 1))
    deg = (starts[1:] - starts[:-1])[cls]
    owner = np.repeat(np.arange(cls.size), deg)
    first = np.repeat(starts[:-1][cls], deg)
    offs = np.arange(owner.size) - np.repeat(np.cumsum(deg) - deg, deg)
    e = first + offs
    c_clip, c_pos, c_src, c_dst, c_rel = clip[owner], pos[owner], cls[owner], edges[e, 1], edges[
        e, 2]
    orig_keys = np.sort(clip * c + cls)
    keys = c_clip * c + c_dst
    with np.errstate(invalid="ignore"):
        ok = (~np.isin(keys, orig_keys)) & (scores[c_clip, c_dst] > t[c_dst])
    keys, c_pos, c_clip, c_src, c_dst, c_rel = (a[ok] for a in (keys, c_pos, c_clip, c_src,
                                                                c_dst, c_rel))
    # one added label per (clip, class), credited to the first proposing original label
    order = np.lexsort((c_pos, keys))
    _, firsts = np.unique(keys[order], return_index=True)
    sel = order[firsts]
    pairs = np.stack([c_clip[sel], c_src[sel], c_dst[sel], c_rel[sel]], axis=1) if sel.size \
        else np.zeros((0, 4), np.int64)
    pairs = pairs[np.lexsort((pairs[:, 2], pairs[:, 0]))] if pairs.size else pairs
    added: list[list[int]] = [[] for _ in range(n)]
    for i, a in zip(pairs[:, 0].tolist(), pairs[:, 2].tolist()):
        added[i].append(a)
    enhanced = []
    for i in range(n):
        base = list(dict.fromkeys(int(x) for x in labels[i]))
        enhanced.append(base + added[i])
    return Enhancement(labels=enhanced, added=added, added_pairs=pairs, thresholds=t,
                       threshold_mode=threshold, fix=fix, num_original=int(cls.size))


# ----------------------------------------------------------------------------- report
def enhancement_report(result: Enhancement, mids: Sequence[str], names: Sequence[str],
                       top: int = 20) -> dict[str, Any]:
    """Table VIII-style statistics of an :class:`Enhancement` (JSON-serialisable dict)."""
    pairs = result.added_pairs
    c = len(mids)
    before = result.num_original
    added = result.num_added
    gained = np.bincount(pairs[:, 2], minlength=c) if added else np.zeros(c, np.int64)
    sources = np.bincount(pairs[:, 1], minlength=c) if added else np.zeros(c, np.int64)
    edge_counts: dict[tuple[int, int, int], int] = {}
    if added:
        uniq, counts = np.unique(pairs[:, 1:4], axis=0, return_counts=True)
        edge_counts = {tuple(int(x) for x in u): int(k) for u, k in zip(uniq, counts)}
    ranked = sorted(edge_counts.items(), key=lambda kv: (-kv[1], kv[0]))
    rel_name = {RELATION_CHILD: "child (Type I)", RELATION_ANCESTOR: "ancestor (Type II)"}
    top_pairs = [{"source_mid": mids[s], "source_name": names[s], "added_mid": mids[d],
                  "added_name": names[d], "relation": rel_name[r], "count": k}
                 for (s, d, r), k in ranked[:top]]
    classes_added = [{"mid": mids[k], "name": names[k], "added": int(gained[k])}
                     for k in np.argsort(-gained, kind="stable")[:top] if gained[k] > 0]
    no_threshold = int(np.isnan(result.thresholds).sum())
    return {
        "threshold": result.threshold_mode,
        "fix": result.fix,
        "num_clips": len(result.labels),
        "labels_before": before,
        "labels_after": before + added,
        "labels_added": added,
        "percent_added": 100.0 * added / before if before else 0.0,
        "clips_changed": int(sum(1 for a in result.added if a)),
        "classes_with_added_labels": int((gained > 0).sum()),
        "classes_affected": int(((gained > 0) | (sources > 0)).sum()),
        "classes_without_threshold": no_threshold,
        "num_classes": c,
        "top_pairs": top_pairs,
        "top_added_classes": classes_added,
    }


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table plus the top (source → added) pairs."""
    r = report
    lines = [
        f"## Label enhancement: threshold {r['threshold']}, fix {r['fix']}",
        "",
        "| clips | labels before | labels after | added (%) | clips changed "
        "| classes with added labels | classes affected |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {r['num_clips']} | {r['labels_before']} | {r['labels_after']} | "
        f"{r['labels_added']} ({r['percent_added']:.1f}%) | {r['clips_changed']} | "
        f"{r['classes_with_added_labels']} / {r['num_classes']} | "
        f"{r['classes_affected']} / {r['num_classes']} |",
        "",
        "Classes affected = classes that gained labels or whose labels proposed added ones; "
        f"{r['classes_without_threshold']} classes have no labelled clip (no threshold).",
        "",
        "| source class | added class | relation | labels added |",
        "| --- | --- | --- | ---: |",
    ]
    for p in r["top_pairs"]:
        lines.append(f"| {p['source_name']} | {p['added_name']} | {p['relation']} | "
                     f"{p['count']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- files
@dataclasses.dataclass
class Listing:
    """A training listing read for enhancement: ``ids`` (clip ids, as TFRecords carry them),
    label ``mids`` per clip, and what is needed to write it back in the same format."""
    kind: str                   # "datafile" | "csv" | "audioset"
    path: str
    ids: list[str]
    mids: list[list[str]]
    payload: Any = None         # JSON dict / (header, records, sep) / (lines, data line numbers)


def _split_labels(text: str) -> list[str]:
    import re
    return [p.strip() for p in re.split(r"[,;]", text or "") if p.strip()]


def _is_audioset_csv(lines: Sequence[str]) -> bool:
    for line in lines:
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            if s.lstrip("# ").startswith("YTID"):
                return True
            continue
        return s.split(",")[0].strip() == "YTID"
    return False


def read_listing(path: str) -> Listing:
    """Read a PSLA datafile JSON, an AudioSet segment CSV or a plain CSV (path, labels)."""
    import csv
    import io
    import json
    import os
    if not os.path.exists(path):
        raise DataError(f"training data file not found: {path}")
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("data"), list):
            raise DataError(f'{path}: expected {{"data": [{{"wav": ..., "labels": ...}}]}}')
        ids, mids = [], []
        for n, e in enumerate(d["data"], start=1):
            if not isinstance(e, dict) or "wav" not in e:
                raise DataError(f"{path}: entry {n} has no 'wav' field")
            lab = e.get("labels", "")
            ids.append(str(e["wav"]))
            mids.append([str(x) for x in lab] if isinstance(lab, list) else _split_labels(lab))
        return Listing("datafile", path, ids, mids, d)
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    lines = text.splitlines()
    if _is_audioset_csv(lines):
        ids, mids, data_lines = [], [], []
        for n, line in enumerate(lines):
            s = line.strip()
            if not s or s.startswith("#") or s.split(",")[0].strip() == "YTID":
                continue
            fields = [c.strip() for c in next(csv.reader(io.StringIO(line),
                                                         skipinitialspace=True))]
            if len(fields) < 4:
                raise DataError(f"{path}:{n + 1}: expected YTID, start_seconds, end_seconds, "
                                f"positive_labels; got {line!r}")
            ids.append(f"{fields[0]}_{fields[1]}")
            mids.append(_split_labels(fields[3]))
            data_lines.append((n, fields))
        return Listing("audioset", path, ids, mids, (lines, data_lines))
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    header = list(reader.fieldnames or [])
    lower = {h.strip().lower(): h for h in header}
    pcol = next((lower[c] for c in ("path", "filename", "file", "wav") if c in lower), None)
    lcol = next((lower[c] for c in ("labels", "label", "positive_labels") if c in lower), None)
    if pcol is None or lcol is None:
        raise DataError(f"{path}: a CSV needs a header with a path column (path/filename/file/"
                        f"wav) and a labels column (labels/label); got {header}")
    records = [dict(r) for r in reader]
    ids = [(r.get(pcol) or "").strip() for r in records]
    for n, i in enumerate(ids, start=2):
        if not i:
            raise DataError(f"{path}:{n}: empty path")
    mids = [_split_labels(r.get(lcol) or "") for r in records]
    sep = ";" if any(";" in (r.get(lcol) or "") for r in records) else ","
    return Listing("csv", path, ids, mids, (header, lcol, records, sep))


def write_listing(listing: Listing, new_mids: Sequence[Sequence[str]], path: str) -> None:
    """Write ``listing`` with its labels replaced by ``new_mids``, in its own format
    (every other field unchanged); atomic (temp file + rename)."""
    import copy
    import csv
    import io
    import json
    import os
    if len(new_mids) != len(listing.ids):
        raise ValueError("one label list per clip is needed")
    buf = io.StringIO()
    if listing.kind == "datafile":
        d = copy.deepcopy(listing.payload)
        for e, m in zip(d["data"], new_mids):
            e["labels"] = list(m) if isinstance(e.get("labels"), list) else ",".join(m)
        json.dump(d, buf, indent=1)
    elif listing.kind == "audioset":
        lines, data_lines = listing.payload
        out = list(lines)
        for (n, fields), m in zip(data_lines, new_mids):
            out[n] = ", ".join(fields[:3]) + ', "' + ",".join(m) + '"'
            if len(fields) > 4:
                out[n] += ", " + ", ".join(fields[4:])
        buf.write("\n".join(out) + "\n")
    else:
        header, lcol, records, sep = listing.payload
        w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
        w.writeheader()
        for r, m in zip(records, new_mids):
            r = dict(r)
            r[lcol] = sep.join(m)
            w.writerow(r)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def load_scores(path: str) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Teacher scores (the ``.npz`` of tools/predict.py, :mod:`psla_tf.prediction`):
    ``ids``, ``scores`` [N, C] as float64, ``targets`` or None."""
    from psla_tf.prediction import load_scores as load_predictions
    p = load_predictions(path)
    return p.ids, np.asarray(p.scores, np.float64), p.targets


def _few(items: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")


def align_scores(data_ids: Sequence[str], score_ids: Sequence[str], scores: np.ndarray,
                 targets: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of ``scores`` (and ``targets``) in the order of ``data_ids``, matched by id.

    Every training clip needs a score and every score row a training clip; otherwise a
    :class:`DataError` lists a few of the missing / extra ids.
    """
    pos: dict[str, int] = {}
    dup = []
    for i, s in enumerate(score_ids):
        if s in pos:
            dup.append(s)
        pos[s] = i
    if dup:
        raise DataError(f"teacher scores list some ids more than once: {_few(dup)}")
    data_set = set(data_ids)
    missing = [d for d in dict.fromkeys(data_ids) if d not in pos]
    extra = [s for s in score_ids if s not in data_set]
    if missing or extra:
        msg = []
        if missing:
            msg.append(f"{len(missing)} training clips have no teacher score: {_few(missing)}")
        if extra:
            msg.append(f"{len(extra)} scored ids are not in the training data: {_few(extra)}")
        raise DataError("; ".join(msg) + ". Score exactly the training set (ids = the audio "
                        "path as written in the datafile; AudioSet CSV rows: "
                        "{YTID}_{start_seconds}).")
    rows = np.fromiter((pos[d] for d in data_ids), np.int64, count=len(data_ids))
    return scores[rows], (None if targets is None else targets[rows])


def mids_to_indices(mids: Sequence[Sequence[str]], vocab: Sequence[str], ids: Sequence[str],
                    source: str) -> list[list[int]]:
    """Label MIDs → vocabulary indices; unknown MIDs raise a :class:`DataError`."""
    index = {m: i for i, m in enumerate(vocab)}
    out, bad = [], []
    for clip_id, ms in zip(ids, mids):
        row = []
        for m in ms:
            if m in index:
                row.append(index[m])
            else:
                bad.append(f"{m} (clip {clip_id})")
        out.append(row)
    if bad:
        raise DataError(f"{source}: {len(bad)} labels are not in the vocabulary: {_few(bad)}")
    return out


def check_targets(labels: Sequence[Sequence[int]], targets: np.ndarray, ids: Sequence[str]
                  ) -> None:
    """The teacher's ``targets`` must be the training labels (same clips, same vocabulary)."""
    hot = multi_hot(labels, targets.shape[1])
    bad = np.nonzero((targets > 0.5) != hot)[0]
    if bad.size:
        raise DataError(f"the scores file's targets disagree with the training labels for "
                        f"{np.unique(bad).size} clips: {_few([ids[i] for i in np.unique(bad)])} "
                        "(wrong vocabulary or a different label set?)")


def _read_record_labels(files: Sequence[str], compression: str
                        ) -> tuple[list[str], list[list[int]]]:
    import tensorflow as tf
    ids, labels = [], []
    for f in files:
        for raw in tf.data.TFRecordDataset([f], compression_type=compression or None):
            feat = tf.train.Example.FromString(raw.numpy()).features.feature
            ids.append(feat["id"].bytes_list.value[0].decode("utf-8"))
            labels.append([int(x) for x in feat["labels"].int64_list.value])
    return ids, labels


def rewrite_tfrecords(files: Sequence[str], compression: str, new_labels: Sequence[Sequence[int]],
                      mids: Sequence[str], prefix: str) -> list[dict[str, Any]]:
    """Copy shards to ``{prefix}-i-of-n`` with only ``labels``/``mids`` replaced (examples in
    the same order; every other feature, the audio included, byte-identical). Atomic per
    shard. Returns the manifest's ``shards`` entries."""
    import os
    import tensorflow as tf
    from tqdm import tqdm
    from psla_tf.data import records
    options = tf.io.TFRecordOptions(compression_type=compression or "")
    n = len(files)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    shards, k = [], 0
    for i, f in enumerate(tqdm(files, desc="rewriting shards", unit="shard")):
        out = records.shard_name(prefix, i, n, compression)
        if os.path.abspath(out) == os.path.abspath(f):
            raise DataError(f"--output would overwrite the input shard {f}; pick another prefix")
        tmp = out + ".tmp"
        count = 0
        with tf.io.TFRecordWriter(tmp, options) as w:
            for raw in tf.data.TFRecordDataset([f], compression_type=compression or None):
                ex = tf.train.Example.FromString(raw.numpy())
                feat = ex.features.feature
                lab = [int(x) for x in new_labels[k]]
                del feat["labels"].int64_list.value[:]
                feat["labels"].int64_list.value.extend(lab)
                del feat["mids"].bytes_list.value[:]
                feat["mids"].bytes_list.value.extend(mids[j].encode("utf-8") for j in lab)
                w.write(ex.SerializeToString())
                k += 1
                count += 1
        tf.io.gfile.rename(tmp, out, overwrite=True)
        shards.append({"file": os.path.basename(out), "num_examples": count})
    if k != len(new_labels):
        raise DataError(f"shards changed while rewriting: read {k} examples, expected "
                        f"{len(new_labels)}")
    return shards


def run_enhancement(train_data: str, scores_path: str, ontology_path: str, output: str,
                    label_csv: str | None = None, threshold: str = "mean", fix: str = "both",
                    report_path: str | None = None, top: int = 20) -> dict[str, Any]:
    """Enhance a training set's labels with a teacher's scores (Algorithm 2), end to end.

    ``train_data``: a datafile (JSON / AudioSet CSV / plain CSV; needs ``label_csv``) or a
    TFRecord glob (vocabulary from its manifest). ``output``: the enhanced datafile (same
    format) or, for TFRecords, the output shard prefix. Writes ``report_path`` (.json and .md;
    default ``{output}.report``) and returns the report.
    """
    import json
    import os
    from psla_tf.data import records
    from psla_tf.ontology import load_ontology
    if threshold not in THRESHOLD_MODES:
        raise DataError(f"--threshold must be one of {', '.join(THRESHOLD_MODES)}")
    if fix not in FIX_TYPES:
        raise DataError(f"--fix must be one of {', '.join(FIX_TYPES)}")
    is_listing = train_data.endswith((".json", ".csv"))
    spec = None
    if is_listing:
        if not label_csv:
            raise DataError("--label_csv is needed with a datafile/CSV --train_data")
        vocab, names = records.read_label_csv(label_csv)
        listing = read_listing(train_data)
        ids = listing.ids
        labels = mids_to_indices(listing.mids, vocab, ids, train_data)
    else:
        spec = records.load_data_spec(train_data)
        vocab, names = spec.mids, spec.names
        if label_csv:
            lv, _ = records.read_label_csv(label_csv)
            if list(lv) != list(vocab):
                raise DataError(f"--label_csv {label_csv} differs from the shards' vocabulary")
        ids, labels = _read_record_labels(spec.files, spec.compression)
    if not ids:
        raise DataError(f"{train_data} holds no clips")
    from psla_tf.prediction import load_scores as load_predictions
    teacher = load_predictions(scores_path)
    score_ids, targets = teacher.ids, teacher.targets
    scores = np.asarray(teacher.scores, np.float64)
    if scores.shape[1] != len(vocab):
        raise DataError(f"{scores_path}: scores have {scores.shape[1]} classes but the "
                        f"vocabulary has {len(vocab)}")
    if teacher.mids and teacher.mids != list(vocab):     # class map stored by predict.py
        raise DataError(f"{scores_path}: the teacher's class map (mids stored by predict.py) "
                        "differs from the training data's vocabulary")
    scores, targets = align_scores(ids, score_ids, scores, targets)
    if targets is not None:
        check_targets(labels, targets, ids)
    onto = load_ontology(ontology_path)
    edges = vocabulary_edges(onto, vocab, fix)
    result = enhance_labels(labels, scores, edges, threshold=threshold, fix=fix)
    report = enhancement_report(result, vocab, names, top=top)
    report["vocabulary_classes_not_in_ontology"] = [m for m in vocab if m not in onto]
    report["train_data"], report["scores"], report["output"] = train_data, scores_path, output
    if is_listing:
        write_listing(listing, [[vocab[j] for j in row] for row in result.labels], output)
    else:
        prefix = output[:-len(".manifest.json")] if output.endswith(".manifest.json") else output
        shards = rewrite_tfrecords(spec.files, spec.compression, result.labels, vocab, prefix)
        counts = multi_hot(result.labels, len(vocab)).sum(axis=0)
        fields = records.merged_manifest_fields(spec.manifests)
        extra = fields.pop("extra")
        extra["label_enhancement"] = {k: report[k] for k in (
            "threshold", "fix", "labels_before", "labels_after", "labels_added")}
        extra["label_enhancement"]["source"] = train_data
        man = records.Manifest(num_examples=len(ids), shards=shards, mids=list(vocab),
                               names=list(names), class_counts=[int(x) for x in counts],
                               extra=extra, **fields)
        man.write(records.manifest_path(prefix))
        report["output"] = records.manifest_path(prefix)
    base = report_path or (output + ".report")
    base = base[:-5] if base.endswith(".json") else base
    with open(base + ".json.tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(base + ".json.tmp", base + ".json")
    with open(base + ".md.tmp", "w") as f:
        f.write(report_markdown(report))
    os.replace(base + ".md.tmp", base + ".md")
    report["report_files"] = [base + ".json", base + ".md"]
    return report
