"""One pipeline call from a DICOM session to every output: the stages in order, then the writers.

`run_pipeline(inputs, outdir, config)` is the whole job (adapters call it); `run_session(session, workspace,
config)` runs from an ingested session on, for an adapter that has already read the session (the gear reads it
to compute its idempotency key). Each stage logs one line with its time and the facts a user needs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk

import pedseg
from pedseg.pipeline.atomic import write_text
from pedseg.pipeline.bundle import BundleModel, ModelBundle, load_bundle
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import MissingSequenceError
from pedseg.pipeline.identify import identify
from pedseg.pipeline.identify_rules import ROLE_NAMES
from pedseg.pipeline.infer import infer, uncertainty_summary
from pedseg.pipeline.ingest import ingest
from pedseg.pipeline.longitudinal import Longitudinal, compare
from pedseg.pipeline.measure import measure
from pedseg.pipeline.members import check_bundle_region_weights
from pedseg.pipeline.population import CHILDREN_COVERED, population_warning
from pedseg.pipeline.postprocess import postprocess
from pedseg.pipeline.preprocess import labels_to_native, preprocess
from pedseg.pipeline.study import study_context
from pedseg.pipeline.types import Identification, Measurements, PopulationWarning, SeriesDecision, Session, StudyContext
from pedseg.reporting.artifacts import BundleRecord, Provenance, RunArtifacts
from pedseg.tracking.records import time_point
from pedseg.tracking.store import MeasurementStore
from pedseg.workspace import PROVENANCE_FILE, Workspace

if TYPE_CHECKING:
    from pedseg.reporting.writers import Writer

logger = logging.getLogger(__name__)
PACKAGES = ("nnunetv2", "torch", "SimpleITK", "pydicom", "highdicom", "deepbet", "dcm2niix", "reportlab", "numpy")


@dataclass(frozen=True)
class RunResult:
    """What one pipeline run produced; adapters translate this into their world."""

    outdir: Path
    outputs: dict[str, Path]  # e.g. "seg", "sr", "pdf", "measurements_json", "measurements_csv", "provenance"
    identification: Identification
    measurements: Measurements
    provenance: Provenance
    # Set when a child's study was segmented by a bundle not trained on children (pedseg.pipeline.population).
    population_warning: PopulationWarning | None = None


class StageClock:
    """Times each stage and logs it in one line with the facts a user needs; the timings go to provenance."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[list[str]]:
        facts: list[str] = []
        start = time.perf_counter()
        yield facts  # the stage appends what it found
        self.seconds[name] = round(time.perf_counter() - start, 2)
        logger.info("%-11s %6.1f s  %s", name, self.seconds[name], "; ".join(facts))


def run_pipeline(inputs: Path | Sequence[Path], outdir: Path, config: PipelineConfig,
                 store: MeasurementStore | None = None) -> RunResult:
    """`inputs`: a folder, zip or DICOM file of one session, or several (see `ingest`). `store`: record this run
    under the subject and compare it with the subject's earlier time points."""
    clock = StageClock()
    with Workspace(outdir, keep_work=config.keep_workdir) as workspace:
        bundle = _load_checked_bundle(config)  # a broken bundle fails before the session is read
        session = read_session(inputs, workspace, clock)
        return run_session(session, workspace, config, store, bundle=bundle, clock=clock)


def _load_checked_bundle(config: PipelineConfig) -> ModelBundle:
    """The bundle, with its region weights checked for every set of members a session could run (they need the
    members' declared outputs, which loading alone does not read)."""
    bundle = load_bundle(config.bundle)
    check_bundle_region_weights(bundle)
    return bundle


def read_session(inputs: Path | Sequence[Path], workspace: Workspace, clock: StageClock) -> Session:
    """The ingest stage: the input's DICOM series, unpacked where needed into the workspace."""
    with clock("ingest") as facts:
        session = ingest(inputs, workspace.work / "input")
        files = sum(len(s.files) for s in session.series)
        facts.append(f"{len(session.series)} series, {files} DICOM files, one study")
    return session


def run_session(session: Session, workspace: Workspace, config: PipelineConfig,
                store: MeasurementStore | None = None, *, bundle: ModelBundle | None = None,
                clock: StageClock | None = None, writers: Sequence[Writer] | None = None) -> RunResult:
    """Every stage after ingest, the writers, and publishing into the workspace's OUTDIR. `bundle`: loaded by
    the caller already, else from `config.bundle`; `clock`: the one that timed the ingest, for provenance;
    `writers`: reporting.writers.DEFAULT_WRITERS unless given."""
    bundle = bundle or _load_checked_bundle(config)
    clock = clock or StageClock()
    work = workspace.work
    with clock("identify") as facts:
        # A bundle with fallback members decides itself which missing sequences it can do without.
        identification = identify(session, dataclasses.replace(config, missing_policy="allow")
                                  if bundle.has_fallbacks else config)
        members = _require_inputs(identification, bundle)
        facts.append(_chosen_text(session, identification))
    context = study_context(session, identification.chosen[identification.reference_role],
                            pseudonymize=config.pseudonymize, subject_salt=config.subject_salt)
    # The configured age wins over the headers', for the brain-volume check and the population guard alike.
    age_years = config.patient_age_years if config.patient_age_years is not None else context.age_years
    warning = _population_guard(bundle, age_years)
    with clock("preprocess") as facts:
        pre = preprocess(session, identification, work, config, patient_age_years=age_years,
                         preparations={member.brain for member in members} or {"skull_stripped"})
        facts.append(f"{len(pre.images)} series on the BraTS atlas, brain {pre.qc.brain_volume_ml:.0f} mL "
                     f"({pre.qc.brain_extraction}), {len(pre.qc.flags)} QC flag(s)")
    with clock("infer") as facts:
        prediction = infer(pre, bundle, work, config)
        ran = (f"{len(prediction.models_used)} DeepMedic model(s)" if bundle.kinds == ("deepmedic",) else
               f"{len(prediction.folds_used)} fold(s) of {len(prediction.models_used)} model(s)")
        facts.append(f"{bundle.name} {bundle.version}: {ran}, TTA {'on' if prediction.tta else 'off'}, "
                     f"{prediction.device}")
        if prediction.ensemble and prediction.ensemble.members_skipped:
            facts.append(f"fallback: {', '.join(prediction.ensemble.members_skipped)} skipped (see above)")
    with clock("postprocess") as facts:
        labels, steps = postprocess(sitk.ReadImage(str(prediction.labels)), bundle.postprocessing)
        role = identification.reference_role
        native_labels = labels_to_native(labels, pre.atlas_to_native[role], pre.native[role])
        # The label map on each series that gets a DICOM SEG: the reference series and config.seg_roles.
        seg_labels = {r: native_labels if r == role else labels_to_native(labels, pre.atlas_to_native[r], pre.native[r])
                      for r in (role, *config.seg_roles) if r in pre.native}
        facts.append(f"{sum(step.voxels_changed for step in steps)} voxels changed by {len(steps)} step(s); "
                     f"labels mapped to the {role} grid")
    with clock("measure") as facts:
        measurements = measure(labels, native_labels, qc_flags=list(pre.qc.flags),
                               brain_volume_ml=pre.qc.brain_volume_ml,
                               uncertainty=uncertainty_summary(prediction.uncertainty, labels))
        facts.append(_volumes_text(measurements))
    provenance = Provenance(
        pedseg_version=pedseg.__version__,
        packages={name: _version(name) for name in PACKAGES},
        bundle=BundleRecord(bundle.name, bundle.version, bundle.licence, bundle.sha256, bundle.label_convention),
        study_instance_uid=session.study_uid, series_instance_uids=dict(identification.chosen),
        device=prediction.device, fast_mode=config.fast, tta=prediction.tta, models=prediction.models_used,
        folds=prediction.folds_used, ensemble=prediction.ensemble, postprocessing=tuple(steps), qc=pre.qc,
        reference_role=identification.reference_role, pinned_roles=dict(identification.pinned),
    )
    timeline = (_timeline(store, session, context, measurements, provenance.bundle, config)
                if store is not None else None)
    artifacts = RunArtifacts(session=session, identification=identification, context=context, config=config,
                             bundle=bundle, preprocessed=pre, prediction=prediction, labels=labels,
                             native_labels=native_labels, seg_labels=seg_labels, measurements=measurements,
                             provenance=provenance, timeline=timeline, population_warning=warning)
    with clock("report") as facts:
        outputs: dict[str, Path] = {}
        for writer in writers or _default_writers():
            outputs.update(writer(artifacts, workspace.staging))
        facts.append(f"{len(outputs) + 1} files" + ("" if artifacts.has_tumour else
                                                    "; no tumour found: the report says so, and no DICOM SEG or SR"))
    listed = sorted(str(p.relative_to(workspace.staging)) for p in outputs.values()) + [PROVENANCE_FILE]
    provenance = replace(provenance, stage_seconds=dict(clock.seconds), outputs=tuple(listed))
    outputs["provenance"] = write_text(workspace.staging / PROVENANCE_FILE,
                                       json.dumps(provenance.as_dict(), indent=2, default=str) + "\n")
    final = workspace.publish(outputs)
    if timeline is not None:  # only a run whose outputs are all in place becomes a time point
        store.record(timeline.current)
    logger.info("done: outputs in %s", workspace.outdir)
    return RunResult(outdir=workspace.outdir, outputs=final, identification=identification,
                     measurements=measurements, provenance=provenance, population_warning=warning)


def _default_writers() -> Sequence[Writer]:
    # matplotlib, reportlab and highdicom load once inference is done, so they are not resident at its memory
    # peak (about 90 MB on the demo).
    from pedseg.reporting.writers import DEFAULT_WRITERS

    return DEFAULT_WRITERS


def _require_inputs(identification: Identification, bundle: ModelBundle) -> tuple[BundleModel, ...]:
    """The bundle's members this session's sequences can run. MissingSequenceError, before anything is
    preprocessed, when the session lacks a sequence the bundle requires or no member can run; error.json then
    holds what was identified (`identification_report`)."""
    members = bundle.runnable(identification.chosen)
    absent = [role for role in bundle.required_inputs if role not in identification.chosen]
    if members and not absent:
        return members
    def names(roles: Sequence[str]) -> str:
        return ", ".join(ROLE_NAMES[r] for r in roles)

    found = "; ".join(f"{role} {_decision(identification, key).label} (confidence "
                      f"{_decision(identification, key).confidence:.2f})"
                      for role, key in identification.chosen.items()) or "none"
    models = "; ".join(f"'{m.name}' needs {' + '.join(m.required_inputs)}"
                       + (f" (lacks {', '.join(m.lacks(identification.chosen))})" if m.lacks(identification.chosen) else
                          " (all present)") for m in bundle.models)
    head = (f"Model bundle '{bundle.name}' requires {names(absent)}, which this session lacks." if members else
            f"No model of bundle '{bundle.name}' can run on this session, which lacks "
            f"{names([r for r in bundle.inputs if any(r in m.lacks(identification.chosen) for m in bundle.models)])}.")
    raise MissingSequenceError(
        f"{head} Identified: {found}. Models and the sequences each runs with: {models}.",
        hint="Add the missing series (if one is there but was not recognised, pin it with --role ROLE=SERIES), or "
             "use a bundle whose models take these sequences. error.json lists how each series was identified.",
        details={"identification": identification_report(identification, bundle)})


def identification_report(identification: Identification, bundle: ModelBundle) -> dict:
    """What was identified when a run stops for want of sequences: each role's chosen series with its confidence
    and reasons, the roles missing, what each of the bundle's models needs and lacks, and every other series
    with the role it was given. Series are named by number and description only."""
    def series(d: SeriesDecision) -> dict:
        return {"series_number": d.series_number, "description": d.description, "part": d.part or None,
                "role": d.role, "confidence": round(d.confidence, 3), "reasons": list(d.reasons),
                "pinned": d.pinned}

    return {
        "chosen": {role: series(_decision(identification, key)) for role, key in identification.chosen.items()},
        "missing": list(identification.missing),
        "models": {m.name: {"needs": list(m.required_inputs), "lacks": m.lacks(identification.chosen),
                            "can_run": not m.lacks(identification.chosen)} for m in bundle.models},
        "other_series": [series(d) for d in identification.decisions if not d.chosen],
    }


def _decision(identification: Identification, key: str) -> SeriesDecision:
    return next(d for d in identification.decisions if d.key == key)



def _population_guard(bundle: ModelBundle, age_years: float | None) -> PopulationWarning | None:
    """The population warning of this run, logged once (the age is no identifier; nothing else is logged)."""
    warning = population_warning(bundle.population, age_years)
    if warning is not None:
        logger.warning("population: %s", warning.message)
    elif age_years is None and bundle.population not in CHILDREN_COVERED:
        logger.info("population: patient age unknown (no usable PatientAge, PatientBirthDate with StudyDate, or "
                    "configured age), so no check that bundle '%s' (trained on: %s) suits this patient",
                    bundle.name, bundle.population)
    return warning


def _chosen_text(session: Session, identification: Identification) -> str:
    chosen = ", ".join(f"{role} series {session.by_uid(key).header.series_number}"
                       for role, key in identification.chosen.items())
    unused = len(identification.decisions) - len(identification.chosen)
    return f"{chosen}; {unused} other series not used"


def _volumes_text(measurements: Measurements) -> str:
    regions = measurements.regions
    wt = regions["WT"]
    if not wt.voxels:
        return "no tumour found"
    return (f"WT {wt.volume_ml:.1f} mL in {wt.components} component(s), TC {regions['TC'].volume_ml:.1f} mL, "
            f"ET {regions['ET'].volume_ml:.1f} mL; RAPNO {measurements.rapno.region} "
            f"{measurements.rapno.sum_product_mm2:.0f} mm2")


def _timeline(store: MeasurementStore, session: Session, context: StudyContext, measurements: Measurements,
              bundle: BundleRecord, config: PipelineConfig) -> Longitudinal | None:
    """This run as a time point, compared with the subject's earlier ones in the store."""
    key = config.subject_key or context.subject_key
    if not key:
        logger.warning("no PatientID and no subject key: this run is not tracked")
        return None
    current = time_point(measurements, subject_key=key, study_uid=session.study_uid, study_date=session.study_date,
                         bundle=bundle.as_dict())
    timeline = compare(current, store.history(key), config.response_thresholds,
                       across_bundles=config.compare_across_bundles)
    for note in timeline.notes:
        logger.warning("%s", note)
    logger.info("longitudinal: %d earlier time point(s) compared", len(timeline.priors))
    return timeline


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"

