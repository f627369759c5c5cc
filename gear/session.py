"""Session mode: no 'dicom' input, so read every DICOM file of the analysed session through the api-key.

Each Flywheel acquisition holds a series as a DICOM zip; they are unpacked side by side into one folder,
which is what `run_pipeline` takes as a session. Names and labels are not logged (they may hold PHI).
"""
from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path

from gear.context import GearJob
from pipeline.errors import InputError
from pipeline.ingest import _extract_zip

logger = logging.getLogger(__name__)


def download_session_dicom(job: GearJob, dest: Path, client=None) -> Path:
    client = client or _client(job.api_key)
    session = _session(client, job.destination)
    shutil.rmtree(dest, ignore_errors=True)  # a local re-run in the same gear folder starts afresh
    dest.mkdir(parents=True)
    count = 0
    for listed in session.acquisitions():
        acquisition = listed.reload()  # the full container: a listing's entries may lack file details
        for file_entry in acquisition.files:
            if file_entry.type != "dicom":
                continue
            count += 1
            _fetch(acquisition, file_entry.name, dest / f"{count:04d}")
    if not count:
        raise InputError("The session holds no DICOM files.",
                         hint="Upload the session's DICOM series, or attach a zip of them as the 'dicom' input.")
    logger.info("session mode: %d DICOM files downloaded", count)
    return dest


def _fetch(acquisition, name: str, folder: Path) -> None:
    """Download one DICOM file; a zipped series is unpacked with the pipeline's hardened extractor."""
    folder.mkdir(parents=True)
    download = folder / "download"
    acquisition.download_file(name, str(download))
    if zipfile.is_zipfile(download):
        _extract_zip(download, folder)
        download.unlink()
    else:
        download.rename(folder / "image.dcm")


def _session(client, destination: dict):
    kind, container_id = destination.get("type"), destination.get("id")
    if kind == "session":
        return client.get_session(container_id)
    level = kind
    if kind == "analysis":
        parent = client.get_analysis(container_id).parent
        if parent.type == "session":
            return client.get_session(parent.id)
        level = f"{parent.type} analysis"
    raise InputError(f"Session mode reads the DICOM files of one session, but this job runs on a {level}.",
                     hint="Run the gear as an analysis of a session, or attach a zip of the session as the 'dicom' input.")


def _client(api_key: str | None):
    try:
        import flywheel
    except ImportError as exc:
        raise InputError("Session mode needs the Flywheel SDK (flywheel-sdk), which this installation lacks.",
                         hint="Attach a zip of the session as the 'dicom' input, or install flywheel-sdk.") from exc
    return flywheel.Client(api_key)
