"""Post-processing as the bundle configures it: small-component removal and label redefinition.

Labels are in the internal convention (pedseg.pipeline.labels); bundle.json names regions, not values. Each
step is recorded so provenance says exactly what changed.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pedseg.pipeline.labels import INTERNAL, internal_value, region_mask
from pedseg.pipeline.types import PostprocessStep

CONNECTIVITY_26 = np.ones((3, 3, 3), bool)


def postprocess(labels: sitk.Image, settings: dict) -> tuple[sitk.Image, list[PostprocessStep]]:
    """bundle.json's "postprocessing" settings (their shape: pipeline/bundle.schema.json), applied in this order:
    small whole-tumour components, small sub-region components, redefinitions, the largest component."""
    arr = sitk.GetArrayFromImage(labels).astype(np.uint8)
    steps: list[PostprocessStep] = []
    min_wt = int(settings.get("min_wt_component_voxels", 0))
    if min_wt:
        steps.append(_drop_small_tumour_components(arr, min_wt))
    for region, min_voxels in settings.get("min_component_voxels", {}).items():
        steps.append(_absorb_small_components(arr, region, int(min_voxels)))
    for rule in settings.get("redefine", []):
        steps.append(_redefine(arr, rule))
    if settings.get("keep_largest_wt"):
        steps.append(_keep_largest(arr))
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(labels)
    return out, steps


def _drop_small_tumour_components(arr: np.ndarray, min_voxels: int) -> PostprocessStep:
    components, n = ndimage.label(arr > 0, CONNECTIVITY_26)
    sizes = np.bincount(components.ravel())
    small = np.flatnonzero(sizes < min_voxels)
    small = small[small > 0]
    removed = int(sizes[small].sum())
    arr[np.isin(components, small)] = 0
    return PostprocessStep("drop whole-tumour components", voxels_changed=removed, min_voxels=min_voxels,
                           components_removed=int(len(small)))


def _absorb_small_components(arr: np.ndarray, region: str, min_voxels: int) -> PostprocessStep:
    """A sub-region speck takes the label that surrounds it most (tumour or background), 26-connected."""
    components, n = ndimage.label(region_mask(arr, region), CONNECTIVITY_26)
    sizes = np.bincount(components.ravel())
    changed = removed = 0
    boxes = ndimage.find_objects(components)
    for index in np.flatnonzero((sizes < min_voxels) & (np.arange(len(sizes)) > 0)):
        sl = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in boxes[index - 1])
        blob = components[sl] == index
        shell = ndimage.binary_dilation(blob, CONNECTIVITY_26) & ~blob
        neighbours = arr[sl][shell]
        replacement = int(np.bincount(neighbours).argmax()) if neighbours.size else 0
        arr[sl][blob] = replacement
        changed += int(blob.sum())
        removed += 1
    return PostprocessStep(f"absorb small {region} components", voxels_changed=changed, min_voxels=min_voxels,
                           components_removed=removed)


def _redefine(arr: np.ndarray, rule: dict) -> PostprocessStep:
    """E.g. {"region": "ET", "below_fraction_of_wt": 0.02, "to": "NET"}: too little ET to be believed."""
    source, target = (internal_value(INTERNAL, rule[key]) for key in ("region", "to"))
    wt = int((arr > 0).sum())
    count = int((arr == source).sum())
    applied = wt > 0 and 0 < count < rule["below_fraction_of_wt"] * wt
    if applied:
        arr[arr == source] = target
    return PostprocessStep(f"redefine {rule['region']} as {rule['to']} below {rule['below_fraction_of_wt']:.0%} of WT",
                           voxels_changed=count if applied else 0, applied=applied)


def _keep_largest(arr: np.ndarray) -> PostprocessStep:
    components, n = ndimage.label(arr > 0, CONNECTIVITY_26)
    if n <= 1:
        return PostprocessStep("keep largest whole-tumour component", voxels_changed=0)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    drop = (components > 0) & (components != sizes.argmax())
    arr[drop] = 0
    return PostprocessStep("keep largest whole-tumour component", voxels_changed=int(drop.sum()))
