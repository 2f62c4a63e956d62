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

:func:`run_enhancement` (``tools/enhance_labels.py``) drives it over files; the I/O lives in
the data layer and the scores file's home: listings in :mod:`psla_tf.data.sources`
(``read_listing`` / ``write_listing``), shards in :mod:`psla_tf.data.shard_copy`
(``record_labels`` / ``relabel_shards``), teacher scores in :mod:`psla_tf.prediction`
(``load_scores``).
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


# ----------------------------------------------------------------------------- driver
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


def run_enhancement(train_data: str, scores_path: str, ontology_path: str, output: str,
                    label_csv: str | None = None, threshold: str = "mean", fix: str = "both",
                    report_path: str | None = None, top: int = 20) -> dict[str, Any]:
    """Enhance a training set's labels with a teacher's scores (Algorithm 2), end to end.

    ``train_data``: a listing (datafile JSON / AudioSet segment CSV / plain CSV, as
    tools/make_tfrecords.py reads them; needs ``label_csv``) or a TFRecord glob (vocabulary
    from its manifest). ``scores_path``: a scores file of tools/predict.py
    (:func:`psla_tf.prediction.load_scores`). ``output``: the enhanced listing (same format,
    :func:`psla_tf.data.sources.write_listing`) or, for TFRecords, the output shard prefix
    (:func:`psla_tf.data.shard_copy.relabel_shards`). Writes ``report_path`` (.json and .md;
    default ``{output}.report``) and returns the report.
    """
    from psla_tf import atomic
    from psla_tf.data import records, shard_copy, sources
    from psla_tf.ontology import load_ontology
    from psla_tf.prediction import is_record_glob, load_scores
    if threshold not in THRESHOLD_MODES:
        raise DataError(f"--threshold must be one of {', '.join(THRESHOLD_MODES)}")
    if fix not in FIX_TYPES:
        raise DataError(f"--fix must be one of {', '.join(FIX_TYPES)}")
    listing = spec = None
    if not is_record_glob(train_data):
        if not label_csv:
            raise DataError("--label_csv is needed with a datafile/CSV --train_data")
        vocab, names = records.read_label_csv(label_csv)
        listing = sources.read_listing(train_data)
        ids = listing.ids
        labels = mids_to_indices(listing.mids, vocab, ids, train_data)
    else:
        spec = records.load_data_spec(train_data)
        vocab, names = spec.mids, spec.names
        if label_csv and list(records.read_label_csv(label_csv)[0]) != list(vocab):
            raise DataError(f"--label_csv {label_csv} differs from the shards' vocabulary")
        ids, labels = shard_copy.record_labels(spec)
    if not ids:
        raise DataError(f"{train_data} holds no clips")
    teacher = load_scores(scores_path)
    scores = np.asarray(teacher.scores, np.float64)
    if scores.shape[1] != len(vocab):
        raise DataError(f"{scores_path}: scores have {scores.shape[1]} classes but the "
                        f"vocabulary has {len(vocab)}")
    if teacher.mids and teacher.mids != list(vocab):     # class map stored by predict.py
        raise DataError(f"{scores_path}: the teacher's class map (mids stored by predict.py) "
                        "differs from the training data's vocabulary")
    scores, targets = align_scores(ids, teacher.ids, scores, teacher.targets)
    if targets is not None:
        check_targets(labels, targets, ids)
    onto = load_ontology(ontology_path)
    result = enhance_labels(labels, scores, vocabulary_edges(onto, vocab, fix),
                            threshold=threshold, fix=fix)
    report = enhancement_report(result, vocab, names, top=top)
    report["vocabulary_classes_not_in_ontology"] = [m for m in vocab if m not in onto]
    report["train_data"], report["scores"], report["output"] = train_data, scores_path, output
    if listing is not None:
        sources.write_listing(listing, [[vocab[j] for j in row] for row in result.labels],
                              output)
    else:
        prefix = output.removesuffix(".manifest.json")
        shards = shard_copy.relabel_shards(spec, result.labels, prefix)
        summary = {k: report[k] for k in ("threshold", "fix", "labels_before", "labels_after",
                                          "labels_added")}
        man = shard_copy.write_copy_manifest(
            spec, prefix, shards, multi_hot(result.labels, len(vocab)).sum(axis=0),
            {"label_enhancement": {**summary, "source": train_data}})
        report["output"] = man.path
    base = (report_path or (output + ".report")).removesuffix(".json")
    atomic.write_json(base + ".json", report, indent=1)
    atomic.write_text(base + ".md", report_markdown(report))
    report["report_files"] = [base + ".json", base + ".md"]
    return report
