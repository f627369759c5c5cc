"""PACS-side failures, in the pipeline's error model so every adapter reports them the same way."""
from __future__ import annotations

from pipeline.errors import PipelineError


class NetworkError(PipelineError):
    """A DICOM or DICOMweb peer could not be reached, refused the association or rejected instances."""

    exit_code = 7
    kind = "network_error"
