"""Everything the dashboard pages need from the engine, and nothing else. The only module importing `engine`.

Pages call these functions with plain values and get plain values back (dicts, lists, numpy arrays, pandas
frames). Engine errors become `UserError` (one specific message) or `DataProblems` (every validation problem with
its file), which the pages show with `st.error`; a stack trace never reaches the page.

Training is managed by a process-wide `JobManager` (one job per browser session, at most `MAX_CONCURRENT_JOBS`
running at once, the others queued in order). Each job trains in a worker process of its own (`engine.worker`), so
a job killed for memory or crashing in a native library never takes the server down; a thread of the server
follows it. Before a job is queued its peak memory is estimated from earlier runs on this machine
(`engine.estimates`) and a job above `ADLAB_JOB_MEMORY_GB` is refused. Results of finished methods are written
atomically to ``<cache root>/dashboard/results/<dataset digest>.json`` as each method finishes, so a browser
refresh or a second tab sees them; the engine's own cache makes a repeated run return at once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine import estimates, registry
from engine import metrics as em
from engine.api import AdlabError, DataValidationError
from engine.backbones import weights_description
from engine.cache import atomic_write
from engine.data import Dataset, Limits, cache_root, discover, find_categories, load_split
from engine.data import roots as data_roots
from engine.device import resolve_device
from engine.heatmap import DEFAULT_OPACITY  # noqa: F401 - the pages' default map opacity, as adlab predict draws
from engine.runner import Cancelled, RunConfig, load_images, load_prediction, method_params, run_methods
from engine.worker import WorkerDied, WorkerStats, run_in_worker

log = logging.getLogger("adlab.dashboard")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_ROOT = ROOT / "sample_data"
MAX_UPLOAD_MB = 200  # keep equal to server.maxUploadSize in .streamlit/config.toml
UPLOAD_LIMITS = Limits()
MAX_CONCURRENT_JOBS = int(os.environ.get("ADLAB_MAX_JOBS", "1"))
# "process": each job trains in a worker process (the default); "thread": in a thread of this process, for tests
# that patch the engine in-process.
JOB_ISOLATION = os.environ.get("ADLAB_JOB_ISOLATION", "process")
BACKBONES = ["efficientnet_lite0", "resnet18", "wide_resnet50_2"]
IMAGE_SIZES = [128, 160, 192, 224, 256, 320]


class UserError(Exception):
    """A problem to show the user as one message (never a stack trace)."""


class DataProblems(UserError):
    """A dataset or upload failed validation: `problems` lists (file, message, hint) for every problem found."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) with the data")


def _user_error(e: Exception) -> UserError:
    if isinstance(e, DataValidationError):
        return DataProblems([(p.path, p.message, p.hint) for p in e.problems])
    if isinstance(e, AdlabError):
        return UserError(str(e))
    log.error("unexpected error:\n%s", traceback.format_exc())
    return UserError(f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataInfo:
    """What the pages show about a dataset."""

    path: str
    name: str
    digest: str
    layout: str
    n_train: int
    n_test: int
    defect_types: list[str]
    warnings: list[str]
    has_masks: bool
    is_sample: bool
    working_size: int = 256  # the engine's default resolution for this dataset (never upsampling)
    is_server: bool = False  # opened in place from a server folder under ADLAB_DATA_ROOTS (read-only)


def sample_categories() -> list[str]:
    """Categories of the bundled sample data (e.g. brick, grass, gravel)."""
    return find_categories(SAMPLE_ROOT)


def sample_path(category: str) -> str:
    """Folder of a sample category."""
    return str(SAMPLE_ROOT / category)


def default_dataset_path() -> str:
    """The dataset the app opens on: the first sample category."""
    cats = sample_categories()
    if not cats:
        raise UserError(f"no sample data found in {SAMPLE_ROOT}; run `adlab sample-data sample_data`")
    return sample_path(cats[0])


_ds_lock = threading.Lock()
_ds_memo: dict[str, Dataset] = {}


def _dataset(path: str) -> Dataset:
    """The validated Dataset at `path`, memoised per process (datasets on disk are treated as read-only)."""
    with _ds_lock:
        if path in _ds_memo:
            return _ds_memo[path]
    try:
        ds = discover(path, limits=UPLOAD_LIMITS)
        roots = data_roots.data_roots()
        if _under_server_root(path, roots):  # no file of a server dataset may lead outside the roots
            data_roots.check_files_under_roots(ds, roots)
    except Exception as e:  # noqa: BLE001 - every engine error becomes a message
        raise _user_error(e) from None
    with _ds_lock:
        _ds_memo[path] = ds
    return ds


def _under_server_root(path: str, roots: list[Path]) -> bool:
    p = Path(path).resolve()
    return any(p == r or p.is_relative_to(r) for r in roots)


def _info(path: str, ds: Dataset) -> DataInfo:
    return DataInfo(path=path, name=ds.name, digest=ds.digest, layout=ds.layout, n_train=ds.n_train,
                    n_test=ds.n_test, defect_types=list(ds.defect_types), warnings=list(ds.warnings),
                    has_masks=ds.has_masks, is_sample=Path(path).resolve().parent == SAMPLE_ROOT.resolve(),
                    working_size=ds.working_size(), is_server=_under_server_root(path, data_roots.data_roots()))


def dataset_info(path: str) -> DataInfo:
    """Validate and describe the dataset at `path` (raises DataProblems / UserError)."""
    return _info(path, _dataset(path))


def upload_limits_text() -> str:
    """The limits of an upload, in words, for the Data page."""
    lim = UPLOAD_LIMITS
    return (f"A .zip of at most {MAX_UPLOAD_MB} MB, up to {lim.max_files} files and "
            f"{lim.max_total_uncompressed_mb:.0f} MB unpacked; images up to {lim.max_side_px} px a side are kept "
            "as they are, larger ones are downscaled.")


def save_upload(filename: str, data: bytes) -> DataInfo:
    """Store an uploaded zip under the cache, extract it safely and validate it. Returns its DataInfo.

    Raises DataProblems listing every problem (the zip is then deleted), or UserError. Nothing else changes.
    """
    if not filename.lower().endswith(".zip"):
        raise UserError(f"{filename}: please upload a .zip file (MVTec or folder layout inside)")
    if len(data) > MAX_UPLOAD_MB * 2**20:
        raise UserError(f"{filename}: {len(data) / 2**20:.0f} MB is over the {MAX_UPLOAD_MB} MB upload limit")
    sha = hashlib.sha256(data).hexdigest()[:32]
    folder = UPLOAD_LIMITS.upload_dir() / "incoming" / sha
    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(filename).stem)[:80] or "upload"
    target = folder / f"{stem}.zip"
    if not target.exists():
        atomic_write(target, data)
    try:
        return dataset_info(str(target))
    except UserError:
        target.unlink(missing_ok=True)
        raise


def server_roots() -> list[str]:
    """The server folders datasets can be opened from ($ADLAB_DATA_ROOTS, existing ones, resolved)."""
    return [str(r) for r in data_roots.data_roots()]


def server_datasets() -> list[dict[str, str]]:
    """Dataset folders under the server roots: {"path", "label"} (label: root name › relative path)."""
    return [{"path": d.path, "label": d.label} for d in data_roots.list_server_datasets()]


def open_server_dataset(path: str) -> DataInfo:
    """Check that `path` (absolute, or relative to a root) is a folder under a server root, no '..', no symbolic
    link leading out, then validate it like an upload. Raises DataProblems; nothing is written there."""
    try:
        folder = data_roots.server_dataset_path(path)
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None
    return dataset_info(str(folder))


def counts_table(path: str) -> pd.DataFrame:
    """Images per split and defect type, with how many have a mask."""
    ds = _dataset(path)
    rows: dict[tuple[str, str], list[int]] = {}
    for split, samples in (("train", ds.train), ("test", ds.test)):
        for s in samples:
            r = rows.setdefault((split, s.defect_type), [0, 0])
            r[0] += 1
            r[1] += int(s.mask_path is not None)
    return pd.DataFrame([{"split": k[0], "type": k[1], "images": v[0], "with mask": v[1]} for k, v in rows.items()])


def thumbnails(path: str, per_type: int = 4, size: int = 128) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(caption, image (H,W,3) uint8, mask (H,W) or None) for a few test images of every type, good first."""
    from dashboard.views.images import to_rgb_uint8

    ds = _dataset(path)
    picks: list[int] = []
    for t in ["good", *ds.defect_types]:
        picks += [i for i, s in enumerate(ds.test) if s.defect_type == t][:per_type]
    try:
        imgs = load_split(ds, "test", size, indices=picks)
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None
    out = []
    for j, i in enumerate(picks):
        s = ds.test[i]
        mask = imgs.masks[j].numpy() if imgs.masks is not None and bool(imgs.has_mask[j]) else None
        out.append((f"{s.defect_type} · {Path(s.path).name}", to_rgb_uint8(imgs.images[j].numpy()), mask))
    return out


# ------------------------------------------------------------------------------------------------- methods


def families() -> dict[str, str]:
    """Family key -> title, in the survey's order."""
    return dict(registry.FAMILIES)


def methods_by_family() -> dict[str, list[dict[str, Any]]]:
    """Registered methods grouped by family (only families with at least one method), each as a dict."""
    out: dict[str, list[dict[str, Any]]] = {}
    for m in registry.available():
        out.setdefault(m.family, []).append(m.to_dict())
    return out


def method_info(name: str) -> dict[str, Any]:
    """The registry entry of one method as a dict."""
    try:
        return registry.info(name).to_dict()
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None


def default_methods(n: int = 3) -> list[str]:
    """A quick first selection: up to n fast unsupervised methods (no gradient training), else the first ones."""
    ms = registry.available()
    fast = [m.name for m in ms if not m.trained and m.supervision == "none"]
    return (fast or [m.name for m in ms])[:n]


def weights_source(backbone: str) -> str:
    """Where the backbone's pretrained weights come from."""
    return weights_description(backbone, "auto")


def device_name() -> str:
    """The device `auto` resolves to here."""
    return resolve_device("auto")


def default_image_size(info: DataInfo) -> int:
    """The engine's default for this dataset (256, or the images' own size when smaller), as a slider option."""
    return max([s for s in IMAGE_SIZES if s <= info.working_size] or [IMAGE_SIZES[0]])


def check_config(methods: list[str], labeled_anomalies: int) -> str | None:
    """A message when the selection cannot run (nothing picked, weakly supervised with K = 0), else None."""
    if not methods:
        return "Pick at least one method."
    weak = [m for m in methods if method_info(m)["supervision"] == "weak"]
    if weak and labeled_anomalies <= 0:
        return (f"{', '.join(weak)} learn from a few labelled defects: set “labelled anomalies K” to 1 or more "
                "(K defective test images per type move into training), or unselect them.")
    return None


def estimate_run(dataset_path: str, cfg: RunConfig) -> estimates.JobEstimate:
    """Expected time and peak memory of running `cfg` on the dataset, from earlier runs on this machine."""
    info = dataset_info(dataset_path)
    size = int(cfg.image_size or info.working_size)
    try:
        methods = [(m, method_params(m, cfg), bool(registry.info(m).trained)) for m in cfg.methods]
        return estimates.estimate_job(methods, n_train=info.n_train, n_test=info.n_test, image_size=size,
                                      preset=cfg.preset, device=resolve_device(cfg.device))
    except (AdlabError, ValueError) as e:
        raise UserError(str(e)) from None


def estimate_text(est: estimates.JobEstimate) -> str:
    """The estimate in one line for the Train page: time (per method when several), peak memory against the limit."""
    measured = [m for m in est.methods if m.measured]
    unmeasured = ", ".join(f"`{m}`" for m in est.unmeasured)
    if not measured:
        line = f"**Time:** not measured on this machine yet for {unmeasured} (the first run measures it)"
    else:
        per = ", ".join(f"`{m.method}` {estimates.duration_text(m.seconds)}" for m in measured)
        line = f"**Estimated time {estimates.duration_text(est.seconds)}**" + (
            f" ({per})" if len(measured) > 1 else f" for `{measured[0].method}`")
        if unmeasured:
            line += f", plus {unmeasured}: not measured on this machine yet (the first run measures it)"
    return (line + f" · peak memory ≈ {estimates.gb_text(est.peak_mb)} of the {estimates.gb_text(est.limit_mb)} "
            "a job may use · *from earlier runs here, roughly.*")


# ---------------------------------------------------------------------------------------------------- jobs


_STAGE_SPAN = {"loading": (0.0, 0.05), "features (train)": (0.05, 0.35), "features (test)": (0.35, 0.5),
               "fit": (0.5, 0.85), "predict": (0.85, 0.97), "evaluate": (0.97, 1.0)}


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


class JobManager:
    """Runs training jobs, one per session, at most `max_running` at a time, the others in a FIFO queue.

    isolation "process" (default: `JOB_ISOLATION`): each job trains in a worker process, followed by a thread
    here; "thread": the job trains in that thread, in this process (for tests that patch the engine in-process).
    """

    def __init__(self, max_running: int = 1, isolation: str | None = None):
        self.max_running = max(1, max_running)
        self.isolation = isolation or JOB_ISOLATION
        if self.isolation not in ("process", "thread"):
            raise ValueError(f"job isolation {self.isolation!r}: use 'process' or 'thread' (ADLAB_JOB_ISOLATION)")
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
        refusal = estimate_run(dataset_path, config).refusal()
        if refusal:
            raise UserError(refusal)
        with self._cond:
            old = self._jobs.get(session)
            if old is not None and old.active:
                raise UserError("A run is already going for this session: wait for it or cancel it.")
            job = Job(session=session, dataset_path=dataset_path, digest=info.digest, config=config)
            job.progress = {m: MethodProgress() for m in config.methods}
            self._jobs[session] = job
            self._queue.append(job.id)
        threading.Thread(target=self._work, args=(job,), name=f"adlab-job-{job.id}", daemon=True).start()
        return job

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
            if self.isolation == "process":
                job.worker = WorkerStats()
                results = run_in_worker(job.dataset_path, cfg, progress=progress, cancel=job.cancel,
                                        on_result=on_result, stats=job.worker, label=job.id)
            else:
                results = run_methods(_dataset(job.dataset_path), cfg, progress=progress, cancel=job.cancel,
                                      on_result=on_result)
            _persist(job, results["runs"], header=results)
            job.state = "done"
        except Cancelled:
            job.error = (f"cancelled by the user: {len(job.records)} of {len(cfg.methods)} method(s) had finished "
                         "and are kept")
            job.state = "cancelled"
        except WorkerDied as e:
            ok = sum(r.get("status") == "ok" for r in job.records)
            job.error = f"{e} ({ok} of {len(cfg.methods)} method(s) had finished and are kept)"
            job.state = "failed"
        except Exception as e:  # noqa: BLE001 - the page shows the message
            job.error = str(_user_error(e)) if not isinstance(e, DataValidationError) else str(e)
            job.state = "failed"


@functools.lru_cache(maxsize=1)
def job_manager() -> JobManager:
    """The process-wide job manager (shared by every browser session)."""
    return JobManager(MAX_CONCURRENT_JOBS)


def _page_config(methods: list[str], image_size: int, backbone: str, preset: str, labeled_anomalies: int
                 ) -> RunConfig:
    return RunConfig(methods=list(methods), image_size=int(image_size), backbone=backbone, preset=preset,
                     labeled_anomalies=int(labeled_anomalies), keep_models=True)  # the Try page scores with them


def start_run(session: str, dataset_path: str, methods: list[str], *, image_size: int, backbone: str, preset: str,
              labeled_anomalies: int) -> Job:
    """Queue a training run for this session. Raises UserError with the reason when it cannot start."""
    cfg = _page_config(methods, image_size, backbone, preset, labeled_anomalies)
    return job_manager().submit(session, dataset_path, cfg)


def run_estimate(dataset_path: str, methods: list[str], *, image_size: int, backbone: str, preset: str,
                 labeled_anomalies: int) -> tuple[str, str | None]:
    """(the estimate in words, the reason the run would be refused or None) for the Train page's selection."""
    est = estimate_run(dataset_path, _page_config(methods, image_size, backbone, preset, labeled_anomalies))
    return estimate_text(est), est.refusal()


def run_notes_text(run: dict[str, Any] | None) -> str:
    """A run's own notes (how training went, warnings such as a GAN's mode collapse) as one line; '' if none."""
    notes = (run or {}).get("run_notes") or {}
    return "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in notes.items() if v not in (None, ""))


def job_view(job: Job) -> dict[str, Any]:
    """A snapshot of a job for the page: state, queue position, per-method progress rows, error."""
    rows = []
    done = {r["method"]: r for r in job.records}
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
            "worker": asdict(job.worker) if job.worker is not None else None}


# ------------------------------------------------------------------------------------------------ results


_res_lock = threading.Lock()


def _results_file(digest: str) -> Path:
    return cache_root() / "dashboard" / "results" / f"{digest}.json"


def _config_of(cfg: RunConfig) -> dict[str, Any]:
    return {"image_size": cfg.image_size, "device": resolve_device(cfg.device), "backbone": cfg.backbone,
            "weights": cfg.weights, "preset": cfg.preset, "labeled_anomalies": cfg.labeled_anomalies,
            "seed": cfg.seed}


def _persist(job: Job, runs: list[dict[str, Any]], header: dict[str, Any] | None = None) -> None:
    """Merge `runs` into the stored results of the job's dataset (same config: replace by method; else start anew)."""
    ds = _dataset(job.dataset_path)
    config = _config_of(job.config)
    with _res_lock:
        old = latest_results(job.digest)
        same = old is not None and old.get("config") == config
        base = old if same else None
        if header is not None:
            new = {k: v for k, v in header.items() if k != "runs"}
            new["config"] = config
        elif base is not None:
            new = {k: v for k, v in base.items() if k != "runs"}
        else:
            new = {"dataset": {"path": ds.root, "name": ds.name, "digest": ds.digest, "n_train": ds.n_train,
                               "n_test": None, "defect_types": ds.defect_types, "warnings": list(ds.warnings)},
                   "config": config}
        new["dataset"]["source"] = job.dataset_path
        by_method = {r["method"]: r for r in (base or {}).get("runs", [])}
        for r in runs:
            by_method[r["method"]] = r
        order = [r["method"] for r in (base or {}).get("runs", [])]
        order += [r["method"] for r in runs if r["method"] not in order]
        new["runs"] = [by_method[m] for m in order]
        new["updated"] = time.time()
        atomic_write(_results_file(job.digest), json.dumps(new, indent=1).encode())


def latest_results(digest: str) -> dict[str, Any] | None:
    """The stored results for a dataset digest (finished methods of the last runs with one config), or None."""
    f = _results_file(digest)
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable results %s: %s", f, e)
        return None


def clear_results(digest: str) -> None:
    """Forget the stored results of a dataset (the engine cache still makes re-runs instant)."""
    _results_file(digest).unlink(missing_ok=True)


def ok_runs(results: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The runs that finished with status ok."""
    return [r for r in (results or {}).get("runs", []) if r.get("status") == "ok"]


def results_json(results: dict[str, Any]) -> bytes:
    """The whole run as results.json (schema of DESIGN §7, plus the dashboard's additions)."""
    return json.dumps(results, indent=1).encode()


@functools.lru_cache(maxsize=256)
def _ci(key: str, scores: tuple[float, ...], labels: tuple[int, ...]) -> tuple[float, float] | None:
    return em.bootstrap_ci(np.asarray(scores), np.asarray(labels), "image_auroc", n_boot=500, seed=0)


def auroc_ci(run: dict[str, Any]) -> tuple[float, float] | None:
    """95% bootstrap interval of a run's image AUROC (over its per-image scores)."""
    imgs = run.get("images") or []
    if not imgs:
        return None
    return _ci(str(run.get("cache_key")), tuple(float(i["score"]) for i in imgs), tuple(int(i["label"]) for i in imgs))


def metrics_table(results: dict[str, Any] | None) -> pd.DataFrame:
    """One row per method: every metric, its AUROC interval, timings, status and error."""
    rows = []
    for r in (results or {}).get("runs", []):
        m = r.get("metrics") or {}
        t = r.get("timing") or {}
        ci = auroc_ci(r) if r.get("status") == "ok" else None
        rows.append({
            "method": r["method"], "family": registry.FAMILIES.get(r.get("family", ""), r.get("family")),
            "status": r["status"] + (" (cached)" if r.get("cached") else ""),
            "image AUROC": m.get("image_auroc"),
            "AUROC 95% CI": f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else None,
            "image AP": m.get("image_ap"), "F1-max": m.get("image_f1_max"),
            "pixel AUROC": m.get("pixel_auroc"), "AUPRO": m.get("pixel_aupro"),
            "fit s": t.get("fit_s"), "predict s": t.get("predict_s"), "images/s": t.get("images_per_s"),
            "peak MB": t.get("peak_mem_mb"), "faithful": r.get("faithful", True),
            "reduced": bool(r.get("reduced", False)), "weights": r.get("weights"),
            "notes": run_notes_text(r) or None, "error": r.get("error"),
        })
    return pd.DataFrame(rows)


def curves(results: dict[str, Any] | None, kind: str) -> list[tuple[str, list[float], list[float], float | None]]:
    """(method, x, y, area) per ok run. kind: "roc" (fpr, tpr, image AUROC), "pr" (recall, precision, AP),
    "pixel_roc" (fpr, tpr, pixel AUROC; methods without one are left out)."""
    out = []
    for r in ok_runs(results):
        c = (r.get("curves") or {}).get(kind)
        if not c:
            continue
        m = r.get("metrics") or {}
        if kind == "pr":
            out.append((r["method"], c["recall"], c["precision"], m.get("image_ap")))
        else:
            area = m.get("pixel_auroc" if kind == "pixel_roc" else "image_auroc")
            out.append((r["method"], c["fpr"], c["tpr"], area))
    return out


def base_rate(results: dict[str, Any] | None) -> float | None:
    """Share of defective images in the evaluated test set."""
    runs = ok_runs(results)
    if not runs or not runs[0].get("images"):
        return None
    labels = [i["label"] for i in runs[0]["images"]]
    return sum(labels) / len(labels)


def per_defect(results: dict[str, Any] | None) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(methods, defect types, AUROC matrix) over ok runs."""
    runs = ok_runs(results)
    types = sorted({t for r in runs for t in ((r.get("metrics") or {}).get("per_defect") or {})})
    vals = [[(((r["metrics"].get("per_defect") or {}).get(t)) or {}).get("image_auroc") for t in types] for r in runs]
    return [r["method"] for r in runs], types, vals


def speed_points(results: dict[str, Any] | None) -> tuple[list[str], list[float], list[float]]:
    """(methods, images per second, image AUROC) for ok runs that have both."""
    ms, xs, ys = [], [], []
    for r in ok_runs(results):
        s = (r.get("timing") or {}).get("images_per_s")
        a = (r.get("metrics") or {}).get("image_auroc")
        if s is not None and a is not None:
            ms.append(r["method"])
            xs.append(float(s))
            ys.append(float(a))
    return ms, xs, ys


def best_method(results: dict[str, Any] | None) -> str | None:
    """The ok run with the highest image AUROC (ties: the faster one)."""
    runs = [r for r in ok_runs(results) if (r.get("metrics") or {}).get("image_auroc") is not None]
    if not runs:
        return None
    return max(runs, key=lambda r: (r["metrics"]["image_auroc"], (r.get("timing") or {}).get("images_per_s") or 0))[
        "method"]


def _run_of(results: dict[str, Any] | None, method: str) -> dict[str, Any] | None:
    return next((r for r in ok_runs(results) if r["method"] == method), None)


# ------------------------------------------------------------------------------------------- thresholds


def thresholds(results: dict[str, Any] | None, mode: str = "f1", max_fpr: float = 0.05) -> dict[str, float | None]:
    """Decision threshold per ok method. mode "f1": the F1-max threshold from the metrics; "fpr": the lowest
    threshold flagging at most `max_fpr` of the good test images."""
    out: dict[str, float | None] = {}
    for r in ok_runs(results):
        if mode == "f1":
            out[r["method"]] = (r.get("metrics") or {}).get("threshold")
        else:
            good = [i["score"] for i in r.get("images", []) if i["label"] == 0]
            out[r["method"]] = em.threshold_at_fpr(np.asarray(good), max_fpr) if good else None
    return out


def confusion_table(results: dict[str, Any] | None, thr: dict[str, float | None]) -> pd.DataFrame:
    """Per method at its threshold: caught defects, missed defects, false alarms, and the rates."""
    rows = []
    for r in ok_runs(results):
        t = thr.get(r["method"])
        if t is None:
            continue
        s = np.asarray([i["score"] for i in r["images"]])
        y = np.asarray([i["label"] for i in r["images"]])
        c = em.confusion_at(s, y, t)
        rows.append({"method": r["method"], "threshold": t, "defects caught": c["tp"], "missed (FN)": c["fn"],
                     "false alarms (FP)": c["fp"], "good passed": c["tn"], "recall": c["tpr"], "FPR": c["fpr"]})
    return pd.DataFrame(rows)


def failures(results: dict[str, Any] | None, method: str, threshold: float | None
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(false positives, false negatives) of a method at `threshold`, the most confident mistakes first.

    Each item: path, name, defect_type, label, score, margin (distance from the threshold, always >= 0).
    """
    r = _run_of(results, method)
    if r is None or threshold is None:
        return [], []
    fps, fns = [], []
    for i in r["images"]:
        flagged = i["score"] >= threshold
        item = {**i, "name": _short(i["path"]), "margin": abs(i["score"] - threshold)}
        if flagged and i["label"] == 0:
            fps.append(item)
        elif not flagged and i["label"] == 1:
            fns.append(item)
    return sorted(fps, key=lambda d: -d["margin"]), sorted(fns, key=lambda d: -d["margin"])


def disagreements(results: dict[str, Any] | None, thr: dict[str, float | None], top: int = 8) -> list[dict[str, Any]]:
    """Images where the methods' verdicts split most evenly (ties broken by how far apart their normalised
    scores are). Each item: path, name, defect_type, label, verdicts {method: bool flagged}, n_wrong."""
    runs = [r for r in ok_runs(results) if thr.get(r["method"]) is not None]
    if len(runs) < 2:
        return []
    per_path: dict[str, dict[str, Any]] = {}
    for r in runs:
        s = np.asarray([i["score"] for i in r["images"]])
        spread = float(np.std(s)) or 1.0
        t = thr[r["method"]]
        for i in r["images"]:
            d = per_path.setdefault(i["path"], {"path": i["path"], "name": _short(i["path"]), "label": i["label"],
                                                "defect_type": i["defect_type"], "verdicts": {}, "z": []})
            d["verdicts"][r["method"]] = bool(i["score"] >= t)
            d["z"].append((i["score"] - t) / spread)
    items = []
    for d in per_path.values():
        if len(d["verdicts"]) != len(runs):
            continue
        n_flag = sum(d["verdicts"].values())
        split = min(n_flag, len(runs) - n_flag)
        if split == 0:
            continue
        d["n_wrong"] = sum(v != bool(d["label"]) for v in d["verdicts"].values())
        d["spread"] = float(np.ptp(d.pop("z")))
        items.append((split, d["spread"], d))
    items.sort(key=lambda x: (-x[0], -x[1]))
    return [d for _, _, d in items[:top]]


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def test_images(results: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The evaluated test images (path, name, label, defect_type), defects first."""
    runs = ok_runs(results)
    if not runs:
        return []
    imgs = [{**i, "name": _short(i["path"])} for i in runs[0]["images"]]
    return sorted(imgs, key=lambda i: (i["label"] == 0, i["defect_type"], i["name"]))


# ----------------------------------------------------------------------------------------------- heatmaps


_maps_lock = threading.Lock()
_maps_memo: dict[str, np.ndarray] = {}


def _maps(cache_key: str) -> np.ndarray | None:
    """Stored maps of a run (memoised, read-only); None when the engine cache no longer has them."""
    with _maps_lock:
        if cache_key in _maps_memo:
            return _maps_memo[cache_key]
    pred = load_prediction({"cache_key": cache_key})
    if pred is None or pred.maps is None:
        return None
    arr = pred.maps.float().numpy()
    arr.setflags(write=False)
    with _maps_lock:
        if len(_maps_memo) >= 24:
            _maps_memo.pop(next(iter(_maps_memo)))
        _maps_memo[cache_key] = arr
    return arr


def method_maps(run: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """(maps (N, H, W) in the run's image order, or None; a note). Notes say why there is no map."""
    if not run.get("localises", True):
        return None, "no pixel map: this method gives an image score only"
    try:
        maps = _maps(str(run.get("cache_key"))) if run.get("cache_key") else None
    except Exception as e:  # noqa: BLE001
        return None, f"could not read its stored maps: {_user_error(e)}"
    if maps is None:
        return None, "maps not in the cache any more: run it again on Train (takes seconds)"
    return maps, ""


def test_image(results: dict[str, Any], path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(image (S,S,3) uint8, mask (S,S) or None) of one test image at the run's image size."""
    from dashboard.views.images import to_rgb_uint8

    src = results["dataset"].get("source") or results["dataset"]["path"]
    ds = _dataset(src)
    size = int(results["config"]["image_size"])
    try:
        test = load_images(ds, "test", size)
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None
    if path not in test.paths:
        raise UserError(f"{path} is not in this dataset's test images any more")
    row = test.paths.index(path)
    mask = test.masks[row].numpy() if test.masks is not None and bool(test.has_mask[row]) else None
    return to_rgb_uint8(test.images[row].numpy()), mask


def heatmap_panels(results: dict[str, Any], path: str, *, colour: str = "per_method", opacity: float = 0.5,
                   thr: dict[str, float | None] | None = None, family: str | None = None) -> dict[str, Any]:
    """Everything the Heatmaps page draws for one image: the image, its mask overlay, one panel per method
    (overlay or None with a note, score, threshold, verdict, correct), and a colour bar."""
    from dashboard.views import images as vi

    image, mask = test_image(results, path)
    thr = thr if thr is not None else thresholds(results)
    runs = [r for r in ok_runs(results) if family is None or r.get("family") == family]
    maps: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    for r in runs:
        m, note = method_maps(r)
        if m is not None:
            maps[r["method"]] = m
        notes[r["method"]] = note
    ranges = vi.colour_ranges(maps, colour) if maps else {}
    label = None
    panels = []
    for r in runs:
        paths = [i["path"] for i in r["images"]]
        if path not in paths:
            continue
        row = paths.index(path)
        item = r["images"][row]
        label = item["label"]
        t = thr.get(r["method"])
        flagged = None if t is None else bool(item["score"] >= t)
        overlay = None
        if r["method"] in maps:
            lo, hi = ranges[r["method"]]
            overlay = vi.heat_overlay(image, maps[r["method"]][row], lo, hi, opacity)
        panels.append({"method": r["method"], "family": r.get("family"), "overlay": overlay,
                       "note": notes[r["method"]], "score": item["score"], "threshold": t, "flagged": flagged,
                       "correct": None if flagged is None else flagged == bool(item["label"])})
    return {"image": image, "mask_overlay": vi.overlay_mask(image, mask) if mask is not None else None,
            "has_mask": mask is not None, "label": label, "panels": panels, "colour_bar": vi.colour_bar()}


# -------------------------------------------------------------------------------------------------- learn


def family_results(results: dict[str, Any] | None, family: str) -> pd.DataFrame:
    """The metrics rows of one family's methods in the current results (empty when none ran)."""
    df = metrics_table(results)
    if df.empty:
        return df
    title = registry.FAMILIES.get(family, family)
    cols = ["method", "status", "image AUROC", "pixel AUROC", "AUPRO", "images/s"]
    return df[df["family"] == title][cols].reset_index(drop=True)


def csv_bytes(df: pd.DataFrame) -> bytes:
    """A frame as CSV."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue().encode()
