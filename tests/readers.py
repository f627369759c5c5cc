"""Reading back what the DICOM writers wrote, with highdicom's readers, in the tests' own terms (label values in
source frame order, volumes by region)."""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np

from pedseg.pipeline.labels import BASE_REGIONS, INTERNAL, LABEL_VALUES
from pedseg.reporting import codes
from pedseg.reporting.dicom_seg import load_sources


def read_seg_labels(seg_path: Path, source_files: list[Path]) -> np.ndarray:
    """Label volume (frames, rows, columns) in the frame order of `load_sources(source_files)`, frames the SEG
    omits as background. The four sub-region segments are disjoint and numbered as their label values, so
    combining them gives the labels."""
    seg = hd.seg.segread(seg_path)
    sources = load_sources(source_files)
    numbers = {codes.region_of_segment(item): int(item.SegmentNumber) for item in seg.SegmentSequence}
    assert [numbers[name] for name in BASE_REGIONS] == [LABEL_VALUES[INTERNAL][name] for name in BASE_REGIONS]
    segments = [numbers[name] for name in BASE_REGIONS]
    if "PerFrameFunctionalGroupsSequence" in sources[0]:
        return seg.get_pixels_by_source_frame(
            source_sop_instance_uid=sources[0].SOPInstanceUID,
            source_frame_numbers=range(1, int(sources[0].NumberOfFrames) + 1),
            segment_numbers=segments,
            combine_segments=True,
            assert_missing_frames_are_empty=True,  # the writer omits frames without any segment voxel
        )
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources],
        segment_numbers=segments,
        combine_segments=True,
    )


def read_sr_volumes(sr_path: Path) -> dict[str, float]:
    """Region name (the tracking identifier) -> volume in mL, from a report written by `write_sr`."""
    report = hd.sr.srread(sr_path).content
    volumes = {}
    for group in report.get_volumetric_roi_measurement_groups():
        for measurement in group.get_measurements(name=codes.VOLUME):
            assert measurement.unit.value == codes.MILLILITER.value, measurement.unit.value
            volumes[group.tracking_identifier] = float(measurement.value)
    return volumes
