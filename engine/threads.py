"""Intra-op threads that fit the CPUs this process really has, and OpenMP workers that sleep instead of spin.

Two problems on a shared machine (a team server, the dashboard beside other jobs, Ray workers):

- Thread count. torch starts one intra-op thread per CPU in its affinity mask, whatever the cgroup CPU quota
  (a container limited to 2 CPUs on a 64-core host gets 64), a Ray task's CPU grant or the other adlab jobs
  already running. `plan()` picks the count from
  all of these; `job()` applies it for the duration of a unit of work and tells other adlab processes it runs.
- Spin-waiting. libgomp (torch's and faiss's OpenMP) lets an idle worker spin for ~300k iterations before it
  sleeps. When other processes hold the cores, the spinning worker steals time slices from the thread that has
  the work: on 2 cores shared with other jobs the autoencoder (100 steps, 128 px) took 344 s with spinning
  workers against 27 s with OMP_WAIT_POLICY=PASSIVE, side by side (benchmarks/bench_threads.py --compare-spin).
  libgomp reads the policy once, when the library is loaded (`import torch`), so `prepare_environment()` runs
  from `engine/__init__.py`, before any engine module imports torch; a process that imported torch before
  `engine` keeps spinning, so worker processes should get `worker_env()` in their environment instead.

This module imports torch only inside the functions that set threads, so `import engine` stays cheap.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

GRANT_ENV = "ADLAB_THREADS"  # an explicit per-process grant (a scheduler or a worker pool sets it)
JOBS_DIR_ENV = "ADLAB_JOBS_DIR"  # where running adlab jobs announce themselves (default: a per-user temp dir)


def prepare_environment(env: MutableMapping[str, str] | None = None) -> None:
    """Ask OpenMP runtimes to sleep at once when idle (OMP_WAIT_POLICY=PASSIVE), unless the user chose a policy.

    Only effective when called before the OpenMP runtime is loaded (`import torch`, `import faiss`).
    """
    env = os.environ if env is None else env
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"


def worker_env(threads: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a worker process that runs adlab jobs: the passive wait policy and, when given,
    an explicit thread grant (ADLAB_THREADS)."""
    env = dict(os.environ if base is None else base)
    prepare_environment(env)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {threads}")
        env[GRANT_ENV] = str(threads)
    return env


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask), or os.cpu_count() where that is not available."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the cgroup allows (quota / period), or None when unlimited or unknown.

    cgroup v2: `<root>/cpu.max` holds "max 100000" or "<quota> <period>". cgroup v1:
    `<root>/cpu/cpu.cfs_quota_us` (-1 = unlimited) and `cpu.cfs_period_us`.
    """
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period) if int(period) > 0 else None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process can use: its affinity mask, capped by the cgroup quota (rounded up, at least 1)."""
    n = affinity_cpus()
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return n


def granted_threads(env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """An explicit grant and where it came from: ADLAB_THREADS, else OMP_NUM_THREADS (a user's choice, or Ray's:
    a Ray task or actor gets OMP_NUM_THREADS = its num_cpus). None when neither is set to a positive integer."""
    env = os.environ if env is None else env
    for var in (GRANT_ENV, "OMP_NUM_THREADS"):
        raw = env.get(var, "").strip()
        if not raw:
            continue
        try:
            n = int(raw.split(",")[0])  # OMP_NUM_THREADS may list nested levels: "4,2"
        except ValueError:
            if var == GRANT_ENV:
                raise ValueError(f"{GRANT_ENV} must be a positive integer, got {raw!r}") from None
            continue
        if n >= 1:
            return n, var
        if var == GRANT_ENV:
            raise ValueError(f"{GRANT_ENV} must be a positive integer, got {raw!r}")
    return None


@dataclass(frozen=True)
class ThreadPlan:
    """threads: intra-op threads to use; cpus: CPUs available to the process; jobs: adlab jobs running on
    this machine (this one included) that share them; why: one line saying how the count was chosen."""

    threads: int
    cpus: int
    jobs: int
    why: str


def plan(env: Mapping[str, str] | None = None, *, jobs: int | None = None,
         cgroup_root: str | Path = "/sys/fs/cgroup") -> ThreadPlan:
    """Threads for one adlab job: an explicit grant when there is one (capped at the CPUs available),
    else the available CPUs shared evenly among the running adlab jobs (at least 1)."""
    cpus = available_cpus(cgroup_root)
    n_jobs = max(1, running_jobs() if jobs is None else jobs)
    grant = granted_threads(env)
    if grant is not None:
        n, var = grant
        return ThreadPlan(min(n, cpus), cpus, n_jobs, f"{var}={n}" + (f", capped at {cpus} CPUs" if n > cpus else ""))
    n = max(1, cpus // n_jobs)
    why = f"{cpus} CPUs available" + (f", shared by {n_jobs} adlab jobs" if n_jobs > 1 else "")
    return ThreadPlan(n, cpus, n_jobs, why)


def apply(threads: int) -> None:
    """Set torch's intra-op threads (and faiss's OpenMP threads when faiss is loaded) to `threads`."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    faiss = sys.modules.get("faiss")
    if faiss is not None and hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(threads)


# ---- the registry of running jobs: one file per process, holding how many jobs that process runs now ----

def jobs_dir() -> Path:
    import tempfile  # here, not at the top: `import engine` (every CLI command) stays cheap

    d = os.environ.get(JOBS_DIR_ENV)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(d) if d else Path(tempfile.gettempdir()) / f"adlab-jobs-{uid}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22), so a reused pid is not counted."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str) -> bool:
    st = _start_time(pid)
    if st is not None:
        return st == start
    if start != "?":  # had a start time when it registered, /proc no longer has it: gone
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_jobs() -> int:
    """adlab jobs running now on this machine under this user (this process's included); stale entries of
    processes that died are removed."""
    d = jobs_dir()
    total = 0
    try:
        entries = list(d.iterdir())
    except OSError:
        return _local_jobs
    for p in entries:
        try:
            pid_s, start = p.name.split("-", 1)
            pid, count = int(pid_s), int(p.read_text() or "1")
        except (ValueError, OSError):
            continue
        if pid == os.getpid():
            continue  # this process is counted from memory: its file may be mid-rewrite
        if _alive(pid, start):
            total += max(0, count)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    return total + _local_jobs


_lock = threading.Lock()
_local_jobs = 0
_last_refresh = 0.0


def _write_own_entry() -> None:
    """Record this process's job count in its file (removed when it drops to 0). Best effort: a read-only temp
    dir only loses the cross-process sharing."""
    d = jobs_dir()
    path = d / f"{os.getpid()}-{_start_time(os.getpid()) or '?'}"
    try:
        if _local_jobs <= 0:
            path.unlink(missing_ok=True)
            return
        d.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(str(_local_jobs))
        os.replace(tmp, path)
    except OSError:
        pass


_outside_threads: int | None = None  # torch's thread count before this process's first running job


@contextlib.contextmanager
def job() -> Iterator[ThreadPlan]:
    """Run a unit of work (one method's fit and predict) with the threads `plan()` gives, announced to the other
    adlab processes on this machine so they share the CPUs. When the last job of this process ends, torch's
    thread count is restored to what it was before the first one; while others still run, it is re-planned."""
    global _local_jobs, _outside_threads
    import torch

    with _lock:
        if _local_jobs == 0:
            _outside_threads = torch.get_num_threads()
        _local_jobs += 1
        _write_own_entry()
    try:
        p = plan()
        apply(p.threads)
        yield p
    finally:
        with _lock:
            _local_jobs -= 1
            _write_own_entry()
            if _local_jobs == 0 and _outside_threads is not None:
                apply(_outside_threads)
            elif _local_jobs > 0:
                apply(plan().threads)


def refresh(min_interval_s: float = 2.0) -> None:
    """Inside a job, re-plan the threads (other jobs may have started or finished since); at most once every
    `min_interval_s` seconds. Outside a job it does nothing: library users keep their own thread settings.
    The training loop calls it once per epoch."""
    global _last_refresh
    if _local_jobs <= 0:
        return
    now = time.monotonic()
    if now - _last_refresh < min_interval_s:
        return
    _last_refresh = now
    apply(plan().threads)
