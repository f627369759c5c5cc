"""DICOM SR output: tumour volumes as a TID 1500 Measurement Report (Comprehensive 3D SR) over the DICOM SEGs.

One TID 1411 volumetric group per segment of the SEGs it is given (the sub-region SEG: ET, NET, CC, ED; the
composite SEG, when a run keeps one: TC, WT), each referencing exactly that segment (highdicom's
ReferencedSegment takes one segment number, and viewers expect one ROI per group). A region without a segment
has no group: it was not segmented on a grid the report can point at.

Each volume is measured on the referenced SEG's own grid, from its voxels (`segment_volumes_ml`), and says so
(method: Sum of segmented voxel volumes), rounded to 0.001 mL: a reader of the SR and a reader of the SEG find the
same number. With a RAPNO measurement, each measured lesion's two diameters follow as 3D polylines (TID 1410) in the
patient coordinates of the SEG's series, so viewers that show TID 1500 measurements draw them. Each volume group
carries a tracking identifier: the region name plus a Tracking UID, reused from
`tracking_uids` when given so a longitudinal caller can follow one lesion across time points. The evidence lists
every input series' instances, not only the one segmented. The observer is the algorithm (a device observer); no
person is named.
"""
from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pedseg.pipeline.atomic import atomic_path
from pedseg.pipeline.errors import InternalError
from pedseg.pipeline.types import Rapno
from pedseg.reporting import codes
from pedseg.reporting.derived import SR_INDEX, RunStamp, copy_patient_study
from pedseg.reporting.dicom_seg import segment_volumes_ml

logger = logging.getLogger(__name__)

VOLUME_METHOD = dcm_codes.DCM.SumOfSegmentedVoxelMethodForVolume  # 126030, CID 7474
LONGEST = dcm_codes.SCT.LongAxis  # 103339001
PERPENDICULAR = dcm_codes.SCT.PerpendicularAxis  # 131189007
# No standard concept names the RAPNO product of the two diameters: a private coding scheme says what it is.
PRODUCT = Code("RAPNO-BDP", "99PEDSEG", "Bidimensional product (longest x perpendicular diameter)")
MILLIMETER = Code("mm", "UCUM", "millimeter")
SQUARE_MILLIMETER = Code("mm2", "UCUM", "square millimeter")


def write_sr(
    seg_paths: list[Path],
    evidence_files: list[Path],
    out_path: Path,
    *,
    tracking_uids: dict[str, str] | None = None,
    algorithm_name: str,
    algorithm_version: str,
    stamp: RunStamp | None = None,
    previous_versions: list[Dataset] | None = None,
    reviewed: bool = False,
    rapno: Rapno | None = None,
) -> tuple[Path, dict[str, str]]:
    """Write the measurement report over `seg_paths` (each segment's volume on its SEG's grid); `evidence_files`:
    every instance of every input series. `previous_versions`: reports this one revises (Predecessor Documents),
    with `reviewed` for the volumes of a radiologist's edited segmentation. `rapno`: the RAPNO measurement in
    the patient LPS coordinates of the first SEG's series, drawn as lines (see `_rapno_groups`). Return its path and
    the Tracking UID used for each region."""
    stamp = stamp or RunStamp.now(algorithm_name)
    segs = [pydicom.dcmread(path, stop_before_pixels=True) for path in seg_paths]
    volumes = [segment_volumes_ml(path) for path in seg_paths]
    regions = [name for per_seg in volumes for name in per_seg]
    if len(set(regions)) != len(regions):
        raise InternalError(f"The DICOM SEGs for one SR hold a region twice: {regions}.")
    uids = {name: (tracking_uids or {}).get(name) or hd.UID() for name in regions}
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    groups = [_volume_group(name, volume_ml, uids[name], seg, algorithm)
              for seg, per_seg in zip(segs, volumes) for name, volume_ml in per_seg.items()]
    if rapno is not None:
        groups += _rapno_groups(rapno, segs[0].FrameOfReferenceUID, algorithm)
    report = hd.sr.MeasurementReport(
        observation_context=_device_observer(algorithm_name, algorithm_version),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups,
    )
    evidence = [pydicom.dcmread(f, stop_before_pixels=True) for f in evidence_files]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*segs, *evidence],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=stamp.series_number(SR_INDEX),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=codes.MANUFACTURER,
        content_qualification=codes.CONTENT_QUALIFICATION,
        is_complete=True,  # every region measured is reported; not verified: pedseg cannot name who reviewed it
        series_description=(f"Tumor volumes, reviewed segmentation ({algorithm_name})" if reviewed
                            else f"Tumor volumes ({algorithm_name})")[:64],
        previous_versions=previous_versions,
    )
    copy_patient_study(segs[0], sr)
    stamp.apply(sr)
    with atomic_path(out_path) as tmp:
        pydicom.dcmwrite(tmp, sr, enforce_file_format=True)
    logger.debug("Wrote DICOM SR with %d measurement groups", len(groups))
    return Path(out_path), uids


def _volume_group(
    region: str,
    volume_ml: float,
    tracking_uid: str,
    seg: Dataset,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    segment_number = next(int(item.SegmentNumber) for item in seg.SegmentSequence
                          if codes.region_of_segment(item) == region)
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
        measurements=[hd.sr.Measurement(name=codes.VOLUME, value=_rounded(volume_ml, 3), unit=codes.MILLILITER,
                                        method=VOLUME_METHOD)],
    )


def _rapno_groups(rapno: Rapno, frame_of_reference_uid: str, algorithm: hd.sr.AlgorithmIdentification,
                  ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """Per measured lesion, TID 1410 groups for its longest and its perpendicular diameter, each a 3D polyline
    between the diameter's endpoints in the series' frame of reference (SCOORD3D: a diameter measured on the
    patient-axial plane crosses the slices of a sagittal or oblique series, so no single image holds it); the
    longest diameter's group carries the product."""
    groups = []
    for number, lesion in enumerate(rapno.lesions, start=1):
        for kind, ends, concept, value in (("longest", lesion.endpoints_lps_mm, LONGEST, lesion.longest_mm),
                                           ("perpendicular", lesion.perp_endpoints_lps_mm, PERPENDICULAR,
                                            lesion.perpendicular_mm)):
            measurements = [hd.sr.Measurement(name=concept, value=_rounded(value, 2), unit=MILLIMETER)]
            if kind == "longest":
                measurements.append(hd.sr.Measurement(name=PRODUCT, value=_rounded(lesion.product_mm2, 2),
                                                      unit=SQUARE_MILLIMETER))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"{rapno.region} lesion {number} {kind} diameter"),
                referenced_region=hd.sr.ImageRegion3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE,
                    graphic_data=np.asarray(ends, dtype=float), frame_of_reference_uid=frame_of_reference_uid),
                finding_type=codes.PROPERTY_TYPES[rapno.region],
                finding_category=codes.CATEGORY,
                finding_sites=[hd.sr.FindingSite(codes.ANATOMY)],
                algorithm_id=algorithm,
                measurements=measurements,
            ))
    return groups


def _rounded(value: float, decimals: int) -> float:
    """A float whose decimal string has no float noise (8.106, not 8.10600000001)."""
    return float(f"{value:.{decimals}f}")


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
