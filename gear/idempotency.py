"""The idempotency key: which series were chosen, which model weights ran on them, and, for a review, which
edited segmentation was measured.

The gear computes it before inference, by running the pipeline's own identification on the session it has
read, so it equals the key of the run that follows (`provenance` records the same choice and bundle hash).
A run given an edited SEG adds the SEG file's SHA-256: a review is never taken for the automatic run, nor one
review for another. Other settings (fast mode, label convention...) are not part of it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pedseg.pipeline.identify import identify

if TYPE_CHECKING:
    from pedseg.pipeline.bundle import ModelBundle
    from pedseg.pipeline.config import PipelineConfig
    from pedseg.pipeline.types import Session
    from pedseg.reporting.artifacts import Provenance


def series_key(chosen: Mapping[str, str], bundle_sha256: str, edited_seg_sha256: str = "") -> str:
    """Same chosen series and same weights (and same edited SEG, if any) -> same key, whatever the roles' order or
    the session's other series. Without an edited SEG the key is what it always was."""
    parts = [*sorted(chosen.values()), bundle_sha256, *([f"edited-seg:{edited_seg_sha256}"] if edited_seg_sha256
                                                         else [])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def idempotency_key(provenance: Provenance, edited_seg_sha256: str = "") -> str:
    return series_key(provenance.series_instance_uids, provenance.bundle.sha256, edited_seg_sha256)


def input_key(session: Session, config: PipelineConfig, bundle: ModelBundle, edited_seg_sha256: str = "") -> str:
    """Key of a run on `session`, before running it. Raises what the pipeline would: a missing sequence (with
    the pipeline's message naming it)."""
    return series_key(identify(session, config).chosen, bundle.sha256, edited_seg_sha256)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
