"""RunResult -> what the Flywheel engine uploads: flat output files and `output/.metadata.json`.

The engine uploads only the files directly in output/, so the pipeline's sub-folders are flattened into
`pedseg_*` names. `.metadata.json` holds a summary on the destination container (numbers, bundle, hashes:
never patient identifiers, DICOM UIDs or input file names), each output's Flywheel file type, and a QC result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import jsonschema
from flywheel_gear_toolkit.interfaces import engine_metadata

from pipeline.atomic import write_text
from pipeline.types import RunResult

logger = logging.getLogger(__name__)

GEAR_NAME = "pedseg-brain-tumor"
TAGS = ["pedseg"]
FLAT_NAMES = {
    "seg": "pedseg_segmentation.dcm",
    "sr": "pedseg_measurements_sr.dcm",
    "pdf": "pedseg_report.pdf",
    "pdf_dicom": "pedseg_report_pdf.dcm",
    "measurements_json": "pedseg_measurements.json",
    "measurements_csv": "pedseg_measurements.csv",
    "provenance": "pedseg_provenance.json",
    "identify": "pedseg_identify.json",
}
# Flywheel's standard file types, by extension (it types .json as "source code").
FILE_TYPES = {".dcm": "dicom", ".nii.gz": "nifti", ".pdf": "pdf", ".csv": "tabular data", ".json": "source code"}
# Flywheel MR classification of the sequences the pipeline writes as NIfTI.
SEQUENCE_MEASUREMENT = {"t1n": "T1", "t1c": "T1", "t2w": "T2", "t2f": "T2"}


def idempotency_key(provenance: dict) -> str:
    """Same chosen series and same model weights -> same key, whatever the session's other series."""
    uids = sorted(provenance["inputs"]["series_instance_uids"].values())
    return hashlib.sha256("\n".join([*uids, provenance["bundle"]["sha256"]]).encode()).hexdigest()


def publish_outputs(result: RunResult, output_dir: Path) -> dict[str, Path]:
    """Move every output to a flat `pedseg_*` name in output_dir and drop the emptied sub-folders."""
    published = {}
    for key, path in result.outputs.items():
        target = output_dir / flat_name(key, path)
        os.replace(path, target)
        published[key] = target
    for folder in sorted({p.parent for p in result.outputs.values()}, key=lambda p: len(p.parts), reverse=True):
        if folder != output_dir and folder.is_relative_to(output_dir) and not any(folder.iterdir()):
            folder.rmdir()
    return published


def flat_name(key: str, path: Path) -> str:
    if key in FLAT_NAMES:
        return FLAT_NAMES[key]
    return f"pedseg_{key.removeprefix('nifti_')}{_suffix(path)}"


def build_metadata(result: RunResult, files: dict[str, Path], destination_type: str, job_id: str = "") -> dict:
    summary = run_summary(result)
    entries = {key: _file_entry(key, path) for key, path in files.items()}
    qc_key = "pdf" if "pdf" in entries else "measurements_json"  # the report a reviewer opens
    entries[qc_key]["info"] = {"qc": {GEAR_NAME: _qc_result(summary, job_id)}}
    return {destination_type: {"info": {"pedseg": summary}, "files": list(entries.values())}}


def write_metadata(metadata: dict, output_dir: Path) -> Path:
    # An upload the engine rejects fails the whole job after minutes of work: check against its schema first.
    jsonschema.Draft7Validator(engine_metadata).validate(metadata)
    return write_text(output_dir / ".metadata.json", json.dumps(metadata, indent=2, allow_nan=False) + "\n")


def run_summary(result: RunResult) -> dict:
    provenance = result.provenance
    numbers = {d.series_uid: d.series_number for d in result.identification.decisions}
    return {
        "pedseg_version": provenance.get("pedseg_version"),
        "idempotency_key": idempotency_key(provenance),
        "bundle": {k: provenance["bundle"].get(k) for k in ("name", "version", "licence", "sha256")},
        "device": provenance.get("device"),
        "fast_mode": provenance.get("fast_mode"),
        "tta": provenance.get("tta"),
        "reference_role": provenance.get("reference_role"),
        "series_numbers": {role: numbers.get(uid) for role, uid in result.identification.chosen.items()},
        "missing_sequences": list(result.identification.missing),
        "volumes_ml": {name: _number(r.volume_ml) for name, r in result.measurements.regions.items()},
        "native_volumes_ml": {name: _number(r.native_volume_ml) for name, r in result.measurements.regions.items()},
        "components": {name: r.components for name, r in result.measurements.regions.items()},
        "rapno": {
            "region": result.measurements.rapno.get("region"),
            "lesions_total": result.measurements.rapno.get("lesions_total"),
            "sum_product_mm2": _number(result.measurements.rapno.get("sum_product_mm2")),
        },
        "qc_flags": list(result.measurements.qc_flags),
    }


def _qc_result(summary: dict, job_id: str) -> dict:
    """Flywheel's QC convention: info.qc.<gear>.<check>.state is PASS or FAIL; any QC flag asks for review."""
    flags = summary["qc_flags"]
    return {
        "job_info": {"version": summary["pedseg_version"], "job_id": job_id},
        "segmentation": {"state": "FAIL" if flags else "PASS", "flags": flags,
                         "whole_tumour_ml": summary["volumes_ml"].get("WT")},
    }


def _file_entry(key: str, path: Path) -> dict:
    entry = {"name": path.name, "type": FILE_TYPES.get(_suffix(path), "file"), "tags": list(TAGS)}
    if entry["type"] == "nifti":
        entry["modality"] = "MR"  # every NIfTI output lies on an MR series' grid
    role = key.removeprefix("nifti_")
    if role in SEQUENCE_MEASUREMENT:
        entry["classification"] = {"Intent": ["Structural"], "Measurement": [SEQUENCE_MEASUREMENT[role]]}
    return entry


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def _number(value):
    """JSON has no NaN or infinity; Flywheel would reject them."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 3)
