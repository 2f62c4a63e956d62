"""The AudioSet ontology as the label-enhancement graph (paper Sec. V, Algorithm 2 line 6).

``ontology.json`` is a list of ``{"id", "name", "child_ids", "restrictions", ...}``. Edges are
``parent → child`` for every ``child_id`` a class lists, **except** that a class whose
``restrictions == ["abstract"]`` gives no edges: its ``child_ids`` are ignored. This is how the
reference builds its child and parent maps (``fix_type1.generate_child_dict`` and
``fix_type2.generate_parent_dict`` skip abstract classes when reading ``child_ids``). So:

* an abstract class has no children (Type I never goes through it) and is nobody's parent;
* a path through an abstract class is broken: "Music" → "Music genre" (abstract) → "Rock music"
  makes "Music" neither a parent nor an ancestor of "Rock music" (Type II does not add "Music"
  to a "Rock music" clip through that path; it would through a non-abstract path);
* an abstract class can still be the child end of an edge from a non-abstract parent. This only
  matters for a vocabulary that contains an abstract class; none of AudioSet's 527 classes
  (nor FSD50K's 200) is abstract, so on those vocabularies this reading and "an abstract class
  is neither end of any edge" give identical results.

A class can have several parents (e.g. "Whoosh, swoosh, swish"); ancestors follow every parent
link to all depths (cycles, which the published ontology does not have, are tolerated).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Sequence

from psla_tf.errors import DataError

ABSTRACT = ["abstract"]


@dataclasses.dataclass(frozen=True)
class Ontology:
    """Class names, ``child_ids`` as listed, and which classes are abstract."""
    names: dict[str, str]
    child_ids: dict[str, tuple[str, ...]]
    abstract: frozenset[str]

    def children(self, mid: str) -> tuple[str, ...]:
        """Direct children of ``mid`` through edges (none for an abstract class)."""
        if mid in self.abstract:
            return ()
        return self.child_ids.get(mid, ())

    @property
    def parent_map(self) -> dict[str, tuple[str, ...]]:
        """child → its direct parents (non-abstract classes that list it), in file order."""
        cached = self.__dict__.get("_parents")
        if cached is None:
            parents: dict[str, list[str]] = {}
            for mid in self.child_ids:
                for c in self.children(mid):
                    lst = parents.setdefault(c, [])
                    if mid not in lst:
                        lst.append(mid)
            cached = {k: tuple(v) for k, v in parents.items()}
            object.__setattr__(self, "_parents", cached)
        return cached

    def parents(self, mid: str) -> tuple[str, ...]:
        return self.parent_map.get(mid, ())

    def ancestors(self, mid: str) -> list[str]:
        """All ancestors of ``mid`` (parents, grandparents, ...) following every parent link;
        ``mid`` itself is excluded. Order: breadth-first, first visit."""
        seen = {mid}
        out: list[str] = []
        frontier = list(self.parents(mid))
        while frontier:
            nxt: list[str] = []
            for p in frontier:
                if p in seen:
                    continue
                seen.add(p)
                out.append(p)
                nxt.extend(self.parents(p))
            frontier = nxt
        return out

    def name(self, mid: str) -> str:
        return self.names.get(mid, mid)

    def __contains__(self, mid: object) -> bool:
        return mid in self.names


def ontology_from_entries(entries: Iterable[dict], source: str = "ontology") -> Ontology:
    """Build an :class:`Ontology` from parsed ``ontology.json`` entries."""
    names: dict[str, str] = {}
    child_ids: dict[str, tuple[str, ...]] = {}
    abstract: set[str] = set()
    for n, e in enumerate(entries, start=1):
        if not isinstance(e, dict) or "id" not in e:
            raise DataError(f"{source}: entry {n} is not an object with an 'id': {e!r:.80}")
        mid = str(e["id"])
        if mid in names:
            raise DataError(f"{source}: class {mid} is listed twice")
        names[mid] = str(e.get("name", mid))
        kids = e.get("child_ids") or []
        if not isinstance(kids, list):
            raise DataError(f"{source}: child_ids of {mid} must be a list")
        child_ids[mid] = tuple(str(c) for c in kids)
        restrictions = e.get("restrictions") or []
        if list(restrictions) == ABSTRACT:
            abstract.add(mid)
    return Ontology(names=names, child_ids=child_ids, abstract=frozenset(abstract))


def load_ontology(path: str) -> Ontology:
    """Read an AudioSet-format ``ontology.json`` (a JSON list of class objects)."""
    import tensorflow as tf  # gfile: local or gs://
    if not tf.io.gfile.exists(path):
        raise DataError(f"ontology not found: {path} (AudioSet's ontology.json: "
                        "https://github.com/audioset/ontology)")
    with tf.io.gfile.GFile(path) as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"ontology {path} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise DataError(f"ontology {path}: expected a JSON list of classes")
    return ontology_from_entries(entries, source=path)


def write_ontology(path: str, classes: Sequence[dict]) -> None:
    """Write ``classes`` (dicts with id, name, child_ids, restrictions) as ontology.json."""
    full = []
    for c in classes:
        full.append({"id": c["id"], "name": c["name"], "description": c.get("description", ""),
                     "citation_uri": c.get("citation_uri", ""),
                     "positive_examples": c.get("positive_examples", []),
                     "child_ids": list(c.get("child_ids", [])),
                     "restrictions": list(c.get("restrictions", []))})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(full, f, indent=1)
