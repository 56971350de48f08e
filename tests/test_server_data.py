"""Datasets from server folders (ADLAB_DATA_ROOTS): listed and opened read-only; `..`, paths outside the roots and
symbolic links leading out of them are refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engine.api import DataValidationError
from engine.data import make_synthetic_dataset
from engine.data.roots import data_roots, list_server_datasets, open_server_dataset, server_dataset_path


@pytest.fixture()
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Two roots (one holding a dataset two levels down) and a dataset outside both."""
    a, b, outside = tmp_path / "lines", tmp_path / "shared", tmp_path / "elsewhere"
    b.mkdir()
    ds = make_synthetic_dataset(a / "line1", "brick", n_train=4, n_test_good=2, n_defect_per_type=1, size=32)
    secret = make_synthetic_dataset(outside, "grass", n_train=4, n_test_good=2, n_defect_per_type=1, size=32)
    monkeypatch.setenv("ADLAB_DATA_ROOTS", f"{a}{os.pathsep}{b}{os.pathsep}{tmp_path / 'missing'}")
    return {"a": a, "b": b, "ds": ds, "secret": secret}


def test_roots_are_resolved_and_missing_ones_dropped(roots: dict[str, Path]) -> None:
    assert data_roots() == [roots["a"].resolve(), roots["b"].resolve()]
    assert data_roots("") == []


def test_listed_and_opened_read_only(roots: dict[str, Path]) -> None:
    found = list_server_datasets()
    assert [(Path(d.root).name, d.rel) for d in found] == [("lines", "line1/brick")]
    before = sorted((p, p.stat().st_mtime_ns) for p in roots["a"].rglob("*"))
    ds = open_server_dataset(found[0].path)
    assert ds.n_train == 4 and ds.root == str(roots["ds"].resolve())
    assert open_server_dataset("line1/brick").digest == ds.digest  # relative to a root
    assert sorted((p, p.stat().st_mtime_ns) for p in roots["a"].rglob("*")) == before  # nothing written there


@pytest.mark.parametrize("path", ["line1/../../elsewhere/grass", "{a}/line1/../../elsewhere/grass", ".."])
def test_dot_dot_refused(roots: dict[str, Path], path: str) -> None:
    with pytest.raises(DataValidationError, match=r"'\.\.' is not allowed"):
        server_dataset_path(path.format(a=roots["a"]))


def test_path_outside_the_roots_refused(roots: dict[str, Path]) -> None:
    with pytest.raises(DataValidationError, match="not under a data root"):
        open_server_dataset(str(roots["secret"]))
    with pytest.raises(DataValidationError, match="does not exist"):
        server_dataset_path("nope")


def test_symlinked_folder_escape_refused_and_not_listed(roots: dict[str, Path]) -> None:
    (roots["b"] / "link").symlink_to(roots["secret"], target_is_directory=True)
    assert all("link" not in d.rel for d in list_server_datasets())
    with pytest.raises(DataValidationError, match="symbolic link"):
        open_server_dataset(str(roots["b"] / "link"))
    with pytest.raises(DataValidationError, match="symbolic link"):
        open_server_dataset("link")


def test_symlinked_file_inside_a_dataset_refused(roots: dict[str, Path]) -> None:
    victim = next((roots["ds"] / "train" / "good").iterdir())
    victim.unlink()
    victim.symlink_to(next((roots["secret"] / "train" / "good").iterdir()))
    with pytest.raises(DataValidationError) as e:
        open_server_dataset(str(roots["ds"]))
    assert [p.path for p in e.value.problems] == [str(victim)]
    assert "outside the data roots" in e.value.problems[0].message


def test_link_within_the_roots_is_fine(roots: dict[str, Path]) -> None:
    shutil.copytree(roots["ds"], roots["b"] / "copy")
    (roots["a"] / "alias").symlink_to(roots["b"] / "copy", target_is_directory=True)
    assert open_server_dataset("alias").n_train == 4


def test_no_roots_configured(monkeypatch: pytest.MonkeyPatch, roots: dict[str, Path]) -> None:
    monkeypatch.delenv("ADLAB_DATA_ROOTS")
    assert list_server_datasets() == []
    with pytest.raises(DataValidationError, match="ADLAB_DATA_ROOTS"):
        server_dataset_path(str(roots["ds"]))


def test_bad_dataset_under_a_root_gets_the_upload_errors(roots: dict[str, Path]) -> None:
    bad = roots["b"] / "bad" / "train" / "good"
    bad.mkdir(parents=True)
    (bad / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataValidationError) as e:
        open_server_dataset("bad")
    msgs = " | ".join(p.message for p in e.value.problems)
    assert "not an image file" in msgs and "no test" in msgs
