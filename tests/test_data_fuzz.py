"""Property tests: whatever a zip upload holds, discover() returns a Dataset or raises DataValidationError,
and nothing is written outside the uploads folder."""

from __future__ import annotations

import io
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.api import DataValidationError
from engine.data import Dataset, Limits, discover


def _png(size: tuple[int, int], mode: str, value: int | tuple) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def _mask_png(size: tuple[int, int]) -> bytes:
    a = np.zeros((size[1], size[0]), np.uint8)
    a[: size[1] // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


VALID = [_png((8, 8), "RGB", (9, 8, 7)), _png((8, 8), "L", 40), _png((6, 9), "RGBA", (1, 2, 3, 4)),
         _png((8, 8), "I;16", 300), _mask_png((8, 8)), _mask_png((5, 5))]
CONTENT = st.one_of(
    st.sampled_from(VALID),
    st.sampled_from(VALID).map(lambda b: b[: len(b) // 2]),  # truncated
    st.binary(max_size=40),
    st.just(b""),
)
PART = st.one_of(
    st.sampled_from(["train", "test", "good", "crack", "ground_truth", "masks", "Train", "GOOD", "train", "test",
                     "good", "crack", "..", ".", "", "__MACOSX", ".DS_Store", "C:", "cat", "a b", "tab\t"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=6),
)
LEAF = st.one_of(
    st.sampled_from(["a.png", "b.PNG", "a.jpg", "c.tif", "000.png", "000_mask.png", "x.bmp", "in.zip", "r.txt",
                     "d.tar.gz", "m.jpeg", "..", "e"]),
    PART.map(lambda p: p + ".png"),
)
NAME = st.builds(lambda parts, leaf, lead: lead + "/".join([*parts, leaf]),
                 st.lists(PART, max_size=4), LEAF, st.sampled_from(["", "", "", "", "", "", "/", "../", "\\", "./"]))
ENTRY = st.tuples(NAME, CONTENT, st.sampled_from(["file", "file", "file", "symlink", "dir"]))
# Names inside the layout, so that validation (not only the zip checks) is exercised.
BENIGN_NAME = st.builds(
    lambda folder, stem, ext: f"{folder}/{stem}{ext}",
    st.sampled_from(["train/good", "test/good", "test/crack", "test/hole", "ground_truth/crack", "ground_truth/hole",
                     "train", "test", "ground_truth/good", "train/extra", "test/crack/sub"]),
    st.sampled_from(["000", "001", "000_mask", "001_mask", "t1", "g1", "z"]),
    st.sampled_from([".png", ".png", ".PNG", ".jpg", ".bmp", ".txt", ""]),
)
BENIGN = st.tuples(BENIGN_NAME, CONTENT, st.just("file"))
SKELETON = [
    ("train/good/t1.png", VALID[0]), ("train/good/t2.png", VALID[1]), ("test/good/g1.png", VALID[0]),
    ("test/crack/000.png", VALID[0]), ("ground_truth/crack/000_mask.png", VALID[4]),
]


def _write_zip(path: Path, entries: list[tuple[str, bytes, str]], top: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data, kind in entries:
                info = zipfile.ZipInfo(top + name)
                info.compress_type = zipfile.ZIP_DEFLATED
                if kind == "symlink":
                    info.create_system = 3
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                elif kind == "dir":
                    info = zipfile.ZipInfo(top + name.rstrip("/") + "/")
                    info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
                    data = b""
                zf.writestr(info, data)


def _outside(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_relative_to(root / "uploads")}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    extra=st.one_of(st.lists(ENTRY, max_size=8), st.lists(BENIGN, max_size=8)),
    with_skeleton=st.booleans(),
    top=st.sampled_from(["", "cat/", "x/y/"]),
    seed=st.integers(0, 3),
)
def test_discover_zip_never_crashes(extra: list[tuple[str, bytes, str]], with_skeleton: bool, top: str,
                                    seed: int) -> None:
    entries = [(n, d, "file") for n, d in SKELETON] if with_skeleton else []
    entries += extra
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        z = root / "up.zip"
        _write_zip(z, entries, top)
        before = _outside(root)
        try:
            ds = discover(z, limits=Limits(extract_root=str(root / "uploads"), max_files=50), seed=seed)
        except DataValidationError as e:
            assert e.problems and all(p.message for p in e.problems)
        else:
            assert isinstance(ds, Dataset) and ds.n_train > 0 and ds.n_test > 0 and len(ds.digest) == 32
            assert all(Path(s.path).is_relative_to(root / "uploads") for s in ds.train + ds.test)
        assert _outside(root) == before


@settings(max_examples=40, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_damaged_zip_bytes_never_crash(flips: list[tuple[int, int]], cut: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        z = root / "up.zip"
        _write_zip(z, [(n, d, "file") for n, d in SKELETON], "")
        raw = bytearray(z.read_bytes())
        for pos, val in flips:
            raw[pos % len(raw)] = val
        if cut is not None:
            raw = raw[: cut % (len(raw) + 1)]
        z.write_bytes(bytes(raw))
        try:
            discover(z, limits=Limits(extract_root=str(root / "uploads")))
        except DataValidationError as e:
            assert e.problems
        assert _outside(root) == {"up.zip"}
