"""Safe extraction of uploaded zip archives.

Every entry is checked before a single byte is written: paths that would escape the destination
(``..``, absolute paths, drive letters), symlinks and other special files, nested archives,
duplicate names, encrypted entries, too many files, too much uncompressed data and suspicious
compression ratios (zip bombs). All problems are reported together in one DataValidationError.
Extraction goes to a hidden temporary sibling folder that is renamed into place at the end, so the
destination either holds the complete archive or does not exist.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine.api import DataValidationError, Problem
from engine.data.limits import ARCHIVE_EXTENSIONS, DEFAULT_LIMITS, Limits

_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20
_MAX_COMPONENT_BYTES = 255
_MAX_DEPTH = 32


def is_hidden_name(name: str) -> bool:
    """True for entries that are ignored everywhere: dot-files (``.DS_Store``), ``__MACOSX/`` and ``Thumbs.db``."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    return any((p.startswith(".") and p not in (".", "..")) or p in ("__MACOSX", "Thumbs.db") for p in parts)


def _decoded_name(info: zipfile.ZipInfo) -> str:
    """The entry name as text. Names not flagged UTF-8 were decoded by zipfile as cp437; many tools write
    UTF-8 without the flag, so try UTF-8 on the raw bytes first and keep cp437 when that fails."""
    name = info.filename
    if not info.flag_bits & 0x800:
        try:
            name = name.encode("cp437").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return name


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    name: str  # normalised relative posix path
    is_dir: bool


def _check_name(raw: str) -> tuple[str | None, str | None]:
    """Normalise an entry name. Returns (relative posix path, None) or (None, reason it is refused)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        return None, "the name contains control characters"
    name = raw.replace("\\", "/")
    if name.startswith("/"):
        return None, "absolute path"
    if _DRIVE.match(name):
        return None, "path with a drive letter"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None, "the path contains '..' and would escape the extraction folder"
    if len(parts) > _MAX_DEPTH:
        return None, f"folders nested more than {_MAX_DEPTH} deep"
    if any(len(p.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT_BYTES for p in parts):
        return None, f"a path component is longer than {_MAX_COMPONENT_BYTES} bytes"
    return "/".join(parts), None


def _scan(zf: zipfile.ZipFile, label: str, limits: Limits) -> tuple[list[_Entry], list[Problem]]:
    """Check every entry of an open archive. Returns the entries to extract and the problems found."""
    problems: list[Problem] = []
    entries: list[_Entry] = []
    seen: dict[str, str] = {}
    total = 0
    n_files = 0
    n_dirs = 0
    for info in zf.infolist():
        raw = _decoded_name(info)
        where = f"{label}:{raw}"
        if is_hidden_name(raw):
            continue
        name, why = _check_name(raw)
        if name is None:
            problems.append(Problem(where, f"unsafe entry name: {why}", "re-create the zip from the dataset folder"))
            continue
        mode = info.external_attr >> 16
        ftype = stat.S_IFMT(mode)
        is_dir = info.is_dir() or ftype == stat.S_IFDIR
        if ftype == stat.S_IFLNK:
            problems.append(Problem(where, "symbolic link entries are not allowed", "zip the real files, not links"))
            continue
        if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            problems.append(Problem(where, "special file (device, pipe or socket)", "remove it from the zip"))
            continue
        if info.flag_bits & 0x1:
            problems.append(Problem(where, "the entry is encrypted", "re-create the zip without a password"))
            continue
        if not name:
            continue  # the root itself ("./")
        if is_dir:
            n_dirs += 1
        else:
            suffix = PurePosixPath(name).suffix.lower()
            if suffix in ARCHIVE_EXTENSIONS:
                problems.append(
                    Problem(where, "nested archive inside the upload (not extracted)", "unpack it and zip the files")
                )
                continue
            n_files += 1
            total += max(info.file_size, 0)
            if info.file_size >= limits.ratio_min_bytes:
                ratio = info.file_size / max(info.compress_size, 1)
                if ratio > limits.max_ratio:
                    problems.append(
                        Problem(
                            where,
                            f"compression ratio {ratio:.0f}:1 exceeds the limit {limits.max_ratio:.0f}:1"
                            f" ({info.file_size} bytes from {info.compress_size}) - possible zip bomb",
                            "images barely compress; remove this entry or raise Limits.max_ratio",
                        )
                    )
                    continue
        key = name.casefold()
        if key in seen:
            if not (is_dir and seen[key] == "dir"):
                problems.append(
                    Problem(where, f"duplicate entry name (also '{name}' earlier in the zip)", "keep one copy")
                )
            continue
        seen[key] = "dir" if is_dir else "file"
        entries.append(_Entry(info, name, is_dir))

    # A file whose name is also used as a folder by another entry cannot be extracted.
    dirs_needed = {str(PurePosixPath(e.name).parent).casefold() for e in entries} | {
        e.name.casefold() for e in entries if e.is_dir
    }
    prefixes: set[str] = set()
    for d in dirs_needed:
        parts = d.split("/")
        prefixes.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    for e in entries:
        if not e.is_dir and e.name.casefold() in prefixes:
            problems.append(
                Problem(f"{label}:{e.name}", "a file has the same name as a folder in the zip", "rename one of them")
            )

    if n_files > limits.max_files:
        problems.append(
            Problem(label, f"the zip holds {n_files} files, more than the limit of {limits.max_files}",
                    "upload fewer images or raise Limits.max_files")
        )
    if n_dirs > limits.max_files:  # empty folder entries cost inodes too
        problems.append(
            Problem(label, f"the zip holds {n_dirs} folder entries, more than the limit of {limits.max_files}",
                    "zip only the dataset folder, or raise Limits.max_files")
        )
    if total > limits.max_total_uncompressed_bytes:
        problems.append(
            Problem(label, f"the zip expands to {total / 2**20:.1f} MiB, more than the limit of "
                    f"{limits.max_total_uncompressed_mb:g} MiB", "upload a smaller dataset")
        )
    if n_files == 0 and not problems:
        problems.append(Problem(label, "the zip is empty (no files)", "zip the dataset folder with its images"))
    return entries, problems


def _extract_entry(zf: zipfile.ZipFile, entry: _Entry, base: Path) -> str | None:
    """Write one regular file under ``base``. Returns None, or why it failed."""
    target = base.joinpath(*entry.name.split("/"))
    # Defence in depth: the checked name cannot leave base, and base holds no links (none are extracted).
    if not target.resolve().is_relative_to(base.resolve()):
        return "the path would escape the extraction folder"
    target.parent.mkdir(parents=True, exist_ok=True)
    limit = entry.info.file_size
    written = 0
    try:
        with zf.open(entry.info) as src, open(target, "xb") as dst:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                if written > limit:
                    return "the entry expands beyond its declared size"
                dst.write(chunk)
    except NotImplementedError as e:
        return f"unsupported compression: {e}"
    except OSError as e:
        return f"cannot extract: {e}"
    except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError, struct.error...: crafted or damaged data
        return f"the entry is damaged ({type(e).__name__}: {e})"
    return None


def extract_zip(zip_path: str | Path, dest_dir: str | Path, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Safely extract ``zip_path`` into ``dest_dir`` and return ``dest_dir`` as a Path.

    All entries are checked first; any problem raises DataValidationError listing every problem and
    nothing is written. Extraction happens in a hidden temporary sibling of ``dest_dir`` that is renamed
    into place; if ``dest_dir`` appears meanwhile (a concurrent extraction of the same upload), the
    existing folder is kept. Hidden entries (``.DS_Store``, ``__MACOSX/``) are skipped.
    Raises FileExistsError when ``dest_dir`` already exists before extraction starts.
    """
    zip_path = Path(zip_path)
    dest = Path(dest_dir)
    label = zip_path.name
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    try:
        zf = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise DataValidationError([Problem(str(zip_path), "the file does not exist")]) from None
    except UnicodeDecodeError:
        raise DataValidationError(
            [Problem(label, "entry names are marked UTF-8 but are not valid UTF-8", "re-create the zip")]
        ) from None
    except Exception as e:  # BadZipFile, struct.error, OverflowError...: anything unparsable is not a usable zip
        raise DataValidationError(
            [Problem(label, f"not a readable zip file ({e})", "upload a .zip made by a standard zip tool")]
        ) from None
    with zf:
        entries, problems = _scan(zf, label, limits)
        if problems:
            raise DataValidationError(problems)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            for entry in entries:
                if entry.is_dir:
                    tmp.joinpath(*entry.name.split("/")).mkdir(parents=True, exist_ok=True)
                    continue
                why = _extract_entry(zf, entry, tmp)
                if why is not None:
                    problems.append(Problem(f"{label}:{entry.name}", why, "re-create the zip"))
            if problems:
                raise DataValidationError(problems)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest
