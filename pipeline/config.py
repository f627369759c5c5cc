"""The one configuration object every adapter fills and every stage reads."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config stays importable without the measurement stack
    from pedseg.pipeline.longitudinal import ResponseThresholds

SUBJECT_SALT_ENV = "PEDSEG_SUBJECT_SALT"  # a site secret mixed into PatientID hashes (subject keys)
# PEDSEG_BUNDLE lets an installed copy (Docker image, gear) point at its baked-in bundle.
DEFAULT_BUNDLE = Path(os.environ.get("PEDSEG_BUNDLE", Path(__file__).resolve().parent.parent / "bundles" / "pedseg-demo"))


@dataclass
class PipelineConfig:
    bundle: Path = DEFAULT_BUNDLE
    device: str = "auto"  # auto | cpu | cuda
    fast: bool = False  # fewest folds, no mirroring TTA
    reference_role: str = "t1c"  # series the DICOM-SEG and native label map refer to
    missing_policy: str = "fail"  # fail | allow (only with a bundle that accepts fewer inputs)
    label_convention: str = "2024"  # label values written to NIfTI outputs: "2024" or "2023" BraTS-PEDs
    write_seg: bool = True
    write_sr: bool = True
    write_pdf: bool = True
    pseudonymize: bool = True  # report shows a pseudonym instead of patient name / ID
    threads: int | None = None  # CPU threads for torch and SimpleITK; None = all cores
    keep_workdir: bool = False
    patient_age_years: float | None = None  # for the brain-volume plausibility check when headers lack it
    n4_for_registration: bool = False  # N4 bias correction of the copies that drive registration (CaPTk style)
    # Longitudinal tracking (when the run is given a measurement store):
    subject_key: str | None = None  # None: SHA-256 of subject_salt + PatientID
    subject_salt: str = field(default_factory=lambda: os.environ.get(SUBJECT_SALT_ENV, ""), repr=False)
    compare_across_bundles: bool = False  # compare with time points measured by other bundles or label conventions
    response_thresholds: ResponseThresholds | None = None  # None: RAPNO defaults (pipeline.longitudinal)
    extra: dict = field(default_factory=dict)
