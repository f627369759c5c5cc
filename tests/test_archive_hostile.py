"""Hostile input archives and folders (issue 20): a zip of per-acquisition zips (a Flywheel session download),
file system errors while unpacking or reading an input, and symbolic links inside an input folder. Each case ends
in the right session, or in an InputError (exit code 2) naming the entry, the problem and what to do; a full disk
stays a ResourceError (exit code 5).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

import pedseg.pipeline.archive as archive_module
import pedseg.pipeline.ingest as ingest_module
from pedseg.cli.main import main
from pedseg.pipeline.errors import InputError, ResourceError
from pedseg.pipeline.ingest import ingest

from factories import fake_bundle
from hostile_support import copy_session, flywheel_download, phi_found, write_session, zip_tree

ROLES = ("t1n", "t1c", "t2w", "t2f")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return write_session(tmp_path_factory.mktemp("template") / "dicom", roles=ROLES)


@pytest.fixture(scope="module")
def series_numbers(template, tmp_path_factory) -> list[int]:
    return _numbers(ingest(template, tmp_path_factory.mktemp("work")))


def _numbers(session) -> list[int]:
    return sorted(s.header.series_number for s in session.series)


@contextmanager
def no_hang(seconds: int = 60):
    """Fail instead of hanging (a symbolic link loop or a pipe must not block the walk)."""
    def stop(*_):
        raise TimeoutError("ingest hung")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(inputs, out: Path, tmp: Path, capsys) -> tuple[int, dict, str]:
    code = main(["run", *map(str, inputs), str(out), "--bundle", str(fake_bundle(tmp / "bundle")),
                 "--device", "cpu"])
    document = json.loads((out / "error.json").read_text(encoding="utf-8"))
    return code, document, capsys.readouterr().err


# ---------------------------------------------------------------------------- 1. nested archives
# Unpacked, refused two levels deep, inner archives meeting the outer one's checks: cases of the catalogue
# (tests/hostile/cases_archives.py). Here: the warning, the shared budget, a full disk.


def test_an_archive_nested_deeper_beside_real_series_is_only_warned_about(template, series_numbers, tmp_path,
                                                                          caplog):
    deep = zip_tree(template / "t1n", tmp_path / "deep.zip")
    with zipfile.ZipFile(tmp_path / "inner.zip", "w") as zf:
        zf.write(deep, "attachments/deep.zip")
    archive = zip_tree(template, tmp_path / "outer.zip", extra={"acq/inner.zip": (tmp_path / "inner.zip").read_bytes()})
    with caplog.at_level(logging.WARNING):
        session = ingest(archive, tmp_path / "work")
    assert _numbers(session) == series_numbers
    assert ("The archive 'attachments/deep.zip' in 'acq/inner.zip' inside 'outer.zip' is nested two levels deep: "
            "not unpacked." in caplog.text)


def test_the_size_limit_counts_outer_and_inner_archives_together(template, tmp_path, monkeypatch):
    archive = flywheel_download(template, tmp_path)
    outer_total = sum(i.file_size for i in zipfile.ZipFile(archive).infolist())
    monkeypatch.setattr(archive_module, "MAX_UNPACKED_BYTES", outer_total + 10_000)  # the outer one alone fits
    with pytest.raises(InputError) as raised:
        ingest(archive, tmp_path / "work")
    message = raised.value.message
    assert "inside 'session.zip' would unpack to" in message
    assert "with the archives unpacked before it), more than the 0 GB allowed for one session" in message
    assert raised.value.hint


def test_the_entry_limit_counts_outer_and_inner_archives_together(template, tmp_path, monkeypatch):
    archive = flywheel_download(template, tmp_path)
    monkeypatch.setattr(archive_module, "MAX_ARCHIVE_ENTRIES", 30)  # 4 outer entries, then 12 per inner zip
    with pytest.raises(InputError) as raised:
        ingest(archive, tmp_path / "work")
    assert raised.value.message == ("The archive 'SUBJ/SESSION/t2w/files/t2w.dicom.zip' inside 'session.zip' holds "
                                    "12 entries (40 with the archives unpacked before it), more than the 30 allowed.")


def test_a_full_disk_while_unpacking_an_inner_archive_is_a_resource_error(template, tmp_path, monkeypatch):
    archive = flywheel_download(template, tmp_path)
    copy = archive_module._copy_limited

    def fill_up(src, dst, limit, *, what):
        if " inside " in what:
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy(src, dst, limit, what=what)
    monkeypatch.setattr(archive_module, "_copy_limited", fill_up)
    with pytest.raises(ResourceError, match=r"The disk is full: unpacking '[^']+\.dicom\.zip' inside 'session\.zip'"):
        ingest(archive, tmp_path / "work")


# ----------------------------------------------------------------- 2. file system errors: InputError


@pytest.mark.parametrize("long_name", [
    "患者フォルダ" * 20 + "/",                          # 360 bytes of UTF-8 in one folder name
    "Größe-Übersicht-ñ-" * 12 + "/" + "é" * 140 + "/",  # two over-long names, one of them the file's folder
])
def test_very_long_non_ascii_names_in_a_zip_are_shortened_inside_the_work_folder(long_name, template,
                                                                                  series_numbers, tmp_path):
    archive = zip_tree(template, tmp_path / "long.zip", prefix=long_name)
    session = ingest(archive, tmp_path / "work")
    assert _numbers(session) == series_numbers
    for series in session.series:
        for path in series.files:
            assert path.resolve().is_relative_to((tmp_path / "work").resolve())
            assert all(len(part.encode()) <= 255 for part in path.parts)


def test_long_names_that_share_a_prefix_stay_distinct(tmp_path):
    names = ["ü" * 100 + "-a.dcm", "ü" * 100 + "-b.dcm"]
    with zipfile.ZipFile(tmp_path / "twins.zip", "w") as zf:
        for name in names:
            zf.writestr(name, name.encode())
    (tmp_path / "out").mkdir()
    written = archive_module.safe_extract(tmp_path / "twins.zip", tmp_path / "out")
    assert sorted(written.values()) == sorted(names)
    assert len({p.name for p in written}) == 2
    assert all(p.suffix == ".dcm" and p.read_bytes().decode() == written[p] for p in written)


def test_a_path_too_long_for_the_file_system_is_refused_by_name(template, tmp_path, capsys):
    deep = "/".join(["verzeichnis-" + "ä" * 40] * 45) + "/"  # each name fits, the whole path does not
    archive = zip_tree(template, tmp_path / "deep.zip", prefix=deep)
    code, document, stderr = run_cli([archive], tmp_path / "out", tmp_path, capsys)
    assert code == InputError.exit_code == 2
    assert "cannot be extracted: its path is too long for this file system" in document["message"]
    assert "verzeichnis-" in document["message"]
    assert document["hint"] == "Re-create the archive with shorter folder and file names."
    assert "Traceback" not in stderr


@pytest.mark.parametrize("entries, says", [
    ({"t1n": b"a file", "t1n/IM1.dcm": b"x"}, "'t1n/IM1.dcm' cannot be extracted: a file and a folder of the archive "
                                              "share its name"),
    ({"t1n/IM1.dcm/": b"", "t1n/IM1.dcm": b"x"}, "'t1n/IM1.dcm' cannot be extracted: a file and a folder"),
])
def test_a_file_and_a_folder_of_the_same_name_are_refused_by_name(entries, says, tmp_path):
    with zipfile.ZipFile(tmp_path / "clash.zip", "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    with pytest.raises(InputError) as raised:
        ingest(tmp_path / "clash.zip", tmp_path / "work")
    assert says in raised.value.message


@pytest.mark.parametrize("error, says, hint", [
    (PermissionError(errno.EACCES, "Permission denied"), "'t2w/IM00004.dcm' in the input 'in' cannot be read: "
                                                         "Permission denied.", "read access"),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), "'t2w/IM00004.dcm' in the input 'in' cannot be read: "
                                                        "Is a directory.", "readable"),
    (OSError(errno.EIO, "Input/output error"), "'t2w/IM00004.dcm' in the input 'in' cannot be read: Input/output "
                                               "error.", "readable"),
])
def test_a_file_that_cannot_be_read_is_refused_by_name(error, says, hint, template, tmp_path, monkeypatch, capsys):
    copy_session(template, tmp_path / "in")
    sniff = ingest_module._sniff

    def refuse(path):
        if path.name == "IM00004.dcm" and path.parent.name == "t2w":
            error.filename = str(path)
            raise error
        return sniff(path)
    monkeypatch.setattr(ingest_module, "_sniff", refuse)
    code, document, stderr = run_cli([tmp_path / "in"], tmp_path / "out", tmp_path, capsys)
    assert (code, document["exit_code"], document["error"]) == (2, 2, "bad_input")
    assert document["message"].endswith(says)
    assert hint in document["hint"]
    assert str(tmp_path) not in document["message"]  # named within the input, not by its full path
    assert not phi_found(stderr + json.dumps(document))


def test_a_file_that_vanishes_while_the_input_is_read_is_refused_by_name(template, tmp_path, monkeypatch):
    copy_session(template, tmp_path / "in")
    walk = ingest_module._walk

    def vanishing(root, where, skipped):
        for path in walk(root, where, skipped):
            if path.name == "IM00002.dcm" and path.parent.name == "t1c":
                path.unlink()
            yield path
    monkeypatch.setattr(ingest_module, "_walk", vanishing)
    with pytest.raises(InputError) as raised:
        ingest(tmp_path / "in", tmp_path / "work")
    assert raised.value.message.startswith("'t1c/IM00002.dcm' in the input 'in' disappeared while pedseg was reading")
    assert "nothing else moves or deletes the input" in raised.value.hint


@pytest.mark.parametrize("error, says", [
    (PermissionError(errno.EACCES, "Permission denied"), "'t2f' in the input 'in' cannot be read: Permission denied"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), "'t2f' in the input 'in' disappeared"),
])
def test_a_folder_that_cannot_be_listed_is_refused_by_name(error, says, template, tmp_path, monkeypatch):
    copy_session(template, tmp_path / "in")
    scandir = os.scandir

    def refuse(path):
        if Path(path).name == "t2f":
            error.filename = str(path)
            raise error
        return scandir(path)
    monkeypatch.setattr(ingest_module.os, "scandir", refuse)
    with pytest.raises(InputError) as raised:
        ingest(tmp_path / "in", tmp_path / "work")
    assert says in raised.value.message


def test_an_input_path_too_long_and_an_unreadable_zip_are_refused(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"The path of the input '(ß){200}' is too long"):
        ingest(tmp_path / ("ß" * 200), tmp_path / "work")
    (tmp_path / "locked.zip").write_bytes(b"PK\x05\x06" + bytes(18))

    def locked(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "locked.zip"))
    monkeypatch.setattr(archive_module.zipfile, "ZipFile", locked)
    with pytest.raises(InputError, match=r"The archive 'locked.zip' cannot be opened: Permission denied\.") as raised:
        ingest(tmp_path / "locked.zip", tmp_path / "work")
    assert "may read it" in raised.value.hint


@pytest.mark.parametrize("error, expected, says", [
    (PermissionError(errno.EACCES, "Permission denied"), InputError,
     "The file 'IM1.dcm.gz' in the input 'in' cannot be decompressed: Permission denied."),
    (OSError(errno.ENOSPC, "No space left on device"), ResourceError,
     "The disk is full: decompressing 'IM1.dcm.gz' failed"),
])
def test_a_gzip_file_that_cannot_be_decompressed(error, expected, says, tmp_path, monkeypatch):
    import gzip

    (tmp_path / "in").mkdir()
    with gzip.open(tmp_path / "in" / "IM1.dcm.gz", "wb") as fh:
        fh.write(bytes(128) + b"DICM" + bytes(100))
    real_open, calls = gzip.open, []

    def failing(path, *args, **kwargs):  # the first open is ingest's look inside; the second decompresses
        calls.append(path)
        if len(calls) > 1:
            raise error
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(gzip, "open", failing)
    with pytest.raises(expected) as raised:
        ingest(tmp_path / "in", tmp_path / "work")
    assert says in raised.value.message


# ------------------------------------------------------------------------------- 3. symbolic links


def test_a_link_to_a_file_outside_the_input_is_skipped_with_a_warning(template, series_numbers, tmp_path, caplog):
    copy_session(template, tmp_path / "in")
    (tmp_path / "elsewhere").mkdir()
    outside = copy_session(template / "t2w", tmp_path / "elsewhere" / "other")
    (tmp_path / "in" / "t1n" / "stray.dcm").symlink_to(outside / "IM00001.dcm")
    (tmp_path / "in" / "other_patient").symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.WARNING), no_hang():
        session = ingest(tmp_path / "in", tmp_path / "work")
    assert _numbers(session) == series_numbers
    assert not any(f.is_relative_to(tmp_path / "elsewhere") or f.resolve().is_relative_to(tmp_path / "elsewhere")
                   for s in session.series for f in s.files)
    for link in ("t1n/stray.dcm", "other_patient"):
        assert f"The symbolic link '{link}' in the input 'in' points outside the input folder: skipped." in caplog.text


def test_an_input_of_only_outside_links_names_them_in_the_refusal(template, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t1n").symlink_to(template / "t1n", target_is_directory=True)
    with pytest.raises(InputError) as raised:
        ingest(tmp_path / "in", tmp_path / "work")
    assert raised.value.message == ("No DICOM images in the input 'in' (no files at all; left out: 't1n' (a symbolic "
                                    "link that points outside the input folder)).")


@pytest.mark.parametrize("loop", ["parent", "root", "self", "dangling"])
def test_links_inside_the_input_are_followed_once_and_loops_end(loop, template, series_numbers, tmp_path, caplog):
    copy_session(template, tmp_path / "in")
    link = tmp_path / "in" / "t1c" / "loop"
    target = {"parent": tmp_path / "in" / "t1c", "root": tmp_path / "in", "self": link,
              "dangling": tmp_path / "in" / "gone"}[loop]
    link.symlink_to(target)
    (tmp_path / "in" / "t2w_again").symlink_to("t2w")  # a relative link to a folder inside: followed
    with caplog.at_level(logging.WARNING), no_hang():
        session = ingest(tmp_path / "in", tmp_path / "work")
    assert _numbers(session) == series_numbers  # every instance once, whatever the links
    assert all(len(s.files) == len(set(s.files)) for s in session.series)
    says = {"self": "points to itself (a loop): skipped", "dangling": "points to nothing: skipped"}
    if loop in says:
        assert f"The symbolic link 't1c/loop' in the input 'in' {says[loop]}" in caplog.text
    else:
        assert "symbolic link" not in caplog.text


def test_an_input_given_as_a_link_and_a_pipe_inside_it(template, series_numbers, tmp_path):
    copy_session(template, tmp_path / "real")
    os.mkfifo(tmp_path / "real" / "t1n" / "pipe")  # opening it would wait for a writer forever
    (tmp_path / "in").symlink_to(tmp_path / "real", target_is_directory=True)
    with no_hang():
        session = ingest(tmp_path / "in", tmp_path / "work")
    assert _numbers(session) == series_numbers
