"""Reliability and security: hostile uploads, faults during a run, untrusted cache artefacts, resource limits.

Complements tests/test_data.py (zip slip, symlinks, ratio bombs, nested archives, duplicates, non-UTF-8 names,
image modes, masks), tests/test_data_fuzz.py (random archives and layouts) and tests/test_engine.py (a method that
raises or returns NaN, corrupt cache entries). Each test here covers a case those do not.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine import registry
from engine.api import DataValidationError, ImageSet, Prediction
from engine.cache import Cache
from engine.components import features as feats
from engine.data import DEFAULT_LIMITS, Dataset, Limits, discover, extract_zip, load_split, make_synthetic_dataset
from engine.methods.base import BaseDetector
from engine.runner import Cancelled, RunConfig, load_prediction, run_methods

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVTec-layout dataset (64 px): 8 train, 4 good + 3 per defect type in test."""
    root = tmp_path_factory.mktemp("data")
    return make_synthetic_dataset(root, "brick", n_train=8, n_test_good=4, n_defect_per_type=3, size=64)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ADLAB_CACHE for this test, with the in-process feature memory emptied (so counts are exact)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("ADLAB_CACHE", str(d))
    feats.clear_memory_cache()
    yield d
    feats.clear_memory_cache()


@pytest.fixture
def counters(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Counts fits (per detector class) and backbone passes in this process."""
    seen: dict[str, list[str]] = {"fit": [], "backbone": []}
    real_fit, real_bb = BaseDetector.fit, feats.run_backbone

    def fit(self: BaseDetector, *a: Any, **k: Any) -> BaseDetector:
        seen["fit"].append(self.method_name)
        return real_fit(self, *a, **k)

    def backbone(ext: Any, images: torch.Tensor, *a: Any, **k: Any) -> list[torch.Tensor]:
        seen["backbone"].append(str(images.shape[0]))
        return real_bb(ext, images, *a, **k)

    monkeypatch.setattr(BaseDetector, "fit", fit)
    monkeypatch.setattr(feats, "run_backbone", backbone)
    return seen


def _zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


def _img_bytes(size: tuple[int, int] = (16, 16), mode: str = "RGB", value: Any = (90, 80, 70),
               fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format=fmt)
    return buf.getvalue()


def _noise_bytes(fmt: str, size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.merge("RGB", [Image.effect_noise((size, size), 60 + 10 * i) for i in range(3)]).save(buf, format=fmt)
    return buf.getvalue()


def _layout(prefix: str = "") -> list[tuple[str, bytes]]:
    """A minimal valid MVTec layout as zip entries."""
    return [(f"{prefix}train/good/a.png", _img_bytes(value=(1, 2, 3))),
            (f"{prefix}train/good/b.png", _img_bytes(value=(4, 5, 6))),
            (f"{prefix}test/good/c.png", _img_bytes(value=(7, 8, 9))),
            (f"{prefix}test/crack/d.png", _img_bytes(value=(200, 0, 0)))]


def _problems(exc: pytest.ExceptionInfo[DataValidationError]) -> list[tuple[str, str, str]]:
    assert exc.value.problems
    return [(p.path, p.message, p.hint) for p in exc.value.problems]


def _has(exc: pytest.ExceptionInfo[DataValidationError], where: str, what: str) -> bool:
    return any(where in p and what.lower() in m.lower() for p, m, _ in _problems(exc))


def _png_header_only(w: int, h: int) -> bytes:
    """A ~100-byte PNG that claims w x h pixels (a decompression bomb's header): only a few rows of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


# ------------------------------------------------------------------------------------------------ uploads


def test_one_pixel_images_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    """Decision: an image smaller than Limits.min_side_px (8) is an error, not silently upscaled: a 1x1 file holds
    one colour, so any score on it would be invented. The limit is a setting."""
    z = _zip(tmp_path / "up.zip", [*_layout(), ("train/good/dot.png", _img_bytes((1, 1))),
                                   ("test/crack/line.png", _img_bytes((64, 4)))])
    lim = Limits(extract_root=str(tmp_path / "uploads"))
    with pytest.raises(DataValidationError) as exc:
        discover(z, limits=lim)
    assert _has(exc, "dot.png", "only 1x1 px, smaller than the minimum of 8 px")
    assert _has(exc, "line.png", "only 64x4 px")
    assert all("min_side_px" in h for p, _, h in _problems(exc))
    assert len(_problems(exc)) == 2
    ds = discover(z, limits=Limits(extract_root=str(tmp_path / "uploads"), min_side_px=1))  # explicitly allowed
    assert ds.n_train == 3
    assert load_split(ds, "train", 32).images.shape == (3, 3, 32, 32)  # then upscaled like any small image
    assert DEFAULT_LIMITS.min_side_px == 8


@pytest.mark.parametrize(("size", "what"), [((20000, 20000), "too large"), ((8000, 6000), "48,000,000 pixels")])
def test_decompression_bomb_header_refused_without_decoding(tmp_path: Path, size: tuple[int, int],
                                                            what: str) -> None:
    """A 100-byte PNG claiming 20000x20000 px (400 MP; 400 MB to decode) or 8000x6000 px, uploaded in a zip with
    default limits: refused from its header alone, fast, nothing decoded."""
    z = _zip(tmp_path / "up.zip", [*_layout(), ("train/good/bomb.png", _png_header_only(*size))])
    t0 = time.perf_counter()
    with pytest.raises(DataValidationError) as exc:
        discover(z, limits=Limits(extract_root=str(tmp_path / "uploads")))
    assert time.perf_counter() - t0 < 10
    assert _has(exc, "bomb.png", "too large") and _has(exc, "bomb.png", what)
    assert [h for p, _, h in _problems(exc) if "bomb.png" in p] == ["downscale it or raise Limits.max_image_pixels"]


def test_truncated_and_corrupt_jpeg_and_png(tmp_path: Path) -> None:
    """test_data covers a truncated PNG, an empty file and text named .png; here: JPEGs cut short or with a broken
    header, and a PNG whose data fails its checksum."""
    jpg, png_ = _noise_bytes("JPEG"), _noise_bytes("PNG")
    bad_crc = bytearray(png_)
    at = bad_crc.find(b"IDAT") + 20
    bad_crc[at] ^= 0xFF
    bad_header = bytearray(jpg)
    sof = bad_header.find(b"\xff\xc0")
    bad_header[sof + 5:sof + 9] = b"\0\0\0\0"  # zero height and width in the frame header
    z = _zip(tmp_path / "up.zip", [*_layout(), ("train/good/half.jpg", jpg[: len(jpg) // 2]),
                                   ("train/good/head.jpg", jpg[:200]), ("test/good/crc.png", bytes(bad_crc)),
                                   ("test/crack/sof.jpg", bytes(bad_header)), ("test/crack/fine.jpg", jpg)])
    with pytest.raises(DataValidationError) as exc:
        discover(z, limits=Limits(extract_root=str(tmp_path / "uploads")))
    found = {Path(p).name: m for p, m, _ in _problems(exc)}
    assert set(found) == {"half.jpg", "head.jpg", "crc.png", "sof.jpg"}, found  # fine.jpg is fine
    assert found["half.jpg"].startswith("corrupt or truncated image (image file is truncated")
    assert found["head.jpg"].startswith("not a readable image")
    assert found["crc.png"].startswith("corrupt or truncated image")
    assert found["sof.jpg"].startswith("not an image file")  # a JPEG frame of 0x0 px is not an image at all


def test_zip_entry_lying_about_its_size_is_stopped(tmp_path: Path) -> None:
    """A bomb whose headers declare 1000 bytes while the data inflates to 20 MB passes the ratio check (it looks
    small); extraction stops at the declared size, the entry is refused and nothing stays on disk."""
    z = _zip(tmp_path / "up.zip", [*_layout(), ("train/good/liar.bmp", bytes(20 * 2**20))])
    raw = bytearray(z.read_bytes())
    i = raw.find(b"PK\x03\x04", raw.find(b"liar.bmp") - 60)
    struct.pack_into("<I", raw, i + 22, 1000)  # local header: uncompressed size
    j = raw.find(b"PK\x01\x02", raw.rfind(b"liar.bmp") - 60)
    struct.pack_into("<I", raw, j + 24, 1000)  # central directory: uncompressed size
    z.write_bytes(bytes(raw))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DataValidationError) as exc:
        extract_zip(z, work / "dest", Limits())
    assert _has(exc, "liar.bmp", "damaged") or _has(exc, "liar.bmp", "beyond its declared size")
    assert not any(work.iterdir())  # no dest, no temporary folder


def test_zip_of_many_folder_entries_is_refused(tmp_path: Path) -> None:
    """max_files also bounds folder entries: 200 000 empty folders cost inodes while holding no file at all."""
    z = _zip(tmp_path / "up.zip", [*_layout(), *((f"train/x{i}/", b"") for i in range(60))])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DataValidationError) as exc:
        extract_zip(z, work / "dest", Limits(max_files=50))
    assert _has(exc, "up.zip", "60 folder entries, more than the limit of 50")
    assert not any(work.iterdir())
    assert extract_zip(z, work / "ok", Limits(max_files=100)).is_dir()


def test_duplicate_names_differing_only_in_case(tmp_path: Path) -> None:
    """Identical duplicates are in test_data; names differing in case would overwrite each other on a
    case-insensitive disk and make image/mask matching ambiguous."""
    z = _zip(tmp_path / "up.zip", [*_layout(), ("train/good/Z.png", _img_bytes()), ("train/good/z.png", _img_bytes()),
                                   ("Test/crack/d.png", _img_bytes())])
    with pytest.raises(DataValidationError) as exc:
        extract_zip(z, tmp_path / "dest", Limits())
    assert _has(exc, "train/good/z.png", "duplicate") and _has(exc, "Test/crack/d.png", "duplicate")
    assert not (tmp_path / "dest").exists()


def test_hostile_upload_through_dashboard_writes_nothing_outside_its_folder(cache_dir: Path) -> None:
    from dashboard import services

    link = zipfile.ZipInfo("train/good/link.png")
    link.create_system, link.external_attr = 3, (0o120777 << 16)  # a symlink entry
    data = _zip(cache_dir.parent / "evil.zip", [*_layout(), ("../../escaped.png", _img_bytes()),
                                                ("/tmp/adlab-abs-escape.png", _img_bytes()), (link, b"/etc/passwd"),
                                                ("inner/x.zip", b"PK\x05\x06" + bytes(18))]).read_bytes()
    with pytest.raises(services.DataProblems) as exc:
        services.save_upload("evil.zip", data)
    msgs = " | ".join(f"{p}: {m}" for p, m, _ in exc.value.problems)
    for what in ("would escape", "absolute path", "symbolic link", "nested archive"):
        assert what in msgs, msgs
    assert _files_under(cache_dir) == set()  # the stored zip was removed again; nothing was extracted
    assert not (cache_dir.parent / "escaped.png").exists() and not Path("/tmp/adlab-abs-escape.png").exists()
    good = services.save_upload("ok.zip", _zip(cache_dir.parent / "ok.zip", _layout("cat/")).read_bytes())
    assert Path(good.path).is_relative_to(cache_dir / "uploads") and good.n_train == 2
    assert all(f.startswith("uploads/") for f in _files_under(cache_dir))


def test_limits_are_settings_with_sane_defaults() -> None:
    from dashboard import services

    d = DEFAULT_LIMITS
    assert 1000 <= d.max_files <= 100_000 and 1000 <= d.max_images <= 100_000
    assert 256 <= d.max_total_uncompressed_mb <= 16_384 and 20 <= d.max_ratio <= 1000
    assert 4096**2 <= d.max_image_pixels <= 100_000_000 and 1024 <= d.max_side_px <= 16_384
    assert 1 <= d.min_side_px <= 32
    assert services.UPLOAD_LIMITS == d and services.MAX_CONCURRENT_JOBS >= 1
    assert "files" in services.upload_limits_text()
    with pytest.raises(AttributeError):  # frozen: one session cannot loosen the limits of another
        d.max_files = 10**9  # type: ignore[misc]


# --- fuzzing images inside a valid layout (test_data_fuzz varies archive entries and names) ------------------------

_FORMATS = [(".png", "RGB"), (".png", "L"), (".png", "RGBA"), (".png", "LA"), (".png", "P"), (".png", "I;16"),
            (".png", "1"), (".jpg", "RGB"), (".jpg", "L"), (".jpg", "CMYK"), (".tif", "CMYK"), (".tif", "F"),
            (".tif", "I;16"), (".bmp", "P"), (".bmp", "RGB")]
_VALUE = {"RGB": (120, 30, 200), "L": 77, "RGBA": (10, 200, 30, 128), "LA": (90, 0), "P": 3, "I;16": 40000,
          "1": 1, "CMYK": (10, 20, 30, 40), "F": 0.25}
_FMT = {".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF", ".bmp": "BMP"}
_SIDES = st.sampled_from([8, 9, 16, 33])
_TINY = [(1, 1), (3, 16), (33, 1)]  # refused: below Limits.min_side_px


@st.composite
def _image(draw: st.DrawFn) -> tuple[str, bytes, tuple[int, int]]:
    ext, mode = draw(st.sampled_from(_FORMATS))
    size = draw(st.sampled_from(_TINY)) if draw(st.integers(0, 15)) == 0 else (draw(_SIDES), draw(_SIDES))
    buf = io.BytesIO()
    Image.new(mode, size, _VALUE[mode]).save(buf, format=_FMT[ext])
    data = buf.getvalue()
    damage = draw(st.sampled_from(["none"] * 12 + ["cut", "flip", "text"]))
    if damage == "cut":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "flip":
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
    elif damage == "text":
        data = b"hello, not an image"
    return ext, data, size


@st.composite
def _mask(draw: st.DrawFn, size: tuple[int, int]) -> bytes:
    if draw(st.integers(0, 4)) == 0:  # sometimes the wrong size
        size = draw(st.sampled_from([(draw(_SIDES), draw(_SIDES)), *_TINY]))
    values = draw(st.sampled_from([(0, 255), (0, 1), (0, 128, 255), (0,), (0, 65535)]))
    a = np.asarray(values)[np.arange(size[0] * size[1]) % len(values)].reshape(size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint16 if max(values) > 255 else np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def _dataset_zip(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    top = draw(st.sampled_from(["", "cat/"]))
    entries: list[tuple[str, bytes]] = []
    for folder, n in (("train/good", draw(st.integers(1, 3))), ("test/good", draw(st.integers(0, 2))),
                      ("test/crack", draw(st.integers(1, 2)))):
        for i in range(n):
            ext, data, size = draw(_image())
            entries.append((f"{top}{folder}/{i:03d}{ext}", data))
            if folder == "test/crack" and draw(st.booleans()):
                entries.append((f"{top}ground_truth/crack/{i:03d}_mask.png", draw(_mask(size))))
    return entries


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(entries=_dataset_zip())
def test_fuzz_image_contents_discover_then_load(entries: list[tuple[str, bytes]]) -> None:
    """Any mix of formats, modes (16-bit, palette, CMYK, RGBA, float, 1-bit), sizes (1 px to 33 px), damaged
    bytes and masks of any size and values: discover() refuses with specific messages, or accepts a dataset that
    then loads without error (what passes validation is usable)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        z = _zip(root / "up.zip", entries)
        lim = Limits(extract_root=str(root / "uploads"))
        try:
            ds = discover(z, limits=lim)
        except DataValidationError as e:
            assert all(p.message and p.path.startswith("up.zip") for p in e.problems), e.problems
        else:
            assert isinstance(ds, Dataset)
            for split in ("train", "test"):
                s = load_split(ds, split, 32)
                assert s.images.shape == (len(ds.split(split)), 3, 32, 32) and s.images.dtype == torch.uint8
                if s.masks is not None:
                    assert set(s.masks.unique().tolist()) <= {0, 1}
        assert _files_under(root) - {"up.zip"} <= {f for f in _files_under(root) if f.startswith("uploads/")}


# ------------------------------------------------------------------------------------------------ faults


_HOOK: dict[str, Any] = {}


class _OutOfMemory(BaseDetector):
    def __init__(self, seed: int = 0):
        self.seed = seed

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class _CancelsItself(BaseDetector):
    """Asks for cancellation half-way through its fit (as the Cancel button would), then reports progress."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Any) -> None:
        _HOOK["cancel"]()
        progress("fit", 0.5)  # the runner checks the cancel event here
        raise AssertionError("not reached: cancellation must stop the fit")

    def _predict(self, images: ImageSet) -> Prediction:
        return Prediction(scores=torch.zeros(len(images)))


@pytest.fixture
def fake_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.available()
    reg = dict(registry._REGISTRY)
    for name, cls in (("oom", _OutOfMemory), ("cancels_itself", _CancelsItself)):
        reg[name] = registry.MethodInfo(name=name, family="memory_bank", localises=False, supervision="none",
                                        paper="test", summary="test", uses_backbone=False, factory=cls)
        monkeypatch.setattr(cls, "method_name", name, raising=False)
    monkeypatch.setattr(registry, "_REGISTRY", reg)


def test_out_of_memory_fails_that_method_only(tiny: Path, cache_dir: Path, fake_methods: None,
                                              counters: dict[str, list[str]]) -> None:
    first = run_methods(tiny, RunConfig(methods=["padim", "oom", "patchcore"], image_size=64))
    by = {r["method"]: r for r in first["runs"]}
    assert by["oom"]["status"] == "failed" and by["oom"]["error"].startswith("out of memory (OutOfMemoryError)")
    assert "smaller image size" in by["oom"]["error"]
    assert by["padim"]["status"] == by["patchcore"]["status"] == "ok"
    assert counters["fit"] == ["padim", "oom", "patchcore"]
    counters["fit"].clear()
    second = run_methods(tiny, RunConfig(methods=["padim", "oom", "patchcore"], image_size=64))
    assert counters["fit"] == ["oom"]  # only the failed method is tried again
    assert [r["cached"] for r in second["runs"]] == [True, False, True]
    assert [r["metrics"] for r in second["runs"]] == [r["metrics"] for r in first["runs"]]


def test_cancel_after_first_method_keeps_it_and_next_run_computes_only_the_rest(
        tiny: Path, cache_dir: Path, counters: dict[str, list[str]]) -> None:
    cancel = threading.Event()
    kept: list[dict[str, Any]] = []

    def progress(method: str, stage: str, fraction: float | None, info: dict[str, Any]) -> None:
        if method == "padim" and stage == "done":
            cancel.set()  # the user presses Cancel right after the first method finished

    cfg = RunConfig(methods=["padim", "patchcore"], image_size=64)
    with pytest.raises(Cancelled, match="cancelled"):
        run_methods(tiny, cfg, progress=progress, cancel=cancel, on_result=kept.append)
    assert [r["method"] for r in kept] == ["padim"] and kept[0]["status"] == "ok"
    assert counters["fit"] == ["padim"]
    assert load_prediction(kept[0]) is not None  # its predictions are in the cache
    n_passes = len(counters["backbone"])
    counters["fit"].clear()
    res = run_methods(tiny, cfg)
    assert counters["fit"] == ["patchcore"] and len(counters["backbone"]) == n_passes  # features reused too
    assert [r["cached"] for r in res["runs"]] == [True, False]
    assert res["runs"][0]["metrics"] == kept[0]["metrics"]


def _kill_child(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


_HOLD_AND_WAIT = """
import sys, time
from pathlib import Path
from engine.cache import Cache
c = Cache(sys.argv[1])
with c.lock("features", "k1"), c.writing("features", "k1") as tmp:
    (tmp / "tensors.safetensors").write_bytes(b"\\0" * 100)   # half-written
    Path(sys.argv[2]).touch()
    time.sleep(120)
"""


def test_sigkill_during_cache_write_leaves_no_entry_and_no_stuck_lock(tmp_path: Path) -> None:
    root, ready = tmp_path / "cache", tmp_path / "ready"
    child = _kill_child(_HOLD_AND_WAIT, str(root), str(ready))
    t0 = time.time()
    while not ready.exists():
        assert child.poll() is None, child.communicate()[0].decode()
        assert time.time() - t0 < 60
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL
    c = Cache(root)
    leftovers = list(root.glob("features/*/.tmp-*"))
    assert len(leftovers) == 1
    assert not c.has("features", "k1") and c.load("features", "k1") is None  # the half entry is invisible
    assert c.sweep_temporaries() == 0  # too fresh: it could belong to a live writer
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(r=c.get_or_compute(
        "features", "k1", lambda: ({"f": torch.ones(3)}, {"n": 1}))))
    t.start()
    t.join(30)
    assert not t.is_alive(), "the dead writer's lock is still held"
    tensors, meta, cached = out["r"]
    assert not cached and meta == {"n": 1} and torch.equal(tensors["f"], torch.ones(3))
    assert c.load("features", "k1") is not None
    assert c.sweep_temporaries(older_than_s=0) == 1 and not list(root.glob("features/*/.tmp-*"))


def test_sweep_removes_only_stale_leftovers_of_killed_writers(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    stale = [root / "features/ab/.tmp-x1", root / "uploads/.0123.partial-abc", root / "uploads/incoming/0123/.tmp-z"]
    fresh = root / "runs/cd/.tmp-live"
    for d in [*stale, fresh]:
        d.mkdir(parents=True)
        (d / "half").write_bytes(b"...")
    results_tmp = root / "dashboard/results/.tmp-r"
    results_tmp.parent.mkdir(parents=True)
    results_tmp.write_text("{")
    keep = [root / "uploads/0123/train/good/a.png", root / "dashboard/results/0123.json"]
    for f in keep:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    old = time.time() - 7200
    for p in [*stale, results_tmp]:
        os.utime(p, (old, old))
    assert Cache(root).sweep_temporaries() == 4
    assert not any(p.exists() for p in [*stale, results_tmp])
    assert fresh.exists() and all(f.exists() for f in keep)


_KILLED_RUN = """
import os, sys
from engine.cache import Cache
from engine.runner import RunConfig, run_methods
real_store = Cache.store
def store(self, kind, key, tensors, meta=None):
    if kind == "predictions" and (meta or {}).get("method") == "padim":
        with self.writing(kind, key) as tmp:
            (tmp / "tensors.safetensors").write_bytes(b"half a tensor file")
            os._exit(137)  # killed mid-write: no finally, no cleanup
    return real_store(self, kind, key, tensors, meta)
Cache.store = store
run_methods(sys.argv[1], RunConfig(methods=["patchcore", "padim"], image_size=64))
"""


def test_process_killed_mid_run_then_next_run_recomputes_only_what_is_missing(
        tiny: Path, cache_dir: Path, counters: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.cache as ec

    child = _kill_child(_KILLED_RUN, str(tiny), env={"ADLAB_CACHE": str(cache_dir)})
    out = child.communicate(timeout=120)[0].decode()
    assert child.returncode == 137, out
    leftovers = list(cache_dir.glob("predictions/*/.tmp-*"))
    assert len(leftovers) == 1 and len(list(cache_dir.glob("runs/*/*"))) == 1  # patchcore finished, padim did not
    res = run_methods(tiny, RunConfig(methods=["patchcore", "padim"], image_size=64))
    assert [r["status"] for r in res["runs"]] == ["ok", "ok"]
    assert [r["cached"] for r in res["runs"]] == [True, False]
    assert counters["fit"] == ["padim"] and counters["backbone"] == []  # features written before the kill are reused
    assert leftovers[0].exists()  # ignored, not trusted...
    old = time.time() - 7200
    os.utime(leftovers[0], (old, old))
    monkeypatch.setattr(ec, "_default", None)
    ec.default_cache()  # ...and swept when a process opens the cache (here: an hour later)
    assert not leftovers[0].exists()


def test_dashboard_records_failed_and_cancelled_runs_with_their_message(
        tiny: Path, cache_dir: Path, fake_methods: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboard import services

    jm = services.JobManager(max_running=1, isolation="thread")  # fake methods live in this process
    monkeypatch.setattr(services.jobs, "job_manager", lambda: jm)

    def wait(job: services.Job) -> None:
        t0 = time.time()
        while job.active and time.time() - t0 < 60:
            time.sleep(0.02)
        assert not job.active

    job = jm.submit("s1", str(tiny), RunConfig(methods=["oom", "padim"], image_size=64))
    wait(job)
    view = services.job_view(job)
    assert view["state"] == "done"
    rows = {r["method"]: r for r in view["rows"]}
    assert rows["oom"]["status"] == "failed" and rows["oom"]["error"].startswith("out of memory")
    assert rows["padim"]["status"] == "ok"
    stored = {r["method"]: r for r in services.latest_results(job.digest)["runs"]}
    assert stored["oom"]["error"].startswith("out of memory") and stored["padim"]["status"] == "ok"

    _HOOK["cancel"] = lambda: jm.cancel("s1")
    job = jm.submit("s1", str(tiny), RunConfig(methods=["padim", "cancels_itself"], image_size=64))
    wait(job)
    view = services.job_view(job)
    assert view["state"] == "cancelled"
    assert view["error"] == "cancelled by the user: 1 of 2 method(s) had finished and are kept"
    rows = {r["method"]: r for r in view["rows"]}
    assert rows["padim"]["status"] == "ok" and rows["padim"]["cached"]
    assert rows["cancels_itself"]["status"] == "cancelled" and "cancelled" in rows["cancels_itself"]["label"]
    assert {r["method"] for r in services.ok_runs(services.latest_results(job.digest))} == {"padim"}


# ------------------------------------------------------------------------------------------------ untrusted artefacts


_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib", "jsonpickle"}


def _unsafe_calls(source: str, filename: str) -> list[str]:
    """Deserialisation or code execution of untrusted data in one module: pickle-family imports, eval/exec,
    torch.load without weights_only=True, np.load(allow_pickle=True), pandas read_pickle, torch.jit.load,
    yaml.load/unsafe_load."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where} imports {m}" for m in mods if m.split(".")[0] in _UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile"):
            found.append(f"{where} calls {f.id}()")
        if isinstance(f, ast.Name) and f.id == "__import__" and not all(isinstance(a, ast.Constant) for a in node.args):
            found.append(f"{where} imports a module named at run time")
        if isinstance(f, ast.Attribute):
            owner = ast.unparse(f.value)
            if f.attr == "load" and owner == "torch":
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    found.append(f"{where} calls torch.load without weights_only=True")
            if f.attr == "load" and owner in ("np", "numpy"):
                a = kw.get("allow_pickle")
                if not (a is None or (isinstance(a, ast.Constant) and a.value is False)):
                    found.append(f"{where} calls np.load with allow_pickle")
            if f.attr in ("read_pickle", "unsafe_load") or (f.attr == "load" and owner in ("yaml", "torch.jit")):
                found.append(f"{where} calls {owner}.{f.attr}")
    return found


_GREP = re.compile(r"^\s*(import\s+(c?pickle|dill|shelve|marshal)|from\s+(c?pickle|dill)\s+import)|"
                   r"(?<![\w.])(eval|exec)\(|torch\.load\((?!.*weights_only=True)", re.M)


def test_source_tree_never_unpickles_or_evaluates() -> None:
    files = [p for d in ("engine", "dashboard", "pages") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    found = [hit for p in files for hit in _unsafe_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], "unsafe deserialisation or evaluation:\n" + "\n".join(found)
    # A plain grep as a second net (comments and docstrings may mention pickle; code may not use it).
    grep = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in _GREP.finditer(p.read_text())]
    assert grep == [], grep


def test_unsafe_call_checker_is_not_vacuous() -> None:
    bad = ("import pickle\nfrom dill import loads\neval('1')\nexec('x=1')\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\npd.read_pickle(p)\nyaml.load(s)\n"
           "__import__(name)\n")
    assert len(_unsafe_calls(bad, "x.py")) == 10
    ok = ("model.eval()\ntorch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\nimport json\n"
          "__import__('threading')\n")
    assert _unsafe_calls(ok, "y.py") == []
    assert len(_GREP.findall(bad)) == 6 and _GREP.findall(ok) == []  # pickle, eval, exec, 2 torch.load; dill


class _Payload:
    """Unpickling this runs os.makedirs(marker): proof that a pickle would execute code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.makedirs, (self.marker,)


def test_pickle_payload_in_cache_is_refused_never_executed_and_recomputed(
        tiny: Path, cache_dir: Path, counters: dict[str, list[str]], tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.is_dir()  # the payload is live: loading it with pickle runs code
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker))

    cfg = RunConfig(methods=["padim"], image_size=64)
    first = run_methods(tiny, cfg)
    assert counters["fit"] == ["padim"] and len(counters["backbone"]) == 2
    replaced = [p for kind in ("features", "predictions") for p in cache_dir.glob(f"{kind}/*/*/tensors.safetensors")]
    assert len(replaced) >= 4
    for p in replaced:
        p.write_bytes(evil)  # a hostile user of the shared machine swaps the cached tensors
    feats.clear_memory_cache()
    counters["fit"].clear()
    counters["backbone"].clear()

    second = run_methods(tiny, cfg)
    assert not marker.exists()  # never executed
    assert counters["fit"] == ["padim"] and len(counters["backbone"]) == 2  # recomputed, not trusted
    assert second["runs"][0]["status"] == "ok" and not second["runs"][0]["cached"]
    # Same numbers up to float rounding: the recomputation may get another thread count (engine.threads shares
    # the CPUs among the adlab jobs running at that moment), and parallel sums round differently.
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    assert flat(second["runs"][0]["metrics"]) == pytest.approx(flat(first["runs"][0]["metrics"]), rel=1e-4)
    pred = load_prediction(second["runs"][0])
    assert pred is not None and pred.scores.shape == (len(second["runs"][0]["images"]),)
    assert not any(p.read_bytes() == evil for p in cache_dir.rglob("tensors.safetensors"))
    key = second["runs"][0]["cache_key"]
    (Cache(cache_dir).entry_dir("predictions", key) / "tensors.safetensors").write_bytes(evil)
    assert Cache(cache_dir).load("predictions", key) is None and not marker.exists()  # refused, and removed
    assert not Cache(cache_dir).has("predictions", key)


# ------------------------------------------------------------------------------------------------ resource limits


def test_job_queue_runs_at_most_max_jobs_and_shows_positions(tiny: Path, cache_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """max 1: three sessions start; one runs, the others wait at positions 1 and 2, moving up; all finish.
    max 2: two run at once, the third waits at position 1."""
    from dashboard import services

    gates = {i: threading.Event() for i in range(6)}
    running: set[int] = set()
    peak: list[int] = []
    lock = threading.Lock()

    def fake_run(data: Any, cfg: RunConfig, *, progress: Any, cancel: Any, on_result: Any) -> dict[str, Any]:
        with lock:
            running.add(cfg.seed)
            peak.append(len(running))
        assert gates[cfg.seed].wait(30)
        with lock:
            running.discard(cfg.seed)
        return {"dataset": {"path": str(data.root), "name": data.name, "digest": data.digest}, "runs": []}

    monkeypatch.setattr(services.jobs, "run_methods", fake_run)

    def until(cond: Any) -> None:
        t0 = time.time()
        while not cond() and time.time() - t0 < 20:
            time.sleep(0.02)
        assert cond()

    for max_running, seeds in ((1, (0, 1, 2)), (2, (3, 4, 5))):
        jm = services.JobManager(max_running=max_running, isolation="thread")  # the fake run lives in this process
        monkeypatch.setattr(services.jobs, "job_manager", lambda jm=jm: jm)
        jobs = [jm.submit(f"s{s}", str(tiny), RunConfig(methods=["padim"], seed=s)) for s in seeds]
        until(lambda jobs=jobs, n=max_running: sum(j.state == "running" for j in jobs) == n)
        time.sleep(0.2)  # give a wrongly started job the chance to show up
        views = [services.job_view(j) for j in jobs]
        if max_running == 1:
            assert [v["state"] for v in views] == ["running", "queued", "queued"]
            assert [v["queue_position"] for v in views] == [None, 1, 2]
            extra = jm.submit("s-extra", str(tiny), RunConfig(methods=["padim"], seed=99))
            assert services.job_view(extra)["queue_position"] == 3
            jm.cancel("s-extra")  # a queued job cancelled: leaves the queue, says so
            until(lambda extra=extra: extra.state == "cancelled")
            assert services.job_view(extra)["error"] == "cancelled by the user before it started: nothing was computed"
            gates[seeds[0]].set()
            until(lambda jobs=jobs: jobs[1].state == "running")
            assert services.job_view(jobs[2])["queue_position"] == 1 and jobs[0].state == "done"
        else:
            assert [v["state"] for v in views] == ["running", "running", "queued"]
            assert views[2]["queue_position"] == 1
        for s in seeds:
            gates[s].set()
        until(lambda jobs=jobs: all(j.state == "done" for j in jobs))
        assert max(peak) == max_running
        peak.clear()


def test_oversized_images_are_downscaled_with_a_notice_the_user_sees(tiny: Path, tmp_path: Path,
                                                                    cache_dir: Path) -> None:
    """test_data checks the notice exists; here it reaches the dashboard's dataset health and the image loads
    at the working size."""
    import shutil

    from dashboard import services

    d = tmp_path / "wide"
    shutil.copytree(tiny, d)
    Image.new("RGB", (5000, 8), (50, 60, 70)).save(d / "train/good/panorama.png")
    info = services.dataset_info(str(d))
    assert any("larger than 4096 px" in w and "downscaled" in w and "panorama.png" in w for w in info.warnings)
    train = load_split(discover(d), "train", 64)
    assert train.images.shape[1:] == (3, 64, 64)
