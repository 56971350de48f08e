"""Kept inspections: discovering an unchanged dataset again reads no file; a changed, recent or bad file is read."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from engine.api import DataValidationError
from engine.data import Limits, discover
from engine.data import inspections as ins
from engine.data.validate import inspect_file
from tests.test_data import make_mvtec, png


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The files discovery inspects (decodes), in a cache of this test's own; files count as settled at once."""
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ins, "RACY_S", 0.0)
    seen: list[str] = []

    def counting(path: Path, limits: Limits, *, mask: bool = False):  # type: ignore[no-untyped-def]
        seen.append(Path(path).name)
        return inspect_file(path, limits, mask=mask)

    monkeypatch.setattr(sys.modules["engine.data.discover"], "inspect_file", counting)
    return seen


def test_an_unchanged_dataset_is_not_read_again(tmp_path: Path, reads: list[str]) -> None:
    root = make_mvtec(tmp_path / "ds")
    first = discover(root)
    n_files = len(first.train) + len(first.test) + sum(s.mask_path is not None for s in first.test)
    assert len(reads) == n_files
    reads.clear()
    again = discover(root)
    assert reads == [] and again == first  # the same dataset, digest and sizes included, from the kept inspections
    other_limits = discover(root, limits=Limits(max_images=12345))
    assert len(reads) == n_files and other_limits.digest == first.digest  # checked under other limits: read


def test_a_changed_file_is_read_again_and_changes_the_digest(tmp_path: Path, reads: list[str]) -> None:
    root = make_mvtec(tmp_path / "ds")
    first = discover(root)
    reads.clear()
    target = root / "test/good/001.png"
    png(target, value=(1, 2, 3))  # new content
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a clock that ticked (coarse clocks may not)
    again = discover(root)
    assert reads == ["001.png"] and again.digest != first.digest


def test_a_file_changed_in_place_to_garbage_is_reported(tmp_path: Path, reads: list[str]) -> None:
    root = make_mvtec(tmp_path / "ds")
    discover(root)
    target = root / "train/good/000.png"
    size = target.stat().st_size
    st = os.stat(target)
    target.write_bytes(b"\0" * size)  # same size, same inode
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataValidationError, match="000.png"):
        discover(root)


def test_recent_and_bad_files_are_not_kept(tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_mvtec(tmp_path / "ds")
    (root / "train/good/bad.png").write_bytes(b"not an image")
    for _ in range(2):  # a bad file is read, and reported, every time; the good ones are kept
        reads.clear()
        with pytest.raises(DataValidationError, match="bad.png"):
            discover(root)
        assert reads == ["bad.png"] or len(reads) > 1
    assert reads == ["bad.png"]
    monkeypatch.setattr(ins, "RACY_S", 3600.0)  # every file changed "just now": none is kept
    fresh = make_mvtec(tmp_path / "fresh")
    reads.clear()
    discover(fresh)
    n = len(reads)
    reads.clear()
    discover(fresh)
    assert len(reads) == n > 0  # every file read again


def test_an_unreadable_store_is_ignored(tmp_path: Path, reads: list[str]) -> None:
    root = make_mvtec(tmp_path / "ds")
    first = discover(root)
    stores = list((tmp_path / "cache" / "inspections").glob("*.json"))
    assert len(stores) == 1
    stores[0].write_text("{not json")
    reads.clear()
    assert discover(root) == first and len(reads) > 0  # read again, and the store rewritten
    reads.clear()
    discover(root)
    assert reads == []
    stores[0].write_text('{"format": 1, "files": {"image:/x": {"id": "nonsense"}}}')
    assert discover(root) == first
