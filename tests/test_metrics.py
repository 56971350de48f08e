"""engine.metrics against scikit-learn and slow, obviously-correct reference implementations written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from engine import metrics as M

EIGHT = np.ones((3, 3), dtype=bool)


def _random_case(rng: np.random.Generator, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scores (n,) with a signal, rounded to a few levels when ties is True; labels (n,) with both classes."""
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.normal(size=n) + 0.8 * y
    if ties:
        s = np.round(s * 2) / 2
    return s, y


# ---------------------------------------------------------------------------------------------------------------
# image level


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_image_auroc_ap_match_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    s, y = _random_case(rng, int(rng.integers(5, 300)), ties)
    m = M.image_metrics(s, y)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)


def _f1_brute(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Best F1 over every candidate threshold (flag score >= t), first (highest) threshold reaching it."""
    best, best_t = -1.0, None
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = int(np.sum(pred & (y == 1)))
        fp = int(np.sum(pred & (y == 0)))
        fn = int(np.sum(~pred & (y == 1)))
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best:
            best, best_t = f1, t
    return best, best_t


@pytest.mark.parametrize("seed", range(8))
def test_f1_max_and_threshold_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    s, y = _random_case(rng, int(rng.integers(4, 120)), ties=seed % 2 == 0)
    m = M.image_metrics(s, y)
    f1, t = _f1_brute(s, y)
    assert m["image_f1_max"] == pytest.approx(f1, abs=1e-12)
    assert m["threshold"] == t
    c = M.confusion_at(s, y, m["threshold"])
    assert 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) == pytest.approx(f1)


def test_perfect_and_one_class() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    m = M.image_metrics(s, y)
    assert m == {"image_auroc": 1.0, "image_ap": 1.0, "image_f1_max": 1.0, "threshold": 0.8}
    assert M.image_metrics(-s, y)["image_auroc"] == 0.0
    for y1 in (np.zeros(5, int), np.ones(5, int)):
        assert M.image_metrics(s, y1) == dict.fromkeys(["image_auroc", "image_ap", "image_f1_max", "threshold"])
        assert M.roc_points(s, y1) is None
        assert M.pr_points(s, y1) is None
        assert M.bootstrap_ci(s, y1) is None
    assert M.image_metrics(np.zeros(0), np.zeros(0, int))["image_auroc"] is None


def test_bad_input_raises() -> None:
    y = np.array([0, 1, 0])
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="scores contain NaN/inf"):
            M.image_metrics(np.array([0.1, bad, 0.2]), y)
        with pytest.raises(ValueError, match="scores contain NaN/inf"):
            M.evaluate(np.array([0.1, bad, 0.2]), y, ["good", "a", "good"])
    with pytest.raises(ValueError):
        M.image_metrics(np.zeros(3), np.array([0, 2, 1]))
    with pytest.raises(ValueError):
        M.image_metrics(np.zeros(3), np.array([0, 1]))
    maps = np.zeros((3, 4, 4))
    maps[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="maps contain NaN/inf"):
        M.evaluate(np.zeros(3), y, ["good", "a", "good"], maps=maps, masks=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError):
        M.bootstrap_ci(np.zeros(3), y, metric="accuracy")


def test_roc_points_match_area_and_downsample() -> None:
    rng = np.random.default_rng(3)
    s, y = _random_case(rng, 5000, ties=False)
    full = M.roc_points(s, y, max_points=100_000)
    assert full["fpr"][0] == 0.0 and full["tpr"][0] == 0.0
    assert full["fpr"][-1] == 1.0 and full["tpr"][-1] == 1.0
    assert np.trapezoid(full["tpr"], full["fpr"]) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # each point is what its threshold really gives
    for i in (0, 7, len(full["fpr"]) // 2, len(full["fpr"]) - 1):
        c = M.confusion_at(s, y, full["thresholds"][i])
        assert (c["fpr"], c["tpr"]) == pytest.approx((full["fpr"][i], full["tpr"][i]))
    small = M.roc_points(s, y, max_points=50)
    assert len(small["fpr"]) <= 50
    assert small["fpr"][0] == 0.0 and small["tpr"][-1] == 1.0 and small["fpr"][-1] == 1.0
    assert np.all(np.diff(small["fpr"]) >= 0) and np.all(np.diff(small["thresholds"]) < 0)
    json.dumps(small)


def test_pr_points() -> None:
    rng = np.random.default_rng(4)
    s, y = _random_case(rng, 400, ties=True)
    pr = M.pr_points(s, y, max_points=10_000)
    assert pr["recall"][-1] == 1.0
    assert np.all(np.diff(pr["recall"]) >= 0)
    for i in (0, len(pr["recall"]) // 3, len(pr["recall"]) - 1):
        c = M.confusion_at(s, y, pr["thresholds"][i])
        assert (c["tpr"], c["precision"]) == pytest.approx((pr["recall"][i], pr["precision"][i]))
    ap = sum((r1 - r0) * p for r0, r1, p in zip([0.0, *pr["recall"][:-1]], pr["recall"], pr["precision"], strict=True))
    assert ap == pytest.approx(average_precision_score(y, s))
    small = M.pr_points(s, y, max_points=5)
    assert len(small["recall"]) <= 5 and small["recall"][-1] == 1.0 and small["thresholds"][0] == pr["thresholds"][0]


def test_per_defect_auroc() -> None:
    rng = np.random.default_rng(5)
    types = np.array(["good"] * 30 + ["crack"] * 10 + ["scratch"] * 12 + ["hole"] * 1)
    y = (types != "good").astype(int)
    s = rng.normal(size=types.size) + np.select([types == "crack", types == "scratch"], [2.0, 0.3], 0.0)
    out = M.per_defect_auroc(s, y, types.tolist())
    assert set(out) == {"crack", "scratch", "hole"}
    for t in out:
        sel = (types == t) | (types == "good")
        assert out[t]["image_auroc"] == pytest.approx(roc_auc_score(y[sel], s[sel]))
        assert out[t]["n"] == int(np.sum(types == t))
    assert out["crack"]["image_auroc"] > out["scratch"]["image_auroc"]
    # no good images: undefined, not made up
    bad = M.per_defect_auroc(s[30:], y[30:], types[30:].tolist())
    assert all(v["image_auroc"] is None for v in bad.values())


def test_threshold_at_fpr_property() -> None:
    rng = np.random.default_rng(6)
    for trial in range(200):
        n = int(rng.integers(1, 40))
        g = rng.normal(size=n)
        if trial % 2:
            g = np.round(g)  # ties
        max_fpr = float(rng.choice([0.0, 0.01, 0.05, 0.1, 0.29, 0.3, 0.5, 0.99, 1.0, rng.random()]))
        t = M.threshold_at_fpr(g, max_fpr)
        assert np.mean(g >= t) <= max_fpr + 1e-12
        # smallest: any lower candidate (a score below t) flags too many, unless everything is flagged already
        lower = g[g < t]
        if lower.size:
            assert np.mean(g >= lower.max()) > max_fpr
        else:
            assert np.all(g >= t)
    assert M.threshold_at_fpr(np.array([1.0, 2.0, 3.0]), 1.0) == 1.0
    with pytest.raises(ValueError):
        M.threshold_at_fpr(np.array([]), 0.1)


def test_confusion_at() -> None:
    s = np.array([0.1, 0.4, 0.5, 0.7, 0.9])
    y = np.array([0, 1, 0, 1, 1])
    c = M.confusion_at(s, y, 0.5)
    assert c == {"tp": 2, "fp": 1, "tn": 1, "fn": 1, "tpr": 2 / 3, "fpr": 0.5, "precision": 2 / 3}
    c = M.confusion_at(s, y, 2.0)
    assert c["precision"] is None and c["tpr"] == 0.0
    assert M.confusion_at(s, np.ones(5, int), 0.5)["fpr"] is None


# ---------------------------------------------------------------------------------------------------------------
# bootstrap


@pytest.mark.parametrize("metric", ["image_auroc", "image_ap", "image_f1_max"])
def test_weighted_counts_equal_repeated_images(metric: str) -> None:
    """The vectorised resample path gives the metric of the data with each image repeated counts[i] times."""
    rng = np.random.default_rng(7)
    s, y = _random_case(rng, 60, ties=True)
    counts = rng.integers(0, 4, size=(5, s.size))
    got = M._metric_from_counts(s, y, counts, metric)
    for b in range(5):
        rep = np.repeat(np.arange(s.size), counts[b])
        assert got[b] == pytest.approx(M.image_metrics(s[rep], y[rep])[metric], abs=1e-12)
        if metric == "image_auroc":
            assert got[b] == pytest.approx(roc_auc_score(y, s, sample_weight=counts[b]), abs=1e-12)


def test_bootstrap_ci() -> None:
    rng = np.random.default_rng(8)
    s_small, y_small = _random_case(rng, 40, ties=False)
    s_big, y_big = _random_case(rng, 800, ties=False)
    for metric in ("image_auroc", "image_ap", "image_f1_max"):
        lo, hi = M.bootstrap_ci(s_small, y_small, metric=metric, n_boot=500)
        point = M.image_metrics(s_small, y_small)[metric]
        assert lo <= point <= hi
        lo2, hi2 = M.bootstrap_ci(s_big, y_big, metric=metric, n_boot=500)
        assert lo2 <= M.image_metrics(s_big, y_big)[metric] <= hi2
        assert hi2 - lo2 < (hi - lo) * 0.6
    assert M.bootstrap_ci(s_small, y_small, seed=1) == M.bootstrap_ci(s_small, y_small, seed=1)
    lo90, hi90 = M.bootstrap_ci(s_small, y_small, alpha=0.1)
    lo95, hi95 = M.bootstrap_ci(s_small, y_small, alpha=0.05)
    assert lo95 <= lo90 <= hi90 <= hi95
    # one positive among many: most resamples have one class and are skipped, the rest still give an interval
    y1 = np.zeros(30, int)
    y1[0] = 1
    lo, hi = M.bootstrap_ci(np.arange(30.0)[::-1], y1, n_boot=200)
    assert lo == hi == 1.0


# ---------------------------------------------------------------------------------------------------------------
# pixel level


def _blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w) uint8 masks: the first two empty, the rest holding 1-3 random ellipses / single diagonal chains."""
    masks = np.zeros((n, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for i in range(2, n):
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(0.6, h / 4), rng.uniform(0.6, w / 4)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        k = int(rng.integers(0, h - 3))
        masks[i, k, k] = masks[i, k + 1, k + 1] = 1  # a diagonal pair: one region only with 8-connectivity
    return masks


def _maps_for(rng: np.random.Generator, masks: np.ndarray, levels: int | None) -> np.ndarray:
    maps = rng.normal(size=masks.shape) + 1.5 * ndimage.gaussian_filter(masks.astype(float), (0, 1, 1))
    if levels:
        maps = np.round(maps * levels / 4) / (levels / 4)
    return maps


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(20 + seed)
    masks = _blob_masks(rng, 7, 16, 20)
    maps = _maps_for(rng, masks, levels=20 if seed == 1 else None).astype(np.float32)
    assert M.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    valid = np.array([True, False, True, True, False, True, True])
    assert M.pixel_auroc(maps, masks, valid) == pytest.approx(
        roc_auc_score(masks[valid].ravel(), maps[valid].ravel()), abs=1e-12
    )
    pts = M.pixel_roc_points(maps, masks, valid, max_points=10**6)
    assert np.trapezoid(pts["tpr"], pts["fpr"]) == pytest.approx(M.pixel_auroc(maps, masks, valid), abs=1e-12)
    # stride subsample above max_pixels: deterministic, close to the exact value
    sub = M.pixel_auroc(maps, masks, max_pixels=maps.size // 3)
    assert sub == M.pixel_auroc(maps, masks, max_pixels=maps.size // 3)
    step = -(-maps.size // (maps.size // 3))
    assert sub == pytest.approx(roc_auc_score(masks.ravel()[::step], maps.ravel()[::step]), abs=1e-12)


def test_pixel_metrics_undefined() -> None:
    maps = np.random.default_rng(0).random((3, 8, 8))
    empty = np.zeros((3, 8, 8), dtype=np.uint8)
    assert M.pixel_auroc(maps, empty) is None
    assert M.pixel_roc_points(maps, empty) is None
    assert M.aupro(maps, empty) is None
    full = np.ones((3, 8, 8), dtype=np.uint8)
    assert M.pixel_auroc(maps, full) is None and M.aupro(maps, full) is None
    masks = empty.copy()
    masks[2, 2:4, 2:4] = 1
    # the only defect image is excluded
    assert M.pixel_auroc(maps, masks, np.array([True, True, False])) is None
    assert M.aupro(maps, masks, np.array([True, True, False])) is None


def _aupro_reference(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray, limit: float = 0.3) -> float:
    """Slow AUPRO: per threshold, per region overlap from scipy labels; trapezoid with a clipped last segment."""
    regions = []
    for mask in masks:
        lab, n = ndimage.label(mask > 0, structure=EIGHT)
        regions += [(len(regions), lab == r) for r in range(1, n + 1)]
    normal_scores = maps[masks == 0]
    points = [(0.0, 0.0)]
    for t in sorted(thresholds, reverse=True):
        overlaps = []
        for i, mask in enumerate(masks):
            lab, n = ndimage.label(mask > 0, structure=EIGHT)
            for r in range(1, n + 1):
                region = lab == r
                overlaps.append(np.sum(maps[i][region] >= t) / np.sum(region))
        points.append((float(np.mean(normal_scores >= t)), float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_aupro_exact_on_quantised_maps() -> None:
    """With few distinct map values, the reference can visit every distinct threshold: agreement is exact."""
    rng = np.random.default_rng(30)
    masks = _blob_masks(rng, 6, 12, 14)
    maps = _maps_for(rng, masks, levels=30)
    got = M.aupro(maps, masks)
    ref = _aupro_reference(maps, masks, np.unique(maps))
    assert got == pytest.approx(ref, abs=1e-9)
    for limit in (0.05, 0.3, 1.0):
        assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(
            _aupro_reference(maps, masks, np.unique(maps), limit), abs=1e-9
        )


@pytest.mark.parametrize("seed", range(2))
def test_aupro_matches_reference_on_continuous_maps(seed: int) -> None:
    rng = np.random.default_rng(40 + seed)
    masks = _blob_masks(rng, 6, 16, 16)
    maps = _maps_for(rng, masks, levels=None)
    thresholds = np.quantile(maps, np.linspace(0, 1, 1500))
    assert M.aupro(maps, masks) == pytest.approx(_aupro_reference(maps, masks, thresholds), abs=1e-3)
    valid = np.array([True, False, True, False, True, True])
    assert M.aupro(maps, masks, valid) == pytest.approx(
        _aupro_reference(maps[valid], masks[valid], thresholds), abs=1e-3
    )


def test_aupro_perfect_random_inverted() -> None:
    rng = np.random.default_rng(50)
    masks = _blob_masks(rng, 8, 24, 24)
    perfect = masks.astype(float) + 0.1 * rng.random(masks.shape) * masks  # every defect pixel above every normal
    assert M.aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(masks.astype(float), masks) == pytest.approx(1.0, abs=1e-12)
    random_map = rng.random(masks.shape)
    assert M.aupro(random_map, masks) == pytest.approx(0.15, abs=0.06)  # PRO ~ FPR: area 0.045 / 0.3
    assert M.aupro(1.0 - masks.astype(float), masks) == pytest.approx(0.0, abs=1e-12)
    assert M.aupro(-perfect, masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_hand_computed_eight_connectivity() -> None:
    """Mask pixels A=(0,0), B=(1,1), C=(1,2): one 8-connected region of 3 pixels (two 4-connected regions).

    Scores A=0.9, B=C=0.1, one normal pixel 0.5, five normal pixels 0. Curve: (0,0) (0,1/3) (1/6,1/3) (1/6,1) (1,1);
    area to 0.3 = 1/18 + (0.3 - 1/6) = 17/90, normalised 17/27. With 4-connectivity the first PRO would be 1/2.
    """
    mask = np.zeros((1, 3, 3), dtype=np.uint8)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = 1
    amap = np.zeros((1, 3, 3))
    amap[0, 0, 0], amap[0, 1, 1], amap[0, 1, 2], amap[0, 2, 0] = 0.9, 0.1, 0.1, 0.5
    assert M.aupro(amap, mask) == pytest.approx(17 / 27, abs=1e-12)


def test_aupro_anomalous_image_with_empty_mask_counts_as_normal() -> None:
    rng = np.random.default_rng(60)
    masks = _blob_masks(rng, 5, 12, 12)
    maps = _maps_for(rng, masks, levels=25)
    # image 0 has an empty mask; give it high scores: it must raise the FPR and lower AUPRO, unless excluded
    maps[0] += 3.0
    with_it = M.aupro(maps, masks)
    without = M.aupro(maps, masks, np.array([False, True, True, True, True]))
    assert with_it == pytest.approx(_aupro_reference(maps, masks, np.unique(maps)), abs=1e-9)
    assert with_it < without - 0.05


# ---------------------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_schema_and_json() -> None:
    rng = np.random.default_rng(70)
    masks = _blob_masks(rng, 10, 16, 16)
    masks[:4] = 0
    types = ["good"] * 4 + ["crack"] * 3 + ["hole"] * 3
    y = np.array([0] * 4 + [1] * 6)
    maps = _maps_for(rng, masks, levels=None).astype(np.float32)
    s = maps.reshape(10, -1).max(axis=1)
    has_mask = np.array([True] * 4 + [True, True, False] + [True] * 3)
    out = M.evaluate(s, y, types, maps=maps, masks=masks, has_mask=has_mask)
    for k in ("image_auroc", "image_ap", "image_f1_max", "threshold", "pixel_auroc", "pixel_aupro"):
        assert isinstance(out[k], float), k
    assert out["image_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks[has_mask].ravel(), maps[has_mask].ravel()))
    assert out["pixel_aupro"] == pytest.approx(M.aupro(maps, masks, has_mask))
    assert set(out["per_defect"]) == {"crack", "hole"}
    assert set(out["curves"]) == {"roc", "pr", "pixel_roc"} and out["curves"]["pixel_roc"] is not None
    assert json.loads(json.dumps(out, allow_nan=False)) == out

    no_maps = M.evaluate(s, y, types)
    assert no_maps["pixel_auroc"] is None and no_maps["pixel_aupro"] is None and no_maps["curves"]["pixel_roc"] is None
    empty = M.evaluate(s, y, types, maps=maps, masks=np.zeros_like(masks))
    assert empty["pixel_auroc"] is None and empty["pixel_aupro"] is None
    one_class = M.evaluate(s[:4], y[:4], types[:4], maps=maps[:4], masks=masks[:4])
    assert one_class["image_auroc"] is None and one_class["curves"]["roc"] is None and one_class["pixel_aupro"] is None
    json.dumps(one_class, allow_nan=False)
