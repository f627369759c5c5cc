"""Longitudinal change of tumour volumes: baseline, nadir, previous and a volumetric response category.

Pure: time points in, changes out. Storing and fetching time points is `tracking`'s job.

A time point is compared only with earlier studies (by StudyDate) of the same subject that were measured with the
same model bundle (name, version and weights hash) and label convention: a different model can change a volume
as much as the tumour does. `compare_across_bundles` overrides this, and says so in the notes.

Response categories, per region, follow the RAPNO volumetric reading of the bidimensional criteria (Fangusaro et
al., Lancet Oncol 2020;21:e305, paediatric low-grade glioma; Erker et al., Lancet Oncol 2020;21:e317, high-grade
glioma): progression is +25 % of the 2D product against the smallest measurement so far (nadir), ≈ +40 % of
volume for a growing ellipsoid (1.25^1.5); partial response is −50 % of the product against baseline,
≈ −65 % of volume (0.5^1.5).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.uid import generate_uid

from pedseg.pipeline.labels import REGIONS, comparable_across_conventions

# A 2023-convention model labels NET and CC together as NCR, so only these regions mean the same in both.
REGIONS_ACROSS_CONVENTIONS = tuple(name for name in REGIONS if comparable_across_conventions(name))
RESPONSES = {
    "CR": "complete response",
    "PR": "partial response",
    "SD": "stable disease",
    "PD": "progressive disease",
    "NE": "not evaluable (no tumour in this region at any time point)",
}
ACROSS_OPTION = "--compare-across-bundles (Flywheel gear: compare_across_bundles)"


@dataclass(frozen=True)
class ResponseThresholds:
    progression_pct: float = 40.0  # ≥ this % volume increase vs nadir (RAPNO +25 % 2D product)
    partial_response_pct: float = -65.0  # ≤ this % volume change vs baseline (RAPNO −50 % 2D product)
    absent_ml: float = 0.1  # at or below: no tumour in the region (segmentation noise, not a lesion)


@dataclass(frozen=True)
class BundleId:
    name: str
    version: str
    sha256: str
    label_convention: str | None = None  # the model's label convention; None in records that lack it

    def describe(self) -> str:
        labels = f", labels {self.label_convention}" if self.label_convention else ""
        return f"{self.name} {self.version} (sha256 {self.sha256[:12]}{labels})"


@dataclass(frozen=True)
class TimePoint:
    """One study's measurements under a subject key: what the store keeps per run."""

    subject_key: str
    study_uid: str
    study_date: str  # YYYYMMDD; "" when the study had none (it cannot be ordered, so is never compared)
    bundle: BundleId
    volumes_ml: dict[str, float]  # ET, NET, CC, ED (BraTS-PEDs 2024) and the composites TC, WT
    volumes_2023_ml: dict[str, float]  # NCR, ED, ET (BraTS-PEDs 2023)
    rapno_region: str
    rapno_product_mm2: float | None
    qc_flags: tuple[str, ...] = ()
    # Volumes of a radiologist's edited segmentation of this study (`pedseg review`), beside the automatic ones;
    # comparisons use them where they exist (`volume`).
    reviewed_volumes_ml: dict[str, float] = field(default_factory=dict)

    def volume(self, region: str) -> float:
        """The reviewed volume of `region` when there is one, else the automatic one."""
        return self.reviewed_volumes_ml.get(region, self.volumes_ml[region])


@dataclass(frozen=True)
class Change:
    ml: float
    pct: float | None  # None when the reference volume is absent (at or below `absent_ml`)


@dataclass(frozen=True)
class RegionChange:
    region: str
    volume_ml: float
    baseline_ml: float
    nadir_ml: float
    nadir_study_uid: str
    previous_ml: float
    vs_baseline: Change
    vs_nadir: Change
    vs_previous: Change
    response: str  # a key of RESPONSES


@dataclass(frozen=True)
class Longitudinal:
    current: TimePoint
    priors: tuple[TimePoint, ...]  # compared earlier time points, oldest first; priors[0] is the baseline
    changes: dict[str, RegionChange]  # empty without priors
    notes: tuple[str, ...]  # why earlier time points were or were not compared
    thresholds: ResponseThresholds

    @property
    def baseline(self) -> TimePoint | None:
        return self.priors[0] if self.priors else None


def subject_key(patient_id: str, salt: str = "") -> str:
    """SHA-256 of salt + PatientID: links a child's studies without keeping the identifier."""
    return hashlib.sha256(f"{salt}{patient_id}".encode()).hexdigest()


def tracking_uids(key: str, regions: Iterable[str] = tuple(REGIONS)) -> dict[str, str]:
    """Region → DICOM SR Tracking UID, the same for a subject at every time point (derived, so no store needed)."""
    return {region: generate_uid(entropy_srcs=["pedseg tracking", key, region]) for region in regions}


def compare(current: TimePoint, recorded: Iterable[TimePoint], thresholds: ResponseThresholds = ResponseThresholds(),
            *, across_bundles: bool = False) -> Longitudinal:
    """Compare `current` with the subject's earlier time points among `recorded` (which may include `current`)."""
    if not current.study_date:
        note = "This study has no StudyDate, so it cannot be placed among the subject's time points; not compared."
        return Longitudinal(current, (), {}, (note,), thresholds)
    earlier = [tp for tp in recorded if tp.subject_key == current.subject_key and tp.study_uid != current.study_uid
               and tp.study_date and tp.study_date < current.study_date]
    same = [tp for tp in earlier if not _mismatch(current.bundle, tp.bundle)]
    other = [tp for tp in earlier if _mismatch(current.bundle, tp.bundle)]
    notes = []
    if other:
        bundles = "; ".join(sorted({tp.bundle.describe() for tp in other}))
        if across_bundles:
            same += other
            notes.append(f"Compared across bundles as asked: {len(other)} earlier time point(s) were measured with "
                         f"{bundles}; this run used {current.bundle.describe()}.")
        else:
            notes.append(f"{len(other)} earlier time point(s) not compared: measured with {bundles}, this run with "
                         f"{current.bundle.describe()}. Volumes from different models or label conventions are not "
                         f"comparable (a change may come from the model, not the tumour); use {ACROSS_OPTION} to "
                         f"compare anyway.")
    priors = _one_per_study(same, current.bundle)
    conventions = {tp.bundle.label_convention for tp in (*priors, current)} - {None}
    regions = tuple(REGIONS) if len(conventions) <= 1 else REGIONS_ACROSS_CONVENTIONS
    changes = {r: _region_change(r, current, priors, thresholds) for r in regions} if priors else {}
    return Longitudinal(current, tuple(priors), changes, tuple(notes), thresholds)


def trajectory(points: Iterable[TimePoint], thresholds: ResponseThresholds = ResponseThresholds(),
               *, across_bundles: bool = False) -> list[Longitudinal]:
    """Every time point compared with those before it, in time order (undated ones last)."""
    points = list(points)
    ordered = sorted(points, key=lambda tp: (tp.study_date or "99999999", tp.study_uid, tp.bundle.sha256))
    return [compare(tp, points, thresholds, across_bundles=across_bundles) for tp in ordered]


def _mismatch(a: BundleId, b: BundleId) -> bool:
    if (a.name, a.version, a.sha256) != (b.name, b.version, b.sha256):
        return True
    return None not in (a.label_convention, b.label_convention) and a.label_convention != b.label_convention


def _one_per_study(points: list[TimePoint], bundle: BundleId) -> list[TimePoint]:
    """One time point per study, oldest first; a study measured by several bundles counts once (ours if any)."""
    chosen: dict[str, TimePoint] = {}
    for tp in sorted(points, key=lambda tp: (tp.bundle != bundle, tp.bundle.name, tp.bundle.version, tp.bundle.sha256)):
        chosen.setdefault(tp.study_uid, tp)
    return sorted(chosen.values(), key=lambda tp: (tp.study_date, tp.study_uid))


def _change(volume: float, reference: float, absent_ml: float) -> Change:
    pct = 100.0 * (volume - reference) / reference if reference > absent_ml else None
    return Change(volume - reference, pct)


def _region_change(region: str, current: TimePoint, priors: list[TimePoint], t: ResponseThresholds) -> RegionChange:
    volume = current.volume(region)
    baseline = priors[0].volume(region)
    nadir_point = min(priors, key=lambda tp: tp.volume(region))  # earliest of equal minima
    nadir = nadir_point.volume(region)
    previous = priors[-1].volume(region)
    vs_nadir = _change(volume, nadir, t.absent_ml)
    vs_baseline = _change(volume, baseline, t.absent_ml)
    if volume <= t.absent_ml:
        response = "CR" if any(tp.volume(region) > t.absent_ml for tp in priors) else "NE"
    elif nadir <= t.absent_ml:
        response = "PD"  # new or recurrent tumour after the region was clear
    elif vs_nadir.pct >= t.progression_pct:
        response = "PD"
    elif vs_baseline.pct is not None and vs_baseline.pct <= t.partial_response_pct:
        response = "PR"
    else:
        response = "SD"
    return RegionChange(region, volume, baseline, nadir, nadir_point.study_uid, previous, vs_baseline, vs_nadir,
                        _change(volume, previous, t.absent_ml), response)
