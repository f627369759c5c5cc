"""Flywheel gear entry: one job folder in, one pipeline call, outputs and `.metadata.json` out.

A 'dicom' input is one `run_pipeline` call. Session mode reads the session's candidate series once, computes
the idempotency key from them, and hands the same session to `run_session`. An 'edited_seg' input (a reader's
edited DICOM SEG) is checked before the run, then the finished run's output folder and the SEG go to the one call
`pedseg review` makes (`review_segmentation`); in session mode the reviewed volumes join the time point as
`pedseg review --db` records them. The edited SEG's hash joins the idempotency key. Exit codes are the error model's
(`pedseg.pipeline.errors`): 0 done, 2 bad input, 3 missing sequence, 4 unsupported data, 5 out of resources,
6 bad model bundle, 7 network, 8 stopped (a cancelled job), 1 anything unexpected. On failure `output/error.json` says
why.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pedseg.gear.context import FLYWHEEL_ROOT, GearJob, load_job, stage_edited_seg, unpack_bundle
from pedseg.gear.idempotency import file_sha256, input_key
from pedseg.gear.metadata import REVIEWED_PREFIX, build_metadata, publish_outputs, run_summary, write_metadata
from pedseg.gear.session import FlywheelSession, open_session
from pedseg.interrupt import stop_on_signals
from pedseg.logs import configure_logging
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import InputError, InternalError, as_pipeline_error
from pedseg.tracking.flywheel import FlywheelStore
from pedseg.workspace import Workspace, write_error

if TYPE_CHECKING:
    from pedseg.runner import RunResult

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    root: Path = args.root
    debug = False
    try:
        job = load_job(root)
        debug = job.debug
        configure_logging(verbose=debug)
        with stop_on_signals():  # a cancelled job (SIGTERM) cleans up and says so in error.json
            run_job(job)
        return 0
    except Exception as exc:  # noqa: BLE001 - the engine needs an exit code and a message, not a crash
        error = as_pipeline_error(exc)  # an unexpected one by type and place only: its text may quote headers
        logger.error("pedseg stopped (%s, exit code %d): %s", error.kind, error.exit_code, error)
        if debug and isinstance(error, InternalError):
            logger.exception("traceback")
        write_error(root / "output", error)  # a failure before the run's workspace existed needs it too
        return error.exit_code


def run_job(job: GearJob) -> None:
    job.output_dir.mkdir(parents=True, exist_ok=True)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    config = job.config
    edited_seg, edited_sha = None, ""
    if job.edited_seg is not None:  # a SEG that cannot be reviewed fails now, not after the run
        from pedseg.reporting.review import read_edited_seg

        edited_seg = stage_edited_seg(job.edited_seg, job.work_dir / "edited_seg")
        read_edited_seg(edited_seg)
        edited_sha = file_sha256(edited_seg)
        logger.info("edited_seg input: the run's result is reviewed with the edited segmentation (SHA-256 %s)",
                    edited_sha[:12])
    if job.bundle_zip is not None:
        config = dataclasses.replace(config, bundle=unpack_bundle(job.bundle_zip, job.work_dir / "bundle"))
    from pedseg.runner import run_pipeline  # the pipeline's heavy imports: not needed to report a bad config

    tracked: _Tracked | None = None
    with _temporary_files_in(job.work_dir):
        if job.dicom:
            logger.info("longitudinal tracking off: runs on a 'dicom' input are not tracked (session mode, the "
                        "api-key and no 'dicom' input, records and compares each Flywheel subject's time points)")
            result = run_pipeline(job.dicom, job.output_dir, config)
            session = None
        else:
            session = _open_session(job)
            ran = _run_on_session(session, job, config, edited_sha)
            if ran is None:
                return
            result, tracked = ran
        outputs = dict(result.outputs)
        review = None
        if edited_seg is not None:
            from pedseg.reporting.review import review_segmentation
            from pedseg.tracking.records import record_review

            review = review_segmentation(edited_seg, job.output_dir)  # what `pedseg review EDITED_SEG OUTDIR` does
            outputs |= {REVIEWED_PREFIX + key: path for key, path in review.outputs.items()}
            if tracked is not None:
                record_review(tracked.store, tracked.subject_key, review.study_uid,
                              result.provenance.bundle.sha256,
                              {name: r.volume_ml for name, r in review.measurements.regions.items()})
    summary = run_summary(result, review, edited_sha)
    files = publish_outputs(outputs, job.output_dir)
    write_metadata(build_metadata(summary, files, job.destination.get("type") or "analysis", job.job_id),
                   job.output_dir)
    if session is not None:
        session.write_results(summary)
    if review is not None:
        logger.info("done: whole tumour %.2f mL reviewed (automatic %.2f mL), %d files for upload (idempotency key "
                    "%s)", review.measurements.regions["WT"].volume_ml, result.measurements.regions["WT"].volume_ml,
                    len(files), summary["idempotency_key"][:12])
        return
    logger.info("done: whole tumour %.2f mL, %d files for upload (idempotency key %s)",
                result.measurements.regions["WT"].volume_ml, len(files), summary["idempotency_key"][:12])


@dataclasses.dataclass(frozen=True)
class _Tracked:
    store: FlywheelStore
    subject_key: str


def _run_on_session(session: FlywheelSession, job: GearJob, config: PipelineConfig,
                    edited_seg_sha256: str = "") -> tuple[RunResult, _Tracked | None] | None:
    """Session mode: the candidate series downloaded and read once, the run skipped when the session already
    holds its result (None), else tracked under the session's Flywheel subject."""
    from pedseg.runner import StageClock, read_session, run_session

    clock = StageClock()
    with Workspace(job.output_dir, keep_work=config.keep_workdir) as workspace:
        bundle = load_bundle(config.bundle)  # a broken bundle fails before the download
        dicom = read_session(session.download_candidates(job.work_dir / "session"), workspace, clock)
        if _already_done(session, job, input_key(dicom, config, bundle, edited_seg_sha256)):
            return None
        store, config = _tracking(session, config)
        result = run_session(dicom, workspace, config, store, bundle=bundle, clock=clock)
        return result, (_Tracked(store, config.subject_key) if store is not None else None)


def _open_session(job: GearJob) -> FlywheelSession:
    if not job.api_key:
        raise InputError("No 'dicom' input was given, and no api-key to read the session's files with.",
                         hint="Attach a zip of the session's DICOM files as the 'dicom' input, or run the gear "
                              "as an analysis of a session so that it can download the session's DICOM files.")
    return open_session(job)


def _tracking(session: FlywheelSession, config: PipelineConfig) -> tuple[FlywheelStore | None, PipelineConfig]:
    """The Flywheel measurement store, and the config keyed by the session's Flywheel subject id (not a PatientID
    hash: Flywheel's subject is the curated identity of the child across sessions)."""
    store, subject_id = session.measurement_store()
    if not subject_id:
        logger.warning("longitudinal tracking off: the session belongs to no Flywheel subject")
        return None, config
    logger.info("longitudinal tracking: this run is compared with the time points of the session's Flywheel subject "
                "and recorded in the session's info.pedseg.timepoints")
    return store, dataclasses.replace(config, subject_key=str(subject_id))


def _already_done(session: FlywheelSession, job: GearJob, key: str) -> bool:
    """True when the session holds a result for the same series and weights (and edited SEG) and no re-run was
    asked for."""
    earlier = session.earlier_result(key)
    if earlier is None:
        return False
    if job.force_rerun:
        logger.info("force_rerun: running again although %s holds a result for these series and model weights "
                    "(idempotency key %s)", earlier, key[:12])
        return False
    logger.info("nothing to do: %s already holds the pedseg result for these series and model weights "
                "(idempotency key %s); no outputs written. Set force_rerun=true to run again.", earlier, key[:12])
    return True


@contextlib.contextmanager
def _temporary_files_in(folder: Path) -> Iterator[None]:
    """The pipeline unpacks and preprocesses in tempfile folders: put them on the engine's work disk,
    which is sized for the job, rather than on the image's /tmp."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description="pedseg Flywheel gear (reads ROOT/config.json).")
    parser.add_argument("--root", type=Path, default=FLYWHEEL_ROOT,
                        help=f"gear folder with config.json, input/, output/ (default {FLYWHEEL_ROOT})")
    return parser
