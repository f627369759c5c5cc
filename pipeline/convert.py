"""Conversion: one series to NIfTI with dcm2niix (the binary of the `dcm2niix` wheel).

Owns the checks that a series is one regular stack before converting it (sound geometry values in every header,
one matrix size, no missing slices, even spacing), running dcm2niix on that series' files alone, under a name
of its own (two series never share an output file), picking the primary volume among its outputs (magnitude,
first echo, largest) and keeping its BIDS sidecar without the fields that say where the scan was made.
Messages name series by number and description only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import dcm2niix
import numpy as np
import SimpleITK as sitk

from pedseg.pipeline.atomic import gzip_length, write_text
from pedseg.pipeline.dicom_header import as_float, as_int, as_text, group_value, read_header, rounded
from pedseg.pipeline.errors import InputError, ResourceError, UnsupportedDataError
from pedseg.pipeline.types import Series, SeriesHeader

logger = logging.getLogger(__name__)

DCM2NIIX_TIMEOUT_S = 900
# Slice gaps within this fraction of the usual spacing (or of a whole multiple of it) count as regular.
SLICE_SPACING_TOLERANCE = 0.1
# dcm2niix file-name suffixes for volumes that are not the magnitude image.
_NOT_MAGNITUDE = re.compile(r"^(ph|phMag|real|imaginary|ROI\d*|fieldmaphz|ADC|c\d+)$")
# dcm2niix's BIDS anonymisation (-ba y) drops patient fields but keeps where the scan was made.
_SIDECAR_IDENTIFYING = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
                        "DeviceSerialNumber")


def convert_series(series: Series, outdir: Path) -> Path:
    """Convert one series to `outdir/series<N>.nii.gz` (`series<N>_<part>` for part of a split series), plus its
    BIDS .json sidecar, with dcm2niix. When `outdir` already holds that name (another series with the same
    SeriesNumber: merged exports, a second console), the name gets a short hash of the series' UID and part,
    `series<N>_<hash>`, so one series' image never replaces another's."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    h = series.header
    files = checked_files(series)
    name = _output_name(h, outdir)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=outdir))
    try:
        indir, rawdir = scratch / "in", scratch / "out"
        indir.mkdir()
        rawdir.mkdir()
        _stage_files(files, indir)
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


# ------------------------------------------------------------------------------------- slice geometry


def check_slice_spacing(series: Series) -> None:
    """Everything conversion checks first (`checked_files`)."""
    checked_files(series)


def checked_files(series: Series) -> list[Path]:
    """The files of `series` to convert, once the headers of every image passed the checks: sound geometry
    values (`check_geometry`), one matrix size (`_one_matrix`), then one regular stack: a stack with missing
    slices or uneven spacing is refused, as dcm2niix would interpolate across the gap (its "_Eq" volume),
    silently changing every volume measured there, where a re-export fixes it."""
    h = series.header
    images = [(path, ds) for path, ds in ((path, read_header(path)) for path in series.files) if ds is not None]
    check_geometry(h, [ds for _, ds in images])
    part = _one_matrix(h, images)
    _check_spacing(h, [ds for _, ds in part])
    return [path for path, _ in part] if len(part) < len(images) else list(series.files)


def _check_spacing(h: SeriesHeader, headers: list) -> None:
    if h.orientation is None or len(h.orientation) != 6 or h.num_orientations > 1:
        return
    normal = np.cross(h.orientation[:3], h.orientation[3:])  # row cosines × column cosines
    if not 0.9 < np.linalg.norm(normal) < 1.1:  # not two unit direction cosines at right angles
        return
    positions = sorted({round(float(np.dot(p, normal)), 2) for p in _slice_positions(headers)})
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


def _slice_positions(headers: list) -> list[tuple[float, ...]]:
    """ImagePositionPatient of every image, or of every frame of an enhanced multi-frame object."""
    positions = []
    for ds in headers:
        frames = ds.get("PerFrameFunctionalGroupsSequence")
        values = ([group_value(ds, "PlanePositionSequence", "ImagePositionPatient", frame) for frame in frames]
                  if frames else [ds.get("ImagePositionPatient")])
        positions += [v for v in (rounded(value, 3) for value in values) if v is not None and len(v) == 3]
    return positions


# ------------------------------------------------------------------------------------------ geometry values

# Direction cosines are unit vectors at right angles; a header's rounding leaves far less error than this.
_COSINE_TOLERANCE = 0.01
_GEOMETRY_HINT = ("Export the series again from the scanner or PACS (the original images, not a copy an anonymiser "
                  "or converter edited); if it stays so, leave this series out and include another of the same kind.")


def check_geometry(h: SeriesHeader, headers: list) -> None:
    """Refuse a series whose headers record a voxel size, orientation, position or matrix that is absent, not a
    number or impossible (NaN or negative PixelSpacing, no ImageOrientationPatient...): dcm2niix would convert it
    anyway, into an image of the wrong size or orientation, or fail much later. Checked in every image (every
    frame of an enhanced object), before conversion; the message quotes the first fault found."""
    faults = [problem for problem in map(geometry_problem, headers) if problem]
    if faults:
        count = f"all {len(headers)}" if len(faults) == len(headers) else f"{len(faults)} of its {len(headers)}"
        raise UnsupportedDataError(
            f"{h.label} has {faults[0]} in the DICOM headers of {count} images, so the size, orientation or "
            f"position of its voxels cannot be trusted; it is not converted.", hint=_GEOMETRY_HINT)


def _one_matrix(h: SeriesHeader, images: list[tuple[Path, object]]) -> list[tuple[Path, object]]:
    """The images of one matrix size (Rows × Columns). dcm2niix splits a series of several sizes and would keep
    only the largest part, dropping the rest of the acquisition; so a series of several sizes is converted only
    when one part covers every slice position of the series (the other parts are a second reconstruction of
    slices it holds too), and then only that part (the largest matrix, if several do). Otherwise it is refused."""
    parts: dict[tuple[int, int], list] = {}
    for path, ds in images:
        parts.setdefault((as_int(ds.get("Rows")) or 0, as_int(ds.get("Columns")) or 0), []).append((path, ds))
    if len(parts) == 1:
        return images
    everywhere = _slice_locations(h, [ds for _, ds in images])
    whole = [size for size, members in parts.items()
             if everywhere and _slice_locations(h, [ds for _, ds in members]) == everywhere]
    listing = ", ".join(f"{len(members)} of {rows}×{cols}"
                        for (rows, cols), members in sorted(parts.items(), key=lambda item: -len(item[1])))
    if not whole:
        raise UnsupportedDataError(
            f"{h.label} mixes images of {len(parts)} matrix sizes ({listing} pixels) and none of them holds every "
            f"slice: converting one part would drop the rest of the acquisition.",
            hint="Export the series again from the scanner or PACS; if it was acquired or reconstructed this way, "
                 "leave it out and include another series of the same kind.")
    chosen = max(whole, key=lambda size: (size[0] * size[1], len(parts[size])))
    logger.info("%s mixes images of %d matrix sizes (%s pixels); converting the %d×%d images, which hold every "
                "slice", h.label, len(parts), listing, *chosen)
    return parts[chosen]


def _slice_locations(h: SeriesHeader, headers: list) -> set[float]:
    """Where the slices lie along the stack's normal (0.1 mm), or an empty set when that is unknown."""
    if h.orientation is None or len(h.orientation) != 6 or h.num_orientations > 1:
        return set()
    normal = np.cross(h.orientation[:3], h.orientation[3:])
    return {round(float(np.dot(p, normal)), 1) for p in _slice_positions(headers)}


def geometry_problem(ds) -> str | None:
    """What is wrong with the geometry one image's header records (for an enhanced object, every frame's
    functional groups), in words that quote the value; None when Rows, Columns, PixelSpacing,
    ImageOrientationPatient and ImagePositionPatient are present, finite and possible, and SliceThickness, when
    recorded, is a positive number."""
    for attr in ("Rows", "Columns"):
        if (as_float(ds.get(attr)) or 0) < 1:
            return _fault(attr, ds.get(attr), "a positive number of pixels")
    frames = ds.get("PerFrameFunctionalGroupsSequence") or [None]
    for index, frame in enumerate(frames):
        problem = _frame_geometry_problem(ds, frame)
        if problem:
            return f"{problem} (frame {index + 1})" if frame is not None else problem
    return None


def _frame_geometry_problem(ds, frame) -> str | None:
    def value(attr: str, sequence: str):
        found = ds.get(attr)
        if found is None or found == "":
            found = group_value(ds, sequence, attr, frame)
        return found

    spacing = value("PixelSpacing", "PixelMeasuresSequence")
    numbers = _numbers(spacing)
    if numbers is None or len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
        return _fault("PixelSpacing", spacing, "the pixel size: two positive numbers of mm")
    thickness = value("SliceThickness", "PixelMeasuresSequence")
    if thickness is not None and thickness != "":
        numbers = _numbers(thickness)
        if numbers is None or len(numbers) != 1 or not (math.isfinite(numbers[0]) and numbers[0] > 0):
            return _fault("SliceThickness", thickness, "a positive number of mm")
    orientation = value("ImageOrientationPatient", "PlaneOrientationSequence")
    if not _cosines(_numbers(orientation)):
        return _fault("ImageOrientationPatient", orientation,
                      "which way rows and columns run: two unit direction cosines at right angles")
    position = value("ImagePositionPatient", "PlanePositionSequence")
    numbers = _numbers(position)
    if numbers is None or len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
        return _fault("ImagePositionPatient", position, "where the slice lies: three coordinates in mm")
    return None


def _numbers(value) -> list[float] | None:
    """Every number of a (multi-)value, NaN and infinity included; None when absent or not numbers."""
    if value is None or value == "":
        return None
    values = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _cosines(numbers: list[float] | None) -> bool:
    if numbers is None or len(numbers) != 6 or not all(math.isfinite(v) for v in numbers):
        return False
    row, col = np.array(numbers[:3]), np.array(numbers[3:])
    return (abs(np.linalg.norm(row) - 1) <= _COSINE_TOLERANCE and abs(np.linalg.norm(col) - 1) <= _COSINE_TOLERANCE
            and abs(float(np.dot(row, col))) <= _COSINE_TOLERANCE)


def _fault(attr: str, value, meaning: str) -> str:
    """How a message names a missing or impossible geometry value: 'no PixelSpacing (...)', or the value quoted
    (geometry numbers, never identifiers), cut to 40 characters."""
    text = as_text(value)
    if not text:
        return f"no {attr} ({meaning})"
    return f"{attr} '{text if len(text) <= 40 else text[:37] + '...'}' (which should be {meaning})"


# ------------------------------------------------------------------------------------------- dcm2niix


def _output_name(h: SeriesHeader, outdir: Path) -> str:
    """`series<N>` (`series<N>_<part>`) when that name is free in `outdir`, else that name plus a short hash of the
    series key (UID and part): two series sharing a SeriesNumber never share a file (and the readable name a
    previous conversion of another series took is never overwritten)."""
    tag = hashlib.sha1(h.key.encode()).hexdigest()[:8]
    if h.series_number is None:
        return f"series_{tag}"
    readable = f"series{h.series_number}_{h.part}" if h.part else f"series{h.series_number}"
    taken = any((outdir / f"{readable}{ext}").exists() for ext in (".nii.gz", ".json"))
    return f"{readable}_{tag}" if taken else readable


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


def _write_sidecar(src: Path, target: Path) -> None:
    sidecar = {k: v for k, v in json.loads(src.read_text(encoding="utf-8")).items() if k not in _SIDECAR_IDENTIFYING}
    write_text(target, json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
