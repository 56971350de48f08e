"""The labelled-anomaly curve in the dashboard: the service's curve data and plan, the Train page's button, and
Compare drawing AUROC against K from a real run with several K on the sample data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
TINY = {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4}


@pytest.fixture(scope="module")
def gravel_curve() -> dict:
    """A real run on the sample gravel at 64 px: devnet at K = 0, 1, 3 (tiny training) and patchcore, stored as the
    dashboard's results of that dataset (as a finished "Is labelling worth it?" job leaves them)."""
    from dashboard import services
    from dashboard.services.results import _results_file
    from engine.cache import atomic_write
    from engine.runner import RunConfig, run_methods

    path = services.sample_path("gravel")
    cfg = RunConfig(methods=["devnet", "patchcore"], image_size=64, device="cpu", labeled_anomalies=[0, 1, 3],
                    params={"devnet": dict(TINY)})
    res = run_methods(path, cfg)
    res["dataset"]["source"] = path
    atomic_write(_results_file(res["dataset"]["digest"]), json.dumps(res).encode())
    return res


def _compare_on_gravel() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.radio(key="sample_choice").set_value("gravel").run()
    at.switch_page("../pages/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_service_returns_the_curve_of_a_run(gravel_curve: dict) -> None:
    from dashboard import services

    c = services.labelled_curve(gravel_curve)
    assert c is not None and c["ks"] == [0, 1, 3] and list(c["weak"]) == ["devnet"]
    assert [p["k"] for p in c["weak"]["devnet"]] == [0, 1, 3]
    assert c["weak"]["devnet"][0]["status"] == "failed"
    for p in c["weak"]["devnet"][1:]:
        lo, hi = p["image_auroc_ci"]
        assert lo <= p["image_auroc"] <= hi
    assert c["reference"]["image_auroc"]["method"] == "patchcore"
    assert c["has_pixel"] and c["reference"]["pixel_auroc"]["method"] == "patchcore"
    # the pages name each run apart
    assert [services.run_name(r) for r in gravel_curve["runs"]] == [
        "devnet · K=0", "devnet · K=1", "devnet · K=3", "patchcore"]
    df = services.metrics_table(gravel_curve)
    assert list(df["method"]) == ["devnet · K=0", "devnet · K=1", "devnet · K=3", "patchcore"]
    single = {**gravel_curve, "runs": [r for r in gravel_curve["runs"] if r.get("labeled_k") in (None, 3)]}
    assert services.labelled_curve(single) is None


def test_compare_draws_auroc_against_k(gravel_curve: dict) -> None:
    at = _compare_on_gravel()
    assert any(h.value == "Is labelling worth it?" for h in at.subheader)
    charts = {c.proto.id: c for c in at.get("plotly_chart")}
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert "Image AUROC against labelled anomalies K" in titles
    assert "Pixel AUROC against labelled anomalies K" in titles
    fig = figs[titles.index("Image AUROC against labelled anomalies K")]
    devnet = next(t for t in fig["data"] if t.get("name") == "devnet")
    assert devnet["x"] == [1, 3] and devnet["error_y"]["array"]  # K = 0 failed: no point, but said below
    ref = next(t for t in fig["data"] if str(t.get("name", "")).startswith("patchcore, unsupervised"))
    patchcore = next(r for r in gravel_curve["runs"] if r["method"] == "patchcore")
    assert ref["y"] == [patchcore["metrics"]["image_auroc"]] * 2
    assert any("devnet at K = 0" in c.value and "need labelled anomalies" in c.value for c in at.caption)
    df = at.dataframe[0].value
    assert "devnet · K=3" in list(df["method"])
    assert charts  # the usual ROC / PR charts are still there
    assert any("K = 0, 1, 3" in c.value for c in at.caption)


def test_other_pages_read_a_curve_run(gravel_curve: dict) -> None:
    at = _compare_on_gravel()
    for page in ("heatmaps", "failures", "learn"):
        at.switch_page(f"../pages/{page}.py").run()
        assert not at.exception, (page, [e.value for e in at.exception])
    from dashboard import services

    names = [services.run_name(r) for r in services.ok_runs(gravel_curve)]
    assert set(services.thresholds(gravel_curve)) == set(names)  # one threshold per run, not per method


def test_curve_plan_caps_k_by_the_anomalies_there_are() -> None:
    from dashboard import services

    plan = services.curve_plan(services.sample_path("gravel"), ["devnet", "padim"], None)
    assert plan.weak == ["devnet"] and plan.reference == "padim" and plan.problem is None
    assert plan.ks == [0, 1, 3] and "stops at 3" in plan.note  # 6 defective images per type in the sample
    assert plan.methods == ["devnet", "padim"]
    none = services.curve_plan(services.sample_path("gravel"), ["padim"], None)
    assert none.problem and "weakly supervised" in none.problem


def test_train_button_starts_the_curve_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboard.services import jobs

    submitted = []

    class Fake:
        def submit(self, session, dataset_path, config):  # noqa: ANN001, ANN202
            submitted.append(config)
            raise jobs.UserError("not really started")

    monkeypatch.setattr(jobs, "job_manager", lambda: Fake())
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.radio(key="sample_choice").set_value("gravel").run()
    at.switch_page("../pages/train.py").run()
    assert not at.exception
    at.checkbox(key="pick_devnet").check().run()
    button = at.button(key="curve_button")
    assert button.label == "Is labelling worth it?" and not button.disabled
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    (cfg,) = submitted
    assert cfg.labeled_anomalies == [0, 1, 3]
    assert "devnet" in cfg.methods and len(cfg.methods) == 2  # plus the unsupervised reference
    assert any("K = 0, 1, 3:" in c.value and "stops at 3" in c.value for c in at.caption)


def test_report_reads_a_curve_run(gravel_curve: dict) -> None:
    from dashboard.services import report

    html = report.results_report(gravel_curve, worst=1)
    assert "devnet · K=3" in html and "devnet · K=1" in html and "patchcore" in html


def test_benchmark_keeps_each_k_apart() -> None:
    from dashboard.services import benchmark

    def unit(label: str | None, k: int | None, seed: int, auroc: float) -> dict:
        method = "devnet" if k is not None else "patchcore"
        return {"dataset": "mt", "method": method, "label": label or method, "labeled_k": k, "seed": seed,
                "params": {}, "status": "ok", "error": None, "metrics": {"image_auroc": auroc}, "timing": {},
                "family": "weakly_supervised" if k is not None else "memory_bank"}

    doc = {"units": [unit("devnet · K=1", 1, 0, 0.6), unit("devnet · K=1", 1, 1, 0.8),
                     unit("devnet · K=3", 3, 0, 0.9), unit("devnet · K=3", 3, 1, 0.9),
                     unit(None, None, 0, 0.7), unit(None, None, 1, 0.7)]}
    s = benchmark.summary(doc).set_index("method")
    assert s.loc["devnet · K=1", "mean"] == pytest.approx(0.7) and s.loc["devnet · K=3", "mean"] == pytest.approx(0.9)
    assert s.loc["devnet · K=3", "family"] == "weakly_supervised" and s.loc["patchcore", "n"] == 2
    assert list(benchmark.table(doc).columns) == ["dataset", "devnet · K=1", "devnet · K=3", "patchcore"]
