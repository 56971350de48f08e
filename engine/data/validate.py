"""Checking single image and mask files, and converting them to arrays.

``inspect_file`` fully decodes a file (so truncated or corrupt files are caught before anything runs),
measures it against the Limits and returns its content hash. ``image_to_rgb`` and ``mask_to_binary``
convert any PIL mode to the project's arrays:
    image_to_rgb   -> (H, W, 3) uint8 RGB
    mask_to_binary -> (H, W) bool, True = defect pixel
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.data.limits import Limits

# Our own Limits.max_image_pixels decides what is too large; PIL's warning would only add noise.
# PIL's hard DecompressionBombError (above twice its own limit) is caught and reported as "too large".
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

MASK_OK = None
MASK_ZERO_ONE = "zero_one"  # values {0, 1}: 1 means defect
MASK_NONBINARY = "nonbinary"  # other values: binarised at > 127 (8-bit) or > 32767 (16-bit)


@dataclass(frozen=True)
class Inspection:
    """The result of checking one file.

    sha256: hex digest of the file bytes ("" when unreadable). size: (width, height) or None.
    error / hint: set when the file is unusable. mask_note: for masks, MASK_ZERO_ONE / MASK_NONBINARY or None.
    """

    sha256: str
    size: tuple[int, int] | None = None
    mode: str = ""
    error: str | None = None
    hint: str = ""
    mask_note: str | None = None
    mask_empty: bool = False


def open_image(data: bytes | Path, limits: Limits) -> Image.Image:
    """Open (lazily) an image from bytes or a path, refusing it if larger than ``limits.max_image_pixels``.

    Raises ValueError("too large ...") for oversized images, other PIL exceptions for unreadable ones.
    """
    src = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        im = Image.open(src)
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large: {e}") from None
    w, h = im.size
    if w * h > limits.max_image_pixels:
        raise ValueError(
            f"too large: {w}x{h} = {w * h:,} pixels, above the limit of {limits.max_image_pixels:,} "
            "(decompression-bomb protection)"
        )
    return im


def inspect_file(path: str | Path, limits: Limits, *, mask: bool = False) -> Inspection:
    """Read, hash and fully decode one image or mask file. Never raises for bad content."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Inspection("", error=f"cannot read the file ({e.strerror or e})", hint="check permissions")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return Inspection(digest, error="empty file (0 bytes)", hint="replace it with a valid image")
    try:
        im = open_image(data, limits)
    except ValueError as e:
        if str(e).startswith("too large"):
            return Inspection(digest, error=f"image {e}", hint="downscale it or raise Limits.max_image_pixels")
        return Inspection(digest, error=f"not a readable image ({e})", hint="replace it with a valid image")
    except UnidentifiedImageError:
        return Inspection(
            digest, error="not an image file (its content is not a known image format)",
            hint="remove it or replace it with a PNG/JPEG/BMP/TIFF image",
        )
    except Exception as e:  # PIL raises many types on malformed headers (SyntaxError, struct.error, ...)
        return Inspection(digest, error=f"not a readable image ({type(e).__name__}: {e})", hint="replace it")
    try:
        with im:
            im.load()
            note, empty = None, False
            if mask:
                binary, note = mask_to_binary(im)
                empty = not bool(binary.any())
            else:
                image_to_rgb(im)  # proves the mode converts
                if min(im.size) < limits.min_side_px:
                    return Inspection(
                        digest, size=im.size, mode=im.mode,
                        error=f"image is only {im.size[0]}x{im.size[1]} px, smaller than the minimum of "
                        f"{limits.min_side_px} px a side: too small to detect anomalies in",
                        hint=f"use images of at least {limits.min_side_px}x{limits.min_side_px} px "
                        "or lower Limits.min_side_px",
                    )
            return Inspection(digest, size=im.size, mode=im.mode, mask_note=note, mask_empty=empty)
    except Exception as e:  # truncated data, bad compression stream, unsupported mode...
        msg = str(e) or type(e).__name__
        return Inspection(
            digest, error=f"corrupt or truncated image ({msg})", hint="re-export or re-copy the file"
        )


def image_to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 RGB.

    16-bit and 32-bit grey are scaled from their full range (65535 -> 255) when values exceed 255;
    float images in [0, 1] are scaled by 255; transparent images are composited over black.
    """
    mode = im.mode
    if mode in ("RGB",):
        return np.asarray(im, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        v = np.asarray(im)
        if v.ndim != 2:
            raise ValueError(f"unsupported image mode {mode}")
        v = v.astype(np.float64)
        vmax = float(v.max()) if v.size else 0.0
        if mode == "F" and vmax <= 1.0:
            v = v * 255.0
        elif vmax > 255.0:
            v = v / 257.0
        g = np.clip(np.rint(v), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        a = rgba[:, :, 3:4] / 255.0
        return np.clip(np.rint(rgba[:, :, :3] * a), 0, 255).astype(np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _mask_values(im: Image.Image) -> np.ndarray:
    """(H, W) numeric array of a mask: colour masks use the brightest channel."""
    mode = im.mode
    if mode in ("L", "1"):
        return np.asarray(im.convert("L"))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.asarray(im)
    if mode == "LA":
        return np.asarray(im)[:, :, 0]
    return np.asarray(im.convert("RGB")).max(axis=2)


def mask_to_binary(im: Image.Image) -> tuple[np.ndarray, str | None]:
    """Mask image -> ((H, W) bool defect pixels, note). note is None for clean 0/255 (or 0/65535) masks,
    MASK_ZERO_ONE for 0/1 masks, MASK_NONBINARY when other values were thresholded."""
    v = _mask_values(im)
    if v.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(v.ravel(), minlength=256))
        if set(present.tolist()) <= {0, 255}:
            return v > 127, MASK_OK
        if set(present.tolist()) <= {0, 1}:
            return v > 0, MASK_ZERO_ONE
        return v > 127, MASK_NONBINARY
    vals = np.unique(v)
    vmax = float(vals.max()) if vals.size else 0.0
    if np.issubdtype(v.dtype, np.floating) and vmax <= 1.0:
        return v > 0.5, (MASK_OK if set(vals.tolist()) <= {0.0, 1.0} else MASK_NONBINARY)
    if vmax <= 255:
        if set(vals.tolist()) <= {0, 255}:
            return v > 127, MASK_OK
        if set(vals.tolist()) <= {0, 1}:
            return v > 0, MASK_ZERO_ONE
        return v > 127, MASK_NONBINARY
    return v > 32767, (MASK_OK if set(vals.tolist()) <= {0, 65535} else MASK_NONBINARY)
