"""The pixel metrics' sort without a per-pixel index (issue 18, memory): the curves, AUROC and AUPRO equal those of
the argsort path they replaced (kept below as the reference: `metrics._binary_curve` over the flattened pixels, and
the PRO running sums over all pixels in argsort order), on random maps with and without ties, blocks of any size."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engine import metrics as M


def _argsort_pro_curve(m: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve as the argsort path made it: (fpr, pro) with (0, 0) first, one point per distinct score."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, n_regions = ndimage.label(g, structure=structure)
    regions = regions.reshape(-1)
    n_normal = int(g.size - np.count_nonzero(g))
    sizes = np.bincount(regions, minlength=n_regions + 1).astype(np.float64)
    pixel_weight = np.zeros(n_regions + 1)
    pixel_weight[1:] = 1.0 / (sizes[1:] * n_regions)
    order, starts, _ = M._sort_groups(m.reshape(-1))
    ends = np.append(starts[1:] - 1, order.shape[0] - 1)
    r = regions[order]
    fpr = np.cumsum(r == 0)[ends] / n_normal
    pro = np.minimum(np.cumsum(pixel_weight[r])[ends], 1.0)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def _data(seed: int, levels: int | None, n: int = 6, h: int = 20, w: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Maps (n, h, w) float32 (quantised to `levels` values: many ties) and masks with a few regions each."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(1, n):  # image 0 stays good
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            masks[i, y:y + int(rng.integers(1, 5)), x:x + int(rng.integers(1, 5))] = 1
    maps = rng.random((n, h, w)) + 0.7 * masks
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("block", [1, 7, 1 << 20])
@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, 12), (2, 40), (3, 3)])
def test_pixel_curves_equal_the_argsort_path(monkeypatch, block: int, seed: int, levels: int | None) -> None:
    monkeypatch.setattr(M, "_BLOCK", block)
    maps, masks = _data(seed, levels)
    m, g = M._check_pixels(maps, masks, None)
    flat_s, flat_y = m.reshape(-1), g.reshape(-1)

    tp, fp, thr = M._binary_curve(flat_s, flat_y.astype(np.int64))
    sp = M._SortedPixels(flat_s, flat_y)
    parts = list(sp.groups())
    assert np.array_equal(np.concatenate([p[0] for p in parts]), tp)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), fp)
    assert np.array_equal(np.concatenate([p[2] for p in parts]), thr)

    auroc = M._none_if_nan(M._curve_metrics(tp[None], fp[None])["auroc"][0])
    assert M.pixel_auroc(maps, masks) == auroc
    for max_points in (2, 5, 512, 10**6):
        assert M.pixel_roc_points(maps, masks, max_points=max_points) == M._roc_from_counts(tp, fp, thr, max_points)

    fpr_ref, pro_ref = _argsort_pro_curve(m, g)
    fpr, pro = M._pro_curve(m, g)
    assert np.array_equal(fpr, fpr_ref)
    # the sums over tied defect pixels of different regions may be added in another order: last-bit differences
    np.testing.assert_allclose(pro, pro_ref, rtol=1e-12, atol=0)
    if levels is None:  # no ties: the same additions in the same order
        assert np.array_equal(pro, pro_ref)
    assert M.aupro(maps, masks) == pytest.approx(M._area_to_limit(fpr_ref, pro_ref, 0.3), rel=1e-12, abs=0)


def test_stride_subsample_and_selection_equal_the_argsort_path() -> None:
    maps, masks = _data(5, 25, n=8)
    valid = np.array([True, False, True, True, True, False, True, True])
    m, g = M._check_pixels(maps, masks, valid)
    step = -(-m.size // (m.size // 3))
    tp, fp, thr = M._binary_curve(m.reshape(-1)[::step], g.reshape(-1)[::step].astype(np.int64))
    assert M.pixel_auroc(maps, masks, valid, max_pixels=m.size // 3) == M._none_if_nan(
        M._curve_metrics(tp[None], fp[None])["auroc"][0])
    assert M.pixel_roc_points(maps, masks, valid, max_pixels=m.size // 3) == M._roc_from_counts(tp, fp, thr, 512)


def test_evaluate_pixel_metrics_equal_the_argsort_path(monkeypatch) -> None:
    """evaluate shares one sort below _MAX_PIXELS and sorts the subsample and all pixels apart above it."""
    maps, masks = _data(6, 30, n=10)
    labels = (masks.reshape(10, -1).max(1) > 0).astype(np.int64)
    types = ["good" if y == 0 else "d" for y in labels]
    scores = maps.reshape(10, -1).max(1)
    shared = M.evaluate(scores, labels, types, maps=maps, masks=masks)
    m, g = M._check_pixels(maps, masks, None)
    assert shared["pixel_auroc"] == M.pixel_auroc(maps, masks)
    assert shared["curves"]["pixel_roc"] == M.pixel_roc_points(maps, masks)
    assert shared["pixel_aupro"] == M.aupro(maps, masks)
    monkeypatch.setattr(M, "_MAX_PIXELS", maps.size // 4)
    apart = M.evaluate(scores, labels, types, maps=maps, masks=masks)
    assert apart["pixel_auroc"] == M.pixel_auroc(maps, masks, max_pixels=maps.size // 4)
    assert apart["curves"]["pixel_roc"] == M.pixel_roc_points(maps, masks, max_pixels=maps.size // 4)
    assert apart["pixel_aupro"] == shared["pixel_aupro"]
