"""Loose images to score (`adlab predict`, the dashboard's Try page): files, folders or a .zip of images.

Every file is checked like a dataset's files (``inspect_file``: unreadable, not an image, corrupt, too small, too
large) and every problem is reported at once in one DataValidationError. A zip is extracted with the same safety
checks as a dataset upload (``extract_zip``).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.api import DataValidationError, Problem
from engine.data.archive import extract_zip, is_hidden_name
from engine.data.limits import DEFAULT_LIMITS, IMAGE_EXTENSIONS, Limits
from engine.data.validate import inspect_file


@dataclass(frozen=True)
class InputImage:
    """One image to score: the file to read and the name to report (``archive.zip:inner/path`` inside a zip)."""

    path: str
    name: str


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted by relative path."""
    found: list[Path] = []
    for here, dirs, files in os.walk(folder):
        rel = Path(here).relative_to(folder).as_posix()
        if rel != "." and is_hidden_name(rel):
            dirs[:] = []
            continue
        dirs.sort()
        found += [Path(here) / f for f in sorted(files)
                  if not is_hidden_name(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _is_zip(p: Path) -> bool:
    return p.suffix.lower() == ".zip" or (p.suffix.lower() not in IMAGE_EXTENSIONS and zipfile.is_zipfile(p))


def collect_images(inputs: list[str | Path], limits: Limits = DEFAULT_LIMITS) -> list[InputImage]:
    """Expand files, folders and zips into the images to score, every one checked. Raises DataValidationError
    listing every problem (a missing path, a non-image file, a folder without images, a bad zip, a bad image)."""
    problems: list[Problem] = []
    found: list[InputImage] = []
    if not inputs:
        raise DataValidationError([Problem("(no input)", "no images given", "give image files, a folder or a .zip")])
    for raw in inputs:
        p = Path(raw).expanduser()
        shown = str(raw)
        if not p.exists():
            problems.append(Problem(shown, "does not exist", "give image files, a folder of images or a .zip"))
        elif p.is_dir():
            imgs = _images_under(p)
            if not imgs:
                problems.append(Problem(shown, "no image files in this folder (PNG, JPEG, BMP, TIFF)",
                                        "point at the folder that holds the images"))
            found += [InputImage(str(q), str(Path(shown) / q.relative_to(p))) for q in imgs]
        elif _is_zip(p):
            with open(p, "rb") as fh:
                sha = hashlib.file_digest(fh, "sha256").hexdigest()[:32]
            dest = limits.upload_dir() / "images" / sha
            try:
                if not dest.is_dir():
                    extract_zip(p, dest, limits)
            except FileExistsError:
                pass
            except DataValidationError as e:
                problems += e.problems
                continue
            imgs = _images_under(dest)
            if not imgs:
                problems.append(Problem(shown, "no image files in the zip", "zip the images to score"))
            found += [InputImage(str(q), f"{shown}:{q.relative_to(dest).as_posix()}") for q in imgs]
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(InputImage(str(p), shown))
        else:
            problems.append(Problem(shown, f"not an image file (extension {p.suffix or 'none'!r})",
                                    "give PNG, JPEG, BMP or TIFF images, a folder or a .zip"))
    if len(found) > limits.max_images:
        problems.append(Problem(", ".join(map(str, inputs))[:200], f"{len(found)} images, more than the limit of "
                                f"{limits.max_images}", "score fewer images at a time"))
        raise DataValidationError(problems)
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        checks = list(pool.map(lambda im: inspect_file(im.path, limits), found))
    problems += [Problem(im.name, c.error, c.hint) for im, c in zip(found, checks, strict=True) if c.error]
    if problems:
        raise DataValidationError(problems)
    return found
