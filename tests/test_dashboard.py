"""Dashboard pages under streamlit.testing.v1.AppTest: every page renders without exceptions, key widgets are
there, a real training run on the sample data completes and Compare shows its AUROC; services' job manager."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
PAGES = ["data", "train", "compare", "heatmaps", "failures", "learn"]


def _app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"../pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _wait_job(sid: str, limit: float = 240.0) -> str:
    from dashboard import services

    t0 = time.time()
    job = services.job_manager().get(sid)
    assert job is not None
    while job.active and time.time() - t0 < limit:
        time.sleep(0.3)
    return job.state


def _fresh_results() -> None:
    """Forget stored dashboard results of the sample datasets (the engine cache stays)."""
    from dashboard import services

    for cat in services.sample_categories():
        services.clear_results(services.dataset_info(services.sample_path(cat)).digest)


def test_every_page_renders_without_results() -> None:
    _fresh_results()
    at = _app()
    assert at.title[0].value == "Data"
    assert at.radio(key="sample_choice").options == ["brick", "grass", "gravel"]
    assert len(at.get("file_uploader")) == 1
    assert any("problems found" in s.value for s in at.success)
    for page in PAGES[1:]:
        _goto(at, page)
        assert not at.error, [e.value for e in at.error]
    _goto(at, "train")
    assert at.button(key="train_button").label.startswith("Train 3")
    assert at.checkbox(key="pick_padim").value is True


def test_sample_switch_changes_dataset() -> None:
    at = _app()
    at.radio(key="sample_choice").set_value("grass").run()
    assert not at.exception
    assert at.session_state["dataset_path"].endswith("grass")
    assert any("grass" in m.value for m in at.markdown if "Dataset" in m.value)


def test_bad_upload_lists_problems_and_keeps_dataset(tmp_path: Path) -> None:
    from dashboard import services

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cat/train/good/a.png", b"not a png")
        zf.writestr("cat/test/good/b.png", b"also not a png")
        zf.writestr("cat/test/scratch/c.png", b"nope")
    with pytest.raises(services.DataProblems) as e:
        services.save_upload("bad.zip", buf.getvalue())
    assert len(e.value.problems) >= 3 and all(p[0] for p in e.value.problems)
    with pytest.raises(services.UserError, match=r"\.zip"):
        services.save_upload("x.tar", b"123")
    at = _app()
    before = at.session_state["dataset_path"]
    assert at.session_state["dataset_path"] == before


def test_weak_method_without_labels_is_refused_before_running() -> None:
    from dashboard import services

    weak = [m["name"] for ms in services.methods_by_family().values() for m in ms if m["supervision"] == "weak"]
    if not weak:
        pytest.skip("no weakly supervised method registered yet")
    msg = services.check_config([weak[0]], 0)
    assert msg and "K" in msg
    at = _app()
    _goto(at, "train")
    at.checkbox(key=f"pick_{weak[0]}").check().run()
    assert at.button(key="train_button").disabled
    assert any("labelled" in w.value for w in at.warning)
    assert len(at.number_input) == 1


def test_train_padim_then_every_page_shows_results() -> None:
    _fresh_results()
    at = _app()
    _goto(at, "train")
    for cb in at.checkbox:
        if cb.key and cb.key.startswith("pick_") and cb.key != "pick_padim":
            cb.uncheck()
    at.checkbox(key="pick_padim").check()
    at.run()
    assert at.button(key="train_button").label == "Train 1 method(s)"
    at.button(key="train_button").click().run()
    assert not at.exception
    assert _wait_job(at.session_state["sid"]) == "done"
    at.run()
    assert any("padim" in s.value and "AUROC" in s.value for s in at.success)
    _goto(at, "compare")
    df = at.dataframe[0].value
    assert list(df["method"]) == ["padim"]
    assert 0.5 < float(df["image AUROC"][0]) <= 1.0
    assert df["AUROC 95% CI"][0]
    assert len(at.get("plotly_chart")) >= 3
    assert any("padim" in s.value for s in at.success)
    _goto(at, "heatmaps")
    assert not at.error
    assert len(at.get("imgs")) >= 1 or len(at.get("image")) >= 1
    _goto(at, "failures")
    assert not at.error
    assert at.selectbox(key="failures_select").value == "padim"
    _goto(at, "learn")
    assert any(b.label.startswith("See Memory bank") for b in at.button)


def test_job_manager_queue_and_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboard import services
    from engine.runner import Cancelled, RunConfig

    started = []

    def slow_run(data, cfg, *, progress, cancel, on_result):  # noqa: ANN001, ANN202
        started.append(cfg.methods)
        while not cancel.is_set():
            time.sleep(0.05)
        raise Cancelled("run cancelled")

    monkeypatch.setattr(services.jobs, "run_methods", slow_run)
    jm = services.JobManager(max_running=1, isolation="thread")  # run_methods is patched here
    path = services.default_dataset_path()
    a = jm.submit("s1", path, RunConfig(methods=["padim"]))
    b = jm.submit("s2", path, RunConfig(methods=["padim"]))
    t0 = time.time()
    while a.state != "running" and time.time() - t0 < 10:
        time.sleep(0.05)
    assert a.state == "running" and b.state == "queued" and jm.queue_position(b) == 1
    with pytest.raises(services.UserError, match="already"):
        jm.submit("s1", path, RunConfig(methods=["padim"]))
    jm.cancel("s2")
    jm.cancel("s1")
    t0 = time.time()
    while (a.active or b.active) and time.time() - t0 < 10:
        time.sleep(0.05)
    assert a.state == "cancelled" and b.state == "cancelled"
    assert len(started) == 1
    with pytest.raises(services.UserError, match="Pick at least one"):
        jm.submit("s3", path, RunConfig(methods=[]))


def test_run_notes_reach_the_tables() -> None:
    """How training went (and a GAN's collapse warning) is shown, not only stored in results.json."""
    from dashboard import services

    run = {"method": "ganomaly", "family": "gan", "status": "ok", "metrics": {"image_auroc": 0.5},
           "timing": {}, "images": [], "run_notes": {"training": "200 steps in 40 epochs; WARNING mode collapse",
                                                     "resolution": "64 px", "empty": None}}
    assert services.run_notes_text(run) == "training: 200 steps in 40 epochs; WARNING mode collapse; resolution: 64 px"
    assert services.run_notes_text({"method": "padim"}) == ""
    df = services.metrics_table({"runs": [run]})
    assert "WARNING mode collapse" in df.loc[0, "notes"]
    assert not df.loc[0, "reduced"]
    assert services.metrics_table({"runs": [{**run, "reduced": True}]}).loc[0, "reduced"]
    assert df.loc[0, "trained in"] is None  # an old record without the field
    assert services.metrics_table({"runs": [{**run, "train_precision": "bf16-mixed"}]}).loc[0, "trained in"] == \
        "bf16-mixed"


def test_quality_preset_on_cpu_warns_about_time() -> None:
    from dashboard import services

    at = _app()
    _goto(at, "train")
    assert not any("hour" in c.value for c in at.caption)
    at.radio(key="preset").set_value("quality").run()
    warned = any("hour" in c.value for c in at.caption)
    assert warned != services.device_name().startswith("cuda")
