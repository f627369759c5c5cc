"""Machine-readable measurement outputs: measurements.json and measurements.csv (docs/measurements-schema.md).

Both files are built from the same rounded rows (`measurement_rows`), so a volume reads identically in each.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path

from pedseg.pipeline.atomic import write_text
from pedseg.pipeline.labels import COMPOSITES, INTERNAL, LABEL_VALUES, REGIONS_2023
from pedseg.pipeline.types import Measurements, PopulationWarning, Rapno

logger = logging.getLogger(__name__)

SCHEMA_NAME = "pedseg-measurements"
SCHEMA_VERSION = "1.1"  # 1.1: population_warning
VOLUME_DECIMALS = 3  # mL
LENGTH_DECIMALS = 2  # mm, mm2 and LPS coordinates

# Written always (null when the caller has no value), so consumers can rely on the keys being there.
# "bundle" is a dict with at least name, version and sha256 (the runner passes its provenance block).
CONTEXT_KEYS = ("study_instance_uid", "series_instance_uids", "bundle", "fast_mode", "study_date")
CSV_CONTEXT_COLUMNS = ("study_instance_uid", "study_date", "bundle_name", "bundle_version", "bundle_sha256",
                       "fast_mode")
CSV_COLUMNS = ("schema_version", *CSV_CONTEXT_COLUMNS, "convention", "region", "label", "volume_ml",
               "native_volume_ml", "voxels", "components", "bidimensional_mm2", "qc_flags")


def _volume(value: float | None) -> float | None:
    return None if value is None else round(float(value), VOLUME_DECIMALS)


def _length(value: float | None) -> float | None:
    return None if value is None else round(float(value), LENGTH_DECIMALS)


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def measurement_rows(measurements: Measurements) -> list[dict]:
    """One row per region and convention, values rounded once for every output.

    Conventions: "2024" (ET, NET, CC, ED), "composite" (TC, WT) and "2023" (NCR = NET + CC, ED, ET).
    NCR's component count is null: it is not derivable from the NET and CC counts.
    """
    regions = measurements.regions
    rows = []
    for name, label in LABEL_VALUES[INTERNAL].items():
        rows.append(_row("2024", name, label, regions[name].voxels, regions[name].volume_ml,
                         regions[name].native_volume_ml, regions[name].components, None))
    for name in COMPOSITES:
        r = regions[name]
        rows.append(_row("composite", name, None, r.voxels, r.volume_ml, r.native_volume_ml, r.components,
                         r.bidimensional_mm2))
    for name, label in LABEL_VALUES["2023"].items():
        parts = [regions[p] for p in REGIONS_2023[name]]
        rows.append(_row("2023", name, label, sum(p.voxels for p in parts), sum(p.volume_ml for p in parts),
                         _sum_or_none([p.native_volume_ml for p in parts]),
                         parts[0].components if len(parts) == 1 else None, None))
    return rows


def _row(convention, region, label, voxels, volume, native, components, bidimensional) -> dict:
    return {"convention": convention, "region": region, "label": label, "volume_ml": _volume(volume),
            "native_volume_ml": _volume(native), "voxels": int(voxels), "components": components,
            "bidimensional_mm2": _length(bidimensional)}


def rapno_block(rapno: Rapno) -> dict:
    """The RAPNO measurement with lengths rounded; method parameters are copied unchanged."""
    lesions = [{
        "slice_z_mm": _length(lesion.slice_z_mm),
        "longest_mm": _length(lesion.longest_mm),
        "perpendicular_mm": _length(lesion.perpendicular_mm),
        "product_mm2": _length(lesion.product_mm2),
        "measurable": lesion.measurable,
        "volume_ml": _volume(lesion.volume_ml),
        "endpoints_lps_mm": [[_length(v) for v in p] for p in lesion.endpoints_lps_mm],
        "perp_endpoints_lps_mm": [[_length(v) for v in p] for p in lesion.perp_endpoints_lps_mm],
    } for lesion in rapno.lesions]
    return {"region": rapno.region, "lesions_total": rapno.lesions_total, "max_lesions": rapno.max_lesions,
            "tolerance_deg": rapno.tolerance_deg, "lesions": lesions, "sum_product_mm2": _length(rapno.sum_product_mm2)}


def _context(context: dict) -> dict:
    return {**{k: context.get(k) for k in CONTEXT_KEYS}, **context}


def measurements_document(measurements: Measurements, *, context: dict,
                          population_warning: PopulationWarning | None = None) -> dict:
    """The JSON document; `population_warning` (null when none) is the run's population guard."""
    rows = measurement_rows(measurements)
    by_convention = {c: {r["region"]: {k: v for k, v in r.items() if k not in ("convention", "region")}
                         for r in rows if r["convention"] == c}
                     for c in ("2024", "composite", "2023")}
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "units": {"volume": "mL", "length": "mm", "area": "mm2", "coordinates": "LPS mm"},
        "context": _context(context),
        "regions": {**by_convention["2024"], **by_convention["composite"]},
        "conventions": {"brats_peds_2024": by_convention["2024"], "brats_peds_2023": by_convention["2023"]},
        "rapno": rapno_block(measurements.rapno),
        "qc_flags": list(measurements.qc_flags),
        "uncertainty": asdict(measurements.uncertainty) if measurements.uncertainty else {},
        "population_warning": population_warning.as_dict() if population_warning else None,
    }


def write_measurements_json(measurements: Measurements, path: Path | str, *, context: dict,
                            population_warning: PopulationWarning | None = None) -> Path:
    document = measurements_document(measurements, context=context, population_warning=population_warning)
    out = write_text(path, json.dumps(document, indent=2, default=str) + "\n")
    logger.debug("wrote measurements JSON (schema %s)", SCHEMA_VERSION)
    return out


def _csv_cell(value):
    """Booleans as JSON spells them, so CSV and JSON readers agree on fast_mode."""
    return json.dumps(value) if isinstance(value, bool) else value


def write_measurements_csv(measurements: Measurements, path: Path | str, *, context: dict) -> Path:
    """One row per region (columns CSV_COLUMNS); empty cells for null values."""
    bundle = context.get("bundle") or {}
    shared = {"schema_version": SCHEMA_VERSION, "study_instance_uid": context.get("study_instance_uid"),
              "study_date": context.get("study_date"), "bundle_name": bundle.get("name"),
              "bundle_version": bundle.get("version"), "bundle_sha256": bundle.get("sha256"),
              "fast_mode": _csv_cell(context.get("fast_mode")), "qc_flags": ";".join(measurements.qc_flags)}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in measurement_rows(measurements):
        writer.writerow({**shared, **row})
    out = write_text(path, buffer.getvalue())
    logger.debug("wrote measurements CSV (schema %s)", SCHEMA_VERSION)
    return out
