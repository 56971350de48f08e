"""Thread planning (engine/threads.py): CPUs from affinity and cgroup quota, explicit grants, sharing among
running adlab jobs, and the passive OpenMP wait policy set before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import threads

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def jobs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "jobs"
    monkeypatch.setenv(threads.JOBS_DIR_ENV, str(d))
    return d


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == pytest.approx(1.5)


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == pytest.approx(3.0)


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_quota(tmp_path) is None


def test_available_cpus_is_affinity_capped_by_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 8)
    assert threads.available_cpus(tmp_path) == 8
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads.available_cpus(tmp_path) == 3  # 2.5 CPUs of time: 3 threads, the last one part-time
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert threads.available_cpus(tmp_path) == 1


def test_affinity_matches_the_os() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity here")
    assert threads.affinity_cpus() == len(os.sched_getaffinity(0))


def test_grants() -> None:
    assert threads.granted_threads({}) is None
    assert threads.granted_threads({"ADLAB_THREADS": "3", "OMP_NUM_THREADS": "1"}) == (3, "ADLAB_THREADS")
    assert threads.granted_threads({"OMP_NUM_THREADS": "4,2"}) == (4, "OMP_NUM_THREADS")
    assert threads.granted_threads({"OMP_NUM_THREADS": "lots"}) is None  # not ours to judge: ignored
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError, match="ADLAB_THREADS"):
            threads.granted_threads({"ADLAB_THREADS": bad})


def test_plan_shares_cpus_among_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 8)
    assert threads.plan({}, jobs=1, cgroup_root=tmp_path).threads == 8
    p = threads.plan({}, jobs=3, cgroup_root=tmp_path)
    assert (p.threads, p.cpus, p.jobs) == (2, 8, 3)
    assert "shared by 3" in p.why
    assert threads.plan({}, jobs=20, cgroup_root=tmp_path).threads == 1
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert threads.plan({}, jobs=1, cgroup_root=tmp_path).threads == 2


def test_plan_follows_an_explicit_grant_capped_at_the_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 4)
    assert threads.plan({"ADLAB_THREADS": "3"}, jobs=2, cgroup_root=tmp_path).threads == 3  # a grant is not shared
    p = threads.plan({"OMP_NUM_THREADS": "16"}, jobs=1, cgroup_root=tmp_path)
    assert p.threads == 4 and "capped" in p.why


def test_prepare_environment_keeps_a_users_choice() -> None:
    env: dict[str, str] = {}
    threads.prepare_environment(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.prepare_environment(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {"GOMP_SPINCOUNT": "10000"}
    threads.prepare_environment(env)
    assert "OMP_WAIT_POLICY" not in env


def test_worker_env() -> None:
    env = threads.worker_env(2, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", "ADLAB_THREADS": "2"}
    with pytest.raises(ValueError):
        threads.worker_env(0, base={})


def test_import_engine_sets_the_wait_policy_before_torch_loads() -> None:
    """The policy must be in the environment when libgomp loads; `import engine` must not load torch itself."""
    code = ("import os, sys; import engine; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules); "
            "import engine.components.features; print('torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split("\n")
    assert out[0] == "PASSIVE False"
    assert out[1] == "True"


def test_job_registers_applies_and_restores(jobs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADLAB_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda cgroup_root=None: 1)
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    assert threads.running_jobs() == 0
    with threads.job() as p:
        assert p.threads == 1 and torch.get_num_threads() == 1
        assert threads.running_jobs() == 1
        assert [f.name.split("-")[0] for f in jobs_dir.iterdir()] == [str(os.getpid())]
        with threads.job():  # a second job in the same process (e.g. two dashboard sessions)
            assert threads.running_jobs() == 2
            assert jobs_dir.joinpath(next(jobs_dir.iterdir()).name).read_text() == "2"
        assert threads.running_jobs() == 1
        assert torch.get_num_threads() == 1  # the first job still runs: its plan, not the outside count
    assert threads.running_jobs() == 0
    assert list(jobs_dir.iterdir()) == []
    assert torch.get_num_threads() == 2
    torch.set_num_threads(original)


def test_other_processes_jobs_count_and_dead_ones_are_removed(jobs_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    monkeypatch.delenv("ADLAB_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda cgroup_root=None: 4)
    jobs_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (jobs_dir / f"{other.pid}-{threads._start_time(other.pid)}").write_text("1")
        (jobs_dir / f"{other.pid}-1").write_text("1")  # same pid, another start time: a reused pid, stale
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (jobs_dir / f"{dead.pid}-123").write_text("1")
        assert threads.running_jobs() == 1
        assert len(list(jobs_dir.iterdir())) == 1  # the stale entries are gone
        with threads.job() as p:
            assert (p.jobs, p.threads) == (2, 2)
    finally:
        other.kill()
        other.wait()
    assert threads.running_jobs() == 0


def test_refresh_outside_a_job_leaves_threads_alone(jobs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "available_cpus", lambda cgroup_root=None: 1)
    before = torch.get_num_threads()
    threads.refresh(min_interval_s=0)
    assert torch.get_num_threads() == before


def test_refresh_inside_a_job_follows_the_plan(jobs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADLAB_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda cgroup_root=None: 1)
    original = torch.get_num_threads()
    with threads.job():
        torch.set_num_threads(2)  # something changed it mid-job
        threads.refresh(min_interval_s=0)
        assert torch.get_num_threads() == 1
    torch.set_num_threads(original)


def test_a_run_records_the_threads_each_method_used(jobs_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.cache import Cache
    from engine.data import make_synthetic_dataset
    from engine.runner import RunConfig, run_methods

    make_synthetic_dataset(tmp_path / "data", "brick", n_train=6, n_test_good=3, n_defect_per_type=2, size=64)
    monkeypatch.setenv("ADLAB_THREADS", "1")
    seen: list[tuple[int, int]] = []

    def progress(method: str, stage: str, fraction: float | None, info: dict) -> None:
        if method and stage == "fit":
            seen.append((threads.running_jobs(), torch.get_num_threads()))

    res = run_methods(tmp_path / "data" / "brick", RunConfig(methods=["padim"], image_size=64),
                      cache=Cache(tmp_path / "c"), progress=progress)
    assert res["runs"][0]["status"] == "ok"
    assert res["runs"][0]["timing"]["threads"] == 1
    assert seen == [(1, 1)]  # announced as a running job while it ran, with its planned threads
    assert threads.running_jobs() == 0


def test_jobs_ending_out_of_order_keep_the_plan_then_restore(jobs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two dashboard jobs in one process: the first one ending must not hand the second the pre-job count."""
    monkeypatch.delenv("ADLAB_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda cgroup_root=None: 1)
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    a, b = threads.job(), threads.job()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert torch.get_num_threads() == 1
    b.__exit__(None, None, None)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(original)
