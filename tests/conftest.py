"""Shared fixtures: an isolated cache, the sample data as ImageSets at a small size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test session writes its cache to a fresh temporary folder, never to ~/.cache."""
    os.environ["ADLAB_CACHE"] = str(tmp_path_factory.mktemp("adlab-cache"))


@pytest.fixture(scope="session")
def sample_brick():
    """(train, test) ImageSets of the committed sample 'brick' category at 128 px."""
    from engine.data import discover, load_split

    ds = discover(SAMPLE / "brick")
    return load_split(ds, "train", 128), load_split(ds, "test", 128)
