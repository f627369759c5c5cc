"""OUTROOT/batch-summary.csv and .json: one row per session, rewritten atomically whenever a session ends.

Volumes and QC flags come from the session's own measurements.json, so a session skipped as done reads the same
as when it ran.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pedseg.batch.sources import SUMMARY_STEM, SessionJob
from pedseg.pipeline.atomic import write_text
from pedseg.pipeline.labels import REGIONS

# A row's status: waiting for a worker or running; done now or skipped as done before; failed now or before.
QUEUED, RUNNING, DONE, SKIPPED, FAILED, FAILED_BEFORE = (
    "queued", "running", "done", "skipped", "failed", "failed_before")
MEASUREMENTS_FILE = "measurements.json"


@dataclass
class Row:
    session: str
    status: str = QUEUED
    exit_code: int | None = None
    error: str = ""
    message: str = ""
    wall_s: float | None = None
    volumes_ml: dict[str, float] | None = None  # region -> mL (BraTS-PEDs 2024 regions and composites)
    qc_flags: tuple[str, ...] = ()
    outdir: str = ""

    @classmethod
    def for_job(cls, job: SessionJob) -> Row:
        return cls(job.name, outdir=str(job.outdir))

    def read_outputs(self) -> None:
        """Volumes and QC flags from the session's measurements.json."""
        try:
            document = json.loads((Path(self.outdir) / MEASUREMENTS_FILE).read_text())
            self.volumes_ml = {r: float(document["regions"][r]["volume_ml"]) for r in REGIONS}
            self.qc_flags = tuple(document.get("qc_flags", ()))
        except (OSError, ValueError, KeyError, TypeError):
            self.volumes_ml, self.qc_flags = None, ()


def write_summary(outroot: Path, rows: list[Row]) -> dict[str, Path]:
    """Both files, each replaced in one rename: a reader never sees half a summary."""
    records = [asdict(row) for row in rows]
    written = {"json": write_text(outroot / f"{SUMMARY_STEM}.json",
                                  json.dumps({"sessions": records}, indent=2) + "\n")}
    columns = ["session", "status", "exit_code", "error", "message", "wall_s",
               *(f"{region}_ml" for region in REGIONS), "qc_flags", "outdir"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        volumes = row.volumes_ml or {}
        writer.writerow({"session": row.session, "status": row.status, "exit_code": _cell(row.exit_code),
                         "error": row.error, "message": row.message, "wall_s": _cell(row.wall_s),
                         **{f"{r}_ml": _cell(volumes.get(r)) for r in REGIONS},
                         "qc_flags": ";".join(row.qc_flags), "outdir": row.outdir})
    written["csv"] = write_text(outroot / f"{SUMMARY_STEM}.csv", buffer.getvalue())
    return written


def earlier_wall_times(outroot: Path) -> dict[str, float]:
    """Wall times of the previous invocation's summary, for the rows of sessions skipped now."""
    try:
        sessions = json.loads((outroot / f"{SUMMARY_STEM}.json").read_text())["sessions"]
        return {s["session"]: s["wall_s"] for s in sessions if s.get("wall_s") is not None}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _cell(value) -> str:
    return "" if value is None else str(value)
