"""Preprocessing QC as a reader acts on it: a short list of named checks, each pass, warn or fail, with the value
found, the threshold it was held to and what to do, instead of raw metric values.

The thresholds are the pipeline's own (pipeline.preprocess, pipeline.measure), so the report judges exactly as
the run flagged; the run's flag sentences stay listed beside the checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pedseg.pipeline.identify_rules import ROLE_NAMES
from pedseg.pipeline.measure import MAX_WT_FRACTION_OF_BRAIN, tumour_fraction_flag
from pedseg.pipeline.preprocess import (
    BRAIN_ML_BOUNDS,
    BRAIN_ML_PHYSICAL,
    HEAD_FRACTION_BOUNDS,
    MIN_INSIDE_ATLAS_BRAIN,
    MIN_SIMILARITY_PEAK,
    brain_volume_flag,
)
from pedseg.pipeline.types import QC

Status = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    found: str
    threshold: str
    action: str  # what to do when it does not pass; "" when it passes


def qc_checks(qc: QC, *, age_years: float | None, whole_tumour_ml: float) -> list[Check]:
    return [*_alignment(qc), _atlas(qc), _skull_stripping(qc), _brain_volume(qc, age_years),
            _tumour_share(qc, whole_tumour_ml)]


def _role(key: str) -> str:
    role = key.split("_vs_")[0]
    return ROLE_NAMES.get(role, role)


def _alignment(qc: QC) -> list[Check]:
    if not qc.similarity_in_brain:
        return []
    weak = {key: s.peak for key, s in qc.similarity_in_brain.items() if s.peak < MIN_SIMILARITY_PEAK}
    found = "; ".join(f"{_role(key)} {s.peak:.2f}" for key, s in qc.similarity_in_brain.items())
    return [Check("Each series aligned with the post-contrast T1", "fail" if weak else "pass", found,
                  f"similarity peak at least {MIN_SIMILARITY_PEAK}",
                  "Compare the overlays on FLAIR and T1c: a misaligned series makes every volume unreliable; "
                  "re-run with that series pinned (--role) or exclude the study." if weak else "")]


def _atlas(qc: QC) -> Check:
    inside = qc.brain_inside_atlas_brain
    ok = inside >= MIN_INSIDE_ATLAS_BRAIN or qc.brain_extraction != "deepbet"
    return Check("Head aligned with the reference atlas", "pass" if ok else "fail",
                 f"{inside:.0%} of the brain inside the atlas brain", f"at least {MIN_INSIDE_ATLAS_BRAIN:.0%}",
                 "" if ok else "Check the overlays for a head placed or tilted wrongly; the segmentation may be "
                               "off target.")


def _skull_stripping(qc: QC) -> Check:
    lo, hi = HEAD_FRACTION_BOUNDS
    fraction = qc.mask_fraction_of_head
    if qc.brain_extraction != "deepbet":
        return Check("Skull stripping", "warn", "the learned brain extraction failed; the atlas mask was used",
                     "learned brain extraction succeeds", "Check that the brain outline follows this child's "
                     "anatomy; tumour at the brain's edge may be cut off.")
    ok = lo <= fraction <= hi
    return Check("Skull stripping", "pass" if ok else "warn", f"brain mask is {fraction:.0%} of the head",
                 f"{lo:.0%} to {hi:.0%} of the head",
                 "" if ok else "Check the brain outline: too little is over-stripping, too much is skull left in "
                               "or an input already skull-stripped.")


def _brain_volume(qc: QC, age_years: float | None) -> Check:
    lo, hi = BRAIN_ML_PHYSICAL
    threshold = f"{lo}-{hi} mL at any age"
    if age_years is not None:
        age_lo, age_hi = next((a, b) for max_age, a, b in BRAIN_ML_BOUNDS if age_years < max_age)
        threshold += f"; {age_lo}-{age_hi} mL at age {age_years:g}"
    flag = brain_volume_flag(qc.brain_volume_ml, age_years)
    return Check("Brain volume for age", "fail" if flag else "pass", f"{qc.brain_volume_ml:.0f} mL", threshold,
                 "Check the voxel spacing in the headers, the patient's age and the skull stripping; tumour "
                 "volumes of a brain this far off may be wrong too." if flag else "")


def _tumour_share(qc: QC, whole_tumour_ml: float) -> Check:
    flag = tumour_fraction_flag(whole_tumour_ml, qc.brain_volume_ml)
    share = whole_tumour_ml / qc.brain_volume_ml if qc.brain_volume_ml else 0.0
    return Check("Tumour size against the brain", "warn" if flag else "pass", f"{share:.0%} of the brain",
                 f"at most {MAX_WT_FRACTION_OF_BRAIN:.0%}",
                 "Check the segmentation and the skull stripping: a tumour this large is implausible." if flag
                 else "")
