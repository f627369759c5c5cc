"""Archives: unpacking .zip files and gzip-compressed DICOM files without trusting them.

Owns the limits that guard the disk (MAX_UNPACKED_BYTES, MAX_COMPRESSION_RATIO, MAX_ARCHIVE_ENTRIES) and
`safe_extract`, which refuses entries that could write outside the destination (absolute paths, '..', symbolic
links), encrypted entries, zip bombs (by ratio and by total), too many entries and archives larger than the free
disk space, and stops any entry whose data outgrows its declared size. `gunzip` decompresses one .gz file under
the same limits. Messages name archives and entries, never patients.
"""
from __future__ import annotations

import gzip
import logging
import re
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from pedseg.pipeline.errors import InputError, ResourceError, disk_full, is_disk_full

logger = logging.getLogger(__name__)

# Archive limits: a real MRI session is at most a few GB; DICOM compresses 2-10x, a zip bomb ~1000x.
MAX_UNPACKED_BYTES = 20 * 1024**3
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_MIN_BYTES = 1024**2  # tiny entries (headers, blank images) may compress extremely well
MAX_ARCHIVE_ENTRIES = 500_000
_CHUNK = 1024**2

_ARCHIVE_HINT = "Re-create the archive from the session's DICOM folder, or give the folder itself."
_LIMITS_HINT = ("Give only the DICOM files of one MRI session; if this is one, unpack it yourself and give the folder "
                "(the limits guard against archives made to fill the disk).")


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack `archive` into `dest`, refusing anything that could write outside it or exhaust the disk."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"The archive '{archive.name}' cannot be read as a zip file ({exc}).",
                         hint=_ARCHIVE_HINT) from exc
    with zf:
        infos = zf.infolist()
        _check_zip_entries(infos, archive.stat().st_size)
        total = sum(i.file_size for i in infos)
        if shutil.disk_usage(dest).free < total:
            raise ResourceError(
                f"Not enough free disk space to unpack '{archive.name}' ({total / 1024**3:.1f} GB needed).",
                hint="Free disk space in the work folder or point the work folder at a larger disk.",
            )
        dest_root = dest.resolve()
        for info in infos:
            target = (dest / _entry_name(info)).resolve()
            if not target.is_relative_to(dest_root):
                raise InputError(f"The archive entry '{info.filename}' points outside the archive folder.",
                                 hint=_ARCHIVE_HINT)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    _copy_limited(src, dst, info.file_size, what=f"archive entry '{info.filename}'")
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as exc:
                if is_disk_full(exc):
                    raise disk_full(exc, f"unpacking '{archive.name}'") from exc
                raise InputError(f"The archive entry '{info.filename}' cannot be extracted ({exc}).",
                                 hint=_ARCHIVE_HINT) from exc
    logger.debug("unpacked %d archive entries", len(infos))


def _entry_name(info: zipfile.ZipInfo) -> str:
    return info.filename.replace("\\", "/")


def _check_zip_entries(infos: list[zipfile.ZipInfo], archive_bytes: int) -> None:
    if len(infos) > MAX_ARCHIVE_ENTRIES:
        raise InputError(f"The archive holds {len(infos)} entries, more than the {MAX_ARCHIVE_ENTRIES} allowed.",
                         hint=_LIMITS_HINT)
    for info in infos:
        name = _entry_name(info)
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise InputError(f"The archive entry '{info.filename}' has an absolute path; refusing to unpack it.",
                             hint="Re-create the archive with relative paths.")
        if ".." in PurePosixPath(name).parts:
            raise InputError(f"The archive entry '{info.filename}' climbs out of the archive folder ('..'); "
                             "refusing to unpack it.", hint="Re-create the archive without '..' in entry names.")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputError(f"The archive entry '{info.filename}' is a symbolic link; refusing to unpack it.",
                             hint="Re-create the archive with the files themselves, not links.")
        if info.flag_bits & 0x1:
            raise InputError(f"The archive entry '{info.filename}' is password-protected.",
                             hint="Give an unencrypted archive.")
        ratio = info.file_size // max(info.compress_size, 1)
        if info.file_size > RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise InputError(f"The archive entry '{info.filename}' expands {ratio}-fold: this looks like a zip bomb, "
                             "refusing to unpack it.", hint=_LIMITS_HINT)
    total = sum(i.file_size for i in infos)
    if total > MAX_UNPACKED_BYTES:
        raise InputError(f"The archive would unpack to {total / 1024**3:.1f} GB, more than the "
                         f"{MAX_UNPACKED_BYTES / 1024**3:.0f} GB allowed for one session.", hint=_LIMITS_HINT)
    if total > RATIO_CHECK_MIN_BYTES and total > MAX_COMPRESSION_RATIO * max(archive_bytes, 1):
        raise InputError(f"The archive would unpack to {total // max(archive_bytes, 1)} times its own size: "
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


def gunzip(src: Path, out: Path, budget: int) -> int:
    """Decompress `src` into `out`, at most `budget` bytes and at most MAX_COMPRESSION_RATIO times its size; the
    number of bytes written. A broken .gz writes nothing and counts 0; a full disk raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    limit = min(budget, max(MAX_COMPRESSION_RATIO * src.stat().st_size, RATIO_CHECK_MIN_BYTES))
    try:
        with gzip.open(src, "rb") as fin, open(out, "wb") as fout:
            return _copy_limited(fin, fout, limit, what=f"gzip file '{src.name}'")
    except (OSError, EOFError) as exc:
        out.unlink(missing_ok=True)
        if is_disk_full(exc):  # not a broken .gz: the session would silently lose files
            raise disk_full(exc, f"decompressing '{src.name}'") from exc
        logger.debug("could not decompress a .gz file (%s); ignored", type(exc).__name__)
        return 0

