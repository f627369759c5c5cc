"""DICOM headers: reading one file's header, and summarising a series' header as a `SeriesHeader`.

Owns reading a header without pixels (dropping elements pydicom cannot parse), telling image objects from the
non-image objects that share their series, checking that the pixel data is all there, the helpers that find an
attribute in the functional groups of an enhanced multi-frame object, the conversions of DICOM values (text,
numbers, times) that tolerate malformed values, and `series_header`, the one place a `SeriesHeader` is built
from a pydicom Dataset (the pipeline's own files, or the Flywheel importer's copy of a header). Pixels are read
in two places only, both cheap: a digest of one image when two files claim one SOPInstanceUID
(`pixel_content_digest`), and the distinct values of a few sampled slices of a series (`sampled_pixel_values`).
Nothing here logs patient identifiers.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pedseg.pipeline.types import SeriesHeader, series_label

logger = logging.getLogger(__name__)

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
_RAW_PIXEL_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)
_PIXEL_ELEMENT_HEADER = 8  # tag and length (explicit VR adds 4 more: a few bytes' leniency)


# -------------------------------------------------------------------------------------- reading files


def read_header(path: Path) -> Dataset | None:
    """The header of one DICOM file without pixels; None when it is unreadable or names no SOP class or series."""
    return read_header_and_pixel_offset(path)[0]


def read_header_and_pixel_offset(path: Path) -> tuple[Dataset | None, int]:
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


def pixel_data_short(path: Path, ds: Dataset, pixels_at: int) -> bool:
    """True when fewer bytes follow the header (from `pixels_at`) than an uncompressed image needs: a truncated
    copy, or no pixel data at all. Compressed pixel data has no predictable size and is left to dcm2niix."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    if syntax and syntax not in _RAW_PIXEL_SYNTAXES:
        return False
    bits = as_int(ds.get("BitsAllocated")) or 16
    values = (as_int(ds.get("Rows")) or 0) * (as_int(ds.get("Columns")) or 0) * (as_int(ds.get("SamplesPerPixel")) or 1)
    expected = values * (as_int(ds.get("NumberOfFrames")) or 1) * bits // 8
    return path.stat().st_size - pixels_at - _PIXEL_ELEMENT_HEADER < expected


def _sop_class(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")


def is_image(ds: Dataset) -> bool:
    """An image object with rows and columns, not one of the non-image objects stored beside images."""
    return (
        not _sop_class(ds).startswith(_NON_IMAGE_SOP_PREFIXES)
        and bool(ds.get("Rows"))
        and bool(ds.get("Columns"))
    )


def dataset_label(ds: Dataset) -> str:
    """How messages name the series one header belongs to: number and description, never patient identifiers."""
    return series_label(as_int(ds.get("SeriesNumber")), as_text(ds.get("SeriesDescription")))


# ------------------------------------------------------------------------------------------ pixel content

# Slices read per series to judge its pixel content: enough to find a mask's few labels, few enough to stay cheap.
PIXEL_SAMPLE_SLICES = 5


def pixel_content_digest(path: Path) -> str:
    """A digest of one image's content: its decoded pixels (the stored bytes when they cannot be decoded) and its
    geometry. Equal for two copies of one image, whatever transfer syntax each was written in; read only for
    files that share a SOPInstanceUID. An unreadable file gets a digest of its path: never equal to another."""
    digest = hashlib.sha256()
    try:
        ds = pydicom.dcmread(path, force=True)
        try:
            pixels = np.ascontiguousarray(ds.pixel_array).tobytes()
        except Exception:  # noqa: BLE001 - no decoder, or malformed pixel data: compare the stored bytes
            pixels = bytes(ds.get("PixelData") or b"")
        digest.update(pixels)
        for name in ("ImagePositionPatient", "ImageOrientationPatient"):
            digest.update(repr(rounded(ds.get(name), 3)).encode())
        digest.update(repr((as_int(ds.get("NumberOfFrames")), as_int(ds.get("Rows")),
                            as_int(ds.get("Columns")))).encode())
    # force=True parses whatever it is given; a file that cannot be read cannot be shown to equal another.
    except Exception as exc:  # noqa: BLE001
        logger.debug("pixel content unreadable (%s)", type(exc).__name__)
        digest.update(b"unreadable:" + str(path).encode())
    return digest.hexdigest()


def sampled_pixel_values(images: list[tuple[Path, int]], slices: int = PIXEL_SAMPLE_SLICES) -> int | None:
    """How many distinct pixel values a few slices spread through a stack hold: `images` are (file, frames) in
    stack order. Slices of a single value (empty slices at the edge of a mask, a blank image) say nothing about
    content and are left out; 1 when every sampled slice is flat; None when no pixels could be read (compressed
    without a decoder, malformed). A few slices only: an MR image holds hundreds of values in any one slice, a
    label map (mask, ROI, segmentation) a handful in all."""
    frames = [(path, index if count > 1 else None) for path, count in images for index in range(max(count, 1))]
    if not frames:
        return None
    picks = sorted({int(round(x)) for x in np.linspace(0, len(frames) - 1, slices + 2)[1:-1]}) or [0]
    per_file: dict[Path, list[int | None]] = {}
    for path, index in (frames[i] for i in picks):
        per_file.setdefault(path, []).append(index)
    values: set = set()
    read = 0
    for path, indices in per_file.items():
        try:  # one parse per file: an enhanced object's header alone can take a second to read
            arrays = (list(pydicom.pixels.iter_pixels(path, indices=indices)) if indices != [None] else
                      [pydicom.pixels.pixel_array(path)])
        except Exception as exc:  # noqa: BLE001 - no decoder, truncated or malformed pixel data: not sampled
            logger.debug("pixel sample unreadable (%s)", type(exc).__name__)
            continue
        for array in arrays:
            read += 1
            found = np.unique(array)
            if len(found) > 1:
                values.update(found.tolist())
    if not read:
        return None
    return len(values) if values else 1


# --------------------------------------------------------------------------------------- series header


class SeriesTallies(Protocol):
    """What `series_header` takes from tallies over all images (and frames) of a series (`pipeline.series`)."""

    images: int
    acquisition_times: list[float]
    echoes: set
    orientations: list

    def temporal_positions(self) -> int: ...


def series_header(ds: Dataset, part: str = "", stats: SeriesTallies | None = None, *, pixel_values: int | None = None,
                  conflicting_instances: int = 0) -> SeriesHeader:
    """Summarise one series (or `part` of one) from one image's header (and its enhanced functional groups), plus
    the tallies over all its images when there are any. Without tallies (one header alone) the image count is
    unknown (0), the acquisition time is the SeriesTime and one echo, volume and orientation are assumed.
    `pixel_values` (`sampled_pixel_values`) and `conflicting_instances` come from the series' files, when read."""
    if stats is None:
        images, times, echoes, temporal, orientations = 0, [], 1, 1, 1
    else:
        images, times = stats.images, stats.acquisition_times
        echoes, temporal = max(len(stats.echoes - {None}), 1), stats.temporal_positions()
        orientations = max(len(stats.orientations), 1)
    return SeriesHeader(
        series_uid=str(ds.get("SeriesInstanceUID") or ""),
        part=part,
        series_number=as_int(ds.get("SeriesNumber")),
        description=as_text(ds.get("SeriesDescription")),
        protocol=as_text(ds.get("ProtocolName")),
        modality=as_text(ds.get("Modality")),
        manufacturer=as_text(ds.get("Manufacturer")),
        model=as_text(ds.get("ManufacturerModelName")),
        sop_class_uid=_sop_class(ds),
        repetition_time=as_float(_value(ds, "RepetitionTime", "MRTimingAndRelatedParametersSequence")),
        echo_time=as_float(ds.get("EchoTime")) or as_float(group_value(ds, "MREchoSequence", "EffectiveEchoTime")),
        inversion_time=_inversion_time(ds),
        flip_angle=as_float(_value(ds, "FlipAngle", "MRTimingAndRelatedParametersSequence")),
        scanning_sequence=_multi(ds.get("ScanningSequence")) or _enhanced_scanning_sequence(ds),
        sequence_variant=_multi(ds.get("SequenceVariant")) or _enhanced_sequence_variant(ds),
        sequence_name=as_text(ds.get("SequenceName")) or as_text(ds.get("PulseSequenceName")),
        scan_options=_multi(ds.get("ScanOptions")),
        mr_acquisition_type=as_text(ds.get("MRAcquisitionType")).upper(),
        image_type=_multi(ds.get("ImageType")),
        contrast_agent=_contrast_agent(ds),
        contrast_ingredient=as_text(ds.get("ContrastBolusIngredient")),
        acquisition_time=min(times) if times else session_seconds(ds, ds.get("SeriesTime"), "SeriesDate"),
        num_images=images,
        slice_thickness=as_float(_value(ds, "SliceThickness", "PixelMeasuresSequence")),
        pixel_spacing=_pair(_value(ds, "PixelSpacing", "PixelMeasuresSequence")),
        orientation=rounded(_value(ds, "ImageOrientationPatient", "PlaneOrientationSequence"), 6),
        rows=as_int(ds.get("Rows")) or 0,
        columns=as_int(ds.get("Columns")) or 0,
        study_uid=as_text(ds.get("StudyInstanceUID")),
        frame_of_reference_uid=as_text(ds.get("FrameOfReferenceUID")),
        num_echoes=echoes,
        num_temporal_positions=temporal,
        num_orientations=orientations,
        pixel_values=pixel_values,
        conflicting_instances=conflicting_instances,
        echo_times=_echo_times(ds, stats),
        angio_flag=_angio(ds),
        b_value=as_float(ds.get("DiffusionBValue") or group_value(ds, "MRDiffusionSequence", "DiffusionBValue")),
    )


def _echo_times(ds: Dataset, stats: SeriesTallies | None) -> tuple[float, ...]:
    """Every echo time of an enhanced multi-frame object (its frames' EffectiveEchoTime); () for classic images,
    whose echoes are split into parts of one echo each (the tallies of a classic series may hold echo numbers)."""
    if stats is None or "PerFrameFunctionalGroupsSequence" not in ds:
        return ()
    return tuple(sorted(e for e in stats.echoes if e)) if len(stats.echoes - {None}) > 1 else ()


def _angio(ds: Dataset) -> bool:
    """AngioFlag Y (classic) or TimeOfFlightContrast YES (enhanced): the scanner marks a time-of-flight angiogram."""
    tof = ds.get("TimeOfFlightContrast") or group_value(ds, "MRModifierSequence", "TimeOfFlightContrast")
    return as_text(ds.get("AngioFlag")).upper() == "Y" or as_text(tof).upper() == "YES"


# ------------------------------------------------------------------------ enhanced multi-frame helpers


def group_value(ds: Dataset, sequence: str, attr: str, frame: Dataset | None = None):
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
    return group_value(ds, sequence, attr)


def _inversion_time(ds: Dataset) -> float | None:
    recovery = as_text(group_value(ds, "MRModifierSequence", "InversionRecovery")).upper()
    times = group_value(ds, "MRModifierSequence", "InversionTimes")
    ti = as_float(times) if recovery == "YES" and times is not None else as_float(ds.get("InversionTime"))
    return ti or None  # Philips writes TI 0 for sequences without inversion


def _enhanced_scanning_sequence(ds: Dataset) -> tuple[str, ...]:
    """Classic ScanningSequence terms from the enhanced MR pulse-sequence attributes."""
    echo_types = {"SPIN": ("SE",), "GRADIENT": ("GR",), "BOTH": ("SE", "GR")}
    echo = echo_types.get(as_text(ds.get("EchoPulseSequence")).upper(), ())
    extra = ()
    if as_text(group_value(ds, "MRModifierSequence", "InversionRecovery")).upper() == "YES":
        extra += ("IR",)
    if as_text(ds.get("EchoPlanarPulseSequence")).upper() == "YES":
        extra += ("EP",)
    return echo + extra


def _enhanced_sequence_variant(ds: Dataset) -> tuple[str, ...]:
    """Classic SequenceVariant terms (SK, SP, SS, MTC, MP) from the enhanced MR attributes."""
    def flag(name: str, sequence: str = "MRModifierSequence") -> str:
        return as_text(ds.get(name) or group_value(ds, sequence, name)).upper()

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
    agent = as_text(ds.get("ContrastBolusAgent"))
    if agent:
        return agent
    # Enhanced objects code the agent, and say per frame whether it was given.
    coded = ds.get("ContrastBolusAgentSequence")
    if coded:
        return as_text(coded[0].get("CodeMeaning")) or "coded agent"
    administered = group_value(ds, "ContrastBolusUsageSequence", "ContrastBolusAgentAdministered")
    return "administered" if as_text(administered).upper() == "YES" else ""


# -------------------------------------------------------------------------------- value conversion


def as_text(value) -> str:
    """A value as stripped text; multi-values joined with '\\'; '' for none."""
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


def as_float(value) -> float | None:
    """A finite number from a value (the first of a multi-value); None for none, junk, NaN or infinity."""
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


def as_int(value) -> int | None:
    """`as_float`, truncated to an integer."""
    number = as_float(value)
    return int(number) if number is not None else None


def _pair(value) -> tuple[float, float] | None:
    numbers = rounded(value, 6)
    return (numbers[0], numbers[1]) if numbers is not None and len(numbers) >= 2 else None


def rounded_float(value, digits: int) -> float | None:
    """`as_float` rounded to `digits` decimals."""
    number = as_float(value)
    return round(number, digits) if number is not None else None


def rounded(value, digits: int) -> tuple[float, ...] | None:
    """A multi-valued number (a position, direction cosines) rounded to `digits` decimals; None when any value is
    missing, junk or not finite."""
    if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0:
        return None
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in numbers):
        return None
    return tuple(round(v, digits) + 0.0 for v in numbers)  # + 0.0 folds -0.0 into 0.0


def tm_seconds(value) -> float | None:
    """DICOM TM ('HHMMSS.frac', or the old 'HH:MM:SS') to seconds after midnight."""
    text = as_text(value).replace(":", "")
    match = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?", text)
    if not match:
        return None
    hours, minutes, secs, frac = match.groups()
    return int(hours) * 3600 + int(minutes or 0) * 60 + int(secs or 0) + float(frac or 0)


def dt_seconds(value) -> float | None:
    """DICOM DT ('YYYYMMDDHHMMSS.frac') to seconds after midnight of its day."""
    text = as_text(value)
    return tm_seconds(text[8:]) if len(text) > 8 else None


def da_day(value) -> int | None:
    """DICOM DA ('YYYYMMDD', or the old 'YYYY.MM.DD') as a day number; None when absent or malformed."""
    text = re.sub(r"[.\-]", "", as_text(value))
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8])).toordinal()
    except ValueError:
        return None


# A session lasts hours: a date further than this from the StudyDate is a shifted or broken one, not a session
# that ran past midnight, and is ignored (time of day only, as when no date is recorded).
_MAX_SESSION_DAYS = 2


def session_seconds(ds: Dataset, time_value, *date_attrs: str) -> float | None:
    """A time (TM, or DT when no `date_attrs` are given) as seconds after midnight of the StudyDate, so that a
    session acquired across midnight keeps its order (23:57 before 00:21 the next day). The date is the first
    of `date_attrs` that holds one (then SeriesDate, AcquisitionDate); without a date, or without a StudyDate,
    the time of day alone, which equals the former for series acquired on the StudyDate."""
    if date_attrs:
        seconds = tm_seconds(time_value)
        dates = [ds.get(name) for name in (*date_attrs, "SeriesDate", "AcquisitionDate")]
    else:
        text = as_text(time_value)
        seconds, dates = dt_seconds(text), [text[:8]]
    if seconds is None:
        return None
    study_day = da_day(ds.get("StudyDate"))
    day = next((d for d in (da_day(value) for value in dates) if d is not None), None)
    if study_day is None or day is None or abs(day - study_day) > _MAX_SESSION_DAYS:
        return seconds
    return seconds + 86400.0 * (day - study_day)
