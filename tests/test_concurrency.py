"""Several users at once: sessions training on the same and on different datasets, as threads (the dashboard's
job manager) and as separate processes, sharing one cache. The second session on a dataset must reuse the first's
cache entries (one backbone pass per split, one fit per method), never duplicate or corrupt them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.cache import Cache
from engine.components import features as feats
from engine.data import Limits, discover, make_synthetic_dataset
from engine.methods.base import BaseDetector
from engine.runner import RunConfig, run_methods

ROOT = Path(__file__).resolve().parent.parent
SLOW_PASS_S = 0.4  # each backbone pass is slowed down so that concurrent sessions surely overlap


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny datasets (A, B) and a zip upload of A."""
    root = tmp_path_factory.mktemp("data")
    a = make_synthetic_dataset(root / "a", "brick", n_train=8, n_test_good=4, n_defect_per_type=3, size=64)
    b = make_synthetic_dataset(root / "b", "grass", n_train=8, n_test_good=4, n_defect_per_type=3, size=64)
    z = root / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(a.rglob("*")):
            if f.is_file():
                zf.write(f, f"brick/{f.relative_to(a).as_posix()}")
    return {"A": a, "B": b, "A.zip": z}


def _check_cache(cache: Path) -> Counter[str]:
    """Every entry is complete and loads; no temporaries are left. Returns entries per kind."""
    assert not list(cache.rglob(".tmp-*")), list(cache.rglob(".tmp-*"))
    c = Cache(cache)
    kinds: Counter[str] = Counter()
    for kind in ("features", "runs", "predictions"):
        for entry in cache.glob(f"{kind}/*/*"):
            assert c.load(kind, entry.name) is not None, entry
            kinds[kind] += 1
    return kinds


# ------------------------------------------------------------------------------------------------ threads


def test_threads_sessions_on_same_and_different_datasets(datasets: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Three browser sessions start at once (job manager, 3 slots): two on dataset A with overlapping methods,
    one on dataset B."""
    from dashboard import services

    cache = tmp_path / "cache"
    monkeypatch.setenv("ADLAB_CACHE", str(cache))
    feats.clear_memory_cache()
    fits: list[str] = []
    passes: list[int] = []
    real_fit, real_bb = BaseDetector.fit, feats.run_backbone

    def fit(self: BaseDetector, *a: Any, **k: Any) -> BaseDetector:
        fits.append(self.method_name)
        return real_fit(self, *a, **k)

    def backbone(ext: Any, images: torch.Tensor, *a: Any, **k: Any) -> list[torch.Tensor]:
        passes.append(int(images.shape[0]))
        time.sleep(SLOW_PASS_S)
        return real_bb(ext, images, *a, **k)

    monkeypatch.setattr(BaseDetector, "fit", fit)
    monkeypatch.setattr(feats, "run_backbone", backbone)
    jm = services.JobManager(max_running=3, isolation="thread")  # the engine is patched in-process
    monkeypatch.setattr(services.jobs, "job_manager", lambda: jm)
    a, b = str(datasets["A"]), str(datasets["B"])
    jobs = [jm.submit("s1", a, RunConfig(methods=["padim"], image_size=64)),
            jm.submit("s2", a, RunConfig(methods=["patchcore", "padim"], image_size=64)),
            jm.submit("s3", b, RunConfig(methods=["padim"], image_size=64))]
    t0 = time.time()
    while any(j.active for j in jobs) and time.time() - t0 < 120:
        time.sleep(0.05)
    assert [j.state for j in jobs] == ["done"] * 3, [j.error for j in jobs]
    feats.clear_memory_cache()

    assert Counter(fits) == {"padim": 2, "patchcore": 1}  # padim once per dataset, patchcore once
    assert len(passes) == 4  # one pass per split per dataset: A's second session reused A's features
    pa1, pa2 = jobs[0].records[0], jobs[1].records[1]
    assert pa1["method"] == pa2["method"] == "padim" and sorted([pa1["cached"], pa2["cached"]]) == [False, True]
    assert pa1["metrics"] == pa2["metrics"] and pa1["images"] == pa2["images"]
    pb = jobs[2].records[0]
    assert pb["status"] == "ok" and pb["images"] != pa1["images"]
    assert _check_cache(cache) == {"features": 12, "runs": 3, "predictions": 3}  # 2 datasets x 2 splits x 3 layers
    stored_a = services.latest_results(jobs[0].digest)
    assert sorted(r["method"] for r in stored_a["runs"]) == ["padim", "patchcore"]  # both sessions' results kept
    assert [r["method"] for r in services.latest_results(jobs[2].digest)["runs"]] == ["padim"]


def test_same_upload_extracted_by_many_sessions_at_once(datasets: dict[str, Path], tmp_path: Path) -> None:
    lim = Limits(extract_root=str(tmp_path / "uploads"))
    barrier = threading.Barrier(6)

    def work() -> Any:
        barrier.wait()
        return discover(datasets["A.zip"], limits=lim)

    with ThreadPoolExecutor(6) as pool:
        found = [f.result() for f in [pool.submit(work) for _ in range(6)]]
    assert len({d.digest for d in found}) == 1 and len({d.root for d in found}) == 1
    assert found[0].digest == discover(datasets["A"]).digest
    assert len(list((tmp_path / "uploads").iterdir())) == 1  # one folder, no half-extracted leftovers


def test_threads_computing_one_cache_key_compute_it_once(tmp_path: Path) -> None:
    c = Cache(tmp_path)
    calls: list[int] = []
    barrier = threading.Barrier(8)

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        calls.append(1)
        time.sleep(0.2)
        return {"x": torch.arange(1000.0)}, {"by": threading.get_ident()}

    def work() -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
        barrier.wait()
        return c.get_or_compute("features", "same-key", compute)

    with ThreadPoolExecutor(8) as pool:
        out = [f.result() for f in [pool.submit(work) for _ in range(8)]]
    assert len(calls) == 1 and sum(not cached for _, _, cached in out) == 1
    assert all(torch.equal(t["x"], torch.arange(1000.0)) for t, _, _ in out)
    assert len({m["by"] for _, m, _ in out}) == 1
    assert _check_cache(tmp_path) == {"features": 1}


# ------------------------------------------------------------------------------------------------ processes


_SESSION = """
import json, os, sys, time
from pathlib import Path
label, data, methods, out, counter, ready, go = sys.argv[1:8]
from engine.components import features as feats
from engine.methods.base import BaseDetector
from engine.runner import RunConfig, run_methods
from engine import registry
import timm  # noqa: F401  (imported before the start signal, so the sessions reach the backbone together)
registry.available()

def log(line):
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\\n").encode())  # one small O_APPEND write: atomic between processes
    finally:
        os.close(fd)

real_fit, real_bb = BaseDetector.fit, feats.run_backbone
def fit(self, *a, **k):
    log(f"fit {self.method_name} {label}")
    return real_fit(self, *a, **k)
def backbone(ext, images, *a, **k):
    log(f"pass {images.shape[0]} {label}")
    time.sleep(float(os.environ["SLOW_PASS_S"]))
    return real_bb(ext, images, *a, **k)
BaseDetector.fit, feats.run_backbone = fit, backbone
Path(ready).touch()
t0 = time.time()
while not Path(go).exists() and time.time() - t0 < 120:
    time.sleep(0.01)
res = run_methods(data, RunConfig(methods=methods.split(","), image_size=64))
Path(out).write_text(json.dumps(res))
"""


def _log_to(counter: Path, line: str) -> None:
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def test_processes_sessions_on_same_upload_and_another_dataset(datasets: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Three processes share one cache and start computing at the same instant: two child processes on the same
    zip upload of A (its extraction races too), and this test's own process on B."""
    cache, counter, go = tmp_path / "cache", tmp_path / "counter.log", tmp_path / "go"
    monkeypatch.setenv("ADLAB_CACHE", str(cache))
    feats.clear_memory_cache()
    real_fit, real_bb = BaseDetector.fit, feats.run_backbone

    def fit(self: BaseDetector, *a: Any, **k: Any) -> BaseDetector:
        _log_to(counter, f"fit {self.method_name} B")
        return real_fit(self, *a, **k)

    def backbone(ext: Any, images: torch.Tensor, *a: Any, **k: Any) -> list[torch.Tensor]:
        _log_to(counter, f"pass {images.shape[0]} B")
        time.sleep(SLOW_PASS_S)
        return real_bb(ext, images, *a, **k)

    monkeypatch.setattr(BaseDetector, "fit", fit)
    monkeypatch.setattr(feats, "run_backbone", backbone)
    env = {**os.environ, "ADLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "SLOW_PASS_S": str(SLOW_PASS_S)}
    procs = []
    for i, methods in enumerate(["padim", "patchcore,padim"]):
        args = ["A", str(datasets["A.zip"]), methods, str(tmp_path / f"out{i}.json"), str(counter),
                str(tmp_path / f"ready{i}"), str(go)]
        procs.append(subprocess.Popen([sys.executable, "-c", _SESSION, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    t0 = time.time()
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert all(p.poll() is None for p in procs), [p.communicate()[0].decode()[-2000:] for p in procs]
        assert time.time() - t0 < 120
        time.sleep(0.02)
    go.touch()
    res_b = run_methods(datasets["B"], RunConfig(methods=["padim"], image_size=64))
    for p in procs:
        out = p.communicate(timeout=180)[0].decode()
        assert p.returncode == 0, out[-3000:]
    feats.clear_memory_cache()

    lines = [line.split() for line in counter.read_text().splitlines()]
    assert Counter((w[1], w[2]) for w in lines if w[0] == "fit") == {("padim", "A"): 1, ("patchcore", "A"): 1,
                                                                    ("padim", "B"): 1}
    assert Counter(w[2] for w in lines if w[0] == "pass") == {"A": 2, "B": 2}  # train + test, once per dataset
    res = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)] + [res_b]
    pa1, pa2 = res[0]["runs"][0], res[1]["runs"][1]
    assert pa1["method"] == pa2["method"] == "padim" and sorted([pa1["cached"], pa2["cached"]]) == [False, True]
    assert pa1["metrics"] == pa2["metrics"] and pa1["images"] == pa2["images"]
    assert res[0]["dataset"]["digest"] == res[1]["dataset"]["digest"] != res[2]["dataset"]["digest"]
    assert all(r["status"] == "ok" for x in res for r in x["runs"])
    assert _check_cache(cache) == {"features": 12, "runs": 3, "predictions": 3}
    assert len(list((cache / "uploads").iterdir())) == 1  # the zip was extracted once, no partials left
