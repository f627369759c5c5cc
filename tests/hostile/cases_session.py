"""Hostile sessions through `pedseg run`: nothing usable, two patients or studies, incomplete or uneven series,
missing sequences, odd descriptions, leftovers of a killed run."""
from __future__ import annotations

from dataclasses import replace

import pydicom
import pytest

from pedseg.pipeline.errors import InputError, MissingSequenceError, UnsupportedDataError
from pedseg.pipeline.identify_rules import ROLE_NAMES

from catalogue import refused
from hostile_support import NUMBERS, PROTOCOLS, SENTINELS, STUDY, copy_session, edit_files, tiny_volume, write_role

LABELS = {role: f"series {NUMBERS[role]} '{PROTOCOLS[role].description}'" for role in NUMBERS}


@refused(InputError, "no files at all")
def empty_folder(tmp, template, mp):
    (tmp / "in").mkdir()
    return tmp / "in"


@refused(InputError, "2 files, none of them DICOM")
def not_dicom(tmp, template, mp):
    (tmp / "in").mkdir()
    (tmp / "in" / "README.txt").write_text("scan notes")
    (tmp / "in" / "key_image.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(500))
    return tmp / "in"


@refused(InputError, "1 DICOM files, none of them a readable image")
def dicom_without_images(tmp, template, mp):
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: DICOM, but no image
    ds.SOPInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.PatientName = SENTINELS["PatientName"]
    (tmp / "in").mkdir()
    ds.save_as(tmp / "in" / "report.dcm", implicit_vr=True, little_endian=True)
    return tmp / "in"


@refused(InputError, "The input 'nowhere' does not exist")
def input_does_not_exist(tmp, template, mp):
    return tmp / "nowhere"


@refused(InputError, "2 different studies", LABELS["t2f"])
def two_studies(tmp, template, mp):
    copy_session(template, tmp / "in", without=["t2f"])
    write_role(tmp / "in", "t2f", study=replace(STUDY, study_uid="1.2.826.0.1.3680043.8.498.773"))
    return tmp / "in"


@refused(InputError, "2 different patients", f"patient 2: {LABELS['t2f']}")
def two_patients(tmp, template, mp):
    copy_session(template, tmp / "in", without=["t2f"])
    write_role(tmp / "in", "t2f", study=replace(STUDY, patient_id=SENTINELS["PatientID"] + "B"))
    return tmp / "in"


@refused(InputError, f"{LABELS['t2w']} is incomplete: 1 slice(s) missing")
def missing_slice(tmp, template, mp):
    copy_session(template, tmp / "in")
    (tmp / "in" / "t2w" / "IM00006.dcm").unlink()
    return tmp / "in"


@refused(InputError, f"{LABELS['t1c']} is incomplete: 1 slice(s) missing")
def truncated_file_among_good_ones(tmp, template, mp):
    copy_session(template, tmp / "in")
    path = tmp / "in" / "t1c" / "IM00006.dcm"
    path.write_bytes(path.read_bytes()[:-300])
    return tmp / "in"


@refused(InputError, f"{LABELS['t2f']} is incomplete: 1 slice(s) missing")
def missing_pixel_data(tmp, template, mp):
    copy_session(template, tmp / "in")
    edit_files(tmp / "in" / "t2f", lambda ds, i: delattr(ds, "PixelData") if i == 5 else None)
    return tmp / "in"


@refused(UnsupportedDataError, f"{LABELS['t2w']} has uneven slice spacing (4.00 to 5.50 mm")
def uneven_slice_spacing(tmp, template, mp):
    copy_session(template, tmp / "in")

    def shift(ds, index):  # 4 mm slices, the upper half 1.5 mm further up
        if index >= 6:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 1.5]
    edit_files(tmp / "in" / "t2w", shift)
    return tmp / "in"


def _missing(role: str):
    def build(tmp, template, mp):
        return copy_session(template, tmp / "in", without=[role])
    return build


for _role in ("t1n", "t1c", "t2w", "t2f"):
    refused(MissingSequenceError, f"Required sequence(s) missing: {ROLE_NAMES[_role]}.", LABELS["dwi"],
            name=f"missing_{_role}")(_missing(_role))


@refused(MissingSequenceError, ", ".join(ROLE_NAMES[r] for r in ("t1n", "t1c", "t2w", "t2f")),
         f"{LABELS['dwi']} → other")
def all_four_missing(tmp, template, mp):
    return copy_session(template, tmp / "in", without=["t1n", "t1c", "t2w", "t2f"])


@refused(MissingSequenceError, f"{LABELS['loc']} part ax → other", "localizer / scout")
def only_localizers(tmp, template, mp):
    return copy_session(template, tmp / "in", without=["t1n", "t1c", "t2w", "t2f", "dwi"])


@refused(MissingSequenceError, f"{LABELS['t1n']} → other", "2 temporal positions: a 4D time series")
def four_d_series(tmp, template, mp):
    copy_session(template, tmp / "in", without=["t1n"])
    write_role(tmp / "in", "t1n", volumes=[tiny_volume("sag"), tiny_volume("sag")])
    return tmp / "in"


DESCRIPTION = "Ax FLAIR Großhirn 軸位 ñ " + "lang " * 80


@refused(MissingSequenceError, ROLE_NAMES["t2w"], f"series 4 '{DESCRIPTION.strip()}' → t2f",
         marks=(pytest.mark.filterwarnings("ignore:The value length:UserWarning"),))  # over-long, as written
def non_ascii_and_very_long_description(tmp, template, mp):
    copy_session(template, tmp / "in", without=["t2f", "t2w"])
    write_role(tmp / "in", "t2f", description=DESCRIPTION, extra={"SpecificCharacterSet": "ISO_IR 192"})
    return tmp / "in"


@refused(MissingSequenceError, ROLE_NAMES["t1c"])
def leftovers_of_a_killed_run(tmp, template, mp):
    stale = tmp / "out" / ".pedseg-staging-killed"
    stale.mkdir(parents=True)
    (stale / "measurements.json").write_text('{"half": ')
    (tmp / "out" / ".error.x1y2.partial.json").write_text("{")
    return copy_session(template, tmp / "in", without=["t1c"])
