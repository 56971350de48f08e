"""Resource limits applied to datasets and uploads, and where uploads are extracted.

Every limit is checked before work starts, so an oversized or hostile upload is refused with a
clear message instead of filling the disk or memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""File suffixes (lower case) treated as images."""

ARCHIVE_EXTENSIONS: frozenset[str] = frozenset(
    {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".7z", ".rar", ".zst", ".lz", ".lzma", ".z"}
)
"""File suffixes (lower case) of archives, which are never extracted from inside an upload."""


def cache_root() -> Path:
    """The project's cache folder: ``$ADLAB_CACHE`` when set, else ``~/.cache/adlab``."""
    env = os.environ.get("ADLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adlab"


@dataclass(frozen=True)
class Limits:
    """Limits on an upload or dataset folder.

    max_files: files in a zip (or considered in a folder).
    max_total_uncompressed_mb: sum of the uncompressed sizes of a zip's entries, in MiB.
    max_ratio: largest allowed uncompressed/compressed size ratio of one zip entry (zip-bomb guard;
        only applied to entries larger than ``ratio_min_bytes`` uncompressed, tiny files compress freely).
    max_image_pixels: width*height above which an image is refused (decompression-bomb guard).
    max_side_px: images with a longer side are accepted but downscaled at load, with a notice.
    min_side_px: images with a shorter side are refused (a 1x1 or 4x4 px file holds no texture to learn from;
        upscaling it would only invent a flat image). Masks are not checked: they must match their image.
    max_images: image files (images plus masks) in one dataset.
    extract_root: folder receiving extracted uploads; None means ``cache_root() / "uploads"``,
        resolved when used (so ``ADLAB_CACHE`` set later still applies). Use ``upload_dir()``.
    """

    max_files: int = 5000
    max_total_uncompressed_mb: float = 2048
    max_ratio: float = 200
    max_image_pixels: int = 40_000_000
    max_side_px: int = 4096
    min_side_px: int = 8
    max_images: int = 5000
    extract_root: str | None = None
    ratio_min_bytes: int = 64 * 1024

    def upload_dir(self) -> Path:
        """The folder where uploads are extracted (``extract_root`` or the default under the cache)."""
        if self.extract_root is not None:
            return Path(self.extract_root).expanduser()
        return cache_root() / "uploads"

    @property
    def max_total_uncompressed_bytes(self) -> int:
        """``max_total_uncompressed_mb`` in bytes."""
        return int(self.max_total_uncompressed_mb * 1024 * 1024)


DEFAULT_LIMITS = Limits()
