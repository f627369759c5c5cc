"""A subject's history as rows: one per time point and region, for `pedseg history`, its CSV and a run's
longitudinal.csv. Volumes in mL with the measurement tables' rounding; percentages with one decimal.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from pedseg.pipeline.atomic import write_text
from pedseg.pipeline.labels import REGIONS
from pedseg.pipeline.longitudinal import Change, Longitudinal
from pedseg.reporting.tables import VOLUME_DECIMALS

# No subject key: an unsalted hash of a short PatientID can be reversed by trying every ID, so it stays in the store.
HISTORY_COLUMNS = (
    "study_date", "study_instance_uid", "bundle_name", "bundle_version", "bundle_sha256",
    "label_convention", "region", "volume_ml", "automatic_volume_ml", "reviewed", "baseline_ml",
    "change_vs_baseline_ml", "change_vs_baseline_pct",
    "nadir_ml", "change_vs_nadir_ml", "change_vs_nadir_pct", "previous_ml", "change_vs_previous_ml",
    "change_vs_previous_pct", "response", "rapno_region", "rapno_product_mm2", "qc_flags",
)
_TABLE = (("study_date", "date", 10), ("region", "region", 6), ("volume_ml", "mL", 11),
          ("vs_baseline", "vs baseline", 20), ("vs_nadir", "vs nadir", 20), ("vs_previous", "vs previous", 20),
          ("response", "resp", 4), ("bundle", "bundle", 0))


def _ml(value: float | None) -> float | None:
    return None if value is None else round(value, VOLUME_DECIMALS)


def _pct(change: Change | None) -> float | None:
    return None if change is None or change.pct is None else round(change.pct, 1)


def change_rows(longitudinal: Longitudinal) -> list[dict]:
    """The current time point's rows: volumes always, changes for the regions it was compared on."""
    tp = longitudinal.current
    shared = {"study_date": tp.study_date, "study_instance_uid": tp.study_uid,
              "bundle_name": tp.bundle.name, "bundle_version": tp.bundle.version, "bundle_sha256": tp.bundle.sha256,
              "label_convention": tp.bundle.label_convention, "rapno_region": tp.rapno_region,
              "rapno_product_mm2": tp.rapno_product_mm2, "qc_flags": ";".join(tp.qc_flags)}
    rows = []
    for region in REGIONS:
        c = longitudinal.changes.get(region)
        reviewed = region in tp.reviewed_volumes_ml  # the volume compared is the reviewed one where there is one
        rows.append({**shared, "region": region, "volume_ml": _ml(tp.reviewed_volumes_ml.get(region,
                                                                                        tp.volumes_ml.get(region))),
                     "automatic_volume_ml": _ml(tp.volumes_ml.get(region)), "reviewed": reviewed,
                     "baseline_ml": _ml(c and c.baseline_ml), "change_vs_baseline_ml": _ml(c and c.vs_baseline.ml),
                     "change_vs_baseline_pct": _pct(c and c.vs_baseline), "nadir_ml": _ml(c and c.nadir_ml),
                     "change_vs_nadir_ml": _ml(c and c.vs_nadir.ml), "change_vs_nadir_pct": _pct(c and c.vs_nadir),
                     "previous_ml": _ml(c and c.previous_ml), "change_vs_previous_ml": _ml(c and c.vs_previous.ml),
                     "change_vs_previous_pct": _pct(c and c.vs_previous), "response": c.response if c else None})
    return rows


def history_rows(timeline: list[Longitudinal]) -> list[dict]:
    return [row for longitudinal in timeline for row in change_rows(longitudinal)]


def history_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_history_csv(rows: list[dict], path: Path | str) -> Path:
    return write_text(path, history_csv(rows))


def format_change(ml: float | None, pct: float | None) -> str:
    if ml is None:
        return "—"
    return f"{ml:+.{VOLUME_DECIMALS}f}" + ("" if pct is None else f" ({pct:+.1f}%)")


def history_table(rows: list[dict]) -> str:
    """Fixed-width text, a blank line between time points; "—" where a point had nothing to compare with; "r"
    after a volume a radiologist's reviewed segmentation gave."""
    lines = ["  ".join(f"{title:<{width}}" for _, title, width in _TABLE).rstrip()]
    previous_point = None
    for row in rows:
        point = (row["study_date"], row["study_instance_uid"], row["bundle_sha256"])
        if previous_point is not None and point != previous_point:
            lines.append("")
        first = point != previous_point
        previous_point = point
        cells = {
            "study_date": _date(row["study_date"]) if first else "",
            "region": row["region"],
            "volume_ml": "—" if row["volume_ml"] is None else (f"{row['volume_ml']:.{VOLUME_DECIMALS}f}"
                                                                + (" r" if row["reviewed"] else "")),
            "vs_baseline": format_change(row["change_vs_baseline_ml"], row["change_vs_baseline_pct"]),
            "vs_nadir": format_change(row["change_vs_nadir_ml"], row["change_vs_nadir_pct"]),
            "vs_previous": format_change(row["change_vs_previous_ml"], row["change_vs_previous_pct"]),
            "response": row["response"] or "—",
            "bundle": f"{row['bundle_name']} {row['bundle_version']}" if first else "",
        }
        lines.append("  ".join(f"{cells[key]:<{width}}" for key, _, width in _TABLE).rstrip())
    return "\n".join(lines)


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else (value or "undated")
