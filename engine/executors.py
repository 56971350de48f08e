"""Where units of work run: in this process (the default) or as Ray tasks (`pip install adlab[ray]`).

A unit is one (dataset, method, seed, params) job, described by a plain `Unit` that pickles and travels to a
Ray worker. `run_unit` is the one function that executes a unit, whichever executor calls it: it is a
single-method `run_methods`, so the engine's content-addressed cache makes a unit that already ran return at
once, and a failing unit becomes a record with status "failed" instead of an exception.

Executors only decide where `run_unit` runs and report when units start and finish:

    ex = LocalExecutor()               # or RayExecutor(address=None, num_cpus=2)
    ex.run(units, on_start=..., on_done=...)

On a Ray cluster every node must have adlab installed (same version) and see the same cache root: pass
`cache_root` (or set ADLAB_CACHE) to a path on a shared filesystem, so features and fitted runs are reused.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from engine.api import AdlabError, ConfigError

# on_start(index) when a unit is handed to a worker; on_done(index, outcome) when it finished (ok or failed).
OnStart = Callable[[int], None]
OnDone = Callable[[int, dict[str, Any]], None]


@dataclass(frozen=True)
class Unit:
    """One unit of a sweep. `params` are explicit overrides of this method's parameters (preset ones aside)."""

    dataset: str  # dataset path (a folder or .zip) as the workers see it
    method: str
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    preset: str = "fast"
    image_size: int | None = None
    resize: str = "keep-aspect"  # RunConfig.resize / tile / tile_overlap
    tile: int | None = None
    tile_overlap: float = 0.25
    labeled_anomalies: int | list[int] = 0
    only_k: int | None = None  # with a K list: the one K this unit runs (RunConfig.only_k)
    device: str = "auto"
    backbone: str = "efficientnet_lite0"
    weights: str = "auto"
    use_cache: bool = True
    cache_root: str | None = None  # None: ADLAB_CACHE / ~/.cache/adlab of the process running the unit
    threads: int | None = None  # torch intra-op threads while the unit runs; None: leave as is

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if not n:
        yield
        return
    from engine.threads import GRANT_ENV

    prev, prev_grant = torch.get_num_threads(), os.environ.get(GRANT_ENV)
    torch.set_num_threads(n)
    os.environ[GRANT_ENV] = str(n)  # the runner plans each method's threads: this grant is what it must use
    try:
        yield
    finally:
        torch.set_num_threads(prev)
        if prev_grant is None:
            os.environ.pop(GRANT_ENV, None)
        else:
            os.environ[GRANT_ENV] = prev_grant


def run_unit(unit: Unit) -> dict[str, Any]:
    """Run one unit here; never raises for a data, config or method problem.

    Returns {"results": the run_methods header (dataset, config, ...) or None, "run": the method's run record
    (DESIGN §7) , "wall_s": seconds, "host": this machine's name}. A unit whose dataset cannot be read gets a
    run record with status "failed" and the error.
    """
    from engine import registry
    from engine.cache import Cache
    from engine.runner import RunConfig, run_methods

    t0 = time.perf_counter()
    cfg = RunConfig(methods=[unit.method], image_size=unit.image_size, resize=unit.resize, tile=unit.tile,
                    tile_overlap=unit.tile_overlap, device=unit.device, backbone=unit.backbone,
                    weights=unit.weights, preset=unit.preset, labeled_anomalies=unit.labeled_anomalies,
                    only_k=unit.only_k, seed=unit.seed, params={unit.method: dict(unit.params)} if unit.params else {},
                    use_cache=unit.use_cache)
    cache = Cache(unit.cache_root) if unit.use_cache and unit.cache_root else None
    header: dict[str, Any] | None = None
    try:
        with _torch_threads(unit.threads):
            results = run_methods(unit.dataset, cfg, cache=cache)
        run = results.pop("runs")[0]
        header = results
    except AdlabError as e:
        run = _failed_run(unit, str(e))
    except Exception as e:  # a unit's crash must not take the sweep down
        run = _failed_run(unit, f"{type(e).__name__}: {e}")
        run["traceback"] = traceback.format_exc(limit=8)
    with contextlib.suppress(Exception):
        run.setdefault("family", registry.info(unit.method).family)
    return {"results": header, "run": run, "wall_s": round(time.perf_counter() - t0, 3), "host": os.uname().nodename}


def _failed_run(unit: Unit, error: str) -> dict[str, Any]:
    return {"method": unit.method, "params": dict(unit.params), "weights": None, "status": "failed", "error": error,
            "metrics": None, "timing": {"fit_s": None, "predict_s": None, "images_per_s": None, "peak_mem_mb": None},
            "images": []}


class Executor(Protocol):
    """Runs units and reports their start and end; `slots` is how many run at once."""

    name: str

    @property
    def slots(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...

    def run(self, units: Sequence[Unit], on_start: OnStart, on_done: OnDone) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs units one after another in this process (the default; needs nothing installed)."""

    name = "local"

    @property
    def slots(self) -> int:
        return 1

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "slots": 1}

    def run(self, units: Sequence[Unit], on_start: OnStart, on_done: OnDone) -> None:
        for i, u in enumerate(units):
            on_start(i)
            on_done(i, run_unit(u))

    def close(self) -> None:
        pass


_RAY_INIT_LOCK = threading.Lock()


def ray_init(address: str | None = None, *, num_cpus: int | None = None) -> tuple[Any, bool]:
    """Import Ray and connect: to the cluster at `address` ("auto", "ray://head:10001", ...), or, with None or
    "local", to a Ray runtime started here with `num_cpus` CPUs (default: all). Returns (the ray module, whether
    this call started the runtime). A runtime this process already joined is reused as it is."""
    try:
        import ray
    except ImportError:
        raise ConfigError("Ray is not installed: pip install 'adlab[ray]' (or pip install ray)") from None
    with _RAY_INIT_LOCK:  # two dashboard jobs starting at once must not both init
        if ray.is_initialized():
            return ray, False
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
        if address and address != "local":
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
        return ray, True


def _ray_task(unit: Unit) -> dict[str, Any]:
    """Body of the Ray task (module level, so workers import it instead of unpickling a closure)."""
    return run_unit(unit)


class RayExecutor:
    """Runs each unit as a Ray task asking for `cpus_per_unit` CPUs (and one GPU when the unit wants CUDA).

    With `address` None a local Ray runtime is started with `num_cpus` CPUs (default: all), else the executor
    joins that cluster ("auto", "ray://head:10001", ...). A local runtime it started is shut down by close().
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, cpus_per_unit: float = 1,
                 max_retries: int = 1):
        if cpus_per_unit <= 0:
            raise ConfigError("cpus per unit must be > 0")
        ray, self._started = ray_init(address, num_cpus=num_cpus)
        self._ray = ray
        self.address = address
        self.cpus_per_unit = cpus_per_unit
        self.max_retries = max_retries
        res = ray.cluster_resources()
        self.cpus = float(res.get("CPU", 1))
        self.gpus = float(res.get("GPU", 0))
        self.nodes = len([n for n in ray.nodes() if n.get("Alive")])
        self._remote = ray.remote(_ray_task)

    @property
    def slots(self) -> int:
        return max(1, int(self.cpus // self.cpus_per_unit))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address or "local", "nodes": self.nodes, "cpus": self.cpus,
                "gpus": self.gpus, "cpus_per_unit": self.cpus_per_unit, "slots": self.slots}

    def wants_gpu(self, unit: Unit) -> bool:
        """A unit asks Ray for a GPU when it says cuda, or says auto and the cluster has GPUs."""
        return unit.device.startswith("cuda") or (unit.device == "auto" and self.gpus > 0)

    def run(self, units: Sequence[Unit], on_start: OnStart, on_done: OnDone) -> None:
        ray = self._ray
        pending: dict[Any, int] = {}
        for i, u in enumerate(units):
            opts: dict[str, Any] = {"num_cpus": self.cpus_per_unit, "max_retries": self.max_retries}
            if self.wants_gpu(u):
                if self.gpus <= 0:  # Ray would keep such a task pending for ever
                    on_start(i)
                    on_done(i, {"results": None, "wall_s": None, "host": None, "run": _failed_run(
                        u, "device 'cuda' asked for, but this Ray cluster has no GPU; use --device auto or cpu")})
                    continue
                opts["num_gpus"] = 1
            pending[self._remote.options(**opts).remote(u)] = i
            on_start(i)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # the worker died or Ray failed the task: only this unit fails
                    run = _failed_run(units[i], f"Ray task failed: {type(e).__name__}: {str(e).splitlines()[0]}")
                    outcome = {"results": None, "run": run, "wall_s": None, "host": None}
                on_done(i, outcome)

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


# ------------------------------------------------------------------------------------- one job on Ray


class _RayCancel:
    """The cancel flag a job's Ray task polls (as the runner polls a threading.Event between steps).

    The caller asks for a stop by putting anything on the `control` queue; the queue is looked at no more than
    twice a second, so polling stays cheap."""

    def __init__(self, control: Any):
        self._control = control
        self._checked = 0.0
        self._set = False

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._checked >= 0.5:
            self._checked = now
            self._set = not self._control.empty()
        return self._set


def _ray_job(data: str, cfg: Any, events: Any, control: Any, cache_root: str | None, threads: int | None
             ) -> dict[str, Any]:
    """Body of a dashboard job's Ray task: `run_methods`, with progress and finished records sent on `events`.

    Progress is sent when a method's stage changes, and otherwise at most every half second."""
    from engine.cache import Cache
    from engine.runner import run_methods

    last: dict[str, tuple[str, float]] = {}

    def progress(method: str, stage: str, fraction: float | None, info: dict[str, Any]) -> None:
        now = time.monotonic()
        prev = last.get(method)
        if prev is None or prev[0] != stage or now - prev[1] >= 0.5:
            last[method] = (stage, now)
            events.put(("progress", (method, stage, fraction, dict(info))))

    with _torch_threads(threads):
        return run_methods(data, cfg, progress=progress, cancel=_RayCancel(control),  # type: ignore[arg-type]
                           on_result=lambda rec: events.put(("result", rec)),
                           cache=Cache(cache_root) if cache_root else None)


def run_on_ray(data: str, cfg: Any, *, progress: Callable[[str, str, float | None, dict[str, Any]], None]
               | None = None, cancel: Any = None, on_result: Callable[[dict[str, Any]], None] | None = None,
               address: str | None = None, num_cpus: float = 1, cache_root: str | None = None,
               grace_s: float = 5.0, poll_s: float = 0.2) -> dict[str, Any]:
    """Run `run_methods(data, cfg)` as one Ray task and return its results dict (DESIGN §7).

    Same contract as `engine.worker.run_in_worker`, so the dashboard's job manager can use either: `progress`
    and `on_result` are called in this thread as the task reports; `Cancelled` is raised when `cancel` was set
    (the task is asked to stop at its next step and force-cancelled `grace_s` seconds later); an error the job
    reported (bad data, bad configuration) is raised as that error; a task that died raises `AdlabError`.
    The task asks Ray for `num_cpus` CPUs (and its torch threads match them) and one GPU when `cfg.device` is
    "cuda..." (or "auto" on a cluster with GPUs). `data` and `cache_root` must be paths every Ray node sees
    (a shared filesystem); `cache_root` None means the engine's default on the node that runs the task.
    """
    from engine.runner import Cancelled

    ray, _ = ray_init(address)
    from ray.util.queue import Queue

    events, control = Queue(), Queue()
    gpus = float(ray.cluster_resources().get("GPU", 0))
    device = str(getattr(cfg, "device", "auto"))
    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": 0}
    if device.startswith("cuda") or (device == "auto" and gpus > 0):
        if gpus <= 0:
            raise ConfigError("device 'cuda' asked for, but this Ray cluster has no GPU; use device auto or cpu")
        opts["num_gpus"] = 1
    threads = max(1, int(num_cpus))
    ref = ray.remote(_ray_job).options(**opts).remote(str(data), cfg, events, control, cache_root, threads)

    def drain() -> None:
        n = events.qsize()
        for kind, payload in events.get_nowait_batch(n) if n else []:
            if kind == "progress" and progress is not None:
                progress(*payload)
            elif kind == "result" and on_result is not None:
                on_result(payload)

    asked_to_stop: float | None = None
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=poll_s)
            drain()
            if ready:
                break
            if cancel is not None and cancel.is_set():
                if asked_to_stop is None:
                    control.put(True)
                    asked_to_stop = time.monotonic()
                elif time.monotonic() - asked_to_stop > grace_s:
                    ray.cancel(ref, force=True)
                    raise Cancelled("run cancelled (its Ray task was stopped)")
        try:
            return ray.get(ref)
        except Exception as e:  # Ray wraps the task's exception; it keeps the original class
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, (Cancelled, AdlabError)):
                raise cause from None
            raise AdlabError(f"the Ray task failed: {type(cause).__name__}: {str(cause).splitlines()[0]}") from e
        finally:
            drain()
    finally:
        for q in (events, control):
            with contextlib.suppress(Exception):
                q.shutdown()


def make_executor(name: str, *, address: str | None = None, num_cpus: int | None = None,
                  cpus_per_unit: float = 1) -> Executor:
    """"local" or "ray" (see RayExecutor for address and CPUs)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, num_cpus=num_cpus, cpus_per_unit=cpus_per_unit)
    raise ConfigError(f"unknown executor {name!r}; use local or ray")
