"""The idempotency key: which series were chosen and which model weights ran on them.

The gear computes it before inference, by running the pipeline's own ingest and identification on the
downloaded candidates, so it equals the key of the run that would follow (`provenance` records the same
choice and bundle hash). Other settings (fast mode, label convention...) are not part of it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from pedseg.pipeline.config import PipelineConfig


def series_key(chosen: Mapping[str, str], bundle_sha256: str) -> str:
    """Same chosen series and same weights -> same key, whatever the roles' order or the session's other series."""
    return hashlib.sha256("\n".join([*sorted(chosen.values()), bundle_sha256]).encode()).hexdigest()


def idempotency_key(provenance: dict) -> str:
    return series_key(provenance["inputs"]["series_instance_uids"], provenance["bundle"]["sha256"])


def input_key(dicom: Path, config: PipelineConfig, workdir: Path) -> str:
    """Key of a run on `dicom`, before running it. Raises what the pipeline would: a bad bundle, no DICOM,
    a missing sequence (with the pipeline's message naming it)."""
    from pedseg.pipeline.bundle import load_bundle  # the pipeline's heavy imports: session mode only
    from pedseg.pipeline.identify import identify
    from pedseg.pipeline.ingest import ingest

    bundle = load_bundle(config.bundle)  # a broken bundle fails before reading the session
    identification = identify(ingest(dicom, workdir), config)
    return series_key(identification.chosen, bundle.sha256())
