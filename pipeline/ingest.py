"""Ingest: folders, .zip archives or DICOM files in, one Session (series grouped and split into single stacks,
headers summarised) out.

Also converts one series to NIfTI with dcm2niix. Nothing here logs or raises with patient identifiers:
messages name series by number and description only.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import dcm2niix
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pedseg.pipeline.atomic import gzip_length, write_text
from pedseg.pipeline.errors import InputError, ResourceError, UnsupportedDataError, disk_full, is_disk_full
from pedseg.pipeline.types import Series, SeriesHeader, Session, series_label

logger = logging.getLogger(__name__)

# Archive limits: a real MRI session is at most a few GB; DICOM compresses 2-10x, a zip bomb ~1000x.
MAX_UNPACKED_BYTES = 20 * 1024**3
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_MIN_BYTES = 1024**2  # tiny entries (headers, blank images) may compress extremely well
MAX_ARCHIVE_ENTRIES = 500_000
DCM2NIIX_TIMEOUT_S = 900
_CHUNK = 1024**2

# DICOM objects that share a series with images but carry no image: Philips raw data, presentation states,
# structured reports, encapsulated documents, spectroscopy, registrations/segmentations, RT, waveforms.
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.1.3.10",  # DICOMDIR (media storage directory)
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.4.2",
    "1.2.840.10008.5.1.4.1.1.481.",
    "1.2.840.10008.5.1.4.1.1.9.",
    "1.2.840.10008.5.1.4.1.1.67",
)
_ENHANCED_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
# Direction cosines of one stack agree far closer than this; a reformat or another plane differs by degrees.
ORIENTATION_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------- ingest


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
    for index, path in enumerate(paths):
        found, count = _input_files(path, workdir, workdir / "gunzipped" / str(index))
        files += found
        total += count
    images = _read_images(files)
    names = ", ".join(f"'{p.name}'" for p in paths)
    if not images:
        found = (f"{total} files, none of them DICOM" if not files else
                 f"{len(files)} DICOM files, none of them a readable image") if total else "no files at all"
        raise InputError(f"No DICOM images in the input{'s' if len(paths) > 1 else ''} {names} ({found}).",
                         hint=_INPUT_HINT)
    series = _build_series(images)
    study_uid = _single_study(series)
    _single_patient(images)
    study_date = str(images[0].ds.get("StudyDate", "") or "")
    logger.info("ingested %d series (%d DICOM files) from one study", len(series), len(images))
    root = paths[0] if len(paths) == 1 and paths[0].is_dir() else workdir
    return Session(series=series, study_uid=study_uid, root=root, study_date=study_date)


_INPUT_HINT = ("Give the folder, or a .zip of the folder, holding the DICOM files of one MRI session "
               "(or several folders, zips or DICOM files of that session).")


def _input_files(path: Path, workdir: Path, gunzip_dir: Path) -> tuple[list[Path], int]:
    """The DICOM files of one input, and how many files it held in all."""
    if path.is_dir():
        return _find_dicom_files(_walk(path), path, gunzip_dir)
    if path.is_file() and (zipfile.is_zipfile(path) or path.suffix.lower() == ".zip"):
        root = Path(tempfile.mkdtemp(prefix="input-", dir=workdir))
        _extract_zip(path, root)
        return _find_dicom_files(_walk(root), root, gunzip_dir)
    if path.is_file():
        found, total = _find_dicom_files([path], path.parent, gunzip_dir)
        if found:
            return found, total
        raise InputError(f"The input '{path.name}' is neither a folder, a .zip archive nor a DICOM file.",
                         hint=_INPUT_HINT)
    raise InputError(f"The input '{path.name}' does not exist.", hint="Check the path.")


# ------------------------------------------------------------------------------------------ archives


def _extract_zip(archive: Path, dest: Path) -> None:
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


_ARCHIVE_HINT = "Re-create the archive from the session's DICOM folder, or give the folder itself."
_LIMITS_HINT = ("Give only the DICOM files of one MRI session; if this is one, unpack it yourself and give the folder "
                "(the limits guard against archives made to fill the disk).")


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


# ------------------------------------------------------------------------------------- finding files


def _find_dicom_files(paths: Iterable[Path], root: Path, gunzip_dir: Path) -> tuple[list[Path], int]:
    """The files among `paths` (all under `root`) that look like DICOM, and how many files there were in all.

    Some archives store each DICOM file gzip-compressed (.dcm.gz); those are decompressed into `gunzip_dir`.
    """
    found: list[Path] = []
    total = 0
    budget = MAX_UNPACKED_BYTES
    for path in paths:
        total += 1
        kind = _sniff(path)
        if kind == "gzip" and _sniff_gzip(path) == "dicom":
            out = gunzip_dir / path.relative_to(root).with_suffix("")
            budget -= _gunzip(path, out, budget)
            path, kind = out, _sniff(out)
        if kind == "dicom":
            found.append(path)
    logger.debug("ignored %d files that are not DICOM (READMEs, pictures, system files...)", total - len(found))
    return found, total


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _sniff(path: Path) -> str | None:
    """'dicom', 'gzip' or None, from the first bytes; avoids force-parsing arbitrary junk as DICOM."""
    try:
        with open(path, "rb") as fh:
            return _kind(fh.read(132))
    except OSError:
        return None


def _sniff_gzip(path: Path) -> str | None:
    """What a .gz file holds, from its first decompressed bytes (a .nii.gz is not worth unpacking)."""
    try:
        with gzip.open(path, "rb") as fh:
            return _kind(fh.read(132))
    except (OSError, EOFError):
        return None


def _kind(head: bytes) -> str | None:
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    # Old files without preamble start directly with a little-endian group 0002 or 0008 tag.
    if head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) >= 8:
        return "dicom"
    return None


def _gunzip(src: Path, out: Path, budget: int) -> int:
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


# -------------------------------------------------------------------------------------- reading headers


@dataclass
class _Image:
    """One image object: its header (no pixels) and path."""

    path: Path
    ds: Dataset


def _read_images(files: list[Path]) -> list[_Image]:
    images: list[_Image] = []
    seen: set[str] = set()
    skipped = duplicates = 0
    incomplete: dict[str, int] = {}
    for path in files:
        ds, pixels_at = _read_header_and_pixel_offset(path)
        if ds is None or not _is_image(ds):
            skipped += 1
            continue
        if _pixel_data_short(path, ds, pixels_at):
            label = series_label(_int(ds.get("SeriesNumber")), _text(ds.get("SeriesDescription")))
            incomplete[label] = incomplete.get(label, 0) + 1
            continue
        # The same instance twice (a folder exported alongside its own copy) would look like a repeated volume.
        sop_uid = str(ds.get("SOPInstanceUID", "")) or str(path)
        if sop_uid in seen:
            duplicates += 1
            continue
        seen.add(sop_uid)
        images.append(_Image(path, ds))
    logger.debug("skipped %d DICOM objects that are unreadable or carry no image, and %d duplicate instances",
                 skipped, duplicates)
    for label, count in incomplete.items():
        logger.warning("%s: %d file(s) with missing or truncated pixel data left out", label, count)
    return images


_RAW_PIXEL_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)
_PIXEL_ELEMENT_HEADER = 8  # tag and length (explicit VR adds 4 more: a few bytes' leniency)


def _pixel_data_short(path: Path, ds: Dataset, pixels_at: int) -> bool:
    """True when fewer bytes follow the header (from `pixels_at`) than an uncompressed image needs: a truncated
    copy, or no pixel data at all. Compressed pixel data has no predictable size and is left to dcm2niix."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    if syntax and syntax not in _RAW_PIXEL_SYNTAXES:
        return False
    bits = _int(ds.get("BitsAllocated")) or 16
    values = (_int(ds.get("Rows")) or 0) * (_int(ds.get("Columns")) or 0) * (_int(ds.get("SamplesPerPixel")) or 1)
    expected = values * (_int(ds.get("NumberOfFrames")) or 1) * bits // 8
    return path.stat().st_size - pixels_at - _PIXEL_ELEMENT_HEADER < expected


def _read_header(path: Path) -> Dataset | None:
    return _read_header_and_pixel_offset(path)[0]


def _read_header_and_pixel_offset(path: Path) -> tuple[Dataset | None, int]:
    """The header without pixels, and where the pixel data element starts (the end of the header when there is
    none): stop_before_pixels leaves the file there."""
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
            pixels_at = fh.tell()
        _drop_malformed(ds)
    # force=True parses whatever it is given, and a corrupt file can fail in almost any way; one bad file
    # must not stop the session, so every failure here means "not a usable DICOM file".
    except Exception as exc:  # noqa: BLE001
        logger.debug("unreadable DICOM-like file skipped (%s)", type(exc).__name__)
        return None, 0
    return (ds if _sop_class(ds) and ds.get("SeriesInstanceUID") else None), pixels_at


def _drop_malformed(ds: Dataset) -> None:
    """Parse every standard element now, dropping those pydicom cannot (a US of odd length, an IS of '1e999'):
    pydicom parses values when first read, so a malformed one would otherwise fail later, anywhere. Private
    elements are never read, so never parsed."""
    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        try:
            element = ds[tag]
            for item in element.value if element.VR == "SQ" else ():
                _drop_malformed(item)
        except Exception:  # noqa: BLE001 - pydicom raises many types for malformed values
            del ds[tag]
            logger.debug("malformed DICOM element %s ignored", tag)


def _sop_class(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")


def _is_image(ds: Dataset) -> bool:
    return (
        not _sop_class(ds).startswith(_NON_IMAGE_SOP_PREFIXES)
        and bool(ds.get("Rows"))
        and bool(ds.get("Columns"))
    )


# ------------------------------------------------------------------------------------ building series


@dataclass
class _Stats:
    """Per-series tallies over all images (and frames, for enhanced multi-frame objects)."""

    images: int = 0
    acquisition_times: list[float] = field(default_factory=list)
    echoes: set = field(default_factory=set)
    temporal: set = field(default_factory=set)
    declared_temporal: int = 1
    orientations: list = field(default_factory=list)  # one ImageOrientationPatient per distinct orientation
    positions: dict = field(default_factory=dict)  # (position, echo, image type) -> count

    def add(self, ds: Dataset) -> None:
        if "PerFrameFunctionalGroupsSequence" in ds:
            self._add_enhanced(ds)
        else:
            self._add_classic(ds)
        self.declared_temporal = max(self.declared_temporal, _int(ds.get("NumberOfTemporalPositions")) or 1)

    def _add_classic(self, ds: Dataset) -> None:
        self.images += 1
        echo = _echo(ds)
        self.echoes.add(echo)
        if ds.get("TemporalPositionIdentifier") is not None:
            self.temporal.add(_int(ds.get("TemporalPositionIdentifier")))
        self._orientation(ds.get("ImageOrientationPatient"))
        t = _seconds(ds.get("AcquisitionTime"))
        if t is not None:
            self.acquisition_times.append(t)
        position = _rounded(ds.get("ImagePositionPatient"), 1)
        if position is not None:
            key = (position, echo, tuple(ds.get("ImageType") or ()))
            self.positions[key] = self.positions.get(key, 0) + 1

    def _add_enhanced(self, ds: Dataset) -> None:
        frames = ds.PerFrameFunctionalGroupsSequence
        self.images += _int(ds.get("NumberOfFrames")) or len(frames)
        t = _seconds_from_datetime(ds.get("AcquisitionDateTime"))
        if t is not None:
            self.acquisition_times.append(t)
        for frame in frames:
            self.echoes.add(_rounded_float(_group_value(ds, "MREchoSequence", "EffectiveEchoTime", frame), 1))
            index = _group_value(ds, "FrameContentSequence", "TemporalPositionIndex", frame)
            if index is not None:
                self.temporal.add(_int(index))
            self._orientation(_group_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient", frame))

    def _orientation(self, iop) -> None:
        rounded = _rounded(iop, 6)
        if rounded is None or len(rounded) != 6:  # absent or malformed: no orientation to count or split by
            return
        if not any(_same_orientation(rounded, o) for o in self.orientations):
            self.orientations.append(rounded)

    def temporal_positions(self) -> int:
        # Repeats of one slice position (same echo, same image type) mean repeated volumes: a time series,
        # also on scanners that write no temporal position attributes (e.g. Siemens DSC without mosaic).
        repeats = max(self.positions.values(), default=1)
        return max(self.declared_temporal, len(self.temporal), repeats, 1)


def _echo(ds: Dataset) -> float | None:
    """Which echo a classic image holds: its TE (what makes PD and T2 of a dual-echo differ), else its number."""
    return _rounded_float(ds.get("EchoTime"), 1) or _float(ds.get("EchoNumbers"))


def _same_orientation(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= ORIENTATION_TOLERANCE for x, y in zip(a, b))


def _build_series(images: list[_Image]) -> list[Series]:
    groups: dict[str, list[_Image]] = {}
    for image in images:
        groups.setdefault(str(image.ds.SeriesInstanceUID), []).append(image)
    series = []
    for uid, members in groups.items():
        members.sort(key=lambda im: (_int(im.ds.get("InstanceNumber")) or 0, str(im.path)))
        for part, stack in _stacks(members).items():
            stats = _Stats()
            for image in stack:
                stats.add(image.ds)
            series.append(Series(header=_header(uid, part, stack[0].ds, stats), files=[im.path for im in stack]))
    series.sort(key=lambda s: (s.header.series_number is None, s.header.series_number or 0, s.header.series_uid,
                               s.header.part))
    return series


def _stacks(members: list[_Image]) -> dict[str, list[_Image]]:
    """One series' images split into stacks of one orientation and one echo, keyed by part name ('' if whole).

    Scanners may put a 3-plane localizer, an acquired stack with its reformat, or both echoes of a dual-echo
    PD/T2 under one SeriesInstanceUID; each stack is a different image, identified and converted on its own.
    Parts are named from content alone (plane, then echo in TE order: 'ax', 'cor_e2'), so names are stable.
    An enhanced object holding several stacks in one file cannot be split by file: that series stays whole.
    """
    signatures = []
    for image in members:
        stats = _Stats()
        stats.add(image.ds)
        if len(stats.orientations) != 1 or len(stats.echoes) != 1:
            return {"": members}
        signatures.append((stats.orientations[0], next(iter(stats.echoes))))
    orientations: list[tuple[float, ...]] = []
    for iop, _ in signatures:
        if not any(_same_orientation(iop, o) for o in orientations):
            orientations.append(iop)
    echoes = sorted({echo for _, echo in signatures}, key=lambda e: (e is None, e or 0.0))
    if len(orientations) == 1 and len(echoes) == 1:
        return {"": members}
    plane_names = _plane_names(sorted(orientations)) if len(orientations) > 1 else {}
    stacks: dict[str, list[_Image]] = {}
    for image, (iop, echo) in zip(members, signatures):
        plane = next((name for o, name in plane_names.items() if _same_orientation(iop, o)), "")
        echo_name = f"e{echoes.index(echo) + 1}" if len(echoes) > 1 else ""
        stacks.setdefault("_".join(n for n in (plane, echo_name) if n), []).append(image)
    logger.info("%s mixes %d orientation(s) and %d echo(es): identified as %d separate parts (%s)",
                series_label(_int(members[0].ds.get("SeriesNumber")), _text(members[0].ds.get("SeriesDescription"))),
                len(orientations), len(echoes), len(stacks), ", ".join(sorted(stacks)))
    return dict(sorted(stacks.items()))


def _plane_names(orientations: list[tuple[float, ...]]) -> dict[tuple[float, ...], str]:
    """'sag', 'cor' or 'ax' from each stack's slice normal; numbered when two stacks share a plane (oblique)."""
    planes = {}
    for iop in orientations:
        normal = [abs(v) for v in _cross(iop[:3], iop[3:6])]
        planes[iop] = ("sag", "cor", "ax")[normal.index(max(normal))]
    counts = {name: list(planes.values()).count(name) for name in set(planes.values())}
    seen: dict[str, int] = {}
    for iop, name in planes.items():
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            planes[iop] = f"{name}{seen[name]}"
    return planes


def _cross(a, b) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _header(uid: str, part: str, ds: Dataset, stats: _Stats) -> SeriesHeader:
    """Summarise one series (or part) from its first image (and its enhanced functional groups) plus the tallies."""
    return SeriesHeader(
        series_uid=uid,
        part=part,
        series_number=_int(ds.get("SeriesNumber")),
        description=_text(ds.get("SeriesDescription")),
        protocol=_text(ds.get("ProtocolName")),
        modality=_text(ds.get("Modality")),
        manufacturer=_text(ds.get("Manufacturer")),
        model=_text(ds.get("ManufacturerModelName")),
        sop_class_uid=_sop_class(ds),
        repetition_time=_float(_value(ds, "RepetitionTime", "MRTimingAndRelatedParametersSequence")),
        echo_time=_float(ds.get("EchoTime")) or _float(_group_value(ds, "MREchoSequence", "EffectiveEchoTime")),
        inversion_time=_inversion_time(ds),
        flip_angle=_float(_value(ds, "FlipAngle", "MRTimingAndRelatedParametersSequence")),
        scanning_sequence=_multi(ds.get("ScanningSequence")) or _enhanced_scanning_sequence(ds),
        sequence_variant=_multi(ds.get("SequenceVariant")) or _enhanced_sequence_variant(ds),
        sequence_name=_text(ds.get("SequenceName")) or _text(ds.get("PulseSequenceName")),
        scan_options=_multi(ds.get("ScanOptions")),
        mr_acquisition_type=_text(ds.get("MRAcquisitionType")).upper(),
        image_type=_multi(ds.get("ImageType")),
        contrast_agent=_contrast_agent(ds),
        contrast_ingredient=_text(ds.get("ContrastBolusIngredient")),
        acquisition_time=min(stats.acquisition_times) if stats.acquisition_times else _seconds(ds.get("SeriesTime")),
        num_images=stats.images,
        slice_thickness=_float(_value(ds, "SliceThickness", "PixelMeasuresSequence")),
        pixel_spacing=_pair(_value(ds, "PixelSpacing", "PixelMeasuresSequence")),
        orientation=_rounded(_value(ds, "ImageOrientationPatient", "PlaneOrientationSequence"), 6),
        rows=_int(ds.get("Rows")) or 0,
        columns=_int(ds.get("Columns")) or 0,
        study_uid=_text(ds.get("StudyInstanceUID")),
        frame_of_reference_uid=_text(ds.get("FrameOfReferenceUID")),
        num_echoes=max(len(stats.echoes - {None}), 1),
        num_temporal_positions=stats.temporal_positions(),
        num_orientations=max(len(stats.orientations), 1),
    )


def _single_study(series: list[Series]) -> str:
    studies: dict[str, list[Series]] = {}
    for s in series:
        studies.setdefault(s.header.study_uid, []).append(s)
    if len(studies) == 1:
        return next(iter(studies))
    listing = "; ".join(
        f"study {i}: " + ", ".join(s.header.label for s in members)
        for i, members in enumerate(studies.values(), start=1)
    )
    raise InputError(
        f"The input holds {len(studies)} different studies (MRI sessions): {listing}.",
        hint="Give one study at a time, e.g. one folder or .zip per session.",
    )


def _single_patient(images: list[_Image]) -> None:
    """One study holding two PatientIDs is a mixed export or a broken anonymisation: which images belong to the
    child cannot be told. The message lists series per patient, never the identifiers."""
    patients: dict[str, set[str]] = {}
    for image in images:
        patient_id = _text(image.ds.get("PatientID"))
        if patient_id:
            label = series_label(_int(image.ds.get("SeriesNumber")), _text(image.ds.get("SeriesDescription")))
            patients.setdefault(patient_id, set()).add(label)
    if len(patients) > 1:
        listing = "; ".join(f"patient {i}: " + ", ".join(sorted(labels))
                            for i, labels in enumerate(patients.values(), start=1))
        raise InputError(
            f"The input holds images of {len(patients)} different patients (different PatientIDs): {listing}.",
            hint="Give the session of one patient at a time; if all series are the same child, correct the "
                 "PatientID of the odd series (e.g. re-export them) before running.",
        )


# ------------------------------------------------------------------------ enhanced multi-frame helpers


def _group_value(ds: Dataset, sequence: str, attr: str, frame: Dataset | None = None):
    """`attr` inside functional-group `sequence`: the given frame's groups first, then the shared groups,
    then the first frame's (enhanced objects may put any group in either place)."""
    candidates = [frame] if frame is not None else []
    for groups_name in _ENHANCED_FUNCTIONAL_GROUPS:
        groups = ds.get(groups_name)
        if groups:
            candidates.append(groups[0])
    for groups in candidates:
        items = groups.get(sequence)
        if items and attr in items[0]:
            return items[0][attr].value
    return None


def _value(ds: Dataset, attr: str, sequence: str):
    """Top-level `attr` (classic objects), else the same attribute in an enhanced functional group."""
    value = ds.get(attr)
    if value is not None and value != "":
        return value
    return _group_value(ds, sequence, attr)


def _inversion_time(ds: Dataset) -> float | None:
    recovery = _text(_group_value(ds, "MRModifierSequence", "InversionRecovery")).upper()
    times = _group_value(ds, "MRModifierSequence", "InversionTimes")
    ti = _float(times) if recovery == "YES" and times is not None else _float(ds.get("InversionTime"))
    return ti or None  # Philips writes TI 0 for sequences without inversion


def _enhanced_scanning_sequence(ds: Dataset) -> tuple[str, ...]:
    """Classic ScanningSequence terms from the enhanced MR pulse-sequence attributes."""
    echo_types = {"SPIN": ("SE",), "GRADIENT": ("GR",), "BOTH": ("SE", "GR")}
    echo = echo_types.get(_text(ds.get("EchoPulseSequence")).upper(), ())
    extra = ()
    if _text(_group_value(ds, "MRModifierSequence", "InversionRecovery")).upper() == "YES":
        extra += ("IR",)
    if _text(ds.get("EchoPlanarPulseSequence")).upper() == "YES":
        extra += ("EP",)
    return echo + extra


def _enhanced_sequence_variant(ds: Dataset) -> tuple[str, ...]:
    """Classic SequenceVariant terms (SK, SP, SS, MTC, MP) from the enhanced MR attributes."""
    def flag(name: str, sequence: str = "MRModifierSequence") -> str:
        return _text(ds.get(name) or _group_value(ds, sequence, name)).upper()

    variant = []
    if flag("SegmentedKSpaceTraversal") not in ("", "SINGLE"):
        variant.append("SK")
    if flag("Spoiling") in ("RF", "GRADIENT", "RF_AND_GRADIENT"):
        variant.append("SP")
    if flag("SteadyStatePulseSequence") not in ("", "NONE"):
        variant.append("SS")
    if flag("MagnetizationTransfer", "MRImagingModifierSequence") not in ("", "NONE"):
        variant.append("MTC")
    if flag("InversionRecovery") == "YES" or flag("T2Preparation") == "YES":
        variant.append("MP")
    return tuple(variant)


def _contrast_agent(ds: Dataset) -> str:
    agent = _text(ds.get("ContrastBolusAgent"))
    if agent:
        return agent
    # Enhanced objects code the agent, and say per frame whether it was given.
    coded = ds.get("ContrastBolusAgentSequence")
    if coded:
        return _text(coded[0].get("CodeMeaning")) or "coded agent"
    administered = _group_value(ds, "ContrastBolusUsageSequence", "ContrastBolusAgentAdministered")
    return "administered" if _text(administered).upper() == "YES" else ""


# -------------------------------------------------------------------------------- value conversion


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _multi(value) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\") if v.strip())
    return tuple(str(v).strip().upper() for v in value if str(v).strip())


def _float(value) -> float | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None  # 'nan', '1e999': no usable measurement


def _int(value) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _pair(value) -> tuple[float, float] | None:
    rounded = _rounded(value, 6)
    return (rounded[0], rounded[1]) if rounded is not None and len(rounded) >= 2 else None


def _rounded_float(value, digits: int) -> float | None:
    number = _float(value)
    return round(number, digits) if number is not None else None


def _rounded(value, digits: int) -> tuple[float, ...] | None:
    if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0:
        return None
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in numbers):
        return None
    return tuple(round(v, digits) + 0.0 for v in numbers)  # + 0.0 folds -0.0 into 0.0


def _seconds(value) -> float | None:
    """DICOM TM ('HHMMSS.frac', or the old 'HH:MM:SS') to seconds after midnight."""
    text = _text(value).replace(":", "")
    match = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?", text)
    if not match:
        return None
    hours, minutes, secs, frac = match.groups()
    return int(hours) * 3600 + int(minutes or 0) * 60 + int(secs or 0) + float(frac or 0)


def _seconds_from_datetime(value) -> float | None:
    text = _text(value)
    return _seconds(text[8:]) if len(text) > 8 else None


# --------------------------------------------------------------------------------------- conversion

# dcm2niix file-name suffixes for volumes that are not the magnitude image.
_NOT_MAGNITUDE = re.compile(r"^(ph|phMag|real|imaginary|ROI\d*|fieldmaphz|ADC|c\d+)$")


def convert_series(series: Series, outdir: Path) -> Path:
    """Convert one series to `outdir/series<N>.nii.gz` (`series<N>_<part>` for part of a split series), plus its
    BIDS .json sidecar, with dcm2niix."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    h = series.header
    _check_slice_spacing(series)
    name = _output_name(h)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=outdir))
    try:
        indir, rawdir = scratch / "in", scratch / "out"
        indir.mkdir()
        rawdir.mkdir()
        _stage_files(series.files, indir)
        _run_dcm2niix(h, name, indir, rawdir)
        try:
            chosen = _pick_primary(h, name, sorted(rawdir.glob(f"{name}*.nii.gz")))
            gzip_length(chosen)  # a truncated .nii.gz reads back as zeros, not as an error
        except (RuntimeError, OSError, EOFError, zlib.error) as exc:  # SimpleITK raises only RuntimeError
            raise UnsupportedDataError(f"dcm2niix wrote an unreadable image for {h.label}.",
                                       hint="Export the series again from the scanner or PACS; if that does not "
                                            "help, report it with the dcm2niix version from provenance.json.") from exc
        target = outdir / f"{name}.nii.gz"
        sidecar = chosen.with_name(chosen.name[: -len(".nii.gz")] + ".json")
        if sidecar.exists():
            _write_sidecar(sidecar, outdir / f"{name}.json")
        os.replace(chosen, target)  # same filesystem: atomic, never a half-written final file
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# Slice gaps within this fraction of the usual spacing (or of a whole multiple of it) count as regular.
SLICE_SPACING_TOLERANCE = 0.1


def _check_slice_spacing(series: Series) -> None:
    """Refuse a stack with missing slices or uneven spacing: dcm2niix would interpolate across the gap (its "_Eq"
    volume), silently changing every volume measured there, where a re-export fixes it."""
    h = series.header
    if h.orientation is None or len(h.orientation) != 6 or h.num_orientations > 1:
        return
    normal = np.cross(h.orientation[:3], h.orientation[3:])
    if not 0.9 < np.linalg.norm(normal) < 1.1:  # not two unit direction cosines at right angles
        return
    positions = sorted({round(float(np.dot(p, normal)), 2) for p in _slice_positions(series.files)})
    if len(positions) < 3:
        return
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    multiples = np.round(gaps / step)
    if np.any(np.abs(gaps / step - multiples) > SLICE_SPACING_TOLERANCE):
        raise UnsupportedDataError(
            f"{h.label} has uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm between neighbouring "
            f"slices), so it is not one regular 3D stack.",
            hint="Export the series again from the scanner or PACS; if it was acquired this way, leave it out "
                 "and include another series of the same kind.")
    missing = int((multiples - 1).sum())
    if missing:
        first = int(np.argmax(multiples > 1))
        raise InputError(
            f"{h.label} is incomplete: {missing} slice(s) missing (a gap of {gaps[first]:.1f} mm after slice "
            f"{first + 1} of {len(positions)}, where slices are {step:.1f} mm apart).",
            hint="Export the complete series again from the scanner or PACS (a damaged or truncated file is left "
                 "out, which leaves such a gap).")


def _slice_positions(files: list[Path]) -> list[tuple[float, ...]]:
    """ImagePositionPatient of every image, or of every frame of an enhanced multi-frame object."""
    positions = []
    for path in files:
        ds = _read_header(path)
        frames = ds.get("PerFrameFunctionalGroupsSequence") if ds is not None else None
        values = ([_group_value(ds, "PlanePositionSequence", "ImagePositionPatient", frame) for frame in frames]
                  if frames else [ds.get("ImagePositionPatient")] if ds is not None else [])
        positions += [v for v in (_rounded(value, 3) for value in values) if v is not None and len(v) == 3]
    return positions


# dcm2niix's BIDS anonymisation (-ba y) drops patient fields but keeps where the scan was made.
_SIDECAR_IDENTIFYING = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
                        "DeviceSerialNumber")


def _write_sidecar(src: Path, target: Path) -> None:
    sidecar = {k: v for k, v in json.loads(src.read_text(encoding="utf-8")).items() if k not in _SIDECAR_IDENTIFYING}
    write_text(target, json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")


def _output_name(h: SeriesHeader) -> str:
    if h.series_number is None:
        return "series_" + hashlib.sha1(h.key.encode()).hexdigest()[:8]
    return f"series{h.series_number}_{h.part}" if h.part else f"series{h.series_number}"


def _stage_files(files: list[Path], indir: Path) -> None:
    """Only this series' files, so dcm2niix cannot pick up neighbours (or the Raw objects beside them)."""
    for i, src in enumerate(files):
        link = indir / f"{i:06d}.dcm"
        try:
            link.symlink_to(Path(src).resolve())
        except OSError:
            shutil.copy2(src, link)


def _run_dcm2niix(h: SeriesHeader, name: str, indir: Path, rawdir: Path) -> None:
    cmd = [dcm2niix.bin, "-z", "y", "-b", "y", "-ba", "y", "-f", name, "-o", str(rawdir), str(indir)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=DCM2NIIX_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ResourceError(f"dcm2niix took longer than {DCM2NIIX_TIMEOUT_S} s on {h.label}.",
                            hint="Run again on a less busy machine; if it happens again, check that the series "
                                 "is an ordinary image series.") from exc
    logger.debug("dcm2niix on %s (exit %d): %s", h.label, result.returncode, result.stdout[-2000:])
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UnsupportedDataError(
            f"dcm2niix could not convert {h.label} (exit code {result.returncode}: {' / '.join(tail)}).",
            hint="Check that the series is complete; if it is, export it again from the scanner or PACS.",
        )


def _pick_primary(h: SeriesHeader, name: str, outputs: list[Path]) -> Path:
    """The magnitude, first-echo, largest volume among dcm2niix's outputs for one series."""
    if not outputs:
        raise UnsupportedDataError(f"dcm2niix wrote no image for {h.label}.",
                                   hint="Check that the series is complete and holds image data.")
    ranked = []
    for path in outputs:
        suffix = path.name[len(name): -len(".nii.gz")]
        letters, _, rest = suffix.partition("_")
        tokens = rest.split("_") if rest else []
        if any(_NOT_MAGNITUDE.match(t) for t in tokens):
            continue
        echo = next((int(t[1:]) for t in tokens if re.fullmatch(r"e\d+", t)), 1)
        # _Eq: resampled to equal slice spacing (the geometrically right one); _Tilt: gantry tilt corrected.
        corrected = any(t in ("Eq", "Tilt") for t in tokens)
        ranked.append(((echo, not corrected, -_voxels(path), letters, path.name), path))
    if not ranked:
        raise UnsupportedDataError(
            f"dcm2niix wrote only phase, real/imaginary or derived maps for {h.label}, no magnitude image.",
            hint="Export the magnitude images of this series.")
    ranked.sort()
    chosen = ranked[0][1]
    if len(outputs) > 1:
        logger.info("%s: dcm2niix wrote %d volumes (%s); using %s (magnitude, echo %d, largest volume)",
                    h.label, len(outputs), ", ".join(p.name for p in outputs), chosen.name, ranked[0][0][0])
    return chosen


def _voxels(path: Path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    count = 1
    for n in reader.GetSize():
        count *= n
    return count
