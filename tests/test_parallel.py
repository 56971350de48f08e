"""Several methods of one run at once (`engine.parallel`, `adlab run --jobs N`).

The balance of the groups is checked against an exhaustive search on small cases; one real two-worker run on a
tiny dataset is checked against the same run in this process; the merging of a worker that died or was
cancelled is checked with a stand-in for `run_in_worker`.
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

import pytest

from engine import parallel
from engine.api import ConfigError
from engine.cli import main as cli_main
from engine.data import make_synthetic_dataset
from engine.runner import Cancelled, RunConfig, run_methods
from engine.threads import available_cpus
from engine.worker import WorkerDied


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", "brick", n_train=8, n_test_good=4,
                                  n_defect_per_type=3, size=64)


def _best_makespan(costs: list[float], groups: int) -> float:
    """The smallest possible largest group total, by trying every assignment."""
    best = float("inf")
    for assign in itertools.product(range(groups), repeat=len(costs)):
        totals = [0.0] * groups
        for c, g in zip(costs, assign, strict=True):
            totals[g] += c
        best = min(best, max(totals))
    return best


def test_balance_keeps_every_name_once_cheapest_first_and_is_near_the_best_split() -> None:
    rng = random.Random(0)
    for _ in range(60):
        n, groups = rng.randint(1, 7), rng.randint(1, 3)
        costs = [(f"m{i}", rng.choice([0.5, 1.0, 2.0, 20.0, rng.uniform(0, 30)])) for i in range(n)]
        split = parallel.balance(costs, groups)
        assert len(split) == min(groups, n) and all(split)
        names = [name for g in split for name in g]
        assert sorted(names) == sorted(c[0] for c in costs)
        order = [c[0] for c in costs]
        cost = dict(costs)
        for g in split:  # each group runs its cheapest first, equal costs in the asked order
            assert g == sorted(g, key=lambda m: (cost[m], order.index(m)))
        makespan = max(sum(cost[m] for m in g) for g in split)
        # longest-first greedy is within 4/3 of the best split (Graham's bound, minus the 1/(3m) term)
        assert makespan <= 4 / 3 * _best_makespan([c for _, c in costs], min(groups, n)) + 1e-9


def test_balance_separates_the_two_long_methods() -> None:
    split = parallel.balance([("a", 50.0), ("b", 1.0), ("c", 40.0), ("d", 1.0), ("e", 1.0)], 2)
    assert split == [["a"], ["b", "d", "e", "c"]]  # the long "c" after the three quick ones of its group
    with pytest.raises(ValueError):
        parallel.balance([("a", 1.0)], 0)


def test_a_cold_machine_balances_by_the_reference_seconds(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without measurements here, every unsupervised method has its own prior (a new method must add one), the
    two reference sizes give back their seconds, and the groups of a cold run split by them."""
    from engine import estimates, registry

    unsupervised = {m.name for m in registry.available() if m.supervision == "none"}
    assert unsupervised == set(parallel.PRIOR_FAST_S)
    for name, (at128, at256) in parallel.PRIOR_FAST_S.items():
        trained = registry.info(name).trained
        assert parallel.prior_seconds(name, trained, 128, "fast") == pytest.approx(at128)
        assert parallel.prior_seconds(name, trained, 256, "fast") == pytest.approx(at256)
        mid = parallel.prior_seconds(name, trained, 181, "fast")
        assert min(at128, at256) <= mid <= max(at128, at256)
    assert parallel.prior_seconds("devnet", True, 256, "fast") == 4 * parallel.prior_seconds("devnet", True, 128,
                                                                                                "fast")
    assert parallel.prior_seconds("uniad", True, 128, "quality") == parallel.PRIOR_TRAINED_S  # no reference there
    monkeypatch.setattr(estimates, "load", lambda: {})
    cfg = RunConfig(methods=["uninformed_students", "patchcore", "draem", "padim"], image_size=256, preset="fast")
    costs = dict(parallel.method_costs(cfg, 8, 13, (256, 256), "cpu"))
    assert costs["uninformed_students"] > costs["draem"] > costs["padim"] > costs["patchcore"]
    assert parallel.balance(list(costs.items()), 2) == [["uninformed_students"], ["patchcore", "padim", "draem"]]


def test_two_workers_give_the_records_of_one_process(tiny: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(methods=["padim", "patchcore", "spade"], image_size=64, preset="fast")
    seen: list[str] = []
    stages: list[tuple[str, str]] = []
    par = parallel.run_parallel(tiny, cfg, 2, on_result=lambda r: seen.append(r["method"]),
                                progress=lambda m, s, f, i: stages.append((m, s)))
    # the one-process run at the workers' thread count: float sums depend on it (PaDiM's AUPRO moved by 5e-6)
    monkeypatch.setenv("ADLAB_THREADS", str(max(1, available_cpus() // 2)))
    one = run_methods(tiny, RunConfig(**{**cfg.__dict__, "use_cache": False}))
    assert [r["method"] for r in par["runs"]] == cfg.methods  # the asked order, whichever finished first
    assert sorted(seen) == sorted(cfg.methods)
    assert {m for m, s in stages if s == "done"} == set(cfg.methods)
    assert {k: v for k, v in par.items() if k != "runs"} == {k: v for k, v in one.items() if k != "runs"}
    for a, b in zip(par["runs"], one["runs"], strict=True):
        assert a["status"] == b["status"] == "ok"
        assert a["timing"]["threads"] == max(1, available_cpus() // 2)  # the CPUs shared by the two workers
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-6), (a["method"], key)


def test_a_dead_worker_fails_only_its_own_group(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], int | None]] = []

    def fake(data: Any, cfg: RunConfig, *, on_result: Any = None, threads: int | None = None, **_: Any) -> dict:
        calls.append((cfg.methods, threads))
        if "padim" in cfg.methods:
            on_result({"method": "padim", "label": "padim", "status": "ok"})  # finished before the crash
            raise WorkerDied("the training process was stopped by the system")
        for m in cfg.methods:
            on_result({"method": m, "label": m, "status": "ok"})
        return {"dataset": {"name": "tiny"}, "config": {}, "runs": []}

    monkeypatch.setattr("engine.worker.run_in_worker", fake)
    monkeypatch.setattr(parallel, "method_costs", lambda cfg, *a: [("padim", 5.0), ("stfpm", 4.0),
                                                                    ("patchcore", 1.0)])
    out: list[dict] = []
    res = parallel.run_parallel(tiny, RunConfig(methods=["padim", "stfpm", "patchcore"]), 2, on_result=out.append)
    assert sorted(g for g, _ in calls) == [["padim"], ["patchcore", "stfpm"]]  # each group cheapest first
    assert [r["method"] for r in res["runs"]] == ["padim", "stfpm", "patchcore"]
    assert [r["status"] for r in res["runs"]] == ["ok", "ok", "ok"]
    monkeypatch.setattr(parallel, "method_costs", lambda cfg, *a: [("padim", 1.0), ("stfpm", 4.0),
                                                                    ("patchcore", 5.0)])
    res = parallel.run_parallel(tiny, RunConfig(methods=["padim", "stfpm", "patchcore"]), 2)
    assert [r["status"] for r in res["runs"]] == ["ok", "failed", "ok"]  # stfpm shared padim's worker
    assert "stopped by the system" in res["runs"][1]["error"]


def test_cancel_and_bad_config(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cancelled(*a: Any, **k: Any) -> dict:
        raise Cancelled("run cancelled")

    monkeypatch.setattr("engine.worker.run_in_worker", cancelled)
    with pytest.raises(Cancelled):
        parallel.run_parallel(tiny, RunConfig(methods=["padim", "patchcore"]), 2)
    with pytest.raises(ConfigError):  # before any worker starts
        parallel.run_parallel(tiny, RunConfig(methods=["padim", "no_such_method"]), 2)
    with pytest.raises(ConfigError):
        parallel.run_parallel(tiny, RunConfig(methods=["padim"], params={"padim": {"no_such_param": 1}}), 2)


def test_cli_jobs_argument(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["run", str(tiny), "--methods", "padim", "--jobs", "0"])
    assert "whole number ≥ 1" in capsys.readouterr().err
    assert cli_main(["run", str(tiny), "--methods", "padim", "--jobs", "2", "--save-models", "/tmp/x"]) == 2
    assert "--save-models" in capsys.readouterr().err


def test_a_dashboard_job_trains_its_methods_two_at_once(tiny: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboard import services

    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    jm = services.JobManager(isolation="process", workers=2)
    cfg = RunConfig(methods=["padim", "spade", "patchcore"], image_size=64)
    assert jm.job_workers(cfg) == 2 and jm.job_workers(RunConfig(methods=["padim"])) == 1
    assert services.JobManager(isolation="thread", workers=2).job_workers(cfg) == 1
    job = jm.submit("s1", str(tiny), cfg)
    t0 = time.time()
    while job.active:
        assert time.time() - t0 < 300, "timed out"
        time.sleep(0.1)
    assert job.state == "done", job.error
    assert sorted(r["method"] for r in job.records) == sorted(cfg.methods)
    assert all(r["status"] == "ok" for r in job.records)
    assert all(p.stage == "done" for p in job.progress.values())
    stored = services.latest_results(job.digest)
    assert sorted(r["method"] for r in stored["runs"]) == sorted(cfg.methods)  # stored as they finished


def test_estimate_of_methods_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import estimates

    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    for m, fit, peak in (("a", 40.0, 900.0), ("b", 30.0, 700.0), ("c", 20.0, 800.0)):
        estimates.record({"method": m, "status": "ok", "cached": False, "params": {},
                          "timing": {"fit_s": fit, "predict_s": 0.0, "shared_backbone_s": 0.0, "peak_mem_mb": peak}},
                         n_train=10, n_test=10, image_size=64, preset="fast", device="cpu", base_mb=500.0)
    job = [(m, {}, False) for m in "abc"]
    one = estimates.estimate_job(job, n_train=10, n_test=10, image_size=64, preset="fast", device="cpu")
    two = estimates.estimate_job(job, n_train=10, n_test=10, image_size=64, preset="fast", device="cpu", workers=2)
    assert one.seconds == pytest.approx(90.0) and two.seconds == pytest.approx(50.0)  # {a}, {b, c}
    assert two.peak_mb == pytest.approx(one.peak_mb + sorted(m.peak_mb for m in one.methods)[-2])
