"""The dashboard's job manager handing training jobs to Ray (ADLAB_RAY_ADDRESS), on a real local Ray runtime."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.cache import Cache
from engine.runner import RunConfig, run_methods

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def _wait(job, timeout: float = 240) -> None:  # noqa: ANN001
    t0 = time.time()
    while job.active and time.time() - t0 < timeout:
        time.sleep(0.1)
    assert not job.active, f"job still {job.state} after {timeout} s"


@pytest.mark.slow
def test_two_sessions_train_at_once_on_ray_with_the_in_process_metrics(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    from dashboard import services
    from engine.components.features import clear_memory_cache

    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(methods=["padim", "autoencoder"], image_size=64, preset="test",
                    params={"autoencoder": {"epochs": 2}})
    from engine.executors import _torch_threads

    clear_memory_cache()
    with _torch_threads(1):  # the thread count each Ray job gets below (float sums differ in the last bits else)
        local = {c: run_methods(str(SAMPLE / c), cfg, cache=Cache(str(tmp_path / "cache-local")))
                 for c in ("brick", "grass")}
    from engine.executors import ray_init

    ray_init("local", num_cpus=2)  # from this main thread: the job threads then join it (as on a cluster)
    jm = services.JobManager(max_running=4, isolation="ray", ray_address="local")
    monkeypatch.setattr(services.jobs, "job_manager", lambda: jm)
    monkeypatch.setattr(services.jobs, "RAY_JOB_CPUS", 1)  # so Ray runs both jobs at once
    try:
        jobs = {c: jm.submit(f"session-{c}", str(SAMPLE / c), cfg) for c in ("brick", "grass")}
        seen_running = False
        t0 = time.time()
        while any(j.active for j in jobs.values()) and time.time() - t0 < 240:
            # both tasks reported progress from inside Ray (not just queued by the manager)
            seen_running |= all(any(not p.stage.startswith("waiting") for p in j.progress.values())
                                and len(j.records) < len(cfg.methods)
                                for j in jobs.values())
            time.sleep(0.05)
        for j in jobs.values():
            _wait(j)
        assert seen_running, "the two sessions' jobs never ran at the same time"
        for c, job in jobs.items():
            assert job.state == "done", job.error
            assert [r["method"] for r in job.records] == ["padim", "autoencoder"]  # streamed back as each finished
            assert all(p.fraction == 1.0 for p in job.progress.values())  # progress came back from the task
            view = services.job_view(job)
            assert view["ray"] == "local" and all(r["status"] == "ok" for r in view["rows"])
            stored = services.latest_results(job.digest)
            assert [r["metrics"] for r in services.ok_runs(stored)] == [r["metrics"] for r in local[c]["runs"]]
        # the maps the Heatmaps page reads were written by Ray's worker into the shared cache root
        run = services.ok_runs(services.latest_results(jobs["brick"].digest))[0]
        maps, _ = services.method_maps(run)
        assert maps is not None and maps.shape[0] == len(run["images"])
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_ray_job_cancels_and_keeps_what_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    from dashboard import services

    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(methods=["padim", "autoencoder"], image_size=64, preset="test",
                    params={"autoencoder": {"epochs": 1000, "max_steps": 100000}})
    from engine.executors import ray_init

    ray_init("local", num_cpus=2)
    jm = services.JobManager(max_running=1, isolation="ray", ray_address="local")
    monkeypatch.setattr(services.jobs, "job_manager", lambda: jm)
    try:
        job = jm.submit("s", str(SAMPLE / "brick"), cfg)
        t0 = time.time()
        while not job.records and job.active and time.time() - t0 < 240:
            time.sleep(0.05)
        assert [r["method"] for r in job.records] == ["padim"]
        jm.cancel("s")
        _wait(job, timeout=60)
        assert job.state == "cancelled" and "1 of 2 method(s) had finished" in (job.error or "")
        assert [r["method"] for r in services.ok_runs(services.latest_results(job.digest))] == ["padim"]
    finally:
        ray.shutdown()
