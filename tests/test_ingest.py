"""Ingest (folders, zips, junk, unsafe archives, enhanced and gzip-compressed DICOM) and dcm2niix conversion."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import MediaStorageDirectoryStorage

from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.errors import InputError, UnsupportedDataError
from pedseg.pipeline.ingest import ingest
from pedseg.pipeline.types import Series
from pedseg.synth.dicom_writer import StudyInfo, write_series
from pedseg.synth.protocols import Protocol

from factories import SHARED_DATA, dicom_dataset, needs_shared_data, write_dicom

DICOM = SHARED_DATA / "dicom"
PHILIPS = DICOM / "philips_t1_multiframe_and_classic"


def only(session, number):
    return next(s for s in session.series if s.header.series_number == number)


# Synthetic series written as real DICOM files (tiny images: only headers and geometry matter here).
STUDY = StudyInfo("SYNTHETIC^INGEST", "SYN000001", "20150101", "F", "010Y", "1.2.826.0.1.3680043.8.498.11",
                  "1.2.826.0.1.3680043.8.498.12", "20260105", 10 * 3600.0, "ACC1", "SIEMENS", "Skyra")
# Direction matrix columns (row axis, column axis, slice normal) in LPS, as scanners write them per plane.
PLANES = {"ax": ((1, 0, 0), (0, 1, 0), (0, 0, 1)), "cor": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
          "sag": ((0, 1, 0), (0, 0, -1), (-1, 0, 0))}


def volume(plane: str = "ax", slices: int = 12, spacing=(0.9, 0.9, 4.0), tilt_deg: float = 0.0) -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(slices).uniform(50, 500, (slices, 16, 16)).astype(np.float32))
    a = np.deg2rad(tilt_deg)
    tilt = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    image.SetDirection(tuple((tilt @ np.array(PLANES[plane], float).T).flatten()))
    image.SetSpacing(spacing)
    return image


def write(folder: Path, number: int, description: str, volumes: list[sitk.Image], extras=None, *, tr=3500.0,
          te=12.0, study: StudyInfo = STUDY) -> str:
    proto = Protocol("test", description, None, tr, te, None, 150.0, "SE", "SK\\SP", "", "2D")
    return write_series(volumes, proto, study, number, folder, extras)


def dual_echo(folder: Path, number: int = 3) -> str:
    """A dual-echo PD/T2 TSE: both echoes under one SeriesInstanceUID, as Siemens writes 'pd+t2_tse'."""
    return write(folder, number, "pd+t2_tse_tra", [volume(), volume()],
                 [{"EchoTime": 12.0, "EchoNumbers": 1}, {"EchoTime": 95.0, "EchoNumbers": 2}])


# ------------------------------------------------------------------------------------- headers


@needs_shared_data
def test_classic_siemens_mprage_header(tmp_path):
    session = ingest(DICOM / "siemens_skyra_mprage_pediatric_3y", tmp_path)
    assert len(session.series) == 1
    assert session.study_date == "20130308"
    s = session.series[0]
    h = s.header
    assert (h.series_number, h.description, h.modality, h.manufacturer) == (5, "SAG MPRAGE 220 FOV", "MR", "SIEMENS")
    assert (h.repetition_time, h.echo_time, h.inversion_time, h.flip_angle) == (2000.0, 2.52, 900.0, 9.0)
    assert (h.scanning_sequence, h.sequence_variant) == (("GR", "IR"), ("SK", "SP", "MP"))
    assert h.sequence_name == "*tfl3d1_16ns"
    assert (h.mr_acquisition_type, h.num_images, len(s.files), h.rows, h.columns) == ("3D", 192, 192, 256, 256)
    assert h.pixel_spacing == (0.859375, 0.859375)
    assert h.slice_thickness == pytest.approx(0.9)
    assert h.image_type[:2] == ("ORIGINAL", "PRIMARY")
    assert h.acquisition_time == pytest.approx(8 * 3600 + 6 * 60 + 16.1625)  # AcquisitionTime 080616.1625
    assert (h.num_echoes, h.num_temporal_positions, h.num_orientations) == (1, 1, 1)
    assert session.study_uid == h.study_uid
    assert h.contrast_agent == ""


@needs_shared_data
def test_enhanced_multiframe_values_come_from_functional_groups(tmp_path):
    h = ingest(PHILIPS / "401_T1W_FFE_Sno_CS2", tmp_path).series[0].header
    assert h.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.1"
    assert h.repetition_time == pytest.approx(256.4448)
    assert h.echo_time == pytest.approx(3.568)
    assert (h.flip_angle, h.inversion_time, h.num_images) == (80.0, None, 24)  # frames; the Raw object is skipped
    assert (h.pixel_spacing, h.slice_thickness, h.orientation) == ((1.0, 1.0), 5.0, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    assert (h.scanning_sequence, h.sequence_name, h.mr_acquisition_type) == (("GR",), "FFE", "2D")
    assert h.acquisition_time == pytest.approx(12 * 3600 + 29 * 60 + 16.89)  # AcquisitionDateTime


@needs_shared_data
def test_gzipped_enhanced_objects_echoes_and_temporal_positions(tmp_path):
    session = ingest(DICOM / "philips_enhanced_multiframe", tmp_path)
    # Raw-data objects (ExamCard, and the raw parts of every series) hold no image and are skipped.
    assert [s.header.series_number for s in session.series] == [1901, 1903, 2001]
    field_map = only(session, 2001).header
    assert (field_map.num_images, field_map.num_echoes, field_map.mr_acquisition_type) == (212, 2, "3D")
    assert only(session, 1903).header.num_temporal_positions == 3
    assert all(f.is_relative_to(tmp_path) for s in session.series for f in s.files)  # decompressed copies


@needs_shared_data
def test_time_series_is_counted(tmp_path):
    h = ingest(DICOM / "ge_mr750_epi", tmp_path).series[0].header  # README-Series.txt beside the images
    assert (h.num_images, h.num_temporal_positions, h.scanning_sequence) == (150, 10, ("EP", "GR"))


@needs_shared_data
def test_two_studies_in_one_input_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"2 different studies.*series 201 'T1W_TSE_Sno_CSno_CSAIno'"):
        ingest(PHILIPS, tmp_path)


# ---------------------------------------------------------------- series split by echo or orientation


def test_dual_echo_series_is_split_into_one_part_per_echo_each_converted(tmp_path):
    uid = dual_echo(tmp_path / "in")
    session = ingest(tmp_path / "in", tmp_path / "work")
    headers = [s.header for s in session.series]
    assert [(h.series_uid, h.part, h.key) for h in headers] == [(uid, "e1", f"{uid}#e1"), (uid, "e2", f"{uid}#e2")]
    assert [(h.echo_time, h.num_images, h.num_echoes) for h in headers] == [(12.0, 12, 1), (95.0, 12, 1)]
    files = [set(s.files) for s in session.series]
    assert not files[0] & files[1]
    assert len(files[0] | files[1]) == 24
    assert all(pydicom.dcmread(f, stop_before_pixels=True).EchoTime == 95 for f in files[1])
    assert session.by_uid(f"{uid}#e2") is session.series[1]
    outputs = [convert_series(s, tmp_path / "nifti") for s in session.series]
    assert [p.name for p in outputs] == ["series3_e1.nii.gz", "series3_e2.nii.gz"]
    assert all(_nifti_info(p).GetSize() == (16, 16, 12) for p in outputs)


def test_stacks_in_several_orientations_are_split_by_plane_with_stable_names(tmp_path):
    # A 3-plane localizer, plus a second axial stack tilted 15 degrees (a reformat), all under one UID.
    volumes = [volume("sag", 3), volume("cor", 3), volume("ax", 3), volume("ax", 3, tilt_deg=15.0)]
    uid = write(tmp_path / "in", 1, "localizer", volumes, tr=8.6, te=4.0)
    session = ingest(tmp_path / "in", tmp_path / "work")
    assert [s.header.key for s in session.series] == [f"{uid}#{p}" for p in ("ax1", "ax2", "cor", "sag")]
    assert [(s.header.num_images, s.header.num_orientations) for s in session.series] == [(3, 1)] * 4
    # Same-plane stacks are numbered in ImageOrientationPatient order: the tilted one sorts first.
    assert session.series[0].header.orientation == pytest.approx((1.0, 0.0, 0.0, 0.0, 0.965926, 0.258819))
    assert session.series[1].header.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert session.series[3].header.orientation == (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    # Names and membership depend on content only, not on file names or the order files are found in.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, f in enumerate(sorted((tmp_path / "in").iterdir(), reverse=True)):
        shutil.copy(f, shuffled / f"z{i:03d}.dcm")
    again = ingest(shuffled, tmp_path / "work2")
    assert [(s.header.key, sorted(pydicom.dcmread(f).SOPInstanceUID for f in s.files)) for s in again.series] == [
        (s.header.key, sorted(pydicom.dcmread(f).SOPInstanceUID for f in s.files)) for s in session.series]


def test_single_stack_single_echo_series_is_not_split(tmp_path):
    write(tmp_path / "in", 4, "t2_tse_tra", [volume()], te=98.0)
    (h,) = [s.header for s in ingest(tmp_path / "in", tmp_path / "work").series]
    assert (h.part, h.key, h.num_images) == ("", h.series_uid, 12)


# ------------------------------------------------------------------------------ folders and zips


def test_several_inputs_merge_into_one_session_and_repeated_instances_count_once(tmp_path):
    dual_echo(tmp_path / "a")
    write(tmp_path / "b", 4, "t2_tse_tra", [volume()], te=98.0)
    archive = tmp_path / "acquisition_4.dicom.zip"  # as Flywheel stores each acquisition
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "b").iterdir()):
            zf.write(f, f"t2/{f.name}")
    single = tmp_path / "a" / "IM00001.dcm"  # also inside folder a: the same instance twice
    session = ingest([tmp_path / "a", archive, single, tmp_path / "b"], tmp_path / "work")
    assert [(s.header.series_number, s.header.part, s.header.num_images, len(s.files)) for s in session.series] == [
        (3, "e1", 12, 12), (3, "e2", 12, 12), (4, "", 12, 12)]
    assert session.study_uid == STUDY.study_uid


def test_a_single_dicom_file_is_an_input(tmp_path):
    write(tmp_path / "in", 4, "t2_tse_tra", [volume()], te=98.0)
    session = ingest(tmp_path / "in" / "IM00005.dcm", tmp_path / "work")
    assert [(s.header.series_number, s.header.num_images) for s in session.series] == [(4, 1)]


def test_several_inputs_from_different_studies_are_refused(tmp_path):
    write(tmp_path / "a", 4, "t2_tse_tra", [volume()])
    other = StudyInfo(**{**vars(STUDY), "study_uid": "1.2.826.0.1.3680043.8.498.13"})
    write(tmp_path / "b", 5, "t1_se_tra", [volume()], study=other)
    with pytest.raises(InputError, match=r"2 different studies.*series 4 't2_tse_tra'.*series 5 't1_se_tra'"):
        ingest([tmp_path / "a", tmp_path / "b"], tmp_path / "work")


def test_empty_input_list_and_inputs_without_dicom_are_refused(tmp_path):
    with pytest.raises(InputError, match="No input was given"):
        ingest([], tmp_path / "work")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("not dicom")
    with pytest.raises(InputError, match=r"No DICOM images in the inputs 'a', 'b' \(2 files, none of them DICOM\)"):
        ingest([tmp_path / "a", tmp_path / "b"], tmp_path / "work")



def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files at all"):
        ingest(tmp_path / "empty", tmp_path / "work")


def test_folder_of_junk_is_refused(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "README.txt").write_text("not dicom")
    (src / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(InputError, match="2 files, none of them DICOM"):
        ingest(src, tmp_path / "work")


def test_missing_and_non_archive_inputs_are_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ingest(tmp_path / "nope", tmp_path / "work")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="neither a folder, a .zip archive nor a DICOM file"):
        ingest(tmp_path / "notes.txt", tmp_path / "work")


def _dicomdir(path: Path) -> None:
    """A minimal DICOMDIR-like file: a DICOM object of the Media Storage Directory class."""
    write_dicom(dicom_dataset(MediaStorageDirectoryStorage, SeriesInstanceUID=pydicom.uid.generate_uid()), path)


@needs_shared_data
def test_zip_with_nested_folders_and_junk(tmp_path):
    archive = tmp_path / "session.zip"
    _dicomdir(tmp_path / "DICOMDIR")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for sub in ("401_T1W_FFE_Sno_CS2", "501_T1W_FFE_Sno_CS4"):  # one study; 401 has a Raw object beside it
            for f in sorted((PHILIPS / sub).iterdir()):
                zf.write(f, f"export/PATIENT/{sub}/deeper/{f.name}")
        zf.writestr("export/README.md", "# exported from PACS")
        zf.writestr("export/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(100))
        zf.writestr("__MACOSX/export/._0001.dcm", b"\x00\x05\x16\x07" + bytes(100))
        zf.writestr("export/key_image.jpg", b"\xff\xd8\xff\xe0" + bytes(300))
        zf.write(tmp_path / "DICOMDIR", "export/DICOMDIR")
    session = ingest(archive, tmp_path / "work")
    assert [(s.header.series_number, s.header.num_images, len(s.files)) for s in session.series] == [
        (401, 24, 1), (501, 24, 24)]
    assert session.root.is_relative_to(tmp_path / "work")
    assert all(f.is_file() for s in session.series for f in s.files)


def _zip_with(path: Path, name: str, data: bytes = b"x", *, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok/readme.txt", "fine")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = 0o120777 << 16
        zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return path


@pytest.mark.parametrize("name, symlink, message", [
    ("../evil", False, r"'\.\./evil' climbs out"),
    ("a/../../evil.dcm", False, r"'a/\.\./\.\./evil\.dcm' climbs out"),
    ("/etc/evil", False, r"'/etc/evil' has an absolute path"),
    ("C:/evil", False, r"'C:/evil' has an absolute path"),
    ("link", True, r"'link' is a symbolic link"),
])
def test_unsafe_zip_entries_are_refused(tmp_path, name, symlink, message):
    archive = _zip_with(tmp_path / "bad.zip", name, b"/etc/passwd" if symlink else b"x", symlink=symlink)
    with pytest.raises(InputError, match=message):
        ingest(archive, tmp_path / "work")
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "evil.dcm").exists()


def test_zip_bomb_is_refused(tmp_path):
    archive = _zip_with(tmp_path / "bomb.zip", "zeros.dcm", bytes(20 * 1024**2))
    with pytest.raises(InputError, match="zip bomb"):
        ingest(archive, tmp_path / "work")
    assert not list((tmp_path / "work").rglob("zeros.dcm"))


def test_corrupt_zip_is_refused(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputError, match="cannot be read as a zip"):
        ingest(tmp_path / "broken.zip", tmp_path / "work")


# ------------------------------------------------------------------------------------- conversion


def _nifti_info(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


@needs_shared_data
@pytest.mark.parametrize("folder", ["siemens_skyra_mprage_pediatric_3y", "philips_t1_multiframe_and_classic/"
                                    "501_T1W_FFE_Sno_CS4", "philips_t1_multiframe_and_classic/401_T1W_FFE_Sno_CS2"])
def test_convert_series_matches_dicom_geometry(folder, tmp_path):
    series = ingest(DICOM / folder, tmp_path / "work").series[0]
    h = series.header
    out = convert_series(series, tmp_path / "nifti")
    assert out == tmp_path / "nifti" / f"series{h.series_number}.nii.gz"
    info = _nifti_info(out)
    # dcm2niix may turn the grid losslessly (axes permuted or flipped): compare sizes as a set, and find the
    # in-plane spacing on the axes that have the rows' and columns' sizes (slice spacing may exceed thickness).
    assert info.GetDimension() == 3
    assert sorted(info.GetSize()) == sorted((h.columns, h.rows, h.num_images))
    slice_axis = info.GetSize().index(h.num_images)
    in_plane = [sp for axis, sp in enumerate(info.GetSpacing()) if axis != slice_axis]
    assert sorted(in_plane) == pytest.approx(sorted(h.pixel_spacing), abs=1e-3)
    assert (tmp_path / "nifti" / f"series{h.series_number}.json").is_file()
    assert sorted(p.name for p in (tmp_path / "nifti").iterdir()) == sorted([out.name, f"series{h.series_number}.json"])


@needs_shared_data
def test_convert_picks_magnitude_first_echo_among_several_outputs(tmp_path, caplog):
    series = only(ingest(DICOM / "philips_enhanced_multiframe", tmp_path / "work"), 2001)  # 2 echoes, mag + phase
    with caplog.at_level("INFO", logger="pedseg.pipeline.convert"):
        out = convert_series(series, tmp_path / "nifti")
    assert out.name == "series2001.nii.gz"
    assert _nifti_info(out).GetSize() == (80, 80, 53)
    assert "using series2001_e1.nii.gz (magnitude, echo 1" in caplog.text


@needs_shared_data
def test_convert_failure_names_the_series(tmp_path):
    header = ingest(PHILIPS / "501_T1W_FFE_Sno_CS4", tmp_path / "work").series[0].header
    junk = tmp_path / "0001.dcm"
    junk.write_bytes(bytes(128) + b"DICM" + bytes(64))  # a preamble and nothing else
    with pytest.raises(UnsupportedDataError, match="series 501 'T1W_FFE_Sno_CS4'"):
        convert_series(Series(header=header, files=[junk]), tmp_path / "nifti")
    assert not list((tmp_path / "nifti").iterdir())  # no half-written output, no scratch left behind
