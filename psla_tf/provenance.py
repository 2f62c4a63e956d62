"""What a run needs to be reproduced exactly, written into its experiment folder.

``write_provenance`` writes, atomically:

* ``flags.txt`` — the resolved flags as an absl flagfile (``python main.py
  --flagfile=EXP_DIR/flags.txt`` reruns the same configuration);
* ``provenance.json`` — the command line, the start time, the git commit of the code (and
  whether the tree had uncommitted changes), Python / platform and library versions, and
  for every data manifest its path, SHA-256 and example count (the shards are named by the
  manifest, and the manifest records their example counts, so its hash pins the data).

:func:`check_provenance` compares a folder's recorded manifests and code with the present
ones (what changed since the run).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from typing import Any, Iterable, Sequence

from psla_tf import atomic
from psla_tf import run_folder

__all__ = ["LIBRARIES", "PROVENANCE_FILE", "FLAGS_FILE", "git_state", "library_versions",
           "file_sha256", "manifest_entries", "write_provenance", "check_provenance"]

PROVENANCE_FILE = run_folder.PROVENANCE_FILE
FLAGS_FILE = run_folder.FLAGS_FILE
LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "scipy", "scikit-learn",
             "soundfile", "soxr", "absl-py", "h5py", "ai-edge-litert")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state(repo: str = _REPO) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None, "dirty_files": [...]}`` of ``repo``."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                                 timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None
    commit = run("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "dirty_files": []}
    status = run("status", "--porcelain", "--untracked-files=no") or ""
    files = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit.strip(), "dirty": bool(files), "dirty_files": files}


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """Installed versions of ``names`` (absent ones left out) plus Python and platform."""
    from importlib import metadata
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out


def file_sha256(path: str) -> str:
    """SHA-256 of a local or ``gs://`` file."""
    import tensorflow as tf
    h = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_entries(role: str, data_glob: str | None) -> list[dict[str, Any]]:
    """The manifests behind a shard glob (``{prefix}.manifest.json`` of each prefix), hashed."""
    if not data_glob:
        return []
    from psla_tf.data import records
    spec = records.load_data_spec(data_glob)
    out = []
    for m in spec.manifests:
        path = m.path if "://" in m.path else os.path.abspath(m.path)
        out.append({"role": role, "glob": data_glob, "path": path,
                    "sha256": file_sha256(path), "num_examples": m.num_examples,
                    "listed": m.listed})
    return out


def write_provenance(exp_dir: str, flagfile_text: str,
                     data: Sequence[tuple[str, str | None]] = (),
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``flags.txt`` and ``provenance.json`` into ``exp_dir``; returns the record.

    ``data``: (role, shard glob) pairs, e.g. ``[("train", cfg.train_data), ...]``.
    """
    os.makedirs(exp_dir, exist_ok=True)
    pid = str(os.getpid())   # workers of a distributed run may write at once
    atomic.write_text(os.path.join(exp_dir, FLAGS_FILE), flagfile_text, suffix=pid)
    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable] + sys.argv,
        "flagfile": FLAGS_FILE,
        "git": git_state(),
        "versions": library_versions(),
        "manifests": [e for role, g in data for e in manifest_entries(role, g)],
    }
    if extra:
        record.update(extra)
    atomic.write_text(os.path.join(exp_dir, PROVENANCE_FILE),
                      json.dumps(record, indent=2, sort_keys=False) + "\n", suffix=pid)
    return record


def check_provenance(exp_dir: str) -> list[str]:
    """Differences between the recorded run and now: manifests whose hash changed or that
    are gone, and a different git commit. Empty list = same data and code."""
    with open(os.path.join(exp_dir, PROVENANCE_FILE), encoding="utf-8") as f:
        rec = json.load(f)
    problems = []
    for m in rec.get("manifests", []):
        if not os.path.exists(m["path"]):
            problems.append(f"{m['role']} manifest {m['path']} is gone")
        elif file_sha256(m["path"]) != m["sha256"]:
            problems.append(f"{m['role']} manifest {m['path']} changed (hash differs)")
    now = git_state().get("commit")
    then = rec.get("git", {}).get("commit")
    if then and now and then != now:
        problems.append(f"code commit {now[:10]} differs from the run's {then[:10]}")
    return problems
