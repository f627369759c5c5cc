"""Hostile inputs that used to give a silently wrong answer (issue 20): two series sharing a SeriesNumber, a session
acquired across midnight, a series of two matrix sizes, files without preamble (impossible geometry values in
headers are cases of the catalogue, tests/hostile/cases_geometry.py). Each ends in the
right result, or in a refusal with its exit code and a message naming the series (number and description), the
problem and what to do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

import pedseg.pipeline.convert as convert_module
from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.dicom_header import session_seconds
from pedseg.pipeline.errors import UnsupportedDataError
from pedseg.pipeline.identify import classify_session
from pedseg.pipeline.ingest import ingest

from hostile_support import PROTOCOLS, edit_files, tiny_volume, write_role

T2 = f"series 3 '{PROTOCOLS['t2w'].description}'"


def _volume(low: float, high: float, plane: str = "sag", spacing=(1.0, 1.0, 1.0), slices: int = 12,
            size: int = 16, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = tiny_volume(plane, spacing, slices, size)
    array = np.random.default_rng(int(low)).uniform(low, high, (slices, size, size)).astype(np.float32)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    out.SetOrigin(origin)
    return out


def _values(path: Path) -> np.ndarray:
    return np.sort(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).ravel())


def _no_dcm2niix(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("dcm2niix ran on a series the checks should have refused")
    monkeypatch.setattr(convert_module, "_run_dcm2niix", refuse)


# -------------------------------------------------------------------- 1. two series, one SeriesNumber


@pytest.mark.parametrize("number", [2, 901])
def test_series_sharing_a_number_each_convert_to_their_own_pixels(number, tmp_path):
    pre = write_role(tmp_path / "console1", "t1n", number=number, volumes=[_volume(100, 200)])
    post = write_role(tmp_path / "console2", "t1c", number=number, volumes=[_volume(1000, 1100)])
    session = ingest([pre.parent, post.parent], tmp_path / "work")
    assert [s.header.series_number for s in session.series] == [number, number]
    chosen = classify_session(session).chosen
    native = tmp_path / "native"
    paths = {role: convert_series(session.by_uid(chosen[role]), native) for role in ("t1n", "t1c")}
    assert paths["t1n"] != paths["t1c"]
    assert len({p.name for p in native.glob("*.nii.gz")}) == 2
    for role, (low, high) in {"t1n": (100, 200), "t1c": (1000, 1100)}.items():
        values = _values(paths[role])
        assert values.size == 16 * 16 * 12
        assert low - 1 <= values[0] and values[-1] <= high + 1, role  # its own series' pixels, not the other's
    # Converting again (same folder, either order) never replaces the other series' image.
    again = convert_series(session.by_uid(chosen["t1n"]), native)
    assert _values(again)[-1] <= 201 and _values(paths["t1c"])[0] >= 999


def test_two_t2_series_sharing_a_number_convert_side_by_side(tmp_path):
    a = write_role(tmp_path / "a", "t2w", volumes=[_volume(100, 200, "ax", (0.9, 0.9, 4.0))])
    b = write_role(tmp_path / "b", "t2w", volumes=[_volume(2000, 2100, "ax", (0.9, 0.9, 4.0))])
    session = ingest([a.parent, b.parent], tmp_path / "work")
    outputs = [convert_series(s, tmp_path / "native") for s in session.series]
    assert len(set(outputs)) == 2
    low, high = sorted(float(_values(p).mean()) for p in outputs)
    assert 100 < low < 200 and 2000 < high < 2100


# -------------------------------------------------------------------- 2. a session across midnight


def _when(date: str, hhmmss: str) -> dict:
    return {"SeriesDate": date, "SeriesTime": hhmmss, "AcquisitionDate": date, "AcquisitionTime": hhmmss,
            "ContentDate": date, "ContentTime": hhmmss}


@pytest.mark.parametrize("first, second, study_date", [
    (("20240611", "235700"), ("20240612", "002100"), "20240611"),  # across midnight
    (("20240611", "100000"), ("20240611", "102400"), "20240611"),  # same day (control)
    (("20240612", "000500"), ("20240612", "002900"), "20240611"),  # both after midnight of a late study
])
def test_the_later_of_two_twin_t1_series_is_post_contrast_whatever_the_clock_says(first, second, study_date,
                                                                                  tmp_path):
    # Two runs of one T1 protocol, no contrast agent recorded: the later one is the post-contrast T1.
    study = {"StudyDate": study_date}
    early = write_role(tmp_path / "a", "t1n", number=4, extra={**study, **_when(*first)})
    late = write_role(tmp_path / "b", "t1n", number=9, extra={**study, **_when(*second)})
    session = ingest([early.parent, late.parent], tmp_path / "work")
    headers = {s.header.series_number: s.header for s in session.series}
    assert headers[9].acquisition_time - headers[4].acquisition_time == pytest.approx(24 * 60)
    chosen = classify_session(session).chosen
    assert session.by_uid(chosen["t1c"]).header.series_number == 9
    assert session.by_uid(chosen["t1n"]).header.series_number == 4


def test_session_seconds_counts_from_midnight_of_the_study_date():
    ds = Dataset()
    ds.StudyDate = "20240611"
    assert session_seconds(ds, "235700", "AcquisitionDate") == 23 * 3600 + 57 * 60  # no date: time of day
    ds.AcquisitionDate = "20240612"
    assert session_seconds(ds, "002100", "AcquisitionDate") == 86400 + 21 * 60
    assert session_seconds(ds, "20240612002100.5") == 86400 + 21 * 60 + 0.5  # enhanced: AcquisitionDateTime
    ds.AcquisitionDate = "19990101"  # a shifted or broken date, years away: ignored
    assert session_seconds(ds, "002100", "AcquisitionDate") == 21 * 60
    del ds.StudyDate  # no StudyDate: time of day, as before
    ds.AcquisitionDate = "20240612"
    assert session_seconds(ds, "002100", "AcquisitionDate") == 21 * 60
    assert session_seconds(ds, "junk", "AcquisitionDate") is None


# -------------------------------------------------------------------- 3. geometry values
# Impossible ones (NaN, negative, missing) are cases of the catalogue: tests/hostile/cases_geometry.py.


def test_sound_geometry_without_slice_thickness_still_converts(tmp_path):
    # SliceThickness is type 2 (may be empty): dcm2niix takes the spacing from the slice positions.
    folder = write_role(tmp_path / "in", "t2w", volumes=[tiny_volume("ax", (0.9, 0.9, 4.0))])
    edit_files(folder, lambda ds, index: setattr(ds, "SliceThickness", ""))
    series = ingest(tmp_path / "in", tmp_path / "work").series[0]
    image = sitk.ReadImage(str(convert_series(series, tmp_path / "nifti")))
    assert image.GetSpacing() == pytest.approx((0.9, 0.9, 4.0), abs=1e-3)


# -------------------------------------------------------------------- 4. two matrix sizes in one series


def test_series_of_two_matrix_sizes_that_split_the_slices_is_refused(tmp_path, monkeypatch):
    lower = _volume(100, 200, "ax", (0.9, 0.9, 4.0), slices=8, size=16)
    upper = _volume(100, 200, "ax", (0.45, 0.45, 4.0), slices=4, size=32, origin=(0.0, 0.0, 32.0))
    write_role(tmp_path / "in", "t2w", volumes=[lower, upper])
    series = ingest(tmp_path / "in", tmp_path / "work").series[0]
    assert series.header.num_orientations == 1 and len(series.files) == 12
    _no_dcm2niix(monkeypatch)
    with pytest.raises(UnsupportedDataError, match=rf"{T2} mixes images of 2 matrix sizes \(8 of 16×16, 4 of "
                                                   rf"32×32 pixels\) and none of them holds every slice"):
        convert_series(series, tmp_path / "nifti")


def test_series_with_a_second_complete_reconstruction_converts_one_whole_part(tmp_path, caplog):
    # The full stack at 16×16, and a 4-slice 32×32 repeat of its first slices: the 16×16 part is the whole
    # acquisition (dcm2niix alone would take the 32×32 part, which has more voxels).
    whole = _volume(100, 200, "ax", (0.9, 0.9, 4.0), slices=12, size=16)
    repeat = _volume(3000, 3100, "ax", (0.45, 0.45, 4.0), slices=4, size=32)
    write_role(tmp_path / "in", "t2w", volumes=[whole, repeat])
    series = ingest(tmp_path / "in", tmp_path / "work").series[0]
    with caplog.at_level("INFO", logger="pedseg.pipeline.convert"):
        out = convert_series(series, tmp_path / "nifti")
    image = sitk.ReadImage(str(out))
    assert image.GetSize() == (16, 16, 12)
    assert _values(out)[-1] <= 201
    assert f"{T2} mixes images of 2 matrix sizes" in caplog.text


# -------------------------------------------------------------------- 4. files without the DICOM preamble


def _strip_preamble(path: Path, *, with_meta: bool) -> None:
    """Rewrite one file as old software wrote it: no 128-byte preamble and no 'DICM'; the file meta group kept
    (explicit VR little endian) or dropped (implicit VR little endian, a bare data set)."""
    ds = pydicom.dcmread(path)
    buffer = DicomBytesIO()
    if with_meta:
        write_file_meta_info(buffer, ds.file_meta, enforce_standard=False)
    buffer.is_little_endian, buffer.is_implicit_VR = True, not with_meta
    write_dataset(buffer, ds)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("with_meta", [False, True])
def test_files_without_preamble_are_read_everywhere_as_standard_files(with_meta, tmp_path):
    folder = write_role(tmp_path / "in", "t2w", volumes=[tiny_volume("ax", (0.9, 0.9, 4.0))])
    for path in folder.iterdir():
        _strip_preamble(path, with_meta=with_meta)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(next(folder.iterdir()))  # what a reader without force=True meets
    series = ingest(tmp_path / "in", tmp_path / "work").series[0]
    assert len(series.files) == 12
    assert all(f.is_relative_to(tmp_path / "work") for f in series.files)  # standard copies, the input untouched
    assert all(pydicom.dcmread(f).SeriesNumber == 3 for f in series.files)
    image = sitk.ReadImage(str(convert_series(series, tmp_path / "nifti")))
    assert image.GetSize() == (16, 16, 12)
