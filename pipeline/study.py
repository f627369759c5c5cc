"""Who and when a study is, from the reference series' first header: the report's subject line (a pseudonym
unless configured otherwise), the patient's age and the subject key for longitudinal tracking."""
from __future__ import annotations

import datetime
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
        age_years=header_age_years(ds, study_date=session.study_date),
        subject_key=subject_key(patient_id, subject_salt) if patient_id else "",
    )


def header_age_years(ds: pydicom.Dataset, *, study_date: str = "") -> float | None:
    """The patient's age at the study in years: PatientAge, else the years from PatientBirthDate to StudyDate
    (the header's, else `study_date`); None when neither is usable. Never logged: the birth date is PHI."""
    age = patient_age_years(str(ds.get("PatientAge", "") or ""))
    if age is not None:
        return age
    return age_from_dates(str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or study_date))


def patient_age_years(age: str) -> float | None:
    """'008Y' -> 8.0, '018M' -> 1.5; None when absent or malformed (an unknown unit included)."""
    age = age.strip()
    if len(age) != 4 or not age[:3].isdigit() or age[3] not in _AGE_UNITS:
        return None
    return int(age[:3]) / _AGE_UNITS[age[3]]


def age_from_dates(birth_date: str, study_date: str) -> float | None:
    """Years from a birth date to a study date (DICOM DA, YYYYMMDD; 365.25-day years); None when either is absent
    or malformed, or the birth date is after the study."""
    born, studied = _date(birth_date), _date(study_date)
    if born is None or studied is None or born > studied:
        return None
    return (studied - born).days / 365.25


def _date(value: str) -> datetime.date | None:
    value = value.strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None
