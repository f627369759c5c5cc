"""Ingest: folders, .zip archives or DICOM files in, one Session (series grouped and split into single stacks,
headers summarised) out.

Owns `ingest` and finding the DICOM files of its inputs: walking folders, unpacking archives (`pipeline.archive`: a
zip and the zips directly inside it, whether the zip is an input or lies in an input folder beside or instead of
loose files), telling DICOM files and zips from other files by their first bytes, and reading their headers
(`pipeline.dicom_header`) into the images that `pipeline.series` groups. Symbolic links inside an input folder are
followed only within that folder (each folder once, so a loop ends); a link pointing outside it, to nothing or to
itself is skipped with a warning naming it. Any file system error while reading an input is an InputError naming the
file (a full disk: ResourceError). Converting a series is `pipeline.convert`. Nothing here logs or raises with
patient identifiers: messages name series by number and description only.
"""
from __future__ import annotations

import errno
import gzip
import logging
import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pedseg.pipeline.archive import MAX_UNPACKED_BYTES, UnpackBudget, gunzip, reason, unpack
from pedseg.pipeline.dicom_header import dataset_label, is_image, pixel_data_short, read_header_and_pixel_offset
from pedseg.pipeline.errors import InputError, PipelineError, disk_full, is_disk_full
from pedseg.pipeline.series import DicomImage, build_series, single_patient, single_study
from pedseg.pipeline.types import Session

logger = logging.getLogger(__name__)

_INPUT_HINT = ("Give the folder, or a .zip of the folder, holding the DICOM files of one MRI session "
               "(or several folders, zips or DICOM files of that session).")


def ingest(inputs: Path | Sequence[Path], workdir: Path) -> Session:
    """Read every DICOM image in `inputs` and group it into the series of one session.

    `inputs` is one path or several: folders, .zip archives (e.g. one Flywheel acquisition zip per series) and
    single DICOM files, merged into one session; an instance found in two inputs counts once. `workdir`
    receives unpacked archives and decompressed copies of gzip-compressed DICOM files.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if not paths:
        raise InputError("No input was given.", hint=_INPUT_HINT)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    total = 0
    skipped: list[str] = []  # what was left out, for the message when nothing else is found
    for index, path in enumerate(paths):
        found, count = _input_files(path, workdir, workdir / "gunzipped" / str(index), skipped)
        files += found
        total += count
    images = _read_images(files)
    names = ", ".join(f"'{p.name}'" for p in paths)
    if not images:
        found = (f"{total} files, none of them DICOM" if not files else
                 f"{len(files)} DICOM files, none of them a readable image") if total else "no files at all"
        left_out = f"; left out: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}" if skipped else ""
        raise InputError(f"No DICOM images in the input{'s' if len(paths) > 1 else ''} {names} ({found}{left_out}).",
                         hint=_INPUT_HINT)
    series = build_series(images)
    study_uid = single_study(series)
    single_patient(images)
    study_date = str(images[0].ds.get("StudyDate", "") or "")
    logger.debug("ingested %d series (%d DICOM files) from one study", len(series), len(images))
    root = paths[0] if len(paths) == 1 and paths[0].is_dir() else workdir
    return Session(series=series, study_uid=study_uid, root=root, study_date=study_date)


def _input_files(path: Path, workdir: Path, gunzip_dir: Path, skipped: list[str]) -> tuple[list[Path], int]:
    """The DICOM files of one input, and how many files it held in all; what was left out is added to `skipped`.
    A file system error not caught closer to its file (the input path itself unreadable or too long...) is an
    InputError naming the input and, where known, the file within it."""
    try:
        return _input_files_of(path, workdir, gunzip_dir, skipped)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(exc, f"reading the input '{path.name}'") from exc
        raise _read_error(exc, path, f"the input '{path.name}'", path, workdir) from exc


def _input_files_of(path: Path, workdir: Path, gunzip_dir: Path, skipped: list[str]) -> tuple[list[Path], int]:
    if path.is_dir():
        where = f"the input '{path.name}'"
        archives: list[Path] = []
        found, total = _find_dicom_files(_walk(path, where, skipped), path, gunzip_dir, where, archives)
        more, count = _folder_archives(archives, path, workdir, gunzip_dir, where, skipped)
        return found + more, total - len(archives) + count
    if path.is_file() and (zipfile.is_zipfile(path) or path.suffix.lower() == ".zip"):
        root = Path(tempfile.mkdtemp(prefix="input-", dir=workdir))
        skipped += unpack(path, root)
        return _find_dicom_files(_walk(root, f"'{path.name}'", skipped), root, gunzip_dir, f"'{path.name}'")
    if path.is_file():
        found, total = _find_dicom_files([path], path.parent, gunzip_dir, f"the input '{path.name}'")
        if found:
            return found, total
        raise InputError(f"The input '{path.name}' is neither a folder, a .zip archive nor a DICOM file.",
                         hint=_INPUT_HINT)
    raise InputError(f"The input '{path.name}' does not exist.", hint="Check the path.")


def _folder_archives(archives: list[Path], root: Path, workdir: Path, gunzip_dir: Path, where: str,
                     skipped: list[str]) -> tuple[list[Path], int]:
    """The DICOM files inside the zips found in an input folder (per-acquisition zips beside loose files, or
    alone), and how many files they held: each zip unpacked as if it were an input (with the archives directly
    inside it), all of them under one UnpackBudget, so a folder of zips meets the limits a zip of zips does."""
    budget = UnpackBudget()
    found: list[Path] = []
    total = 0
    for index, archive in enumerate(archives):
        label = f"'{archive.relative_to(root).as_posix()}' in {where}"
        dest = Path(tempfile.mkdtemp(prefix="folder-zip-", dir=workdir))
        skipped += unpack(archive, dest, budget=budget, label=label)
        more, count = _find_dicom_files(_walk(dest, label, skipped), dest, gunzip_dir / f"zip{index}", label)
        found += more
        total += count
    return found, total


def _read_error(exc: OSError, path: Path, where: str, *roots: Path) -> InputError:
    """A file system error while reading `path` (in `where`: the input or archive it came from), as an InputError
    naming the file relative to the first of `roots` that holds it."""
    failed = Path(exc.filename) if isinstance(exc.filename, str) else path
    name = failed.name
    for root in roots:
        if failed.is_relative_to(root) and failed != root:
            name = failed.relative_to(root).as_posix()
            break
    what = f"'{name}' in {where}" if f"'{name}'" not in where else where
    if exc.errno in (errno.ENOENT, errno.ESTALE):
        return InputError(f"{what[0].upper()}{what[1:]} disappeared while pedseg was reading it ({reason(exc)}).",
                          hint="Make sure nothing else moves or deletes the input while pedseg reads it, and run "
                               "again.")
    if exc.errno == errno.ENAMETOOLONG:
        return InputError(f"The path of {what} is too long for this file system ({reason(exc)}).",
                          hint="Shorten the folder and file names of the input, or move it to a shorter path.")
    if isinstance(exc, PermissionError):
        return InputError(f"{what[0].upper()}{what[1:]} cannot be read: {reason(exc)}.",
                          hint="Give the user running pedseg read access to the whole input (folders included).")
    return InputError(f"{what[0].upper()}{what[1:]} cannot be read: {reason(exc)}.",
                      hint="Check that the input is complete and readable, and give a folder or .zip of it.")


# ------------------------------------------------------------------------------------- finding files


def _find_dicom_files(paths: Iterable[Path], root: Path, gunzip_dir: Path, where: str,
                      archives: list[Path] | None = None) -> tuple[list[Path], int]:
    """The files among `paths` (all under `root`) that look like DICOM, and how many files there were in all; the
    zip archives among them are added to `archives` when it is given (else they are files that are not DICOM).

    Some archives store each DICOM file gzip-compressed (.dcm.gz); those are decompressed into `gunzip_dir`.
    Old files without the 128-byte preamble and 'DICM' prefix are rewritten there (or in place, for a copy of
    ours) as standard DICOM files, so that every later reader (dcm2niix, the SEG and report writers) reads them
    as it reads any other. `where` names the input (or archive) in messages.
    """
    found: list[Path] = []
    total = 0
    budget = MAX_UNPACKED_BYTES
    for path in paths:
        total += 1
        try:
            kind = _sniff(path)
            if kind == "gzip" and _sniff_gzip(path) == "dicom":
                out = gunzip_dir / path.relative_to(root).with_suffix("")
                budget -= gunzip(path, out, budget, name=f"'{path.relative_to(root).as_posix()}' in {where}")
                path, kind = out, _sniff(out)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(exc, f"reading {where}") from exc
            raise _read_error(exc, path, where, root, gunzip_dir) from exc
        if kind == "zip" and archives is not None:
            archives.append(path)
            continue
        if kind == "dicom" and not _has_preamble(path):
            target = path if path.is_relative_to(gunzip_dir) else gunzip_dir / "part10" / path.relative_to(root)
            path = _with_preamble(path, target)
        if kind == "dicom":
            found.append(path)
    logger.debug("ignored %d files that are not DICOM (READMEs, pictures, system files...)", total - len(found))
    return found, total


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _with_preamble(path: Path, target: Path) -> Path:
    """A file without preamble rewritten at `target` as a standard DICOM file (preamble, 'DICM', file meta with
    the transfer syntax it was written in); the file itself when it cannot be (reading its header then decides)."""
    try:
        ds = pydicom.dcmread(path, force=True)
        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta = ds.file_meta
        if "TransferSyntaxUID" not in meta:
            meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        meta.MediaStorageSOPClassUID = meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = meta.get("MediaStorageSOPInstanceUID") or ds.SOPInstanceUID
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    # force=True parses whatever it is given: a file that cannot be rewritten is left as it is, for the header
    # reader to accept or skip like any other.
    except Exception as exc:  # noqa: BLE001
        logger.debug("DICOM file without preamble left as it is (%s)", type(exc).__name__)
        return path
    return target


def _walk(root: Path, where: str, skipped: list[str]) -> Iterable[Path]:
    """The regular files under `root` (`where` in messages), each folder's files by name before its subfolders.

    Symbolic links are followed only to files and folders inside `root` (the input given may itself be a link);
    each folder is visited once, so a link to a folder above it ends there. A link pointing outside `root`, to
    nothing or to itself is skipped with a warning naming it and noted in `skipped`. Sockets, pipes and devices
    are skipped (opening a pipe would wait forever). A folder or file that cannot be read is an InputError."""
    real_root = Path(os.path.realpath(root))
    seen: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:  # reached again through a link (a loop ends here)
                logger.debug("'%s' in %s: a folder already read, not read again", folder.name, where)
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as entries:
                names = sorted(entry.name for entry in entries)
        except OSError as exc:
            raise _walk_error(exc, folder, root, where) from exc
        subfolders = []
        for name in names:
            path = folder / name
            kind = _entry_kind(path, root, real_root, where, skipped)
            if kind == "file":
                yield path
            elif kind == "folder":
                subfolders.append(path)
        pending += reversed(subfolders)


def _entry_kind(path: Path, root: Path, real_root: Path, where: str, skipped: list[str]) -> str | None:
    """'file', 'folder' or None (skipped) for one entry of a folder being walked."""
    relative = path.relative_to(root).as_posix()
    try:
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            problem = (None if target.is_relative_to(real_root) else "points outside the input folder")
            if problem is None:
                try:
                    os.stat(path)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ELOOP):
                        raise
                    problem = "points to nothing" if exc.errno == errno.ENOENT else "points to itself (a loop)"
            if problem:
                logger.warning("The symbolic link '%s' in %s %s: skipped.", relative, where, problem)
                skipped.append(f"'{relative}' (a symbolic link that {problem})")
                return None
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise _walk_error(exc, path, root, where) from exc
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    logger.debug("skipped '%s': neither a file nor a folder (a socket, pipe or device)", relative)
    return None


def _walk_error(exc: OSError, path: Path, root: Path, where: str) -> PipelineError:
    if is_disk_full(exc):
        return disk_full(exc, f"reading {where}")
    return _read_error(exc, path, where, root)


def _sniff(path: Path) -> str | None:
    """'dicom', 'gzip', 'zip' or None, from the first bytes; avoids force-parsing arbitrary junk as DICOM. A file that
    cannot be read raises (the caller names it)."""
    with open(path, "rb") as fh:
        return _kind(fh.read(132))


def _sniff_gzip(path: Path) -> str | None:
    """What a .gz file holds, from its first decompressed bytes (a .nii.gz is not worth unpacking)."""
    try:
        with gzip.open(path, "rb") as fh:
            return _kind(fh.read(132))
    except (gzip.BadGzipFile, EOFError, zlib.error):
        return None


def _kind(head: bytes) -> str | None:
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first entry, or an empty zip
        return "zip"
    # Old files without preamble start directly with a little-endian group 0002 or 0008 tag.
    if head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) >= 8:
        return "dicom"
    return None


# ------------------------------------------------------------------------------------- reading images


def _read_images(files: list[Path]) -> list[DicomImage]:
    """The image objects among `files`: without unreadable and non-image objects and files whose pixel data is
    missing or truncated (warned about per series). Repeated SOP Instance UIDs are kept: `build_series` tells a
    true copy from a different image under the same UID."""
    images: list[DicomImage] = []
    skipped = 0
    incomplete: dict[str, int] = {}
    for path in files:
        ds, pixels_at = read_header_and_pixel_offset(path)
        if ds is None or not is_image(ds):
            skipped += 1
            continue
        if pixel_data_short(path, ds, pixels_at):
            label = dataset_label(ds)
            incomplete[label] = incomplete.get(label, 0) + 1
            continue
        images.append(DicomImage(path, ds))
    logger.debug("skipped %d DICOM objects that are unreadable or carry no image", skipped)
    for label, count in incomplete.items():
        logger.warning("%s: %d file(s) with missing or truncated pixel data left out", label, count)
    return images
