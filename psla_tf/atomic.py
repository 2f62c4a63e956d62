"""Atomic file writes: a reader (another process, a resumed run, a crashed run's clean-up) sees
the old file or the new one, never half of one.

Every writer goes through :func:`atomic_path`: the content is written to ``{path}.tmp{suffix}``
beside the target (same filesystem, so the final ``os.replace`` is one rename) and renamed onto
``path`` only when the write succeeded; on any failure the temporary file is removed. The
``{path}.tmp*`` name is also what the commands' clean-up (:mod:`psla_tf.cli.paths`) removes
after an interrupted run.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import numpy as np

__all__ = ["atomic_path", "exclusive", "write_text", "write_bytes", "write_json", "save_npz",
           "save_npy"]


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield ``{path}.tmp{suffix}`` to write to; it replaces ``path`` when the block ends
    normally and is removed when it raises. ``suffix`` keeps an extension that the writer
    needs (``.npz``, ``.wav``, ``.keras``); writers running at once on one path (workers of a
    distributed run) pass a suffix of their own."""
    tmp = f"{os.fspath(path)}.tmp{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def exclusive(lock_path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the block: processes
    that share a folder (e.g. cross-validation halves started side by side) take turns. POSIX
    ``flock``; where it does not exist the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    """``data`` into ``path`` atomically (``fsync``: flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str, fsync: bool = False, suffix: str = "") -> None:
    """UTF-8 ``text`` into ``path`` atomically."""
    with atomic_path(path, suffix) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, obj: Any, fsync: bool = False, **dump_kwargs: Any) -> None:
    """``json.dumps(obj, **dump_kwargs)`` into ``path`` atomically."""
    write_text(path, json.dumps(obj, **dump_kwargs), fsync=fsync)


def save_npz(path: str, **arrays: Any) -> None:
    """``np.savez(path, **arrays)`` atomically."""
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **arrays)


def save_npy(path: str, array: np.ndarray) -> None:
    """``np.save(path, array)`` atomically."""
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)
