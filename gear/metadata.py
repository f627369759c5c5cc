"""RunResult -> what the Flywheel engine uploads: flat output files and `output/.metadata.json`.

The engine uploads only the files directly in output/, so the pipeline's sub-folders are flattened into
`pedseg_*` names. `.metadata.json` holds a summary on the destination container (numbers, bundle, hashes:
never patient identifiers, DICOM UIDs or input file names), each output's Flywheel file type, and a QC result
(which carries the population warning of a child's study segmented by a model not trained on children).
It is built with fw-gear's `Metadata` (update_container, update_file_metadata, add_gear_info with a QC result
from create_qc_result_dict), so it follows Flywheel's conventions exactly, then checked against the engine's
metadata schema that fw-gear ships and written atomically.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import jsonschema
from fw_gear.file import File
from fw_gear.metadata import Metadata, create_qc_result_dict

from pedseg.gear.idempotency import idempotency_key
from pedseg.pipeline.atomic import write_text

if TYPE_CHECKING:
    from pedseg.pipeline.types import Measurements
    from pedseg.reporting.review import Review
    from pedseg.runner import RunResult

GEAR_NAME = "pedseg-brain-tumor"
TAGS = ["pedseg"]
REVIEWED_TAG = "reviewed"
REVIEWED_PREFIX = "reviewed_"  # a review's output keys, as publish_outputs receives them
FLAT_NAMES = {
    "seg": "pedseg_segmentation.dcm",
    "sr": "pedseg_measurements_sr.dcm",
    "pdf": "pedseg_report.pdf",
    "pdf_dicom": "pedseg_report_pdf.dcm",
    "measurements_json": "pedseg_measurements.json",
    "measurements_csv": "pedseg_measurements.csv",
    "provenance": "pedseg_provenance.json",
    "identify": "pedseg_identify.json",
    "reviewed_measurements_json": "pedseg_reviewed_measurements.json",
    "reviewed_measurements_csv": "pedseg_reviewed_measurements.csv",
    "reviewed_sr": "pedseg_reviewed_measurements_sr.dcm",
    "reviewed_pdf": "pedseg_reviewed_report.pdf",
}
# Flywheel's standard file types, by extension (it types .json as "source code").
FILE_TYPES = {".dcm": "dicom", ".nii.gz": "nifti", ".pdf": "pdf", ".csv": "tabular data", ".json": "source code"}
# Flywheel MR classification of the sequences the pipeline writes as NIfTI.
SEQUENCE_MEASUREMENT = {"t1n": "T1", "t1c": "T1", "t2w": "T2", "t2f": "T2"}


def publish_outputs(outputs: Mapping[str, Path], output_dir: Path) -> dict[str, Path]:
    """Move every output (RunResult.outputs, and a review's under `reviewed_*` keys) to a flat `pedseg_*` name in
    output_dir and drop the emptied sub-folders."""
    published = {}
    for key, path in outputs.items():
        target = output_dir / flat_name(key, path)
        os.replace(path, target)
        published[key] = target
    for folder in sorted({p.parent for p in outputs.values()}, key=lambda p: len(p.parts), reverse=True):
        if folder != output_dir and folder.is_relative_to(output_dir) and not any(folder.iterdir()):
            folder.rmdir()
    return published


def flat_name(key: str, path: Path) -> str:
    if key in FLAT_NAMES:
        return FLAT_NAMES[key]
    return f"pedseg_{key.removeprefix('nifti_')}{_suffix(path)}"


def build_metadata(summary: dict, files: dict[str, Path], destination_type: str, job_id: str = "") -> dict:
    metadata = _JobMetadata(summary["pedseg_version"], job_id, destination_type)
    metadata.update_container(destination_type, info={"pedseg": summary})
    for key, path in files.items():
        metadata.update_file_metadata(_output_file(path, destination_type), destination_type, **_file_fields(key, path))
    # Flywheel's QC convention, on the report a reviewer opens (the reviewed one after a review): any QC flag asks
    # for review, and so does a model not trained on children segmenting a child (its message joins the flags; the
    # record stands beside them). The flags are the automatic run's: a reader's edit does not clear them.
    qc_file = next(files[key] for key in ("reviewed_pdf", "reviewed_measurements_json", "pdf", "measurements_json")
                   if key in files)
    population = summary.get("population_warning")
    flags = [*summary["qc_flags"], *([population["message"]] if population else [])]
    reviewed = {"reviewed": True, "automatic_whole_tumour_ml": summary["automatic"]["volumes_ml"].get("WT")} \
        if summary.get("reviewed") else {"reviewed": False}
    result = create_qc_result_dict("segmentation", "FAIL" if flags else "PASS", flags=flags,
                                   whole_tumour_ml=summary["volumes_ml"].get("WT"), population_warning=population,
                                   **reviewed)
    info = metadata.add_gear_info("qc", File(qc_file.name, destination_type), **result)
    metadata.update_file_metadata(_output_file(qc_file, destination_type), destination_type, info=info)
    return metadata.as_dict()


class _JobMetadata(Metadata):
    """fw-gear's builder for a job that writes only to its own destination and its own output files, offline
    (no GearContext and no SDK client): job_info is this job's version and id (a context's would copy the input
    file names, which may hold PHI, into every QC result), and the destination needs no SDK look-up of its place
    in the hierarchy (the library asks the SDK for an analysis' parent; a job may always update its own
    destination). Files are given in the SDK's form, which the library reads without a client."""

    def __init__(self, version: str, job_id: str, destination_type: str):
        super().__init__(context=SimpleNamespace(client=None), name_override=GEAR_NAME, version_override=version)
        self.name, self.version, self.job = GEAR_NAME, version, job_id
        self.job_info = {GEAR_NAME: {"job_info": {"version": version, "job_id": job_id}}}
        self._has_job_info = True
        self.destination_type = destination_type

    def _validate_container_type(self, container_type: str) -> bool:
        return container_type == self.destination_type

    def as_dict(self) -> dict:
        self.clean()  # as the library's own write(): NaN -> null, '.' in keys -> '_'
        return self._metadata


def write_metadata(metadata: dict, output_dir: Path) -> Path:
    # An upload the engine rejects fails the whole job after minutes of work: check against its schema first.
    schema = json.loads(resources.files("fw_gear").joinpath("engine_metadata_schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(metadata)
    return write_text(output_dir / ".metadata.json", json.dumps(metadata, indent=2, allow_nan=False) + "\n")


def run_summary(result: RunResult, review: Review | None = None, edited_seg_sha256: str = "") -> dict:
    """The run in numbers. With the `review` of an edited SEG (whose file hash joins the idempotency key), the
    volumes, components and RAPNO are the reviewed ones and the automatic ones stand under `automatic`."""
    provenance = result.provenance
    numbers = {d.key: d.series_number for d in result.identification.decisions}
    automatic = _measured(result.measurements)
    summary = {
        "pedseg_version": provenance.pedseg_version,
        "idempotency_key": idempotency_key(provenance, edited_seg_sha256),
        "bundle": {k: getattr(provenance.bundle, k) for k in ("name", "version", "licence", "sha256")},
        "device": provenance.device,
        "fast_mode": provenance.fast_mode,
        "tta": provenance.tta,
        "reference_role": provenance.reference_role,
        "series_numbers": {role: numbers.get(uid) for role, uid in result.identification.chosen.items()},
        "missing_sequences": list(result.identification.missing),
        **automatic,
        "qc_flags": list(result.measurements.qc_flags),
        "population_warning": result.population_warning.as_dict() if result.population_warning else None,
        "reviewed": review is not None,
    }
    if review is not None:
        summary.update(_measured(review.measurements), automatic=automatic, edited_seg_sha256=edited_seg_sha256)
    return summary


def _measured(measurements: Measurements) -> dict:
    return {
        "volumes_ml": {name: _number(r.volume_ml) for name, r in measurements.regions.items()},
        "native_volumes_ml": {name: _number(r.native_volume_ml) for name, r in measurements.regions.items()},
        "components": {name: r.components for name, r in measurements.regions.items()},
        "rapno": {
            "region": measurements.rapno.region,
            "lesions_total": measurements.rapno.lesions_total,
            "sum_product_mm2": _number(measurements.rapno.sum_product_mm2),
        },
    }


def _output_file(path: Path, destination_type: str) -> dict:
    """An output as the SDK describes a file (name, parent type, info)."""
    return {"name": path.name, "parent_ref": {"type": destination_type}, "info": {}}


def _file_fields(key: str, path: Path) -> dict:
    tags = [*TAGS, *([REVIEWED_TAG] if key.startswith(REVIEWED_PREFIX) else [])]
    fields = {"type": FILE_TYPES.get(_suffix(path), "file"), "tags": tags}
    if fields["type"] == "nifti":
        fields["modality"] = "MR"  # every NIfTI output lies on an MR series' grid
    role = key.removeprefix("nifti_")
    if role in SEQUENCE_MEASUREMENT:
        fields["classification"] = {"Intent": ["Structural"], "Measurement": [SEQUENCE_MEASUREMENT[role]]}
    return fields


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def _number(value):
    """JSON has no NaN or infinity; Flywheel would reject them."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 3)
