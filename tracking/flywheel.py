"""Flywheel measurement store: the subject key is the Flywheel subject id; time points live with its sessions.

Each run records its time point in the analysed session's `info.pedseg.timepoints` (one entry per study and
bundle). Sessions analysed before the store existed still count: their analyses' `pedseg_measurements.json`
files are read through the SDK. Flywheel has no transactions, so two runs on one session at the same moment
could lose one entry; runs on different sessions (the usual case) cannot.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from pedseg.pipeline.longitudinal import TimePoint
from pedseg.tracking.records import from_dict, time_point_from_document, to_dict

logger = logging.getLogger(__name__)

NAMESPACE = "pedseg"  # the gear's info namespace (its analysis summary lives at info.pedseg too)
# The gear's flat name for measurements.json (gear.metadata.FLAT_NAMES["measurements_json"]).
MEASUREMENTS_FILE = "pedseg_measurements.json"


class FlywheelStore:
    """`session_id`: the session whose time point `record` writes (None: read-only, e.g. for history)."""

    def __init__(self, client, session_id: str | None = None):
        self.client = client
        self.session_id = session_id

    def history(self, subject_key: str) -> list[TimePoint]:
        points: list[TimePoint] = []
        for listed in self.client.get_subject(subject_key).sessions():
            session = listed.reload()  # a listing may omit info and analyses
            recorded = []
            for entry in _entries(session):
                try:
                    recorded.append(from_dict(entry))
                except (KeyError, TypeError, AttributeError) as exc:  # hand-edited info must not stop a run
                    logger.warning("skipped a malformed time point in session info (%s)", type(exc).__name__)
            seen = {(tp.study_uid, tp.bundle.sha256) for tp in recorded}
            for tp in self._from_analyses(session, subject_key):
                if (tp.study_uid, tp.bundle.sha256) not in seen:
                    recorded.append(tp)
                    seen.add((tp.study_uid, tp.bundle.sha256))
            points += recorded
        return points

    def record(self, time_point: TimePoint) -> None:
        if self.session_id is None:
            raise ValueError("this FlywheelStore was opened without a session to record into")
        session = self.client.get_session(self.session_id).reload()
        entries = [e for e in _entries(session) if (e.get("study_uid"), (e.get("bundle") or {}).get("sha256"))
                   != (time_point.study_uid, time_point.bundle.sha256)]
        namespace = dict((session.info or {}).get(NAMESPACE) or {})
        namespace["timepoints"] = [*entries, to_dict(time_point)]
        # update_info replaces the top-level key it is given, so the whole namespace is written back.
        session.update_info({NAMESPACE: namespace})

    def _from_analyses(self, session, subject_key: str) -> list[TimePoint]:
        points = []
        for analysis in getattr(session, "analyses", None) or []:
            if not any(f.name == MEASUREMENTS_FILE for f in analysis.files or []):
                continue
            with tempfile.TemporaryDirectory(prefix="pedseg-fw-") as tmp:
                path = Path(tmp) / MEASUREMENTS_FILE
                analysis.download_file(MEASUREMENTS_FILE, str(path))
                try:
                    points.append(time_point_from_document(json.loads(path.read_text()), subject_key))
                except (ValueError, KeyError, TypeError) as exc:  # another tool's file of the same name
                    logger.warning("skipped an analysis' measurements file that is not pedseg's (%s)",
                                type(exc).__name__)
        return points


def _entries(session) -> list[dict]:
    return list(((session.info or {}).get(NAMESPACE) or {}).get("timepoints") or [])


def store_for_session(client, session_id: str) -> tuple[FlywheelStore, str]:
    """The store recording into `session_id` and the session's subject id, the subject key on Flywheel."""
    session = client.get_session(session_id)
    return FlywheelStore(client, session_id), session.parents.subject
