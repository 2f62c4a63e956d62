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


# The files that take longest (about 0.3-5 minutes each on 2 cores), longest first. They run
# first: with `-n 2 --dist loadfile` (README) each worker takes whole files in collection
# order (see pytest_configure), so a long file started last would run alone at the end. The
# other files (each well under half a minute) keep their alphabetical order after these.
SLOW_FIRST = ("test_export.py", "test_distribute.py", "test_distill_train.py",
              "test_cross_validate.py", "test_resume.py", "test_append_classes.py",
              "test_import_checkpoint.py", "test_finetune.py", "test_deploy.py", "test_api.py",
              "test_memory.py", "test_ensemble.py", "test_predict.py", "test_models.py",
              "test_infer.py", "test_prepare.py", "test_provenance.py", "test_failures.py",
              "test_error_matrix.py", "test_input_length.py", "test_distill.py",
              "test_train_e2e.py", "test_iid_order.py", "test_clip_norm.py")


def pytest_configure(config):
    """Keep the collection order for xdist's --dist loadfile: by default
    (--loadscope-reorder) it queues the files by their number of tests, most first, so the
    slow files with few tests (test_resume.py: 2) would start last and run alone at the end."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable
