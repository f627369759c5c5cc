"""Who and when a study is, from the reference series' first header: the report's subject line (a pseudonym
unless configured otherwise), the patient's age and the subject key for longitudinal tracking."""
from __future__ import annotations

import hashlib

import pydicom

from pedseg.pipeline.longitudinal import subject_key
from pedseg.pipeline.types import Session, StudyContext

# PatientAge (AS): three digits and a unit; days, weeks and months as fractions of a year.
_AGE_UNITS = {"Y": 1, "M": 12, "W": 52.18, "D": 365.25}


def study_context(session: Session, reference_key: str, *, pseudonymize: bool, subject_salt: str = "") -> StudyContext:
    ds = pydicom.dcmread(session.by_uid(reference_key).files[0], stop_before_pixels=True)
    patient_id = str(ds.get("PatientID", ""))
    pseudonym = "subject-" + hashlib.sha256(patient_id.encode()).hexdigest()[:10]
    return StudyContext(
        display_id=pseudonym if pseudonymize else f"{ds.get('PatientName', '')} ({patient_id})",
        study_date=session.study_date,
        age_years=patient_age_years(str(ds.get("PatientAge", ""))),
        subject_key=subject_key(patient_id, subject_salt) if patient_id else "",
    )


def patient_age_years(age: str) -> float | None:
    """'008Y' -> 8.0, '018M' -> 1.5; None when absent or malformed."""
    if len(age) != 4 or not age[:3].isdigit():
        return None
    return int(age[:3]) / _AGE_UNITS.get(age[3], 1)
