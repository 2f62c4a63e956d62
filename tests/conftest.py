"""Shared test fixtures. Tests that need ../shared skip with a clear reason when it is absent."""
from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("PSLA_SHARED", ROOT.parent / "shared"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def shared_path(*parts: str) -> pathlib.Path:
    """Path under ../shared, or skip the calling test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (the ../shared folder beside the repository is absent)")
    return p


@pytest.fixture
def shared():
    return shared_path
