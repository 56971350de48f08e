"""Non-square data in the dashboard (issue 17): the Data page's size advice and plot, the Train page's tiling
option and estimate, heatmaps at the run's own (non-square) shape."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import TALL_H
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def _app(dataset: Path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.session_state["dataset_path"] = str(dataset)
    at.run()
    assert not at.exception, at.exception
    return at


def test_data_page_shows_sizes_and_a_suggestion(tall_strips: Path) -> None:
    at = _app(tall_strips)
    advice = [i.value for i in at.info if "keep aspect" in i.value]
    assert advice and "64×256" in advice[0], [i.value for i in at.info]  # W×H of the 4:1 strips
    assert any(c.key == "size_plot" for c in at.get("plotly_chart"))


def test_train_page_tiling_changes_the_estimate(tall_strips: Path) -> None:
    at = _app(tall_strips)
    at.switch_page("../pages/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.checkbox(key="keep_aspect").value is True
    at.checkbox(key="tile_on").check().run()
    assert not at.exception
    assert any("in 5 tiles of 64 px each" in m.value for m in at.markdown), [m.value for m in at.markdown]


def test_tiled_run_heatmaps_keep_the_images_shape(tall_strips: Path) -> None:
    from dashboard import services

    path = str(tall_strips)
    info = services.dataset_info(path)
    services.clear_results(info.digest)
    job = services.start_run("aspect", path, ["padim"], image_size=64, backbone="efficientnet_lite0",
                             preset="fast", labeled_anomalies=0, resize="keep-aspect", tile=64)
    t0 = time.time()
    while job.active and time.time() - t0 < 240:
        time.sleep(0.2)
    assert job.state == "done", job.error
    results = services.latest_results(info.digest)
    assert results["config"]["tile"] == 64 and results["config"]["resize"] == "keep-aspect"
    assert "tiles" in services.geometry_text(results["config"])
    assert results["runs"][0]["tiles_per_image"] == 5  # the job (in its worker process) really tiled: 256 px / 64
    spot = next(i["path"] for i in results["runs"][0]["images"] if i["defect_type"] == "spot")
    panels = services.heatmap_panels(results, spot)
    shape = (TALL_H, 64)  # short side 64 = the native width: the images keep their 4:1 aspect
    assert panels["image"].shape[:2] == shape and panels["mask_overlay"].shape[:2] == shape
    assert panels["panels"][0]["overlay"].shape[:2] == shape
