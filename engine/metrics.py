"""Image- and pixel-level anomaly-detection metrics (DESIGN §6).

Everything takes numpy arrays and returns plain Python floats, ints, lists and dicts, so results can be written
to ``results.json`` as they are. A metric that is undefined for the data (one class only, no masks) is ``None``;
no number is ever made up.

Conventions used throughout:
    scores (N,) float, higher = more anomalous; an image is flagged when ``score >= threshold``.
    labels (N,) in {0, 1} (1 = anomalous).
    maps   (N, H, W) float anomaly maps; masks (N, H, W) in {0, 1} (any value > 0 counts as a defect pixel).
    valid  (N,) bool, which images have pixel ground truth (images with ``False`` are left out of pixel metrics).

Ties between scores are handled exactly: all samples with the same score enter a curve together, and AUROC is the
trapezoid area, which equals the Mann-Whitney statistic with ties counted as one half (as scikit-learn does).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from scipy import ndimage

__all__ = [
    "image_metrics",
    "roc_points",
    "pr_points",
    "pixel_auroc",
    "pixel_roc_points",
    "aupro",
    "per_defect_auroc",
    "bootstrap_ci",
    "threshold_at_fpr",
    "confusion_at",
    "evaluate",
]

_BOOT_METRICS = ("image_auroc", "image_ap", "image_f1_max")
_MAX_PIXELS = 20_000_000  # default pixel budget of pixel_auroc / evaluate
_BOOT_CHUNK_CELLS = 2_000_000  # rows x images per vectorised bootstrap chunk (bounds memory)
_BLOCK = 1 << 22  # sorted pixels per block in the shared sort's tie groups and the PRO curve's running sums


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores float64 (N,), labels int64 (N,)) after checking shapes, finiteness and label values."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores ({s.shape[0]}) and labels ({y.shape[0]}) differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN/inf")
    if y.size and not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    return s, y.astype(np.int64)


def _check_pixels(maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Select the images with ground truth. Returns (maps (K,H,W), defect (K,H,W) bool)."""
    m = np.asarray(maps)
    g = np.asarray(masks)
    if m.ndim != 3 or m.shape != g.shape:
        raise ValueError(f"maps and masks must both be (N, H, W) with equal shapes, got {m.shape} and {g.shape}")
    if valid is not None:
        v = np.asarray(valid, dtype=bool).reshape(-1)
        if v.shape[0] != m.shape[0]:
            raise ValueError(f"valid has {v.shape[0]} entries for {m.shape[0]} maps")
        if not v.all():  # indexing copies the maps: only when some image is left out
            m, g = m[v], g[v]
    if not np.all(np.isfinite(m)):
        raise ValueError("maps contain NaN/inf")
    return m, g > 0


# ----------------------------------------------------------------------------------------------------------------
# the shared sort: distinct thresholds in decreasing order with cumulative counts


def _sort_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort scores (N,) decreasing and group ties.

    Returns (order (N,), starts (G,), thresholds (G,)): ``scores[order]`` is non-increasing, ``starts`` are the
    positions in that order where each group of equal scores begins, ``thresholds`` the distinct scores (decreasing).
    """
    order = np.argsort(scores)[::-1]  # order within ties is irrelevant: only group totals are used
    n = order.shape[0]
    # Where the sorted scores change, compared a block at a time: the sorted scores themselves are never held
    # (4 bytes a score, next to the 8 of `order`).
    new_group = np.empty(n, dtype=bool)
    new_group[:1] = True
    for a in range(1, n, _BLOCK):
        b = min(a + _BLOCK, n)
        np.not_equal(scores[order[a:b]], scores[order[a - 1:b - 1]], out=new_group[a:b])
    starts = np.flatnonzero(new_group).astype(np.int64, copy=False)
    return order, starts, scores[order[starts]]


def _binary_curve(
    scores: np.ndarray, labels: np.ndarray, groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (tp (G,), fp (G,), thresholds (G,)) when flagging ``score >= threshold`` for each distinct score.

    groups: the result of ``_sort_groups(scores)`` when already computed. Counts are exact integers: tp is the running
    count of positives at each group's last score (a block of sorted scores at a time, see `_group_ends`), fp the
    scores up to there minus tp.
    """
    order, starts, thresholds = _sort_groups(scores) if groups is None else groups
    n = scores.shape[0]
    tp = np.empty(starts.shape[0], dtype=np.int64)
    carry = 0
    for a, b, first, ends in _group_ends(starts, n):
        run = np.cumsum(labels[order[a:b]], dtype=np.int64)
        run += carry
        carry = int(run[-1])
        tp[first:first + ends.shape[0]] = run[ends]
    fp = np.empty_like(tp)
    np.subtract(starts[1:], tp[:-1], out=fp[:-1])  # group g's last score is the starts[g + 1]-th
    fp[-1:] = n - tp[-1:]
    return tp, fp, thresholds


def _group_ends(starts: np.ndarray, n: int) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Blocks [a, b) of _BLOCK sorted scores with the groups that end in them: (a, b, first group, their last
    positions − a). Group g of `_sort_groups` ends at starts[g + 1] − 1 (the last group at n − 1)."""
    done = 0
    for a in range(0, n, _BLOCK):
        b = min(a + _BLOCK, n)
        last = int(np.searchsorted(starts, b, side="right"))  # groups done..last-2 end in this block
        ends = starts[done + 1:last] - 1
        if b == n:
            ends = np.append(ends, n - 1)  # the last group ends with the last score
        ends -= a
        yield a, b, done, ends
        done += ends.shape[0]


def _curve_metrics(tp: np.ndarray, fp: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC, AP and F1-max for B curves at once.

    tp, fp: (B, G) cumulative true / false positives at G decreasing thresholds (the last column holds all positives
    and all negatives). Returns arrays (B,): auroc, ap, f1_max, f1_index (column where F1-max is first reached);
    rows with one class only get NaN.
    """
    tp = np.asarray(tp, dtype=np.int64)
    fp = np.asarray(fp, dtype=np.int64)
    n_pos = tp[:, -1].astype(np.float64)
    n_neg = fp[:, -1].astype(np.float64)
    zero = np.zeros((tp.shape[0], 1), dtype=np.int64)
    tp0 = np.concatenate([zero, tp], axis=1)
    fp0 = np.concatenate([zero, fp], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # trapezoid under (fp, tp) with (0, 0) prepended, in exact integer arithmetic, then normalised
        twice_area = (np.diff(fp0, axis=1) * (tp0[:, 1:] + tp0[:, :-1])).sum(axis=1)
        auroc = twice_area / (2.0 * n_pos * n_neg)
        flagged = tp + fp
        precision = np.divide(tp, flagged, out=np.zeros(tp.shape), where=flagged > 0)
        ap = (np.diff(tp0, axis=1) * precision).sum(axis=1) / n_pos
        f1 = 2.0 * tp / (flagged + n_pos[:, None])
    f1_index = np.argmax(f1, axis=1)
    f1_max = f1[np.arange(f1.shape[0]), f1_index]
    bad = (n_pos == 0) | (n_neg == 0)
    for a in (auroc, ap, f1_max):
        a[bad] = np.nan
    return {"auroc": auroc, "ap": ap, "f1_max": f1_max, "f1_index": f1_index}


def _downsample_index(n: int, max_points: int) -> np.ndarray:
    """Indices of at most max_points evenly spaced positions in range(n), first and last always kept."""
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(np.int64))


def _roc_from_counts(tp: np.ndarray, fp: np.ndarray, thresholds: np.ndarray, max_points: int) -> dict:
    """ROC points (with the (0, 0) start) from cumulative counts, collinear points dropped, then down-sampled."""
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    # (0, 0) is reached by a real threshold: the next float above the highest score flags nothing
    tp = np.concatenate([[0], tp])
    fp = np.concatenate([[0], fp])
    thr = np.concatenate([[np.nextafter(thresholds[0], np.inf)], thresholds])
    if tp.size > 2:  # a point in the middle of a straight segment adds nothing to the plot or the area
        bend = (np.diff(tp, 2) != 0) | (np.diff(fp, 2) != 0)
        keep = np.concatenate([[True], bend, [True]])
        tp, fp, thr = tp[keep], fp[keep], thr[keep]
    idx = _downsample_index(tp.size, max_points)
    return {
        "fpr": (fp[idx] / n_neg).tolist(),
        "tpr": (tp[idx] / n_pos).tolist(),
        "thresholds": thr[idx].astype(np.float64).tolist(),
    }


def _none_if_nan(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


# ----------------------------------------------------------------------------------------------------------------
# image level


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Image AUROC, average precision, F1-max and the threshold where F1-max is reached.

    Args:
        scores: (N,) anomaly scores, higher = more anomalous.
        labels: (N,) in {0, 1}.

    Returns:
        ``{"image_auroc", "image_ap", "image_f1_max", "threshold"}`` as floats, each ``None`` when only one class is
        present. AP is the step-wise sum over thresholds of (recall gain x precision), as scikit-learn computes it.
        ``threshold`` is the (highest) score at which F1-max is reached; images with ``score >= threshold`` are
        flagged.

    Raises:
        ValueError: non-finite scores, bad labels or shapes.
    """
    s, y = _check_scores_labels(scores, labels)
    undefined = {"image_auroc": None, "image_ap": None, "image_f1_max": None, "threshold": None}
    if s.size == 0 or y.min() == y.max():
        return undefined
    tp, fp, thresholds = _binary_curve(s, y)
    m = _curve_metrics(tp[None], fp[None])
    return {
        "image_auroc": float(m["auroc"][0]),
        "image_ap": float(m["ap"][0]),
        "image_f1_max": float(m["f1_max"][0]),
        "threshold": float(thresholds[m["f1_index"][0]]),
    }


def roc_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 512) -> dict | None:
    """ROC curve points for plotting.

    Args:
        scores: (N,) anomaly scores. labels: (N,) in {0, 1}.
        max_points: the most points returned (>= 2); the curve starts at (0, 0) and ends at (1, 1).

    Returns:
        ``{"fpr": [...], "tpr": [...], "thresholds": [...]}`` ordered by decreasing threshold; each threshold is a
        real one that gives its point (for (0, 0): the next float above the highest score). Collinear points are
        dropped before evenly down-sampling. ``None`` when only one class is present.
    """
    s, y = _check_scores_labels(scores, labels)
    if s.size == 0 or y.min() == y.max():
        return None
    tp, fp, thresholds = _binary_curve(s, y)
    return _roc_from_counts(tp, fp, thresholds, max_points)


def pr_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 512) -> dict | None:
    """Precision-recall points for plotting.

    Args:
        scores: (N,) anomaly scores. labels: (N,) in {0, 1}.
        max_points: the most points returned (>= 2); the first (highest threshold) and last (recall 1) are kept.

    Returns:
        ``{"recall": [...], "precision": [...], "thresholds": [...]}``, one point per distinct score (then evenly
        down-sampled), ordered by decreasing threshold, so recall rises. Only measured points: no artificial
        (recall 0, precision 1) point is added. ``None`` when only one class is present.
    """
    s, y = _check_scores_labels(scores, labels)
    if s.size == 0 or y.min() == y.max():
        return None
    tp, fp, thresholds = _binary_curve(s, y)
    idx = _downsample_index(tp.size, max_points)
    return {
        "recall": (tp[idx] / tp[-1]).tolist(),
        "precision": (tp[idx] / (tp[idx] + fp[idx])).tolist(),
        "thresholds": thresholds[idx].astype(np.float64).tolist(),
    }


def per_defect_auroc(scores: np.ndarray, labels: np.ndarray, defect_types: list[str]) -> dict[str, dict]:
    """Image AUROC of each defect type against all good images.

    Args:
        scores: (N,). labels: (N,) in {0, 1}. defect_types: N names; ``"good"`` marks normal images.

    Returns:
        ``{type: {"image_auroc": float | None, "n": int}}`` for every type other than ``"good"`` (sorted by name).
        The positives are that type's images with label 1, the negatives every image with label 0; ``n`` counts the
        type's images. ``image_auroc`` is ``None`` when there are no good images or no anomalous image of the type.
    """
    s, y = _check_scores_labels(scores, labels)
    types = np.asarray([str(t) for t in defect_types], dtype=object)
    if types.shape[0] != s.shape[0]:
        raise ValueError(f"defect_types has {types.shape[0]} entries for {s.shape[0]} scores")
    out: dict[str, dict] = {}
    for t in sorted(set(types.tolist()) - {"good"}):
        of_type = types == t
        sel = (of_type & (y == 1)) | (y == 0)
        m = image_metrics(s[sel], y[sel])
        out[t] = {"image_auroc": m["image_auroc"], "n": int(of_type.sum())}
    return out


def bootstrap_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    metric: str = "image_auroc",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of an image metric, resampling images with replacement.

    Args:
        scores: (N,). labels: (N,) in {0, 1}.
        metric: ``"image_auroc"``, ``"image_ap"`` or ``"image_f1_max"``.
        n_boot: number of resamples. alpha: 1 - confidence level (0.05 gives a 95% interval). seed: RNG seed.

    Returns:
        ``(low, high)``, the alpha/2 and 1 - alpha/2 quantiles of the metric over the resamples; resamples holding
        one class only are skipped. ``None`` when the metric is undefined on the data or no resample is usable.

    Each resample is a vector of image multiplicities (B, N); the curves of a whole chunk of resamples are built at
    once from one sort of the scores, so 1000 resamples of a few thousand images take well under a second.
    """
    if metric not in _BOOT_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(_BOOT_METRICS)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    if n_boot < 1:
        raise ValueError("n_boot must be positive")
    s, y = _check_scores_labels(scores, labels)
    n = s.shape[0]
    if n == 0 or y.min() == y.max():
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_CELLS // n)
    values = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        values.append(_metric_from_counts(s, y, counts, metric))
    v = np.concatenate(values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    low, high = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _metric_from_counts(scores: np.ndarray, labels: np.ndarray, counts: np.ndarray, metric: str) -> np.ndarray:
    """Metric (B,) for B weighted copies of the data: counts (B, N) integer multiplicity of each image.

    Equal to computing the metric on the data with each image repeated counts[b, i] times; NaN where a row has one
    class only.
    """
    order, starts, _ = _sort_groups(scores)
    c = np.asarray(counts, dtype=np.int64)[:, order]
    pos_sorted = labels[order].astype(bool)
    pos = np.add.reduceat(np.where(pos_sorted, c, 0), starts, axis=1)
    neg = np.add.reduceat(np.where(pos_sorted, 0, c), starts, axis=1)
    m = _curve_metrics(np.cumsum(pos, axis=1), np.cumsum(neg, axis=1))
    return {"image_auroc": m["auroc"], "image_ap": m["ap"], "image_f1_max": m["f1_max"]}[metric]


def threshold_at_fpr(scores_good: np.ndarray, max_fpr: float) -> float:
    """Smallest threshold that flags (``score >= threshold``) at most ``max_fpr`` of the good images.

    Args:
        scores_good: (M,) scores of normal images, M >= 1.
        max_fpr: allowed false-positive rate in [0, 1].

    Returns:
        With k = floor(max_fpr * M) allowed false positives: the next float above the (k+1)-th highest good score
        (so that score and every lower one are not flagged); when k >= M every image may be flagged and the lowest
        good score is returned.
    """
    s = np.asarray(scores_good, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("threshold_at_fpr needs at least one good score")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN/inf")
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError("max_fpr must be in [0, 1]")
    k = int(math.floor(max_fpr * s.size + 1e-9))
    if k >= s.size:
        return float(s.min())
    kth = np.partition(s, s.size - 1 - k)[s.size - 1 - k]  # the (k+1)-th highest score
    return float(np.nextafter(kth, np.inf))


def confusion_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Confusion counts and rates when flagging ``score >= threshold``.

    Args:
        scores: (N,). labels: (N,) in {0, 1}. threshold: decision threshold.

    Returns:
        ``{"tp", "fp", "tn", "fn"}`` as ints and ``{"tpr", "fpr", "precision"}`` as floats, each rate ``None`` when
        its denominator is zero (no anomalous images, no good images, nothing flagged).
    """
    s, y = _check_scores_labels(scores, labels)
    flagged = s >= threshold
    pos = y == 1
    tp = int(np.sum(flagged & pos))
    fp = int(np.sum(flagged & ~pos))
    fn = int(np.sum(~flagged & pos))
    tn = int(np.sum(~flagged & ~pos))
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "tpr": tp / (tp + fn) if tp + fn else None,
        "fpr": fp / (fp + tn) if fp + tn else None,
        "precision": tp / (tp + fp) if tp + fp else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# pixel level


def _pixel_curve(
    m: np.ndarray, g: np.ndarray, max_pixels: int, groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Cumulative (tp, fp, thresholds) over selected pixels m (K,H,W), g (K,H,W) bool, stride-subsampled above
    max_pixels. groups: ``_sort_groups(m.ravel())`` when already computed (only used without subsampling).

    None when the selected pixels hold only one class.
    """
    flat_s = m.reshape(-1)
    flat_y = g.reshape(-1)
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    if flat_s.size > max_pixels:
        step = -(-flat_s.size // max_pixels)
        flat_s, flat_y = flat_s[::step], flat_y[::step]
        groups = None
    if flat_s.size == 0 or flat_y.all() or not flat_y.any():
        return None
    return _binary_curve(flat_s, flat_y, groups)


def pixel_auroc(
    maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None, max_pixels: int = _MAX_PIXELS
) -> float | None:
    """Pixel-level AUROC over all pixels of the images with ground truth.

    Args:
        maps: (N, H, W) anomaly maps. masks: (N, H, W) in {0, 1}. valid: (N,) bool, images with ground truth
            (default: all).
        max_pixels: above this many selected pixels, the AUROC is computed on the deterministic uniform subsample
            ``pixels[::ceil(n / max_pixels)]`` of the flattened (image, row, column) order, an estimate, to bound time
            and memory. At or below it the value is exact (one sort, ties handled as in scikit-learn).

    Returns:
        The AUROC, or ``None`` when the selected pixels have no defect pixel or no normal pixel.
    """
    curve = _pixel_curve(*_check_pixels(maps, masks, valid), max_pixels)
    if curve is None:
        return None
    tp, fp, _ = curve
    return _none_if_nan(_curve_metrics(tp[None], fp[None])["auroc"][0])


def pixel_roc_points(
    maps: np.ndarray,
    masks: np.ndarray,
    valid: np.ndarray | None = None,
    max_points: int = 512,
    max_pixels: int = _MAX_PIXELS,
) -> dict | None:
    """Pixel ROC points for plotting (same selection and subsampling as :func:`pixel_auroc`).

    Returns:
        ``{"fpr", "tpr", "thresholds"}`` as in :func:`roc_points`, or ``None`` when one pixel class is missing.
    """
    curve = _pixel_curve(*_check_pixels(maps, masks, valid), max_pixels)
    if curve is None:
        return None
    return _roc_from_counts(*curve, max_points)


def _pro_curve(
    m: np.ndarray, g: np.ndarray, groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    fpr_limit: float | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The exact PRO curve over selected pixels m (K,H,W), g (K,H,W) bool: (fpr (G+1,), pro (G+1,)) at (0, 0) and
    then at every distinct map value, decreasing. groups: ``_sort_groups(m.ravel())`` when already computed.
    fpr_limit: stop at the first point whose FPR reaches it (the points after it do not enter the area up to it).

    Regions are the 8-connected components of each mask. Every selected pixel outside a region is a normal pixel
    (including pixels of anomalous images whose mask is empty). None when there is no region or no normal pixel.
    The running sums go over the sorted pixels in blocks of _BLOCK, each block's first term carrying the sum so
    far, so they are the same additions in the same order as one cumulative sum over all pixels, without its
    per-pixel arrays (8 bytes a pixel each: 343 MB for 582 maps of 288×256 px).
    """
    # label all masks in one call; the structure links pixels only within a slice, so regions never span images
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, n_regions = ndimage.label(g, structure=structure)
    n_normal = int(g.size - np.count_nonzero(g))
    if n_regions == 0 or n_normal == 0:
        return None
    regions = regions.reshape(-1)
    sizes = np.bincount(regions, minlength=n_regions + 1).astype(np.float64)
    # each region pixel carries 1 / (its region's size * number of regions): the sum over flagged pixels is the mean
    # overlap over regions; region 0 (normal pixels) gets weight 0 here
    pixel_weight = np.zeros(n_regions + 1)
    pixel_weight[1:] = 1.0 / (sizes[1:] * n_regions)
    order, starts, _ = _sort_groups(m.reshape(-1)) if groups is None else groups
    n = order.shape[0]
    # the curve's points: (0, 0), then the sums at the last pixel of each group (group g ends at starts[g + 1] - 1)
    fpr_parts, pro_parts = [np.zeros(1)], [np.zeros(1)]
    fp_sum, pro_sum = 0, 0.0
    for a, b, _, ends in _group_ends(starts, n):
        r = regions[order[a:b]]
        fp_run = np.cumsum(r == 0)
        fp_run += fp_sum
        w = pixel_weight[r]
        w[0] += pro_sum
        pro_run = np.cumsum(w)
        fp_sum, pro_sum = int(fp_run[-1]), float(pro_run[-1])
        fpr_part = fp_run[ends] / n_normal
        pro_part = np.minimum(pro_run[ends], 1.0)
        if fpr_limit is not None and fpr_part.shape[0] and fpr_part[-1] >= fpr_limit:
            # earlier points are all below the limit: keep up to the first point at or past it, the last one used
            stop = int(np.searchsorted(fpr_part, fpr_limit, side="left")) + 1
            fpr_parts.append(fpr_part[:stop])
            pro_parts.append(pro_part[:stop])
            break
        fpr_parts.append(fpr_part)
        pro_parts.append(pro_part)
    return np.concatenate(fpr_parts), np.concatenate(pro_parts)


def aupro(maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None, fpr_limit: float = 0.3) -> float | None:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, divided by ``fpr_limit``.

    Args:
        maps: (N, H, W) anomaly maps. masks: (N, H, W) in {0, 1}. valid: (N,) bool, images with ground truth.
        fpr_limit: integration limit on the pixel false-positive rate, in (0, 1].

    Returns:
        A value in [0, 1] (1.0 for a map that scores every defect pixel above every normal pixel), or ``None``
        when the selected masks contain no defect region or no normal pixel.

    The curve is exact: pixels are sorted by score once, and at every distinct score t (flagging ``map >= t``) the
    FPR is (normal pixels flagged) / (normal pixels) and the PRO the mean over all regions (8-connected components
    of each mask, across all images) of the flagged fraction of the region. Points are joined linearly (ties enter
    together), the curve is cut at ``fpr_limit`` by linear interpolation and integrated with the trapezoid rule.
    No subsampling: time is one sort of all selected pixels, memory a few tens of bytes per pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError("fpr_limit must be in (0, 1]")
    curve = _pro_curve(*_check_pixels(maps, masks, valid), fpr_limit=fpr_limit)
    if curve is None:
        return None
    return _area_to_limit(*curve, fpr_limit)


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under (fpr, pro) (fpr non-decreasing, ending at 1) up to fpr_limit, divided by fpr_limit."""
    # first point at or beyond the limit; the last point has fpr == 1, so it always exists and idx >= 1
    idx = int(np.searchsorted(fpr, fpr_limit, side="left"))
    x0, x1, y0, y1 = fpr[idx - 1], fpr[idx], pro[idx - 1], pro[idx]
    y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    x = np.append(fpr[:idx], fpr_limit)
    y = np.append(pro[:idx], y_cut)
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)
    return min(max(area / fpr_limit, 0.0), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# everything for one run


def evaluate(
    scores: np.ndarray,
    labels: np.ndarray,
    defect_types: list[str],
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    has_mask: np.ndarray | None = None,
) -> dict:
    """All metrics of one run: the DESIGN §7 ``metrics`` dict plus curves for plotting.

    Args:
        scores: (N,) image scores. labels: (N,) in {0, 1}. defect_types: N names, ``"good"`` for normal images.
        maps: (N, H, W) anomaly maps or None (method without localisation).
        masks: (N, H, W) in {0, 1} or None. has_mask: (N,) bool, which images have pixel ground truth (default: all
            when masks are given). Good images with ground truth should be marked True with an empty mask.

    Returns:
        ``{"image_auroc", "image_ap", "image_f1_max", "threshold", "pixel_auroc", "pixel_aupro", "per_defect",
        "curves": {"roc", "pr", "pixel_roc"}}``. Pixel metrics and ``pixel_roc`` are ``None`` when there are no
        maps or masks, or no image with ground truth has a defect pixel; image metrics and curves are ``None`` when
        only one class is present. Pixel AUROC and its curve follow :func:`pixel_auroc` (stride subsample above 20M
        pixels); AUPRO always uses every pixel. Below 20M pixels one sort serves both.

    Raises:
        ValueError: ``"scores contain NaN/inf"`` (or ``"maps contain NaN/inf"``), and on inconsistent shapes.
    """
    s, y = _check_scores_labels(scores, labels)
    if len(defect_types) != s.shape[0]:
        raise ValueError(f"defect_types has {len(defect_types)} entries for {s.shape[0]} scores")
    out: dict = dict(image_metrics(s, y))
    out["pixel_auroc"] = None
    out["pixel_aupro"] = None
    out["per_defect"] = per_defect_auroc(s, y, defect_types)
    curves: dict = {"roc": roc_points(s, y), "pr": pr_points(s, y), "pixel_roc": None}
    m = None if maps is None else np.asarray(maps)
    if m is not None:
        if m.ndim != 3 or m.shape[0] != s.shape[0]:
            raise ValueError(f"maps must be (N, H, W) with N = {s.shape[0]}, got {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError("maps contain NaN/inf")
    if m is not None and masks is not None:
        valid = np.ones(s.shape[0], dtype=bool) if has_mask is None else np.asarray(has_mask, dtype=bool)
        m_sel, g_sel = _check_pixels(m, masks, valid)
        if g_sel.any() and not g_sel.all():
            groups = _sort_groups(m_sel.reshape(-1)) if m_sel.size <= _MAX_PIXELS else None  # one sort for both
            curve = _pixel_curve(m_sel, g_sel, _MAX_PIXELS, groups)
            if curve is not None:  # a stride subsample could in principle miss every defect pixel
                tp, fp, thr = curve
                out["pixel_auroc"] = _none_if_nan(_curve_metrics(tp[None], fp[None])["auroc"][0])
                curves["pixel_roc"] = _roc_from_counts(tp, fp, thr, 512)
            pro_curve = _pro_curve(m_sel, g_sel, groups, fpr_limit=0.3)
            out["pixel_aupro"] = None if pro_curve is None else _area_to_limit(*pro_curve, 0.3)
    out["curves"] = curves
    return out
