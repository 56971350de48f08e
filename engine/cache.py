"""Content-addressed disk cache for features, fitted models and predictions (DESIGN §8).

Layout: <root>/<kind>/<key[:2]>/<key>/ holding files. An entry is a directory that appears
atomically (written under a temporary name, then renamed into place), so readers never see a
half-written entry; a process killed mid-write leaves only a `.tmp-*` directory, which is
ignored and swept. A corrupt entry (unreadable file) is deleted and recomputed, never trusted.
Concurrent writers of the same key: the first rename wins, the others drop their copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from engine import __version__

ENGINE_VERSION = __version__


def default_root() -> Path:
    """$ADLAB_CACHE, else ~/.cache/adlab."""
    return Path(os.environ.get("ADLAB_CACHE") or Path.home() / ".cache" / "adlab")


def make_key(*parts: Any) -> str:
    """A stable hex key from JSON-able parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:40]



def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

class Cache:
    """Disk cache rooted at `root`. Entries are directories addressed by (kind, key)."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else default_root()
        self.enabled = enabled

    def entry_dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / key

    def has(self, kind: str, key: str) -> bool:
        return self.enabled and (self.entry_dir(kind, key) / "_complete").is_file()

    @contextlib.contextmanager
    def writing(self, kind: str, key: str) -> Iterator[Path | None]:
        """Yield a temporary directory to fill; on success it is renamed into place atomically.

        Yields None when the cache is disabled (the caller should then skip writing).
        """
        if not self.enabled:
            yield None
            return
        final = self.entry_dir(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            yield tmp
            (tmp / "_complete").write_text(str(time.time()))
            try:
                os.rename(tmp, final)
            except OSError:
                # Someone else finished first (or a stale incomplete entry sits there).
                if (final / "_complete").is_file():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def invalidate(self, kind: str, key: str) -> None:
        shutil.rmtree(self.entry_dir(kind, key), ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Inter-process lock for one key (so two sessions computing the same entry do it once)."""
        if not self.enabled:
            yield
            return
        d = self.root / "_locks"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{kind}-{key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- tensors + json in one entry -------------------------------------------------------
    def load(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, meta) of a complete entry, or None if missing or corrupt (corrupt ones are removed)."""
        if not self.has(kind, key):
            return None
        d = self.entry_dir(kind, key)
        try:
            tensors = load_tensors(d / "tensors.safetensors") if (d / "tensors.safetensors").exists() else {}
            meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
            return tensors, meta
        except Exception:
            self.invalidate(kind, key)
            return None

    def store(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        with self.writing(kind, key) as tmp:
            if tmp is None:
                return
            if tensors:
                save_tensors(tensors, tmp / "tensors.safetensors")
            (tmp / "meta.json").write_text(json.dumps(meta or {}, default=str))

    def get_or_compute(
        self, kind: str, key: str, compute: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
        """Load (kind, key) or compute and store it under a lock. Returns (tensors, meta, was_cached)."""
        hit = self.load(kind, key)
        if hit is not None:
            return hit[0], hit[1], True
        with self.lock(kind, key):
            hit = self.load(kind, key)  # another process may have written it while we waited
            if hit is not None:
                return hit[0], hit[1], True
            tensors, meta = compute()
            self.store(kind, key, tensors, meta)
            return tensors, meta, False

    def sweep_temporaries(self, older_than_s: float = 3600.0) -> int:
        """Remove what killed writers left behind, once older than `older_than_s` (a live writer's are newer):
        `.tmp-*` entry directories (and the dashboard's `.tmp-*` files), and half-extracted uploads
        (`uploads/.<name>.partial-*`, `uploads/incoming/*/.tmp-*`). Returns how many were removed.
        Called once per process by `default_cache()`."""
        n = 0
        if not self.root.exists():
            return 0
        now = time.time()
        for pattern in ("*/*/.tmp-*", "uploads/.*.partial-*", "uploads/incoming/*/.tmp-*"):
            for p in self.root.glob(pattern):
                with contextlib.suppress(OSError):
                    if now - p.lstat().st_mtime > older_than_s:
                        if p.is_dir() and not p.is_symlink():
                            shutil.rmtree(p)
                        else:
                            p.unlink()
                        n += 1
        return n


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Plain tensors to safetensors (contiguous CPU copies)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


_default: Cache | None = None


def default_cache() -> Cache:
    """The process-wide cache (re-created when ADLAB_CACHE changes; stale temporaries are swept then)."""
    global _default
    root = default_root()
    if _default is None or _default.root != root:
        _default = Cache(root)
        with contextlib.suppress(OSError):
            _default.sweep_temporaries()  # leftovers of processes killed mid-write (older than an hour)
    return _default
