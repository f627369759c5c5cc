"""Which of two T1-weighted series was acquired after gadolinium, from the images, when no header says so.

Gadolinium shortens T1 where it reaches: vessels, the dural sinuses, the choroid plexus, the pituitary stalk and
an enhancing tumour turn bright on a post-contrast T1, while white matter, behind the blood-brain barrier, does
not change. So the two series are aligned (rigidly, `registration.register_rigid`), each one's intensities are
mapped onto the other's scale (quantile matching: unchanged tissue sets the map), and the voxels brighter than
the map predicts by more than a fraction of the white-matter level are counted both ways. Misregistration,
different slice profiles and different T1 sequences brighten and darken about as many voxels each way; contrast
only brightens. The log of the ratio of the two counts is the image evidence; acquisition order (a post-contrast
scan follows the injection) and, where present, the series' names are added as smaller, fixed amounts of
evidence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.filters import threshold_otsu

from pedseg.pipeline.registration import register_rigid, resample, working_copy

# The grid the two series are compared on: fine enough for sinuses and choroid plexus, coarse enough that two
# acquisitions with different slice thickness look alike.
COMPARE_MM = 2.0
# A voxel "became brighter" when it is this much above what the other image predicts, in units of the white-matter
# level. Enhancing vessels and sinuses gain 0.5-1.5; two T1 sequences' tissue contrasts differ by up to about 0.45.
GAIN = 0.6
# Voxels counted either way are at least this fraction of the head, so a clean pair does not divide by ~0.
FLOOR_FRACTION = 0.002
# Evidence (log-odds) from the images per unit of log count ratio, and the fixed evidence of acquisition order
# and of names: each alone is a tie-breaker, never a decision against clear images.
IMAGE_LOGIT_PER_LOG_RATIO = 2.0
ORDER_LOGIT = 0.7
NAME_LOGIT = 1.0
# Voxels this close to either series' field-of-view edge are left out.
FOV_MARGIN_VOXELS = 2
# Quantiles matched between the two images; brighter voxels follow a straight line (see `matched`).
MATCHED_UP_TO = 90.0
# Fewer voxels than this along any axis of the comparison grid (a few slices, a test stub) cannot be registered.
MIN_VOXELS = 8
# Below this confidence, no series is made post-contrast: the run stops and asks the user (`--role t1c=SERIES`).
MIN_CONFIDENCE = 0.9


@dataclass(frozen=True)
class Enhancement:
    """What the images say about a pair: `later` gained brightness where gadolinium goes if log_ratio > 0."""

    brighter_in_later: float  # fraction of head voxels that gained more than GAIN from earlier to later
    brighter_in_earlier: float
    log_ratio: float


@dataclass(frozen=True)
class ContrastCall:
    """The decision for one pair of T1 series: which is post-contrast, how sure, and why, in words."""

    post: str  # series key
    pre: str
    confidence: float
    reasons: tuple[str, ...]


def enhancement(earlier: sitk.Image, later: sitk.Image, *, same_frame: bool) -> Enhancement:
    """Align `later` to `earlier`, map the earlier image's intensities onto the later one's scale, and count the
    voxels that are brighter than predicted each way, inside the head both images cover."""
    fixed = working_copy(earlier, COMPARE_MM)
    for image in (fixed, working_copy(later, COMPARE_MM)):
        if min(image.GetSize()) < MIN_VOXELS:
            raise ValueError(f"a {COMPARE_MM:g} mm copy of {image.GetSize()} voxels is too small to compare")
    transform, _ = register_rigid(fixed, later, same_frame=same_frame)
    later_copy = working_copy(later, COMPARE_MM)
    moving = resample(later_copy, fixed, transform)
    a, b = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(moving)
    # Well inside both fields of view (a 2D stack rarely covers the whole head, and its last slices blur into the
    # padding), and where either shows tissue: a ventricle dark before contrast keeps its choroid plexus, bright
    # after.
    ones = sitk.Image(later_copy.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(later_copy)
    inside = sitk.GetArrayFromImage(resample(ones, fixed, transform)) > 0.999
    inside[[0, -1], :, :] = inside[:, [0, -1], :] = inside[:, :, [0, -1]] = False
    inside = ndimage.binary_erosion(inside, iterations=FOV_MARGIN_VOXELS)
    head = inside & (a > 0) & (b > 0) & (_tissue(a) | _tissue(b))
    a, b = a[head], b[head]
    up = float(np.mean(b - matched(a, b) > GAIN * _tissue_level(b)))
    down = float(np.mean(a - matched(b, a) > GAIN * _tissue_level(a)))
    return Enhancement(up, down, math.log((up + FLOOR_FRACTION) / (down + FLOOR_FRACTION)))


def matched(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`source` intensities on `target`'s scale: the quantiles up to the 90th matched (the bulk of unchanged
    tissue: two T1 sequences, or two scanners' scalings, differ by a monotone map that this undoes), and above
    them the straight line through the 50th and 90th, so the brightest few percent, where enhancement lives, are
    not matched away."""
    levels = np.linspace(1.0, MATCHED_UP_TO, 90)
    qs, qt = np.percentile(source, levels), np.percentile(target, levels)
    mid = np.searchsorted(levels, 50.0)
    slope = (qt[-1] - qt[mid]) / max(qs[-1] - qs[mid], 1e-6)
    return np.where(source > qs[-1], qt[-1] + slope * (source - qs[-1]), np.interp(source, qs, qt))


def _tissue_level(values: np.ndarray) -> float:
    """The median of the brighter tissue (above Otsu): about white matter on a T1; the unit of GAIN."""
    upper = values[values > _otsu(values)]
    return float(np.median(upper)) if upper.size else float(values.max()) or 1.0


def decide(earlier: str, later: str, evidence: Enhancement, *,
           names: tuple[bool, bool] = (False, False)) -> ContrastCall:
    """Combine the image evidence with acquisition order and names (`names`: whether the earlier / later series'
    name marks it post-contrast) into one call, with a confidence in [0.5, 1]."""
    logit = IMAGE_LOGIT_PER_LOG_RATIO * evidence.log_ratio + ORDER_LOGIT + NAME_LOGIT * (names[1] - names[0])
    post, pre = (later, earlier) if logit >= 0 else (earlier, later)
    confidence = 1.0 / (1.0 + math.exp(-abs(logit)))
    gained, lost = ((evidence.brighter_in_later, evidence.brighter_in_earlier) if post == later
                    else (evidence.brighter_in_earlier, evidence.brighter_in_later))
    reasons = [f"images: {100 * gained:.2f}% of the head is brighter by more than {GAIN:g}× white matter than "
               f"the other T1 predicts (vessels, dural sinuses, choroid plexus, pituitary, enhancing tissue), against "
               f"{100 * lost:.2f}% the other way"]
    reasons.append("acquisition order: acquired after the other T1" if post == later
                   else "acquisition order: acquired before the other T1 (the images outweigh it)")
    if any(names):
        reasons.append("names: " + ("its name marks it post-contrast" if names[1 if post == later else 0]
                                    else "the other T1's name marks it post-contrast (the images outweigh it)"))
    return ContrastCall(post=post, pre=pre, confidence=confidence, reasons=tuple(reasons))


def _tissue(values: np.ndarray) -> np.ndarray:
    """Voxels above the Otsu threshold of the non-zero ones: the head (or, skull-stripped, the brain tissue)."""
    return values > _otsu(values[values > 0])


def _otsu(values: np.ndarray) -> float:
    return float(threshold_otsu(values)) if values.size and values.min() < values.max() else 0.0
