"""The error model: every failure a user can meet is one of these, with a defined exit code.

Messages name the problem, the series concerned (number and description, never patient identifiers)
and what to do. The failure path is one function: `as_pipeline_error` turns any exception into one of these;
the runner's workspace writes it to error.json, and every adapter prints `str(error)` and exits with
`error.exit_code`. Each class's `causes` and `advice` make the README's troubleshooting table
(scripts/error_table.py).
"""
from __future__ import annotations

import errno
import traceback
from pathlib import Path

# A full disk or an exhausted quota: out of resources, whatever the operation was.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class PipelineError(Exception):
    """Base of the error model; raise one of its subclasses."""

    exit_code = 1
    kind = "internal_error"
    causes = ""
    advice = ""

    def __init__(self, message: str, *, hint: str = "", details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        # What the run had found when it stopped, for error.json (JSON values, no patient identifiers).
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()

    def to_dict(self) -> dict:
        document = {"error": self.kind, "exit_code": self.exit_code, "message": self.message, "hint": self.hint}
        if self.details:
            document["details"] = self.details
        return document


class InternalError(PipelineError):
    """A fault inside pedseg: a bug, or a situation nobody foresaw. Never the user's input."""

    exit_code = 1
    kind = "internal_error"
    causes = "an unexpected failure inside pedseg (the message names the exception and where it happened)"
    advice = ("Re-run with `-v` (command line) or `debug=true` (gear) for the full traceback, and report it "
              "with the log; the log never holds patient identifiers.")

    def __init__(self, message: str, *, hint: str = ""):
        super().__init__(message, hint=hint or self.advice)


class InputError(PipelineError):
    """The input is wrong in a way the user can fix (empty, not DICOM, unsafe archive...)."""

    exit_code = 2
    kind = "bad_input"
    causes = ("no input, no DICOM images, an unsafe, corrupt or oversized archive (given, inside another or in an "
              "input folder), a file or folder of the input that cannot be read or vanishes, two studies or two "
              "patients in one input, one SOP Instance UID in two series, a series with missing slices, a role "
              "pinned by hand (`--role`) to a series that cannot take it, an output folder that cannot be written "
              "or that another run is using")
    advice = ("Give the DICOM files of one MRI session of one patient (a folder or .zip); re-export series the "
              "message calls incomplete; choose a writable output folder, or wait for the run using it.")


class MissingSequenceError(PipelineError):
    """A sequence the model needs (pre-/post-contrast T1, T2, FLAIR) was not found or not recognised."""

    exit_code = 3
    kind = "missing_sequence"
    causes = ("a required sequence (T1, T1 post-contrast, T2, FLAIR) is absent, or only localizers, diffusion, "
              "4D or other unusable series are present")
    advice = ("Include the missing series; if it is there, compare its description and timing with "
              "`pedseg identify INPUT` and report it. `--allow-missing` runs with fewer if the bundle allows.")


class UnsupportedDataError(PipelineError):
    """The data is valid DICOM but not something the pipeline can convert or use."""

    exit_code = 4
    kind = "unsupported_data"
    causes = ("impossible geometry in a series' headers (NaN, zero or negative spacing or thickness, no "
              "orientation or position), dcm2niix cannot convert a series or writes an unreadable image, uneven "
              "slice spacing, a series of several matrix sizes none of which holds every slice, a chosen series "
              "that is not a 3D volume")
    advice = "Export the series named in the message again (uncompressed if it is compressed), or leave it out."


class ResourceError(PipelineError):
    """Out of memory, disk or time."""

    exit_code = 5
    kind = "resource_exhausted"
    causes = ("the disk is full, memory ran out (or GPU memory with `--device cuda`; `auto` falls back to the "
              "CPU), or a step (dcm2niix) took too long")
    advice = "Free disk space or use a machine with more memory, then run again; `--fast` needs less."


class BundleError(PipelineError):
    """The model bundle is missing, incomplete or inconsistent."""

    exit_code = 6
    kind = "bad_bundle"
    causes = ("no bundle.json, a malformed one, a model folder lacking a fold or its plans, channel or label "
              "mappings that do not match the model, `--device cuda` without a GPU")
    advice = "Point `--bundle` at a complete bundle (see Model bundles) or restore the file the message names."


class NetworkError(PipelineError):
    """A DICOM or DICOMweb peer could not be reached, refused the association or rejected instances."""

    exit_code = 7
    kind = "network_error"
    causes = ("a PACS or DICOMweb peer that is down, unreachable, refuses our AE title or rejects instances; "
              "a listener port already in use")
    advice = ("Check host, port and AE titles on both sides (README, PACS companion); results the listener could "
              "not deliver stay in its spool and `pedseg push OUTDIR --to ...` resends them.")


class InterruptedRun(PipelineError):
    """The run was stopped from outside (SIGTERM, SIGINT / Ctrl-C) before it finished; it cleaned up first."""

    exit_code = 8
    kind = "interrupted"
    causes = ("the run was stopped by a signal before it finished: SIGTERM (a job scheduler or container stop, "
              "a cancelled Flywheel job) or SIGINT (Ctrl-C); nothing was published and the temporary copies of the "
              "input were deleted")
    advice = ("Run again; if a scheduler stopped it for its time or memory limit, give the job more. A second run "
              "into the same output folder while one is running is refused (exit code 2).")


def error_classes() -> list[type[PipelineError]]:
    """Every class a failure can end in, by exit code (the troubleshooting table's rows)."""
    found, pending = [], list(PipelineError.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending += cls.__subclasses__()
    return sorted(found, key=lambda cls: cls.exit_code)


def disk_full(exc: OSError, what: str) -> ResourceError:
    return ResourceError(f"The disk is full: {what} failed ({exc.strerror}).",
                         hint="Free disk space (or point the work and output folders at a larger disk) and run again.")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def as_pipeline_error(exc: BaseException) -> PipelineError:
    """Any exception as the error model sees it: itself when it is one; memory and disk exhaustion as
    ResourceError; anything else an InternalError naming the exception's type and place, never its text (a
    library's message may quote header values, patient names included)."""
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, MemoryError):
        return ResourceError("The run ran out of memory.", hint="Use a machine with more RAM, or --fast.")
    if is_disk_full(exc):
        return disk_full(exc, "writing the work or output files")
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" in {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return InternalError(f"Unexpected {type(exc).__name__}{where}.")
