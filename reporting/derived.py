"""What every DICOM object a run derives (SEGs, SR, encapsulated PDF) shares: the patient and study attributes it
copies from its source, and the stamp that tells one run's series from another's in a PACS list.

One allow-list: only these attributes travel from the source series into a derived object, so nothing else a
source carries (addresses, other names, private tags) leaks into the results, and every derived object of a
study names the patient and study alike.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

from pydicom.dataset import Dataset

# Patient, Patient Study and General Study attributes. Type 2 ones are written empty
# when the source lacks them; the others only when present.
PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
PATIENT_STUDY_OPTIONAL = (
    "IssuerOfPatientID", "PatientAge", "PatientSize", "PatientWeight", "StudyDescription",
    "PatientIdentityRemoved", "DeidentificationMethod",
)
PATIENT_STUDY_ATTRIBUTES = (*PATIENT_STUDY_TYPE2, *PATIENT_STUDY_OPTIONAL)


def copy_patient_study(source: Dataset, target: Dataset) -> Dataset:
    """Set the allow-listed patient and study attributes of `target` from `source` (and StudyInstanceUID), and
    drop every other patient attribute (group 0010) a library copied on its own (highdicom: OtherPatientNames)."""
    for element in list(target):
        if element.tag.group == 0x0010 and element.keyword not in PATIENT_STUDY_ATTRIBUTES:
            del target[element.tag]
    target.StudyInstanceUID = source.StudyInstanceUID
    for keyword in PATIENT_STUDY_TYPE2:
        setattr(target, keyword, source[keyword].value if keyword in source else "")
    for keyword in PATIENT_STUDY_OPTIONAL:
        if keyword in source:
            setattr(target, keyword, source[keyword].value)
        elif keyword in target:
            del target[keyword]
    return target


# The kk of each derived object's series number (RunStamp.series_number): the SR, the PDF, then the SEGs in the
# order of the roles they are on: sub-regions from 11, composites from 21.
SR_INDEX, PDF_INDEX, SEG_INDEX, COMPOSITE_SEG_INDEX = 1, 2, 11, 21


@dataclass(frozen=True)
class RunStamp:
    """When a run wrote its DICOM objects, and who made them: one per run, shared by all its derived series.

    Series numbers are 9HHMMSSkk: 9 sorts them after the acquired series, HHMMSS is the run's time and kk the object
    (SR_INDEX...), so a re-run of the same study shows as new series, beside a SeriesDate/Time of its own.
    """

    created: datetime.datetime
    creator: str  # ContentCreatorName: the algorithm, as a DICOM person name with one component

    @classmethod
    def now(cls, creator: str) -> RunStamp:
        return cls(datetime.datetime.now().replace(microsecond=0), creator)

    def series_number(self, index: int) -> int:
        if not 1 <= index <= 99:
            raise ValueError(f"derived object index {index} is outside 1..99")
        return int(f"9{self.created:%H%M%S}{index:02d}")

    @property
    def date(self) -> str:
        return f"{self.created:%Y%m%d}"

    @property
    def time(self) -> str:
        return f"{self.created:%H%M%S}"

    def apply(self, ds: Dataset, *, content_creator: bool = False) -> Dataset:
        """Series and content date/time on a derived dataset, and the content creator where its IOD has one
        (Content Identification: SEG; an SR names its device observer instead)."""
        ds.SeriesDate, ds.SeriesTime = self.date, self.time
        ds.ContentDate, ds.ContentTime = self.date, self.time
        if content_creator:  # the algorithm as a family name: a bare name is PN's retired form (dciodvfy warns)
            ds.ContentCreatorName = f"{self.creator}^"
        return ds
