"""Try page and server folders under streamlit.testing.v1.AppTest: dropped images are scored by every trained method
with the run's own scores, bad files are listed, the downloaded model works with `adlab predict`; the Data page
opens a dataset from ADLAB_DATA_ROOTS and refuses a symlink escape."""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def _app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"../pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture(scope="module")
def trained() -> dict:
    """PaDiM trained on the sample brick through the dashboard's job manager (so its model is kept)."""
    from dashboard import services

    path = services.default_dataset_path()
    info = services.dataset_info(path)
    services.clear_results(info.digest)
    job = services.start_run("try-fixture", path, ["padim"], image_size=128, backbone="efficientnet_lite0",
                             preset="fast", labeled_anomalies=0)
    t0 = time.time()
    while job.active and time.time() - t0 < 240:
        time.sleep(0.2)
    assert job.state == "done", job.error
    return services.latest_results(info.digest)


def test_try_page_without_results_says_train_first() -> None:
    from dashboard import services

    for cat in services.sample_categories():
        if cat != "brick":
            services.clear_results(services.dataset_info(services.sample_path(cat)).digest)
    at = _app()
    at.radio(key="sample_choice").set_value("gravel").run()
    _goto(at, "try")
    assert at.title[0].value == "Try"
    assert any("No results yet" in i.value for i in at.info)


def test_dropped_images_get_the_runs_scores_and_verdicts(trained: dict) -> None:
    run = trained["runs"][0]
    picks = [next(i for i in run["images"] if i["label"] == 0), next(i for i in run["images"] if i["label"] == 1)]
    at = _app()
    _goto(at, "try")
    assert not at.error, [e.value for e in at.error]
    at.file_uploader(key="try_upload").set_value(
        [(Path(i["path"]).name, Path(i["path"]).read_bytes(), "image/png") for i in picks]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    names = [Path(i["path"]).name for i in picks]
    assert list(table["image"]) == [names[0], names[1] if names[1] != names[0] else f"{names[1]} (2)"]
    # two images form other backbone batches than the run's: equal to float32 rounding (bitwise for the same batches)
    assert list(table["padim score"]) == pytest.approx([i["score"] for i in picks], rel=1e-6)
    thr = run["metrics"]["threshold"]
    assert list(table["padim"]) == ["ANOMALOUS" if i["score"] >= thr else "normal" for i in picks]
    assert len(at.get("imgs")) + len(at.get("image")) >= 1
    assert at.get("download_button")


def test_bad_dropped_file_is_listed_by_its_name() -> None:
    at = _app()
    _goto(at, "try")
    at.file_uploader(key="try_upload").set_value([("fake.png", b"not an image", "image/png")]).run()
    assert not at.exception
    assert any("Nothing was scored" in e.value for e in at.error)
    df = at.dataframe[0].value
    assert list(df["file"]) == ["fake.png"] and "not an image file" in df["problem"][0]


def test_downloaded_model_scores_like_the_run(trained: dict, tmp_path: Path) -> None:
    from dashboard.services import try_images as services_try
    from engine.predict import predict_to_folder

    data = services_try.model_zip(trained, "padim")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert {"index.json", "padim/model.json", "padim/params.json", "padim/state.safetensors"} <= set(names)
    (tmp_path / "m.zip").write_bytes(data)
    run = trained["runs"][0]
    out = predict_to_folder(tmp_path / "m.zip", [i["path"] for i in run["images"]], out=tmp_path / "o")
    assert [i["score"] for i in out["images"]] == [i["score"] for i in run["images"]]  # same batches: bitwise


def test_method_without_a_kept_model_is_named(trained: dict) -> None:
    from dashboard.services import try_images as services_try

    run = {**trained["runs"][0], "cache_key": "0" * 40}
    out = services_try.try_images({**trained, "runs": [run]}, [{"path": run["images"][0]["path"], "name": "x"}], {})
    assert out["missing"] == {"padim": services_try.NO_MODEL} and out["images"] == []
    assert not services_try.has_model({**trained, "runs": [run]}, "padim")


def test_data_page_opens_a_server_folder_and_refuses_an_escape(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.data import make_synthetic_dataset

    root = tmp_path / "lines"
    ds = make_synthetic_dataset(root / "line1", "grass", n_train=4, n_test_good=2, n_defect_per_type=1, size=32)
    outside = make_synthetic_dataset(tmp_path / "private", "gravel", n_train=4, n_test_good=2, n_defect_per_type=1,
                                     size=32)
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("ADLAB_DATA_ROOTS", str(root))
    at = _app()
    before = at.session_state["dataset_path"]
    box = at.selectbox(key="server_choice")
    assert box.options == ["lines › line1/grass"]
    at.text_input(key="server_path").set_value("sneaky").run()
    at.button(key="server_open").click().run()
    assert not at.exception
    assert any("not loaded" in e.value for e in at.error)
    assert at.session_state["dataset_path"] == before
    at.text_input(key="server_path").set_value("../private/gravel").run()
    at.button(key="server_open").click().run()
    problems = next(d.value for d in at.dataframe if "problem" in d.value.columns)
    assert "'..' is not allowed" in problems["problem"][0]
    at.text_input(key="server_path").set_value("").run()
    at.selectbox(key="server_choice").set_value(str(ds.resolve())).run()
    at.button(key="server_open").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["dataset_path"] == str(ds.resolve())
    assert any("server folder" in s.value for s in at.subheader)
    assert os.access(ds, os.R_OK)
