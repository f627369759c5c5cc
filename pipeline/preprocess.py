"""BraTS-style preprocessing: every sequence rigidly to t1c, t1c rigidly to the BraTS atlas, one resampling
per image into BraTS space, brain extraction with deepbet, and every transform kept for the way back.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pedseg.pipeline.atlas import brats_reference_grid, load_atlas_brain_mask, load_atlas_t1
from pedseg.pipeline.atomic import write_image
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.deface import deface
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

# Expected brain volume (mL, deepbet's mask: cerebrum, cerebellum, brainstem, with ventricles and some CSF) by age:
# (upper age in years, low, high). The ages are from birth, so the first band also holds preterm infants near
# term-equivalent age. Norms (brain tissue, without CSF; deepbet's mask reads somewhat larger):
# - birth: 347 mL (boys) and 336 mL (girls) at term, growing ~1 %/day to +64 % at 3 months (Holland et al. 2014,
#   JAMA Neurol 71:1266, "Structural growth trajectories and rates of change in the first 3 months of infant brain
#   development"); very preterm infants at term-equivalent age 379 +- 72 mL (meta-analysis of 13 studies, Romberg
#   et al. 2022, Arch Dis Child Fetal Neonatal Ed 107:520), so 230 mL is about their mean - 2 SD;
# - ~470 mL at 2-4 weeks, +101 % in the first year (~950 mL) and +15 % in the second (~1090 mL) (Knickmeyer et al.
#   2008, J Neurosci 28:12176, "A structural MRI study of human brain development from birth to 2 years"), SDs
#   ~8-10 %: below 700 mL at 1-2 years is beyond -3 SD (the band's old 500 mL floor let a failed extraction through);
# - grey matter peaks at ~6 years, the cerebrum at ~12.5 years, adults ~1100-1600 mL (Bethlehem et al. 2022,
#   Nature 604:525, "Brain charts for the human lifespan"; Courchesne et al. 2000, Radiology 216:672).
# The first year is split because volume doubles in it (the old 300-1100 mL band for under 6 months let a 2.7x
# overestimate of a 2-month-old's brain through).
BRAIN_ML_BOUNDS = ((0.25, 230, 700), (0.5, 400, 850), (1, 500, 1100), (2, 700, 1500), (6, 800, 1700),
                   (200, 900, 1900))
# A brain outside these at any age (mL) is physically implausible: most likely the header's voxel spacing is wrong
# (a brain at 2x the true spacing reads 8x its volume). The floor sits below a very preterm infant's brain at
# term-equivalent age (Romberg 2022: 379 +- 72 mL), the ceiling above adult macrocephaly (~2000 mL).
BRAIN_ML_PHYSICAL = (200, 2500)
# Head extent (mm) left-right and front-back, from the Otsu head mask in BraTS space (the BraTS box is 240 mm across
# and 155 mm high, so top-to-bottom is cut off and not checked). A term newborn's head is ~90-95 mm wide
# (biparietal diameter at 40 weeks, Hadlock et al. 1982, Radiology 152:497) and an adult's at most ~210 mm long
# with scalp: outside 80-230 mm suggests a wrong voxel spacing, or a head mask that caught the coil or padding.
HEAD_EXTENT_MM = (80.0, 230.0)
# Head circumference (cm) by age, as (upper age in years, low, high): the -3 SD of girls at the band's start and the
# +3 SD of boys at its end in the WHO Child Growth Standards (head circumference-for-age, 2007, z-score tables):
# 30.3 / 44.1 (0-3 months), 35.8 / 47.0 (3-6), 38.3 / 49.9 (6-12), 40.8 / 52.3 (1-2 years), 43.0 / 55.2 (2-5),
# rounded to whole cm; from 6 years to adults 46-62 cm (WHO ends at 5 years: Nellhaus 1968, Pediatrics 41:106,
# adults ~52-60 cm +- 3 SD). The circumference is estimated as the perimeter of the ellipse of the head mask's
# largest axial section.
HEAD_CIRCUMFERENCE_CM = ((0.25, 30, 44), (0.5, 36, 47), (1, 38, 50), (2, 41, 53), (6, 43, 56), (200, 46, 62))
# Two chosen roles whose atlas-space images correlate above this inside the brain are one acquisition twice: the
# same images registered to themselves correlate ~1. Other contrasts correlate far less or negatively (T2 against
# T1: -0.85 to -0.91 on synthetic sessions), but the synthetic t1n and t1c, which share every healthy tissue
# signal, reach 0.95-0.989 through noise and bias alone, hence 0.995 rather than 0.99.
MAX_ROLE_CORRELATION = 0.995
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
               patient_age_years: float | None = None,
               preparations: Collection[str] = ("skull_stripped",)) -> Preprocessed:
    """Every chosen series converted, registered to the reference series (identification.reference_role), that
    to the atlas, resampled once into BraTS space and skull-stripped. `patient_age_years` bounds the brain
    volume check (None: no age, no check). `preparations`: the brain preparations the bundle's members declared;
    besides the skull-stripped images (always made: QC and the report use them), "defaced" writes the heads
    with the face removed (Quickshear on the brain mask) and "none" the whole heads, each once per run."""
    roles = list(identification.chosen)
    native_dir, atlas_dir = workdir / "native", workdir / "atlas"
    atlas_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:  # SimpleITK's filters and registration; one thread also makes registration repeat exactly
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(config.threads)
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
        # An infant's head is much smaller than the adult atlas (registration.SMALL_HEAD_RATIO).
        small_head = None if patient_age_years is None else patient_age_years < 1.0
        atlas_to_anchor, metric = register_rigid(atlas_t1, driving[anchor], same_frame=False, small_head=small_head)
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
        prepared = {brain: _write_prepared(atlas_space, mask, brain, atlas_dir / brain)
                    for brain in sorted(set(preparations) - {"skull_stripped"})}
    with step("quality checks"):
        checks = quality_checks(atlas_space, anchor, mask, extraction, flags, patient_age_years)
    qc = QC(registration=registration, flags=tuple(flags), step_seconds=step.seconds, brain_extraction=extraction,
            **checks)
    return Preprocessed(images=images, brain_mask=mask_path, native=native_paths, atlas_to_native=transform_paths,
                        qc=qc, prepared=prepared)


def _write_prepared(atlas_space: dict[str, sitk.Image], mask: sitk.Image, brain: str, folder: Path) -> dict[str, Path]:
    """The atlas-space heads, defaced or whole, as a member declared it was trained on."""
    folder.mkdir(exist_ok=True)
    paths = {}
    for role, image in atlas_space.items():
        paths[role] = folder / f"{role}.nii.gz"
        write_image(deface(image, mask) if brain == "defaced" else image, paths[role])
    return paths


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
    """Similarity of every alignment inside the brain, brain volume against age (and any age), fraction of the
    head kept, head size against age (and any age), roles that are one acquisition twice.
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
    head_image = _head_mask(atlas_space[anchor])
    head = sitk.GetArrayFromImage(head_image) > 0
    fraction = float((brain & head).sum() / head.sum()) if head.any() else 0.0
    lo, hi = HEAD_FRACTION_BOUNDS
    if not lo <= fraction <= hi:
        flags.append(f"brain mask covers {fraction:.0%} of the head (expected {lo:.0%}-{hi:.0%}): "
                     "check the skull stripping (or an input that was already skull-stripped)")
    flag = brain_volume_flag(brain_ml, patient_age_years)
    if flag:
        flags.append(flag)
    extent = head_extent_mm(head, head_image.GetSpacing())
    for flag in (head_extent_flag(extent), head_circumference_flag(extent, patient_age_years)):
        if flag:
            flags.append(flag)
            break  # a head the wrong size for any age is not also the wrong size for this age
    flags.extend(same_acquisition_flags(atlas_space, mask))
    return {"similarity_in_brain": similarity, "brain_inside_atlas_brain": round(inside, 3),
            "brain_volume_ml": round(brain_ml, 1), "mask_fraction_of_head": round(fraction, 3)}


def brain_volume_flag(brain_ml: float, age_years: float | None) -> str | None:
    """The brain volume against every age (a wrong voxel spacing), then against the patient's age."""
    lo, hi = BRAIN_ML_PHYSICAL
    if not lo <= brain_ml <= hi:
        return (f"brain volume {brain_ml:.0f} mL is implausible at any age (expected {lo}-{hi} mL): the voxel "
                "spacing in the image header may be wrong, or the skull stripping failed")
    if age_years is None:
        return None
    lo, hi = next((lo, hi) for max_age, lo, hi in BRAIN_ML_BOUNDS if age_years < max_age)
    if lo <= brain_ml <= hi:
        return None
    return (f"brain volume {brain_ml:.0f} mL outside {lo}-{hi} mL expected at age {age_years:g}: check the skull "
            "stripping and the patient's age (tumour volumes of a brain this far off may be wrong too)")


@dataclass(frozen=True)
class HeadExtent:
    """The head mask's size in BraTS space (mm): left-right and front-back over the whole head, and both on its
    largest axial section (for the circumference)."""

    left_right: float
    front_back: float
    section_left_right: float
    section_front_back: float

    @property
    def circumference_cm(self) -> float:
        """Ramanujan's perimeter of the ellipse with the largest axial section's extents as axes."""
        a, b = self.section_left_right / 2, self.section_front_back / 2
        return float(np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))) / 10.0


def head_extent_mm(head: np.ndarray, spacing: tuple[float, float, float]) -> HeadExtent | None:
    """`head`: the head mask as an array [z, y, x] on a grid with axes along the patient's (BraTS space)."""
    if not head.any():
        return None
    zyx = np.argwhere(head)
    span = (zyx.max(axis=0) - zyx.min(axis=0) + 1) * np.asarray(spacing[::-1])
    k = int(np.argmax(head.reshape(head.shape[0], -1).sum(axis=1)))
    yx = np.argwhere(head[k])
    section = (yx.max(axis=0) - yx.min(axis=0) + 1) * np.asarray(spacing[1::-1])
    return HeadExtent(left_right=float(span[2]), front_back=float(span[1]), section_left_right=float(section[1]),
                      section_front_back=float(section[0]))


def head_extent_flag(extent: HeadExtent | None) -> str | None:
    """A head too small or too large for any age: most likely a wrong voxel spacing."""
    if extent is None:
        return "no head found in the reference image (Otsu foreground empty): check the image and its voxel spacing"
    lo, hi = HEAD_EXTENT_MM
    wrong = [f"{name} {mm:.0f} mm" for name, mm in (("left-right", extent.left_right),
                                                    ("front-back", extent.front_back)) if not lo <= mm <= hi]
    if not wrong:
        return None
    return (f"head extent {', '.join(wrong)} is implausible at any age (expected {lo:.0f}-{hi:.0f} mm): the voxel "
            "spacing in the image header may be wrong")


def head_circumference_flag(extent: HeadExtent | None, age_years: float | None) -> str | None:
    """The head's estimated circumference against the patient's age."""
    if extent is None or age_years is None:
        return None
    lo, hi = next((lo, hi) for max_age, lo, hi in HEAD_CIRCUMFERENCE_CM if age_years < max_age)
    cm = extent.circumference_cm
    if lo <= cm <= hi:
        return None
    return (f"head circumference about {cm:.0f} cm (from the head mask) outside {lo}-{hi} cm expected at age "
            f"{age_years:g}: check the patient's age and the voxel spacing")


def same_acquisition_flags(atlas_space: dict, mask: sitk.Image, stride: int = 3) -> list[str]:
    """A flag for every pair of chosen roles whose atlas-space images correlate above MAX_ROLE_CORRELATION inside
    the brain: one acquisition chosen twice (say, t1n and t1c the same images)."""
    zyx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[::stride]  # every few brain voxels, as similarity_peak
    if len(zyx) < 1000:
        return []
    values = {role: sitk.GetArrayViewFromImage(image)[tuple(zyx.T)].astype(np.float64)
              for role, image in atlas_space.items()}
    flags = []
    roles = list(values)
    for i, first in enumerate(roles):
        for second in roles[i + 1:]:
            a, b = values[first], values[second]
            if a.std() == 0 or b.std() == 0:
                continue
            r = float(np.corrcoef(a, b)[0, 1])
            if r > MAX_ROLE_CORRELATION:
                flags.append(f"{first} and {second} look like one acquisition (correlation {r:.3f} inside the "
                             f"brain > {MAX_ROLE_CORRELATION}): check that two different series were chosen")
    return flags


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
