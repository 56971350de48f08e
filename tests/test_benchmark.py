"""Benchmark aggregation (mean ± std, ranks, noise groups, families), the Benchmark page, and the HTML report."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.services import UserError
from dashboard.services import benchmark as bm

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")
CHROMIUM = "/usr/bin/chromium"


def _doc(values: dict[tuple[str, str], list[float | None]]) -> dict:
    """A sweep doc from {(dataset, method): [AUROC per seed, None = failed]}."""
    units = []
    for (d, m), vals in values.items():
        for seed, v in enumerate(vals):
            units.append({"dataset": d, "method": m, "seed": seed, "params": {}, "status": "ok" if v is not None
                          else "failed", "error": None if v is not None else "boom",
                          "metrics": None if v is None else {"image_auroc": v}, "timing": {}})
    return {"units": units, "config": {"seeds": [0, 1, 2]}}


def test_summary_is_mean_and_std_over_seeds() -> None:
    doc = _doc({("a", "padim"): [0.9, 0.8, 1.0], ("a", "patchcore"): [0.5, 0.5, None]})
    s = bm.summary(doc).set_index("method")
    assert s.loc["padim", "mean"] == pytest.approx(0.9)
    assert s.loc["padim", "std"] == pytest.approx((2 * 0.01 / 3) ** 0.5)
    assert s.loc["padim", "n"] == 3 and s.loc["patchcore", "n"] == 2 and s.loc["patchcore", "failed"] == 1
    assert s.loc["padim", "mean ± std"] == "0.900 ± 0.082"
    t = bm.table(doc)
    assert list(t.columns) == ["dataset", "padim", "patchcore"] and t.iloc[0]["patchcore"] == "0.500 ± 0.000"


def test_ranks_average_over_datasets_and_show_the_seed_spread() -> None:
    # padim wins everywhere; patchcore and spade swap places from seed to seed (within the noise)
    doc = _doc({("a", "padim"): [0.99, 0.99], ("a", "patchcore"): [0.80, 0.70], ("a", "spade"): [0.75, 0.78],
                ("b", "padim"): [0.95, 0.96], ("b", "patchcore"): [0.66, 0.60], ("b", "spade"): [0.61, 0.65]})
    r = bm.ranks(doc).set_index("method")
    assert list(r.index) == ["padim", "spade", "patchcore"]
    assert r.loc["spade", "avg_rank"] == 2.25 and r.loc["patchcore", "avg_rank"] == 2.75  # b's means tie: 2.5 each
    assert r.loc["padim", "avg_rank"] == 1.0 and r.loc["padim", "seed_min"] == r.loc["padim", "seed_max"] == 1.0
    assert r.loc["patchcore", "seed_min"] == 2.0 and r.loc["patchcore", "seed_max"] == 3.0
    assert r.loc["padim", "group"] == "—"
    assert r.loc["patchcore", "group"] == r.loc["spade", "group"] == "A"
    assert (r["datasets"] == 2).all()
    fam = bm.family_summary(doc)
    assert fam.iloc[0]["best method"] == "padim" and "patchcore" in fam.iloc[0]["methods"]


def test_a_failed_method_cannot_win_by_being_left_out() -> None:
    # spade fails on b: only dataset a, where every method has a value, is ranked
    doc = _doc({("a", "padim"): [0.9], ("a", "spade"): [0.8], ("b", "padim"): [0.6], ("b", "spade"): [None]})
    r = bm.ranks(doc).set_index("method")
    assert (r["datasets"] == 1).all() and r.loc["padim", "avg_rank"] == 1.0 and r.loc["spade", "avg_rank"] == 2.0


def test_noise_groups() -> None:
    assert bm.noise_groups([1, 2, 3], [1, 2, 3]) == ["—", "—", "—"]
    assert bm.noise_groups([1, 1.5, 3], [2, 2.5, 3]) == ["A", "A", "—"]
    assert bm.noise_groups([1, 1.5, 2.2], [2, 2.5, 3]) == ["A", "AB", "B"]


def test_uploads_are_checked() -> None:
    with pytest.raises(UserError, match="not JSON"):
        bm.parse_upload(b"\xff\xfe")
    with pytest.raises(UserError, match="no 'units' list"):
        bm.parse_upload(b'{"runs": []}')
    with pytest.raises(UserError, match="lack dataset"):
        bm.parse_upload(json.dumps({"units": [{"dataset": "a"}]}).encode())
    doc = _doc({("a", "padim"): [0.9]})
    assert bm.parse_upload(json.dumps(doc).encode())["units"] == doc["units"]
    with pytest.raises(UserError, match="only sweeps started from this page"):
        bm.load("/etc")


@pytest.fixture(scope="module")
def sample_sweep() -> dict:
    """padim and patchcore on the three sample categories, one seed, 64 px: what the page's Run button makes."""
    return bm.run_sample_sweep(["padim", "patchcore"], [0], image_size=64)


def test_benchmark_page_runs_a_sample_sweep(sample_sweep: dict) -> None:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page("../pages/benchmark.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("No sweep open yet" in i.value for i in at.info)
    at.multiselect(key="sweep_methods").set_value(["padim", "patchcore"])
    at.number_input(key="sweep_seeds").set_value(1)
    at.button(key="sweep_run").click().run()  # the same units as the fixture: reused from its folder
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert [s.value for s in at.subheader][:3] == ["image AUROC: mean ± std over seeds", "Ranks", "By family"]
    table = at.dataframe[0].value
    assert list(table["dataset"]) == ["brick", "grass", "gravel"] and list(table.columns)[1:] == ["padim", "patchcore"]
    units = at.session_state["sweep_doc"]["units"]
    assert [u["metrics"] for u in units] == [u["metrics"] for u in sample_sweep["units"]]
    assert all(u.get("reused") for u in units)


def test_report_of_a_sweep_and_of_one_results_file(sample_sweep: dict, tmp_path: Path) -> None:
    from dashboard.services.report import write_report
    from engine.api import ConfigError

    out = Path(sample_sweep["_dir"])
    sweep_html = write_report(out, tmp_path / "sweep.html").read_text()
    res_html = write_report(out / "brick" / "seed-0", tmp_path / "brick.html").read_text()
    for text in (sweep_html, res_html):
        assert text.count("<script") == 1 + text.count('<div class="fig">')  # plotly inlined once, one per figure
        markup = re.sub(r"<script.*?</script>", "", text, flags=re.S)
        assert not re.search(r'(src|href)="(https?:)?//', markup)  # the page itself fetches nothing
        assert "Worst misses" in text and "data:image/png;base64," in text
    assert "Per defect type" in res_html and "Accuracy vs speed" in res_html and "AUROC 95% CI" in res_html
    assert "mean ± std over seeds" in sweep_html and "brick (seed 0)" in sweep_html and "gravel (seed 0)" in sweep_html
    with pytest.raises(ConfigError, match="no results.json or sweep.json"):
        write_report(tmp_path / "nothing", tmp_path / "x.html")


@pytest.mark.browser
def test_report_opens_offline_in_chromium_without_errors(sample_sweep: dict, tmp_path: Path) -> None:
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        pytest.skip(f"Chromium not installed at {CHROMIUM} (run scripts/ensure_chromium.sh)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright python package not installed")
    from dashboard.services.report import write_report

    path = write_report(Path(sample_sweep["_dir"]), tmp_path / "report.html")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            ctx = browser.new_context(offline=True)
            page = ctx.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(path.resolve().as_uri())
            page.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
            n_figs = page.locator('div.fig').count()
            assert page.locator(".js-plotly-plot").count() == n_figs >= 4
            broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || !i.naturalWidth).length")
            assert page.locator("img").count() > 0 and broken == 0
            assert errors == []
        finally:
            browser.close()


def test_a_report_that_cannot_be_made_is_a_page_saying_why() -> None:
    from dashboard.services.report import download_bytes, results_report

    page = download_bytes(results_report, {"dataset": {"name": "x"}, "runs": [{"method": "padim"}]}).decode()
    assert "The report could not be made" in page and "KeyError" in page and "Traceback" not in page
