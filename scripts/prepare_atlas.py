"""Copy the shared BraTS-space atlas into package data, on the BraTS release grid (see pipeline/atlas.py).

The two shared atlas files store the same physical box with different axis orders; resampling them onto
one grid in physical space (nearest neighbour: a pure axis permutation, no interpolation) removes the
ambiguity once. The brain mask is the support of the skull-stripped atlas.
Usage: python scripts/prepare_atlas.py ../shared/data/atlas
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import SimpleITK as sitk

from pedseg.pipeline.atlas import ATLAS_BRAIN_MASK, ATLAS_DIR, ATLAS_T1, brats_reference_grid


def main(src: Path) -> None:
    ref = brats_reference_grid()
    t1 = sitk.ReadImage(str(src / "t1_brats_space.nii.gz"))
    stripped = sitk.ReadImage(str(src / "t1_skullstripped_brats_space.nii.gz"))
    ATLAS_DIR.mkdir(parents=True, exist_ok=True)
    t1_ref = sitk.Resample(t1, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    sitk.WriteImage(t1_ref, str(ATLAS_T1), useCompression=True)
    mask = sitk.Resample(stripped, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0) > 0
    sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8), str(ATLAS_BRAIN_MASK), useCompression=True)
    shutil.copy(src / "COPYRIGHT.md", ATLAS_DIR / "COPYRIGHT.md")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
