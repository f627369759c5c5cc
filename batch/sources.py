"""What a batch runs: its SOURCEs (session folders, zips, CSV lists) read into one job per session.

A session's name is its folder under OUTROOT: filesystem-safe and unique in the batch. Names come from the
sources in a fixed order (sorted folder listings, CSV row order), so the same sources give the same names on
every invocation, which is what lets a second invocation find the first one's outputs.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pedseg.pipeline.errors import InputError

SUMMARY_STEM = "batch-summary"  # OUTROOT/batch-summary.csv and .json: no session may take these names
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
CSV_COLUMNS = ("input", "subject_key", "outdir")


@dataclass(frozen=True)
class SessionJob:
    name: str  # unique in the batch; the summary row's key
    inputs: tuple[Path, ...]  # what `pedseg run` takes as INPUT
    outdir: Path
    subject_key: str | None = None  # None: the pipeline's own (salted PatientID hash)


def read_sources(sources: Sequence[Path], outroot: Path) -> list[SessionJob]:
    """Every session of every SOURCE: a folder gives one session per subfolder or zip in it, a zip is one
    session, a .csv lists `input[,subject_key][,outdir]` (paths relative to the CSV's folder; outdir relative
    to OUTROOT)."""
    entries: list[tuple[str, Path, str | None, Path | None]] = []  # (name wanted, input, subject key, outdir)
    for source in map(Path, sources):
        if source.suffix.lower() == ".csv" and source.is_file():
            entries += _csv_entries(source, outroot)
        elif source.is_file() and source.suffix.lower() == ".zip":
            entries.append((source.stem, source, None, None))
        elif source.is_dir():
            entries += [(path.stem if path.is_file() else path.name, path, None, None) for path in _sessions_in(source)]
        else:
            raise InputError(f"Batch source '{source}' is not a folder, a .zip or a .csv file.",
                             hint="Give folders of session subfolders or zips, zips, or CSV lists of sessions.")
    if not entries:
        raise InputError("The batch sources hold no sessions.",
                         hint="A folder source needs one subfolder or .zip per session inside it.")
    return _jobs(entries, outroot)


def safe_name(text: str) -> str:
    """A folder name on any file system: letters, digits, '.', '_', '-'; never hidden, never empty."""
    return _UNSAFE.sub("_", text).strip("._-")[:100] or "session"


def _sessions_in(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                   and (p.is_dir() or p.suffix.lower() == ".zip"))
    if not found and any(p.is_file() for p in folder.iterdir()):
        raise InputError(f"Batch source '{folder}' holds files but no session subfolders or zips.",
                         hint="A batch source folder holds one subfolder (or .zip) per session; for one session "
                              "use `pedseg run`, or give the folder above it.")
    return found


def _csv_entries(path: Path, outroot: Path) -> list[tuple[str, Path, str | None, Path | None]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if rows and rows[0][0].lower() == "input":  # a header row
        rows = rows[1:]
    entries = []
    for number, row in enumerate(rows, start=1):
        if len(row) > len(CSV_COLUMNS) or not row[0]:
            raise InputError(f"Row {number} of '{path}' is not input[,subject_key][,outdir].",
                             hint="One session per row: the session's folder or zip, then optionally its subject "
                                  "key and output folder.")
        cells = row + [""] * (len(CSV_COLUMNS) - len(row))
        session_input = (path.parent / cells[0]) if not Path(cells[0]).is_absolute() else Path(cells[0])
        if not session_input.exists():
            raise InputError(f"Row {number} of '{path}': the input '{cells[0]}' does not exist.",
                             hint="Paths in a batch CSV are relative to the CSV's folder.")
        outdir = (outroot / cells[2]) if cells[2] else None
        name = Path(cells[2]).name if cells[2] else (session_input.stem if session_input.is_file()
                                                      else session_input.name)
        entries.append((name, session_input, cells[1] or None, outdir))
    return entries


def _jobs(entries: Iterable[tuple[str, Path, str | None, Path | None]], outroot: Path) -> list[SessionJob]:
    jobs, names, outdirs = [], {SUMMARY_STEM.lower()}, set()
    for wanted, session_input, subject_key, outdir in entries:
        base = safe_name(wanted)
        name, n = base, 1
        while name.lower() in names:  # case-insensitive: two names must not share a folder on macOS or Windows
            n += 1
            name = f"{base}-{n}"
        names.add(name.lower())
        outdir = (outdir or outroot / name).absolute()
        if outdir in outdirs:
            raise InputError(f"Two sessions of the batch write into '{outdir}'.",
                             hint="Give each CSV row its own outdir (or leave the column empty).")
        outdirs.add(outdir)
        jobs.append(SessionJob(name, (session_input.absolute(),), outdir, subject_key))
    return jobs
