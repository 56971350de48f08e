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
_BLOCK = 1 << 20  # sorted scores per block in the tie groups and the curves' running sums (~40 bytes a score)


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
    if not _all_finite(m):
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


def _all_finite(a: np.ndarray) -> bool:
    """np.all(np.isfinite(a)) a block of _BLOCK values at a time (no bool array of a's size)."""
    flat = a.reshape(-1)
    return all(bool(np.isfinite(flat[i:i + _BLOCK]).all()) for i in range(0, flat.shape[0], _BLOCK))


class _SortedPixels:
    """Selected pixel scores sorted once, for the pixel ROC and PRO curves, without any per-pixel index array.

    asc: (n,) every selected score, ascending (a copy in the maps' dtype, 4 bytes a pixel for float32).
    pos_asc: (n_pos,) the defect pixels' scores, ascending. For a threshold t (flagging ``score >= t``) the
    positives flagged are ``n_pos − searchsorted(pos_asc, t, "left")`` and all pixels flagged
    ``n − searchsorted(asc, t, "left")``; the negatives are the difference. The counts are exact integers, so every
    curve built from them is the one the argsort of all pixels gave (an int64 order, 8 bytes a pixel, plus
    per-group int64 arrays).
    """

    def __init__(self, scores: np.ndarray, positive: np.ndarray):
        """scores (n,), positive (n,) bool; either may be a strided view (the stride subsample)."""
        self.asc = np.sort(scores)
        self.pos_asc = np.sort(scores[positive])
        self.n = int(self.asc.shape[0])
        self.n_pos = int(self.pos_asc.shape[0])
        self.n_neg = self.n - self.n_pos

    def groups(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Blocks of (tp (B,) int64, fp (B,) int64, thresholds (B,)) at every distinct score, decreasing over all
        blocks: tp / fp are the positives / negatives with ``score >= threshold`` (cumulative, as `_binary_curve`).

        Each distinct score is reported in the block of _BLOCK sorted scores that holds its first (lowest) position
        in `asc`; blocks go from the top of `asc` down.
        """
        asc, n = self.asc, self.n
        for b in range(n, 0, -_BLOCK):
            a = max(0, b - _BLOCK)
            v = asc[a:b]
            first = np.empty(b - a, dtype=bool)
            first[0] = a == 0 or bool(asc[a] != asc[a - 1])
            np.not_equal(v[1:], v[:-1], out=first[1:])
            at = np.flatnonzero(first)[::-1]  # each group's first position in the block, thresholds decreasing
            if at.shape[0] == 0:  # every score here belongs to a group that starts lower down
                continue
            thresholds = v[at]
            tp = self.n_pos - np.searchsorted(self.pos_asc, thresholds, side="left").astype(np.int64)
            fp = (n - a) - at.astype(np.int64) - tp
            yield tp, fp, thresholds


def _pixel_sort(
    m: np.ndarray, g: np.ndarray, max_pixels: int
) -> _SortedPixels | None:
    """The sorted selected pixels m (K,H,W), g (K,H,W) bool, stride-subsampled above max_pixels
    (``pixels[::ceil(n / max_pixels)]`` of the flattened order). None when they hold only one class."""
    flat_s = m.reshape(-1)
    flat_y = g.reshape(-1)
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    if flat_s.size > max_pixels:
        step = -(-flat_s.size // max_pixels)
        flat_s, flat_y = flat_s[::step], flat_y[::step]
    if flat_s.size == 0 or flat_y.all() or not flat_y.any():
        return None
    return _SortedPixels(flat_s, flat_y)


def _auroc_from_groups(sp: _SortedPixels) -> float | None:
    """Trapezoid ROC area of the pixel curve: exact int64 sums block by block (the same integer as
    `_curve_metrics`'s), normalised by the same float expression."""
    twice_area = 0
    last_tp = last_fp = 0
    for tp, fp, _ in sp.groups():
        tp0 = np.concatenate([[last_tp], tp])
        fp0 = np.concatenate([[last_fp], fp])
        twice_area += int((np.diff(fp0) * (tp0[1:] + tp0[:-1])).sum())
        last_tp, last_fp = int(tp[-1]), int(fp[-1])
    auroc = np.float64(twice_area) / (2.0 * np.float64(sp.n_pos) * np.float64(sp.n_neg))
    return _none_if_nan(float(auroc))


def _roc_from_groups(sp: _SortedPixels, max_points: int) -> dict:
    """`_roc_from_counts` of the pixel curve, a block at a time: (0, 0) first, collinear points dropped (a point is
    kept when the curve bends there, or it is the first or the last), then evenly down-sampled."""
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    carry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # the last two points: [decided, undecided]
    for tp, fp, thr in sp.groups():
        if carry is None:  # (0, 0) is reached by the next float above the highest score; it is always kept
            start = np.nextafter(thr[:1], np.inf)
            kept.append((np.zeros(1, np.int64), np.zeros(1, np.int64), start))
            carry = (np.zeros(1, np.int64), np.zeros(1, np.int64), start)
        ctp, cfp, cthr = (np.concatenate([c, x]) for c, x in zip(carry, (tp, fp, thr), strict=True))
        if ctp.size > 2:  # points 1 .. size-2 have both neighbours now
            bend = (np.diff(ctp, 2) != 0) | (np.diff(cfp, 2) != 0)
            keep = np.flatnonzero(bend) + 1
            kept.append((ctp[keep], cfp[keep], cthr[keep]))
        carry = (ctp[-2:], cfp[-2:], cthr[-2:])
    assert carry is not None
    kept.append((carry[0][-1:], carry[1][-1:], carry[2][-1:]))  # the last point is always kept
    tp_k, fp_k, thr_k = (np.concatenate(parts) for parts in zip(*kept, strict=True))
    idx = _downsample_index(tp_k.size, max_points)
    return {
        "fpr": (fp_k[idx] / sp.n_neg).tolist(),
        "tpr": (tp_k[idx] / sp.n_pos).tolist(),
        "thresholds": thr_k[idx].astype(np.float64).tolist(),
    }


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
    sp = _pixel_sort(*_check_pixels(maps, masks, valid), max_pixels)
    return None if sp is None else _auroc_from_groups(sp)


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
    sp = _pixel_sort(*_check_pixels(maps, masks, valid), max_pixels)
    return None if sp is None else _roc_from_groups(sp, max_points)


def _region_weights(g: np.ndarray) -> tuple[np.ndarray, int]:
    """Each defect pixel's PRO weight, 1 / (its region's size · number of regions), in the order of ``g``'s True
    pixels (image, row, column), and the number of regions.

    Regions are the 8-connected components of each image's mask, labelled one image at a time (a label array of
    the whole set is 4 bytes a pixel).
    """
    eight = np.ones((3, 3), dtype=bool)
    ids, sizes = [], []
    offset = 0  # regions of the images before this one
    for mask in g:
        if not mask.any():
            continue
        lab, k = ndimage.label(mask, structure=eight)
        own = lab[mask]  # 1..k in raster order
        ids.append(own.astype(np.int64) + (offset - 1))
        sizes.append(np.bincount(own, minlength=k + 1)[1:])
        offset += k
    if not sizes:
        return np.zeros(0), 0
    size = np.concatenate(sizes).astype(np.float64)
    n_regions = int(size.shape[0])
    weight = 1.0 / (size * n_regions)
    return weight[np.concatenate(ids)], n_regions


def _pro_curve(
    m: np.ndarray, g: np.ndarray, sorted_pixels: _SortedPixels | None = None, fpr_limit: float | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The exact PRO curve over selected pixels m (K,H,W), g (K,H,W) bool: (fpr (G+1,), pro (G+1,)) at (0, 0) and
    then at every distinct map value, decreasing. sorted_pixels: ``_SortedPixels`` of all of m and g when already
    made. fpr_limit: stop at the first point whose FPR reaches it (the points after it do not enter the area up to
    it).

    Regions are the 8-connected components of each mask. Every selected pixel outside a region is a normal pixel
    (including pixels of anomalous images whose mask is empty). None when there is no region or no normal pixel.
    At threshold t the FPR is (normal pixels ≥ t) / (normal pixels), counted from the sorted scores, and the PRO
    the running sum of the defect pixels' weights (1 / (region size · regions)) over the defect pixels ≥ t,
    summed in decreasing score order (normal pixels carry weight 0, so this is the sum over every pixel in that
    order). Memory: the sorted scores (4 bytes a pixel) and a few arrays per defect pixel.
    """
    weight, n_regions = _region_weights(g)
    n_normal = int(g.size - weight.shape[0])
    if n_regions == 0 or n_normal == 0:
        return None
    pos = m[g]
    down = np.argsort(pos, kind="stable")[::-1]
    pro_run = np.cumsum(weight[down])  # after the k highest-scoring defect pixels
    del down
    sp = sorted_pixels if sorted_pixels is not None else _SortedPixels(m.reshape(-1), g.reshape(-1))
    del pos
    fpr_parts, pro_parts = [np.zeros(1)], [np.zeros(1)]
    for tp, fp, _ in sp.groups():
        fpr_part = fp / n_normal
        pro_part = np.where(tp > 0, pro_run[np.maximum(tp - 1, 0)], 0.0)
        np.minimum(pro_part, 1.0, out=pro_part)
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
    No subsampling: time is one sort of all selected pixels; memory the sorted scores (4 bytes a pixel for float32
    maps) and a few arrays per defect pixel.
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
        pixels); AUPRO always uses every pixel. Below 20M pixels one sort serves both. Memory: the sorted pixel
        scores (4 bytes a pixel; no per-pixel index), the defect mask (1 byte a pixel), a few arrays per defect
        pixel and blocks of _BLOCK pixels.

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
        if not _all_finite(m):
            raise ValueError("maps contain NaN/inf")
    if m is not None and masks is not None:
        valid = np.ones(s.shape[0], dtype=bool) if has_mask is None else np.asarray(has_mask, dtype=bool)
        m_sel, g_sel = _check_pixels(m, masks, valid)
        if g_sel.any() and not g_sel.all():
            sp = _pixel_sort(m_sel, g_sel, _MAX_PIXELS)
            if sp is not None:  # a stride subsample could in principle miss every defect pixel
                out["pixel_auroc"] = _auroc_from_groups(sp)
                curves["pixel_roc"] = _roc_from_groups(sp, 512)
            if sp is not None and sp.n != m_sel.size:  # the subsample's sort is not the PRO curve's: free it first
                sp = None
            pro_curve = _pro_curve(m_sel, g_sel, sp, fpr_limit=0.3)
            out["pixel_aupro"] = None if pro_curve is None else _area_to_limit(*pro_curve, 0.3)
    out["curves"] = curves
    return out
