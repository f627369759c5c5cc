"""BraTS-style preprocessing: every sequence rigidly to t1c, t1c rigidly to the BraTS atlas, one resampling
per image into BraTS space, brain extraction with deepbet, and every transform kept for the way back.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.atlas import brats_reference_grid, load_atlas_brain_mask, load_atlas_t1
from pipeline.config import PipelineConfig
from pipeline.errors import UnsupportedDataError
from pipeline.ingest import convert_series
from pipeline.registration import compose, inverse, masked_correlation, register_rigid, resample, resample_labels
from pipeline.types import Identification, Preprocessed, Session

logger = logging.getLogger(__name__)

# Expected brain volume (mL) by age, wide bounds: 1 y ~ 900, 3 y ~ 1100, adolescents ~ 1200-1500.
BRAIN_ML_BOUNDS = ((2, 600, 1500), (6, 800, 1700), (200, 900, 1900))


def preprocess(session: Session, identification: Identification, workdir: Path, config: PipelineConfig) -> Preprocessed:
    roles = list(identification.chosen)
    native_dir, atlas_dir = workdir / "native", workdir / "atlas"
    atlas_dir.mkdir(parents=True, exist_ok=True)
    native_paths = {role: convert_series(session.by_uid(identification.chosen[role]), native_dir) for role in roles}
    native = {role: _read_volume(path) for role, path in native_paths.items()}
    frames = {role: session.by_uid(identification.chosen[role]).header.frame_of_reference_uid for role in roles}
    anchor = config.reference_role if config.reference_role in native else "t1c" if "t1c" in native else roles[0]

    qc: dict = {"registration": {}, "flags": []}
    t0 = time.perf_counter()
    atlas_t1 = load_atlas_t1()
    atlas_to_anchor, metric = register_rigid(atlas_t1, native[anchor], same_frame=False)
    qc["registration"][f"{anchor}_to_atlas_mattes_mi"] = round(metric, 4)
    transforms: dict[str, sitk.Transform] = {anchor: atlas_to_anchor}
    for role in roles:
        if role == anchor:
            continue
        same_frame = bool(frames[role]) and frames[role] == frames[anchor]
        anchor_to_role, metric = register_rigid(native[anchor], native[role], same_frame=same_frame)
        qc["registration"][f"{role}_to_{anchor}_mattes_mi"] = round(metric, 4)
        transforms[role] = compose(atlas_to_anchor, anchor_to_role)
    logger.info("registration of %d series took %.1f s", len(roles), time.perf_counter() - t0)

    reference = brats_reference_grid()
    atlas_space = {role: resample(native[role], reference, transforms[role]) for role in roles}
    transform_paths = {}
    for role, transform in transforms.items():
        transform_paths[role] = atlas_dir / f"{role}_atlas_to_native.tfm"
        sitk.WriteTransform(transform, str(transform_paths[role]))

    mask = _brain_mask(atlas_space[anchor], atlas_dir, qc)
    images = {}
    for role, image in atlas_space.items():
        images[role] = atlas_dir / f"{role}.nii.gz"
        sitk.WriteImage(sitk.Mask(image, mask), str(images[role]), useCompression=True)
    mask_path = atlas_dir / "brain_mask.nii.gz"
    sitk.WriteImage(mask, str(mask_path), useCompression=True)

    _quality_checks(atlas_space, anchor, atlas_t1, mask, qc, config)
    return Preprocessed(images=images, brain_mask=mask_path, native=native_paths, atlas_to_native=transform_paths, qc=qc)


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


def _brain_mask(t1c_atlas: sitk.Image, workdir: Path, qc: dict) -> sitk.Image:
    """deepbet on atlas-space t1c; on failure, the atlas brain mask (flagged: it ignores the child's anatomy)."""
    src, dst = workdir / "t1c_for_bet.nii.gz", workdir / "deepbet_mask.nii.gz"
    sitk.WriteImage(t1c_atlas, str(src), useCompression=True)
    t0 = time.perf_counter()
    try:
        from deepbet import run_bet

        import torch

        run_bet([str(src)], mask_paths=[str(dst)], threshold=0.5, n_dilate=0, no_gpu=not torch.cuda.is_available())
        mask = sitk.ReadImage(str(dst), sitk.sitkUInt8)
        mask = sitk.Resample(mask, brats_reference_grid(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        if sitk.GetArrayViewFromImage(mask).sum() < 100_000:  # < 100 mL: extraction failed
            raise RuntimeError("deepbet mask implausibly small")
        qc["brain_extraction"] = "deepbet"
    except Exception as exc:  # any failure of the learned model falls back, loudly
        logger.warning("deepbet brain extraction failed (%s); using the atlas brain mask instead", exc)
        qc["brain_extraction"] = "atlas-mask-fallback"
        qc["flags"].append("brain extraction fell back to the atlas mask: check the skull stripping")
        mask = load_atlas_brain_mask()
    finally:
        src.unlink(missing_ok=True)
    logger.info("brain extraction (%s) took %.1f s", qc["brain_extraction"], time.perf_counter() - t0)
    return mask > 0


def _quality_checks(atlas_space: dict, anchor: str, atlas_t1: sitk.Image, mask: sitk.Image, qc: dict,
                    config: PipelineConfig) -> None:
    qc["correlation_in_brain"] = {f"{anchor}_vs_atlas": round(masked_correlation(atlas_space[anchor], atlas_t1, mask), 3)}
    for role, image in atlas_space.items():
        if role != anchor:
            qc["correlation_in_brain"][f"{role}_vs_{anchor}"] = round(masked_correlation(image, atlas_space[anchor], mask), 3)
    if qc["correlation_in_brain"][f"{anchor}_vs_atlas"] < 0.4:
        qc["flags"].append(f"{anchor} aligns poorly with the atlas (correlation below 0.4): check registration")
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    brain_ml = float(sitk.GetArrayViewFromImage(mask).sum()) * voxel_ml
    qc["brain_volume_ml"] = round(brain_ml, 1)
    head = sitk.GetArrayViewFromImage(atlas_space[anchor]) > np.percentile(sitk.GetArrayViewFromImage(atlas_space[anchor]), 60)
    qc["mask_fraction_of_head"] = round(float((sitk.GetArrayViewFromImage(mask)[head] > 0).mean()), 3) if head.any() else 0.0
    age = config.patient_age_years
    if age is not None:
        lo, hi = next((lo, hi) for max_age, lo, hi in BRAIN_ML_BOUNDS if age < max_age)
        if not lo <= brain_ml <= hi:
            qc["flags"].append(f"brain volume {brain_ml:.0f} mL outside {lo}-{hi} mL expected at age {age:g}")


def labels_to_native(atlas_labels: sitk.Image, atlas_to_native_tfm: Path, native_image: Path, *,
                     method: str = "nearest") -> sitk.Image:
    """Map an atlas-space label map onto a source series' native grid (method: see resample_labels)."""
    reference = sitk.ReadImage(str(native_image))
    if reference.GetDimension() == 4:
        size = list(reference.GetSize())
        reference = sitk.Extract(reference, size[:3] + [0], [0, 0, 0, 0])
    native_to_atlas = inverse(sitk.ReadTransform(str(atlas_to_native_tfm)))
    return resample_labels(atlas_labels, reference, native_to_atlas, method=method)


def labels_to_atlas(native_labels: sitk.Image, atlas_to_native_tfm: Path, *, method: str = "distance") -> sitk.Image:
    """Map a label map drawn on a source series' native grid into BraTS space. "distance" by default: from thick
    slices it puts boundaries where the shape crosses between slices rather than at the nearest slice."""
    return resample_labels(native_labels, brats_reference_grid(), sitk.ReadTransform(str(atlas_to_native_tfm)), method=method)


def native_point_to_atlas(point_lps_mm, atlas_to_native_tfm: Path) -> tuple[float, float, float]:
    return inverse(sitk.ReadTransform(str(atlas_to_native_tfm))).TransformPoint(tuple(float(v) for v in point_lps_mm))
