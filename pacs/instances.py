"""Received DICOM instances on disk: one file per SOP Instance UID, written atomically and synced.

A C-STORE is acknowledged only after its file is complete under its final name, so anything a sender
was told is stored survives a crash of the listener.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from pedseg.pipeline.atomic import atomic_path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_filename(uid: str) -> str:
    """A file or folder name for a UID: the UID itself when well formed, else a hash (never a path)."""
    uid = uid.strip().rstrip("\0")
    if _UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode()).hexdigest()[:32]


def write_instance(folder: Path, sop_instance_uid: str, encoded: bytes) -> bool:
    """Store `encoded` (a DICOM file with meta header) as `folder/<uid>.dcm`; False if it was already there."""
    target = folder / f"{uid_filename(sop_instance_uid)}.dcm"
    if target.exists():
        return False
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(encoded)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def list_instances(folder: Path) -> list[Path]:
    # atomic_path's temporary files start with a dot: never part of a study.
    return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith(".")) if folder.is_dir() else []


def remove_partials(folder: Path) -> int:
    """Delete temporary files a killed listener left behind; their senders were never told they were stored."""
    partials = [p for p in folder.glob(".*.partial*") if p.is_file()] if folder.is_dir() else []
    for p in partials:
        p.unlink(missing_ok=True)
    return len(partials)
