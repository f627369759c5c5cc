"""Which of a session's DICOM files are worth downloading, judged from Flywheel's copy of their headers.

Flywheel's metadata importer stores one file's DICOM header as `file.info.header.dicom` (keyword -> value).
From it we build a pydicom Dataset, read it with the pipeline's own `series_header` and apply the pipeline's
hard-rejection rules (not MR, localizer, derived, diffusion, ...), so the gear skips what identification would
throw away anyway. Only rules that one header settles are applied: image counts and time series need every file
of a series.
"""
from __future__ import annotations

from collections.abc import Mapping

from pydicom import config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from pedseg.pipeline.dicom_header import series_header
from pedseg.pipeline.identify import header_facts
from pedseg.pipeline.identify_rules import REJECT, RULES
from pedseg.pipeline.types import SeriesHeader

# Rejection rules that count images, volumes or stacks: unknown before download, so never applied here.
COUNT_RULES = frozenset({"few_images", "time_series", "orientations"})


def flywheel_header(dicom: Mapping | None) -> SeriesHeader | None:
    """A SeriesHeader from the importer's header dict, read as the pipeline reads a file's header (without image
    counts: num_images is 0); None when there is none (or no SeriesInstanceUID)."""
    if not dicom:
        return None
    header = series_header(_dataset(dicom))
    return header if header.series_uid else None


def rejection_reasons(header: SeriesHeader) -> list[str]:
    """Why identification would never choose this series, in its own words; empty for a candidate."""
    facts = header_facts(header)
    return [rule.reason.format(f=facts, hit=hit) for rule in RULES
            if rule.weights is REJECT and rule.name not in COUNT_RULES and (hit := rule.predicate(facts))]


def _dataset(dicom: Mapping) -> Dataset:
    """The importer's dict as a pydicom Dataset. The importer writes JSON: strings, numbers, and lists for
    multi-valued elements (some versions keep "A\\B" strings), which pydicom reads alike. Keys that are no DICOM
    keyword are left out, and so are values pydicom refuses (unparseable numbers, nested sequences). Validation is
    off while setting, so pydicom logs no value (the header holds the patient's name)."""
    ds = Dataset()
    with config.disable_value_validation():
        for keyword, value in dicom.items():
            if not isinstance(keyword, str) or tag_for_keyword(keyword) is None:
                continue
            try:
                setattr(ds, keyword, value)
            except Exception:  # noqa: BLE001 - pydicom raises many types for values it refuses
                continue
    return ds
