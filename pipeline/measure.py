"""Tumour measurements: sub-region volumes, connected components and the RAPNO bidimensional product.

Label maps are in the internal convention (pedseg.pipeline.labels). Volumes come from the
voxel spacing of each grid, never from an assumed 1 mm. The bidimensional measurement is taken on the
reference series' native label map (the patient as scanned; the atlas grid only when there is none), on the
patient-axial plane (LPS-aligned), so it does not depend on how the source grid is oriented, and its endpoints
are the patient's LPS coordinates, where a viewer draws them on the source images.

RAPNO method (see docs/measurements-schema.md):
1. 3D connected components (26-connectivity) of the region on its own grid are the lesions, largest first;
   at most `max_lesions` (5) are measured.
2. Each lesion is resampled (nearest neighbour) onto an axial grid aligned to the patient LPS axes, with
   isotropic in-plane spacing (0.5 mm, finer if the source is finer) and slices at the finest source spacing;
   its axial slice of largest area is kept (the middle one of equal-area runs, i.e. a thick slice's centre).
3. On that slice the lesion boundary is the 0.5 iso-contour of the mask (pixel-edge midpoints). The longest
   diameter is the largest distance between convex-hull points (max Feret diameter).
4. The perpendicular diameter is the longest chord between two boundary points whose direction lies within
   ±5° of the exact perpendicular, measured as its extent along the exact perpendicular (length × cos of the
   deviation). Boundary points may belong to separate islands of the same lesion; a chord may cross a
   concavity, as a caliper would.
5. Product = longest × perpendicular; the sum of products runs over the measured lesions. A lesion is flagged
   `measurable` when both diameters reach 10 mm; the flag does not change the sum.
"""
from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform
from skimage.measure import find_contours

from pedseg.pipeline.errors import InternalError
from pedseg.pipeline.labels import INTERNAL, LABEL_VALUES, REGIONS, region_mask
from pedseg.pipeline.types import Lesion, Measurements, Rapno, RegionMeasure, Uncertainty

logger = logging.getLogger(__name__)

MEASURABLE_MM = 10.0  # RAPNO: measurable when both diameters reach 10 mm (informative; not used in the sum)
# A whole tumour over this share of the brain mask's volume (both in BraTS space) is implausible: the largest
# paediatric tumours at diagnosis stay well below it, so the segmentation (or the brain mask) is likely wrong.
MAX_WT_FRACTION_OF_BRAIN = 0.5
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_PERP_CHUNK = 256  # rows per block in the pairwise chord search, bounds memory on large lesions


def voxel_volume_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def label_array(image: sitk.Image) -> np.ndarray:
    """The label map as an array [z, y, x], refusing values outside the internal convention (a bug upstream)."""
    arr = sitk.GetArrayFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.rint(arr)):
        raise InternalError("The label map holds non-integer values.")
    top = max(LABEL_VALUES[INTERNAL].values())
    outside = np.unique(arr[(arr < 0) | (arr > top)])
    if outside.size:
        raise InternalError(f"The label map holds values {outside.tolist()} outside BraTS-PEDs {INTERNAL} (0-{top}).")
    return arr


def count_components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=_CONNECTIVITY_26)[1])


def measure(atlas_labels: sitk.Image, native_labels: sitk.Image | None, *, qc_flags: list[str],
            uncertainty: Uncertainty | None = None, rapno_region: str = "TC", max_lesions: int = 5,
            brain_volume_ml: float | None = None) -> Measurements:
    """Volumes (atlas and native space), component counts and RAPNO products for every region (on the native
    grid when given, else on the atlas grid).

    Both label maps are in the internal convention. `Measurements.rapno` is the RAPNO measurement of
    `rapno_region`; TC and WT both get their sum of products in `bidimensional_mm2`. `uncertainty`: the model's
    (pipeline.infer.uncertainty_summary), carried along. `brain_volume_ml`: the atlas-space brain mask's
    volume (QC.brain_volume_ml); given, a whole tumour implausibly large against it adds a QC flag.
    """
    atlas = label_array(atlas_labels)
    native = label_array(native_labels) if native_labels is not None else None
    atlas_voxel_ml = voxel_volume_ml(atlas_labels)
    native_voxel_ml = voxel_volume_ml(native_labels) if native_labels is not None else None

    regions: dict[str, RegionMeasure] = {}
    for name in REGIONS:
        mask = region_mask(atlas, name)
        voxels = int(mask.sum())
        regions[name] = RegionMeasure(
            name=name,
            voxels=voxels,
            volume_ml=voxels * atlas_voxel_ml,
            components=count_components(mask) if voxels else 0,
            native_volume_ml=(int(region_mask(native, name).sum()) * native_voxel_ml
                              if native is not None else None),
        )

    # RAPNO is read on the patient's own images: on the reference series' grid when there is one, so diameters
    # and endpoints are in that series' patient LPS coordinates (the atlas' coordinates are not the patient's).
    rapno_arr, rapno_labels = (native, native_labels) if native is not None else (atlas, atlas_labels)
    blocks = {name: _rapno(rapno_arr, rapno_labels, name, max_lesions=max_lesions)
              for name in dict.fromkeys(("TC", "WT", rapno_region))}
    for name, block in blocks.items():
        regions[name].bidimensional_mm2 = block.sum_product_mm2
    flags = list(qc_flags)
    flag = tumour_fraction_flag(regions["WT"].volume_ml, brain_volume_ml)
    if flag:
        flags.append(flag)
    return Measurements(regions=regions, rapno=blocks[rapno_region], qc_flags=flags, uncertainty=uncertainty)


def tumour_fraction_flag(wt_ml: float, brain_ml: float | None) -> str | None:
    """A QC flag when the whole tumour is over MAX_WT_FRACTION_OF_BRAIN of the brain volume (both atlas space)."""
    if not brain_ml or brain_ml <= 0:
        return None
    share = wt_ml / brain_ml
    if share <= MAX_WT_FRACTION_OF_BRAIN:
        return None
    return (f"whole tumour {wt_ml:.0f} mL is {share:.0%} of the brain volume {brain_ml:.0f} mL (implausible above "
            f"{MAX_WT_FRACTION_OF_BRAIN:.0%}): check the segmentation and the skull stripping")


def lps_reference(image: sitk.Image, spacing: tuple[float, float, float], *, margin: int = 0) -> sitk.Image:
    """An empty grid with identity direction (axes along patient L, P, S) covering `image`'s physical extent.

    The extent is that of the voxel boxes (centres ± half a voxel), padded by `margin` output voxels.
    """
    size = image.GetSize()
    corners = [image.TransformContinuousIndexToPhysicalPoint([c - 0.5 for c in corner])
               for corner in itertools.product(*[(0, s) for s in size])]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    spacing_arr = np.asarray(spacing, dtype=float)
    out_size = np.ceil((hi - lo) / spacing_arr).astype(int) + 2 * margin
    ref = sitk.Image([int(max(n, 1)) for n in out_size], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(s) for s in spacing_arr))
    ref.SetOrigin(tuple(float(v) for v in lo + spacing_arr * (0.5 - margin)))
    ref.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    return ref


def _rapno(arr: np.ndarray, labels: sitk.Image, region: str, *, max_lesions: int = 5, in_plane_mm: float = 0.5,
           tolerance_deg: float = 5.0) -> Rapno:
    """RAPNO bidimensional measurement of `region` (see module docstring). Lengths in mm, LPS coordinates."""
    components, n = ndimage.label(region_mask(arr, region), structure=_CONNECTIVITY_26)
    if n == 0:
        return Rapno(region=region, lesions=(), sum_product_mm2=0.0, lesions_total=0, max_lesions=max_lesions,
                     tolerance_deg=tolerance_deg)
    sizes = np.bincount(components.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")[:max_lesions]
    boxes = ndimage.find_objects(components)
    finest = min(labels.GetSpacing())
    # Each axial slice must hit every source voxel, so never sample coarser than the finest source spacing.
    spacing = (min(in_plane_mm, finest), min(in_plane_mm, finest), finest)
    lesions = tuple(_measure_lesion(_lesion_image(labels, components, boxes[index], index + 1), spacing,
                                    tolerance_deg, volume_ml=float(sizes[index]) * voxel_volume_ml(labels))
                    for index in order)
    return Rapno(region=region, lesions=lesions, sum_product_mm2=float(sum(lesion.product_mm2 for lesion in lesions)),
                 lesions_total=int(n), max_lesions=max_lesions, tolerance_deg=tolerance_deg)


def _lesion_image(labels: sitk.Image, components: np.ndarray, box: tuple[slice, ...], value: int) -> sitk.Image:
    """The lesion cropped to its bounding box, keeping the source geometry (no resampling of the full grid)."""
    crop = sitk.GetImageFromArray((components[box] == value).astype(np.uint8))
    start = [int(s.start) for s in reversed(box)]  # array [z, y, x] -> SimpleITK index (x, y, z)
    crop.SetOrigin(labels.TransformIndexToPhysicalPoint(start))
    crop.SetSpacing(labels.GetSpacing())
    crop.SetDirection(labels.GetDirection())
    return crop


def _measure_lesion(lesion: sitk.Image, spacing: tuple[float, float, float], tolerance_deg: float, *,
                    volume_ml: float) -> Lesion:
    grid = lps_reference(lesion, spacing, margin=1)
    axial = sitk.GetArrayFromImage(
        sitk.Resample(lesion, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    areas = axial.reshape(axial.shape[0], -1).sum(axis=1)
    # Thick source slices give runs of equal-area axial slices: take the middle one, the source slice centre.
    ties = np.flatnonzero(areas == areas.max())
    k = int(ties[len(ties) // 2])
    z_mm = grid.TransformIndexToPhysicalPoint((0, 0, k))[2]
    if areas[k] == 0:  # only a lesion of a few oblique voxels can fall between the sample points
        logger.warning("a lesion vanished on axial resampling; reported with zero diameters")
        origin = (0.0, 0.0, 0.0)
        return _lesion(z_mm, 0.0, 0.0, (origin, origin), (origin, origin), volume_ml)
    longest, perp, ends, perp_ends = bidimensional(axial[k].astype(bool), spacing[:2], tolerance_deg)

    def to_lps(xy_mm: np.ndarray) -> tuple[float, float, float]:
        point = grid.TransformContinuousIndexToPhysicalPoint((xy_mm[0] / spacing[0], xy_mm[1] / spacing[1], k))
        return tuple(float(v) for v in point)

    return _lesion(z_mm, longest, perp, tuple(to_lps(p) for p in ends), tuple(to_lps(p) for p in perp_ends), volume_ml)


def _lesion(z_mm: float, longest: float, perp: float, ends: tuple, perp_ends: tuple, volume_ml: float) -> Lesion:
    return Lesion(slice_z_mm=float(z_mm), longest_mm=float(longest), perpendicular_mm=float(perp),
                  product_mm2=float(longest * perp), measurable=bool(min(longest, perp) >= MEASURABLE_MM),
                  endpoints_lps_mm=ends, perp_endpoints_lps_mm=perp_ends, volume_ml=volume_ml)


def bidimensional(mask: np.ndarray, spacing_xy: tuple[float, float], tolerance_deg: float = 5.0):
    """Longest diameter and its perpendicular on a 2D mask [row=y, col=x] with pixel spacing (x, y) in mm.

    Returns (longest_mm, perpendicular_mm, (p0, p1), (q0, q1)) with points as (x, y) in mm from pixel (0, 0).
    """
    contours = find_contours(np.pad(mask.astype(np.uint8), 1), 0.5)
    points = (np.concatenate(contours) - 1.0)[:, ::-1] * np.asarray(spacing_xy)  # (row, col) -> (x, y) mm
    try:
        hull = points[ConvexHull(points).vertices]
    except QhullError:  # degenerate (collinear) outline: every point is a hull candidate
        hull = points
    distances = squareform(pdist(hull))
    i, j = np.unravel_index(int(np.argmax(distances)), distances.shape)
    longest = float(distances[i, j])
    axis = (hull[j] - hull[i]) / longest
    normal = np.array([-axis[1], axis[0]])
    tan_tol = math.tan(math.radians(tolerance_deg))
    best, best_pair = 0.0, (points[0], points[0])
    for start in range(0, len(points), _PERP_CHUNK):
        diff = points[start:start + _PERP_CHUNK, None, :] - points[None, :, :]
        across = np.abs(diff @ normal)
        along = np.abs(diff @ axis)
        across = np.where(along <= tan_tol * across, across, 0.0)
        a, b = np.unravel_index(int(np.argmax(across)), across.shape)
        if across[a, b] > best:
            best, best_pair = float(across[a, b]), (points[start + a], points[b])
    return longest, best, (hull[i], hull[j]), best_pair
