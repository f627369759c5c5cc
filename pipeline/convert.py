"""Conversion: one series to NIfTI with dcm2niix (the binary of the `dcm2niix` wheel).

Owns the checks that a series is one regular stack before converting it (no missing slices, even spacing),
running dcm2niix on that series' files alone, picking the primary volume among its outputs (magnitude, first
echo, largest) and keeping its BIDS sidecar without the fields that say where the scan was made.
Messages name series by number and description only.
"""
from __future__ import annotations

import hashlib
import json
import logging
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
from pedseg.pipeline.dicom_header import group_value, read_header, rounded
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
    BIDS .json sidecar, with dcm2niix."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    h = series.header
    check_slice_spacing(series)
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


# ------------------------------------------------------------------------------------- slice geometry


def check_slice_spacing(series: Series) -> None:
    """Refuse a stack with missing slices or uneven spacing: dcm2niix would interpolate across the gap (its "_Eq"
    volume), silently changing every volume measured there, where a re-export fixes it."""
    h = series.header
    if h.orientation is None or len(h.orientation) != 6 or h.num_orientations > 1:
        return
    normal = np.cross(h.orientation[:3], h.orientation[3:])  # row cosines × column cosines
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
        ds = read_header(path)
        frames = ds.get("PerFrameFunctionalGroupsSequence") if ds is not None else None
        values = ([group_value(ds, "PlanePositionSequence", "ImagePositionPatient", frame) for frame in frames]
                  if frames else [ds.get("ImagePositionPatient")] if ds is not None else [])
        positions += [v for v in (rounded(value, 3) for value in values) if v is not None and len(v) == 3]
    return positions


# ------------------------------------------------------------------------------------------- dcm2niix


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


def _write_sidecar(src: Path, target: Path) -> None:
    sidecar = {k: v for k, v in json.loads(src.read_text(encoding="utf-8")).items() if k not in _SIDECAR_IDENTIFYING}
    write_text(target, json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
