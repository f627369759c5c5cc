"""The listener's persisted queue: one JSON record per study in the spool, rewritten atomically on every change.

Spool layout:
    SPOOL/studies/<study uid>/study.json   the record below
    SPOOL/studies/<study uid>/dicom/       received instances, one file per SOP Instance UID
    SPOOL/studies/<study uid>/output/      the pipeline's output folder
    SPOOL/status.json                      every study's state, for people and monitoring
A study's state moves receiving -> queued -> running -> sending -> sent, or ends in failed / send_failed.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pedseg.pacs.instances import list_instances, uid_filename
from pedseg.pipeline.atomic import write_text

logger = logging.getLogger(__name__)

RECEIVING, QUEUED, RUNNING, SENDING, SENT, FAILED, SEND_FAILED = (
    "receiving", "queued", "running", "sending", "sent", "failed", "send_failed")


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class StudyRecord:
    study_uid: str
    state: str = RECEIVING
    queued_at: float | None = None  # wall-clock seconds; orders the queue, survives restarts
    attempts: int = 0  # pipeline runs started: a study that kills the listener every time is not retried forever
    reopened: bool = False  # new instances arrived while running or sending: process again afterwards
    message: str = ""
    output_uids: list[str] = field(default_factory=list)  # our results' SOP Instance UIDs, never taken as input
    updated: str = ""

    @property
    def key(self) -> str:
        return uid_filename(self.study_uid)


class Journal:
    def __init__(self, spool: Path) -> None:
        self.spool = Path(spool)
        self.studies = self.spool / "studies"
        self.studies.mkdir(parents=True, exist_ok=True)

    def study_dir(self, record: StudyRecord) -> Path:
        return self.studies / record.key

    def dicom_dir(self, record: StudyRecord) -> Path:
        return self.study_dir(record) / "dicom"

    def output_dir(self, record: StudyRecord) -> Path:
        return self.study_dir(record) / "output"

    def save(self, record: StudyRecord) -> None:
        record.updated = now_iso()
        write_text(self.study_dir(record) / "study.json", json.dumps(dataclasses.asdict(record), indent=2) + "\n")

    def load_all(self) -> dict[str, StudyRecord]:
        records = {}
        for path in sorted(self.studies.glob("*/study.json")):
            try:
                record = StudyRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                logger.error("unreadable study record %s (%s): left alone", path, exc)
                continue
            records[record.study_uid] = record
        return records

    def write_status(self, records: dict[str, StudyRecord], listener: dict) -> None:
        studies = {
            r.study_uid: {"state": r.state, "instances": len(list_instances(self.dicom_dir(r))), "attempts": r.attempts,
                          "message": r.message, "output_dir": str(self.output_dir(r)), "updated": r.updated}
            for r in records.values()
        }
        status = {"listener": listener, "updated": now_iso(), "studies": studies}
        write_text(self.spool / "status.json", json.dumps(status, indent=2) + "\n")
