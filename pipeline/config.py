"""The one configuration object every adapter fills and every stage reads.

Frozen: a run never changes it. Fields with a fixed set of values are `Literal` types; the command line, the
gear and the manifest take their choices from here (`PipelineConfig.choices`), and a test holds the manifest
against them.
"""
from __future__ import annotations

import functools
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from pedseg.pipeline.labels import Convention
from pedseg.pipeline.longitudinal import ResponseThresholds
from pedseg.pipeline.types import Role

SUBJECT_SALT_ENV = "PEDSEG_SUBJECT_SALT"  # a site secret mixed into PatientID hashes (subject keys)
_BUNDLES = Path(__file__).resolve().parent.parent / "bundles"
# The real model, for real sessions: CaPTk's DeepMedic glioma model (adult). PEDSEG_BUNDLE lets an installed copy
# (Docker image, gear) point at its baked-in bundle.
DEFAULT_BUNDLE = Path(os.environ.get("PEDSEG_BUNDLE", _BUNDLES / "captk-deepmedic-brats"))
# The synthetic demo model: the only one that knows the phantoms `pedseg demo` and the tests make.
DEMO_BUNDLE = Path(os.environ.get("PEDSEG_DEMO_BUNDLE", _BUNDLES / "pedseg-demo"))

Device = typing.Literal["auto", "cpu", "cuda"]
MissingPolicy = typing.Literal["fail", "allow"]  # allow: fewer sequences, only with a bundle that accepts them


@dataclass(frozen=True)
class PipelineConfig:
    bundle: Path = DEFAULT_BUNDLE
    device: Device = "auto"
    fast: bool = False  # fewest folds, no mirroring TTA
    reference_role: Role = "t1c"  # series the others are registered to, and the SEG and native label map refer to
    missing_policy: MissingPolicy = "fail"
    label_convention: Convention = "2024"  # label values of the NIfTI label maps a run writes
    write_seg: bool = True
    write_sr: bool = True
    write_pdf: bool = True
    pseudonymize: bool = True  # report shows a pseudonym instead of patient name / ID
    threads: int | None = None  # CPU threads for torch and SimpleITK; None = all cores
    keep_workdir: bool = False
    patient_age_years: float | None = None  # for the brain-volume check when headers lack PatientAge
    n4_for_registration: bool = False  # N4 bias correction of the copies that drive registration (CaPTk style)
    # Longitudinal tracking (when the run is given a measurement store):
    subject_key: str | None = None  # None: SHA-256 of subject_salt + PatientID
    subject_salt: str = field(default_factory=lambda: os.environ.get(SUBJECT_SALT_ENV, ""), repr=False)
    compare_across_bundles: bool = False  # compare with time points measured by other bundles or label conventions
    response_thresholds: ResponseThresholds = field(default_factory=ResponseThresholds)

    def __post_init__(self) -> None:
        for name, allowed in _choices().items():
            if getattr(self, name) not in allowed:  # adapters check first: this guards against a programming error
                raise ValueError(f"PipelineConfig.{name} is {getattr(self, name)!r}; allowed: {list(allowed)}")

    @staticmethod
    def choices(name: str) -> tuple[str, ...]:
        """The allowed values of a field with a fixed set of values; () for any other field."""
        return _choices().get(name, ())


@functools.cache
def _choices() -> dict[str, tuple[str, ...]]:
    hints = typing.get_type_hints(PipelineConfig)
    return {f.name: typing.get_args(hints[f.name]) for f in fields(PipelineConfig)
            if typing.get_origin(hints[f.name]) is typing.Literal}
