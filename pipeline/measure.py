"""Tumour measurements: sub-region volumes, connected components and the RAPNO bidimensional product.

Label maps are in the internal BraTS-PEDs 2024 convention (1 ET, 2 NET, 3 CC, 4 ED). Volumes come from the
voxel spacing of each grid, never from an assumed 1 mm. The bidimensional measurement is taken on the
patient-axial plane (LPS-aligned), so it does not depend on how the source grid is oriented.

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

from pedseg.pipeline.errors import PipelineError
from pedseg.pipeline.types import Measurements, RegionMeasure

log = logging.getLogger(__name__)

LABELS_2024 = {"ET": 1, "NET": 2, "CC": 3, "ED": 4}
LABELS_2023 = {"NCR": 1, "ED": 2, "ET": 3}
COMPOSITES = {"TC": ("ET", "NET", "CC"), "WT": ("ET", "NET", "CC", "ED")}
REGIONS = ("ET", "NET", "CC", "ED", "TC", "WT")
REGION_LABELS = {**{k: (v,) for k, v in LABELS_2024.items()},
                 **{k: tuple(LABELS_2024[r] for r in rs) for k, rs in COMPOSITES.items()}}

# 2023 NCR is NET + CC: going back, the cyst cannot be told apart, so NCR becomes NET.
_CONVERSIONS = {
    ("2024", "2023"): {0: 0, 1: 3, 2: 1, 3: 1, 4: 2},
    ("2023", "2024"): {0: 0, 1: 2, 2: 4, 3: 1},
}
MEASURABLE_MM = 10.0  # RAPNO: measurable when both diameters reach 10 mm (informative; not used in the sum)
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_PERP_CHUNK = 256  # rows per block in the pairwise chord search, bounds memory on large lesions


def convert_labels(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Map a label array between BraTS-PEDs "2024" and "2023" conventions (returns a new array).

    2024→2023: ET→3, NET→1, CC→1, ED→2. 2023→2024: NCR→NET (2), ED→4, ET→1; the cystic component is
    lost in 2023 data, so CC never appears after converting back.
    """
    if src == dst:
        if src not in ("2023", "2024"):
            raise ValueError(f"unknown label convention {src!r}")
        return np.array(array, copy=True)
    try:
        mapping = _CONVERSIONS[(src, dst)]
    except KeyError:
        raise ValueError(f"unknown label conversion {src!r} -> {dst!r}") from None
    array = np.asarray(array)
    present = np.unique(array)
    unknown = sorted(set(present.tolist()) - set(mapping))
    if unknown:
        raise ValueError(f"label values {unknown} are not part of the {src} convention")
    lut = np.zeros(max(mapping) + 1, dtype=array.dtype)
    for k, v in mapping.items():
        lut[k] = v
    return lut[array.astype(np.intp, copy=False)]


def voxel_volume_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def label_array(image: sitk.Image) -> np.ndarray:
    """The label map as an array [z, y, x], refusing values outside the 2024 convention."""
    arr = sitk.GetArrayFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.rint(arr)):
        raise PipelineError("The label map holds non-integer values.", hint="This is a bug; please report it.")
    outside = np.unique(arr[(arr < 0) | (arr > max(LABELS_2024.values()))])
    if outside.size:
        raise PipelineError(f"The label map holds values {outside.tolist()} outside BraTS-PEDs 2024 (0-4).",
                            hint="This is a bug; please report it.")
    return arr


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    if region not in REGION_LABELS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    return np.isin(labels, REGION_LABELS[region])


def count_components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=_CONNECTIVITY_26)[1])


def measure(atlas_labels: sitk.Image, native_labels: sitk.Image | None, *, qc_flags: list[str],
            rapno_region: str = "TC", max_lesions: int = 5) -> Measurements:
    """Volumes (atlas and native space), component counts and RAPNO products for every region.

    Both label maps are in the 2024 convention. `Measurements.rapno` is the RAPNO block of `rapno_region`;
    TC and WT both get their sum of products in `bidimensional_mm2`.
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

    blocks = {name: _rapno(atlas, atlas_labels, name, max_lesions=max_lesions)
              for name in dict.fromkeys(("TC", "WT", rapno_region))}
    for name, block in blocks.items():
        regions[name].bidimensional_mm2 = block["sum_product_mm2"]
    log.info("measured: WT %.3f mL in %d component(s), %s RAPNO %.1f mm2 over %d lesion(s)",
             regions["WT"].volume_ml, regions["WT"].components, rapno_region,
             blocks[rapno_region]["sum_product_mm2"], len(blocks[rapno_region]["lesions"]))
    return Measurements(regions=regions, rapno=blocks[rapno_region], qc_flags=list(qc_flags))


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


def rapno(labels: sitk.Image, region: str = "TC", *, max_lesions: int = 5, in_plane_mm: float = 0.5,
          tolerance_deg: float = 5.0) -> dict:
    """RAPNO bidimensional measurement of `region` (see module docstring). Lengths in mm, LPS coordinates."""
    return _rapno(label_array(labels), labels, region, max_lesions=max_lesions, in_plane_mm=in_plane_mm,
                  tolerance_deg=tolerance_deg)


def _rapno(arr: np.ndarray, labels: sitk.Image, region: str, *, max_lesions: int = 5, in_plane_mm: float = 0.5,
           tolerance_deg: float = 5.0) -> dict:
    components, n = ndimage.label(region_mask(arr, region), structure=_CONNECTIVITY_26)
    block = {"region": region, "lesions": [], "sum_product_mm2": 0.0, "lesions_total": int(n),
             "max_lesions": max_lesions, "tolerance_deg": tolerance_deg}
    if n == 0:
        return block
    sizes = np.bincount(components.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")[:max_lesions]
    boxes = ndimage.find_objects(components)
    finest = min(labels.GetSpacing())
    # Each axial slice must hit every source voxel, so never sample coarser than the finest source spacing.
    spacing = (min(in_plane_mm, finest), min(in_plane_mm, finest), finest)
    for index in order:
        lesion = _lesion_image(labels, components, boxes[index], index + 1)
        entry = _measure_lesion(lesion, spacing, tolerance_deg)
        entry["volume_ml"] = float(sizes[index]) * voxel_volume_ml(labels)
        block["lesions"].append(entry)
    block["sum_product_mm2"] = float(sum(e["product_mm2"] for e in block["lesions"]))
    return block


def _lesion_image(labels: sitk.Image, components: np.ndarray, box: tuple[slice, ...], value: int) -> sitk.Image:
    """The lesion cropped to its bounding box, keeping the source geometry (no resampling of the full grid)."""
    crop = sitk.GetImageFromArray((components[box] == value).astype(np.uint8))
    start = [int(s.start) for s in reversed(box)]  # array [z, y, x] -> SimpleITK index (x, y, z)
    crop.SetOrigin(labels.TransformIndexToPhysicalPoint(start))
    crop.SetSpacing(labels.GetSpacing())
    crop.SetDirection(labels.GetDirection())
    return crop


def _measure_lesion(lesion: sitk.Image, spacing: tuple[float, float, float], tolerance_deg: float) -> dict:
    grid = lps_reference(lesion, spacing, margin=1)
    axial = sitk.GetArrayFromImage(
        sitk.Resample(lesion, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    areas = axial.reshape(axial.shape[0], -1).sum(axis=1)
    # Thick source slices give runs of equal-area axial slices: take the middle one, the source slice centre.
    ties = np.flatnonzero(areas == areas.max())
    k = int(ties[len(ties) // 2])
    z_mm = grid.TransformIndexToPhysicalPoint((0, 0, k))[2]
    if areas[k] == 0:  # only a lesion of a few oblique voxels can fall between the sample points
        log.warning("a lesion vanished on axial resampling; reported with zero diameters")
        return _lesion_entry(z_mm, 0.0, 0.0, [[0.0] * 3] * 2, [[0.0] * 3] * 2)
    longest, perp, ends, perp_ends = bidimensional(axial[k].astype(bool), spacing[:2], tolerance_deg)

    def to_lps(xy_mm: np.ndarray) -> list[float]:
        point = grid.TransformContinuousIndexToPhysicalPoint((xy_mm[0] / spacing[0], xy_mm[1] / spacing[1], k))
        return [float(v) for v in point]

    return _lesion_entry(z_mm, longest, perp, [to_lps(p) for p in ends], [to_lps(p) for p in perp_ends])


def _lesion_entry(z_mm: float, longest: float, perp: float, ends: list, perp_ends: list) -> dict:
    return {"slice_z_mm": float(z_mm), "longest_mm": float(longest), "perpendicular_mm": float(perp),
            "product_mm2": float(longest * perp), "measurable": bool(min(longest, perp) >= MEASURABLE_MM),
            "endpoints_lps_mm": ends, "perp_endpoints_lps_mm": perp_ends}


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
