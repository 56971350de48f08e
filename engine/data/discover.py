"""Finding a dataset on disk (MVTec layout, folder layout or a .zip of either) and validating all of it.

MVTec AD layout::

    <root>/train/good/*            training images (all normal)
    <root>/test/good/*             normal test images
    <root>/test/<defect>/*         anomalous test images, defect type = folder name
    <root>/ground_truth/<defect>/<stem>_mask.png   optional masks (``<stem>.png`` also accepted)

Folder layout::

    <root>/good/*                  normal images, split 75/25 into train/test with a seed
    <root>/<defect>/*              anomalous images (test)
    <root>/ground_truth/<defect>/* or <root>/masks/<defect>/*   optional masks

Folder names are matched case-insensitively. Hidden files and ``__MACOSX`` are ignored. ``discover``
decodes every file before returning and raises DataValidationError listing every problem at once.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.api import DataValidationError, Problem
from engine.data.archive import extract_zip, is_hidden_name
from engine.data.geometry import DEFAULT_RESIZE, SizeSummary, default_side, summarize_sizes, working_shape
from engine.data.inspections import inspect_files
from engine.data.limits import DEFAULT_LIMITS, IMAGE_EXTENSIONS, Limits
from engine.data.validate import MASK_NONBINARY, MASK_ZERO_ONE, Inspection, inspect_file

LAYOUT_HELP = (
    "expected MVTec layout (train/good, test/good, test/<defect>, optional ground_truth/<defect>) "
    "or folder layout (good/ plus one folder per defect type, optional ground_truth/<defect> or masks/<defect>)"
)
_RESERVED_FOLDER = {"good", "ground_truth", "masks"}


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. label: 0 normal, 1 anomalous. defect_type: "good" or the defect folder name."""

    path: str
    label: int
    defect_type: str
    mask_path: str | None = None


@dataclass
class Dataset:
    """A validated dataset: its samples per split, defect types, content digest and non-fatal notices.

    layout: "mvtec" or "folder". digest: 32 hex chars of sha256 over (relative path, split, label, file
    sha256) of every sample and mask. warnings: human-readable notices (masks absent, images downscaled...).
    """

    root: str
    name: str
    layout: str
    train: list[Sample]
    test: list[Sample]
    defect_types: list[str]
    digest: str
    warnings: list[str] = field(default_factory=list)
    median_side: int = 0  # median of max(width, height) over the training images, in pixels
    # (width, height) of every training / test image, in split order (engine.data.geometry summarises them)
    train_sizes: list[tuple[int, int]] = field(default_factory=list)
    test_sizes: list[tuple[int, int]] = field(default_factory=list)

    def size_summary(self, split: str = "train") -> SizeSummary | None:
        """Distribution of the image sizes of a split ("train", "test" or "all"); None when unknown."""
        sizes = {"train": self.train_sizes, "test": self.test_sizes,
                 "all": self.train_sizes + self.test_sizes}[split]
        return summarize_sizes(sizes)

    def working_shape(self, image_size: int | None = None, resize: str = DEFAULT_RESIZE,
                      tile: int | None = None) -> tuple[int, int]:
        """(H, W) the images are loaded at (engine.data.geometry): `image_size` (default: 256, the images' own
        short side when smaller, or their native short side when tiling) on the short side, the long side
        following the training images' median aspect ratio with resize="keep-aspect"; square otherwise."""
        summary = self.size_summary()
        side = image_size or (self.working_size() if resize == "square" and tile is None
                              else default_side(summary, tile))
        return working_shape(summary, side, resize)

    def working_size(self, cap: int = 256) -> int:
        """Default working resolution: `cap`, or the images' own size when they are smaller (never upsample
        by default), rounded down to a multiple of 32 (the backbones' coarsest stride), at least 64."""
        side = self.median_side or cap
        return max(64, min(cap, side) // 32 * 32)

    @property
    def n_train(self) -> int:
        """Number of training images."""
        return len(self.train)

    @property
    def n_test(self) -> int:
        """Number of test images."""
        return len(self.test)

    @property
    def has_masks(self) -> bool:
        """True when at least one test image has a ground-truth mask."""
        return any(s.mask_path is not None for s in self.test)

    def split(self, name: str) -> list[Sample]:
        """The samples of split "train" or "test"."""
        if name == "train":
            return self.train
        if name == "test":
            return self.test
        raise ValueError(f"split must be 'train' or 'test', got {name!r}")


# ----------------------------------------------------------------------------------------------- helpers


def _is_hidden(name: str) -> bool:
    return is_hidden_name(name)


def _child(folder: Path, name: str) -> Path | None:
    """The sub-folder of ``folder`` called ``name`` (exact match first, then case-insensitive)."""
    exact = folder / name
    if exact.is_dir():
        return exact
    try:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.casefold() == name.casefold() and entry.is_dir():
                return Path(entry.path)
    except OSError:
        return None
    return None


def _subdirs(folder: Path) -> list[Path]:
    """Non-hidden sub-folders, sorted by name."""
    try:
        return sorted(
            (Path(e.path) for e in os.scandir(folder) if not _is_hidden(e.name) and e.is_dir()), key=lambda p: p.name
        )
    except OSError:
        return []


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def detect_layout(folder: Path) -> str | None:
    """"mvtec", "folder" or None for a folder that is not a dataset."""
    if _child(folder, "train") is not None or _child(folder, "test") is not None:
        return "mvtec"
    if _child(folder, "good") is not None:
        return "folder"
    return None


def find_categories(path: str | Path) -> list[str]:
    """Names (sorted) of the sub-folders of ``path`` that look like datasets, e.g. the categories of sample_data/."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return []
    return [d.name for d in _subdirs(p) if detect_layout(d) is not None]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _examples(paths: Iterable[str], k: int = 3) -> str:
    items = list(paths)
    shown = ", ".join(items[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "")


class _Collector:
    """Gathers problems, warnings and the planned samples while walking a dataset folder."""

    def __init__(self, root: Path, show: Callable[[Path], str], limits: Limits):
        self.root = root
        self.show = show
        self.limits = limits
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        self.ignored: list[str] = []
        self.n_files = 0

    def problem(self, path: Path, message: str, hint: str = "") -> None:
        self.problems.append(Problem(self.show(path), message, hint))

    def images_in(self, folder: Path) -> list[Path]:
        """Image files directly in ``folder`` (sorted); other files and sub-folders are noted as ignored.
        Two images with the same stem (``a.png`` and ``a.jpg``) are a problem: masks match by stem."""
        images: list[Path] = []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            self.problem(folder, f"cannot list the folder ({e.strerror or e})", "check permissions")
            return []
        for e in entries:
            if _is_hidden(e.name):
                continue
            p = Path(e.path)
            if e.is_dir():
                self.ignored.append(self.show(p) + "/")
            elif _is_image_name(e.name):
                images.append(p)
            else:
                self.ignored.append(self.show(p))
        self.n_files += len(images)
        by_stem: dict[str, Path] = {}
        unique: list[Path] = []
        for p in images:
            first = by_stem.get(p.stem)
            if first is not None:
                self.problem(p, f"two images share the name '{p.stem}' ({first.name} and {p.name})",
                             "rename or remove one; images and masks are matched by name")
                continue
            by_stem[p.stem] = p
            unique.append(p)
        return unique

    def note_loose_files(self, folder: Path) -> None:
        """Files lying directly in a folder that should only hold sub-folders are ignored, with a notice."""
        try:
            names = sorted(e.name for e in os.scandir(folder) if not _is_hidden(e.name) and not e.is_dir())
        except OSError:
            return
        self.ignored += [self.show(folder / n) for n in names]

    def mask_index(self, folders: list[Path]) -> dict[str, Path]:
        """stem of the image -> mask file, over mask folders; ``<stem>_mask.ext`` or ``<stem>.ext``."""
        index: dict[str, Path] = {}
        for folder in folders:
            for p in self.images_in(folder):
                key = p.stem[: -len("_mask")] if p.stem.endswith("_mask") else p.stem
                if key in index:
                    self.problem(p, f"two masks for image '{key}' ({index[key].name} and {p.name})", "keep one")
                    continue
                index[key] = p
        return index


@dataclass
class _Planned:
    split: str
    label: int
    defect_type: str
    path: Path
    mask: Path | None = None


def _plan_mvtec(c: _Collector) -> tuple[list[_Planned], list[Path]]:
    """Samples of an MVTec-layout folder, and every mask file found (for orphan detection)."""
    root = c.root
    planned: list[_Planned] = []
    train_dir, test_dir = _child(root, "train"), _child(root, "test")
    mask_roots = [d for d in (_child(root, "ground_truth"), _child(root, "masks")) if d is not None]
    c.note_loose_files(root)
    if train_dir is None:
        c.problem(root, "no train/ folder: no training images", "add train/good/ with normal images")
    else:
        good = _child(train_dir, "good")
        if good is None:
            c.problem(train_dir, "no train/good/ folder: no training images", "put the normal training images there")
        else:
            planned += [_Planned("train", 0, "good", p) for p in c.images_in(good)]
        for d in _subdirs(train_dir):
            if d != good:
                c.ignored.append(c.show(d) + "/")
        c.note_loose_files(train_dir)
    all_masks: list[Path] = []
    if test_dir is None:
        c.problem(root, "no test/ folder: no test images", "add test/good/ and test/<defect>/ folders")
    else:
        c.note_loose_files(test_dir)
        # normal images first, then defect folders in name order
        for d in sorted(_subdirs(test_dir), key=lambda q: (q.name.casefold() != "good", q.name)):
            if d.name.casefold() == "good":
                planned += [_Planned("test", 0, "good", p) for p in c.images_in(d)]
                continue
            planned += _defect_samples(c, d, mask_roots, all_masks)
    for r in mask_roots:
        for d in _subdirs(r):
            if test_dir is None or _child(test_dir, d.name) is None or d.name.casefold() == "good":
                c.ignored.append(c.show(d) + "/")
    return planned, all_masks


def _defect_samples(c: _Collector, folder: Path, mask_roots: list[Path], all_masks: list[Path]) -> list[_Planned]:
    """Test samples of one defect folder with their masks (from <mask root>/<defect>/); appends the masks
    found to `all_masks`."""
    masks = c.mask_index([m for m in (_child(r, folder.name) for r in mask_roots) if m is not None])
    all_masks += masks.values()
    return [_Planned("test", 1, folder.name, p, masks.get(p.stem)) for p in c.images_in(folder)]


def _split_key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}|{name}".encode("utf-8", "surrogateescape")).hexdigest()


def _plan_folder(c: _Collector, seed: int) -> tuple[list[_Planned], list[Path]]:
    """Samples of a folder-layout dataset; good images are split 75/25 (at least one test image) by ``seed``."""
    root = c.root
    planned: list[_Planned] = []
    good_dir = _child(root, "good")
    assert good_dir is not None
    c.note_loose_files(root)
    goods = c.images_in(good_dir)
    n_test = max(1, (len(goods) + 2) // 4) if len(goods) >= 2 else 0
    order = sorted(goods, key=lambda p: _split_key(seed, p.name))
    test_names = {p.name for p in order[:n_test]}
    for p in goods:
        planned.append(_Planned("test" if p.name in test_names else "train", 0, "good", p))
    mask_roots = [d for d in (_child(root, "ground_truth"), _child(root, "masks")) if d is not None]
    all_masks: list[Path] = []
    for d in _subdirs(root):
        if d.name.casefold() in _RESERVED_FOLDER:
            continue
        planned += _defect_samples(c, d, mask_roots, all_masks)
    for r in mask_roots:
        for d in _subdirs(r):
            if d.name.casefold() in _RESERVED_FOLDER or _child(root, d.name) is None:
                c.ignored.append(c.show(d) + "/")
    return planned, all_masks


def _workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def _inspect_all(paths: list[tuple[Path, bool]], limits: Limits, root: Path) -> list[Inspection]:
    """Every file read, hashed and decoded, except those unchanged since an earlier discovery (`inspections`)."""
    return inspect_files(paths, limits, root, _workers(), inspect=inspect_file)


# ---------------------------------------------------------------------------------------------- discover


def _discover_folder(root: Path, name: str, show: Callable[[Path], str], limits: Limits, seed: int) -> Dataset:
    layout = detect_layout(root)
    if layout is None:
        cats = find_categories(root)
        if cats:
            raise DataValidationError([Problem(show(root), f"this folder holds several datasets: {', '.join(cats)}",
                                               "choose one of them")])
        raise DataValidationError([Problem(show(root), "no dataset layout found", LAYOUT_HELP)])
    c = _Collector(root, show, limits)
    planned, all_masks = _plan_mvtec(c) if layout == "mvtec" else _plan_folder(c, seed)

    train = [s for s in planned if s.split == "train"]
    test = [s for s in planned if s.split == "test"]
    if layout == "mvtec":
        train_dir = _child(root, "train")
        train_good = None if train_dir is None else _child(train_dir, "good")
        if not train and train_good is not None:  # a missing train/ or train/good/ was reported already
            c.problem(train_good, "no training images (the folder is empty)", "add normal images to train/good/")
        test_dir = _child(root, "test")
        if not test and test_dir is not None:
            c.problem(test_dir, "no test images", "add test/good/ and test/<defect>/ images")
    else:
        good_dir = _child(root, "good") or root
        if not train:
            c.problem(good_dir, "no training images: good/ needs at least 2 images (75% train, 25% test)",
                      "add normal images to good/")
        if not test:
            c.problem(root, "no test images", "add defect folders next to good/")

    mask_files = sorted({s.mask for s in planned if s.mask is not None})
    n_images = len(planned) + len(mask_files)
    too_many = False
    if c.n_files > limits.max_files:
        c.problem(root, f"{c.n_files} files, more than the limit of {limits.max_files}", "use fewer files")
        too_many = True
    if n_images > limits.max_images:
        c.problem(root, f"{n_images} images and masks, more than the limit of {limits.max_images}",
                  "use fewer images or raise Limits.max_images")
        too_many = True
    if too_many:  # refuse before decoding thousands of files
        raise DataValidationError(c.problems)

    jobs = [(s.path, False) for s in planned] + [(m, True) for m in mask_files]
    results = _inspect_all(jobs, limits, root)
    info: dict[Path, Inspection] = {p: r for (p, _), r in zip(jobs, results, strict=True)}
    for (p, _), r in zip(jobs, results, strict=True):
        if r.error is not None:
            c.problem(p, r.error, r.hint)
    for s in planned:
        if s.mask is None:
            continue
        im, mk = info[s.path], info[s.mask]
        if im.size is not None and mk.size is not None and im.size != mk.size:
            c.problem(s.mask, f"mask is {mk.size[0]}x{mk.size[1]} but its image {s.path.name} is "
                      f"{im.size[0]}x{im.size[1]}", "masks must have exactly the size of their image")
    if c.problems:
        raise DataValidationError(c.problems)

    warns = _notices(c, planned, all_masks, mask_files, info, limits)
    rows = []
    for s in planned:
        rows.append((s.path.relative_to(root).as_posix(), s.split, str(s.label), info[s.path].sha256))
        if s.mask is not None:
            rows.append((s.mask.relative_to(root).as_posix(), s.split, "mask", info[s.mask].sha256))
    h = hashlib.sha256()
    for row in sorted(rows):
        h.update("\x1f".join(row).encode("utf-8", "surrogateescape") + b"\n")

    def sample(s: _Planned) -> Sample:
        return Sample(str(s.path), s.label, s.defect_type, None if s.mask is None else str(s.mask))

    return Dataset(
        root=str(root),
        name=name,
        layout=layout,
        train=[sample(s) for s in train],
        test=[sample(s) for s in test],
        defect_types=sorted({s.defect_type for s in test if s.label == 1}),
        digest=h.hexdigest()[:32],
        warnings=warns,
        median_side=int(np.median([max(info[s.path].size or (0, 0)) for s in train])) if train else 0,
        train_sizes=[info[s.path].size or (0, 0) for s in train],
        test_sizes=[info[s.path].size or (0, 0) for s in test],
    )


def _notices(c: _Collector, planned: list[_Planned], all_masks: list[Path], mask_files: list[Path],
             info: dict[Path, Inspection], limits: Limits) -> list[str]:
    """Non-fatal notices about a dataset that passed validation."""
    w: list[str] = []
    defects = [s for s in planned if s.label == 1]
    test_good = [s for s in planned if s.split == "test" and s.label == 0]
    if not defects:
        w.append("no anomalous test images: image-level metrics such as AUROC cannot be computed")
    if not test_good:
        w.append("no normal test images: image-level metrics such as AUROC cannot be computed")
    with_mask = [s for s in defects if s.mask is not None]
    if defects and not with_mask:
        w.append("no ground-truth masks: pixel-level metrics will not be available")
    elif len(with_mask) < len(defects):
        missing = [c.show(s.path) for s in defects if s.mask is None]
        w.append(f"{len(missing)} anomalous image(s) have no mask and are left out of pixel metrics: "
                 f"{_examples(missing)}")
    used = set(mask_files)
    orphans = [c.show(m) for m in all_masks if m not in used]
    if orphans:
        w.append(f"{len(orphans)} mask(s) match no image and are ignored: {_examples(orphans)}")
    empty = [c.show(m) for m in mask_files if info[m].mask_empty]
    if empty:
        w.append(f"{len(empty)} mask(s) are empty (anomalous image without defect pixels): {_examples(empty)}")
    zero_one = [c.show(m) for m in mask_files if info[m].mask_note == MASK_ZERO_ONE]
    if zero_one:
        w.append(f"{len(zero_one)} mask(s) use values 0/1 (read as 1 = defect): {_examples(zero_one)}")
    nonbin = [c.show(m) for m in mask_files if info[m].mask_note == MASK_NONBINARY]
    if nonbin:
        w.append(f"{len(nonbin)} mask(s) are not pure 0/255 and were binarised at >127: {_examples(nonbin)}")
    big = [c.show(s.path) for s in planned if max(info[s.path].size or (0, 0)) > limits.max_side_px]
    if big:
        w.append(f"{len(big)} image(s) are larger than {limits.max_side_px} px on a side and are downscaled "
                 f"at load: {_examples(big)}")
    train_sha = {info[s.path].sha256 for s in planned if s.split == "train"}
    leaked = [c.show(s.path) for s in planned if s.split == "test" and info[s.path].sha256 in train_sha]
    if leaked:
        w.append(f"{len(leaked)} test image(s) are byte-identical to a training image: {_examples(leaked)}")
    if c.ignored:
        w.append(f"{len(c.ignored)} file(s)/folder(s) outside the layout were ignored: {_examples(c.ignored)}")
    return w


def _zip_dataset_root(top: Path, show: Callable[[Path], str]) -> Path:
    """The dataset folder inside an extracted zip: the top itself, or found by following single top-level
    folders (``cat/``, ``x/y/``), or the only dataset-like sub-folder."""
    here = top
    for _ in range(4):
        if detect_layout(here) is not None:
            return here
        dirs = _subdirs(here)
        files = [e.name for e in os.scandir(here) if not _is_hidden(e.name) and e.is_file()]
        if len(dirs) != 1 or any(_is_image_name(f) for f in files):
            break
        here = dirs[0]
    cats = find_categories(here)
    if len(cats) == 1:
        return here / cats[0]
    if cats:
        raise DataValidationError([Problem(show(here), f"the zip holds several datasets: {', '.join(cats)}",
                                           "upload one category per zip")])
    raise DataValidationError([Problem(show(top), "no dataset layout found in the zip", LAYOUT_HELP)])


def discover(path: str | Path, *, limits: Limits = DEFAULT_LIMITS, seed: int = 0) -> Dataset:
    """Find and fully validate the dataset at ``path`` (a folder in MVTec or folder layout, or a .zip of either).

    A zip is extracted safely (extract_zip) into ``limits.upload_dir() / <zip sha256[:32]>`` and reused when
    already there. ``seed`` decides the train/test split of good images in folder layout.
    Raises DataValidationError listing every problem found.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataValidationError([Problem(str(p), "does not exist", "give a dataset folder or a .zip")])
    p = p.resolve()
    if p.is_file():
        if p.suffix.lower() != ".zip" and not zipfile.is_zipfile(p):
            raise DataValidationError([Problem(str(p), "not a folder or a .zip file", LAYOUT_HELP)])
        dest = limits.upload_dir() / _file_sha256(p)[:32]
        if not dest.is_dir():
            try:
                extract_zip(p, dest, limits)
            except FileExistsError:
                pass

        def show_zip(q: Path) -> str:
            try:
                rel = q.relative_to(dest).as_posix()
            except ValueError:
                return str(q)
            return p.name if rel == "." else f"{p.name}:{rel}"

        root = _zip_dataset_root(dest, show_zip)
        return _discover_folder(root, root.name if root != dest else p.stem, show_zip, limits, seed)
    return _discover_folder(p, p.name, str, limits, seed)
