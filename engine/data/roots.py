"""Datasets already on the server: folders under the roots listed in ``ADLAB_DATA_ROOTS`` (``/data/lines:/mnt/x``).

Teams' datasets are often larger than an upload may be; these are opened in place, read-only (nothing is ever
written there: features, models and results go to the cache). Only folders under a root are opened: a path with
``..`` is refused, every path is resolved (symbolic links followed) and must stay under a root, and so must every
image and mask file of the dataset, so a link cannot reach files elsewhere on the server. The dataset is then
validated like an upload (``discover`` with the same Limits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.api import DataValidationError, Problem
from engine.data.archive import is_hidden_name
from engine.data.discover import Dataset, detect_layout, discover
from engine.data.limits import DEFAULT_LIMITS, Limits

ENV = "ADLAB_DATA_ROOTS"


@dataclass(frozen=True)
class ServerDataset:
    """A dataset folder found under a root. path: resolved; root: the resolved root; rel: path below the root."""

    root: str
    rel: str
    path: str

    @property
    def label(self) -> str:
        """How the Data page names it: ``<root name> › <relative path>``."""
        return f"{Path(self.root).name or self.root} › {self.rel}"


def data_roots(value: str | None = None) -> list[Path]:
    """The configured roots (``value``, else ``$ADLAB_DATA_ROOTS``), resolved, existing folders only, no repeats."""
    raw = os.environ.get(ENV, "") if value is None else value
    roots: list[Path] = []
    for part in raw.split(os.pathsep):
        if not part.strip():
            continue
        p = Path(part.strip()).expanduser()
        try:
            r = p.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if r.is_dir() and r not in roots:
            roots.append(r)
    return roots


def _raw_roots() -> list[Path]:
    """The roots as written in $ADLAB_DATA_ROOTS (not resolved), to tell a link escape from a foreign path."""
    return [Path(os.path.abspath(Path(p.strip()).expanduser())) for p in os.environ.get(ENV, "").split(os.pathsep)
            if p.strip()]


def _root_of(resolved: Path, roots: list[Path]) -> Path | None:
    return next((r for r in roots if resolved == r or resolved.is_relative_to(r)), None)


def list_server_datasets(roots: list[Path] | None = None, *, max_depth: int = 3,
                         limit: int = 500) -> list[ServerDataset]:
    """Dataset folders (MVTec or folder layout) up to ``max_depth`` levels under each root, sorted; folders whose
    resolved path leaves the roots (symbolic links) are skipped. At most ``limit`` are returned."""
    roots = data_roots() if roots is None else roots
    found: list[ServerDataset] = []
    for root in roots:
        stack = [(root, 0)]
        while stack and len(found) < limit:
            here, depth = stack.pop()
            try:
                entries = sorted((e for e in os.scandir(here) if e.is_dir() and not is_hidden_name(e.name)),
                                 key=lambda e: e.name, reverse=True)
            except OSError:
                continue
            for e in entries:
                try:
                    resolved = Path(e.path).resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if _root_of(resolved, roots) is None:
                    continue
                if detect_layout(Path(e.path)) is not None:
                    found.append(ServerDataset(str(root), Path(e.path).relative_to(root).as_posix(), str(resolved)))
                elif depth + 1 < max_depth and not e.is_symlink():
                    stack.append((Path(e.path), depth + 1))
    return sorted(found, key=lambda d: (d.root, d.rel))[:limit]


def server_dataset_path(path: str | Path, roots: list[Path] | None = None) -> Path:
    """The resolved folder of ``path`` (absolute, or relative to a root) when it lies under a root.

    Raises DataValidationError: no roots configured, ``..`` in the path, not under a root (also after following
    symbolic links), not a folder.
    """
    roots = data_roots() if roots is None else roots
    shown = str(path)
    if not roots:
        raise DataValidationError([Problem(shown, "no server data folders are configured",
                                           f"set {ENV}=/data/lines:/mnt/shared before starting adlab")])
    p = Path(path).expanduser()
    if ".." in p.parts:
        raise DataValidationError([Problem(shown, "'..' is not allowed in a server folder path",
                                           "give the dataset folder itself, under one of the data roots")])
    candidates = [p] if p.is_absolute() else [r / p for r in roots]
    existing = [c for c in candidates if c.exists()]
    if not existing:
        raise DataValidationError([Problem(shown, "does not exist under the data roots",
                                           f"choose a folder under {', '.join(map(str, roots))}")])
    resolved = existing[0].resolve()
    if _root_of(resolved, roots) is None:
        lexical = Path(os.path.abspath(existing[0]))
        if _root_of(lexical, roots) is not None or _root_of(lexical, _raw_roots()) is not None:
            raise DataValidationError([Problem(shown, f"leads outside the data roots (a symbolic link to {resolved})",
                                               "open datasets that lie under a data root")])
        raise DataValidationError([Problem(shown, "is not under a data root",
                                           f"only folders under {', '.join(map(str, roots))} can be opened")])
    if not resolved.is_dir():
        raise DataValidationError([Problem(shown, "is a file, not a dataset folder", "choose the dataset folder")])
    return resolved


def check_files_under_roots(ds: Dataset, roots: list[Path]) -> None:
    """Raise DataValidationError listing every image or mask of ``ds`` whose real path leaves the roots."""
    problems = []
    for s in [*ds.train, *ds.test]:
        for f in (s.path, s.mask_path):
            if f is not None and _root_of(Path(f).resolve(), roots) is None:
                problems.append(Problem(f, f"is a symbolic link to {Path(f).resolve()}, outside the data roots",
                                        "copy the file into the dataset folder instead of linking to it"))
    if problems:
        raise DataValidationError(problems)


def open_server_dataset(path: str | Path, roots: list[Path] | None = None, *,
                        limits: Limits = DEFAULT_LIMITS) -> Dataset:
    """Resolve, check and validate a dataset under the data roots (like an upload); read-only."""
    roots = data_roots() if roots is None else roots
    folder = server_dataset_path(path, roots)
    ds = discover(folder, limits=limits)
    check_files_under_roots(ds, roots)
    return ds
