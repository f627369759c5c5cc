"""Hostile archives: zips that would write outside their folder, fill the disk or cannot be read; archives inside
archives (a Flywheel session download is a zip of per-acquisition zips) and zips inside plain input folders,
all unpacked one level deep under one budget."""
from __future__ import annotations

import errno
import gzip
import zipfile

import pedseg.pipeline.archive as archive_module
from pedseg.pipeline.errors import InputError, ResourceError

from catalogue import accepted, refused
from hostile_support import (
    copy_session,
    flywheel_download,
    mark_encrypted,
    raising,
    symlink_entry,
    zip_tree,
)

FOUR = (2, 3, 4, 6)  # the series numbers of t1n, t2w, t2f and t1c: what a Flywheel download of them holds


# ------------------------------------------------------------------------------ one zip given as the input


@refused(InputError, "climbs out")
def zip_path_traversal(tmp, template, mp):
    return zip_tree(template, tmp / "in.zip", extra={"t1n/../../../escape.dcm": b"x"})


@refused(InputError, "has an absolute path")
def zip_absolute_path(tmp, template, mp):
    return zip_tree(template, tmp / "in.zip", extra={"/tmp/pedseg-escape.dcm": b"x"})


@refused(InputError, "'t1n/link.dcm' is a symbolic link")
def zip_symlink(tmp, template, mp):
    return zip_tree(template, tmp / "in.zip", extra={symlink_entry("t1n/link.dcm"): b"/etc/passwd"})


@refused(InputError, "'zeros.dcm' expands", "zip bomb")
def zip_bomb_ratio(tmp, template, mp):
    return zip_tree(template, tmp / "in.zip", extra={"zeros.dcm": bytes(20 * 1024**2)})


@refused(InputError, "allowed for one session")
def zip_over_total_size(tmp, template, mp):
    mp.setattr(archive_module, "MAX_UNPACKED_BYTES", 50_000)
    return zip_tree(template, tmp / "in.zip")


@refused(InputError, "entries, more than the 20 allowed")
def zip_too_many_entries(tmp, template, mp):
    mp.setattr(archive_module, "MAX_ARCHIVE_ENTRIES", 20)
    return zip_tree(template, tmp / "in.zip")


@refused(InputError, "'t1n/secret.dcm' is password-protected")
def zip_password_protected(tmp, template, mp):
    return mark_encrypted(zip_tree(template, tmp / "in.zip", extra={"t1n/secret.dcm": b"x"}), "t1n/secret.dcm")


@refused(InputError, "'in.zip' cannot be read as a zip file")
def zip_corrupt(tmp, template, mp):
    (tmp / "in.zip").write_bytes(b"PK\x03\x04" + bytes(200))
    return tmp / "in.zip"


@refused(InputError, "gzip file 'bomb.dcm.gz' expands beyond its allowed size")
def gzip_bomb(tmp, template, mp):
    copy_session(template, tmp / "in")
    with gzip.open(tmp / "in" / "bomb.dcm.gz", "wb") as fh:
        fh.write(bytes(128) + b"DICM" + bytes(20 * 1024**2))
    return tmp / "in"


@refused(ResourceError, "The disk is full: unpacking 'in.zip' failed")
def disk_full_while_unpacking(tmp, template, mp):
    mp.setattr(archive_module, "_copy_limited", raising(OSError(errno.ENOSPC, "No space left on device")))
    return zip_tree(template, tmp / "in.zip")


# ------------------------------------------------------------------------------ archives inside an archive


@accepted(series=FOUR)
def zip_of_per_acquisition_zips(tmp, template, mp):
    return flywheel_download(template, tmp)


@accepted(series=FOUR)
def zip_of_per_acquisition_zips_without_extension(tmp, template, mp):  # found by content, not by name
    return flywheel_download(template, tmp, inner_name="{role}")


@accepted(series=FOUR)
def zip_mixing_inner_zips_and_plain_files(tmp, template, mp):
    with zipfile.ZipFile(tmp / "mixed.zip", "w") as zf:
        for role in ("t1n", "t1c"):
            zf.write(zip_tree(template / role, tmp / f"{role}.zip"), f"{role}.zip")
        for role in ("t2w", "t2f"):
            for path in sorted((template / role).iterdir()):
                zf.write(path, f"{role}/{path.name}")
    return tmp / "mixed.zip"


@refused(InputError, "No DICOM images in the input 'wrapper.zip' (4 files, none of them DICOM; left out: ",
         "left out: 'SUBJ/SESSION/t1n/files/t1n.dicom.zip' in 'fw/session.zip' inside 'wrapper.zip', ",
         stage="ingest")
def archives_nested_two_levels_deep(tmp, template, mp):
    (tmp / "fw").mkdir()
    with zipfile.ZipFile(tmp / "wrapper.zip", "w") as zf:  # a Flywheel download zipped once more
        zf.write(flywheel_download(template, tmp / "fw"), "fw/session.zip")
    return tmp / "wrapper.zip"


def _download_with_bad_inner(entry: str, data: bytes):
    def build(tmp, template, mp):
        with zipfile.ZipFile(tmp / "bad.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(entry, data)
        return flywheel_download(template, tmp, roles=("t1n", "t1c", "t2w"),
                                 extra={"SUBJ/SESSION/t2f/files/bad.zip": (tmp / "bad.zip").read_bytes()})
    return build


INNER = "in 'SUBJ/SESSION/t2f/files/bad.zip' inside 'session.zip'"
refused(InputError, f"'../../escape.dcm' {INNER} climbs out", stage="ingest",
        name="inner_zip_path_traversal")(_download_with_bad_inner("../../escape.dcm", b"x"))
refused(InputError, f"'/abs.dcm' {INNER} has an absolute path", stage="ingest",
        name="inner_zip_absolute_path")(_download_with_bad_inner("/abs.dcm", b"x"))
refused(InputError, f"'zeros.dcm' {INNER} expands", stage="ingest",
        name="inner_zip_bomb_ratio")(_download_with_bad_inner("zeros.dcm", bytes(20 * 1024**2)))


@refused(InputError, "The archive 'SUBJ/SESSION/x/files/broken.zip' inside 'session.zip' cannot be read as a zip "
         "file", stage="ingest")
def inner_zip_corrupt(tmp, template, mp):
    return flywheel_download(template, tmp, extra={"SUBJ/SESSION/x/files/broken.zip": b"PK\x03\x04" + bytes(64)})


# ------------------------------------------------------------------------------ zips inside an input folder


def _zipped_roles(template, folder, roles, *, loose=()):
    """`folder` holding one zip per role of `roles` and the loose files of the roles in `loose`."""
    folder.mkdir(parents=True)
    for role in roles:
        zip_tree(template / role, folder / f"{role}.zip", prefix=f"{role}/")
    for role in loose:
        copy_session(template / role, folder / role)
    return folder


@accepted()
def folder_of_acquisition_zips(tmp, template, mp):
    return _zipped_roles(template, tmp / "in", ("loc", "t1n", "t1c", "t2w", "t2f", "dwi"))


@accepted()
def folder_of_zips_beside_loose_files(tmp, template, mp):
    return _zipped_roles(template, tmp / "in", ("t1n", "t1c"), loose=("loc", "t2w", "t2f", "dwi"))


@accepted(series=FOUR)
def folder_holding_a_session_download(tmp, template, mp):  # the download's inner zips: one level below it
    (tmp / "in" / "downloads").mkdir(parents=True)
    flywheel_download(template, tmp / "in" / "downloads")
    (tmp / "in" / "downloads" / "acq").rename(tmp / "acq")  # only the session zip stays in the input
    return tmp / "in"


@accepted()
def folder_with_a_zip_that_is_not_dicom(tmp, template, mp):
    copy_session(template, tmp / "in")
    with zipfile.ZipFile(tmp / "in" / "reports.zip", "w") as zf:
        zf.writestr("referral.txt", "scan notes")
        zf.writestr("key_image.jpg", b"\xff\xd8\xff\xe0" + bytes(500))
    return tmp / "in"


@refused(InputError, "No DICOM images in the input 'in' (3 files, none of them DICOM).", stage="ingest")
def folder_with_only_a_zip_that_is_not_dicom(tmp, template, mp):
    (tmp / "in").mkdir()
    (tmp / "in" / "README.txt").write_text("scan notes")
    with zipfile.ZipFile(tmp / "in" / "reports.zip", "w") as zf:
        zf.writestr("referral.txt", "scan notes")
        zf.writestr("key_image.jpg", b"\xff\xd8\xff\xe0" + bytes(500))
    return tmp / "in"


@refused(InputError, "The archive 'acq/t1n.zip' in the input 'in' cannot be read as a zip file",
         hint="Re-create the archive")
def folder_with_a_corrupt_zip(tmp, template, mp):
    folder = _zipped_roles(template, tmp / "in", (), loose=("loc", "t1c", "t2w", "t2f", "dwi"))
    (folder / "acq").mkdir()
    (folder / "acq" / "t1n.zip").write_bytes(b"PK\x03\x04" + bytes(200))
    return folder


@refused(InputError, "The archive 't1c.zip' in the input 'in' cannot be read as a zip file", stage="ingest")
def folder_with_a_truncated_zip(tmp, template, mp):  # a download cut short
    folder = _zipped_roles(template, tmp / "in", ("t1c",), loose=("t1n", "t2w", "t2f"))
    whole = (folder / "t1c.zip").read_bytes()
    (folder / "t1c.zip").write_bytes(whole[: len(whole) // 2])
    return folder


@refused(InputError, "'../escape.dcm' in 'evil.zip' in the input 'in' climbs out", stage="ingest")
def folder_with_a_zip_that_climbs_out(tmp, template, mp):
    copy_session(template, tmp / "in")
    with zipfile.ZipFile(tmp / "in" / "evil.zip", "w") as zf:
        zf.writestr("../escape.dcm", b"x")
    return tmp / "in"


@refused(InputError, "'zeros.dcm' in 'acq/t2f.zip' in the input 'in' expands", "zip bomb", stage="ingest")
def folder_with_a_zip_bomb(tmp, template, mp):
    folder = _zipped_roles(template, tmp / "in", ("t1n",), loose=("t1c", "t2w"))
    (folder / "acq").mkdir()
    zip_tree(template / "t2f", folder / "acq" / "t2f.zip", extra={"zeros.dcm": bytes(20 * 1024**2)})
    return folder


@refused(InputError, "'t1n.zip' in the input 'in' would unpack to", "with the archives unpacked before it",
         "allowed for one session", stage="ingest")
def folder_of_zips_over_the_size_limit_together(tmp, template, mp):
    folder = _zipped_roles(template, tmp / "in", ("t1c", "t1n"), loose=("t2w", "t2f"))
    one = max(sum(i.file_size for i in zipfile.ZipFile(z).infolist()) for z in folder.glob("*.zip"))
    mp.setattr(archive_module, "MAX_UNPACKED_BYTES", int(one * 1.5))  # each zip fits, the two together do not
    return folder
