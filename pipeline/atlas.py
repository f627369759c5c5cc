"""The BraTS reference space: 240x240x155 voxels of 1 mm, in the voxel order of BraTS releases.

BraTS NIfTI files read by SimpleITK have identity direction and origin (0, -239, 0) (LPS). Models trained on
BraTS data (nnU-Net learns from array order) must get arrays in that same order, so every atlas-space image
this tool writes uses exactly this grid.
"""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

ATLAS_DIR = Path(__file__).resolve().parent / "data" / "atlas"
ATLAS_T1 = ATLAS_DIR / "t1_brats_space.nii.gz"
ATLAS_BRAIN_MASK = ATLAS_DIR / "brain_mask_brats_space.nii.gz"

BRATS_SIZE = (240, 240, 155)
BRATS_ORIGIN = (0.0, -239.0, 0.0)


def brats_reference_grid(pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
    """An empty image carrying the BraTS grid, used as the resampling reference."""
    ref = sitk.Image(BRATS_SIZE, pixel_type)
    ref.SetSpacing((1.0, 1.0, 1.0))
    ref.SetOrigin(BRATS_ORIGIN)
    ref.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    return ref


def load_atlas_t1() -> sitk.Image:
    return sitk.ReadImage(str(ATLAS_T1), sitk.sitkFloat32)


def load_atlas_brain_mask() -> sitk.Image:
    return sitk.ReadImage(str(ATLAS_BRAIN_MASK), sitk.sitkUInt8)
