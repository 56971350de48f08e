"""Training in worker processes (the dashboard's job manager) and the time/memory estimates behind the Train page.

The worker tests start real worker processes on a tiny synthetic dataset: one is killed with SIGKILL in the middle
of its second method (the job fails with the out-of-memory message, the first method is kept, the next job runs),
one is cancelled, and one is frozen so that cancelling it has to kill it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from engine import estimates
from engine.data import make_synthetic_dataset
from engine.runner import RunConfig, run_methods
from engine.worker import KILLED_MESSAGE, WorkerError, WorkerStats, died_message, run_in_worker

# Long enough that the test surely catches the autoencoder in its fit (the worker is killed or cancelled there).
LONG_FIT = {"autoencoder": {"epochs": 10_000, "max_steps": 1_000_000, "size": 32, "patch": 32}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", "brick", n_train=8, n_test_good=4,
                                  n_defect_per_type=3, size=64)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root for this test (workers inherit it through the environment)."""
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADLAB_JOB_MEMORY_GB", raising=False)
    return tmp_path / "cache"


def _wait(cond: Any, limit: float = 180.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < limit, "timed out waiting"
        time.sleep(0.05)


def _at(job: Any, method: str, *stages: str) -> bool:
    return job.progress[method].stage in stages or not job.active


# ------------------------------------------------------------------------------------------------ estimates


def _rec(method: str, fit_s: float, predict_s: float, backbone_s: float, peak_mb: float,
         params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"method": method, "status": "ok", "cached": False, "params": params or {},
            "timing": {"fit_s": fit_s, "predict_s": predict_s, "shared_backbone_s": backbone_s,
                       "peak_mem_mb": peak_mb}}


def test_estimates_scale_the_closest_measurement(cache: Path) -> None:
    before = estimates.estimate_method("padim", {}, trained=False, n_train=20, n_test=20, image_size=128,
                                       preset="fast", device="cpu")
    assert not before.measured and before.seconds is None and before.peak_mb > estimates.PRIOR_BASE_MB
    estimates.record(_rec("padim", fit_s=6.0, predict_s=4.0, backbone_s=4.0, peak_mb=700.0), n_train=20,
                     n_test=20, image_size=128, preset="fast", device="cpu", base_mb=600.0)
    same = estimates.estimate_method("padim", {}, trained=False, n_train=20, n_test=20, image_size=128,
                                     preset="fast", device="cpu")
    assert same.measured and same.seconds == pytest.approx(10.0) and same.peak_mb == pytest.approx(700.0)
    big = estimates.estimate_method("padim", {}, trained=False, n_train=40, n_test=40, image_size=256,
                                    preset="fast", device="cpu")
    assert big.seconds == pytest.approx(80.0)  # 2x the images, 4x the pixels each
    assert big.peak_mb == pytest.approx(600.0 + 100.0 * 8)  # only the part above the base grows

    # One small run whose memory is mostly fixed costs: the growing part is capped, the rest stays fixed.
    px = 40 * 128**2
    estimates.record(_rec("patchcore", 1.0, 1.0, 0.0, peak_mb=1000.0), n_train=20, n_test=20, image_size=128,
                     preset="fast", device="cpu", base_mb=600.0)
    capped = estimates.estimate_method("patchcore", {}, trained=False, n_train=40, n_test=40, image_size=256,
                                       preset="fast", device="cpu")
    assert capped.peak_mb == pytest.approx(600.0 + 400.0 + estimates.PRIOR_BYTES_PER_PIXEL * 7 * px / 2**20)
    # Two runs of different sizes: a line through them (here 200 MB fixed + 100 B per pixel).
    for n, size in ((20, 128), (40, 256)):
        p_mb = 600.0 + 200.0 + 100.0 * 2 * n * size**2 / 2**20
        estimates.record(_rec("spade", 1.0, 1.0, 0.0, peak_mb=p_mb), n_train=n, n_test=n, image_size=size,
                         preset="fast", device="cpu", base_mb=600.0)
    line = estimates.estimate_method("spade", {}, trained=False, n_train=160, n_test=160, image_size=256,
                                     preset="fast", device="cpu")
    assert line.peak_mb == pytest.approx(600.0 + 200.0 + 100.0 * 320 * 256**2 / 2**20)
    assert estimates.estimate_method("padim", {}, trained=False, n_train=20, n_test=20, image_size=128,
                                     preset="fast", device="cuda").seconds is None  # another device: not measured

    # A trained method past its step cap: twice the images, same fit time; only the backbone/predict parts grow.
    p = {"epochs": 10, "batch_size": 4, "max_steps": 20}
    estimates.record(_rec("stfpm", fit_s=21.0, predict_s=2.0, backbone_s=2.0, peak_mb=900.0, params=p),
                     n_train=20, n_test=20, image_size=128, preset="fast", device="cpu", base_mb=600.0)
    est = estimates.estimate_method("stfpm", p, trained=True, n_train=40, n_test=40, image_size=128, preset="fast",
                                    device="cpu")
    assert est.seconds == pytest.approx(20.0 + 2.0 + 4.0)
    quality = estimates.estimate_method("stfpm", {**p, "max_steps": 40}, trained=True, n_train=20, n_test=20,
                                        image_size=128, preset="quality", device="cpu")
    assert quality.seconds == pytest.approx(40.0 + 1.0 + 2.0)  # twice the steps (preset read from the params)

    job = estimates.estimate_job([("padim", {}, False), ("stfpm", p, True), ("fastflow", {}, True)], n_train=20,
                                 n_test=20, image_size=128, preset="fast", device="cpu")
    assert job.unmeasured == ["fastflow"]
    assert job.seconds == pytest.approx((10.0 - 4.0) + (23.0 - 2.0) + 4.0)  # the shared backbone counted once
    assert job.peak_mb == max(m.peak_mb for m in job.methods)


def test_estimates_update_from_a_finished_run(tiny: Path, cache: Path) -> None:
    cfg = RunConfig(methods=["padim"], image_size=64)
    assert estimates.load() == {}
    run_methods(tiny, cfg)
    stored = estimates.load()["padim|cpu"]
    assert len(stored) == 1 and stored[0]["n_train"] == 8 and stored[0]["image_size"] == 64
    assert stored[0]["peak_mb"] >= stored[0]["base_mb"] - 0.5 > 0  # MB; the peak is sampled and rounded to 0.1
    run_methods(tiny, cfg)  # from the cache: nothing new is measured
    assert len(estimates.load()["padim|cpu"]) == 1
    est = estimates.estimate_method("padim", stored[0]["params"], trained=False, n_train=8, n_test=13,
                                    image_size=64, preset="fast", device="cpu")
    assert est.measured and est.seconds is not None and est.seconds > 0


def test_unreadable_estimates_are_ignored(cache: Path) -> None:
    cache.mkdir(parents=True)
    (cache / estimates.FILE_NAME).write_text("{not json")
    assert estimates.load() == {}
    estimates.record(_rec("padim", 1.0, 1.0, 0.0, 700.0), n_train=2, n_test=2, image_size=64, preset="fast",
                     device="cpu", base_mb=600.0)
    assert len(estimates.load()["padim|cpu"]) == 1


def test_job_above_the_memory_limit_is_refused_with_a_clear_message(tiny: Path, cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboard import services

    jm = services.JobManager(isolation="thread")
    monkeypatch.setenv("ADLAB_JOB_MEMORY_GB", "0.05")
    with pytest.raises(services.UserError) as e:
        jm.submit("s1", str(tiny), RunConfig(methods=["padim"], image_size=64))
    msg = str(e.value)
    assert "GB of memory" in msg and "more than the 0.05 GB one training job may use" in msg
    assert "ADLAB_JOB_MEMORY_GB" in msg and "smaller image size" in msg
    assert jm.get("s1") is None  # nothing was queued
    text, refusal = services.run_estimate(str(tiny), ["padim"], image_size=64, backbone="efficientnet_lite0",
                                          preset="fast", labeled_anomalies=0)
    assert refusal == msg and "not measured on this machine yet" in text
    monkeypatch.setenv("ADLAB_JOB_MEMORY_GB", "lots")
    with pytest.raises(services.UserError, match="not a number"):
        jm.submit("s1", str(tiny), RunConfig(methods=["padim"], image_size=64))
    monkeypatch.setenv("ADLAB_JOB_MEMORY_GB", "64")
    job = jm.submit("s1", str(tiny), RunConfig(methods=["padim"], image_size=64))
    _wait(lambda: not job.active)
    assert job.state == "done"


def test_memory_limit_defaults_to_a_share_of_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADLAB_JOB_MEMORY_GB", raising=False)
    limit = estimates.job_memory_limit_mb()
    assert 0 < limit < estimates.machine_memory_mb()
    monkeypatch.setenv("ADLAB_JOB_MEMORY_GB", "2")
    assert estimates.job_memory_limit_mb() == 2048


def test_duration_text() -> None:
    assert [estimates.duration_text(s) for s in (None, 0.2, 40, 360, 5400)] == [
        "unknown", "≈ 1 s", "≈ 40 s", "≈ 6 min", "≈ 1.5 h"]


# ------------------------------------------------------------------------------------------------ workers


def test_died_message_names_the_cause() -> None:
    assert died_message(-signal.SIGKILL) == KILLED_MESSAGE
    assert "SIGSEGV" in died_message(-signal.SIGSEGV) and "native library" in died_message(-signal.SIGSEGV)
    assert "exit code 3" in died_message(3)


def test_killed_worker_fails_the_job_keeps_finished_methods_and_the_next_job_runs(
        tiny: Path, cache: Path) -> None:
    from dashboard import services

    jm = services.JobManager(isolation="process")
    server_pid = os.getpid()
    job = jm.submit("s1", str(tiny), RunConfig(methods=["padim", "autoencoder"], image_size=64, params=LONG_FIT))
    _wait(lambda: _at(job, "autoencoder", "fit", "train"))
    assert job.active and [r["method"] for r in job.records] == ["padim"]
    pid = job.worker.pid
    assert pid != server_pid
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "adlab-worker"
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not job.active)

    assert job.state == "failed"
    assert job.error == f"{KILLED_MESSAGE} (1 of 2 method(s) had finished and are kept)"
    assert job.worker.returncode == -signal.SIGKILL and job.worker.peak_mb and job.worker.peak_mb > 0
    view = services.job_view(job)
    rows = {r["method"]: r for r in view["rows"]}
    assert rows["padim"]["status"] == "ok" and rows["autoencoder"]["status"] == "stopped"
    assert view["worker"]["pid"] == pid
    stored = services.latest_results(job.digest)
    assert [(r["method"], r["status"]) for r in stored["runs"]] == [("padim", "ok")]

    nxt = jm.submit("s1", str(tiny), RunConfig(methods=["padim", "spade"], image_size=64))
    _wait(lambda: not nxt.active)
    assert nxt.state == "done", nxt.error
    assert [(r["method"], r["status"], r["cached"]) for r in nxt.records] == [("padim", "ok", True),
                                                                            ("spade", "ok", False)]
    assert nxt.worker.pid != pid and nxt.worker.returncode == 0
    assert {r["method"] for r in services.ok_runs(services.latest_results(nxt.digest))} == {"padim", "spade"}


def test_cancel_stops_the_worker_and_kills_one_that_does_not_stop(tiny: Path, cache: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboard import services
    from engine import worker

    jm = services.JobManager(isolation="process")
    cfg = RunConfig(methods=["autoencoder"], image_size=64, params=LONG_FIT)
    for frozen in (False, True):
        job = jm.submit("s1", str(tiny), cfg)
        _wait(lambda job=job: _at(job, "autoencoder", "train"))  # in its epochs: it checks for cancel after each
        if frozen:
            monkeypatch.setattr(worker, "CANCEL_GRACE_S", 1.0)  # the default (5 s) is kept for the polite cancel
            os.kill(job.worker.pid, signal.SIGSTOP)  # it cannot answer the cancel any more
        jm.cancel("s1")
        _wait(lambda job=job: not job.active)
        assert job.state == "cancelled", job.error
        assert job.worker.killed_after_cancel is frozen
        assert job.worker.returncode == (-signal.SIGKILL if frozen else 0)
        assert not Path(f"/proc/{job.worker.pid}").exists()  # reaped, not left as a zombie


def test_worker_reports_a_job_error_as_a_message(tmp_path: Path, cache: Path) -> None:
    stats = WorkerStats()
    with pytest.raises(WorkerError, match="missing"):
        run_in_worker(tmp_path / "missing", RunConfig(methods=["padim"]), stats=stats)
    assert stats.returncode == 0


def test_train_page_shows_the_estimate_and_refuses_a_run_too_big(cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
    at = AppTest.from_file(app, default_timeout=120)
    at.run()
    at.switch_page("../pages/train.py").run()
    assert not at.exception
    assert any("peak memory ≈" in m.value and "a job may use" in m.value for m in at.markdown)
    assert not at.button(key="train_button").disabled
    monkeypatch.setenv("ADLAB_JOB_MEMORY_GB", "0.01")
    at.run()
    assert at.button(key="train_button").disabled
    assert any("ADLAB_JOB_MEMORY_GB" in e.value and "smaller image size" in e.value for e in at.error)
