"""Time points from the measurements document (measurements.json), and their JSON form for Flywheel `info`.

A run's time point is built from the same rounded document it writes as measurements.json, so a volume in the
store, in the history table and in the run's outputs reads identically, and an earlier analysis' downloaded
measurements.json yields exactly the time point that run would have recorded.
"""
from __future__ import annotations

from dataclasses import asdict, replace

from pedseg.pipeline.errors import InputError
from pedseg.pipeline.labels import REGIONS, REGIONS_2023
from pedseg.pipeline.longitudinal import BundleId, TimePoint
from pedseg.pipeline.types import Measurements
from pedseg.reporting.tables import SCHEMA_NAME, measurements_document


def time_point(measurements: Measurements, *, subject_key: str, study_uid: str, study_date: str,
               bundle: dict) -> TimePoint:
    """`bundle`: the provenance block (name, version, sha256, label_convention)."""
    context = {"study_instance_uid": study_uid, "study_date": study_date, "bundle": bundle}
    return time_point_from_document(measurements_document(measurements, context=context), subject_key)


def time_point_from_document(document: dict, subject_key: str) -> TimePoint:
    if document.get("schema") != SCHEMA_NAME:
        raise ValueError(f"not a {SCHEMA_NAME} document")
    context = document["context"]
    bundle = context.get("bundle") or {}
    return TimePoint(
        subject_key=subject_key,
        study_uid=str(context["study_instance_uid"]),
        study_date=str(context.get("study_date") or ""),
        bundle=BundleId(str(bundle["name"]), str(bundle["version"]), str(bundle["sha256"]),
                        bundle.get("label_convention")),
        volumes_ml={r: float(document["regions"][r]["volume_ml"]) for r in REGIONS},
        volumes_2023_ml={r: float(document["conventions"]["brats_peds_2023"][r]["volume_ml"]) for r in REGIONS_2023},
        rapno_region=str(document["rapno"].get("region", "TC")),
        rapno_product_mm2=document["rapno"].get("sum_product_mm2"),
        qc_flags=tuple(document.get("qc_flags", ())),
    )


def to_dict(tp: TimePoint) -> dict:
    data = asdict(tp)
    data["qc_flags"] = list(tp.qc_flags)
    return data


def from_dict(data: dict) -> TimePoint:
    return TimePoint(**{**data, "bundle": BundleId(**data["bundle"]), "qc_flags": tuple(data.get("qc_flags", ()))})


def record_review(store, subject_key: str, study_uid: str, bundle_sha256: str,
                  volumes_ml: dict[str, float]) -> TimePoint:
    """Record a reviewed segmentation's volumes beside the automatic ones of the study's time point (the one the
    same model measured), and return the updated time point. `store`: a tracking.store.MeasurementStore."""
    recorded = [tp for tp in store.history(subject_key)
                if tp.study_uid == study_uid and tp.bundle.sha256 == bundle_sha256]
    if not recorded:
        raise InputError("The measurement store holds no automatic time point of this study for this subject.",
                         hint="Review a study that `pedseg run --db` recorded, with the same subject key.")
    updated = replace(recorded[0], reviewed_volumes_ml={region: round(float(v), 3) for region, v in volumes_ml.items()})
    store.record(updated)
    return updated
