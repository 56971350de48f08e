"""Data: the bundled sample, uploads, server folders; dataset facts, counts and thumbnails for the Data page."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dashboard.services.common import MAX_UPLOAD_MB, SAMPLE_ROOT, UPLOAD_LIMITS, UserError, _user_error
from engine.cache import atomic_write
from engine.data import Dataset, discover, find_categories, geometry, load_split
from engine.data import roots as data_roots


@dataclass(frozen=True)
class DataInfo:
    """What the pages show about a dataset."""

    path: str
    name: str
    digest: str
    layout: str
    n_train: int
    n_test: int
    defect_types: list[str]
    warnings: list[str]
    has_masks: bool
    is_sample: bool
    working_size: int = 256  # the engine's default (short) side for this dataset (never upsampling)
    is_server: bool = False  # opened in place from a server folder under ADLAB_DATA_ROOTS (read-only)
    size_advice: str = ""  # the images' sizes and the suggested setting (engine.data.geometry.suggestion)
    square: bool = True  # the training images' median aspect ratio is 1
    native_side: int = 256  # the short side the engine tiles at (the images' own, a multiple of 32)


def sample_categories() -> list[str]:
    """Categories of the bundled sample data (e.g. brick, grass, gravel)."""
    return find_categories(SAMPLE_ROOT)


def sample_path(category: str) -> str:
    """Folder of a sample category."""
    return str(SAMPLE_ROOT / category)


def default_dataset_path() -> str:
    """The dataset the app opens on: the first sample category."""
    cats = sample_categories()
    if not cats:
        raise UserError(f"no sample data found in {SAMPLE_ROOT}; run `adlab sample-data sample_data`")
    return sample_path(cats[0])


_ds_lock = threading.Lock()
_ds_memo: dict[str, Dataset] = {}


def _dataset(path: str) -> Dataset:
    """The validated Dataset at `path`, memoised per process (datasets on disk are treated as read-only)."""
    with _ds_lock:
        if path in _ds_memo:
            return _ds_memo[path]
    try:
        ds = discover(path, limits=UPLOAD_LIMITS)
        roots = data_roots.data_roots()
        if _under_server_root(path, roots):  # no file of a server dataset may lead outside the roots
            data_roots.check_files_under_roots(ds, roots)
    except Exception as e:  # noqa: BLE001 - every engine error becomes a message
        raise _user_error(e) from None
    with _ds_lock:
        _ds_memo[path] = ds
    return ds


def _under_server_root(path: str, roots: list[Path]) -> bool:
    p = Path(path).resolve()
    return any(p == r or p.is_relative_to(r) for r in roots)


def _info(path: str, ds: Dataset) -> DataInfo:
    summary = ds.size_summary()
    return DataInfo(path=path, name=ds.name, digest=ds.digest, layout=ds.layout, n_train=ds.n_train,
                    n_test=ds.n_test, defect_types=list(ds.defect_types), warnings=list(ds.warnings),
                    has_masks=ds.has_masks, is_sample=Path(path).resolve().parent == SAMPLE_ROOT.resolve(),
                    working_size=min(ds.working_shape()), is_server=_under_server_root(path, data_roots.data_roots()),
                    size_advice=geometry.suggestion(summary), square=summary is None or summary.square,
                    native_side=geometry.default_side(summary, tile=geometry.DEFAULT_SIDE))


def image_sizes(path: str) -> dict[str, list[int] | list[str]]:
    """The (width, height) of every image as columns for the Data page's size plot: {"width", "height", "split"}."""
    ds = _dataset(path)
    rows = [(w, h, "train") for w, h in ds.train_sizes] + [(w, h, "test") for w, h in ds.test_sizes]
    return {"width": [r[0] for r in rows], "height": [r[1] for r in rows], "split": [r[2] for r in rows]}


def working_shape(path: str, image_size: int | None, resize: str, tile: int | None) -> tuple[int, int]:
    """(H, W) the engine loads this dataset's images at for these options (engine Dataset.working_shape)."""
    try:
        return _dataset(path).working_shape(image_size, resize, tile)
    except ValueError as e:
        raise UserError(str(e)) from None


def dataset_info(path: str) -> DataInfo:
    """Validate and describe the dataset at `path` (raises DataProblems / UserError)."""
    return _info(path, _dataset(path))


def upload_limits_text() -> str:
    """The limits of an upload, in words, for the Data page."""
    lim = UPLOAD_LIMITS
    return (f"A .zip of at most {MAX_UPLOAD_MB} MB, up to {lim.max_files} files and "
            f"{lim.max_total_uncompressed_mb:.0f} MB unpacked; images up to {lim.max_side_px} px a side are kept "
            "as they are, larger ones are downscaled.")


def save_upload(filename: str, data: bytes) -> DataInfo:
    """Store an uploaded zip under the cache, extract it safely and validate it. Returns its DataInfo.

    Raises DataProblems listing every problem (the zip is then deleted), or UserError. Nothing else changes.
    """
    if not filename.lower().endswith(".zip"):
        raise UserError(f"{filename}: please upload a .zip file (MVTec or folder layout inside)")
    if len(data) > MAX_UPLOAD_MB * 2**20:
        raise UserError(f"{filename}: {len(data) / 2**20:.0f} MB is over the {MAX_UPLOAD_MB} MB upload limit")
    sha = hashlib.sha256(data).hexdigest()[:32]
    folder = UPLOAD_LIMITS.upload_dir() / "incoming" / sha
    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(filename).stem)[:80] or "upload"
    target = folder / f"{stem}.zip"
    if not target.exists():
        atomic_write(target, data)
    try:
        return dataset_info(str(target))
    except UserError:
        target.unlink(missing_ok=True)
        raise


def server_roots() -> list[str]:
    """The server folders datasets can be opened from ($ADLAB_DATA_ROOTS, existing ones, resolved)."""
    return [str(r) for r in data_roots.data_roots()]


def server_datasets() -> list[dict[str, str]]:
    """Dataset folders under the server roots: {"path", "label"} (label: root name › relative path)."""
    return [{"path": d.path, "label": d.label} for d in data_roots.list_server_datasets()]


def open_server_dataset(path: str) -> DataInfo:
    """Check that `path` (absolute, or relative to a root) is a folder under a server root, no '..', no symbolic
    link leading out, then validate it like an upload. Raises DataProblems; nothing is written there."""
    try:
        folder = data_roots.server_dataset_path(path)
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None
    return dataset_info(str(folder))


def counts_table(path: str) -> pd.DataFrame:
    """Images per split and defect type, with how many have a mask."""
    ds = _dataset(path)
    rows: dict[tuple[str, str], list[int]] = {}
    for split, samples in (("train", ds.train), ("test", ds.test)):
        for s in samples:
            r = rows.setdefault((split, s.defect_type), [0, 0])
            r[0] += 1
            r[1] += int(s.mask_path is not None)
    return pd.DataFrame([{"split": k[0], "type": k[1], "images": v[0], "with mask": v[1]} for k, v in rows.items()])


def thumbnails(path: str, per_type: int = 4, size: int = 128) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(caption, image (H,W,3) uint8, mask (H,W) or None) for a few test images of every type, good first; the
    long side `size`, the short side in the images' (median) aspect ratio, as the engine keeps it."""
    from dashboard.views.images import to_rgb_uint8

    ds = _dataset(path)
    picks: list[int] = []
    for t in ["good", *ds.defect_types]:
        picks += [i for i, s in enumerate(ds.test) if s.defect_type == t][:per_type]
    h, w = ds.working_shape(size)
    shape = (max(8, round(h * size / max(h, w))), max(8, round(w * size / max(h, w))))
    try:
        imgs = load_split(ds, "test", shape, indices=picks)
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None
    out = []
    for j, i in enumerate(picks):
        s = ds.test[i]
        mask = imgs.masks[j].numpy() if imgs.masks is not None and bool(imgs.has_mask[j]) else None
        out.append((f"{s.defect_type} · {Path(s.path).name}", to_rgb_uint8(imgs.images[j].numpy()), mask))
    return out
