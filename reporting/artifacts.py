"""What a finished run hands its writers: the typed artefacts of every stage, and the run's provenance.

Label maps are in memory and in the internal convention (pedseg.pipeline.labels); a writer that must write
another convention converts at its edge.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import SimpleITK as sitk

from pedseg.pipeline.bundle import ModelBundle
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.longitudinal import Longitudinal
from pedseg.pipeline.types import (
    QC,
    EnsembleInfo,
    Identification,
    Measurements,
    PopulationWarning,
    PostprocessStep,
    Prediction,
    Preprocessed,
    Session,
    StudyContext,
)
from pedseg.reporting.codes import MANUFACTURER
from pedseg.reporting.derived import RunStamp


@dataclass(frozen=True)
class BundleRecord:
    """Which model produced a result: provenance, measurements.json's context and the longitudinal store."""

    name: str
    version: str
    licence: str
    sha256: str  # bundle.json and every checkpoint
    label_convention: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Provenance:
    """provenance.json: what ran, on which series, with which versions and settings, and what it wrote."""

    pedseg_version: str
    packages: dict[str, str]
    bundle: BundleRecord
    study_instance_uid: str
    series_instance_uids: dict[str, str]  # role -> series key
    device: str
    fast_mode: bool
    tta: bool
    models: list[str]
    folds: list[str]
    ensemble: EnsembleInfo | None
    postprocessing: tuple[PostprocessStep, ...]
    qc: QC
    reference_role: str
    stage_seconds: dict[str, float] = field(default_factory=dict)  # filled once every writer has run
    outputs: tuple[str, ...] = ()  # paths relative to OUTDIR, provenance.json included
    # Roles the user pinned by hand (Identification.pinned: role -> series key), not chosen by identification.
    pinned_roles: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        document = {
            "pedseg_version": self.pedseg_version,
            "packages": dict(self.packages),
            "bundle": self.bundle.as_dict(),
            "inputs": {"study_instance_uid": self.study_instance_uid,
                       "series_instance_uids": dict(self.series_instance_uids),
                       "pinned_roles": dict(self.pinned_roles)},
            "device": self.device,
            "fast_mode": self.fast_mode,
            "tta": self.tta,
            "models": list(self.models),
            "folds": list(self.folds),
            "ensemble": asdict(self.ensemble) if self.ensemble else {},
            "postprocessing": [step.as_dict() for step in self.postprocessing],
            "qc": self.qc.as_dict(),
            "reference_role": self.reference_role,
        }
        if self.stage_seconds:
            document["stage_seconds"] = dict(self.stage_seconds)
        if self.outputs:
            document["outputs"] = list(self.outputs)
        return document


@dataclass(frozen=True)
class RunArtifacts:
    session: Session
    identification: Identification
    context: StudyContext
    config: PipelineConfig
    bundle: ModelBundle
    preprocessed: Preprocessed
    prediction: Prediction
    labels: sitk.Image  # atlas space (BraTS grid), internal convention, after post-processing
    native_labels: sitk.Image  # the same on the reference series' native grid
    measurements: Measurements
    provenance: Provenance
    timeline: Longitudinal | None  # this run compared with the subject's earlier ones; None when untracked
    # A child's study segmented by a bundle not trained on children (pedseg.pipeline.population); None otherwise.
    population_warning: PopulationWarning | None = None
    # The label map on the native grid of each series that gets a DICOM SEG (role -> image; config.seg_roles).
    seg_labels: dict[str, sitk.Image] = field(default_factory=dict)
    # When the run wrote its DICOM objects: one series date/time and numbering for all of them.
    stamp: RunStamp = field(default_factory=lambda: RunStamp.now(MANUFACTURER))

    @property
    def reference_role(self) -> str:
        return self.identification.reference_role

    @property
    def has_tumour(self) -> bool:
        return self.measurements.regions["WT"].voxels > 0
