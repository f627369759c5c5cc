"""Write a SimpleITK image as a classic single-frame MR DICOM series with vendor-style headers."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pedseg.synth.protocols import VENDORS, Protocol


@dataclass(frozen=True)
class StudyInfo:
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str  # DICOM AS, e.g. "004Y"
    study_uid: str
    frame_of_reference_uid: str
    study_date: str
    study_time_s: float  # seconds after midnight at exam start
    accession: str
    manufacturer: str
    model: str

    @classmethod
    def new_study(cls, rng: np.random.Generator, *, patient_name: str, patient_id: str, birth_date: dt.date,
                  sex: str, age: str, study_date: dt.date, vendor: str) -> StudyInfo:
        """A new study of one patient on `vendor`'s scanner: fresh UIDs, a working-hours start, an accession."""
        return cls(patient_name=patient_name, patient_id=patient_id, birth_date=birth_date.strftime("%Y%m%d"),
                   sex=sex, age=age, study_uid=generate_uid(), frame_of_reference_uid=generate_uid(),
                   study_date=study_date.strftime("%Y%m%d"), study_time_s=float(rng.integers(8 * 3600, 17 * 3600)),
                   accession=f"ACC{int(rng.integers(1e6, 1e7))}", manufacturer=vendor,
                   model=VENDORS[vendor]["model"])


def _dicom_time(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h:02d}{m:02d}{s:02d}.000000"


def _base_dataset(study: StudyInfo, proto: Protocol, series_uid: str, series_number: int) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = study.age
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = _dicom_time(study.study_time_s)
    ds.StudyID = "1"
    ds.AccessionNumber = study.accession
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MRI BRAIN WITH AND WITHOUT CONTRAST"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = proto.description
    ds.ProtocolName = proto.description
    ds.Modality = "MR"
    acq_time = study.study_time_s + 60 * proto.minutes_after_start
    ds.SeriesDate = study.study_date
    ds.SeriesTime = _dicom_time(acq_time)
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = _dicom_time(acq_time)
    ds.ContentDate = study.study_date
    ds.ContentTime = _dicom_time(acq_time)
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = study.manufacturer
    ds.ManufacturerModelName = study.model
    ds.MagneticFieldStrength = 3
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.ImageType = list(proto.image_type)
    ds.ScanningSequence = proto.scanning_sequence.split("\\")
    ds.SequenceVariant = proto.sequence_variant.split("\\")
    ds.ScanOptions = ""
    ds.MRAcquisitionType = proto.acquisition_type
    if proto.sequence_name:
        ds.SequenceName = proto.sequence_name
    ds.RepetitionTime = proto.tr
    ds.EchoTime = proto.te
    if proto.ti is not None:
        ds.InversionTime = proto.ti
    ds.FlipAngle = proto.flip
    ds.EchoTrainLength = 1
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = 123.2
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    if proto.contrast_agent:
        ds.ContrastBolusAgent = proto.contrast_agent
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = 5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def write_series(volumes: list[sitk.Image], proto: Protocol, study: StudyInfo, series_number: int, outdir: Path,
                 extra_per_volume: list[dict] | None = None) -> str:
    """Write one series of one or more volumes (DWI b-values, localizer planes); return its SeriesInstanceUID.

    DICOM geometry follows SimpleITK's: voxel (c, r, k) sits at origin + c*dx*row_dir + r*dy*col_dir + k*dz*normal,
    which is exactly ImagePositionPatient + PixelSpacing along ImageOrientationPatient.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    extras = extra_per_volume or [{}] * len(volumes)
    instance = 0
    for vol, extra in zip(volumes, extras):
        direction = np.asarray(vol.GetDirection()).reshape(3, 3)
        spacing = vol.GetSpacing()
        origin = np.asarray(vol.GetOrigin())
        iop = [float(round(v, 6)) for v in (*direction[:, 0], *direction[:, 1])]
        arr = np.clip(np.round(sitk.GetArrayFromImage(vol)), 0, 4095).astype(np.uint16)
        window = float(max(1.0, np.percentile(arr, 99)))
        for k in range(arr.shape[0]):
            instance += 1
            ds = _base_dataset(study, proto, series_uid, series_number)
            for key, value in extra.items():
                setattr(ds, key, value)
            sop_uid = generate_uid()
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = instance
            position = origin + k * spacing[2] * direction[:, 2]
            ds.ImagePositionPatient = [float(round(v, 4)) for v in position]
            ds.ImageOrientationPatient = iop
            ds.SliceLocation = float(round(float(position @ direction[:, 2]), 4))
            ds.PixelSpacing = [spacing[1], spacing[0]]
            ds.SliceThickness = proto.geometry.slice_thickness_mm if proto.geometry else spacing[2]
            ds.SpacingBetweenSlices = spacing[2]
            ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
            ds.WindowCenter = window / 2
            ds.WindowWidth = window
            ds.PixelData = arr[k].tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            pydicom.dcmwrite(outdir / f"IM{instance:05d}.dcm", ds, enforce_file_format=True)
    return series_uid
