"""Session mode: no 'dicom' input, so the gear works on the analysed session through the SDK (api-key input).

It downloads the session's candidate DICOM series (Flywheel's header copy rules out the rest, see
`gear.candidates`), finds an earlier pedseg result with the same idempotency key, and writes the summary
back under session.info["pedseg"] (other keys untouched) with a tag. Its measurement store records the run as a
time point of the session's Flywheel subject (`tracking.flywheel`). Each Flywheel acquisition holds a
series as a DICOM zip; they are unpacked side by side into one folder, which `run_pipeline` takes as a
session. Series are named by number and description only; labels and file names are not logged.
"""
from __future__ import annotations

import logging
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pedseg.gear.candidates import flywheel_header, rejection_reasons
from pedseg.gear.context import GearJob
from pedseg.gear.metadata import GEAR_NAME, TAGS
from pedseg.pipeline.archive import safe_extract
from pedseg.pipeline.errors import InputError, MissingSequenceError
from pedseg.pipeline.identify_rules import ROLE_NAMES
from pedseg.tracking.flywheel import FlywheelStore, store_for_session

logger = logging.getLogger(__name__)

INFO_KEY = "pedseg"  # the namespace of this gear's results in session.info and analysis.info


@dataclass
class FlywheelSession:
    session: Any  # flywheel.Session (or a test fake with the same methods)
    analysis_id: str | None  # this job's own analysis: never an "earlier" result
    client: Any = field(default=None, repr=False)  # the flywheel.Client the session was read with

    def measurement_store(self) -> tuple[FlywheelStore, str]:
        """The measurement store recording into this session, and the subject key: the session's Flywheel subject
        id, under which the subject's other sessions hold their time points."""
        if self.client is None:
            raise ValueError("this FlywheelSession was made without the client it was read with")
        return store_for_session(self.client, self.session.id)

    def download_candidates(self, dest: Path) -> Path:
        """Download every DICOM file that may hold one of the four sequences into `dest`."""
        shutil.rmtree(dest, ignore_errors=True)  # a local re-run in the same gear folder starts afresh
        dest.mkdir(parents=True)
        count = unjudged = 0
        skipped: list[str] = []
        for listed in self.session.acquisitions():
            acquisition = listed.reload()  # the full container: a listing's entries may lack file details
            for file_entry in acquisition.files:
                if file_entry.type != "dicom":
                    continue
                header = flywheel_header(((file_entry.info or {}).get("header") or {}).get("dicom"))
                reasons = rejection_reasons(header) if header else []
                if reasons:
                    skipped.append(f"series {header.series_number} '{header.description}' ({reasons[0]})")
                    continue
                count += 1
                unjudged += header is None
                _fetch(acquisition, file_entry.name, dest / f"{count:04d}")
        if skipped:
            logger.info("session mode: %d series skipped from their Flywheel headers: %s", len(skipped),
                        "; ".join(skipped))
        if not count:
            if skipped:
                raise MissingSequenceError(
                    f"Required sequence(s) missing: {', '.join(ROLE_NAMES.values())}. None of the session's DICOM "
                    f"series can be one: {'; '.join(skipped)}.",
                    hint="Upload the session's T1, T1 post-contrast, T2 and FLAIR series.")
            raise InputError("The session holds no DICOM files.",
                             hint="Upload the session's DICOM series, or attach a zip of them as the 'dicom' input.")
        logger.info("session mode: %d DICOM files downloaded (%d without Flywheel header information)",
                    count, unjudged)
        return dest

    def earlier_result(self, key: str) -> str | None:
        """Where the session already holds a pedseg result with this idempotency key, in words; else None."""
        if _key_in(self.session.info) == key:
            return f"the session (info.{INFO_KEY})"
        for analysis in self.session.analyses or []:
            if analysis.id == self.analysis_id or getattr(analysis.gear_info, "name", None) != GEAR_NAME:
                continue
            if _key_in(analysis.reload().info) == key:  # listings may omit info: read the analysis itself
                return f"analysis {analysis.id}"
        return None

    def write_results(self, summary: dict) -> None:
        """The summary into session.info.pedseg, keeping every other info key and the namespace's other entries
        (the measurement store's `timepoints`). update_info replaces the one top-level key it is given, so the
        namespace is re-read just before and written back whole."""
        session = self.session.reload()
        namespace = {**((session.info or {}).get(INFO_KEY) or {}), **summary}
        session.update_info({INFO_KEY: namespace})
        for tag in TAGS:
            if tag not in (session.tags or []):
                session.add_tag(tag)
        logger.info("session mode: results written to the session's info.%s and tagged %s", INFO_KEY, TAGS)


def open_session(job: GearJob, client=None) -> FlywheelSession:
    client = client or _client(job.api_key)
    kind, container_id = job.destination.get("type"), job.destination.get("id")
    if kind == "session":
        return FlywheelSession(client.get_session(container_id), analysis_id=None, client=client)
    level = kind
    if kind == "analysis":
        parent = client.get_analysis(container_id).parent
        if parent.type == "session":
            return FlywheelSession(client.get_session(parent.id), analysis_id=container_id, client=client)
        level = f"{parent.type} analysis"
    raise InputError(f"Session mode reads the DICOM files of one session, but this job runs on a {level}.",
                     hint="Run the gear as an analysis of a session, or attach a zip of the session as the 'dicom' "
                          "input.")


def _key_in(info: dict | None) -> str | None:
    return ((info or {}).get(INFO_KEY) or {}).get("idempotency_key")


def _fetch(acquisition, name: str, folder: Path) -> None:
    """Download one DICOM file; a zipped series is unpacked with the pipeline's hardened extractor."""
    folder.mkdir(parents=True)
    download = folder / "download"
    acquisition.download_file(name, str(download))
    if zipfile.is_zipfile(download):
        safe_extract(download, folder)
        download.unlink()
    else:
        download.rename(folder / "image.dcm")


def _client(api_key: str | None):
    try:
        import flywheel
    except ImportError as exc:
        raise InputError("Session mode needs the Flywheel SDK (flywheel-sdk), which this installation lacks.",
                         hint="Attach a zip of the session as the 'dicom' input, or install flywheel-sdk.") from exc
    return flywheel.Client(api_key)
