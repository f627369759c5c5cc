"""BraTS-style preprocessing: every sequence rigidly to t1c, t1c rigidly to the BraTS atlas, one resampling
per image into BraTS space, brain extraction with deepbet, and every transform kept for the way back.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pedseg.pipeline.atlas import brats_reference_grid, load_atlas_brain_mask, load_atlas_t1
from pedseg.pipeline.atomic import write_image
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.errors import UnsupportedDataError
from pedseg.pipeline.registration import (
    bias_corrected,
    compose,
    inverse,
    register_rigid,
    resample,
    resample_labels,
    similarity_peak,
)
from pedseg.pipeline.types import QC, Identification, Preprocessed, Session, Similarity

logger = logging.getLogger(__name__)

# Expected brain volume (mL, deepbet's mask: cerebrum, cerebellum, brainstem) by age, wide bounds: newborn
# ~400, 1 y ~900, 3 y ~1100, adolescents and adults ~1100-1600. (upper age, low, high)
BRAIN_ML_BOUNDS = ((0.5, 300, 1100), (2, 500, 1500), (6, 800, 1700), (200, 900, 1900))
# Brain mask over the head (Otsu foreground of t1c in the BraTS box): 0.49 on the atlas, 0.53-0.56 with deepbet
# on the shared real MPRAGEs (3-year-old, adult); far below means over-stripping, near 1 means skull left in
# or an input that was already skull-stripped.
HEAD_FRACTION_BOUNDS = (0.3, 0.85)
# Similarity peak (see registration.similarity_peak) below which a series-to-anchor alignment is flagged.
MIN_SIMILARITY_PEAK = 1.15
# Share of the brain mask inside the atlas brain mask: 0.85-0.92 for the real BraTS case and shared MPRAGEs
# (3-year-old 0.89), ~1 for small synthetic heads, 0.68 at 20 mm / 15 degrees off; 0.72 for the shared GE
# "IR-SPGR" series, which is a vial phantom, not a head.
MIN_INSIDE_ATLAS_BRAIN = 0.75


@dataclass
class StepTimer:
    """Seconds per preprocessing step (the benchmark reads peak memory at the debug lines)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        logger.debug("preprocess step %s: %.1f s", name, self.seconds[name])


def preprocess(session: Session, identification: Identification, workdir: Path, config: PipelineConfig, *,
               patient_age_years: float | None = None) -> Preprocessed:
    """Every chosen series converted, registered to the reference series (identification.reference_role), that
    to the atlas, resampled once into BraTS space and skull-stripped. `patient_age_years` bounds the brain
    volume check (None: no age, no check)."""
    roles = list(identification.chosen)
    native_dir, atlas_dir = workdir / "native", workdir / "atlas"
    atlas_dir.mkdir(parents=True, exist_ok=True)
    step = StepTimer()
    with step("convert"):
        native_paths = {role: convert_series(session.by_uid(identification.chosen[role]), native_dir) for role in roles}
        native = {role: _read_volume(path) for role, path in native_paths.items()}
    frames = {role: session.by_uid(identification.chosen[role]).header.frame_of_reference_uid for role in roles}
    anchor = identification.reference_role

    registration: dict[str, float] = {}
    flags: list[str] = []
    driving = native
    if config.n4_for_registration:
        with step("bias correction"):  # drives registration only; outputs keep the scanner's intensities
            driving = {role: bias_corrected(image) for role, image in native.items()}
    atlas_t1 = load_atlas_t1()
    with step(f"register {anchor} to atlas"):
        atlas_to_anchor, metric = register_rigid(atlas_t1, driving[anchor], same_frame=False)
    registration[f"{anchor}_to_atlas_mattes_mi"] = round(metric, 4)
    transforms: dict[str, sitk.Transform] = {anchor: atlas_to_anchor}
    for role in roles:
        if role == anchor:
            continue
        same_frame = bool(frames[role]) and frames[role] == frames[anchor]
        with step(f"register {role} to {anchor}"):
            anchor_to_role, metric = register_rigid(driving[anchor], driving[role], same_frame=same_frame)
        registration[f"{role}_to_{anchor}_mattes_mi"] = round(metric, 4)
        transforms[role] = compose(atlas_to_anchor, anchor_to_role)

    with step("resample"):
        reference = brats_reference_grid()
        atlas_space = {role: resample(native[role], reference, transforms[role]) for role in roles}
        transform_paths = {}
        for role, transform in transforms.items():
            transform_paths[role] = atlas_dir / f"{role}_atlas_to_native.tfm"
            sitk.WriteTransform(transform, str(transform_paths[role]))

    with step("brain extraction"):
        mask, extraction = extract_brain(atlas_space[anchor], atlas_dir, flags)
    with step("write"):
        images = {}
        for role, image in atlas_space.items():
            images[role] = atlas_dir / f"{role}.nii.gz"
            write_image(sitk.Mask(image, mask), images[role])
        mask_path = atlas_dir / "brain_mask.nii.gz"
        write_image(mask, mask_path)
    with step("quality checks"):
        checks = quality_checks(atlas_space, anchor, mask, extraction, flags, patient_age_years)
    qc = QC(registration=registration, flags=tuple(flags), step_seconds=step.seconds, brain_extraction=extraction,
            **checks)
    return Preprocessed(images=images, brain_mask=mask_path, native=native_paths, atlas_to_native=transform_paths,
                        qc=qc)


def _read_volume(path: Path) -> sitk.Image:
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if image.GetDimension() == 4:
        # dcm2niix stacks repeated volumes; structural models take the first.
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise UnsupportedDataError(
            f"The converted image {path.name} is not a 3D volume (size {image.GetSize()}).",
            hint="Check that the series is a complete structural acquisition.",
        )
    return image


def extract_brain(t1c_atlas: sitk.Image, workdir: Path, flags: list[str]) -> tuple[sitk.Image, str]:
    """deepbet on atlas-space t1c; on failure, the atlas brain mask (flagged: it ignores the child's anatomy).
    Returns the mask and which of the two it is."""
    src, dst = workdir / "t1c_for_bet.nii.gz", workdir / "deepbet_mask.nii.gz"
    write_image(t1c_atlas, src)
    try:
        import torch
        from deepbet import run_bet

        run_bet([str(src)], mask_paths=[str(dst)], threshold=0.5, n_dilate=0, no_gpu=not torch.cuda.is_available())
        mask = sitk.ReadImage(str(dst), sitk.sitkUInt8)
        mask = sitk.Resample(mask, brats_reference_grid(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                             sitk.sitkUInt8)
        if sitk.GetArrayViewFromImage(mask).sum() < 100_000:  # < 100 mL: extraction failed
            raise RuntimeError("deepbet mask implausibly small")
        extraction = "deepbet"
    except Exception as exc:  # any failure of the learned model falls back, loudly
        logger.warning("deepbet brain extraction failed (%s): using the atlas brain mask instead, which does not "
                       "follow this patient's anatomy; review the skull stripping", exc)
        extraction = "atlas-mask-fallback"
        flags.append(f"brain extraction failed ({exc}); the atlas brain mask was used: check the skull stripping")
        mask = load_atlas_brain_mask()
    finally:
        src.unlink(missing_ok=True)
    return mask > 0, extraction


def quality_checks(atlas_space: dict, anchor: str, mask: sitk.Image, extraction: str, flags: list[str],
                   patient_age_years: float | None) -> dict:
    """Similarity of every alignment inside the brain, brain volume against age, fraction of the head kept.
    Appends to `flags`; returns the measured values (QC's remaining fields)."""
    similarity = {}
    for role, image in atlas_space.items():
        if role == anchor:
            continue
        nmi, peak = similarity_peak(image, atlas_space[anchor], mask)
        similarity[f"{role}_vs_{anchor}"] = Similarity(nmi=round(nmi, 4), peak=round(peak, 2))
        if peak < MIN_SIMILARITY_PEAK:
            flags.append(f"{role} to {anchor} alignment is not a clear similarity peak "
                         f"({peak:.2f} < {MIN_SIMILARITY_PEAK}): check the registration")
    brain = sitk.GetArrayViewFromImage(mask) > 0
    # Another person's anatomy: no intensity similarity with the atlas separates right from wrong (the real BraTS
    # case correlates 0.16 with it when aligned), but a rigidly aligned brain lies inside the atlas brain.
    atlas_brain = sitk.GetArrayFromImage(load_atlas_brain_mask()) > 0  # a copy: a view of a temporary dangles
    inside = float((brain & atlas_brain).sum() / max(brain.sum(), 1))
    if inside < MIN_INSIDE_ATLAS_BRAIN and extraction == "deepbet":
        flags.append(f"only {inside:.0%} of the brain lies inside the atlas brain after alignment "
                     f"(expected >= {MIN_INSIDE_ATLAS_BRAIN:.0%}): check the registration to the atlas")
    brain_ml = float(brain.sum()) * float(np.prod(mask.GetSpacing())) / 1000.0
    head = sitk.GetArrayFromImage(_head_mask(atlas_space[anchor])) > 0
    fraction = float((brain & head).sum() / head.sum()) if head.any() else 0.0
    lo, hi = HEAD_FRACTION_BOUNDS
    if not lo <= fraction <= hi:
        flags.append(f"brain mask covers {fraction:.0%} of the head (expected {lo:.0%}-{hi:.0%}): "
                     "check the skull stripping (or an input that was already skull-stripped)")
    flag = brain_volume_flag(brain_ml, patient_age_years)
    if flag:
        flags.append(flag)
    return {"similarity_in_brain": similarity, "brain_inside_atlas_brain": round(inside, 3),
            "brain_volume_ml": round(brain_ml, 1), "mask_fraction_of_head": round(fraction, 3)}


def brain_volume_flag(brain_ml: float, age_years: float | None) -> str | None:
    if age_years is None:
        return None
    lo, hi = next((lo, hi) for max_age, lo, hi in BRAIN_ML_BOUNDS if age_years < max_age)
    if lo <= brain_ml <= hi:
        return None
    return f"brain volume {brain_ml:.0f} mL outside {lo}-{hi} mL expected at age {age_years:g}"


def _head_mask(image: sitk.Image) -> sitk.Image:
    """The head: Otsu foreground, closed and hole-filled (dark bone, sinuses and CSF count as head)."""
    head = sitk.OtsuThreshold(image, 0, 1)
    return sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(head, [3, 3, 3]))


def labels_to_native(atlas_labels: sitk.Image, atlas_to_native_tfm: Path, native_image: Path, *,
                     method: str = "nearest") -> sitk.Image:
    """Map an atlas-space label map onto a source series' native grid (method: see resample_labels)."""
    reference = sitk.ReadImage(str(native_image))
    if reference.GetDimension() == 4:
        size = list(reference.GetSize())
        reference = sitk.Extract(reference, size[:3] + [0], [0, 0, 0, 0])
    native_to_atlas = inverse(sitk.ReadTransform(str(atlas_to_native_tfm)))
    return resample_labels(atlas_labels, reference, native_to_atlas, method=method)
