"""Property-based fuzzing of ingest and identification with hostile header values.

Twelve slices of a real series (a 3-year-old's Siemens MPRAGE) get arbitrary bytes written into the header
elements ingest and identification read (or lose them), in one file or in all; whatever the bytes, ingest and
identification may only raise the documented errors (pipeline.errors), never anything else.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.convert import check_slice_spacing
from pedseg.pipeline.errors import InputError, MissingSequenceError, ResourceError, UnsupportedDataError
from pedseg.pipeline.identify import identify, session_to_json
from pedseg.pipeline.ingest import ingest

from factories import SHARED_DATA, needs_shared_data

SERIES = SHARED_DATA / "dicom" / "siemens_skyra_mprage_pediatric_3y"
SLICES = 12
DOCUMENTED = (InputError, MissingSequenceError, UnsupportedDataError, ResourceError)
# Every element ingest or identification reads, file meta excepted.
KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "SeriesNumber", "InstanceNumber", "SeriesDescription", "ProtocolName", "Modality", "Manufacturer",
    "ManufacturerModelName", "ImageType", "ScanningSequence", "SequenceVariant",
    "SequenceName", "ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
    "EchoNumbers", "ContrastBolusAgent", "ContrastBolusIngredient", "AcquisitionTime", "SeriesTime", "StudyDate",
    "AcquisitionDateTime", "NumberOfTemporalPositions", "TemporalPositionIdentifier", "NumberOfFrames",
    "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "SliceThickness", "PixelSpacing",
    "ImageOrientationPatient", "ImagePositionPatient", "PatientID", "PatientName", "PatientAge",
)
NUMERIC_TEXT = st.from_regex(r"[-+]?[0-9]{0,12}(\.[0-9]{0,8})?([eE][-+]?[0-9]{1,4})?", fullmatch=True)
RAW = st.one_of(
    st.binary(max_size=48),
    st.text(max_size=40).map(lambda s: s.encode("utf-8")),
    st.lists(NUMERIC_TEXT, max_size=8).map(lambda v: "\\".join(v).encode()),
    st.sampled_from([b"", b"nan", b"-inf", b"1e999", b"-0", b"0\\0\\0\\0\\0\\0", b"\\\\\\", b"\x00" * 8]),
)
# The character set is set as text: the test's own writer encodes with it.
CHARSETS = st.sampled_from(["ISO_IR 192", "ISO_IR 100", "GB18030", "ISO 2022 IR 87", "ISO_IR 999", "", "junk"])
FILE = st.one_of(st.none(), st.integers(0, SLICES - 1))
# (keyword, new value or None to delete it, file index or None for every file)
MUTATION = st.one_of(st.tuples(st.sampled_from(KEYWORDS), st.one_of(st.none(), RAW), FILE),
                     st.tuples(st.just("SpecificCharacterSet"), CHARSETS, FILE))


@pytest.fixture(scope="module")
def originals() -> list[pydicom.Dataset]:
    files = sorted(SERIES.glob("*.dcm"))
    return [pydicom.dcmread(path) for path in files[:: len(files) // SLICES][:SLICES]]


def mutated(ds: pydicom.Dataset, keyword: str, raw: bytes | str | None) -> None:
    if isinstance(raw, str):
        setattr(ds, keyword, raw)
        return
    tag = Tag(tag_for_keyword(keyword))
    if raw is None:
        if tag in ds:
            del ds[tag]
        return
    if len(raw) % 2:
        raw += b"\x00" if dictionary_VR(tag) == "UI" else b" "
    # Written as raw bytes of VR UN, so nothing checks them on the way out; pydicom reads them back with the
    # element's own VR (replace_un_with_known_vr), as it would read a hostile file.
    ds[tag] = RawDataElement(tag, "UN", len(raw), raw, 0, False, True)


@needs_shared_data
@settings(max_examples=int(os.environ.get('FUZZ_EXAMPLES', 80)), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=6))
def test_hostile_header_values_raise_only_documented_errors(originals, mutations):
    datasets = [copy.deepcopy(ds) for ds in originals]
    with tempfile.TemporaryDirectory(prefix="pedseg-fuzz-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every invalid value: that is the point
        for keyword, raw, index in mutations:
            for ds in datasets if index is None else [datasets[index]]:
                mutated(ds, keyword, raw)
        (Path(tmp) / "in").mkdir()
        pydicom.config.replace_un_with_known_vr = False  # write the bytes as they are
        try:
            for i, ds in enumerate(datasets):
                ds.save_as(Path(tmp) / "in" / f"{i:03d}.dcm")
        finally:
            pydicom.config.replace_un_with_known_vr = True
        try:
            session = ingest(Path(tmp) / "in", Path(tmp) / "work")
            for series in session.series:
                check_slice_spacing(series)  # what conversion checks first, from the same headers
            session_to_json(identify(session, PipelineConfig(missing_policy="allow")))
        except DOCUMENTED as error:
            assert error.message
            assert error.hint
