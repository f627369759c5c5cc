"""The writers a run hands its artefacts to: each `writer(artifacts, staging) -> {output name: path}`.

Label maps arrive in the internal convention; the NIfTI writer converts them to the configured convention
at its edge, and every other writer (PDF figures, SEG) reads the internal values.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk

from pedseg.pipeline.atomic import write_image, write_text
from pedseg.pipeline.identify import session_to_json
from pedseg.pipeline.labels import BASE_REGIONS, COMPOSITES, INTERNAL, convert_labels
from pedseg.pipeline.longitudinal import tracking_uids
from pedseg.reporting.artifacts import RunArtifacts
from pedseg.reporting.derived import COMPOSITE_SEG_INDEX, SEG_INDEX
from pedseg.reporting.dicom_pdf import write_encapsulated_pdf
from pedseg.reporting.dicom_seg import write_seg
from pedseg.reporting.dicom_sr import write_sr
from pedseg.reporting.longitudinal import change_rows, write_history_csv
from pedseg.reporting.pdf import write_report_pdf
from pedseg.reporting.tables import write_measurements_csv, write_measurements_json

Writer = Callable[[RunArtifacts, Path], dict[str, Path]]
PDF_TITLE = "pedseg tumour volumetry report (research use only)"


def identification_json(run: RunArtifacts, staging: Path) -> dict[str, Path]:
    return {"identify": write_text(staging / "identify.json", session_to_json(run.identification))}


def nifti_images(run: RunArtifacts, staging: Path) -> dict[str, Path]:
    """Atlas-space images, brain mask, probability and uncertainty maps, and the label maps in the configured
    label convention (atlas space and the reference series' native grid)."""
    nifti = staging / "nifti"
    nifti.mkdir(parents=True, exist_ok=True)
    pre, prediction = run.preprocessed, run.prediction
    outputs = {f"nifti_{role}": _copy(path, nifti / f"{role}.nii.gz") for role, path in pre.images.items()}
    outputs["nifti_brain_mask"] = _copy(pre.brain_mask, nifti / "brain_mask.nii.gz")
    if prediction.uncertainty is not None:
        outputs["nifti_uncertainty"] = _copy(prediction.uncertainty, nifti / "uncertainty_atlas.nii.gz")
    for region, path in prediction.probabilities.items():
        outputs[f"nifti_probability_{region}"] = _copy(path, nifti / path.name)
    for name, image in (("labels_atlas", run.labels), (f"labels_{run.reference_role}_native", run.native_labels)):
        outputs[f"nifti_{name}"] = write_image(_in_convention(image, run.config.label_convention),
                                               nifti / f"{name}.nii.gz")
    return outputs


def measurement_tables(run: RunArtifacts, staging: Path) -> dict[str, Path]:
    context = {
        "study_instance_uid": run.session.study_uid,
        "series_instance_uids": dict(run.identification.chosen),
        "bundle": run.provenance.bundle.as_dict(),
        "fast_mode": run.config.fast,
        "study_date": run.session.study_date,
        # which of the bundle's models made this result (fallback members when the session lacks a sequence)
        "models": {"ran": list(run.prediction.models_used),
                   "skipped": dict(run.prediction.ensemble.members_skipped) if run.prediction.ensemble else {},
                   # the backend and precision each member ran with (MONAI and DeepMedic members included)
                   "executions": dict(run.prediction.ensemble.executions) if run.prediction.ensemble else {}},
    }
    return {"measurements_json": write_measurements_json(run.measurements, staging / "measurements.json",
                                                         context=context, population_warning=run.population_warning),
            "measurements_csv": write_measurements_csv(run.measurements, staging / "measurements.csv",
                                                       context=context)}


def longitudinal_table(run: RunArtifacts, staging: Path) -> dict[str, Path]:
    if run.timeline is None:
        return {}
    return {"longitudinal": write_history_csv(change_rows(run.timeline), staging / "longitudinal.csv")}


def dicom_seg_and_sr(run: RunArtifacts, staging: Path) -> dict[str, Path]:
    """A sub-region SEG on the reference series (`seg`) and on each series of config.seg_roles, each on that
    series' own grid; a composite SEG beside each when configured; the SR over the reference series' SEGs.
    Nothing when no tumour was found (or when off)."""
    if not (run.config.write_seg and run.has_tumour):
        return {}
    name, version, config = run.bundle.name, run.bundle.version, run.config
    outputs, reference_segs = {}, []
    seg_labels = run.seg_labels or {run.reference_role: run.native_labels}
    for position, role in enumerate(seg_labels):
        for composite in (False, True) if config.seg_composites else (False,):
            stem = "composites" if composite else "segmentation"
            file_stem = stem if role == run.reference_role else f"{stem}_{role}"
            key = "seg" if file_stem == "segmentation" else f"seg_{file_stem.removeprefix('segmentation_')}"
            outputs[key] = write_seg(
                seg_labels[role], _role_files(run, role), staging / "seg" / f"{file_stem}.dcm",
                algorithm_name=name, algorithm_version=version, stamp=run.stamp,
                series_index=(COMPOSITE_SEG_INDEX if composite else SEG_INDEX) + position,
                regions=COMPOSITES if composite else BASE_REGIONS, keep_empty_frames=config.seg_keep_empty_frames)
            if role == run.reference_role:
                reference_segs.append(outputs[key])
    if config.write_sr and reference_segs:
        # One Tracking UID per region for the subject at every time point.
        uids = tracking_uids(run.timeline.current.subject_key) if run.timeline else None
        evidence = [f for role in run.identification.chosen for f in _role_files(run, role)]
        outputs["sr"], _ = write_sr(reference_segs, evidence, staging / "sr" / "measurements.dcm",
                                    algorithm_name=name, algorithm_version=version, tracking_uids=uids,
                                    stamp=run.stamp, rapno=run.measurements.rapno)
    return outputs


def pdf_report(run: RunArtifacts, staging: Path) -> dict[str, Path]:
    """The PDF report and its encapsulated-PDF DICOM copy in the study."""
    if not run.config.write_pdf:
        return {}
    pdf = write_report_pdf(
        staging / "report.pdf", images=run.preprocessed.images, labels=run.labels, measurements=run.measurements,
        identification=run.identification, qc=run.preprocessed.qc, provenance=run.provenance.as_dict(),
        context=run.context, fast_mode=run.config.fast, longitudinal=run.timeline,
        population_warning=run.population_warning, model_population=run.bundle.population,
    )
    return {"pdf": pdf, "pdf_dicom": write_encapsulated_pdf(pdf, _role_files(run, run.reference_role),
                                                            staging / "report" / "report_pdf.dcm", title=PDF_TITLE,
                                                            stamp=run.stamp)}


DEFAULT_WRITERS: tuple[Writer, ...] = (identification_json, nifti_images, measurement_tables, longitudinal_table,
                                       dicom_seg_and_sr, pdf_report)


def _role_files(run: RunArtifacts, role: str) -> list[Path]:
    return run.session.by_uid(run.identification.chosen[role]).files


def _copy(source: Path, target: Path) -> Path:
    return Path(shutil.copy(source, target))


def _in_convention(labels: sitk.Image, convention: str) -> sitk.Image:
    if convention == INTERNAL:
        return labels
    out = sitk.GetImageFromArray(convert_labels(sitk.GetArrayFromImage(labels), INTERNAL, convention))
    out.CopyInformation(labels)
    return out
