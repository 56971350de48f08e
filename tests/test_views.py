"""Unit tests of the dashboard's pure figure and image functions (dashboard/views)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from dashboard.views import diagrams, images, plots


def test_to_rgb_uint8_handles_layouts() -> None:
    assert images.to_rgb_uint8(np.zeros((3, 8, 9), np.uint8)).shape == (8, 9, 3)
    assert images.to_rgb_uint8(np.zeros((8, 9), np.uint8)).shape == (8, 9, 3)
    out = images.to_rgb_uint8(np.ones((4, 4, 1), np.float32))
    assert out.dtype == np.uint8 and out.max() == 255


def test_overlay_mask_tints_only_the_mask() -> None:
    img = np.full((10, 10, 3), 100, np.uint8)
    mask = np.zeros((10, 10), np.uint8)
    mask[2:6, 2:6] = 1
    out = images.overlay_mask(img, mask, color=(0, 255, 0))
    assert out.shape == img.shape
    assert (out[0, 0] == 100).all()  # outside untouched
    assert tuple(out[2, 2]) == (0, 255, 0)  # outline opaque
    assert out[3, 3, 1] > 100 and out[3, 3, 0] < 100  # interior tinted
    assert (images.overlay_mask(img, None) == img).all()
    assert (images.overlay_mask(img, np.zeros((10, 10))) == img).all()


def test_overlay_mask_resizes_mask() -> None:
    out = images.overlay_mask(np.zeros((20, 20, 3), np.uint8), np.ones((10, 10)))
    assert out.shape == (20, 20, 3) and out.any()


def test_mask_outline() -> None:
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    o = images.mask_outline(m)
    assert o.sum() == 8 and not o[2, 2]


def test_colorize_range_and_monotone_brightness() -> None:
    a = np.linspace(0, 1, 50)[None, :]
    rgb = images.colorize(a, 0.0, 1.0)
    assert rgb.shape == (1, 50, 3) and rgb.dtype == np.uint8
    lum = rgb[0].astype(float).sum(axis=1)
    assert lum[0] < lum[25] < lum[-1]
    assert (images.colorize(a, 1.0, 1.0) == images.colorize(np.zeros_like(a), 0, 1)).all()  # flat range: no crash
    assert np.isfinite(images.colorize(np.array([[np.nan]]), 0, 1)).all()


def test_blend_and_heat_overlay() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    ov = np.full((8, 8, 3), 200, np.uint8)
    assert (images.blend(img, ov, 0.0) == 0).all()
    assert (images.blend(img, ov, 1.0) == 200).all()
    out = images.heat_overlay(img, np.random.default_rng(0).random((4, 4)), 0, 1, 0.5)
    assert out.shape == (8, 8, 3)


def test_colour_ranges_modes() -> None:
    maps = {"a": np.linspace(0, 1, 1000).reshape(10, 10, 10), "b": np.linspace(5, 10, 1000).reshape(10, 10, 10)}
    own = images.colour_ranges(maps, "per_method")
    assert own["a"][1] <= 1.0 and own["b"][0] >= 5.0
    shared = images.colour_ranges(maps, "shared")
    assert shared["a"] == shared["b"] and shared["a"][0] < 1 and shared["a"][1] > 9
    with pytest.raises(ValueError):
        images.colour_ranges(maps, "bogus")
    assert images.colour_bar(100, 5).shape == (5, 100, 3)


def test_roc_and_pr_figures_one_trace_per_method() -> None:
    curves = [plots.Curve("a", [0, 0.5, 1], [0, 0.9, 1], 0.9), plots.Curve("b", [0, 1], [0, 1], None)]
    fig = plots.roc_figure(curves)
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert "a (AUROC 0.900)" in names and "b (AUROC n/a)" in names and len(fig.data) == 3
    pr = plots.pr_figure([plots.Curve("a", [0, 1], [1, 0.5], 0.8)], base_rate=0.4)
    assert any("AP 0.800" in t.name for t in pr.data)


def test_pareto_front() -> None:
    # speed, accuracy: c is dominated by a (faster and more accurate)
    assert plots.pareto_front([10, 5, 4], [0.9, 0.95, 0.8]) == [1, 0]
    assert plots.pareto_front([1.0], [0.5]) == [0]
    assert plots.pareto_front([], []) == []


def test_speed_accuracy_marks_front() -> None:
    fig = plots.speed_accuracy_figure(["a", "b", "c"], [10, 5, 4], [0.9, 0.95, 0.8])
    starred = [t.name for t in fig.data if t.marker is not None and t.marker.symbol == "star"]
    assert sorted(starred) == ["a ★ best trade-off", "b ★ best trade-off"]


def test_per_defect_figure_handles_missing() -> None:
    fig = plots.per_defect_figure(["a", "b"], ["x", "y"], [[0.9, None], [0.7, 1.0]])
    assert fig.data[0].text[0][1] == "n/a"
    assert np.isnan(fig.data[0].z[0][1])


def test_score_figure() -> None:
    fig = plots.score_figure([0.1, 0.2, 0.9], [0, 0, 1], 0.5, "m")
    assert len(fig.data) == 2


def test_every_family_has_a_diagram() -> None:
    from engine.registry import FAMILIES

    for fam in FAMILIES:
        dot = diagrams.family_diagram(fam)
        assert dot.startswith("digraph {") and dot.endswith("}") and "->" in dot
    assert set(FAMILIES) <= set(diagrams.known_families())
    assert "->" in diagrams.family_diagram("something_new")


def test_every_family_has_learn_text() -> None:
    from dashboard import content
    from engine.registry import FAMILIES

    for fam in FAMILIES:
        t = content.family_text(fam)
        assert t.how and t.strengths and t.failures and t.localisation


def test_labelled_curve_figure_lines_bars_and_reference() -> None:
    from dashboard.views.plots import labelled_curve_figure

    series = {"devnet": [{"k": 0, "image_auroc": None, "image_auroc_ci": None},
                         {"k": 1, "image_auroc": 0.7, "image_auroc_ci": [0.6, 0.9]},
                         {"k": 3, "image_auroc": 0.8, "image_auroc_ci": [0.7, 0.85]}],
              "cavga": [{"k": 1, "image_auroc": 0.5, "image_auroc_ci": None}]}
    ref = {"method": "patchcore", "value": 0.75, "ci": [0.7, 0.8]}
    fig = labelled_curve_figure([0, 1, 3], series, ref)
    by_name = {t.name: t for t in fig.data}
    d = by_name["devnet"]
    assert list(d.x) == [1, 3] and list(d.y) == [0.7, 0.8]  # the failed K = 0 is left out
    assert list(d.error_y.array) == pytest.approx([0.2, 0.05]) and list(d.error_y.arrayminus) == pytest.approx(
        [0.1, 0.1])
    assert by_name["cavga"].error_y.array is None  # no interval, no bars
    line = by_name["patchcore, unsupervised (0.750)"]
    assert list(line.x) == [0, 3] and list(line.y) == [0.75, 0.75]
    assert sorted(by_name["patchcore 95% interval"].y) == [0.7, 0.7, 0.8, 0.8]
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 3]
    bare = labelled_curve_figure([1, 3], {"devnet": series["devnet"]}, None)
    assert [t.name for t in bare.data] == ["devnet"]
