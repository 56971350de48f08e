"""Engine plumbing: backbone weights, cache, shared features, runner isolation, CLI and results schema."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import registry
from engine.api import ImageSet, MethodFailure, Prediction, WeightsError
from engine.backbones import FeatureExtractor, _bundled_lite0_state, map_state_dict_by_order
from engine.cache import Cache
from engine.cli import main as cli_main
from engine.components import features as feats
from engine.data import make_synthetic_dataset
from engine.methods.base import BaseDetector
from engine.runner import RunConfig, run_methods


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny MVTec-layout dataset (64 px)."""
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root, "brick", n_train=8, n_test_good=4, n_defect_per_type=3, size=64)
    return root / "brick"


# --- backbones ----------------------------------------------------------------------------------------
def test_bundled_weights_are_imagenet_and_recorded() -> None:
    fe = FeatureExtractor(layers=("blocks.2",))
    assert fe.weights.startswith("bundled:")
    rnd = FeatureExtractor(layers=("blocks.2",), weights="random")
    assert rnd.weights.startswith("random")
    x = torch.rand(1, 3, 64, 64)
    assert not torch.allclose(fe(x)[0], rnd(x)[0])


def test_local_weights_file_used(tmp_path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save(_bundled_lite0_state(), path)
    fe_file = FeatureExtractor(layers=("blocks.4",), weights=str(path))
    fe_bundled = FeatureExtractor(layers=("blocks.4",))
    x = torch.rand(2, 3, 64, 64)
    assert fe_file.weights == f"file:{path}"
    torch.testing.assert_close(fe_file(x)[0], fe_bundled(x)[0])


def test_weight_mapping_fails_loudly_on_shape_mismatch() -> None:
    ref = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(WeightsError, match="tensor #1"):
        map_state_dict_by_order({"x": torch.zeros(2, 3), "y": torch.zeros(5)}, ref)
    with pytest.raises(WeightsError, match="expects 2"):
        map_state_dict_by_order({"x": torch.zeros(2, 3)}, ref)


def test_no_silent_random_fallback(monkeypatch) -> None:
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("network unreachable")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="timm hub"):
        FeatureExtractor("resnet18", layers=("layer2",), weights="auto")
    with pytest.raises(WeightsError, match="weights file not found"):
        FeatureExtractor(layers=("blocks.2",), weights="/nonexistent/w.pth")


def test_pickled_weights_refused(tmp_path) -> None:
    import pickle

    p = tmp_path / "evil.pth"
    p.write_bytes(pickle.dumps({"a": object()}))
    with pytest.raises(WeightsError):
        FeatureExtractor(layers=("blocks.2",), weights=str(p))


# --- cache --------------------------------------------------------------------------------------------
def test_cache_roundtrip_and_corrupt_entry_recomputed(tmp_path) -> None:
    c = Cache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(5.0)}, {"m": 1}

    t, meta, cached = c.get_or_compute("k", "abc", compute)
    assert not cached and meta == {"m": 1}
    t2, _, cached2 = c.get_or_compute("k", "abc", compute)
    assert cached2 and torch.equal(t2["x"], t["x"]) and len(calls) == 1
    f = c.entry_dir("k", "abc") / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:10])  # corrupt it
    t3, _, cached3 = c.get_or_compute("k", "abc", compute)
    assert not cached3 and len(calls) == 2 and torch.equal(t3["x"], t["x"])


def test_cache_write_interrupted_leaves_no_entry(tmp_path) -> None:
    c = Cache(tmp_path)
    with pytest.raises(RuntimeError), c.writing("k", "zz") as d:
        (d / "half").write_text("...")
        raise RuntimeError("killed")
    assert not c.has("k", "zz") and c.load("k", "zz") is None
    assert not list((tmp_path / "k").rglob(".tmp-*"))


def test_features_computed_once_and_shared(tiny, monkeypatch) -> None:
    from engine.data import discover, load_split

    feats.clear_memory_cache()
    calls = []
    real = feats.run_backbone
    monkeypatch.setattr(feats, "run_backbone", lambda *a, **k: calls.append(1) or real(*a, **k))
    train = load_split(discover(tiny), "train", 64)
    a = feats.extract_features(train, ("blocks.2", "blocks.4"))
    b = feats.extract_features(train, ("blocks.1", "blocks.2", "blocks.4"))  # PaDiM's layers after PatchCore's
    assert len(calls) == 1
    torch.testing.assert_close(a[0], b[1])
    feats.clear_memory_cache()
    feats.extract_features(train, ("blocks.4",))  # from disk now
    assert len(calls) == 1


def test_run_features_go_to_the_cache_the_run_was_given(tiny, tmp_path) -> None:
    feats.clear_memory_cache()
    mine = Cache(tmp_path / "mine")
    res = run_methods(tiny, RunConfig(methods=["padim"], image_size=48), cache=mine)
    assert res["runs"][0]["status"] == "ok"
    assert list((tmp_path / "mine" / "features").rglob("*")), "features were written elsewhere"
    feats.clear_memory_cache()


# --- runner: isolation of failures, NaN, cache ---------------------------------------------------------------
class _Boom(BaseDetector):
    def __init__(self, seed: int = 0):
        self.seed = seed

    def _fit(self, train, anomalies, progress):
        raise RuntimeError("boom inside fit")


class _NaN(BaseDetector):
    def __init__(self, seed: int = 0):
        self.seed = seed

    def _fit(self, train, anomalies, progress):
        pass

    def _predict(self, images: ImageSet) -> Prediction:
        return Prediction(scores=torch.full((len(images),), float("nan")))


@pytest.fixture
def broken_methods(monkeypatch):
    registry.available()  # load every real method first
    reg = dict(registry._REGISTRY)
    for name, cls in (("boom", _Boom), ("nan_scores", _NaN)):
        reg[name] = registry.MethodInfo(name=name, family="memory_bank", localises=False, supervision="none",
                                        paper="test", summary="test", uses_backbone=False, factory=cls)
        cls.method_name = name
    monkeypatch.setattr(registry, "_REGISTRY", reg)


def test_failing_method_does_not_take_others_down(tiny, tmp_path, broken_methods) -> None:
    res = run_methods(tiny, RunConfig(methods=["boom", "padim", "nan_scores"], image_size=64),
                      cache=Cache(tmp_path / "c"))
    by = {r["method"]: r for r in res["runs"]}
    assert by["boom"]["status"] == "failed" and "boom inside fit" in by["boom"]["error"]
    assert by["nan_scores"]["status"] == "failed" and "non-finite" in by["nan_scores"]["error"]
    assert by["padim"]["status"] == "ok" and by["padim"]["metrics"]["image_auroc"] is not None


def test_cli_exit_code_nonzero_when_a_method_fails(tiny, tmp_path, broken_methods) -> None:
    rc = cli_main(["run", str(tiny), "--methods", "padim,boom", "--image-size", "64", "--out", str(tmp_path)])
    assert rc == 1
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in res["runs"]] == ["ok", "failed"]


def test_second_identical_run_is_cached(tiny, tmp_path, monkeypatch) -> None:
    cfg = RunConfig(methods=["patchcore", "spade"], image_size=64)
    c = Cache(tmp_path / "c")
    first = run_methods(tiny, cfg, cache=c)
    fits = []
    monkeypatch.setattr(BaseDetector, "fit", lambda *a, **k: fits.append(1))
    feats.clear_memory_cache()
    second = run_methods(tiny, cfg, cache=c)
    assert fits == [] and all(r["cached"] for r in second["runs"])
    assert [r["metrics"] for r in first["runs"]] == [r["metrics"] for r in second["runs"]]


def test_method_failure_is_project_error() -> None:
    assert issubclass(MethodFailure, Exception)


# --- CLI and schema -------------------------------------------------------------------------------------
def test_cli_run_writes_results_schema(tiny, tmp_path, capsys) -> None:
    rc = cli_main(["run", str(tiny), "--methods", "patchcore,padim", "--image-size", "64", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["dataset"]) >= {"path", "name", "digest", "n_train", "n_test", "defect_types"}
    for r in res["runs"]:
        assert set(r) >= {"method", "family", "params", "weights", "status", "error", "metrics", "timing", "images"}
        assert set(r["metrics"]) >= {"image_auroc", "image_ap", "image_f1_max", "threshold", "pixel_auroc",
                                     "pixel_aupro", "per_defect"}
        assert set(r["timing"]) >= {"fit_s", "predict_s", "images_per_s", "peak_mem_mb"}
        assert r["weights"].startswith("bundled:")
        assert len(r["images"]) == res["dataset"]["n_test"]
        assert set(r["images"][0]) >= {"path", "label", "defect_type", "score"}
    assert "image_auroc" not in capsys.readouterr().err


def test_cli_methods_lists_registry(capsys) -> None:
    assert cli_main(["methods", "--json"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert names == {m.name for m in registry.available()}


def _copy(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


@pytest.mark.parametrize("case", ["non_image", "mask_size", "empty_train", "zip_slip"])
def test_cli_bad_data_specific_error(case, tiny, tmp_path, capsys) -> None:
    d = _copy(tiny, tmp_path / "ds")
    if case == "non_image":
        (d / "train/good/notes.png").write_text("this is not an image")
        data, expect = d, "notes.png"
    elif case == "mask_size":
        mask = next((d / "ground_truth").rglob("*.png"))
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
        data, expect = d, mask.name
    elif case == "empty_train":
        for f in (d / "train/good").iterdir():
            f.unlink()
        data, expect = d, "train"
    else:
        data = tmp_path / "evil.zip"
        with zipfile.ZipFile(data, "w") as z:
            for f in d.rglob("*.png"):
                z.write(f, f.relative_to(d).as_posix())
            z.writestr("../x.png", b"x")
        expect = "../x.png"
    rc = cli_main(["run", str(data), "--methods", "padim", "--image-size", "64", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err


def test_memory_bank_quality_on_sample_data(tmp_path) -> None:
    """Issue acceptance: every memory-bank method reaches image AUROC ≥ 0.9 on a sample category via the CLI."""
    root = Path(__file__).resolve().parent.parent / "sample_data" / "brick"
    rc = cli_main(["run", str(root), "--methods", "patchcore,padim,spade", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for r in res["runs"]:
        assert r["metrics"]["image_auroc"] >= 0.9, (r["method"], r["metrics"]["image_auroc"])


# --- --param values -----------------------------------------------------------------------------------
def test_reduced_presets_are_marked_in_the_record(tiny, tmp_path, monkeypatch) -> None:
    """A run whose preset shrinks the paper's configuration says "reduced": true, cached or not."""
    import dataclasses

    from engine import registry

    cache = Cache(tmp_path / "c")
    first = run_methods(tiny, RunConfig(methods=["padim"], image_size=48), cache=cache)["runs"][0]
    assert first["status"] == "ok" and first["reduced"] is False and first["preset"] == "fast"
    mi = registry.info("padim")
    monkeypatch.setitem(registry._REGISTRY, "padim", dataclasses.replace(mi, reduced_presets=("fast",)))
    again = run_methods(tiny, RunConfig(methods=["padim"], image_size=48), cache=cache)["runs"][0]
    assert again["cached"] and again["reduced"] is True
    with pytest.raises(ValueError, match="reduced_presets"):
        registry.register(family="gan", name="x", localises=False, paper="p", summary="s", reduced_presets=("fats",))


@pytest.mark.parametrize("text, value", [
    ("None", None), ("null", None), ("true", True), ("False", False), ("3", 3), ("0.1", 0.1), ("-2e-3", -2e-3),
    ("blocks.2,blocks.4", ("blocks.2", "blocks.4")), ("(1, 2)", (1, 2)), ("[1, 2]", [1, 2]), ("mean", "mean"),
])
def test_param_values_are_parsed(text, value) -> None:
    from engine.cli import _parse_value

    assert _parse_value(text) == value and type(_parse_value(text)) is type(value)


def test_param_none_and_tuples_reach_the_method(tiny, tmp_path) -> None:
    rc = cli_main(["run", str(tiny), "--methods", "patchcore", "--image-size", "64", "--out", str(tmp_path),
                   "--param", "patchcore.max_candidates=None", "--param", "patchcore.layers=blocks.2,blocks.4",
                   "--param", "patchcore.coreset_ratio=1"])
    assert rc == 0
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["params"]["max_candidates"] is None and run["params"]["coreset_ratio"] == 1.0


@pytest.mark.parametrize("param, message", [
    ("patchcore.max_candidates=abc", "patchcore.max_candidates expects an integer or None, got 'abc'"),
    ("patchcore.coreset_ratio=true", "patchcore.coreset_ratio expects a number"),
    ("patchcore.layers=3", "patchcore.layers expects a comma-separated list of str"),
    ("patchcore.nope=1", "patchcore has no parameter 'nope'"),
])
def test_param_of_wrong_type_is_a_clear_error(tiny, tmp_path, capsys, param, message) -> None:
    rc = cli_main(["run", str(tiny), "--methods", "patchcore", "--image-size", "64", "--out", str(tmp_path),
                   "--param", param])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_methods_into_a_closed_pipe_is_quiet() -> None:
    import subprocess
    import sys

    p = subprocess.run(f"{sys.executable} -m engine.cli methods | true", shell=True, capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
