"""PACS-side failures, in the pipeline's error model so every adapter reports them the same way."""
from __future__ import annotations

from pipeline.errors import PipelineError


class NetworkError(PipelineError):
    """A DICOM or DICOMweb peer could not be reached, refused the association or rejected instances."""

    exit_code = 7
    kind = "network_error"
    causes = ("a PACS or DICOMweb peer that is down, unreachable, refuses our AE title or rejects instances; "
              "a listener port already in use")
    advice = ("Check host, port and AE titles on both sides (README, PACS companion); results the listener could "
              "not deliver stay in its spool and `pedseg push OUTDIR --to ...` resends them.")
