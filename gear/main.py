"""Flywheel gear entry: one job folder in, one `run_pipeline` call, outputs and `.metadata.json` out.

Exit codes are the pipeline's (`pipeline.errors`): 0 done, 2 bad input, 3 missing sequence, 4 unsupported
data, 5 out of resources, 6 bad model bundle, 1 anything unexpected. On failure `output/error.json` says why.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pedseg.gear.context import FLYWHEEL_ROOT, GearJob, load_job, unpack_bundle
from pedseg.gear.idempotency import input_key
from pedseg.gear.metadata import build_metadata, publish_outputs, run_summary, write_metadata
from pedseg.gear.session import FlywheelSession, open_session
from pedseg.pipeline.atomic import write_text
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import InputError, InternalError, PipelineError, as_pipeline_error
from pedseg.tracking.flywheel import FlywheelStore

logger = logging.getLogger(__name__)
LOG_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    root: Path = args.root
    debug = False
    try:
        job = load_job(root)
        debug = job.debug
        if debug:
            logging.getLogger().setLevel(logging.DEBUG)
        run_job(job)
        return 0
    except Exception as exc:  # noqa: BLE001 - the engine needs an exit code and a message, not a crash
        error = as_pipeline_error(exc)  # an unexpected exception by type and place only: its text may quote headers
        logger.error("pedseg stopped (%s, exit code %d): %s", error.kind, error.exit_code, error)
        if debug and isinstance(error, InternalError):
            logger.exception("traceback")
        _write_error(root / "output", error)
        return error.exit_code


def run_job(job: GearJob) -> None:
    job.output_dir.mkdir(parents=True, exist_ok=True)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    config = job.config
    if job.bundle_zip is not None:
        config = dataclasses.replace(config, bundle=unpack_bundle(job.bundle_zip, job.work_dir / "bundle"))
    from pedseg.runner import run_pipeline  # torch and friends: not needed to report a bad config

    session = None if job.dicom else _open_session(job)
    store = None
    if session is None:
        logger.info("longitudinal tracking off: runs on a 'dicom' input are not tracked (session mode, the api-key "
                    "and no 'dicom' input, records and compares each Flywheel subject's time points)")
    with _temporary_files_in(job.work_dir):
        input_path = job.dicom
        if session is not None:
            input_path = session.download_candidates(job.work_dir / "session")
            if _already_done(session, job, input_path, config):
                return
            store, config = _tracking(session, config)
        result = run_pipeline(input_path, job.output_dir, config, store=store)
    summary = run_summary(result)
    files = publish_outputs(result, job.output_dir)
    write_metadata(build_metadata(summary, files, job.destination.get("type") or "analysis", job.job_id),
                   job.output_dir)
    if session is not None:
        session.write_results(summary)
    logger.info("done: whole tumour %.2f mL, %d files for upload (idempotency key %s)",
                result.measurements.regions["WT"].volume_ml, len(files), summary["idempotency_key"][:12])


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


def _already_done(session: FlywheelSession, job: GearJob, dicom: Path, config: PipelineConfig) -> bool:
    """True when the session holds a result for the same series and weights and no re-run was asked for.
    Identification runs here first (as the pipeline will) because the key needs the chosen series."""
    key = input_key(dicom, config, job.work_dir / "identify")
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


def _write_error(output_dir: Path, error: PipelineError) -> None:
    with contextlib.suppress(OSError):  # an unwritable output folder must not hide the original error
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text(output_dir / "error.json", json.dumps(error.to_dict(), indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description="pedseg Flywheel gear (reads ROOT/config.json).")
    parser.add_argument("--root", type=Path, default=FLYWHEEL_ROOT,
                        help=f"gear folder with config.json, input/, output/ (default {FLYWHEEL_ROOT})")
    return parser
