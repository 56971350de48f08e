"""The labelled-anomaly curve: several K in one run (same held-back test images), the CLI's K list, the curve data."""

from __future__ import annotations

import pytest

from engine.api import ConfigError
from engine.cli import build_parser
from engine.components import features as feats
from engine.labelled_curve import capped_ks, has_curve, labelled_curve, run_ks
from engine.runner import RunConfig, k_values, labeled_rows_by_k, run_methods, split_labeled

TINY = {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    from engine.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("kc"), "brick", n_train=8, n_test_good=4,
                                  n_defect_per_type=4, size=64)


@pytest.fixture(scope="module")
def curve_run(data, tmp_path_factory: pytest.TempPathFactory):
    """A run of devnet, mixed_supervision and patchcore at K = 0, 1, 3 in a fresh cache; the feature passes made."""
    from engine.cache import Cache

    feats.clear_memory_cache()
    passes: list[str] = []
    real = feats._compute

    def counting(images, *a, **k):  # type: ignore[no-untyped-def]
        passes.append(images.digest)
        return real(images, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(feats, "_compute", counting)
    try:
        cfg = RunConfig(methods=["devnet", "patchcore", "mixed_supervision"], image_size=64, device="cpu",
                        labeled_anomalies=[3, 0, 1], params={"devnet": dict(TINY), "mixed_supervision": dict(TINY)})
        res = run_methods(data, cfg, cache=Cache(tmp_path_factory.mktemp("kc-cache")))
    finally:
        mp.undo()
        feats.clear_memory_cache()
    return res, passes


def test_k_values_parse_and_refuse() -> None:
    assert k_values(3) == [3] and k_values([10, 0, 3, 3, 1]) == [0, 1, 3, 10]
    for bad in ([], [-1], [1.5]):
        with pytest.raises(ConfigError, match="labelled anomalies"):
            k_values(bad)  # type: ignore[arg-type]


def test_labelled_rows_are_nested_and_leave_one_per_type(data) -> None:
    from engine.data import discover, load_split

    test = load_split(discover(data), "test", 32)
    rows = labeled_rows_by_k(test, [0, 1, 2, 3, 10], seed=4)
    assert rows[0] == []
    for small, big in ((1, 2), (2, 3), (3, 10)):
        assert set(rows[small]) <= set(rows[big]), (small, big)
    types = {d for d, y in zip(test.defect_types, test.labels.tolist(), strict=True) if y == 1}
    assert len(rows[1]) == len(types) and len(rows[3]) == 3 * len(types)
    assert rows[10] == rows[3]  # 4 per type: one always stays for evaluation
    assert all(test.labels[i] == 1 for i in rows[10])
    assert split_labeled(test, 2, seed=4)[0] == rows[2]  # a single K is the same split
    assert labeled_rows_by_k(test, [2], seed=5)[2] != rows[2] or len(types) == 0  # the seed matters


def test_one_run_per_method_and_k_on_the_same_images(curve_run) -> None:
    res, _ = curve_run
    plan = [(r["method"], r.get("labeled_k")) for r in res["runs"]]
    assert plan == [("devnet", 0), ("devnet", 1), ("devnet", 3), ("patchcore", None),
                    ("mixed_supervision", 0), ("mixed_supervision", 1), ("mixed_supervision", 3)]
    assert res["config"]["labeled_anomalies"] == 3 and res["config"]["labeled_anomalies_ks"] == [0, 1, 3]
    held = set(res["labeled_anomalies"]["paths"])
    n_types = len(res["dataset"]["defect_types"])
    assert len(held) == 3 * n_types
    evaluated = {tuple(sorted(i["path"] for i in r["images"])) for r in res["runs"] if r["status"] == "ok"}
    assert len(evaluated) == 1, "the runs were evaluated on different test images"
    (paths,) = evaluated
    assert not held & set(paths) and len(paths) == res["dataset"]["n_test"] == 4 + n_types * 4 - len(held)
    for m in ("devnet", "mixed_supervision"):
        lab = {r["labeled_k"]: set(r.get("labeled_paths", [])) for r in res["runs"] if r["method"] == m}
        assert lab[0] == set() and len(lab[1]) == n_types and lab[1] <= lab[3] == held
    labels = [r["label"] for r in res["runs"]]
    assert "devnet · K=1" in labels and "patchcore" in labels and len(set(labels)) == len(labels)


def test_k0_of_a_weak_method_fails_alone_with_todays_message(curve_run) -> None:
    res, _ = curve_run
    for r in res["runs"]:
        if r.get("labeled_k") == 0:
            assert r["status"] == "failed"
            assert r["error"].startswith(f"{r['method']} need labelled anomalies: set labelled anomalies K ≥ 1")
        else:
            assert r["status"] == "ok", (r["label"], r["error"])


def test_backbone_passes_are_shared_across_k(curve_run) -> None:
    _, passes = curve_run
    assert passes, "nothing was computed (the cache was not fresh)"
    assert len(passes) == len(set(passes)), "an image set went through the backbone twice"


def test_all_k_zero_with_a_weak_method_is_still_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="labelled anomalies"):
        run_methods(tmp_path, RunConfig(methods=["devnet", "patchcore"], labeled_anomalies=[0]))


def test_save_models_takes_one_k(data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="one K"):
        run_methods(data, RunConfig(methods=["devnet"], labeled_anomalies=[1, 3]), save_models=tmp_path / "m")


def test_curve_data_from_a_run(curve_run) -> None:
    res, _ = curve_run
    assert run_ks(res) == [0, 1, 3] and has_curve(res)
    c = labelled_curve(res, n_boot=200)
    assert c is not None and c["ks"] == [0, 1, 3] and set(c["weak"]) == {"devnet", "mixed_supervision"}
    by_k = {p["k"]: p for p in c["weak"]["devnet"]}
    assert by_k[0]["status"] == "failed" and by_k[0]["image_auroc"] is None and by_k[0]["image_auroc_ci"] is None
    devnet_run = next(r for r in res["runs"] if r.get("label") == "devnet · K=3")
    assert by_k[3]["image_auroc"] == devnet_run["metrics"]["image_auroc"]
    assert by_k[3]["image_f1_max"] == devnet_run["metrics"]["image_f1_max"]
    lo, hi = by_k[3]["image_auroc_ci"]
    assert lo <= by_k[3]["image_auroc"] <= hi
    ref = c["reference"]["image_auroc"]
    patchcore = next(r for r in res["runs"] if r["method"] == "patchcore")
    assert ref["method"] == "patchcore" and ref["value"] == patchcore["metrics"]["image_auroc"]
    assert ref["ci"][0] <= ref["value"] <= ref["ci"][1]
    assert c["has_pixel"] == (patchcore["metrics"]["pixel_auroc"] is not None)


def test_no_curve_for_a_single_k() -> None:
    runs = [{"method": "devnet", "labeled_k": 3, "status": "ok", "metrics": {"image_auroc": 0.9}, "images": []},
            {"method": "patchcore", "labeled_k": None, "status": "ok", "metrics": {"image_auroc": 0.8}}]
    assert not has_curve({"runs": runs}) and labelled_curve({"runs": runs}) is None
    assert labelled_curve(None) is None


def test_reference_is_the_best_unsupervised_run() -> None:
    def run(method: str, k: int | None, auroc: float, pix: float | None = None) -> dict:
        imgs = [{"score": float(s), "label": int(s > 2)} for s in range(6)]
        return {"method": method, "labeled_k": k, "status": "ok", "images": imgs,
                "metrics": {"image_auroc": auroc, "pixel_auroc": pix, "image_f1_max": 0.5}}

    res = {"runs": [run("devnet", 1, 0.6), run("devnet", 3, 0.99), run("padim", None, 0.7, 0.95),
                    run("patchcore", None, 0.8, 0.9)]}
    c = labelled_curve(res, n_boot=50)
    assert c is not None
    assert c["reference"]["image_auroc"]["method"] == "patchcore"  # not the better weak run
    assert c["reference"]["pixel_auroc"] == {"method": "padim", "value": 0.95, "ci": None}
    assert [p["k"] for p in c["weak"]["devnet"]] == [1, 3]


def test_capped_ks() -> None:
    assert capped_ks({"a": 20, "b": 24}) == ([0, 1, 3, 10], None)
    ks, note = capped_ks({"hole": 6, "scratch": 6})
    assert ks == [0, 1, 3] and "has 6 anomalous test images, so K stops at 3" in note
    ks, note = capped_ks({"hole": 9, "scratch": 2})
    assert ks == [0, 1, 3, 4] and "has 9 anomalous" in note and "scratch have fewer than 8" in note
    ks, note = capped_ks({"a": 20, "b": 3})
    assert ks == [0, 1, 3, 10] and note is not None and note.startswith("b have fewer than 20")
    assert capped_ks({"a": 2}) == ([0, 1], "the largest defect type has 2 anomalous test images, so K stops at 1 "
                                           "to keep at least as many for evaluation as for training (asked: 0, 1, 3, "
                                           "10)")
    ks, note = capped_ks({"a": 1})
    assert ks == [0] and "no curve" in note


@pytest.mark.parametrize(("arg", "want"), [("3", 3), ("0,1,3,10", [0, 1, 3, 10]), ("10,0", [10, 0]),
                                           ("0-3", [0, 1, 2, 3]), ("5,", [5])])
def test_cli_parses_a_k_list(arg: str, want: int | list[int]) -> None:
    args = build_parser().parse_args(["run", "DATA", "--methods", "devnet", "--labeled-anomalies", arg])
    assert args.labeled_anomalies == want


@pytest.mark.parametrize("arg", ["a", "1,-2", "", "1;3"])
def test_cli_refuses_a_bad_k_list(arg: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", "DATA", "--methods", "devnet", "--labeled-anomalies", arg])
    assert e.value.code == 2 and "--labeled-anomalies" in capsys.readouterr().err


def test_sweep_runs_one_unit_per_weak_method_and_k(data, tmp_path) -> None:
    from engine.executors import LocalExecutor
    from engine.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(datasets=[str(data)], methods=["patchcore", "devnet"], labeled_anomalies=[0, 2],
                      preset="test", image_size=48, params={"devnet": dict(TINY)},
                      cache_root=str(tmp_path / "cache"))
    doc = run_sweep(cfg, tmp_path / "out", LocalExecutor())
    units = doc["units"]
    assert [(u["method"], u["labeled_k"], u["label"]) for u in units] == [
        ("patchcore", None, "patchcore"), ("devnet", 0, "devnet · K=0"), ("devnet", 2, "devnet · K=2")]
    assert len({u["key"] for u in units}) == 3
    assert units[1]["status"] == "failed" and "need labelled anomalies" in units[1]["error"]
    assert units[0]["status"] == units[2]["status"] == "ok", [u["error"] for u in units]
    import json

    res = json.loads((tmp_path / "out" / units[0]["results"]).read_text())
    evaluated = [sorted(i["path"] for i in r["images"]) for r in res["runs"] if r["status"] == "ok"]
    assert len(evaluated) == 2 and evaluated[0] == evaluated[1]  # the same held-back test images


def test_real_ks_lower_a_k_no_type_can_give() -> None:
    from engine.runner import real_ks

    real, note = real_ks({"hole": 6, "scratch": 6}, [0, 1, 3, 10])
    assert real == {0: 0, 1: 1, 3: 3, 10: 5}
    assert note is not None and "K = 10 labels 5 per defect type" in note and "recorded as K = 5" in note
    assert "has 6 anomalous test images" in note
    real, note = real_ks({"blowhole": 20, "fray": 4}, [10])  # the largest type gives 10: K stays, fray is named
    assert real == {10: 10} and note == "at K = 10, fray gives 3 of its 4 (one stays for evaluation)"
    assert real_ks({"a": 20, "b": 24}, [0, 1, 3, 10]) == ({0: 0, 1: 1, 3: 3, 10: 10}, None)
    assert real_ks({"a": 1}, [3])[0] == {3: 0}


def test_a_k_above_every_type_is_recorded_as_the_number_labelled(data, tmp_path) -> None:
    """4 anomalous test images per type: K = 10 labels 3 of each, so the run says K = 3 (asked 10, noted)."""
    from engine.cache import Cache

    cfg = RunConfig(methods=["devnet", "patchcore"], image_size=64, device="cpu", labeled_anomalies=[1, 10],
                    params={"devnet": dict(TINY)})
    res = run_methods(data, cfg, cache=Cache(tmp_path / "cache"))
    n_types = len(res["dataset"]["defect_types"])
    assert [(r["method"], r["labeled_k"]) for r in res["runs"]] == [("devnet", 1), ("devnet", 3), ("patchcore", None)]
    assert [r["label"] for r in res["runs"]] == ["devnet · K=1", "devnet · K=3", "patchcore"]
    assert res["config"]["labeled_anomalies"] == 3 and res["config"]["labeled_anomalies_ks"] == [1, 3]
    assert res["config"]["labeled_anomalies_asked"] == [1, 10]
    assert res["labeled_anomalies"]["k"] == 3 and len(res["labeled_anomalies"]["paths"]) == 3 * n_types
    k3 = next(r for r in res["runs"] if r["labeled_k"] == 3)
    assert k3["status"] == "ok", k3["error"]
    assert len(k3["labeled_paths"]) == 3 * n_types
    assert any("K = 10 labels 3 per defect type" in w for w in res["dataset"]["warnings"])
    # a K every type can give changes nothing: no note, no "asked" field
    single = run_methods(data, RunConfig(methods=["patchcore"], image_size=64, device="cpu", labeled_anomalies=3),
                         cache=Cache(tmp_path / "cache"))
    assert "labeled_anomalies_asked" not in single["config"] and single["config"]["labeled_anomalies"] == 3
    assert not any("labels" in w and "per defect type" in w for w in single["dataset"]["warnings"])


def test_no_type_to_label_from_is_a_clear_error(tmp_path) -> None:
    from engine.data import make_synthetic_dataset

    one = make_synthetic_dataset(tmp_path / "one", "brick", n_train=4, n_test_good=2, n_defect_per_type=1, size=32)
    with pytest.raises(ConfigError, match=r"devnet need labelled anomalies, but no defect type of .* has two or more"):
        run_methods(one, RunConfig(methods=["devnet"], image_size=32, device="cpu", labeled_anomalies=3))


def test_sweep_plans_the_k_each_dataset_labels(data) -> None:
    from engine.sweep import SweepConfig, plan

    units = plan(SweepConfig(datasets=[str(data)], methods=["devnet"], labeled_anomalies=[1, 3, 10]))
    assert [p.unit.only_k for p in units] == [1, 3]  # 10 labels 3 per type here: the same unit as K = 3
