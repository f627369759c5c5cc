"""The idempotency key: which series were chosen and which model weights ran on them.

The gear computes it before inference, by running the pipeline's own identification on the session it has
read, so it equals the key of the run that follows (`provenance` records the same choice and bundle hash).
Other settings (fast mode, label convention...) are not part of it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pedseg.pipeline.identify import identify

if TYPE_CHECKING:
    from pedseg.pipeline.bundle import ModelBundle
    from pedseg.pipeline.config import PipelineConfig
    from pedseg.pipeline.types import Session
    from pedseg.reporting.artifacts import Provenance


def series_key(chosen: Mapping[str, str], bundle_sha256: str) -> str:
    """Same chosen series and same weights -> same key, whatever the roles' order or the session's other series."""
    return hashlib.sha256("\n".join([*sorted(chosen.values()), bundle_sha256]).encode()).hexdigest()


def idempotency_key(provenance: Provenance) -> str:
    return series_key(provenance.series_instance_uids, provenance.bundle.sha256)


def input_key(session: Session, config: PipelineConfig, bundle: ModelBundle) -> str:
    """Key of a run on `session`, before running it. Raises what the pipeline would: a missing sequence (with
    the pipeline's message naming it)."""
    return series_key(identify(session, config).chosen, bundle.sha256)
