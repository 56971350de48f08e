"""What discovery learnt about each file, kept on disk, so that discovering an unchanged dataset again reads no image.

`discover` reads, hashes and fully decodes every file, so that a bad one is reported before anything runs. One
comparison discovers the same folder several times (the caller, then each worker process; a sweep once per unit),
and one discovery of magnetic_tile (1344 images and their masks) takes about 5 s on 2 cores. A clean inspection is
reused when nothing about the file has changed: its resolved path, size, inode, modification and change times
(ns), and the role (image or mask) and limits it was checked under. Writing to a file sets its change time to
now, which no user tool can set back; and, as git does with its index, a file changed less than `RACY_S` before
it was inspected is not kept (the clock's tick could hide a second write in the same instant). A file that failed
its inspection is never kept: it is read again, and reported afresh, every time.

Stored as one JSON file per (dataset folder, limits) under <cache root>/inspections/, written whole (temporary
file, then rename) when a discovery kept something new; an unreadable or foreign file there is ignored and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.cache import atomic_write
from engine.data.limits import Limits, cache_root
from engine.data.validate import Inspection, inspect_file

RACY_S = 2.0  # a file changed this recently when it was inspected is inspected again next time
_FORMAT = 1


def _identity(path: Path) -> list[int] | None:
    """[size, inode, device, mtime ns, ctime ns] of the file `path` resolves to; None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]


def _store_path(root: Path, limits: Limits) -> Path:
    blob = json.dumps([str(root.resolve()), dataclasses.asdict(limits)], sort_keys=True, default=str)
    return cache_root() / "inspections" / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"


def _load(store: Path) -> dict[str, Any]:
    try:
        doc = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or not isinstance(doc.get("files"), dict):
        return {}
    return doc["files"]


def _entry_key(path: Path, mask: bool) -> str:
    return f"{'mask' if mask else 'image'}:{path.resolve()}"


def _from_entry(e: Any) -> Inspection | None:
    try:
        size = e["size"]
        return Inspection(str(e["sha256"]), size=None if size is None else (int(size[0]), int(size[1])),
                          mode=str(e["mode"]), mask_note=e["mask_note"], mask_empty=bool(e["mask_empty"]))
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def _to_entry(ident: list[int], r: Inspection) -> dict[str, Any]:
    return {"id": ident, "sha256": r.sha256, "size": None if r.size is None else list(r.size), "mode": r.mode,
            "mask_note": r.mask_note, "mask_empty": r.mask_empty}


def inspect_files(paths: list[tuple[Path, bool]], limits: Limits, root: Path, workers: int,
                  inspect: Callable[..., Inspection] = inspect_file) -> list[Inspection]:
    """`inspect(path, limits, mask=...)` for every (path, is_mask) of the dataset folder `root`, in order, reusing
    the kept inspection of each file that has not changed since; keeps the new clean ones. Never raises for the
    store (a cache folder that cannot be written only means the next discovery reads the files again)."""
    store = _store_path(root, limits)
    kept = _load(store)
    out: list[Inspection | None] = [None] * len(paths)
    idents = [_identity(p) for p, _ in paths]
    todo = []
    for i, ((p, mask), ident) in enumerate(zip(paths, idents, strict=True)):
        e = kept.get(_entry_key(p, mask))
        if ident is not None and isinstance(e, dict) and e.get("id") == ident:
            out[i] = _from_entry(e)
        if out[i] is None:
            todo.append(i)
    if todo:
        started_ns = time.time_ns()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            fresh = list(pool.map(lambda i: inspect(paths[i][0], limits, mask=paths[i][1]), todo))
        settled_before = started_ns - int(RACY_S * 1e9)
        added = 0
        for i, r in zip(todo, fresh, strict=True):
            out[i] = r
            ident = idents[i]
            if r.error is None and ident is not None and max(ident[3], ident[4]) < settled_before:
                kept[_entry_key(*paths[i])] = _to_entry(ident, r)
                added += 1
        if added:  # nothing is written for e.g. a folder just extracted from an upload: nothing settled yet
            _write(store, kept)
    return out  # type: ignore[return-value]


def _write(store: Path, kept: dict[str, Any]) -> None:
    """The store, whole; a cache folder that cannot be written is left as it is."""
    try:
        atomic_write(store, json.dumps({"format": _FORMAT, "files": kept}).encode())
    except OSError:
        pass
