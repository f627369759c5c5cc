"""Shared by the hostile-input catalogue (tests/hostile/), the PHI and fuzz tests: a tiny four-sequence session
whose headers carry sentinel patient identifiers, the ways of damaging it (edited headers, hostile zips), and the
checks every failed run must pass."""
from __future__ import annotations

import re
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from pedseg.synth.dicom_writer import StudyInfo, write_series
from pedseg.synth.protocols import Protocol, session_protocols

# Patient identifiers no log line, message or text output may ever show.
SENTINELS = {
    "PatientName": "ZZPHINAME^SENTINELA",
    "PatientID": "ZZPHIID8841",
    "PatientBirthDate": "19770707",
    "AccessionNumber": "ZZPHIACC5523",
    "InstitutionName": "ZZPHI Sentinel Childrens Hospital",
}
STUDY = StudyInfo(SENTINELS["PatientName"], SENTINELS["PatientID"], SENTINELS["PatientBirthDate"], "F", "006Y",
                  "1.2.826.0.1.3680043.8.498.771", "1.2.826.0.1.3680043.8.498.772", "20240611", 9 * 3600.0,
                  SENTINELS["AccessionNumber"], "SIEMENS", "Skyra")
PROTOCOLS = {p.role: p for p in session_protocols("SIEMENS")}  # loc, t1n, t2w, t2f, dwi, t1c
NUMBERS = {"loc": 1, "t1n": 2, "t2w": 3, "t2f": 4, "dwi": 5, "t1c": 6}
_AXES = {"ax": ((1, 0, 0), (0, 1, 0), (0, 0, 1)), "cor": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
         "sag": ((0, 1, 0), (0, 0, -1), (-1, 0, 0))}


def tiny_volume(plane: str = "ax", spacing=(1.0, 1.0, 1.0), slices: int = 12, size: int = 16) -> sitk.Image:
    """A small random stack (headers and geometry are what these tests exercise, not anatomy)."""
    array = np.random.default_rng(slices).uniform(50, 500, (slices, size, size)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetDirection(tuple(np.array(_AXES[plane], float).T.flatten()))
    image.SetSpacing(tuple(float(v) for v in spacing))
    return image


def protocol_volumes(proto: Protocol) -> list[sitk.Image]:
    if proto.geometry is None:  # three-plane localizer
        return [tiny_volume(plane, (1.5, 1.5, 8.0), slices=3) for plane in ("ax", "cor", "sag")]
    g = proto.geometry
    return [tiny_volume(g.plane, (g.in_plane_mm, g.in_plane_mm, g.slice_spacing_mm))]


def write_role(folder: Path, role: str, *, volumes: list[sitk.Image] | None = None, study: StudyInfo = STUDY,
               number: int | None = None, extra: dict | None = None, **proto_changes) -> Path:
    """Write one series of the session into folder/<role>/ and return that folder."""
    proto = replace(PROTOCOLS[role], **proto_changes)
    volumes = volumes or protocol_volumes(proto)
    extras = [{"InstitutionName": SENTINELS["InstitutionName"], **(extra or {})} for _ in volumes]
    write_series(volumes, proto, study, number or NUMBERS[role], folder / role, extras)
    return folder / role


def write_session(folder: Path, roles=tuple(NUMBERS)) -> Path:
    for role in roles:
        write_role(folder, role)
    return folder


def copy_session(template: Path, folder: Path, *, without=()) -> Path:
    shutil.copytree(template, folder, ignore=shutil.ignore_patterns(*without))
    return folder


def phi_found(text: str) -> list[str]:
    """The sentinel identifiers (or their parts) present in `text`."""
    parts = {v for value in SENTINELS.values() for v in (value, *value.split("^"))}
    return sorted(p for p in parts if p.lower() in text.lower())


def text_files(folder: Path) -> dict[Path, str]:
    """Every log, text, JSON and CSV file under folder."""
    return {p: p.read_text(errors="replace") for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in (".txt", ".log", ".json", ".csv", ".md", ".tsv")}


# ------------------------------------------------------------------------------ damaging a session


def edit_files(folder: Path, change) -> None:
    """Apply change(ds, index) to every file of one series folder, in instance order."""
    for index, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        change(ds, index)
        ds.save_as(path)


def zip_tree(folder: Path, archive: Path, *, prefix: str = "",
             extra: dict[zipfile.ZipInfo | str, bytes] | None = None) -> Path:
    """A zip of every file under `folder`, its entry names under `prefix`, plus `extra` entries."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
        for info, data in (extra or {}).items():
            zf.writestr(info, data)
    return archive


def flywheel_download(template: Path, tmp: Path, *, inner_name="{role}.dicom.zip", extra=None,
                      roles=("t1n", "t1c", "t2w", "t2f")) -> Path:
    """A session zip as Flywheel writes it: one zip of DICOM files per acquisition."""
    (tmp / "acq").mkdir(parents=True)
    with zipfile.ZipFile(tmp / "session.zip", "w", zipfile.ZIP_STORED) as zf:
        for role in roles:
            inner = zip_tree(template / role, tmp / "acq" / f"{role}.zip", prefix=f"{role}/")
            zf.write(inner, f"SUBJ/SESSION/{role}/files/{inner_name.format(role=role)}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return tmp / "session.zip"


def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    return info


def mark_encrypted(archive: Path, name: str) -> Path:
    """Set the 'encrypted' flag of one entry (zipfile cannot write encrypted entries) in its local header (flags at
    offset 6, name at 30) and its central-directory header (flags at 8, name at 46)."""
    data = bytearray(archive.read_bytes())
    found = [m.start() for m in re.finditer(re.escape(name.encode()), data)]
    for at, signature, flags, name_offset in ((found[0], b"PK\x03\x04", 6, 30), (found[-1], b"PK\x01\x02", 8, 46)):
        assert data[at - name_offset: at - name_offset + 4] == signature
        data[at - name_offset + flags] |= 0x1
    archive.write_bytes(bytes(data))
    return archive


def raising(exc: BaseException):
    """A stand-in for a pipeline function: raises `exc` whatever it is given."""
    def fail(*args, **kwargs):
        raise exc
    return fail
