"""The error model: every failure a user can meet is one of these, with a defined exit code.

Messages name the problem, the series concerned (number and description, never patient identifiers)
and what to do. Adapters print `str(error)` and exit with `error.exit_code`.
"""
from __future__ import annotations


class PipelineError(Exception):
    exit_code = 1
    kind = "internal_error"

    def __init__(self, message: str, *, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()

    def to_dict(self) -> dict:
        return {"error": self.kind, "exit_code": self.exit_code, "message": self.message, "hint": self.hint}


class InputError(PipelineError):
    """The input is wrong in a way the user can fix (empty, not DICOM, unsafe archive...)."""

    exit_code = 2
    kind = "bad_input"


class MissingSequenceError(PipelineError):
    exit_code = 3
    kind = "missing_sequence"


class UnsupportedDataError(PipelineError):
    exit_code = 4
    kind = "unsupported_data"


class ResourceError(PipelineError):
    """Out of memory, disk or time."""

    exit_code = 5
    kind = "resource_exhausted"


class BundleError(PipelineError):
    """The model bundle is missing, incomplete or inconsistent."""

    exit_code = 6
    kind = "bad_bundle"
