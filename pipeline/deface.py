"""Defacing for bundles trained on defaced, not skull-stripped, images (BraTS-PEDs 2024 and later).

Quickshear (Schimke & Hale, "Quickshear defacing for neuroimages", USENIX HealthSec 2011; the nipy `quickshear`
package): the brain mask's sagittal outline gives the lower convex hull on the face side, and everything below the
line through its first edge, moved `buffer` voxels away from the brain, is set to zero. The brain and everything
above and behind it stay untouched. The package works on nibabel images (RAS affine); SimpleITK images are LPS, so
the affine is converted here and nowhere else.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from quickshear import quickshear

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
BUFFER_VOXELS = 10  # Quickshear's default distance between the shearing plane and the brain


def deface(image: sitk.Image, brain_mask: sitk.Image, buffer_voxels: int = BUFFER_VOXELS) -> sitk.Image:
    """`image` with the face removed, on its own grid; `brain_mask` must share that grid."""
    if image.GetSize() != brain_mask.GetSize() or not np.allclose(_ras_affine(image), _ras_affine(brain_mask)):
        raise ValueError("deface: the image and its brain mask are not on the same grid")
    if not sitk.GetArrayViewFromImage(brain_mask).any():
        raise ValueError("deface: the brain mask is empty, so there is no brain to keep the plane away from")
    anatomy = nib.Nifti1Image(_xyz(image), _ras_affine(image))
    mask = nib.Nifti1Image(_xyz(brain_mask).astype(np.uint8), _ras_affine(brain_mask))
    defaced = np.asarray(quickshear(anatomy, mask, buff=buffer_voxels).dataobj)
    out = sitk.GetImageFromArray(np.ascontiguousarray(defaced.transpose(2, 1, 0)).astype(_xyz(image).dtype))
    out.CopyInformation(image)
    return out


def _xyz(image: sitk.Image) -> np.ndarray:
    """Voxels indexed (x, y, z) as nibabel expects; SimpleITK's arrays are (z, y, x)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _ras_affine(image: sitk.Image) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps
