"""Encapsulated PDF output: the PDF report as a DICOM instance filed in the source study.

highdicom has no Encapsulated PDF class, so the IOD (PS3.3 A.45.1) is built here with pydicom: Patient and
General Study copied from the source series (reporting.derived's allow-list), a new Encapsulated Document Series,
General and SC Equipment, Encapsulated Document (its concept name LOINC 18748-4 "Diagnostic Imaging Report", so an
archive can route it) and SOP Common.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid

from pedseg.pipeline.atomic import atomic_path
from pedseg.pipeline.errors import InternalError
from pedseg.reporting import codes
from pedseg.reporting.derived import PDF_INDEX, RunStamp, copy_patient_study

logger = logging.getLogger(__name__)

DOCUMENT_CONCEPT = dcm_codes.LN.DiagnosticImagingReport  # 18748-4, CID 7020 (document titles)


def write_encapsulated_pdf(
    pdf_path: Path,
    source_files: list[Path],
    out_path: Path,
    *,
    title: str,
    stamp: RunStamp | None = None,
    identifies_patient: bool = True,
) -> Path:
    """Wrap `pdf_path` as Encapsulated PDF Storage in the study of `source_files`, in a new series.

    `identifies_patient` sets Burned In Annotation; leave it True unless the PDF is known to carry no
    identifiers (pseudonymised report), so de-identification tools keep treating it as identifying.
    """
    document = Path(pdf_path).read_bytes()
    if not document.startswith(b"%PDF-"):
        raise InternalError("The report to encapsulate is not a PDF file.")
    if not source_files:
        raise InternalError("No source images were given for the encapsulated PDF.")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    ds = _dataset(sources, document, title, stamp or RunStamp.now(codes.MANUFACTURER), identifies_patient)
    with atomic_path(out_path) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    logger.debug("Wrote encapsulated PDF (%d bytes)", len(document))
    return Path(out_path)


def _dataset(
    sources: list[Dataset], document: bytes, title: str, stamp: RunStamp, identifies_patient: bool
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: holds the copied names and any title
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = stamp.date, stamp.time
    copy_patient_study(sources[0], ds)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = stamp.series_number(PDF_INDEX)
    stamp.apply(ds)
    ds.SeriesDescription = title[:64]
    ds.Manufacturer = codes.MANUFACTURER
    ds.ConversionType = "WSD"  # workstation: the document was generated, not scanned
    ds.InstanceNumber = 1
    ds.AcquisitionDateTime = f"{stamp.created:%Y%m%d%H%M%S}"
    ds.BurnedInAnnotation = "YES" if identifies_patient else "NO"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = Sequence([_code_item(DOCUMENT_CONCEPT)])
    ds.SourceInstanceSequence = Sequence([_reference(s) for s in sources])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + b"\0" * (len(document) % 2)  # OB values have even length
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _code_item(code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item
