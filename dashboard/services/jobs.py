"""Jobs: the process-wide JobManager that trains one job per session (worker process, thread or Ray), and
the Train page's view of a job."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from dashboard.services.common import (
    JOB_ISOLATION,
    JOB_WORKERS,
    MAX_CONCURRENT_JOBS,
    RAY_ADDRESS,
    RAY_JOB_CPUS,
    UserError,
    _user_error,
    log,
)
from dashboard.services.data import _dataset, dataset_info
from dashboard.services.methods import check_config, estimate_run, estimate_text
from dashboard.services.results import _persist, run_name, run_notes_text
from engine.api import AdlabError, DataValidationError
from engine.data import cache_root
from engine.data.geometry import DEFAULT_RESIZE
from engine.executors import run_on_ray
from engine.parallel import run_parallel
from engine.runner import Cancelled, RunConfig, resolve_ks, run_labels, run_methods
from engine.worker import WorkerDied, WorkerStats, run_in_worker

# in the runner's order: the test split's features are made after fit
_STAGE_SPAN = {"loading": (0.0, 0.05), "features (train)": (0.05, 0.35), "fit": (0.35, 0.7),
               "features (test)": (0.7, 0.85), "predict": (0.85, 0.97), "evaluate": (0.97, 1.0)}


@dataclass
class MethodProgress:
    """Live progress of one method in a job."""

    stage: str = "waiting"
    fraction: float = 0.0  # overall, 0..1
    stage_fraction: float | None = None
    stage_started: float = field(default_factory=time.monotonic)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def label(self) -> str:
        """Stage, epoch and ETA in words."""
        parts = [self.stage]
        if "epoch" in self.info:
            parts.append(f"epoch {self.info['epoch']}/{self.info.get('of', '?')}")
        if self.info.get("cached"):
            parts.append("from cache")
        f = self.stage_fraction
        if f is not None and 0.02 < f < 1 and self.stage not in ("done", "failed"):
            eta = (time.monotonic() - self.stage_started) * (1 - f) / f
            parts.append(f"about {eta:.0f} s left in this stage")
        return " · ".join(parts)


@dataclass
class Job:
    """One training run requested by one session."""

    session: str
    dataset_path: str
    digest: str
    config: RunConfig
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"  # queued | running | done | failed | cancelled
    progress: dict[str, MethodProgress] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    worker: WorkerStats | None = None  # the worker process of a job run in one (pid, peak memory, exit code)

    @property
    def active(self) -> bool:
        """Queued or running."""
        return self.state in ("queued", "running")


def methods_at_once(config: RunConfig, isolation: str = JOB_ISOLATION, workers: int = JOB_WORKERS) -> int:
    """Worker processes a job of `config` trains in: `workers` with process isolation, at most one per run."""
    return min(workers, len(run_labels(config))) if isolation == "process" else 1


class JobManager:
    """Runs training jobs, one per session, at most `max_running` at a time, the others in a FIFO queue.

    isolation (default: `JOB_ISOLATION`) "process": each job trains in a worker process, followed by a thread
    here; "ray": each job is a Ray task on the cluster at `ray_address` (`engine.executors.run_on_ray`; the
    results and maps go to the cache root, which the cluster's nodes must share); "thread": the job trains in that
    thread, in this process (for tests that patch the engine in-process).
    """

    def __init__(self, max_running: int = 1, isolation: str | None = None, ray_address: str | None = None,
                 workers: int | None = None):
        self.max_running = max(1, max_running)
        # methods of one job at once, each group in its own worker (engine.parallel); process isolation only
        self.workers = max(1, JOB_WORKERS if workers is None else workers)
        self.isolation = isolation or JOB_ISOLATION
        if self.isolation not in ("process", "thread", "ray"):
            raise ValueError(f"job isolation {self.isolation!r}: use 'process', 'ray' or 'thread' "
                             "(ADLAB_JOB_ISOLATION)")
        self.ray_address = ray_address or RAY_ADDRESS
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []  # job ids waiting, in order
        self._running: set[str] = set()

    def submit(self, session: str, dataset_path: str, config: RunConfig) -> Job:
        """Queue a job for `session` (UserError if that session already has one going or the config is invalid)."""
        msg = check_config(config.methods, config.labeled_anomalies)
        if msg:
            raise UserError(msg)
        info = dataset_info(dataset_path)
        try:
            labels_cfg, _ = resolve_ks(_dataset(dataset_path), config)
        except AdlabError as e:
            raise UserError(str(e)) from None
        # the memory limit is this machine's: a job handed to a Ray cluster runs where Ray finds room for it
        refusal = (estimate_run(dataset_path, config, self.job_workers(config)).refusal()
                   if self.isolation != "ray" else None)
        if refusal:
            raise UserError(refusal)
        with self._cond:
            old = self._jobs.get(session)
            if old is not None and old.active:
                raise UserError("A run is already going for this session: wait for it or cancel it.")
            job = Job(session=session, dataset_path=dataset_path, digest=info.digest, config=config)
            # the labels the runs will carry: with the K the dataset really labels (a larger K is lowered)
            job.progress = {name: MethodProgress() for name in run_labels(labels_cfg)}
            self._jobs[session] = job
            self._queue.append(job.id)
        threading.Thread(target=self._work, args=(job,), name=f"adlab-job-{job.id}", daemon=True).start()
        return job

    def job_workers(self, config: RunConfig) -> int:
        """Worker processes a job of `config` trains in (`methods_at_once` with this manager's settings)."""
        return methods_at_once(config, self.isolation, self.workers)

    def get(self, session: str) -> Job | None:
        """The latest job of a session."""
        with self._cond:
            return self._jobs.get(session)

    def active_for_dataset(self, digest: str) -> Job | None:
        """Any queued or running job on this dataset (e.g. started from another tab)."""
        with self._cond:
            return next((j for j in self._jobs.values() if j.digest == digest and j.active), None)

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to start, None when not queued."""
        with self._cond:
            return self._queue.index(job.id) + 1 if job.id in self._queue else None

    def cancel(self, session: str) -> None:
        """Ask the session's job to stop: at the engine's next step, or its worker is killed a few seconds later."""
        with self._cond:
            job = self._jobs.get(session)
            if job is not None and job.active:
                job.cancel.set()
                self._cond.notify_all()

    def _work(self, job: Job) -> None:
        with self._cond:
            while not job.cancel.is_set() and (self._queue[0] != job.id or len(self._running) >= self.max_running):
                self._cond.wait(timeout=0.5)
            self._queue.remove(job.id)
            if job.cancel.is_set():
                job.state, job.finished = "cancelled", time.time()
                job.error = "cancelled by the user before it started: nothing was computed"
                self._cond.notify_all()
                return
            self._running.add(job.id)
            job.state = "running"
        try:
            self._run(job)
        finally:
            with self._cond:
                self._running.discard(job.id)
                job.finished = time.time()
                self._cond.notify_all()

    def _run(self, job: Job) -> None:
        cfg = job.config

        def progress(method: str, stage: str, fraction: float | None, info: dict[str, Any]) -> None:
            targets = [job.progress[method]] if method in job.progress else (
                [p for p in job.progress.values() if p.stage == "waiting"] if stage == "loading" else [])
            if method in job.progress:  # the others wait until the runner reaches them
                for other in job.progress.values():
                    if other.stage == "loading":
                        other.stage = "waiting for its turn"
            for p in targets:
                if stage != p.stage:
                    p.stage, p.stage_started = stage, time.monotonic()
                p.stage_fraction = fraction
                p.info = dict(info)
                if stage == "done":
                    p.fraction = 1.0
                elif stage == "failed":
                    p.fraction, p.error = 1.0, str(info.get("error") or "failed")
                else:
                    lo, hi = _STAGE_SPAN.get(stage, (p.fraction, p.fraction))
                    p.fraction = max(p.fraction, lo + (hi - lo) * float(fraction or 0.0))

        def on_result(rec: dict[str, Any]) -> None:
            job.records.append(rec)
            try:
                _persist(job, [rec])
            except OSError as e:
                log.warning("could not store results: %s", e)

        try:
            if self.isolation == "process" and self.job_workers(cfg) > 1:
                results = run_parallel(job.dataset_path, cfg, self.job_workers(cfg), progress=progress,
                                       cancel=job.cancel, on_result=on_result)
            elif self.isolation == "process":
                job.worker = WorkerStats()
                results = run_in_worker(job.dataset_path, cfg, progress=progress, cancel=job.cancel,
                                        on_result=on_result, stats=job.worker, label=job.id)
            elif self.isolation == "ray":
                results = run_on_ray(job.dataset_path, cfg, progress=progress, cancel=job.cancel,
                                     on_result=on_result, address=self.ray_address, num_cpus=RAY_JOB_CPUS,
                                     cache_root=str(cache_root()))
            else:
                results = run_methods(_dataset(job.dataset_path), cfg, progress=progress, cancel=job.cancel,
                                      on_result=on_result)
            _persist(job, results["runs"], header=results)
            job.state = "done"
        except Cancelled:
            job.error = (f"cancelled by the user: {len(job.records)} of {len(job.progress)} method(s) had finished "
                         "and are kept")
            job.state = "cancelled"
        except WorkerDied as e:
            ok = sum(r.get("status") == "ok" for r in job.records)
            job.error = f"{e} ({ok} of {len(job.progress)} method(s) had finished and are kept)"
            job.state = "failed"
        except Exception as e:  # noqa: BLE001 - the page shows the message
            job.error = str(_user_error(e)) if not isinstance(e, DataValidationError) else str(e)
            job.state = "failed"


@functools.lru_cache(maxsize=1)
def job_manager() -> JobManager:
    """The process-wide job manager (shared by every browser session)."""
    return JobManager(MAX_CONCURRENT_JOBS)


def _page_config(methods: list[str], image_size: int, backbone: str, preset: str,
                 labeled_anomalies: int | list[int], resize: str = DEFAULT_RESIZE,
                 tile: int | None = None) -> RunConfig:
    k = int(labeled_anomalies) if isinstance(labeled_anomalies, int) else [int(x) for x in labeled_anomalies]
    return RunConfig(methods=list(methods), image_size=int(image_size), backbone=backbone, preset=preset,
                     labeled_anomalies=k, keep_models=True,  # the Try page scores with them
                     resize=resize, tile=None if tile is None else int(tile))


def start_run(session: str, dataset_path: str, methods: list[str], *, image_size: int, backbone: str, preset: str,
              labeled_anomalies: int | list[int], resize: str = DEFAULT_RESIZE, tile: int | None = None) -> Job:
    """Queue a training run for this session. Raises UserError with the reason when it cannot start.
    resize: "keep-aspect" or "square"; tile: cut each image into overlapping tile x tile squares (None: whole)."""
    cfg = _page_config(methods, image_size, backbone, preset, labeled_anomalies, resize, tile)
    return job_manager().submit(session, dataset_path, cfg)


def run_estimate(dataset_path: str, methods: list[str], *, image_size: int, backbone: str, preset: str,
                 labeled_anomalies: int, resize: str = DEFAULT_RESIZE, tile: int | None = None
                 ) -> tuple[str, str | None]:
    """(the estimate in words, the reason the run would be refused or None) for the Train page's selection."""
    cfg = _page_config(methods, image_size, backbone, preset, labeled_anomalies, resize, tile)
    workers = methods_at_once(cfg)  # the settings the server's job manager runs with
    est = estimate_run(dataset_path, cfg, workers)
    shape = "" if est.shape is None or (est.tiles == 1 and est.shape[0] == est.shape[1]) else \
        f"Images at {est.size_text}. "
    at_once = f"{workers} methods at once (ADLAB_JOB_WORKERS). " if workers > 1 else ""
    return shape + at_once + estimate_text(est), est.refusal()


def job_view(job: Job) -> dict[str, Any]:
    """A snapshot of a job for the page: state, queue position, per-method progress rows, error."""
    rows = []
    done = {run_name(r): r for r in job.records}
    for m, p in list(job.progress.items()):
        rec = done.get(m)
        status = "waiting" if p.stage.startswith("waiting") else "running"
        if rec is not None:
            status = "ok" if rec["status"] == "ok" else "failed"
        elif p.error:
            status = "failed"
        elif job.state == "cancelled":
            status = "cancelled"
        elif job.state == "failed":
            status = "stopped"
        auroc = (rec.get("metrics") or {}).get("image_auroc") if rec and rec["status"] == "ok" else None
        label = {"cancelled": "cancelled before it finished",
                 "stopped": "stopped before it finished (see the message below)"}.get(status) or p.label()
        rows.append({"method": m, "status": status, "fraction": min(1.0, p.fraction), "label": label,
                     "error": (rec or {}).get("error") or p.error, "auroc": auroc,
                     "cached": bool(rec and rec.get("cached")), "notes": run_notes_text(rec)})
    return {"state": job.state, "cancelling": job.cancel.is_set() and job.active,
            "queue_position": job_manager().queue_position(job), "rows": rows,
            "error": job.error, "digest": job.digest, "elapsed": (job.finished or time.time()) - job.created,
            "worker": asdict(job.worker) if job.worker is not None else None,
            "ray": (job_manager().ray_address or "local") if job_manager().isolation == "ray" else None}
