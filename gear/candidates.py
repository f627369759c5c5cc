"""Which of a session's DICOM files are worth downloading, judged from Flywheel's copy of their headers.

Flywheel's metadata importer stores one file's DICOM header as `file.info.header.dicom` (keyword -> value).
From it we build a partial `SeriesHeader` and apply the pipeline's own hard-rejection rules (not MR,
localizer, derived, diffusion, ...), so the gear skips what identification would throw away anyway.
Only rules that one header settles are applied: image counts and time series need every file of a series.
"""
from __future__ import annotations

from collections.abc import Mapping

from pedseg.pipeline.identify import header_facts
from pedseg.pipeline.identify_rules import REJECT, RULES
from pedseg.pipeline.types import SeriesHeader

# Rejection rules that count images, volumes or stacks: unknown before download, so never applied here.
COUNT_RULES = frozenset({"few_images", "time_series", "orientations"})


def flywheel_header(dicom: Mapping | None) -> SeriesHeader | None:
    """A SeriesHeader from the importer's header dict; None when there is none (or no SeriesInstanceUID)."""
    if not dicom or not _text(dicom.get("SeriesInstanceUID")):
        return None
    return SeriesHeader(
        series_uid=_text(dicom.get("SeriesInstanceUID")),
        series_number=_int(dicom.get("SeriesNumber")),
        description=_text(dicom.get("SeriesDescription")),
        protocol=_text(dicom.get("ProtocolName")),
        modality=_text(dicom.get("Modality")),
        manufacturer=_text(dicom.get("Manufacturer")),
        model=_text(dicom.get("ManufacturerModelName")),
        sop_class_uid=_text(dicom.get("SOPClassUID")),
        repetition_time=_float(dicom.get("RepetitionTime")),
        echo_time=_float(dicom.get("EchoTime")),
        inversion_time=_float(dicom.get("InversionTime")) or None,  # Philips writes 0 without inversion
        flip_angle=_float(dicom.get("FlipAngle")),
        scanning_sequence=_multi(dicom.get("ScanningSequence")),
        sequence_variant=_multi(dicom.get("SequenceVariant")),
        sequence_name=_text(dicom.get("SequenceName")) or _text(dicom.get("PulseSequenceName")),
        scan_options=_multi(dicom.get("ScanOptions")),
        mr_acquisition_type=_text(dicom.get("MRAcquisitionType")).upper(),
        image_type=_multi(dicom.get("ImageType")),
        contrast_agent=_text(dicom.get("ContrastBolusAgent")),
        contrast_ingredient=_text(dicom.get("ContrastBolusIngredient")),
        acquisition_time=None,
        num_images=0,  # unknown until downloaded: COUNT_RULES are not applied
        slice_thickness=_float(dicom.get("SliceThickness")),
        pixel_spacing=None,
        orientation=None,
        rows=_int(dicom.get("Rows")) or 0,
        columns=_int(dicom.get("Columns")) or 0,
        study_uid=_text(dicom.get("StudyInstanceUID")),
        frame_of_reference_uid=_text(dicom.get("FrameOfReferenceUID")),
    )


def rejection_reasons(header: SeriesHeader) -> list[str]:
    """Why identification would never choose this series, in its own words; empty for a candidate."""
    facts = header_facts(header)
    return [rule.reason.format(f=facts, hit=hit) for rule in RULES
            if rule.weights is REJECT and rule.name not in COUNT_RULES and (hit := rule.predicate(facts))]


# The importer writes JSON: strings, numbers, and lists for multi-valued elements (some versions keep "A\\B").


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value).strip()


def _multi(value) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = str(value or "").split("\\")
    return tuple(item.strip() for item in items if item.strip())


def _float(value) -> float | None:
    try:
        return float(_text(value))
    except ValueError:
        return None


def _int(value) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None
