"""Saved models and `adlab predict`: run -> save -> predict gives the run's scores; thresholds; bad inputs and
models from another engine version get specific errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.api import ConfigError, DataValidationError
from engine.cli import main as cli_main
from engine.data import make_synthetic_dataset
from engine.data.inputs import collect_images
from engine.predict import predict_to_folder
from engine.runner import RunConfig, run_methods
from engine.saved_models import load_model, resolve_threshold


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny dataset, `adlab run` on it with --save-models, and its results."""
    root = tmp_path_factory.mktemp("predict")
    # seed 7: not the same content (and cache entries) as the tiny sets of other test files
    data = make_synthetic_dataset(root / "data", "brick", n_train=8, n_test_good=4, n_defect_per_type=3, size=64,
                                  seed=7)
    rc = cli_main(["run", str(data), "--methods", "padim,patchcore", "--image-size", "64", "--out",
                   str(root / "out"), "--save-models", str(root / "models")])
    assert rc == 0
    return {"data": data, "models": root / "models", "results": root / "out" / "results.json", "root": root}


def _run_scores(results: Path, method: str, data: Path) -> dict[str, float]:
    """{path under `data`: score} of a run. A run from the cache may name another copy of the same data (the
    cache is keyed by content), so paths are re-rooted at `data` by their test/<type>/<name> tail."""
    run = next(r for r in json.loads(results.read_text())["runs"] if r["method"] == method)
    return {str(data.joinpath(*Path(i["path"]).parts[-3:])): i["score"] for i in run["images"]}


@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_predict_gives_the_runs_scores(saved: dict[str, Path], method: str, tmp_path: Path) -> None:
    expected = _run_scores(saved["results"], method, saved["data"])
    rc = cli_main(["predict", str(saved["models"]), str(saved["data"] / "test"), "--method", method,
                   "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / "predictions.json").read_text())
    assert out["method"] == method and set(out) >= {"method", "threshold", "images"}
    got = {str(saved["data"] / "test" / Path(i["path"]).relative_to(saved["data"] / "test")): i["score"]
           for i in out["images"]}
    assert got.keys() == expected.keys()
    assert all(got[k] == expected[k] for k in expected), {k: (got[k], expected[k]) for k in expected}
    thr = out["threshold"]
    for i in out["images"]:
        assert i["verdict"] == ("anomalous" if i["score"] >= thr else "normal")
        png = Image.open(tmp_path / i["heatmap"])
        assert png.size == (64, 64) and png.mode == "RGB"


def test_one_image_alone_scores_as_in_the_run(saved: dict[str, Path], tmp_path: Path) -> None:
    """A single image (another batch than the run's) still gets the run's score."""
    expected = _run_scores(saved["results"], "padim", saved["data"])
    path = next(p for p in expected if "/scratch/" in p)
    out = predict_to_folder(saved["models"], [path], method="padim", out=tmp_path)
    assert out["images"][0]["score"] == pytest.approx(expected[path], rel=1e-6)


def test_thresholds_from_the_run(saved: dict[str, Path]) -> None:
    model = load_model(saved["models"], "padim")
    run = next(r for r in json.loads(saved["results"].read_text())["runs"] if r["method"] == "padim")
    assert model.threshold("f1")[0] == run["metrics"]["threshold"]
    good = np.sort([i["score"] for i in run["images"] if i["label"] == 0])
    t, _ = model.threshold("fpr:0")
    assert t > good[-1]  # nothing good flagged
    t, _ = model.threshold("fpr:0.25")  # 4 good images: at most one flagged
    assert (good >= t).sum() == 1
    assert model.threshold("12.5")[0] == 12.5
    for bad in ("fpr:2", "fpr:x", "best", "nan"):
        with pytest.raises(ConfigError, match="threshold"):
            resolve_threshold(model.card, bad)
    with pytest.raises(ConfigError, match="no F1 threshold"):
        resolve_threshold({**model.card, "thresholds": {"f1": None}}, "f1")


def test_several_models_need_a_method(saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli_main(["predict", str(saved["models"]), str(saved["data"] / "test"), "--out", str(tmp_path)])
    assert rc == 2
    assert "padim, patchcore" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no model 'spade'"):
        load_model(saved["models"], "spade")


def _copy_model(saved: dict[str, Path], dest: Path) -> Path:
    import shutil

    shutil.copytree(saved["models"] / "padim", dest / "padim")
    return dest / "padim"


def test_model_from_another_engine_version_says_what_to_do(saved: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    d = _copy_model(saved, tmp_path / "m")
    card = json.loads((d / "model.json").read_text())
    card["engine_version"] = "0.0.1"
    (d / "model.json").write_text(json.dumps(card))
    rc = cli_main(["predict", str(d), str(saved["data"] / "test"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "saved by adlab engine 0.0.1" in err and "train it again" in err and "--save-models" in err
    assert not (tmp_path / "o" / "predictions.json").exists()


def test_damaged_or_foreign_model_is_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    d = _copy_model(saved, tmp_path / "m")
    (d / "state.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError, match="damaged"):
        load_model(d)
    (d / "model.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not an adlab model card"):
        load_model(d)
    with pytest.raises(ConfigError, match="no saved model"):
        load_model(tmp_path / "m" / "..")
    with pytest.raises(ConfigError, match="no such folder"):
        load_model(tmp_path / "absent")


def test_bad_inputs_are_all_listed(saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../escape.png", b"x")
    args = [str(tmp_path / n) for n in ("missing.png", "notes.txt", "empty", "broken.png", "tiny.png", "evil.zip")]
    with pytest.raises(DataValidationError) as e:
        collect_images(args)
    msgs = {Path(p.path.split(":")[0]).name: p.message for p in e.value.problems}
    assert "does not exist" in msgs["missing.png"]
    assert "not an image file" in msgs["notes.txt"]
    assert "no image files" in msgs["empty"]
    assert "content is not a known image format" in msgs["broken.png"]
    assert "smaller than the minimum" in msgs["tiny.png"]
    assert "escape" in msgs["evil.zip"]
    rc = cli_main(["predict", str(saved["models"]), *args, "--method", "padim", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "6 problem(s)" in err


def test_zip_of_images_is_scored(saved: dict[str, Path], tmp_path: Path) -> None:
    expected = _run_scores(saved["results"], "padim", saved["data"])
    src = [p for p in expected if "/good/" in p][:2]
    with zipfile.ZipFile(tmp_path / "batch.zip", "w") as zf:
        for p in src:
            zf.write(p, f"new/{Path(p).name}")
    out = predict_to_folder(saved["models"], [tmp_path / "batch.zip"], method="padim", out=tmp_path / "o")
    assert [i["path"] for i in out["images"]] == [f"{tmp_path / 'batch.zip'}:new/{Path(p).name}" for p in src]
    assert [i["score"] for i in out["images"]] == pytest.approx([expected[p] for p in src], rel=1e-6)


def test_cached_run_still_saves_its_model(saved: dict[str, Path], tmp_path: Path) -> None:
    """A run found in the cache without its model is fitted again when models are to be saved; one found with
    its model is copied from the cache."""
    cfg = RunConfig(methods=["spade"], image_size=64)
    first = run_methods(saved["data"], cfg)  # no model kept
    again = run_methods(saved["data"], cfg, save_models=tmp_path / "a")
    assert not again["runs"][0]["cached"]
    third = run_methods(saved["data"], cfg, save_models=tmp_path / "b")
    assert third["runs"][0]["cached"]
    for d in ("a", "b"):
        out = predict_to_folder(tmp_path / d, [saved["data"] / "test"], out=tmp_path / f"o{d}")
        got = {Path(i["path"]).parts[-2:]: i["score"] for i in out["images"]}
        assert got == {Path(i["path"]).parts[-2:]: i["score"] for i in first["runs"][0]["images"]}


def test_zipped_models_folder_is_accepted(saved: dict[str, Path], tmp_path: Path) -> None:
    """The dashboard's "Download model" gives a zip of a models folder; predict takes it as MODELS_DIR."""
    with zipfile.ZipFile(tmp_path / "model.zip", "w") as zf:
        for f in (saved["models"] / "padim").iterdir():
            zf.write(f, f"padim/{f.name}")
    expected = _run_scores(saved["results"], "padim", saved["data"])
    out = predict_to_folder(tmp_path / "model.zip", [saved["data"] / "test"], out=tmp_path / "o")
    assert {i["path"]: i["score"] for i in out["images"]} == expected
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a models folder"):
        load_model(tmp_path / "x.txt")
