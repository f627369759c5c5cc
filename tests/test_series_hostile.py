"""Rules that generalise (issue 20): files that share a SOP Instance UID are compared, never silently merged, and
label maps (masks, ROIs, segmentations saved as MR images) never take a sequence role, whatever their headers say.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from pedseg.pipeline.dicom_header import read_header, sampled_pixel_values, series_header
from pedseg.pipeline.errors import InputError
from pedseg.pipeline.identify import classify_session
from pedseg.pipeline.ingest import ingest
from pedseg.pipeline.series import DicomImage, build_series, distinct_instances
from pedseg.pipeline.types import Series, SeriesHeader, Session
from pedseg.synth.dicom_writer import StudyInfo, write_series
from pedseg.synth.protocols import Protocol

from factories import dicom_dataset, write_dicom

STUDY = StudyInfo("SYNTHETIC^HOSTILE", "SYN000020", "20170301", "F", "008Y", "1.2.826.0.1.3680043.8.498.201",
                  "1.2.826.0.1.3680043.8.498.202", "20260105", 10 * 3600.0, "ACC20", "SIEMENS", "Skyra")
MPRAGE = dict(tr=2300.0, te=2.3, ti=900.0, flip=8.0, seq="GR\\IR", variant="SK\\SP\\MP", acquisition="3D")
# ingest() drops a second file of one SOP Instance UID before build_series sees it, until ingest._read_images
# leaves that to series.distinct_instances: then these pass, and strict xfail reports it (remove the marker).


def mr_volume(slices: int = 12, size: int = 16, seed: int = 0) -> np.ndarray:
    """Noise-like MR intensities: hundreds of distinct values per slice."""
    return np.random.default_rng(seed).uniform(50, 900, (slices, size, size)).astype(np.float32)


def write(root: Path, number: int, description: str, array: np.ndarray, *, image_type=("ORIGINAL", "PRIMARY", "M",
          "ND"), minutes: float = 0.0, agent: str = "", **timing) -> Path:
    """One series of `array` (slices, rows, columns) as classic MR images, an MPRAGE's headers by default."""
    t = {**MPRAGE, **timing}
    proto = Protocol("test", description, None, t["tr"], t["te"], t["ti"], t["flip"], t["seq"], t["variant"], "",
                     t["acquisition"], image_type=image_type, contrast_agent=agent, minutes_after_start=minutes)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((1.0, 1.0, 1.0))
    folder = root / f"{number:02d}"
    write_series([image], proto, STUDY, number, folder)
    return folder


def images_of(*folders: Path) -> list[DicomImage]:
    return [DicomImage(f, read_header(f)) for folder in folders for f in sorted(folder.iterdir())]


def edit_copy(source: Path, target: Path, change=None, *, syntax=None) -> Path:
    """A copy of one file (same SOP Instance UID unless `change` alters it), edited by `change(ds)`."""
    ds = pydicom.dcmread(source)
    if change is not None:
        change(ds)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian,
               little_endian=True)
    return target


def decision(session: Session, number: int):
    ident = classify_session(session)
    return next(d for d in ident.decisions if d.series_number == number)


# ------------------------------------------------------------------------ one SOP Instance UID, several files


def test_true_duplicates_count_once_whatever_transfer_syntax_they_were_written_in(tmp_path):
    series = write(tmp_path, 2, "MPRAGE", mr_volume())
    files = sorted(series.iterdir())
    copies = [edit_copy(files[0], tmp_path / "copy" / "a.dcm"),
              edit_copy(files[5], tmp_path / "copy" / "b.dcm", syntax=ImplicitVRLittleEndian)]
    images = images_of(series) + [DicomImage(p, read_header(p)) for p in copies]
    kept, conflicting = distinct_instances(images)
    assert (len(kept), conflicting) == (12, set())
    [built] = build_series(images)
    assert (built.header.num_images, built.header.conflicting_instances) == (12, 0)
    assert not set(copies) & set(built.files)


@pytest.mark.parametrize("change", [
    pytest.param(lambda ds: setattr(ds, "PixelData", bytes(len(ds.PixelData))), id="other-pixels"),
    pytest.param(lambda ds: setattr(ds, "ImagePositionPatient", [0.0, 0.0, 99.0]), id="other-position"),
    pytest.param(lambda ds: (setattr(ds, "PixelData", bytes(len(ds.PixelData))),
                             setattr(ds, "InstanceNumber", 99)), id="other-pixels-and-number"),
])
def test_different_images_under_one_uid_in_one_series_are_kept_flagged_and_never_used(tmp_path, change, caplog):
    series = write(tmp_path, 2, "MPRAGE", mr_volume())
    files = sorted(series.iterdir())
    odd = edit_copy(files[3], tmp_path / "odd" / "x.dcm", change)
    images = images_of(series) + [DicomImage(odd, read_header(odd))]
    [built] = build_series(images)
    assert odd in built.files and len(built.files) == 13  # nothing merged away
    assert built.header.conflicting_instances == 1
    assert "series 2 'MPRAGE': 1 SOP Instance UID(s) each held by different images" in caplog.text
    session = Session(series=[built], study_uid=built.header.study_uid, root=tmp_path)
    d = decision(session, 2)
    assert d.role == "other"
    assert any("1 SOP Instance UID(s) each held by different images" in r and "inconsistent export" in r
               for r in d.reasons), d.reasons
    with pytest.raises(InputError, match="cannot be used as pre-contrast T1"):
        classify_session(session, pins=(("t1n", "2"),))


def test_an_anonymiser_that_gave_every_image_one_uid_loses_no_image(tmp_path):
    series = write(tmp_path, 2, "MPRAGE", mr_volume())
    uid = generate_uid()
    for f in sorted(series.iterdir()):
        edit_copy(f, f, lambda ds: setattr(ds, "SOPInstanceUID", uid))
    [built] = build_series(images_of(series))
    assert (built.header.num_images, built.header.conflicting_instances) == (12, 1)
    assert decision(Session([built], built.header.study_uid, tmp_path), 2).role == "other"


@pytest.mark.parametrize("same_label", [False, True])
def test_one_uid_in_two_series_is_refused_naming_both(tmp_path, same_label):
    first = write(tmp_path, 2, "MPRAGE", mr_volume())
    second = tmp_path / "copy"
    new_series = generate_uid()

    def reseries(ds):
        ds.SeriesInstanceUID = new_series
        if not same_label:
            ds.SeriesNumber, ds.SeriesDescription = 12, "MPRAGE copy"

    for f in sorted(first.iterdir())[:3]:
        edit_copy(f, second / f.name, reseries)
    with pytest.raises(InputError) as err:
        build_series(images_of(first, second))
    message = err.value.message
    assert "3 image(s) in both series 2 'MPRAGE' and series " in message
    assert ("series 12 'MPRAGE copy'" in message) != same_label
    assert ("two different series under one label" in message) == same_label
    assert "leave out the copied" in err.value.hint
    assert STUDY.patient_id not in message


def test_files_without_a_sop_instance_uid_are_never_compared(tmp_path):
    series = write(tmp_path, 2, "MPRAGE", mr_volume())
    images = images_of(series)
    for image in images[:2]:
        del image.ds.SOPInstanceUID
    kept, conflicting = distinct_instances(images)
    assert (len(kept), conflicting) == (12, set())


def test_ingest_refuses_one_uid_in_two_series(tmp_path):
    first = write(tmp_path / "in", 2, "MPRAGE", mr_volume())
    new_series = generate_uid()
    for f in sorted(first.iterdir())[:2]:
        edit_copy(f, tmp_path / "in" / "copy" / f.name,
                  lambda ds: (setattr(ds, "SeriesInstanceUID", new_series), setattr(ds, "SeriesNumber", 12)))
    with pytest.raises(InputError, match=r"2 image\(s\) in both series 2 'MPRAGE' and series 12 'MPRAGE'"):
        ingest(tmp_path / "in", tmp_path / "work")


def test_ingest_keeps_and_rejects_a_series_with_different_images_under_one_uid(tmp_path):
    series = write(tmp_path / "in", 2, "MPRAGE", mr_volume())
    edit_copy(sorted(series.iterdir())[4], tmp_path / "in" / "zz" / "odd.dcm",
              lambda ds: setattr(ds, "PixelData", bytes(len(ds.PixelData))))
    session = ingest(tmp_path / "in", tmp_path / "work")
    assert [(s.header.num_images, s.header.conflicting_instances) for s in session.series] == [(13, 1)]
    assert decision(session, 2).role == "other"


def test_ingest_counts_a_copy_of_a_session_once(tmp_path):
    series = write(tmp_path / "in" / "a", 2, "MPRAGE", mr_volume())
    shutil.copytree(series, tmp_path / "in" / "b")
    session = ingest(tmp_path / "in", tmp_path / "work")
    assert [(s.header.num_images, s.header.conflicting_instances) for s in session.series] == [(12, 0)]
    assert decision(session, 2).role == "t1n"


# ------------------------------------------------------------------------------ pixel content: label maps


def label_volume(values=(0, 1), slices: int = 12, size: int = 16) -> np.ndarray:
    """A blob labelled with `values[1:]` in nested shells (the last innermost) on `values[0]` background."""
    z, y, x = np.mgrid[:slices, :size, :size]
    distance = np.sqrt(((z - slices / 2) * 1.5) ** 2 + (y - size / 2) ** 2 + (x - size / 2) ** 2)
    shell = len(values) - 1 - (distance / 9 * (len(values) - 1)).astype(int)
    return np.asarray(values, np.float32)[np.clip(shell, 0, len(values) - 1)]


@pytest.mark.parametrize("values", [(0, 1), (0, 255), (0, 1000), (0, 1, 2, 4), (0, 1, 2, 3, 4, 5, 6, 7)],
                         ids=lambda v: "-".join(map(str, v)))
def test_a_label_map_with_original_primary_headers_is_never_a_sequence(tmp_path, values):
    write(tmp_path / "in", 2, "t1_mprage_sag", mr_volume(), minutes=1)
    write(tmp_path / "in", 3, "t1_mprage_sag", label_volume(values), minutes=2)  # a mask saved as the T1
    session = ingest(tmp_path / "in", tmp_path / "work")
    by_number = {s.header.series_number: s.header for s in session.series}
    assert by_number[2].pixel_values > 100
    assert by_number[3].pixel_values == len(values)
    d = decision(session, 3)
    assert d.role == "other"
    assert (f"pixel values look like a label map ({len(values)} distinct values in the sampled slices): a mask, "
            "ROI or segmentation, not an MR image") in d.reasons
    assert decision(session, 2).role == "t1n"
    with pytest.raises(InputError, match="label map"):
        classify_session(session, pins=(("t1n", "3"),))


def test_a_label_map_is_found_even_when_some_sampled_slices_are_empty(tmp_path):
    array = np.zeros((40, 16, 16), np.float32)
    array[5:9, 4:12, 4:12] = 1  # a small lesion far from the middle slice
    array[6:8, 6:10, 6:10] = 2
    write(tmp_path, 2, "Ax T1 +C", array)
    [built] = build_series(images_of(tmp_path / "02"))
    assert built.header.pixel_values == 3


@pytest.mark.parametrize("array, expected", [
    (np.full((12, 16, 16), 300, np.float32), 1),  # blank: not a label map (tests write headers-only stand-ins)
    (np.stack([np.full((16, 16), 100 + k, np.float32) for k in range(12)]), 1),  # flat slices, each its value
    (np.zeros((12, 16, 16), np.float32), 1),
])
def test_flat_images_are_not_called_label_maps(tmp_path, array, expected):
    write(tmp_path, 2, "t1_mprage_sag", array)
    [built] = build_series(images_of(tmp_path / "02"))
    assert built.header.pixel_values == expected
    assert decision(Session([built], built.header.study_uid, tmp_path), 2).role == "t1n"


def test_many_valued_segmentations_and_real_images_are_told_apart_by_the_count(tmp_path):
    write(tmp_path, 2, "seg", label_volume(tuple(range(0, 10))))  # 10 labels: above the threshold
    [built] = build_series(images_of(tmp_path / "02"))
    assert built.header.pixel_values > 8


def test_unreadable_pixels_leave_the_content_unknown(tmp_path):
    series = write(tmp_path, 2, "t1_mprage_sag", label_volume())
    for f in sorted(series.iterdir()):
        edit_copy(f, f, lambda ds: setattr(ds, "PixelData", ds.PixelData[:10]))
    assert sampled_pixel_values([(f, 1) for f in sorted(series.iterdir())]) is None
    assert sampled_pixel_values([]) is None


def test_multi_frame_objects_are_sampled_by_frame(tmp_path):
    frames = label_volume((0, 3, 9)).astype(np.uint16)
    ds = dicom_dataset(pixels=frames[0], SeriesInstanceUID=generate_uid(), Modality="MR")
    ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.tobytes()
    path = write_dicom(ds, tmp_path / "mf.dcm")
    assert sampled_pixel_values([(path, len(frames))]) == 3
    noisy = mr_volume().astype(np.uint16)
    ds.PixelData = noisy.tobytes()
    write_dicom(ds, path)
    assert sampled_pixel_values([(path, len(noisy))]) > 100


def test_a_header_alone_says_nothing_about_pixel_content(tmp_path):
    series = write(tmp_path, 2, "t1_mprage_sag", label_volume())
    header = series_header(read_header(sorted(series.iterdir())[0]))
    assert (header.pixel_values, header.conflicting_instances) == (None, 0)


# ---------------------------------------------------------------- derived and map ImageTypes, ORIGINAL claimed


def header(number: int, image_type: tuple[str, ...], **kw) -> SeriesHeader:
    base = dict(
        series_uid=f"1.2.3.{number}", series_number=number, description="t1_mprage_sag", protocol="", modality="MR",
        manufacturer="SIEMENS", model="Skyra", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", repetition_time=2300.0,
        echo_time=2.3, inversion_time=900.0, flip_angle=8.0, scanning_sequence=("GR", "IR"),
        sequence_variant=("SK", "SP", "MP"), sequence_name="*tfl3d1_16ns", scan_options=(), mr_acquisition_type="3D",
        image_type=image_type, contrast_agent="", contrast_ingredient="", acquisition_time=36000.0 + 60 * number,
        num_images=176, slice_thickness=1.0, pixel_spacing=(1.0, 1.0), orientation=(1.0, 0, 0, 0, 1.0, 0),
        rows=256, columns=256, study_uid="1.2.3", frame_of_reference_uid="1.2.3.0")
    return SeriesHeader(**{**base, **kw})


def classify_one(h: SeriesHeader):
    return classify_session(Session([Series(h, [])], "1.2.3", Path("."))).decisions[0]


@pytest.mark.parametrize("image_type, words", [
    (("ORIGINAL", "PRIMARY", "M", "SUBTRACTION"), "ImageType SUBTRACTION"),
    (("ORIGINAL", "PRIMARY", "T1", "SUBTRACTION"), "ImageType SUBTRACTION"),
    (("ORIGINAL", "PRIMARY", "M", "MPR"), "ImageType MPR"),
    (("ORIGINAL", "PRIMARY", "PROJECTION IMAGE"), "ImageType PROJECTION IMAGE"),
    (("ORIGINAL", "PRIMARY", "T1", "MAXIMUM"), "ImageType MAXIMUM"),
    (("ORIGINAL", "PRIMARY", "T1", "T1_MAP"), "ImageType T1_MAP"),
    (("ORIGINAL", "PRIMARY", "T2 MAP"), "ImageType T2 MAP"),
    (("ORIGINAL", "PRIMARY", "M", "ADC"), "diffusion"),
    (("ORIGINAL", "PRIMARY", "M", "FA"), "diffusion"),
    (("ORIGINAL", "PRIMARY", "M", "RCBV"), "perfusion"),
    (("ORIGINAL", "PRIMARY", "M", "CBF"), "perfusion"),
    (("DERIVED", "PRIMARY", "M", "ND"), "derived"),
])
def test_maps_subtractions_and_reformats_never_take_a_role(image_type, words):
    d = classify_one(header(1, image_type))
    assert d.role == "other", d.reasons
    assert any(words in r for r in d.reasons), d.reasons


@pytest.mark.parametrize("pixel_values, role", [(None, "t1n"), (1, "t1n"), (2, "other"), (8, "other"), (9, "t1n"),
                                                (4000, "t1n")])
def test_the_label_map_rule_on_its_count(pixel_values, role):
    d = classify_one(header(1, ("ORIGINAL", "PRIMARY", "M", "ND"), pixel_values=pixel_values))
    assert d.role == role, d.reasons


def test_acquired_image_types_stay_usable():
    for image_type in (("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), ("ORIGINAL", "PRIMARY", "T1", "NONE"),
                       ("ORIGINAL", "PRIMARY", "OTHER")):
        assert classify_one(header(1, image_type)).role == "t1n", image_type
