"""The check that the test set's normal images look like the training images (engine.data.shift)."""

from __future__ import annotations

import torch

from engine.api import ImageSet
from engine.data.shift import normal_shift


def _images(n: int, level: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = level + 6 * torch.randn(n, 1, 1, 1, generator=g)  # per-image exposure
    return (base + 20 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 255).to(torch.uint8)


def _test_set(normal_level: float) -> ImageSet:
    imgs = torch.cat([_images(12, normal_level, 1), _images(8, 180, 2)])
    return ImageSet(images=imgs, labels=torch.tensor([0] * 12 + [1] * 8))


def test_darker_test_normals_are_reported_with_the_numbers() -> None:
    train = ImageSet(images=_images(40, 180, 0))
    msg = normal_shift(train, _test_set(150))
    assert msg is not None and "mean grey level lower" in msg and "100% of test normals" in msg


def test_normals_from_the_training_distribution_pass() -> None:
    train = ImageSet(images=_images(40, 180, 0))
    assert normal_shift(train, _test_set(180)) is None


def test_too_few_normals_give_no_verdict() -> None:
    train = ImageSet(images=_images(40, 180, 0))
    test = ImageSet(images=_images(4, 120, 3), labels=torch.zeros(4, dtype=torch.int64))
    assert normal_shift(train, test) is None


def _write(path, level: float, seed: int) -> None:  # noqa: ANN001
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = np.clip(level + rng.normal(0, 3) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path)


def test_a_run_on_darker_test_normals_carries_the_warning_and_the_sample_does_not(tmp_path) -> None:  # noqa: ANN001
    from pathlib import Path

    from engine.runner import RunConfig, run_methods

    root = tmp_path / "shifted"
    for i in range(12):
        _write(root / "train/good" / f"{i:03d}.png", 180, i)
    for i in range(8):
        _write(root / "test/good" / f"{i:03d}.png", 140, 100 + i)
        _write(root / "test/crack" / f"{i:03d}.png", 180, 200 + i)
    cfg = RunConfig(methods=["padim"], image_size=32, preset="test", use_cache=False)
    warned = run_methods(str(root), cfg)["dataset"]["warnings"]
    assert any("test set's normal images differ" in w for w in warned)
    sample = Path(__file__).resolve().parent.parent / "sample_data" / "brick"
    assert not any("normal images differ" in w for w in run_methods(str(sample), cfg)["dataset"]["warnings"])


def test_compare_shows_the_runs_dataset_warnings() -> None:
    import json
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from dashboard import services
    from dashboard.services.results import _results_file
    from engine.cache import atomic_write
    from engine.runner import RunConfig, run_methods

    path = services.sample_path("grass")
    res = run_methods(path, RunConfig(methods=["padim"], image_size=64, preset="test"))
    res["dataset"]["source"] = path
    res["dataset"]["warnings"].append("The test set's normal images differ from the training images: (a test)")
    atomic_write(_results_file(res["dataset"]["digest"]), json.dumps(res).encode())
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    at.radio(key="sample_choice").set_value("grass").run()
    try:
        at.switch_page("../pages/compare.py").run()
        assert not at.exception, [e.value for e in at.exception]
        assert any("normal images differ from the training images: (a test)" in w.value for w in at.warning)
    finally:
        services.clear_results(res["dataset"]["digest"])  # other tests find grass without stored results
