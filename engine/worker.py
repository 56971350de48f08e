"""Run one training job in a separate worker process, so that a crash or an out-of-memory kill of the job never
takes down the process that asked for it (the dashboard server).

`run_in_worker` has `run_methods`' signature and results; it starts ``python -m engine.worker`` (a fresh
interpreter, not a fork of the caller) and talks to it in JSON lines: the job on the worker's stdin, then a
``{"cancel": true}`` line when the caller's cancel event is set (end of stdin means the same: an orphaned worker
stops by itself); progress, each finished method's record and the outcome on the worker's stdout. Nothing is
pickled. The worker writes the engine cache as `run_methods` always does, so methods that finished before a crash
are kept, and reports its peak resident memory when it ends.

The worker names itself ``adlab-worker`` (``/proc/self/comm``, what ``ps``, ``top`` and ``pgrep`` show) and tells
the kernel to choose it before the server should memory run out (``oom_score_adj``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from engine.api import AdlabError

log = logging.getLogger("adlab.worker")

WORKER_NAME = "adlab-worker"
CANCEL_GRACE_S = 5.0  # a worker still running this long after being asked to stop is killed
KILLED_MESSAGE = ("the training process was stopped by the system, most likely out of memory: try a smaller image "
                  "size or fewer methods")
_ROOT = Path(__file__).resolve().parent.parent


class WorkerDied(AdlabError):
    """The worker process ended without finishing its job (killed by a signal, crashed, exited early)."""


class WorkerError(AdlabError):
    """The job failed inside the worker with an error of its own (bad data, bad configuration)."""


@dataclass
class WorkerStats:
    """What the caller learns about the worker of a job: filled in while it runs and when it ends."""

    pid: int | None = None
    base_mb: float | None = None  # resident memory once the engine was imported, before the job
    peak_mb: float | None = None  # peak resident memory of the whole worker (the kernel's count)
    returncode: int | None = None  # negative: the signal that ended it
    killed_after_cancel: bool = False


def died_message(returncode: int) -> str:
    """What to tell the user when a worker ended with `returncode` without reporting an outcome."""
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGKILL:
            return KILLED_MESSAGE
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        return (f"the training process crashed ({name}), most likely inside a native library; methods that had "
                "finished are kept, the server log has the details")
    return (f"the training process ended unexpectedly (exit code {returncode}); methods that had finished are kept, "
            "the server log has the details")


# ------------------------------------------------------------------------------------------ caller's side


def run_in_worker(data: str | Path, cfg: Any, *, progress: Callable[[str, str, float | None, dict[str, Any]], None]
                  | None = None, cancel: threading.Event | None = None,
                  on_result: Callable[[dict[str, Any]], None] | None = None, stats: WorkerStats | None = None,
                  grace_s: float | None = None, label: str = "", threads: int | None = None) -> dict[str, Any]:
    """Run `run_methods(data, cfg)` in a new worker process and return its results dict (DESIGN §7).

    `progress` and `on_result` are called in this thread, as the worker reports. Raises `Cancelled` when `cancel`
    was set (the worker is killed if it has not stopped `grace_s` seconds later, default `CANCEL_GRACE_S`),
    `WorkerError` for an error the job reported, `WorkerDied` when the worker ended without an outcome (killed,
    crashed). `threads`: the worker's grant of intra-op threads (ADLAB_THREADS); None lets it plan them itself.
    """
    from engine.runner import Cancelled

    grace_s = CANCEL_GRACE_S if grace_s is None else grace_s

    stats = stats if stats is not None else WorkerStats()
    from engine.threads import worker_env

    # The passive OpenMP wait policy is set before the worker imports torch; threads per method are then
    # planned by the runner (engine.threads.job) from the CPUs the worker really has, or the grant.
    path = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
    env = worker_env(threads, base={**os.environ, "PYTHONPATH": path})
    cmd = [sys.executable, "-m", "engine.worker", *(["--job", label] if label else [])]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=_ROOT)
    stats.pid = proc.pid
    assert proc.stdin is not None and proc.stdout is not None
    lines: queue.Queue[bytes | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), name=f"{WORKER_NAME}-reader",
                              daemon=True)
    reader.start()
    outcome: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    exited_at: float | None = None
    try:
        _send(proc.stdin, {"data": str(data), "config": asdict(cfg)})
        asked_at: float | None = None
        while True:
            if cancel is not None and cancel.is_set() and asked_at is None:
                asked_at = time.monotonic()
                _send(proc.stdin, {"cancel": True})
            if asked_at is not None and outcome is None and exited_at is None and time.monotonic() - asked_at > grace_s:
                log.warning("worker %s did not stop %.0f s after cancel: killing it", proc.pid, grace_s)
                os.kill(proc.pid, signal.SIGKILL)  # not reaped yet (only _reap waits), so the pid is still ours
                stats.killed_after_cancel = True
                asked_at = float("inf")
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if exited_at is None and _reap(proc, stats, block=False):
                    exited_at = time.monotonic()
                if exited_at is not None and time.monotonic() - exited_at > 2.0:
                    break  # it has exited but something else still holds the pipe: stop reading
                continue
            if line is None:
                break
            msg = _parse(line)
            kind = msg.get("type")
            if kind == "started":
                stats.base_mb = msg.get("base_mb")
            elif kind == "progress" and progress is not None:
                progress(msg["method"], msg["stage"], msg.get("fraction"), msg.get("info") or {})
            elif kind == "result":
                records.append(msg["record"])
                if on_result is not None:
                    on_result(msg["record"])
            elif kind in ("done", "cancelled", "error"):
                outcome = msg
    finally:
        if exited_at is None:
            if outcome is None:
                # The stream ended without an outcome, or this thread is failing: never leave a worker behind.
                _kill_quietly(proc.pid)
            else:  # it has reported and is exiting; give it a moment before making sure
                t_end = time.monotonic() + grace_s
                while not _reap(proc, stats, block=False) and time.monotonic() < t_end:
                    time.sleep(0.05)
                if stats.returncode is None:
                    _kill_quietly(proc.pid)
            if stats.returncode is None:
                _reap(proc, stats, block=True)
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
    if stats.killed_after_cancel or (outcome or {}).get("type") == "cancelled":
        raise Cancelled("run cancelled" + (f" (the worker did not stop within {grace_s:.0f} s, so it was killed)"
                                           if stats.killed_after_cancel else ""))
    if outcome is None:
        raise WorkerDied(died_message(stats.returncode if stats.returncode is not None else -signal.SIGKILL))
    if outcome["type"] == "error":
        raise WorkerError(outcome["error"])
    return {**outcome["header"], "runs": records}


def _send(stream: IO[bytes], msg: dict[str, Any]) -> None:
    try:
        stream.write((json.dumps(msg) + "\n").encode())
        stream.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass  # the worker is gone; its exit status tells why


def _read_lines(stream: IO[bytes], out: queue.Queue[bytes | None]) -> None:
    try:
        for line in stream:
            out.put(line)
    except (OSError, ValueError):
        pass
    finally:
        out.put(None)


def _parse(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
        return msg if isinstance(msg, dict) else {}
    except ValueError:
        log.warning("worker wrote a line that is not a message: %r", line[:200])
        return {}


def _reap(proc: subprocess.Popen[bytes], stats: WorkerStats, *, block: bool) -> bool:
    """Wait for the worker (or just look, block=False); on exit record its code and peak memory. True if exited."""
    try:
        pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere: the code, without the memory
        if block:
            stats.returncode = proc.wait()
        return block
    if pid == 0:
        return False
    proc.returncode = stats.returncode = os.waitstatus_to_exitcode(status)
    stats.peak_mb = round(usage.ru_maxrss / 1024, 1)  # Linux reports kilobytes
    return True


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------ worker's side


def _name_process() -> None:
    """Make the worker easy to find (`pgrep adlab-worker`) and the kernel's first choice when memory runs out."""
    for path, value in (("/proc/self/comm", WORKER_NAME), ("/proc/self/oom_score_adj", "500")):
        try:
            Path(path).write_text(value)
        except OSError:
            pass
    try:
        import setproctitle  # optional: also rewrites the command line that `ps -f` shows

        setproctitle.setproctitle(f"{WORKER_NAME} {' '.join(sys.argv[1:])}".strip())
    except ImportError:
        pass


class _StdinLines:
    """Lines of fd 0 read with os.read: no buffered stdin object whose lock a daemon thread could hold when the
    interpreter shuts down (that aborts the process)."""

    def __init__(self) -> None:
        self._buf = b""

    def next(self) -> bytes | None:
        """The next line, or None at the end of the input."""
        while b"\n" not in self._buf:
            try:
                chunk = os.read(0, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line


def _watch_stdin(lines: _StdinLines, cancel: threading.Event) -> None:
    """Set `cancel` on a cancel line or when stdin ends (the caller went away)."""
    while (line := lines.next()) is not None:
        if _parse(line).get("cancel"):
            break
    cancel.set()


def main(argv: list[str] | None = None) -> int:
    """The worker: read one job from stdin, run it, report on stdout (see the module's notes)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the message stream
    _name_process()
    lock = threading.Lock()
    cancel = threading.Event()

    def send(msg: dict[str, Any]) -> None:
        try:
            with lock:
                proto.write(json.dumps(msg, default=_plain) + "\n")
        except (BrokenPipeError, OSError):
            cancel.set()  # nobody is listening any more: stop at the next step

    stdin = _StdinLines()
    spec = _parse(stdin.next() or b"")
    if not spec:
        send({"type": "error", "error": "the worker got no job"})
        return 2
    threading.Thread(target=_watch_stdin, args=(stdin, cancel), daemon=True).start()
    from engine.runner import Cancelled, RunConfig, _PeakMemory, run_methods

    send({"type": "started", "pid": os.getpid(), "base_mb": round(_PeakMemory.rss() / 2**20, 1)})

    def progress(method: str, stage: str, fraction: float | None, info: dict[str, Any]) -> None:
        send({"type": "progress", "method": method, "stage": stage, "fraction": fraction, "info": info})

    try:
        results = run_methods(spec["data"], RunConfig(**spec["config"]), progress=progress, cancel=cancel,
                              on_result=lambda rec: send({"type": "result", "record": rec}))
        send({"type": "done", "header": {k: v for k, v in results.items() if k != "runs"}})
    except Cancelled:
        send({"type": "cancelled"})
    except AdlabError as e:
        send({"type": "error", "error": str(e)})
    except Exception as e:  # noqa: BLE001 - reported to the caller as a message, the trace goes to the log
        traceback.print_exc()
        send({"type": "error", "error": f"{type(e).__name__}: {e}"})
    # Everything is on disk and reported: skip the interpreter's teardown of torch, which can take seconds.
    for f in (proto, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _plain(o: Any) -> Any:
    """JSON for the numpy and torch scalars that progress info may hold."""
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple | set):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
