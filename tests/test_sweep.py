"""Sweeps: units, sweep.json, resume, failure isolation, config errors, and the same metrics on Ray as locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import registry
from engine.api import ConfigError
from engine.cli import main
from engine.executors import LocalExecutor, run_unit
from engine.sweep import SweepConfig, SweepProgress, load_sweep, run_sweep

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
PUBLIC = {"dataset", "method", "seed", "params", "status", "error", "metrics", "timing"}


def test_sweep_cli_writes_units_isolates_a_bad_dataset_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", str(SAMPLE / "brick"), str(tmp_path / "missing"), "--methods", "padim", "--seeds", "0,1",
            "--preset", "test", "--image-size", "64", "--out", str(out)]
    assert main(argv) == 1  # one dataset failed: the exit code says so, the other units still ran
    doc = load_sweep(out)
    units = doc["units"]
    assert len(units) == 4 and all(PUBLIC <= set(u) for u in units)
    ok = [u for u in units if u["status"] == "ok"]
    bad = [u for u in units if u["status"] != "ok"]
    assert [u["dataset"] for u in ok] == ["brick", "brick"] and [u["seed"] for u in ok] == [0, 1]
    assert len(bad) == 2 and all(u["error"] and u["metrics"] is None for u in bad)
    assert all(0.0 <= u["metrics"]["image_auroc"] <= 1.0 for u in ok)
    for u in ok:  # each (dataset, seed) has the usual results.json, its run tied to the unit
        res = json.loads((out / u["results"]).read_text())
        assert res["dataset"]["name"] == "brick" and res["config"]["seed"] == u["seed"]
        assert [r["unit_key"] for r in res["runs"]] == [u["key"]]
        assert res["runs"][0]["metrics"] == u["metrics"]
        assert u["train_precision"] is None and "train_precision" in res["runs"][0]  # PaDiM trains nothing
    assert doc["complete"] is True and doc["progress"]["failed"] == 2

    seen: list[SweepProgress] = []
    cfg = SweepConfig(datasets=[str(SAMPLE / "brick"), str(tmp_path / "missing")], methods=["padim"], seeds=[0, 1],
                      preset="test", image_size=64)
    again = run_sweep(cfg, out, LocalExecutor(), progress=seen.append)
    assert seen[-1].done == 4 and seen[-1].reused == 2 and seen[-1].failed == 2  # failed units are tried again
    assert [u["metrics"] for u in again["units"]] == [u["metrics"] for u in units]
    assert [u.get("reused", False) for u in again["units"]] == [True, True, False, False]


def test_sweep_refuses_what_would_fail_every_unit(tmp_path: Path) -> None:
    brick = str(SAMPLE / "brick")
    with pytest.raises(ConfigError, match="nosuch"):
        run_sweep(SweepConfig(datasets=[brick], methods=["nosuch"]), tmp_path, LocalExecutor())
    with pytest.raises(ConfigError, match="labelled anomalies"):
        run_sweep(SweepConfig(datasets=[brick], methods=["devnet"]), tmp_path, LocalExecutor())
    with pytest.raises(ConfigError, match="seeds repeat"):
        run_sweep(SweepConfig(datasets=[brick], methods=["padim"], seeds=[1, 1]), tmp_path, LocalExecutor())
    with pytest.raises(ConfigError, match="not among the methods"):
        run_sweep(SweepConfig(datasets=[brick], methods=["padim"], params={"patchcore": {"coreset_ratio": 0.1}}),
                  tmp_path, LocalExecutor())
    assert main(["sweep", brick, "--methods", "padim", "--seeds", "a,b", "--out", str(tmp_path)]) == 2
    assert main(["sweep", brick, "--methods", "padim", "--param", "padim.nosuch=1", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "sweep.json").exists()


def test_load_sweep_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no sweep.json"):
        load_sweep(tmp_path)
    (tmp_path / "sweep.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable sweep file"):
        load_sweep(tmp_path)
    (tmp_path / "sweep.json").write_text('{"runs": []}')
    with pytest.raises(ConfigError, match="no 'units' list"):
        load_sweep(tmp_path)


@pytest.mark.slow
def test_ray_gives_the_local_executors_metrics(tmp_path: Path) -> None:
    """The three sample categories × 3 methods × 2 seeds on a real local Ray runtime (2 CPUs) and in-process,
    each with its own cache, so Ray's units are computed by its workers, not read from the local run."""
    ray = pytest.importorskip("ray")
    from engine.executors import RayExecutor

    def cfg(cache: str) -> SweepConfig:
        return SweepConfig(datasets=[str(SAMPLE / c) for c in ("brick", "grass", "gravel")],
                           methods=["padim", "patchcore", "autoencoder"], seeds=[0, 1], preset="test", image_size=64,
                           params={"autoencoder": {"epochs": 2}}, cache_root=cache, threads_per_unit=1)

    from engine.components.features import clear_memory_cache

    clear_memory_cache()  # features another test computed in this process (with other threads) must not be reused
    local = run_sweep(cfg(str(tmp_path / "cache-local")), tmp_path / "local", LocalExecutor())
    ex = RayExecutor(num_cpus=2)
    try:
        assert ex.slots == 2
        remote = run_sweep(cfg(str(tmp_path / "cache-ray")), tmp_path / "ray", ex)
    finally:
        ex.close()
    assert not ray.is_initialized()
    assert len(local["units"]) == len(remote["units"]) == 18
    assert all(u["status"] == "ok" and not u["cached"] for u in local["units"] + remote["units"])
    assert remote["executor"]["name"] == "ray" and local["executor"]["name"] == "local"
    key = [(u["dataset"], u["method"], u["seed"]) for u in local["units"]]
    assert key == [(u["dataset"], u["method"], u["seed"]) for u in remote["units"]]
    assert [u["metrics"] for u in remote["units"]] == [u["metrics"] for u in local["units"]]
    # each unit says how its network was trained, as its run record does (the CPU default for each method)
    from engine.device import train_precision

    want = {m: train_precision("cpu", registry.info(m).cpu_bf16) if registry.info(m).trained else None
            for m in ("padim", "patchcore", "autoencoder")}
    assert all(u["train_precision"] == want[u["method"]] for u in local["units"] + remote["units"])
    assert want["autoencoder"] is not None
    # the seed matters for the trained method, so equal metrics are not just every seed giving the same numbers
    ae = {(u["dataset"], u["seed"]): u["metrics"]["pixel_auroc"]
          for u in local["units"] if u["method"] == "autoencoder"}
    assert any(ae[(d, 0)] != ae[(d, 1)] for d in ("brick", "grass", "gravel"))


class _Interrupted(LocalExecutor):
    """Runs `stop_after` units, then stops as a Ctrl-C would."""

    def __init__(self, stop_after: int):
        self.stop_after = stop_after

    def run(self, units, on_start, on_done) -> None:  # type: ignore[no-untyped-def]
        for i, u in enumerate(units):
            if i == self.stop_after:
                raise KeyboardInterrupt
            on_start(i)
            on_done(i, run_unit(u))


def test_an_interrupted_sweep_resumes_from_the_units_done(tmp_path: Path) -> None:
    cfg = SweepConfig(datasets=[str(SAMPLE / "brick")], methods=["padim", "patchcore"], seeds=[0, 1], preset="test",
                      image_size=64, cache_root=str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, tmp_path / "out", _Interrupted(stop_after=3))
    partial = load_sweep(tmp_path / "out")
    assert partial["complete"] is False and len(partial["units"]) == 3
    seen: list[SweepProgress] = []
    done = run_sweep(cfg, tmp_path / "out", LocalExecutor(), progress=seen.append)
    assert done["complete"] is True and len(done["units"]) == 4
    assert seen[-1].reused == 3 and [u.get("reused", False) for u in done["units"]] == [True, True, True, False]
    assert [u["metrics"] for u in done["units"][:3]] == [u["metrics"] for u in partial["units"]]
    res = json.loads((tmp_path / "out" / "brick" / "seed-1" / "results.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["padim", "patchcore"]  # the resumed file keeps the unit order


def test_ray_executor_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["sweep", str(SAMPLE / "brick"), "--methods", "padim", "--executor", "ray",
                 "--out", str(tmp_path)]) == 2
    assert "pip install 'adlab[ray]'" in capsys.readouterr().err


def test_sweep_takes_resize_and_tiles_like_a_run(tmp_path: Path) -> None:
    """`adlab sweep --resize/--tile` reach each unit: the same metrics and config as `adlab run` with them."""
    from engine.runner import RunConfig, run_methods

    brick = str(SAMPLE / "brick")
    argv = ["sweep", brick, "--methods", "padim", "--preset", "test", "--image-size", "64", "--resize", "square",
            "--tile", "32", "--tile-overlap", "0.5", "--out", str(tmp_path / "sweep")]
    assert main(argv) == 0
    unit = load_sweep(tmp_path / "sweep")["units"][0]
    res = json.loads((tmp_path / "sweep" / unit["results"]).read_text())
    assert (res["config"]["tile"], res["config"]["tile_overlap"], res["config"]["resize"]) == (32, 0.5, "square")
    direct = run_methods(brick, RunConfig(methods=["padim"], preset="test", image_size=64, resize="square",
                                          tile=32, tile_overlap=0.5))
    assert direct["runs"][0]["metrics"]["image_auroc"] == unit["metrics"]["image_auroc"]
    assert direct["runs"][0]["tiles_per_image"] == res["runs"][0]["tiles_per_image"] > 1
    untiled = load_sweep(tmp_path / "sweep")
    assert main(["sweep", brick, "--methods", "padim", "--preset", "test", "--image-size", "64",
                 "--out", str(tmp_path / "plain")]) == 0
    assert load_sweep(tmp_path / "plain")["units"][0]["key"] != untiled["units"][0]["key"]  # geometry is in the key
    with pytest.raises(ConfigError, match="tile"):
        run_sweep(SweepConfig(datasets=[brick], methods=["padim"], tile=2), tmp_path / "bad", LocalExecutor())
