"""Archives: unpacking .zip files and gzip-compressed DICOM files without trusting them.

Owns the limits that guard the disk (MAX_UNPACKED_BYTES, MAX_COMPRESSION_RATIO, MAX_ARCHIVE_ENTRIES) and
`safe_extract`, which refuses entries that could write outside the destination (absolute paths, '..', symbolic
links), encrypted entries, zip bombs (by ratio and by total), too many entries and archives larger than the free
disk space, and stops any entry whose data outgrows its declared size. `unpack` is what ingest calls, for a zip
given as an input and for each zip inside an input folder: an archive and the archives directly inside it (a
Flywheel session download is a zip of per-acquisition zips), one level only, all under one UnpackBudget per
input, so the limits count the total across nested archives and across the zips of one folder. Entry names too long for
the file system are shortened on disk (a readable prefix and a hash, inside the destination). Every file system
error while unpacking is an InputError naming the entry, except a full disk (ResourceError). `gunzip`
decompresses one .gz file under the same limits. Messages name archives and entries, never patients.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pedseg.pipeline.errors import InputError, ResourceError, disk_full, is_disk_full

logger = logging.getLogger(__name__)

# Archive limits: a real MRI session is at most a few GB; DICOM compresses 2-10x, a zip bomb ~1000x.
MAX_UNPACKED_BYTES = 20 * 1024**3
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_MIN_BYTES = 1024**2  # tiny entries (headers, blank images) may compress extremely well
MAX_ARCHIVE_ENTRIES = 500_000
# Most file systems allow 255 bytes per name (some encrypted ones ~143); longer entry names are shortened on disk.
MAX_NAME_BYTES = 120
_CHUNK = 1024**2

_ARCHIVE_HINT = "Re-create the archive from the session's DICOM folder, or give the folder itself."
_LIMITS_HINT = ("Give only the DICOM files of one MRI session; if this is one, unpack it yourself and give the folder "
                "(the limits guard against archives made to fill the disk).")
_NESTED_HINT = "Unpack the inner archives yourself and give the folder, or give the inner archives as the inputs."


@dataclass
class UnpackBudget:
    """What one input may still unpack, all its archives together (an archive and the archives inside it)."""

    bytes_left: int = field(default_factory=lambda: MAX_UNPACKED_BYTES)
    entries_left: int = field(default_factory=lambda: MAX_ARCHIVE_ENTRIES)


def unpack(archive: Path, dest: Path, *, budget: UnpackBudget | None = None, label: str | None = None) -> list[str]:
    """Unpack `archive` into `dest`, and each archive directly inside it into a folder beside that archive (which
    is then deleted), all under one UnpackBudget (`budget`, shared with the other archives of one input folder, or
    a fresh one). Archives nested deeper stay packed: each is named in a warning and in the list returned (for the
    message when no DICOM image is found). `label` names an archive found inside an input folder in messages
    ("'t1n.zip' in the input 'in'")."""
    budget = budget or UnpackBudget()
    outer = label or f"'{archive.name}'"
    deeper: list[str] = []
    for inner, entry in safe_extract(archive, dest, budget=budget, label=label).items():
        if not looks_like_zip(inner):
            continue
        inner_label = f"'{entry}' inside {outer}"
        folder = Path(tempfile.mkdtemp(prefix="unzipped-", dir=inner.parent))
        for path, name in safe_extract(inner, folder, budget=budget, label=inner_label).items():
            if looks_like_zip(path):
                deeper.append(f"'{name}' in {inner_label}")
                logger.warning("The archive '%s' in %s is nested two levels deep: not unpacked. %s",
                               name, inner_label, _NESTED_HINT)
        inner.unlink()
    return deeper


def looks_like_zip(path: Path) -> bool:
    """A zip archive by its first bytes (and not a DICOM file whose preamble happens to start like one)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(exc, f"reading '{path.name}'") from exc
        raise InputError(f"The file '{path.name}' cannot be read: {reason(exc)}.", hint=_ARCHIVE_HINT) from exc
    return head[:4] == b"PK\x03\x04" and head[128:132] != b"DICM"


def safe_extract(archive: Path, dest: Path, *, budget: UnpackBudget | None = None,
                 label: str | None = None) -> dict[Path, str]:
    """Unpack `archive` into `dest`, refusing anything that could write outside it or exhaust the disk; the files
    written, each with its entry name. `budget` is shared by the archives of one input (a fresh one if not given);
    `label` names a nested archive in messages ("'a.zip' inside 'b.zip'")."""
    budget = budget or UnpackBudget()
    name = label or f"'{archive.name}'"
    where = f" in {label}" if label else ""  # top-level entries are named as before, without their archive
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise InputError(f"The archive {name} cannot be read as a zip file ({exc}).", hint=_ARCHIVE_HINT) from exc
    except OSError as exc:
        raise InputError(f"The archive {name} cannot be opened: {reason(exc)}.",
                         hint="Check that the file exists and that the user running pedseg may read it.") from exc
    written: dict[Path, str] = {}
    with zf:
        infos = zf.infolist()
        _check_zip_entries(infos, archive.stat().st_size, budget, name, where)
        total = sum(i.file_size for i in infos)
        if shutil.disk_usage(dest).free < total:
            raise ResourceError(
                f"Not enough free disk space to unpack {name} ({total / 1024**3:.1f} GB needed).",
                hint="Free disk space in the work folder or point the work folder at a larger disk.",
            )
        budget.bytes_left -= total
        budget.entries_left -= len(infos)
        dest_root = dest.resolve()
        shortened = 0
        for info in infos:
            disk_name = _disk_name(info)
            shortened += disk_name != PurePosixPath(_entry_name(info))
            target = (dest / disk_name).resolve()
            if not target.is_relative_to(dest_root):
                raise InputError(f"The archive entry '{info.filename}'{where} points outside the archive folder.",
                                 hint=_ARCHIVE_HINT)
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    _copy_limited(src, dst, info.file_size, what=f"archive entry '{info.filename}'{where}")
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, ValueError, zlib.error,
                    OSError) as exc:
                if is_disk_full(exc):
                    raise disk_full(exc, f"unpacking {name}") from exc
                raise _entry_error(info.filename, where, exc) from exc
            written[target] = _entry_name(info)
    logger.debug("unpacked %d archive entries (%d names shortened to fit the file system)", len(infos), shortened)
    return written


def reason(exc: BaseException) -> str:
    """An OS error's reason without the path it quotes (the path is named separately, relative to the input)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _entry_error(filename: str, where: str, exc: BaseException) -> InputError:
    if len(filename) > 160:  # a name too long for the disk is too long for a message too
        filename = f"{filename[:100]}…{filename[-50:]}"
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return InputError(f"The archive entry '{filename}'{where} cannot be extracted: its path is too long for this "
                          "file system.", hint="Re-create the archive with shorter folder and file names.")
    if isinstance(exc, OSError) and exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return InputError(f"The archive entry '{filename}'{where} cannot be extracted: a file and a folder of the "
                          f"archive share its name ({reason(exc)}).", hint=_ARCHIVE_HINT)
    return InputError(f"The archive entry '{filename}'{where} cannot be extracted ({reason(exc)}).",
                      hint=_ARCHIVE_HINT)


def _entry_name(info: zipfile.ZipInfo) -> str:
    return info.filename.replace("\\", "/")


def _disk_name(info: zipfile.ZipInfo) -> PurePosixPath:
    """The entry's relative path on disk: each name longer than MAX_NAME_BYTES (in UTF-8) shortened to a readable
    prefix, a hash of the whole name and its extension, so that distinct names stay distinct."""
    return PurePosixPath(*(_short_name(part) for part in PurePosixPath(_entry_name(info)).parts))


def _short_name(part: str) -> str:
    if len(part.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES:
        return part
    digest = hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    suffix = PurePosixPath(part).suffix
    suffix = suffix if suffix.isascii() and len(suffix) <= 10 else ""
    prefix = part.encode("utf-8", "surrogatepass")[:60].decode("utf-8", "ignore")
    return f"{prefix}~{digest}{suffix}"


def _check_zip_entries(infos: list[zipfile.ZipInfo], archive_bytes: int, budget: UnpackBudget, name: str,
                       where: str) -> None:
    used_entries = MAX_ARCHIVE_ENTRIES - budget.entries_left
    if len(infos) > budget.entries_left:
        together = (f" ({used_entries + len(infos)} with the archives unpacked before it)" if used_entries else "")
        raise InputError(f"The archive {name} holds {len(infos)} entries{together}, more than the "
                         f"{MAX_ARCHIVE_ENTRIES} allowed.", hint=_LIMITS_HINT)
    for info in infos:
        entry = _entry_name(info)
        if entry.startswith("/") or re.match(r"^[A-Za-z]:", entry):
            raise InputError(f"The archive entry '{info.filename}'{where} has an absolute path; refusing to unpack "
                             "it.", hint="Re-create the archive with relative paths.")
        if ".." in PurePosixPath(entry).parts:
            raise InputError(f"The archive entry '{info.filename}'{where} climbs out of the archive folder ('..'); "
                             "refusing to unpack it.", hint="Re-create the archive without '..' in entry names.")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputError(f"The archive entry '{info.filename}'{where} is a symbolic link; refusing to unpack it.",
                             hint="Re-create the archive with the files themselves, not links.")
        if info.flag_bits & 0x1:
            raise InputError(f"The archive entry '{info.filename}'{where} is password-protected.",
                             hint="Give an unencrypted archive.")
        ratio = info.file_size // max(info.compress_size, 1)
        if info.file_size > RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise InputError(f"The archive entry '{info.filename}'{where} expands {ratio}-fold: this looks like a "
                             "zip bomb, refusing to unpack it.", hint=_LIMITS_HINT)
    total = sum(i.file_size for i in infos)
    if total > budget.bytes_left:
        used = MAX_UNPACKED_BYTES - budget.bytes_left
        together = f" ({(used + total) / 1024**3:.1f} GB with the archives unpacked before it)" if used else ""
        raise InputError(f"The archive {name} would unpack to {total / 1024**3:.1f} GB{together}, more than the "
                         f"{MAX_UNPACKED_BYTES / 1024**3:.0f} GB allowed for one session.", hint=_LIMITS_HINT)
    if total > RATIO_CHECK_MIN_BYTES and total > MAX_COMPRESSION_RATIO * max(archive_bytes, 1):
        raise InputError(f"The archive {name} would unpack to {total // max(archive_bytes, 1)} times its own size: "
                         "this looks like a zip bomb, refusing to unpack it.", hint=_LIMITS_HINT)


def _copy_limited(src, dst, limit: int, *, what: str) -> int:
    """Stream src to dst, failing as soon as more than `limit` bytes arrive (sizes in headers can lie)."""
    copied = 0
    while chunk := src.read(_CHUNK):
        copied += len(chunk)
        if copied > limit:
            raise InputError(f"The {what} expands beyond its allowed size ({limit} bytes): refusing to unpack it.",
                             hint=_LIMITS_HINT)
        dst.write(chunk)
    return copied


# ------------------------------------------------------------------------------ gzip-compressed files


def gunzip(src: Path, out: Path, budget: int, *, name: str | None = None) -> int:
    """Decompress `src` into `out`, at most `budget` bytes and at most MAX_COMPRESSION_RATIO times its size; the
    number of bytes written. A broken .gz writes nothing and counts 0; a full disk raises ResourceError, any other
    file system error an InputError naming the file (`name`, or its file name)."""
    name = name or f"'{src.name}'"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        limit = min(budget, max(MAX_COMPRESSION_RATIO * src.stat().st_size, RATIO_CHECK_MIN_BYTES))
        with gzip.open(src, "rb") as fin, open(out, "wb") as fout:
            return _copy_limited(fin, fout, limit, what=f"gzip file '{src.name}'")
    except (OSError, EOFError, zlib.error) as exc:
        out.unlink(missing_ok=True)
        if is_disk_full(exc):  # not a broken .gz: the session would silently lose files
            raise disk_full(exc, f"decompressing '{src.name}'") from exc
        if isinstance(exc, OSError) and exc.errno is not None:  # the file system, not the data (BadGzipFile)
            raise InputError(f"The file {name} cannot be decompressed: {reason(exc)}.",
                             hint="Check that the input is complete and readable, and that nothing else changes "
                                  "it while pedseg reads it.") from exc
        logger.debug("could not decompress a .gz file (%s); ignored", type(exc).__name__)
        return 0
