"""Backbone features computed once per (images, backbone, weights, size, layer) and shared by all methods.

Two levels: an in-process LRU (so methods in one run share tensors without disk reads) and the disk
cache (so a second run, or another session, does not recompute). When any requested layer is
missing, every "shared" stage (strides 4, 8, 16) up to the deepest requested one is computed in the
same backbone pass and cached, so the next method asking for other layers finds them ready.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator

import torch

from engine.api import ImageSet, Progress, no_progress, to_float_images
from engine.backbones import FeatureExtractor, get_extractor, stage_info, weights_description
from engine.cache import Cache, default_cache, make_key
from engine.device import autocast, batch_size

_SHARED_STRIDES = (4, 8, 16)
_MEM_LIMIT_BYTES = 3 * 1024**3  # all features kept in this process
# Features that also sit in the disk cache are kept only up to this total: beyond it they are read back from disk
# when asked for (a few hundred MB/s), so a large set's features of every layer, train and test, are not all held
# while a method needs one split of its own layers (990 MB for 762 + 582 images of 288×256 px).
_SPILL_LIMIT_BYTES = 256 * 1024**2


class _LRU:
    def __init__(self, limit_bytes: int, spill_bytes: int):
        self.limit = limit_bytes
        self.spill = spill_bytes
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.on_disk: set[str] = set()
        # Handed over: the next get gives the tensor away and keeps only a weak reference, so it lives as long
        # as its last reader holds it and is shared (not recomputed) while it does.
        self.handed: set[str] = set()
        self.weak: dict[str, weakref.ref[torch.Tensor]] = {}
        self.lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self.lock:
            t = self.items.get(key)
            if t is None:
                ref = self.weak.get(key)
                t = None if ref is None else ref()
                if ref is not None and t is None:
                    del self.weak[key]
                return t
            if key in self.handed:
                self._forget(key)
                self.weak[key] = weakref.ref(t)
            else:
                self.items.move_to_end(key)
            return t

    def _forget(self, key: str) -> torch.Tensor | None:
        self.on_disk.discard(key)
        self.handed.discard(key)
        self.weak.pop(key, None)
        return self.items.pop(key, None)

    def put(self, key: str, t: torch.Tensor, on_disk: bool = False) -> None:
        """Keep `t`; on_disk: the disk cache holds it too, so it may be dropped first (above the spill limit)."""
        with self.lock:
            self._forget(key)
            self.items[key] = t
            if on_disk:
                self.on_disk.add(key)
            total = sum(_nbytes(v) for v in self.items.values())
            for k in [k for k in self.items if k in self.on_disk and k != key]:  # oldest first
                if total <= self.spill:
                    break
                total -= _nbytes(self._forget(k))
            while total > self.limit and len(self.items) > 1:
                k = next(iter(self.items))
                total -= _nbytes(self._forget(k))

    def hand_over(self, keys: list[str]) -> None:
        """The next get of each of these keys is the last reader's: see `handed`."""
        with self.lock:
            self.handed.update(k for k in keys if k in self.items)

    def drop(self, keys: list[str]) -> None:
        with self.lock:
            for k in keys:
                self._forget(k)

    def keys(self) -> list[str]:
        """Keys held (strongly) in memory."""
        with self.lock:
            return list(self.items)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.on_disk.clear()
            self.handed.clear()
            self.weak.clear()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_memory = _LRU(_MEM_LIMIT_BYTES, _SPILL_LIMIT_BYTES)
_pass_seconds: dict[str, float] = {}
_compute_lock = threading.Lock()


# The disk cache a run asked for (runner.run_methods(cache=...)); methods call extract_features without one.
_run_cache: contextvars.ContextVar[Cache | None] = contextvars.ContextVar("adlab_run_cache", default=None)


@contextlib.contextmanager
def using_cache(cache: Cache) -> Iterator[None]:
    """Within this block (and this thread), features are read from and written to `cache`."""
    token = _run_cache.set(cache)
    try:
        yield
    finally:
        _run_cache.reset(token)


# Layers some method of the current run still reads (runner.run_methods sets it), or None: unknown. The shared
# stages nobody asked for are computed in the same pass only when the disk cache keeps them for later runs or a
# method of this run reads them; otherwise they would sit in memory unused (594 MB of a stride-4 stage for
# PatchCore on 762 + 582 images of 288×256 px with the cache off).
_run_layers: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("adlab_run_layers",
                                                                                     default=None)


@contextlib.contextmanager
def run_layers(layers: frozenset[str] | None) -> Iterator[None]:
    """Within this block (and this thread), the layers the run's methods read (None: unknown, compute every
    shared stage)."""
    token = _run_layers.set(layers)
    try:
        yield
    finally:
        _run_layers.reset(token)


def clear_memory_cache() -> None:
    """Forget in-process features (the disk cache stays)."""
    _memory.clear()


def forget(images: ImageSet, layers: tuple[str, ...], *, backbone: str = "efficientnet_lite0",
           weights: str = "auto") -> None:
    """Drop these features of `images` from the in-process cache (a disk copy stays): the run needs them no more."""
    _memory.drop(_keys(images, layers, backbone, weights))


def hand_over(images: ImageSet, layers: tuple[str, ...], *, backbone: str = "efficientnet_lite0",
              weights: str = "auto") -> None:
    """The next reader of these features of `images` is the run's last: the in-process cache gives them to it and
    keeps only a weak reference, so they are freed when that reader lets go (a disk copy stays)."""
    _memory.hand_over(_keys(images, layers, backbone, weights))


def _keys(images: ImageSet, layers: tuple[str, ...], backbone: str, weights: str) -> list[str]:
    return [feature_key(images, backbone, weights, layer) for layer in layers]


def feature_key(images: ImageSet, backbone: str, weights: str, layer: str, digest: str | None = None) -> str:
    return make_key("features", digest or images.digest, backbone, weights_description(backbone, weights),
                    images.size, layer)


def _lookup(key: str, cache: Cache) -> torch.Tensor | None:
    """Features of one key from memory, else from disk (then kept in memory)."""
    t = _memory.get(key)
    if t is None:
        hit = cache.load("features", key)
        if hit is not None and "f" in hit[0]:
            t = hit[0]["f"]
            _memory.put(key, t, on_disk=True)
            if "seconds" in hit[1]:
                _pass_seconds[key] = float(hit[1]["seconds"])
    return t


def run_backbone(extractor: FeatureExtractor, images: torch.Tensor | ImageSet, device: str,
                 progress: Progress = no_progress, stage: str = "features") -> list[torch.Tensor]:
    """Forward (N,3,H,W) uint8 or float images in batches; returns per-layer (N,C,h,w) float32 on CPU.
    An ImageSet whose pixels are released is read from its files a batch at a time (ImageSet.rows)."""
    n = images.shape[0]
    rows = images.rows if isinstance(images, ImageSet) else lambda a, b: images[a:b]
    bs = batch_size(device, image_shape=tuple(images.shape))
    # Batches are written into the outputs (a list of batches then torch.cat held every layer twice at the end).
    outs: list[torch.Tensor] = []
    with torch.inference_mode(), autocast(device):
        for start in range(0, n, bs):
            x = to_float_images(rows(start, start + bs)).to(device, non_blocking=True)
            for i, f in enumerate(extractor(x)):
                if len(outs) <= i:
                    with torch.inference_mode(False):  # ordinary tensors, as the caller had from torch.cat
                        outs.append(torch.empty((n, *f.shape[1:]), dtype=torch.float32))
                outs[i][start:start + f.shape[0]] = f
            progress(stage, min(1.0, (start + bs) / n), {"images": min(n, start + bs), "of": n})
    if not outs:
        raise ValueError("run_backbone: there are no images")
    return outs


def extract_features(images: ImageSet, layers: tuple[str, ...], *, backbone: str = "efficientnet_lite0",
                     weights: str = "auto", device: str = "cpu", cache: Cache | None = None,
                     progress: Progress = no_progress) -> list[torch.Tensor]:
    """Per-layer features (N, C_l, H/s_l, W/s_l) float32 on CPU, cached in memory and on disk."""
    cache = cache if cache is not None else (_run_cache.get() or default_cache())
    keys = {layer: feature_key(images, backbone, weights, layer) for layer in layers}
    found: dict[str, torch.Tensor] = {}
    for layer, k in keys.items():
        t = _lookup(k, cache)
        if t is None and images.origin is not None:
            # A subset (e.g. the test set minus labelled anomalies): slice the full set's features.
            parent = feature_key(images, backbone, weights, layer, digest=images.origin[0])
            full = _lookup(parent, cache)
            if full is not None:
                t = full[list(images.origin[1])]
                _pass_seconds[k] = _pass_seconds.get(parent, 0.0) * len(images) / max(1, full.shape[0])
        if t is not None:
            found[layer] = t
    missing = [layer for layer in layers if layer not in found]
    if missing:
        # One backbone pass at a time in this process, and one per image set across processes (the disk lock).
        # Whoever waited then looks again: another session may have stored these features meanwhile.
        pass_key = make_key("features-pass", images.digest, backbone, weights_description(backbone, weights),
                            images.size)
        with _compute_lock, cache.lock("features", pass_key):
            for layer in missing:
                t = _lookup(keys[layer], cache)
                if t is not None:
                    found[layer] = t
            missing = [layer for layer in layers if layer not in found]
            if missing:
                _compute(images, keys, missing, found, backbone, weights, device, cache, progress)
    progress("features", 1.0, {"cached": not missing})
    return [found[layer] for layer in layers]


def _compute(images: ImageSet, keys: dict[str, str], missing: list[str], found: dict[str, torch.Tensor],
             backbone: str, weights: str, device: str, cache: Cache, progress: Progress) -> None:
    """One backbone pass for the missing layers plus every shared stage up to the deepest; stores them all."""
    stages = stage_info(backbone)
    order = [s.name for s in stages]
    deepest = max(order.index(layer) for layer in missing)
    shared = [s.name for s in stages[: deepest + 1] if s.stride in _SHARED_STRIDES]
    wanted = _run_layers.get()
    if wanted is not None and not cache.enabled:  # no later run can read them: only what this run's methods read
        shared = [name for name in shared if name in wanted]
    todo = tuple(sorted(set(missing) | set(shared), key=order.index))
    ext = get_extractor(backbone, todo, weights, device)
    t0 = time.perf_counter()
    feats = run_backbone(ext, images, device, progress)
    secs = time.perf_counter() - t0
    for layer, f in zip(todo, feats, strict=True):
        k = feature_key(images, backbone, weights, layer)
        _pass_seconds[k] = secs
        cache.store("features", k, {"f": f}, {"layer": layer, "backbone": backbone, "weights": ext.weights,
                                              "seconds": secs, "device": device})
        _memory.put(k, f, on_disk=cache.has("features", k))
        if layer in keys:
            found[layer] = f


def backbone_seconds(images: ImageSet, layers: tuple[str, ...], *, backbone: str = "efficientnet_lite0",
                     weights: str = "auto") -> float:
    """Seconds the backbone pass that produced these cached features took (0.0 when unknown)."""
    keys = [feature_key(images, backbone, weights, layer) for layer in layers]
    return max((_pass_seconds.get(k, 0.0) for k in keys), default=0.0)


def patch_features(images: ImageSet, layers: tuple[str, ...], *, backbone: str = "efficientnet_lite0",
                   weights: str = "auto", device: str = "cpu", patch_size: int = 1, pad: str = "zero",
                   progress: Progress | None = None) -> torch.Tensor:
    """Cached features of several stages as one (N, ΣC, h, w) map at the first stage's resolution.

    patch_size > 1 averages each stage over a patch×patch neighbourhood first (PatchCore's locally aware
    features; `pad` as in `local_average`); deeper stages are resampled so every cell stays over the pixels it sees.
    """
    feats = extract_features(images, layers, backbone=backbone, weights=weights, device=device,
                             progress=progress or no_progress)
    return _locally_aware(feats, patch_size, pad)


def _locally_aware(feats: list[torch.Tensor], patch_size: int, pad: str) -> torch.Tensor:
    """Per-layer (n, C_l, h_l, w_l) -> (n, ΣC, h, w): local averages resampled to the first layer's grid."""
    from engine.components.anomaly_map import local_average, resize_and_concat

    return resize_and_concat([local_average(f, patch_size, pad) for f in feats])


def patch_feature_chunks(images: ImageSet, layers: tuple[str, ...], *, backbone: str = "efficientnet_lite0",
                         weights: str = "auto", device: str = "cpu", patch_size: int = 1, pad: str = "zero",
                         chunk: int = 32, progress: Progress | None = None) -> Iterator[torch.Tensor]:
    """`patch_features` of `chunk` images at a time, in order: (b, ΣC, h, w) per chunk, the same values.

    Only the cached per-layer features are whole; a chunk's local averages and resampled layers are freed before
    the next one is made (the whole set's map and its intermediates were about 4× the map: 2 GB for 762 images
    of 288×256 px).
    """
    feats = extract_features(images, layers, backbone=backbone, weights=weights, device=device,
                             progress=progress or no_progress)
    for s in range(0, feats[0].shape[0], chunk):
        yield _locally_aware([f[s:s + chunk] for f in feats], patch_size, pad)


def patch_rows(images: ImageSet, layers: tuple[str, ...], *, backbone: str = "efficientnet_lite0",
               weights: str = "auto", device: str = "cpu", patch_size: int = 1, pad: str = "zero",
               chunk: int = 32, progress: Progress | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Every patch of `patch_features` as a row: ((N·h·w, ΣC) float32 in (image, y, x) order, (h, w)).

    Equal to ``patch_features(...).permute(0, 2, 3, 1).reshape(-1, ΣC)``, filled chunk by chunk, so the
    (N, ΣC, h, w) map and its row-major copy are never held together.
    """
    out: torch.Tensor | None = None
    grid = (0, 0)
    n = len(images)
    row = 0
    for emb in patch_feature_chunks(images, layers, backbone=backbone, weights=weights, device=device,
                                    patch_size=patch_size, pad=pad, chunk=chunk, progress=progress):
        b, d, h, w = emb.shape
        if out is None:
            out = torch.empty(n * h * w, d, dtype=emb.dtype, device=emb.device)
            grid = (h, w)
        out[row:row + b * h * w] = emb.permute(0, 2, 3, 1).reshape(-1, d)
        row += b * h * w
    if out is None:
        raise ValueError("patch_rows: there are no images")
    return out, grid
