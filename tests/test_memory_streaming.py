"""Large sets are processed a chunk at a time (issue 18, item 4): the chunked paths give the values of the whole-set
computations, and the whole-set intermediates are not built. No memory thresholds here (benchmarks/bench_memory.py
measures the peaks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import engine.components.features as feats
from engine import metrics, registry
from engine.api import ImageSet
from engine.cache import Cache
from engine.components.anomaly_map import gather_positions, resize_and_concat, to_pixel_map
from engine.components.gaussian import gaussian_fit, gaussian_fit_chunks


def _images(n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(images=torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8))


def test_gather_positions_gives_the_rows_and_the_sums_of_the_whole_embedding() -> None:
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(6, 5, 12, 10, generator=g), torch.randn(6, 7, 6, 5, generator=g),
          torch.randn(6, 3, 3, 3, generator=g)]
    emb = resize_and_concat(fs, mode="nearest")
    n, d, h, w = emb.shape
    whole = emb.permute(2, 3, 0, 1).reshape(h * w, n, d)
    for s, e in ((0, 7), (7, 64), (64, h * w)):
        part = gather_positions(fs, (h, w), torch.arange(s, e))
        assert torch.equal(part, whole[s:e])
        assert torch.equal(part.mean(1), whole[s:e].mean(1))  # same layout, so the same order of additions
    mean_a, prec_a = gaussian_fit(whole, shrinkage="fixed", chunk=16)
    mean_b, prec_b = gaussian_fit_chunks(h * w, d, lambda s, e: gather_positions(fs, (h, w), torch.arange(s, e)),
                                         shrinkage="fixed", chunk=16)
    assert torch.equal(mean_a, mean_b) and torch.equal(prec_a, prec_b)


@pytest.mark.parametrize("shrinkage", ["fixed", "ledoit_wolf"])
def test_the_gaussians_do_not_depend_on_the_chunk(shrinkage: str) -> None:
    """The fit's chunk only bounds its work space (8 positions by default; 64 took 4× the memory at PaDiM's peak)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 30, 12, generator=g) * torch.rand(12, generator=g)  # (P, N, D)
    fits = [gaussian_fit_chunks(37, 12, lambda s, e: x[s:e], shrinkage=shrinkage, chunk=c, packed=True)
            for c in (1, 8, 64)]
    for mean, prec in fits[1:]:
        assert torch.equal(mean, fits[0][0]) and torch.equal(prec, fits[0][1])


def test_packed_precisions_score_as_the_full_ones() -> None:
    """PaDiM's precisions kept as triangles (half the memory) give the full matrices back to the bit, and the
    distances scored a chunk of positions at a time equal the whole-set `mahalanobis`."""
    from engine.components.gaussian import mahalanobis, mahalanobis_chunks, pack_symmetric, unpack_symmetric

    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 25, 9, generator=g) * torch.rand(9, generator=g)  # (P, N, D)
    mean, full = gaussian_fit(x, shrinkage="fixed", chunk=8)
    _, packed = gaussian_fit_chunks(37, 9, lambda s, e: x[s:e], shrinkage="fixed", chunk=8, packed=True)
    assert packed.shape == (37, 45) and torch.equal(full, full.mT)
    assert torch.equal(unpack_symmetric(packed, 9), full) and torch.equal(pack_symmetric(full), packed)
    test = torch.randn(11, 37, 9, generator=g)  # (B, P, D)
    whole = mahalanobis(test, mean, full)
    for chunk in (1, 5, 64):
        part = mahalanobis_chunks(37, lambda s, e: test.transpose(0, 1)[s:e], mean, packed, chunk=chunk)
        assert torch.equal(part, whole)
    diff = (test - mean).double()
    reference = torch.einsum("bpd,pde,bpe->bp", diff, full.double(), diff).sqrt()
    assert torch.allclose(whole.double(), reference, rtol=1e-4)


def test_padim_reads_a_model_saved_with_full_precisions(sample_brick, tmp_path) -> None:
    from engine.cache import load_tensors, save_tensors
    from engine.components.gaussian import unpack_symmetric
    from engine.registry import create

    train, test = sample_brick
    m = create("padim", preset="test")
    m.fit(train)
    m.save(tmp_path)
    state = load_tensors(tmp_path / "state.safetensors")
    assert state["precision"].dim() == 2
    state["precision"] = unpack_symmetric(state["precision"], state["mean"].shape[1])  # the earlier format
    save_tensors(state, tmp_path / "state.safetensors")
    old = create("padim").load(tmp_path)
    assert torch.equal(old.precision_, m.precision_)
    assert torch.equal(old.predict(test).scores, m.predict(test).scores)


def test_patch_rows_equal_the_whole_map_and_are_built_a_chunk_at_a_time(monkeypatch) -> None:
    images = _images(7)
    layers = ("blocks.2", "blocks.4")
    whole = feats.patch_features(images, layers, patch_size=3)
    seen = []
    real = feats._locally_aware
    monkeypatch.setattr(feats, "_locally_aware", lambda f, *a: seen.append(f[0].shape[0]) or real(f, *a))
    rows, (h, w) = feats.patch_rows(images, layers, patch_size=3, chunk=3)
    assert seen == [3, 3, 1]
    assert (h, w) == tuple(whole.shape[-2:])
    assert torch.equal(rows, whole.permute(0, 2, 3, 1).reshape(-1, whole.shape[1]))


def test_patchcore_and_padim_never_embed_the_whole_set(monkeypatch) -> None:
    train, test = _images(40, 1), _images(35, 2)
    seen = []
    real = feats._locally_aware
    monkeypatch.setattr(feats, "_locally_aware", lambda f, *a: seen.append(f[0].shape[0]) or real(f, *a))
    registry.create("patchcore", preset="test").fit(train).predict(test)
    assert seen and max(seen) <= 32, seen

    import engine.components.anomaly_map as anomaly_map
    import engine.methods.memory_bank.padim as padim

    def whole(*a, **k):
        raise AssertionError("PaDiM built a whole embedding")

    det = registry.create("padim", preset="test")
    monkeypatch.setattr(anomaly_map, "resize_and_concat", whole)
    assert not hasattr(padim, "resize_and_concat")  # fit and predict gather a chunk of positions at a time
    det.fit(train)
    assert det.predict(test).maps.shape == (35, 40, 48)


def test_to_pixel_map_in_chunks_equals_one_pass() -> None:
    p = torch.rand(9, 5, 6, generator=torch.Generator().manual_seed(3))
    one = to_pixel_map(p, (40, 48), 2.0, chunk=100)
    assert one.dtype == torch.float32 and one.shape == (9, 40, 48)
    torch.testing.assert_close(to_pixel_map(p, (40, 48), 2.0, chunk=2), one, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block", [1, 5, 97])
def test_pro_curve_in_blocks_is_the_same_curve(monkeypatch, block: int) -> None:
    rng = np.random.default_rng(block)
    maps = np.round(rng.random((4, 20, 24)) * 30).astype(np.float32)  # many ties
    masks = np.zeros((4, 20, 24), np.uint8)
    masks[0, 2:6, 3:9] = masks[2, 10:18, 1:4] = masks[2, 0:2, 20:24] = 1
    maps += masks * 8
    m, g = metrics._check_pixels(maps, masks, None)
    fpr, pro = metrics._pro_curve(m, g)
    monkeypatch.setattr(metrics, "_BLOCK", block)
    fpr_b, pro_b = metrics._pro_curve(m, g)
    assert np.array_equal(fpr, fpr_b) and np.array_equal(pro, pro_b)
    cut_f, cut_p = metrics._pro_curve(m, g, fpr_limit=0.3)
    assert cut_f[-1] >= 0.3 and (cut_f[:-1] < 0.3).all()
    assert np.array_equal(cut_f, fpr[:cut_f.shape[0]]) and np.array_equal(cut_p, pro[:cut_p.shape[0]])
    assert metrics._area_to_limit(cut_f, cut_p, 0.3) == metrics._area_to_limit(fpr, pro, 0.3)


def test_features_with_a_disk_copy_leave_memory_first_and_are_read_back(tmp_path, monkeypatch) -> None:
    feats.clear_memory_cache()
    monkeypatch.setattr(feats._memory, "spill", 1)  # keep only the newest entry that the disk also holds
    calls = []
    real = feats.run_backbone
    monkeypatch.setattr(feats, "run_backbone", lambda *a, **k: calls.append(1) or real(*a, **k))
    images, layers = _images(3), ("blocks.1", "blocks.2", "blocks.4")
    a = feats.extract_features(images, layers, cache=Cache(tmp_path / "on"))
    assert len(feats._memory.keys()) == 1
    b = feats.extract_features(images, layers, cache=Cache(tmp_path / "on"))
    assert calls == [1], "spilled features were recomputed instead of read from disk"
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    feats.clear_memory_cache()
    feats.extract_features(images, layers, cache=Cache(tmp_path / "off", enabled=False))
    assert len(feats._memory.keys()) == 3, "features with no disk copy must stay in memory"
    feats.clear_memory_cache()


def _recording_run(monkeypatch, methods: list[str], use_cache: bool) -> tuple[list[str], list[tuple[str, ...]], dict]:
    """run_methods on the sample brick at 64 px (preset test): the progress stages in order, the layers of every
    backbone pass, and the results."""
    from engine.runner import RunConfig, run_methods

    feats.clear_memory_cache()
    passes: list[tuple[str, ...]] = []
    real = feats.get_extractor
    monkeypatch.setattr(feats, "get_extractor",
                        lambda b, layers, *a: passes.append(tuple(layers)) or real(b, layers, *a))
    stages: list[str] = []

    def progress(method: str, stage: str, fraction: float | None, info: dict) -> None:
        if not stages or stages[-1] != f"{method}:{stage}":
            stages.append(f"{method}:{stage}")

    cfg = RunConfig(methods=methods, image_size=64, preset="test", device="cpu", use_cache=use_cache)
    res = run_methods(Path(__file__).resolve().parent.parent / "sample_data" / "brick", cfg, progress=progress)
    return stages, passes, res


def test_runner_makes_test_features_after_fit_and_drops_what_no_later_run_reads(monkeypatch) -> None:
    stages, passes, res = _recording_run(monkeypatch, ["patchcore", "padim"], use_cache=False)
    assert [r["status"] for r in res["runs"]] == ["ok", "ok"]
    pc = [s.split(":", 1)[1] for s in stages if s.startswith("patchcore:")]
    assert pc.index("features (train)") < pc.index("fit") < pc.index("features (test)") < pc.index("predict")
    # the cache is off: PaDiM (run later) reads blocks.1, so PatchCore's pass makes it beside its own layers
    assert passes and all("blocks.1" in p for p in passes)
    assert feats._memory.keys() == [], "features nobody reads any more stayed in memory"

    stages, passes, res = _recording_run(monkeypatch, ["patchcore"], use_cache=False)
    assert res["runs"][0]["status"] == "ok"
    assert passes and all("blocks.1" not in p for p in passes), "a stage no method of the run reads was computed"
    assert feats._memory.keys() == []


def test_runner_results_do_not_depend_on_what_is_dropped(monkeypatch, tmp_path) -> None:
    """Alone or after another method, with the cache on or off, a method's results are the same."""
    # Features differ in their last bits between thread counts: pin the count, and start from an empty cache so
    # no entry an earlier test made at another count is read back.
    monkeypatch.setenv("ADLAB_THREADS", "1")
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    _, _, alone = _recording_run(monkeypatch, ["padim"], use_cache=False)
    _, _, after = _recording_run(monkeypatch, ["patchcore", "padim"], use_cache=True)
    a, b = alone["runs"][0], after["runs"][1]
    assert a["metrics"] == b["metrics"]
    assert [i["score"] for i in a["images"]] == [i["score"] for i in b["images"]]


def test_padim_lets_go_of_the_test_features_before_its_maps(monkeypatch) -> None:
    """The runner hands PaDiM the test features no later run reads: they are freed inside predict, before the
    full-size maps, and nothing is computed twice; features a later run reads stay held."""
    import engine.methods.memory_bank.padim as padim

    seen: list[tuple[list[str], list[bool]]] = []
    real = padim.to_pixel_map

    def spy(*a, **k):
        seen.append((feats._memory.keys(), [r() is None for r in feats._memory.weak.values()]))
        return real(*a, **k)

    monkeypatch.setattr(padim, "to_pixel_map", spy)
    _, passes, res = _recording_run(monkeypatch, ["padim"], use_cache=False)
    assert res["runs"][0]["status"] == "ok" and len(passes) == 2, passes  # train, test: no pass made again
    held, freed = seen[-1]
    assert held == [] and len(freed) == 3 and all(freed), seen[-1]

    _, passes, res = _recording_run(monkeypatch, ["padim", "patchcore"], use_cache=False)
    assert [r["status"] for r in res["runs"]] == ["ok", "ok"] and len(passes) == 2, passes
    held, freed = seen[-1]
    assert len(held) == 4 and freed == [True], seen[-1]  # PatchCore reads blocks.2, .4 of both splits later


@pytest.mark.parametrize(("d", "chunk"), [(152, 1000), (152, 7), (152, 1), (96, 250), (300, 1000)])
def test_projection_of_chunks_is_the_projection_of_the_rows(d: int, chunk: int) -> None:
    from engine.components.coreset import coreset_projection, coreset_projection_chunks

    x = torch.randn(3001, d, generator=torch.Generator().manual_seed(d)) * torch.rand(d) * 5
    z, first = coreset_projection(x, proj_dim=128, seed=4)
    zc, first_c = coreset_projection_chunks((x[a:a + chunk] for a in range(0, 3001, chunk)), 3001, proj_dim=128,
                                            seed=4)
    assert first == first_c and torch.equal(z, zc)
    with pytest.raises(ValueError, match="rows"):
        coreset_projection_chunks(iter([x[:10]]), 11)
    bad = x[:20].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        coreset_projection_chunks(iter([bad]), 20)


def test_patchcore_bank_is_the_greedy_coreset_of_all_patch_rows() -> None:
    """The projection made a chunk of images at a time gives the bank of the stacked patch rows' coreset."""
    from engine.components.coreset import greedy_coreset

    train = _images(40, 5)
    det = registry.create("patchcore", preset="test", coreset_ratio=0.05).fit(train)
    rows, _ = feats.patch_rows(train, det.layers, patch_size=det.patch_size, pad=det.pad)
    idx = greedy_coreset(rows, det.memory_bank_.shape[0], proj_dim=det.proj_dim, seed=det.seed)
    assert torch.equal(det.memory_bank_, rows[idx])
    every = registry.create("patchcore", preset="test", coreset_ratio=1.0).fit(train)
    assert torch.equal(every.memory_bank_, rows)


def test_imageset_pixels_released_and_read_back_to_the_bit() -> None:
    import pickle

    from engine.data import discover, load_split

    ds = discover(Path(__file__).resolve().parent.parent / "sample_data" / "brick")
    s = load_split(ds, "test", 48)
    before = s.images.clone()
    assert s.release() and not s.held
    assert len(s) == before.shape[0] and s.size == (48, 48) and not s.held, "the shape must not read pixels back"
    assert torch.equal(s.images, before) and s.held
    assert not s.subset([0, 1]).release(), "a subset has no files of its own to read back"
    assert not _images(2).release(), "pixels made in memory cannot be released"
    again = pickle.loads(pickle.dumps(s))  # a set crosses to worker processes
    assert again.release() and torch.equal(again.images, before)
    assert again.release() and torch.equal(again.rows(3, 7), before[3:7]) and not again.held, "rows: not kept"
    assert torch.equal(again.rows(len(before) - 2, len(before) + 5), before[-2:])
    assert torch.equal(s.rows(1, 4), before[1:4]), "held pixels: a slice"
    bad = ImageSet(images=before[:2], reload=lambda rows=None: before[:1])
    bad.release()
    with pytest.raises(RuntimeError, match="changed during the run"):
        _ = bad.images
    with pytest.raises(RuntimeError, match="changed during the run"):
        bad.rows(0, 2)


def test_runner_releases_pixels_only_when_no_run_reads_them(monkeypatch) -> None:
    """PatchCore alone fits without the images held; before a trained method they stay; the results are the same."""
    from engine import runner

    monkeypatch.setenv("ADLAB_THREADS", "1")  # otherwise other adlab jobs on the machine change the count between runs
    held_at_fit: dict[str, list[bool]] = {}
    held_in_pass: dict[str, set[bool]] = {}
    real = runner.RunConfig

    def progress_probe(method: str, stage: str, fraction: float | None, info: dict) -> None:
        if stage == "fit" and method not in held_at_fit:
            held_at_fit[method] = [s.held for s in runner._split_cache.values()]
        if stage.startswith("features") and fraction is not None and fraction > 0:  # within a backbone pass
            held_in_pass.setdefault(method, set()).update(s.held for s in runner._split_cache.values())

    def run(methods: list[str]) -> dict:
        runner._split_cache.clear()
        cfg = real(methods=methods, image_size=64, preset="test", device="cpu", use_cache=False)
        return runner.run_methods(Path(__file__).resolve().parent.parent / "sample_data" / "brick", cfg,
                                  progress=progress_probe)

    alone = run(["padim"])
    assert held_at_fit.pop("padim") == [False, False]
    assert held_in_pass.pop("padim") == {False}, "the passes read their batches from the files"
    before_trained = run(["padim", "fastflow"])
    assert held_at_fit["padim"] == [True, True]
    a, b = alone["runs"][0], before_trained["runs"][0]
    assert a["metrics"] == b["metrics"]
    assert [i["score"] for i in a["images"]] == [i["score"] for i in b["images"]]


def test_the_cpu_inference_batch_shrinks_with_the_image_area() -> None:
    from engine.device import CPU_BATCH_PIXELS, batch_size

    assert batch_size("cpu") == 16 and batch_size("cuda:0", image_shape=(8, 3, 512, 512)) == 128
    assert batch_size("cpu", image_shape=(40, 3, 64, 64)) == 16  # small images: the cap
    assert batch_size("cpu", image_shape=(40, 3, 128, 128)) == CPU_BATCH_PIXELS // 128**2 == 16
    assert batch_size("cpu", image_shape=(40, 3, 256, 256)) == 4
    assert batch_size("cpu", image_shape=(40, 3, 288, 256)) == 3
    assert batch_size("cpu", image_shape=(2, 3, 2048, 2048)) == 2  # never below two
    assert batch_size("cpu", cpu=1, image_shape=(2, 3, 2048, 2048)) == 1
