"""DICOM Segmentation output: the tumour label map as a BINARY SEG aligned frame by frame with a source series.

The label map may live on any grid (atlas space, a NIfTI converter's flipped grid...). Each SEG frame is
resampled from it on exactly the plane of the source frame it belongs to (origin = that frame's Image
Position, axes from Image Orientation, spacing from Pixel Spacing), so frames match the source images
pixel for pixel whatever the converter did, and irregular slice spacing is exact too.

One SEG holds one set of regions, numbered from 1 in the order given (reporting.codes.segment_numbers), named
and coloured from the label table, every segment described even when empty so consumers see a stable numbering.
The default set, the four sub-regions (1 ET, 2 NET, 3 CC, 4 ED: segment number = internal label value), never
overlaps, which viewers that flatten or refuse overlapping segments (OHIF before 3.10) and Slicer's merged view
need; the composites TC and WT go into a SEG of their own when a run keeps them. Frames without any segment
voxel are omitted unless asked for (highdicom's `omit_empty_frames`).
"""
from __future__ import annotations

import logging
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from pedseg.pipeline.atomic import atomic_path
from pedseg.pipeline.errors import InternalError, UnsupportedDataError
from pedseg.pipeline.labels import BASE_REGIONS, INTERNAL, LABEL_VALUES, REGIONS, region_values
from pedseg.reporting import codes
from pedseg.reporting.derived import RunStamp, copy_patient_study

logger = logging.getLogger(__name__)

_ORIENTATION_TOLERANCE = 1e-3  # direction cosine difference still counted as the same orientation


def load_sources(source_files: list[Path]) -> list[Dataset]:
    """Source headers in SEG frame order: single-frame images sorted along the slice normal, or the one
    enhanced multi-frame image (its frames keep their stored order)."""
    if not source_files:
        raise InternalError("No source images were given for the DICOM outputs.")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    if any(_is_multiframe(ds) for ds in datasets):
        if len(datasets) != 1:
            raise UnsupportedDataError(
                f"{_series_name(datasets[0])}: a reference series of several multi-frame images is not supported."
            )
        return datasets
    return _sort_along_normal(datasets)


def write_seg(
    labels: sitk.Image,
    source_files: list[Path],
    out_path: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    stamp: RunStamp | None = None,
    series_index: int = 1,
    regions: tuple[str, ...] = BASE_REGIONS,
    keep_empty_frames: bool = False,
) -> Path:
    """Write `labels` (values 0-4, any grid in LPS space covering the series) as a DICOM SEG of the series with
    one segment per region in `regions`; `series_index` numbers it among the run's derived series (RunStamp)."""
    stamp = stamp or RunStamp.now(algorithm_name)
    sources = load_sources(source_files)
    label_frames = _resample_to_frames(_checked_labels(labels), _frame_planes(sources))
    _warn_if_lost(labels, label_frames, sources)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.ALGORITHM_FAMILY, version=algorithm_version
    )
    composite = any(REGIONS[name].is_composite for name in regions)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=_segment_stack(label_frames, regions),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(algorithm, regions),
        series_instance_uid=hd.UID(),
        series_number=stamp.series_number(series_index),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=codes.MANUFACTURER,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number=codes.DEVICE_SERIAL_NUMBER,
        content_label="TUMOR",
        content_description=("Tumor core and whole tumor (composites)" if composite
                             else "Tumor sub-regions (automatic pediatric brain tumor segmentation)"),
        series_description=(f"Tumor {'composites' if composite else 'sub-regions'} on "
                            f"{sources[0].get('SeriesDescription', 'source')} ({algorithm_name})")[:64],
        omit_empty_frames=not keep_empty_frames,
        content_qualification=codes.CONTENT_QUALIFICATION,
    )
    copy_patient_study(sources[0], seg)
    stamp.apply(seg, content_creator=True)
    with atomic_path(out_path) as tmp:
        pydicom.dcmwrite(tmp, seg, enforce_file_format=True)
    logger.debug("Wrote DICOM SEG with %d frames (%d source frames)", seg.NumberOfFrames, len(label_frames))
    return Path(out_path)


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


def _series_name(ds: Dataset) -> str:
    return f"Series {ds.get('SeriesNumber', '?')} ({ds.get('SeriesDescription', '')})"


def _sort_along_normal(datasets: list[Dataset]) -> list[Dataset]:
    name = _series_name(datasets[0])
    if len({ds.SeriesInstanceUID for ds in datasets}) != 1:
        raise InternalError(f"{name}: the source images for the DICOM outputs come from more than one series.")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    if any(np.abs(np.asarray(ds.ImageOrientationPatient, dtype=float) - iop).max() > _ORIENTATION_TOLERANCE
           for ds in datasets):
        raise UnsupportedDataError(f"{name} mixes slice orientations; a DICOM SEG needs one stack of parallel slices.")
    normal = np.cross(iop[:3], iop[3:])
    ordered = sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    depths = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))) for ds in ordered]
    if len(depths) > 1 and np.min(np.diff(depths)) < 1e-3:
        raise UnsupportedDataError(f"{name} has several images at the same slice position (echoes or repeats?).")
    return ordered


def _frame_geometry(ds: Dataset) -> list[tuple[list[float], list[float], list[float]]]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) for each frame, in frame order."""
    if not _is_multiframe(ds):
        return [(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing)]
    shared = ds.SharedFunctionalGroupsSequence[0]

    def group(frame: Dataset, name: str) -> Dataset:
        return (frame if name in frame else shared)[name][0]

    return [
        (
            group(frame, "PlanePositionSequence").ImagePositionPatient,
            group(frame, "PlaneOrientationSequence").ImageOrientationPatient,
            group(frame, "PixelMeasuresSequence").PixelSpacing,
        )
        for frame in ds.PerFrameFunctionalGroupsSequence
    ]


def _frame_planes(sources: list[Dataset]) -> list[sitk.Image]:
    """One single-slice reference image per SEG frame, lying exactly on the source frame's pixel grid."""
    planes = []
    for ds in sources:
        for ipp, iop, spacing in _frame_geometry(ds):
            row_dir = np.asarray(iop[:3], float)
            col_dir = np.asarray(iop[3:], float)
            axes = np.column_stack([row_dir, col_dir, np.cross(row_dir, col_dir)])
            plane = sitk.Image(int(ds.Columns), int(ds.Rows), 1, sitk.sitkUInt8)
            plane.SetOrigin([float(v) for v in ipp])
            plane.SetDirection(axes.flatten().tolist())
            # PixelSpacing is (between rows, between columns); SimpleITK wants (along x = columns, along y = rows).
            plane.SetSpacing((float(spacing[1]), float(spacing[0]), 1.0))
            planes.append(plane)
    return planes


def _checked_labels(labels: sitk.Image) -> sitk.Image:
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InternalError("The label map for the DICOM SEG must be a 3-D scalar image.")
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(labels)
    top = max(LABEL_VALUES[INTERNAL].values())
    if stats.GetMinimum() < 0 or stats.GetMaximum() > top:
        raise InternalError(
            f"The label map holds values {stats.GetMinimum():g}..{stats.GetMaximum():g}; "
            f"the DICOM SEG expects the internal labels 0..{top}."
        )
    return labels


def _resample_to_frames(labels: sitk.Image, planes: list[sitk.Image]) -> np.ndarray:
    # GetArrayFromImage copies: a view would outlive the temporary resampled image and read freed memory.
    frames = [
        sitk.GetArrayFromImage(
            sitk.Resample(labels, plane, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        )[0]
        for plane in planes
    ]
    return np.stack(frames)


def _warn_if_lost(labels: sitk.Image, label_frames: np.ndarray, sources: list[Dataset]) -> None:
    """A label map that misses the series entirely is a geometry bug, not an empty result: say so."""
    if label_frames.any() or not sitk.GetArrayViewFromImage(labels).any():
        return
    logger.warning("%s: the tumor label map does not overlap the reference series; the SEG is empty.",
                _series_name(sources[0]))


def _segment_stack(label_frames: np.ndarray, regions: tuple[str, ...]) -> np.ndarray:
    """(frames, rows, columns, segments) binary masks in segment-number order."""
    return np.stack([np.isin(label_frames, region_values(name)) for name in regions], axis=-1).astype(np.uint8)


def _segment_descriptions(algorithm: hd.AlgorithmIdentificationSequence,
                          regions: tuple[str, ...]) -> list[hd.seg.SegmentDescription]:
    numbers = codes.segment_numbers(regions)
    return [
        hd.seg.SegmentDescription(
            segment_number=numbers[region.name],
            segment_label=region.display_name,
            segmented_property_category=codes.CATEGORY,
            segmented_property_type=codes.PROPERTY_TYPES[region.name],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.ANATOMY],
            display_color=hd.color.CIELabColor.from_rgb(*region.colour),
        )
        for region in (REGIONS[name] for name in regions)
    ]


def segment_volumes_ml(seg_path: Path) -> dict[str, float]:
    """Region name (segment label's region) -> volume in mL of its voxels on the SEG's own grid: pixel area from
    Pixel Spacing times the distance between adjacent frame planes (the source series' slice spacing)."""
    seg = hd.seg.segread(seg_path)
    numbers = {int(item.SegmentNumber): codes.region_of_segment(item) for item in seg.SegmentSequence}
    volume = seg.get_volume(segment_numbers=sorted(numbers))
    # Spacings to 0.1 µm: the slice spacing comes from the frame positions, which carry the rounding of the
    # source's orientation cosines (5 mm comes back as 4.9999984 from an oblique series).
    voxel_ml = float(np.prod([round(float(v), 4) for v in volume.spacing])) / 1000.0
    counts = volume.array.reshape(-1, len(numbers)).sum(axis=0)
    return {numbers[n]: _to_thousandth_ml(int(c) * voxel_ml) for n, c in zip(sorted(numbers), counts)}


def _to_thousandth_ml(volume_ml: float) -> float:
    """A volume to 0.001 mL, halves up (5.5125 -> 5.513 whatever float error the voxel size carried)."""
    return float(Decimal(f"{volume_ml:.9f}").quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))
