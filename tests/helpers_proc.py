"""Subprocesses started together so that they overlap (each fresh Python + TensorFlow
process spends most of its time single-threaded: imports, tracing), read when a test needs
its result. Output goes to files, so a child never blocks on a full pipe."""
from __future__ import annotations

import os
import subprocess


class Background:
    def __init__(self, folder: str):
        self.folder = str(folder)
        os.makedirs(self.folder, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None,
              cwd: str | None = None) -> None:
        out = open(os.path.join(self.folder, f"{name}.stdout"), "w")
        err = open(os.path.join(self.folder, f"{name}.stderr"), "w")
        with out, err:
            self.procs[name] = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out,
                                                stderr=err, stdin=subprocess.DEVNULL)

    def result(self, name: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """The finished run (as ``subprocess.run(..., capture_output=True, text=True)``)."""
        if name not in self.results:
            p = self.procs[name]
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise
            read = lambda s: open(os.path.join(self.folder, f"{name}.{s}")).read()  # noqa
            self.results[name] = subprocess.CompletedProcess(p.args, rc, read("stdout"),
                                                             read("stderr"))
        return self.results[name]

    def close(self) -> None:
        """Kill what no test waited for (e.g. deselected tests)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
