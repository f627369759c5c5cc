"""A radiologist's edited segmentation back into the results: `pedseg review EDITED_SEG.dcm OUTDIR`.

The edited SEG (from OHIF, Slicer/dcmqi, highdicom or pedseg itself) is read on its own grid, its segments mapped
to the tumour regions (by segmented property type code, else by label: reporting.codes.region_of_segment), the
sub-regions combined into a label map and measured as a run measures (volumes, lesions, RAPNO in the patient's
own LPS coordinates, since the SEG's grid is the patient's). Written to OUTDIR/review/, beside the automatic
result it revises: measurements.json/.csv marked reviewed (with the automatic volumes beside the reviewed ones), a
new SR whose volumes are the edited SEG's own voxel volumes and which names the automatic SR as its predecessor,
and a one-page PDF comparing the two.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk

from pedseg.pipeline.errors import InputError
from pedseg.pipeline.labels import BASE_REGIONS, INTERNAL, LABEL_VALUES
from pedseg.pipeline.measure import measure
from pedseg.pipeline.types import Measurements
from pedseg.reporting import codes
from pedseg.reporting.derived import RunStamp
from pedseg.reporting.dicom_sr import write_sr
from pedseg.reporting.pdf import write_review_pdf
from pedseg.reporting.tables import write_measurements_csv, write_measurements_json

logger = logging.getLogger(__name__)

REVIEW_FOLDER = "review"
_HINT_REGIONS = ("Give each segment a tumour region: the property type codes pedseg writes, or a label such as "
                 "'Enhancing tumour', 'Non-enhancing tumour', 'Cystic component', 'Oedema' (or ET, NET, CC, ED).")


@dataclass(frozen=True)
class Review:
    measurements: Measurements  # on the edited SEG's grid
    automatic_volumes_ml: dict[str, float]  # from the automatic run's measurements.json
    study_uid: str
    study_date: str
    bundle: dict  # the automatic run's model (measurements.json's context)
    outputs: dict[str, Path]


def review_segmentation(edited_seg: Path, outdir: Path) -> Review:
    """Measure `edited_seg` and write the reviewed outputs into `outdir`/review/ (see the module docstring)."""
    seg, regions = read_edited_seg(edited_seg)
    automatic = _automatic_result(outdir)
    labels = _label_map(seg, regions)
    measurements = measure(labels, labels, qc_flags=[])
    context = automatic["context"]
    if seg.StudyInstanceUID != context.get("study_instance_uid"):
        raise InputError(f"{edited_seg.name} belongs to another study than the run in {outdir}.",
                         hint="Review the segmentation of the study that run measured.")
    automatic_volumes = {name: float(region["volume_ml"]) for name, region in automatic["document"]["regions"].items()}
    # Written into a staging folder, then moved into place whole: a failure leaves no half-written review.
    folder = outdir / f".{REVIEW_FOLDER}.partial"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    bundle = context.get("bundle") or {}
    stamp = RunStamp.now("pedseg review")
    review_context = {**context, "reviewed": {
        "segmentation_sop_instance_uid": str(seg.SOPInstanceUID),
        "segmentation_series_instance_uid": str(seg.SeriesInstanceUID),
        "automatic_sr_sop_instance_uid": automatic["sr"].SOPInstanceUID if automatic["sr"] is not None else None,
        "automatic_volumes_ml": automatic_volumes,
    }}
    outputs = {
        "measurements_json": write_measurements_json(measurements, folder / "measurements.json",
                                                     context=review_context),
        "measurements_csv": write_measurements_csv(measurements, folder / "measurements.csv", context=context),
    }
    outputs["sr"], _ = write_sr([edited_seg], [], folder / "measurements_reviewed.dcm",
                                algorithm_name=str(bundle.get("name") or "pedseg"),
                                algorithm_version=str(bundle.get("version") or ""), stamp=stamp,
                                previous_versions=[automatic["sr"]] if automatic["sr"] is not None else None,
                                reviewed=True, rapno=measurements.rapno)
    outputs["pdf"] = write_review_pdf(folder / "report_reviewed.pdf", reviewed=measurements,
                                      automatic_volumes_ml=automatic_volumes, study_date=context.get("study_date"),
                                      model=f"{bundle.get('name', '')} {bundle.get('version', '')}".strip())
    final = outdir / REVIEW_FOLDER
    shutil.rmtree(final, ignore_errors=True)  # a later review of the same run replaces the earlier one
    folder.rename(final)
    logger.info("reviewed segmentation measured: WT %.3f mL (automatic %.3f mL); outputs in %s",
                measurements.regions["WT"].volume_ml, automatic_volumes.get("WT", float("nan")), final)
    return Review(measurements, automatic_volumes, str(seg.StudyInstanceUID), str(context.get("study_date") or ""),
                  bundle, {key: final / path.name for key, path in outputs.items()})


def read_edited_seg(path: Path) -> tuple[hd.seg.Segmentation, dict[str, int]]:
    """The edited SEG and its segment number per region; an InputError when it is no DICOM SEG, or when a segment
    stands for no tumour region, two for the same one, or none for a sub-region. Adapters call it to refuse a bad
    SEG before a long run; `review_segmentation` starts with it."""
    seg = _read_seg(path)
    return seg, _segment_regions(seg, path)


def _read_seg(path: Path) -> hd.seg.Segmentation:
    try:
        dataset = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{path.name} cannot be read as DICOM ({exc}).",
                         hint="Give the DICOM SEG file the viewer exported.") from exc
    if dataset.get("Modality") != "SEG":
        raise InputError(f"{path.name} is not a DICOM Segmentation (modality {dataset.get('Modality', 'none')}).",
                         hint="Export the edited segmentation as DICOM SEG from the viewer.")
    try:
        return hd.seg.Segmentation.from_dataset(dataset)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        # By type only: a library's message may quote header values.
        raise InputError(f"{path.name} is a DICOM Segmentation that cannot be read ({exc.__class__.__name__}: it "
                         "lacks or mangles attributes the SEG IOD requires).",
                         hint="Export the edited segmentation again as DICOM SEG from the viewer.") from exc


def _automatic_result(outdir: Path) -> dict:
    document_path = outdir / "measurements.json"
    if not document_path.is_file():
        raise InputError(f"{outdir} holds no measurements.json: it is not the output folder of a pedseg run.",
                         hint="Give the folder `pedseg run` wrote for this study.")
    sr_path = outdir / "sr" / "measurements.dcm"
    document = json.loads(document_path.read_text())
    return {"document": document, "context": document.get("context", {}),
            "sr": pydicom.dcmread(sr_path, stop_before_pixels=True) if sr_path.is_file() else None}


def _segment_regions(seg: hd.seg.Segmentation, path: Path) -> dict[str, int]:
    regions: dict[str, int] = {}
    for item in seg.SegmentSequence:
        region = codes.region_of_segment(item)
        if region is None:
            raise InputError(f"{path.name}: segment {item.SegmentNumber} '{item.get('SegmentLabel', '')}' is not a "
                             "tumour region pedseg knows.", hint=_HINT_REGIONS)
        if region in regions:
            raise InputError(f"{path.name}: segments {regions[region]} and {item.SegmentNumber} are both {region}.",
                             hint="Merge them into one segment per region.")
        regions[region] = int(item.SegmentNumber)
    if not any(name in regions for name in BASE_REGIONS):
        raise InputError(f"{path.name} holds only composite regions ({', '.join(regions) or 'none'}); the "
                         "sub-regions are needed to measure.", hint=_HINT_REGIONS)
    return regions


def _label_map(seg: hd.seg.Segmentation, regions: dict[str, int]) -> sitk.Image:
    """The edited sub-regions as one internal-convention label map on the SEG's grid (LPS)."""
    base = [name for name in BASE_REGIONS if name in regions]
    volume = seg.get_volume(segment_numbers=[regions[name] for name in base])
    labels = np.zeros(volume.array.shape[:3], np.uint8)
    # Where edited segments overlap, the more specific sub-region wins (ET over NET over CC over oedema).
    for index in reversed(range(len(base))):
        labels[volume.array[..., index] > 0] = LABEL_VALUES[INTERNAL][base[index]]
    affine = np.asarray(volume.affine, float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(labels.transpose(2, 1, 0).copy())  # highdicom (i, j, k) -> SimpleITK [z, y, x]
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection((affine[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    return image
