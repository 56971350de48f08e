"""Non-square and large images (issue 17): keep-aspect loading, tiling, stitched maps aligned with the masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DEFECT_COLS, DEFECT_ROWS, TALL_H, TALL_W
from PIL import Image

from engine import estimates
from engine.api import ConfigError, ImageSet, Prediction
from engine.components.tiling import cut, make_grid, max_per_image, stitch_maps, tile_images
from engine.data import discover, load_split
from engine.data.geometry import suggestion, summarize_sizes, tile_positions, working_shape
from engine.methods.base import BaseDetector
from engine.runner import RunConfig, load_prediction, run_methods

H, W = TALL_H, TALL_W


@pytest.fixture(scope="module")
def tall(tall_strips: Path) -> Path:
    return tall_strips


# ------------------------------------------------------------------------------------------------ geometry


def test_working_shape_keeps_the_aspect_and_square_stays_available() -> None:
    kolektor = summarize_sizes([(500, 1260)] * 3)
    assert working_shape(kolektor, 256, "keep-aspect") == (640, 256)
    assert working_shape(kolektor, 256, "square") == (256, 256)
    wide = summarize_sizes([(1130, 460)])
    assert working_shape(wide, 256, "keep-aspect") == (256, 640)  # 256 * 2.46 = 629 -> a multiple of 32
    assert working_shape(summarize_sizes([(300, 300)]), 100, "keep-aspect") == (100, 100)  # square: unchanged
    with pytest.raises(ValueError, match="resize must be one of"):
        working_shape(kolektor, 256, "stretch")


def test_suggestion_names_the_shape_and_tiling() -> None:
    text = suggestion(summarize_sizes([(500, 1260)] * 3))
    assert "500×1260" in text and "keep aspect at 256 → 256×640" in text and "tile 256" in text
    mixed = suggestion(summarize_sizes([(100, 300), (300, 100), (200, 200)]))
    assert "Aspect ratios vary" in mixed and "stretched up to" in mixed


@pytest.mark.parametrize("length,tile,overlap", [(256, 64, 0.25), (640, 256, 0.0), (100, 64, 0.5), (64, 64, 0.25)])
def test_tile_positions_cover_with_overlap(length: int, tile: int, overlap: float) -> None:
    pos = tile_positions(length, tile, overlap)
    assert pos[0] == 0 and pos[-1] + tile == length
    gaps = np.diff(pos)
    assert (gaps <= tile * (1 - overlap) + 1e-9).all() and (gaps > 0).all()


# ------------------------------------------------------------------------------------------------ tiling


def test_stitch_inverts_cut_and_labels_follow_the_mask() -> None:
    g = make_grid((100, 260), 64)
    x = torch.rand(3, 100, 260)
    assert torch.allclose(stitch_maps(cut(x, g), g), x)  # overlaps average equal values
    masks = torch.zeros(2, 100, 260, dtype=torch.uint8)
    masks[1, 5:9, 250:255] = 1  # only in the right-most column of tiles, top row
    s = ImageSet(images=torch.zeros(2, 3, 100, 260, dtype=torch.uint8), labels=torch.tensor([0, 1]), masks=masks)
    t = tile_images(s, g)
    assert len(t) == 2 * g.n and t.size == (64, 64)
    lab = t.labels.reshape(2, len(g.ys), len(g.xs))
    assert lab[0].sum() == 0 and lab[1, 0, -1] == 1 and lab[1].sum() == 1
    assert max_per_image(torch.arange(2.0 * g.n), g).tolist() == [g.n - 1, 2 * g.n - 1]


def test_tiles_of_a_subset_point_at_the_full_sets_tiles() -> None:
    g = make_grid((64, 128), 64, 0.0)
    full = ImageSet(images=(torch.rand(4, 3, 64, 128) * 255).to(torch.uint8))
    sub = full.subset([1, 3])
    t_full, t_sub = tile_images(full, g), tile_images(sub, g)
    assert t_sub.origin is not None and t_sub.origin[0] == t_full.digest
    assert torch.equal(t_full.images[list(t_sub.origin[1])], t_sub.images)


class _Recorder(BaseDetector):
    """Records what _fit/_predict receive; map = the red channel (so the stitched map is the input's)."""

    method_name = "recorder"
    seen: list[tuple[int, ...]]

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Any) -> None:
        self.seen = [tuple(train.images.shape)]

    def _predict(self, images: ImageSet) -> Prediction:
        self.seen = [*getattr(self, "seen", []), tuple(images.images.shape)]
        red = images.float_images()[:, 0]
        return Prediction(scores=red.flatten(1).amax(1), maps=red)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(1)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        pass


class _SquareRecorder(_Recorder):
    square_input = True


def test_base_class_tiles_square_input_methods_and_stitches(tmp_path: Path) -> None:
    imgs = (torch.rand(2, 3, 64, 160) * 255).to(torch.uint8)
    plain = _Recorder().fit(imgs)
    plain.predict(imgs)
    assert plain.seen == [(2, 3, 64, 160)] * 2  # a method that takes any shape sees the whole image
    sq = _SquareRecorder().fit(imgs)
    pred = sq.predict(imgs)
    n = make_grid((64, 160), 64).n
    assert sq.seen == [(2 * n, 3, 64, 64)] * 2  # a fixed-square method sees square tiles, never a squash
    assert pred.maps is not None and torch.allclose(pred.maps, imgs[:, 0].float() / 255, atol=1e-6)
    assert torch.allclose(pred.scores, imgs[:, 0].float().flatten(1).amax(1) / 255)
    tiled = _Recorder().set_tiling(32, 0.5).fit(imgs)
    tiled.save(tmp_path / "m")
    back = _Recorder().load(tmp_path / "m")
    assert (back.tile, back.tile_overlap) == (32, 0.5)
    assert torch.equal(back.predict(imgs).maps, tiled.predict(imgs).maps)
    with pytest.raises(ConfigError, match="tile must be"):
        _Recorder().set_tiling(4)


# ------------------------------------------------------------------------------------------------ data


def test_keep_aspect_loading_keeps_thin_defects_that_squashing_loses(tall: Path) -> None:
    ds = discover(tall)
    assert ds.working_shape(64) == (256, 64)  # the default: keep the 4:1 aspect
    kept = load_split(ds, "test", ds.working_shape(64))
    line = [i for i, d in enumerate(kept.defect_types) if d == "line"]
    assert kept.masks is not None and all(int(kept.masks[i].sum()) > 0 for i in line)
    squashed = load_split(ds, "test", ds.working_shape(64, resize="square"))
    assert squashed.size == (64, 64)
    assert squashed.masks is not None and all(int(squashed.masks[i].sum()) == 0 for i in line)


def _assert_aligned(res: dict[str, Any], shape: tuple[int, int]) -> None:
    """Every spot image's map peaks inside its (slightly grown) defect box, in native coordinates."""
    (rec,) = res["runs"]
    assert rec["status"] == "ok", rec["error"]
    pred = load_prediction(rec)
    assert pred is not None and pred.maps is not None and tuple(pred.maps.shape[1:]) == shape
    sy, sx = H / shape[0], W / shape[1]
    for img, amap in zip(rec["images"], pred.maps, strict=True):
        if img["defect_type"] != "spot":
            continue
        y, x = divmod(int(amap.float().argmax()), shape[1])
        y, x = (y + 0.5) * sy, (x + 0.5) * sx
        assert DEFECT_ROWS[0] - 8 <= y <= DEFECT_ROWS[1] + 8 and DEFECT_COLS[0] - 8 <= x <= DEFECT_COLS[1] + 8, \
            (img["path"], y, x)


def test_keep_aspect_run_maps_align_with_the_defect(tall: Path) -> None:
    res = run_methods(tall, RunConfig(methods=["patchcore"], image_size=64, device="cpu"))
    c = res["config"]
    assert c["resize"] == "keep-aspect" and c["image_shape"] == [256, 64] and c["tile"] is None
    _assert_aligned(res, (256, 64))


def test_tiled_run_maps_align_with_the_defect(tall: Path) -> None:
    res = run_methods(tall, RunConfig(methods=["patchcore"], image_size=64, tile=64, device="cpu"))
    c = res["config"]
    assert c["tile"] == 64 and c["tiles_per_image"] == len(tile_positions(256, 64)) and c["image_shape"] == [256, 64]
    assert res["runs"][0]["tiles_per_image"] == c["tiles_per_image"]
    _assert_aligned(res, (256, 64))
    # the tiled run has its own cache entry, not the whole-image run's
    whole = run_methods(tall, RunConfig(methods=["patchcore"], image_size=64, device="cpu"))
    assert whole["runs"][0]["cache_key"] != res["runs"][0]["cache_key"]


def test_bad_geometry_is_a_config_error(tall: Path) -> None:
    with pytest.raises(ConfigError, match="resize must be one of"):
        run_methods(tall, RunConfig(methods=["padim"], resize="stretched"))
    with pytest.raises(ConfigError, match="overlap"):
        run_methods(tall, RunConfig(methods=["padim"], tile=64, tile_overlap=0.9))


def test_estimates_count_tiles_and_pixels() -> None:
    base = estimates.units(10, 5, 256)
    assert base == (10, 5, 256.0)
    n_tr, n_te, side = estimates.units(10, 5, 256, shape=(256, 640))
    assert (n_tr, n_te) == (10, 5) and side == pytest.approx((256 * 640) ** 0.5)
    n_tr, n_te, side = estimates.units(10, 5, 256, shape=(512, 512), tile=256, overlap=0.0)
    assert (n_tr, n_te, side) == (40, 20, 256.0)
    plain = estimates.estimate_job([("padim", {}, False)], n_train=10, n_test=5, image_size=256, preset="fast",
                                   device="cpu", shape=(512, 512))
    tiled = estimates.estimate_job([("padim", {}, False)], n_train=10, n_test=5, image_size=256, preset="fast",
                                   device="cpu", shape=(512, 512), tile=128, overlap=0.0)
    assert tiled.tiles == 16 and "16 tiles of 128 px" in tiled.size_text
    # unmeasured methods get the prior, growing with the pixels held: 16 tiles of 128 px = one 512 px image
    assert tiled.peak_mb == pytest.approx(plain.peak_mb)


def test_saved_tiled_model_scores_new_files_as_in_its_run(tall: Path, tmp_path: Path) -> None:
    from engine.predict import predict_to_folder

    res = run_methods(tall, RunConfig(methods=["padim"], image_size=64, tile=64, device="cpu"),
                      save_models=tmp_path / "models")
    rec = res["runs"][0]
    spot = [i for i in rec["images"] if i["defect_type"] == "spot"][:2]
    out = predict_to_folder(tmp_path / "models", [i["path"] for i in spot], out=tmp_path / "pred")
    assert out["image_shape"] == [H, 64]
    np.testing.assert_allclose([i["score"] for i in out["images"]], [i["score"] for i in spot], rtol=1e-4)
    heat = np.asarray(Image.open(tmp_path / "pred" / out["images"][0]["heatmap"]))
    assert heat.shape[:2] == (H, 64)
