"""One pipeline call from a DICOM session to every output. Adapters (CLI, Flywheel, PACS) call `run_pipeline`.

Outputs are produced in a staging folder inside OUTDIR and moved into place only when every stage has
succeeded, so a failed run leaves complete files only, plus `error.json` saying what went wrong.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pydicom
import SimpleITK as sitk

from pedseg.pipeline.atomic import write_image, write_text
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import (
    InputError,
    MissingSequenceError,
    PipelineError,
    as_pipeline_error,
    disk_full,
    is_disk_full,
)
from pedseg.pipeline.identify import identify, session_to_json
from pedseg.pipeline.infer import infer, uncertainty_summary
from pedseg.pipeline.ingest import ingest
from pedseg.pipeline.longitudinal import Longitudinal, ResponseThresholds, compare, subject_key, tracking_uids
from pedseg.pipeline.measure import convert_labels, measure
from pedseg.pipeline.postprocess import postprocess
from pedseg.pipeline.preprocess import labels_to_native, preprocess
from pedseg.pipeline.types import RunResult, Session
from pedseg.tracking.records import time_point
from pedseg.tracking.store import MeasurementStore

logger = logging.getLogger(__name__)
PEDSEG_VERSION = "0.1.0"
PACKAGES = ("nnunetv2", "torch", "SimpleITK", "pydicom", "highdicom", "deepbet", "dcm2niix", "reportlab", "numpy")


class StageTimer:
    """Logs each stage with its duration (a user waits minutes) and keeps the timings for provenance."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        logger.info("stage %s: started", name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        logger.info("stage %s: done in %.1f s", name, self.seconds[name])


def run_pipeline(input_path: Path | list[Path], outdir: Path, config: PipelineConfig,
                 store: MeasurementStore | None = None) -> RunResult:
    """`input_path`: a folder, zip or DICOM file of one session, or a list of them (see `ingest`).
    `store`: record this run under the subject and compare it with the subject's earlier time points."""
    outdir = Path(outdir)
    _prepare_outdir(outdir)
    staging = Path(tempfile.mkdtemp(prefix=".pedseg-staging-", dir=outdir))
    work = Path(tempfile.mkdtemp(prefix="pedseg-work-"))
    try:
        result = _run(input_path, outdir, staging, work, config, store)
        (outdir / "error.json").unlink(missing_ok=True)
        return result
    except Exception as exc:
        error = as_pipeline_error(exc)
        _write_error(outdir, error)
        if error is exc:
            raise
        raise error from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if config.keep_workdir:
            logger.info("work folder kept at %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _write_error(outdir: Path, error: PipelineError) -> None:
    try:
        write_text(outdir / "error.json", json.dumps(error.to_dict(), indent=2) + "\n")
    except OSError as exc:  # a full disk or a vanished folder must not hide the error itself
        logger.warning("could not write error.json (%s)", exc.strerror)


def _prepare_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        # A killed run (power cut, SIGKILL) leaves its staging folder, and maybe half an error.json: remove them.
        for stale in outdir.glob(".pedseg-staging-*"):
            shutil.rmtree(stale)
        for stale in outdir.glob(".*.partial*"):
            stale.unlink()
        probe = tempfile.NamedTemporaryFile(dir=outdir, prefix=".pedseg-write-test-")
        probe.close()
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(exc, f"writing to the output folder '{outdir}'") from exc
        raise InputError(f"Cannot write to the output folder '{outdir}' ({exc.strerror}).",
                         hint="Choose a writable output folder.") from exc


def _run(input_path: Path | list[Path], outdir: Path, staging: Path, work: Path, config: PipelineConfig,
         store: MeasurementStore | None) -> RunResult:
    stage = StageTimer()
    bundle = load_bundle(config.bundle)  # a broken bundle fails before minutes of preprocessing
    with stage("ingest"):
        session = ingest(input_path, work / "input")
    with stage("identify"):
        identification = identify(session, config)
    write_text(staging / "identify.json", session_to_json(identification))
    absent = [role for role in bundle.required_inputs if role not in identification.chosen]
    if absent:
        raise MissingSequenceError(f"Model bundle '{bundle.name}' requires {absent}, which this session lacks.",
                                   hint="Add the missing series or use a bundle that accepts fewer inputs.")
    reference_role = config.reference_role if config.reference_role in identification.chosen else "t1c"
    context = _study_context(session, identification.chosen[reference_role], config.pseudonymize, config.subject_salt)
    if config.patient_age_years is None and context["age_years"] is not None:
        config = PipelineConfig(**{**vars(config), "patient_age_years": context["age_years"]})

    with stage("preprocess"):
        pre = preprocess(session, identification, work, config)
    with stage("infer"):
        prediction = infer(pre, bundle, work, config)
    with stage("postprocess"):
        atlas_labels, pp_steps = postprocess(sitk.ReadImage(str(prediction.labels)), bundle.postprocessing)
        native_labels = labels_to_native(atlas_labels, pre.atlas_to_native[reference_role], pre.native[reference_role])
    with stage("measure"):
        measurements = measure(atlas_labels, native_labels, qc_flags=list(pre.qc.get("flags", [])))
        measurements.uncertainty = uncertainty_summary(prediction.uncertainty, atlas_labels)

    outputs = _write_nifti(staging, pre, prediction, atlas_labels, native_labels, reference_role, config)
    provenance = {
        "pedseg_version": PEDSEG_VERSION,
        "packages": {name: _version(name) for name in PACKAGES},
        "bundle": {"name": bundle.name, "version": bundle.version, "licence": bundle.licence, "sha256": bundle.sha256(),
                   "label_convention": bundle.label_convention},
        "inputs": {
            "study_instance_uid": session.study_uid,
            "series_instance_uids": dict(identification.chosen),
        },
        "device": prediction.device,
        "fast_mode": config.fast,
        "tta": prediction.tta,
        "models": prediction.models_used,
        "folds": prediction.folds_used,
        "ensemble": prediction.ensemble,
        "postprocessing": pp_steps,
        "qc": pre.qc,
        "reference_role": reference_role,
    }
    timeline = _timeline(store, session, context, measurements, provenance, config) if store is not None else None
    with stage("report"):
        outputs.update(_write_reports(staging, session, identification, pre, atlas_labels, native_labels, measurements,
                                      provenance, context, reference_role, bundle, config, timeline))
    provenance["stage_seconds"] = stage.seconds
    outputs["identify"] = staging / "identify.json"
    provenance["outputs"] = sorted(str(p.relative_to(staging)) for p in outputs.values()) + ["provenance.json"]
    outputs["provenance"] = write_text(staging / "provenance.json", json.dumps(provenance, indent=2, default=str) + "\n")
    earlier = _earlier_outputs(outdir)
    final = {name: _publish(path, staging, outdir) for name, path in outputs.items()}
    _remove_outputs(outdir, earlier - set(provenance["outputs"]))
    logger.info("all outputs written to %s", outdir)
    if timeline is not None:  # only a run whose outputs are all in place becomes a time point
        store.record(timeline.current)
    return RunResult(outdir=outdir, outputs=final, identification=identification, measurements=measurements,
                     provenance=provenance)


def _write_nifti(staging, pre, prediction, atlas_labels, native_labels, reference_role, config) -> dict[str, Path]:
    nifti = staging / "nifti"
    nifti.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for role, path in pre.images.items():
        outputs[f"nifti_{role}"] = Path(shutil.copy(path, nifti / f"{role}.nii.gz"))
    outputs["nifti_brain_mask"] = Path(shutil.copy(pre.brain_mask, nifti / "brain_mask.nii.gz"))
    if prediction.uncertainty is not None:
        outputs["nifti_uncertainty"] = Path(shutil.copy(prediction.uncertainty, nifti / "uncertainty_atlas.nii.gz"))
    for region, path in prediction.probabilities.items():
        outputs[f"nifti_probability_{region}"] = Path(shutil.copy(path, nifti / path.name))
    for name, image in (("labels_atlas", atlas_labels), (f"labels_{reference_role}_native", native_labels)):
        path = nifti / f"{name}.nii.gz"
        write_image(_in_convention(image, config.label_convention), path)
        outputs[f"nifti_{name}"] = path
    return outputs


def _in_convention(labels: sitk.Image, convention: str) -> sitk.Image:
    if convention == "2024":
        return labels
    out = sitk.GetImageFromArray(convert_labels(sitk.GetArrayFromImage(labels), "2024", convention))
    out.CopyInformation(labels)
    return out


def _timeline(store: MeasurementStore, session: Session, context: dict, measurements, provenance: dict,
              config: PipelineConfig) -> Longitudinal | None:
    """This run as a time point, compared with the subject's earlier ones in the store."""
    key = config.subject_key or context["subject_key"]
    if not key:
        logger.warning("no PatientID and no subject key: this run is not tracked")
        return None
    current = time_point(measurements, subject_key=key, study_uid=session.study_uid, study_date=session.study_date,
                         bundle=provenance["bundle"])
    timeline = compare(current, store.history(key), config.response_thresholds or ResponseThresholds(),
                       across_bundles=config.compare_across_bundles)
    for note in timeline.notes:
        logger.warning("%s", note)
    logger.info("longitudinal: %d earlier time point(s) compared", len(timeline.priors))
    return timeline


def _write_reports(staging, session, identification, pre, atlas_labels, native_labels, measurements, provenance,
                   context, reference_role, bundle, config, timeline) -> dict[str, Path]:
    from pedseg.reporting.dicom_pdf import write_encapsulated_pdf
    from pedseg.reporting.dicom_seg import write_seg
    from pedseg.reporting.dicom_sr import write_sr
    from pedseg.reporting.longitudinal import change_rows, write_history_csv
    from pedseg.reporting.pdf import write_report_pdf
    from pedseg.reporting.tables import write_measurements_csv, write_measurements_json

    outputs: dict[str, Path] = {}
    source_files = session.by_uid(identification.chosen[reference_role]).files
    table_context = {
        "study_instance_uid": session.study_uid,
        "series_instance_uids": dict(identification.chosen),
        "bundle": provenance["bundle"],
        "fast_mode": config.fast,
        "study_date": session.study_date,
    }
    outputs["measurements_json"] = write_measurements_json(measurements, staging / "measurements.json", context=table_context)
    outputs["measurements_csv"] = write_measurements_csv(measurements, staging / "measurements.csv", context=table_context)
    if timeline is not None:
        outputs["longitudinal"] = write_history_csv(change_rows(timeline), staging / "longitudinal.csv")
    has_tumour = measurements.regions["WT"].voxels > 0
    if not has_tumour:
        logger.info("no tumour found: the report says so, and no DICOM SEG or SR is written")
    if config.write_seg and has_tumour:
        outputs["seg"] = write_seg(native_labels, source_files, staging / "seg" / "segmentation.dcm",
                                   algorithm_name=bundle.name, algorithm_version=bundle.version)
        if config.write_sr:
            outputs["sr"] = _first_path(write_sr(measurements, outputs["seg"], source_files, staging / "sr" / "measurements.dcm",
                                                 algorithm_name=bundle.name, algorithm_version=bundle.version,
                                                 # one Tracking UID per region for the subject at every time point
                                                 tracking_uids=tracking_uids(timeline.current.subject_key) if timeline else None))
    if config.write_pdf:
        outputs["pdf"] = write_report_pdf(
            staging / "report.pdf", images=pre.images, labels=_atlas_labels_file(staging, atlas_labels),
            measurements=measurements, identification=identification, qc=pre.qc, provenance=provenance,
            subject=context["display"], fast_mode=config.fast, longitudinal=timeline,
        )
        outputs["pdf_dicom"] = write_encapsulated_pdf(outputs["pdf"], source_files, staging / "report" / "report_pdf.dcm",
                                                      title="pedseg tumour volumetry report (research use only)")
    return outputs


def _first_path(result) -> Path:
    return result[0] if isinstance(result, tuple) else result


def _atlas_labels_file(staging: Path, atlas_labels: sitk.Image) -> Path:
    path = staging / "nifti" / "labels_atlas.nii.gz"
    if not path.exists():
        write_image(atlas_labels, path)
    return path


def _study_context(session: Session, reference_uid: str, pseudonymize: bool, subject_salt: str = "") -> dict:
    """Display identity for the report (pseudonymised unless configured otherwise), the patient's age and the
    subject key for longitudinal tracking (a hash of the PatientID; "" without one)."""
    ds = pydicom.dcmread(session.by_uid(reference_uid).files[0], stop_before_pixels=True)
    patient_id = str(ds.get("PatientID", ""))
    pseudonym = "subject-" + hashlib.sha256(patient_id.encode()).hexdigest()[:10]
    age = str(ds.get("PatientAge", ""))
    age_years = None
    if len(age) == 4 and age[:3].isdigit():
        age_years = int(age[:3]) / {"Y": 1, "M": 12, "W": 52.18, "D": 365.25}.get(age[3], 1)
    display_id = pseudonym if pseudonymize else f"{ds.get('PatientName', '')} ({patient_id})"
    return {
        "display": {"display_id": display_id, "study_date": session.study_date},
        "pseudonym": pseudonym,
        "age_years": age_years,
        "subject_key": subject_key(patient_id, subject_salt) if patient_id else "",
    }


def _earlier_outputs(outdir: Path) -> set[str]:
    """The files an earlier run wrote into OUTDIR, from its provenance (none if there was no earlier run)."""
    try:
        listed = json.loads((outdir / "provenance.json").read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in listed if isinstance(name, str)}


def _remove_outputs(outdir: Path, names: set[str]) -> None:
    """Remove an earlier run's outputs that this run did not write (a SEG after a run that found no tumour
    would otherwise sit beside the new report). Only files the earlier run listed, only inside OUTDIR."""
    root = outdir.resolve()
    for name in sorted(names):
        path = (outdir / name).resolve()
        if path.is_relative_to(root) and path != root and path.is_file():
            path.unlink()
            logger.info("removed %s, an earlier run's output this run does not produce", name)
            if path.parent != root:
                with contextlib.suppress(OSError):  # the folder still holds other files
                    path.parent.rmdir()


def _publish(path: Path, staging: Path, outdir: Path) -> Path:
    target = outdir / path.relative_to(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return target


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
