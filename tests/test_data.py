"""Dataset discovery, validation, safe zip extraction and loading (engine.data)."""

from __future__ import annotations

import io
import shutil
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.api import DataValidationError, ImageSet, Problem
from engine.data import Limits, discover, extract_zip, find_categories, load_split, make_synthetic_dataset

# ------------------------------------------------------------------------------------------------ helpers


def png(path: Path, size: tuple[int, int] = (16, 16), mode: str = "RGB", value: int | tuple = 128,
        fmt: str = "PNG") -> Path:
    """Write a small uniform image (creating folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, format=fmt)
    return path


def mask(path: Path, size: tuple[int, int] = (16, 16), box: tuple[int, int, int, int] = (4, 4, 8, 8)) -> Path:
    """Write a 0/255 mask with a filled rectangle."""
    a = np.zeros((size[1], size[0]), np.uint8)
    a[box[1] : box[3], box[0] : box[2]] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "L").save(path)
    return path


def make_mvtec(root: Path, n_train: int = 3, n_good: int = 2, defects: dict[str, int] | None = None,
               masks: bool = True) -> Path:
    defects = {"crack": 2, "hole": 1} if defects is None else defects
    for i in range(n_train):
        png(root / "train/good" / f"{i:03d}.png", value=(100 + i, 90, 80))
    for i in range(n_good):
        png(root / "test/good" / f"{i:03d}.png", value=(110 + i, 90, 80))
    for d, n in defects.items():
        for i in range(n):
            png(root / "test" / d / f"{i:03d}.png", value=(200, 10 + i, 10))
            if masks:
                mask(root / "ground_truth" / d / f"{i:03d}_mask.png")
    return root


def make_folder(root: Path, n_good: int = 8, defects: dict[str, int] | None = None, mask_dir: str | None = "masks"):
    defects = {"scratch": 2} if defects is None else defects
    for i in range(n_good):
        png(root / "good" / f"g{i:02d}.png", value=(i * 10, 50, 50))
    for d, n in defects.items():
        for i in range(n):
            png(root / d / f"d{i}.png", value=(250, 0, i))
            if mask_dir:
                mask(root / mask_dir / d / f"d{i}_mask.png")
    return root


def zip_dir(src: Path, dest: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, prefix + f.relative_to(src).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return dest


def make_zip(dest: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return dest


def png_bytes(size: tuple[int, int] = (8, 8), mode: str = "RGB", value: int | tuple = 7) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def layout_entries(prefix: str = "") -> list[tuple[str, bytes]]:
    """A minimal valid MVTec layout as zip entries."""
    return [
        (f"{prefix}train/good/a.png", png_bytes(value=(1, 2, 3))),
        (f"{prefix}train/good/b.png", png_bytes(value=(4, 5, 6))),
        (f"{prefix}test/good/c.png", png_bytes(value=(7, 8, 9))),
        (f"{prefix}test/crack/d.png", png_bytes(value=(200, 0, 0))),
    ]


def problems_of(exc: pytest.ExceptionInfo[DataValidationError]) -> list[Problem]:
    assert exc.value.problems, "DataValidationError without problems"
    return exc.value.problems


def has_problem(exc: pytest.ExceptionInfo[DataValidationError], where: str, what: str) -> bool:
    return any(where in p.path and what.lower() in p.message.lower() for p in problems_of(exc))


def snapshot(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.fixture
def lim(tmp_path: Path) -> Limits:
    return Limits(extract_root=str(tmp_path / "uploads"))


# ------------------------------------------------------------------------------------------------ layouts


def test_mvtec_layout(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    ds = discover(root)
    assert (ds.layout, ds.name, ds.n_train, ds.n_test) == ("mvtec", "cat", 3, 5)
    assert ds.defect_types == ["crack", "hole"]
    assert ds.has_masks and ds.warnings == []
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in ds.train)
    defects = [s for s in ds.test if s.label == 1]
    assert len(defects) == 3 and all(s.mask_path and s.mask_path.endswith("_mask.png") for s in defects)
    assert all(Path(s.path).is_absolute() and Path(s.path).exists() for s in ds.train + ds.test)
    assert len(ds.digest) == 32


def test_mvtec_mask_named_like_image_and_missing_mask_is_a_warning(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat", defects={"crack": 2}, masks=False)
    mask(root / "ground_truth/crack/000.png")  # <stem>.png accepted
    ds = discover(root)
    by_name = {Path(s.path).name: s for s in ds.test if s.label == 1}
    assert by_name["000.png"].mask_path is not None and by_name["001.png"].mask_path is None
    assert any("no mask" in w for w in ds.warnings)
    test = load_split(ds, "test", 16)
    assert test.has_mask.tolist() == [True, True, True, False]  # good, good, masked defect, unmasked defect


def test_folder_layout_split_is_deterministic(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "parts", n_good=8)
    ds = discover(root, seed=0)
    assert ds.layout == "folder" and ds.n_train == 6 and ds.n_test == 4  # 2 good (25%) + 2 defects
    assert ds.defect_types == ["scratch"] and ds.has_masks
    again = discover(root, seed=0)
    assert [s.path for s in again.train] == [s.path for s in ds.train] and again.digest == ds.digest
    splits = {tuple(sorted(s.path for s in discover(root, seed=k).train)) for k in range(6)}
    assert len(splits) > 1  # the seed changes the split
    two = discover(make_folder(tmp_path / "two", n_good=2, mask_dir="ground_truth"))
    assert two.n_train == 1 and sum(s.label == 0 for s in two.test) == 1 and two.has_masks


def test_folder_layout_without_masks(tmp_path: Path) -> None:
    ds = discover(make_folder(tmp_path / "p", mask_dir=None))
    assert not ds.has_masks and any("no ground-truth masks" in w for w in ds.warnings)
    test = load_split(ds, "test", 8)
    assert test.masks is None and not test.has_mask.any()


def test_find_categories_and_root_with_several_datasets(tmp_path: Path) -> None:
    make_mvtec(tmp_path / "root/b")
    make_folder(tmp_path / "root/a")
    (tmp_path / "root/not_a_dataset").mkdir()
    assert find_categories(tmp_path / "root") == ["a", "b"]
    with pytest.raises(DataValidationError) as exc:
        discover(tmp_path / "root")
    assert "several datasets" in problems_of(exc)[0].message


@pytest.mark.parametrize("prefix", ["", "cat/"])
def test_zip_of_mvtec_layout(tmp_path: Path, lim: Limits, prefix: str) -> None:
    root = make_mvtec(tmp_path / "cat")
    z = zip_dir(root, tmp_path / "up.zip", prefix, extra={"__MACOSX/._x.png": b"junk", f"{prefix}.DS_Store": b"x"})
    ds = discover(z, limits=lim)
    assert (ds.n_train, ds.n_test, ds.defect_types) == (3, 5, ["crack", "hole"])
    assert ds.name == ("cat" if prefix else "up")
    assert ds.digest == discover(root).digest  # same content, same digest
    assert Path(ds.root).is_relative_to(tmp_path / "uploads")
    before = snapshot(tmp_path / "uploads")
    assert discover(z, limits=lim).digest == ds.digest  # reused, not extracted again
    assert snapshot(tmp_path / "uploads") == before


def test_zip_of_folder_layout(tmp_path: Path, lim: Limits) -> None:
    root = make_folder(tmp_path / "parts")
    ds = discover(zip_dir(root, tmp_path / "parts.zip", "parts/"), limits=lim)
    assert ds.layout == "folder" and ds.n_train == 6 and ds.has_masks


# ------------------------------------------------------------------------------------------------ loading


def test_image_modes_load_as_rgb(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    png(root / "train/good/grey.png", (20, 10), "L", 100)
    a16 = np.full((12, 12), 65535, np.uint16)
    Image.fromarray(a16).save(root / "train/good/deep.png")
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(root / "train/good/pal.png")
    png(root / "train/good/rgba.png", (16, 16), "RGBA", (200, 100, 50, 255))
    png(root / "train/good/cmyk.tif", (16, 16), "CMYK", (0, 0, 0, 0), fmt="TIFF")
    png(root / "train/good/la.png", (16, 16), "LA", (60, 255))
    png(root / "train/good/bw.bmp", (16, 16), "1", 1, fmt="BMP")
    png(root / "train/good/photo.jpg", (40, 30), "RGB", (10, 20, 30), fmt="JPEG")
    png(root / "test/good/t.png")
    png(root / "test/bad/u.png")
    ds = discover(root)
    train = load_split(ds, "train", 24)
    assert isinstance(train, ImageSet) and train.images.shape == (8, 3, 24, 24)
    assert str(train.images.dtype) == "torch.uint8"
    px = {Path(p).name: train.images[i, :, 12, 12].tolist() for i, p in enumerate(train.paths)}
    assert px["grey.png"] == [100, 100, 100]
    assert px["deep.png"] == [255, 255, 255]
    assert px["pal.png"] == [10, 200, 30]
    assert px["rgba.png"] == [200, 100, 50]
    assert px["cmyk.tif"] == [255, 255, 255]
    assert px["la.png"] == [60, 60, 60]
    assert px["bw.bmp"] == [255, 255, 255]
    assert all(abs(a - b) <= 3 for a, b in zip(px["photo.jpg"], [10, 20, 30], strict=True))


def test_masks_become_binary_and_nonbinary_masks_warn(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat", defects={"crack": 3}, masks=False)
    mask(root / "ground_truth/crack/000_mask.png", box=(0, 0, 8, 16))  # left half
    soft = np.zeros((16, 16), np.uint8)
    soft[:, 8:] = 200
    soft[:, 12:] = 100  # 100 < 128 -> background after binarising
    Image.fromarray(soft).save(root / "ground_truth/crack/001_mask.png")
    Image.fromarray((soft > 0).astype(np.uint8)).save(root / "ground_truth/crack/002_mask.png")  # 0/1 mask
    ds = discover(root)
    assert any("binarised" in w for w in ds.warnings) and any("0/1" in w for w in ds.warnings)
    test = load_split(ds, "test", 32)
    m = test.masks
    assert m is not None and m.shape == (5, 32, 32) and set(m.unique().tolist()) <= {0, 1}
    assert m[2, :, :16].all() and not m[2, :, 16:].any()
    assert m[3, :, 16:24].all() and not m[3, :, 24:].any()
    assert m[4, :, 16:].all() and not m[4, :, :16].any()
    assert not m[:2].any() and test.has_mask.all()
    assert test.labels.tolist() == [0, 0, 1, 1, 1]


def test_load_split_indices_and_digest(tmp_path: Path) -> None:
    ds = discover(make_synthetic_dataset(tmp_path, "brick", n_train=8, n_test_good=4, n_defect_per_type=3, size=64))
    full = load_split(ds, "test", 32)
    part = load_split(ds, "test", 32, indices=[5, 1])
    assert part.paths == [full.paths[5], full.paths[1]]
    assert (part.images == full.images[[5, 1]]).all()
    assert len({full.digest, part.digest, load_split(ds, "test", 48).digest, load_split(ds, "train", 32).digest}) == 4
    assert load_split(ds, "test", 32).digest == full.digest
    with pytest.raises(IndexError):
        load_split(ds, "test", 32, indices=[99])


# ------------------------------------------------------------------------------------------------ bad input


def test_non_image_and_truncated_images(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    (root / "train/good/notes.png").write_text("this is not an image")
    good = (root / "test/good/000.png").read_bytes()
    (root / "test/good/000.png").write_bytes(good[: len(good) // 2])
    (root / "test/crack/empty.png").write_bytes(b"")
    with pytest.raises(DataValidationError) as exc:
        discover(root)
    assert has_problem(exc, "notes.png", "not an image")
    assert has_problem(exc, "test/good/000.png", "truncated")
    assert has_problem(exc, "empty.png", "empty")
    assert len(problems_of(exc)) == 3


def test_mask_of_wrong_size(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    mask(root / "ground_truth/crack/001_mask.png", size=(20, 16))
    with pytest.raises(DataValidationError) as exc:
        discover(root)
    assert has_problem(exc, "001_mask.png", "mask is 20x16")


def test_empty_train_and_missing_test(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    (root / "train/good").mkdir(parents=True)
    with pytest.raises(DataValidationError) as exc:
        discover(root)
    assert has_problem(exc, "train/good", "no training images")
    assert has_problem(exc, "cat", "no test")
    folder = tmp_path / "f"
    (folder / "good").mkdir(parents=True)
    png(folder / "crack/x.png")
    with pytest.raises(DataValidationError) as exc:
        discover(folder)
    assert has_problem(exc, "good", "no training images")
    png(folder / "good/only.png")  # a single good image trains; the test split then has no normal image
    ds = discover(folder)
    assert ds.n_train == 1 and any("no normal test images" in w for w in ds.warnings)


def test_decompression_bomb_sized_image(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    png(root / "train/good/huge.png", (40, 40))
    with pytest.raises(DataValidationError) as exc:
        discover(root, limits=Limits(max_image_pixels=1000))
    assert has_problem(exc, "huge.png", "too large")
    assert has_problem(exc, "huge.png", "1,600 pixels")


def test_large_side_is_a_notice(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    png(root / "train/good/wide.png", (40, 10))
    ds = discover(root, limits=Limits(max_side_px=32))
    assert any("downscaled" in w and "wide.png" in w for w in ds.warnings)


def test_duplicate_stems_and_too_many_images(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    png(root / "train/good/000.jpg", fmt="JPEG")
    with pytest.raises(DataValidationError) as exc:
        discover(root)
    assert has_problem(exc, "000", "share the name")
    (root / "train/good/000.jpg").unlink()
    with pytest.raises(DataValidationError) as exc:
        discover(root, limits=Limits(max_images=4))
    assert has_problem(exc, "cat", "more than the limit of 4")


def test_several_problems_reported_at_once(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    (root / "train/good/000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "test/good/001.png").write_text("text")
    mask(root / "ground_truth/hole/000_mask.png", size=(8, 8))
    png(root / "test/crack/big.png", (64, 64))
    with pytest.raises(DataValidationError) as exc:
        discover(root, limits=Limits(max_image_pixels=1024))
    paths = {Path(p.path).name for p in problems_of(exc)}
    assert paths == {"000.png", "001.png", "000_mask.png", "big.png"}
    assert str(exc.value).startswith("4 problem(s)")


def test_missing_path_and_non_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError) as exc:
        discover(tmp_path / "nope")
    assert "does not exist" in problems_of(exc)[0].message
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError) as exc:
        discover(tmp_path / "empty")
    assert "no dataset layout" in problems_of(exc)[0].message and problems_of(exc)[0].hint
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataValidationError):
        discover(tmp_path / "x.txt")


# ------------------------------------------------------------------------------------------------ hostile zips


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


HOSTILE = {
    "traversal": ([("../x.png", png_bytes())], "../x.png", "escape"),
    "deep_traversal": ([("train/good/../../../y.png", png_bytes())], "y.png", "escape"),
    "absolute": ([("/tmp/adlab-must-not-exist.png", png_bytes())], "/tmp/adlab-must-not-exist.png", "absolute"),
    "drive": ([("C:/win.png", png_bytes())], "C:/win.png", "drive letter"),
    "backslash": ([("..\\evil.png", png_bytes())], "evil.png", "escape"),
    "symlink": ([(_symlink_info("train/good/link.png"), b"/etc/passwd")], "link.png", "symbolic link"),
    "bomb": ([("train/good/bomb.bmp", bytes(8 * 2**20))], "bomb.bmp", "compression ratio"),
    "nested": ([("train/good/inner.zip", b"PK\x05\x06" + bytes(18))], "inner.zip", "nested archive"),
    "duplicate": ([("train/good/a.png", png_bytes()), ("train/good/a.png", png_bytes())], "a.png", "duplicate"),
    "file_dir_clash": ([("train/good", b"x"), ("train/good/a.png", png_bytes())], "train/good", "same name"),
    "empty": ([], "up.zip", "empty"),
    "only_hidden": ([("__MACOSX/._a.png", b"x"), (".DS_Store", b"x")], "up.zip", "empty"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_zip_is_refused_and_writes_nothing(tmp_path: Path, case: str) -> None:
    entries, where, what = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    z = make_zip(tmp_path / "up.zip", [*layout_entries(), *entries] if case not in ("empty", "only_hidden")
                 else entries)
    dest = work / "dest"
    before_tmp = snapshot(work)
    with pytest.raises(DataValidationError) as exc:
        extract_zip(z, dest, Limits())
    assert has_problem(exc, where, what), problems_of(exc)
    assert all(p.hint for p in problems_of(exc))
    assert snapshot(work) == before_tmp  # nothing written, not even dest or a temp folder
    assert not (tmp_path / "x.png").exists() and not Path("/tmp/adlab-must-not-exist.png").exists()
    # discover() on the same zip reports the same problems and leaves the uploads folder empty
    lim = Limits(extract_root=str(work / "uploads"))
    with pytest.raises(DataValidationError):
        discover(z, limits=lim)
    assert not any((work / "uploads").rglob("*")) if (work / "uploads").exists() else True


def test_zip_limits_on_count_and_total_size(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "up.zip", [*layout_entries(), ("test/crack/e.png", png_bytes())])
    with pytest.raises(DataValidationError) as exc:
        extract_zip(z, tmp_path / "d1", Limits(max_files=3))
    assert has_problem(exc, "up.zip", "5 files")
    with pytest.raises(DataValidationError) as exc:
        extract_zip(z, tmp_path / "d2", Limits(max_total_uncompressed_mb=0.0001))
    assert has_problem(exc, "up.zip", "MiB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["up.zip"]


def test_all_zip_problems_reported_together(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "up.zip", [*layout_entries(), ("../a.png", b"1"), ("/abs.png", b"2"),
                                       (_symlink_info("l.png"), b"x"), ("n/x.tar.gz", b"3")])
    with pytest.raises(DataValidationError) as exc:
        extract_zip(z, tmp_path / "d", Limits())
    assert len(problems_of(exc)) == 4


def test_not_a_zip_and_non_utf8_names(tmp_path: Path, lim: Limits) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataValidationError) as exc:
        discover(bad, limits=lim)
    assert has_problem(exc, "bad.zip", "not a readable zip")

    def patched(flag_utf8: bool, replace: bytes) -> Path:
        """A zip whose entry name bytes are patched after writing (same length keeps offsets valid)."""
        z = make_zip(tmp_path / "n.zip", [*layout_entries(), ("test/crack/caf\u00e9.png", png_bytes())])
        raw = bytearray(z.read_bytes())
        raw = bytearray(bytes(raw).replace("caf\u00e9".encode(), replace))
        for sig, off in ((b"PK\x01\x02", 8), (b"PK\x03\x04", 6)):  # central and local headers: set the flag
            at = raw.find(sig)
            while at != -1:
                (flags,) = struct.unpack_from("<H", raw, at + off)
                struct.pack_into("<H", raw, at + off, flags | 0x800 if flag_utf8 else flags & ~0x800)
                at = raw.find(sig, at + 4)
        z.write_bytes(bytes(raw))
        return z

    # Not flagged UTF-8, bytes not valid UTF-8: decoded as cp437 and extracted safely inside dest.
    out = extract_zip(patched(False, b"caf\x82\x82"), tmp_path / "ok", Limits())
    names = sorted(p.name for p in (out / "test/crack").iterdir())
    assert len(names) == 2 and "d.png" in names
    assert discover(out).n_test == 3
    # Flagged UTF-8 but invalid: a clear problem, nothing written.
    with pytest.raises(DataValidationError) as exc:
        extract_zip(patched(True, b"caf\xff\xfe"), tmp_path / "no", Limits())
    assert "UTF-8" in problems_of(exc)[0].message
    assert not (tmp_path / "no").exists()


def test_extract_zip_refuses_existing_destination(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "up.zip", layout_entries())
    out = extract_zip(z, tmp_path / "d", Limits())
    assert (out / "train/good/a.png").exists()
    with pytest.raises(FileExistsError):
        extract_zip(z, tmp_path / "d", Limits())


# ------------------------------------------------------------------------------------------------ digest


def test_digest_stable_and_content_sensitive(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    d0 = discover(root).digest
    assert discover(root).digest == d0
    shutil.copytree(root, tmp_path / "elsewhere")
    assert discover(tmp_path / "elsewhere").digest == d0  # location does not matter
    png(root / "test/good/000.png", value=(1, 1, 1))
    d1 = discover(root).digest
    assert d1 != d0
    mask(root / "ground_truth/crack/000_mask.png", box=(0, 0, 3, 3))
    assert discover(root).digest not in (d0, d1)  # masks count too
    (root / "test/good/000.png").rename(root / "test/good/zzz.png")
    assert discover(root).digest not in (d0, d1)  # names count too


def test_uploads_go_under_adlab_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "cache"))
    z = make_zip(tmp_path / "up.zip", layout_entries())
    ds = discover(z)  # DEFAULT_LIMITS: extract_root resolved from ADLAB_CACHE at call time
    assert Path(ds.root).is_relative_to(tmp_path / "cache" / "uploads")
    assert ds.n_train == 2 and ds.n_test == 2
