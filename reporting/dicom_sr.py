"""DICOM SR output: tumour volumes as a TID 1500 Measurement Report (Comprehensive 3D SR) over the DICOM SEG.

One TID 1411 volumetric group per region (ET, NET, CC, ED, TC, WT) that the measurements contain. Each
group references exactly one SEG segment (highdicom's ReferencedSegment takes one segment number, and
viewers expect one ROI per group), which is why TC and WT are composite segments of their own in the SEG
(see reporting.codes). Volumes are `RegionMeasure.volume_ml` (atlas grid; the registration is rigid). Each group
carries a Volume (SCT 118565006) in mL and a tracking identifier: the region name plus a Tracking UID, reused from
`tracking_uids` when given so a longitudinal caller can follow one lesion across time points.
The observer is the algorithm (a device observer); no person is named.
"""
from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import generate_uid

from pedseg.pipeline.atomic import atomic_path
from pedseg.pipeline.errors import InternalError
from pedseg.pipeline.labels import REGIONS
from pedseg.pipeline.types import Measurements, RegionMeasure
from pedseg.reporting import codes

logger = logging.getLogger(__name__)


def write_sr(
    measurements: Measurements,
    seg_path: Path,
    source_files: list[Path],
    out_path: Path,
    *,
    tracking_uids: dict[str, str] | None = None,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9002,
) -> tuple[Path, dict[str, str]]:
    """Write the measurement report; return its path and the Tracking UID used for each region."""
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    regions = [name for name in REGIONS if name in measurements.regions]
    uids = {name: (tracking_uids or {}).get(name) or hd.UID() for name in regions}
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    groups = [_volume_group(name, measurements.regions[name], uids[name], seg, algorithm) for name in regions]
    report = hd.sr.MeasurementReport(
        observation_context=_device_observer(algorithm_name, algorithm_version),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=codes.MANUFACTURER,
        content_qualification=codes.CONTENT_QUALIFICATION,
        is_complete=True,  # every region measured is reported; not final or verified: no human has reviewed it
        series_description=f"Tumor volumes ({algorithm_name})"[:64],
    )
    with atomic_path(out_path) as tmp:
        pydicom.dcmwrite(tmp, sr, enforce_file_format=True)
    logger.debug("Wrote DICOM SR with %d measurement groups", len(groups))
    return Path(out_path), uids


def _segment_numbers(seg: Dataset) -> set[int]:
    return {int(item.SegmentNumber) for item in seg.SegmentSequence}


def _volume_group(
    region: str,
    measure: RegionMeasure,
    tracking_uid: str,
    seg: Dataset,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    segment_number = codes.SEGMENT_NUMBERS[region]
    if segment_number not in _segment_numbers(seg):
        raise InternalError(f"The DICOM SEG has no segment {segment_number} for {region}.")
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=region),
        referenced_segment=referenced,
        finding_type=codes.PROPERTY_TYPES[region],
        finding_category=codes.CATEGORY,
        finding_sites=[hd.sr.FindingSite(codes.ANATOMY)],
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=codes.VOLUME, value=float(measure.volume_ml), unit=codes.MILLILITER)],
    )


def _device_observer(algorithm_name: str, algorithm_version: str) -> hd.sr.ObservationContext:
    # The same algorithm version always gets the same device UID, so reports from it can be grouped.
    device_uid = generate_uid(entropy_srcs=[codes.MANUFACTURER, algorithm_name, algorithm_version])
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name=algorithm_name,
                manufacturer_name=codes.MANUFACTURER,
                model_name=algorithm_name,
                serial_number=codes.DEVICE_SERIAL_NUMBER,
            ),
        )
    )
