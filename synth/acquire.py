"""Image a phantom the way a scanner would: a subject pose per series, a native grid, slice profile, noise.

Pose: a scanner point p sees phantom point T(p) = c + R (p / s) + t (a similarity: head scale s, small
motion R, t between series). The same transforms give the ground truth on any native grid and the ideal
atlas-space image for training data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pedseg.pipeline.atlas import brats_reference_grid


@dataclass(frozen=True)
class SeriesGeometry:
    plane: str  # "sag", "ax", "cor"
    in_plane_mm: float
    slice_thickness_mm: float
    slice_spacing_mm: float
    fov_mm: tuple[float, float, float]  # (columns, rows, slab) extents in mm
    tilt_deg: float = 0.0  # oblique tilt about the patient left-right axis


def _plane_axes(plane: str, tilt_deg: float) -> np.ndarray:
    """Direction matrix columns: row axis, column axis, slice normal (LPS), DICOM-like defaults per plane."""
    if plane == "sag":
        axes = np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], float).T  # row axis A->P, column axis S->I, normal L->R
    elif plane == "cor":
        axes = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float).T
    else:
        axes = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], float).T
    a = np.deg2rad(tilt_deg)
    tilt = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return tilt @ axes


def native_grid(geom: SeriesGeometry, head_scale: float, slice_spacing_mm: float | None = None) -> sitk.Image:
    """A reference image for the series' voxel grid, centred on the scanner isocentre."""
    spacing_z = slice_spacing_mm or geom.slice_spacing_mm
    extent = np.asarray(geom.fov_mm) * np.array([1.0, 1.0, head_scale])
    size = [int(round(extent[0] / geom.in_plane_mm)), int(round(extent[1] / geom.in_plane_mm)),
            int(round(extent[2] / spacing_z))]
    spacing = np.array([geom.in_plane_mm, geom.in_plane_mm, spacing_z])
    direction = _plane_axes(geom.plane, geom.tilt_deg)
    origin = -direction @ ((np.asarray(size) - 1) * spacing / 2)
    ref = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    ref.SetSpacing(tuple(float(v) for v in spacing))
    ref.SetDirection(tuple(float(v) for v in direction.flatten()))
    ref.SetOrigin(tuple(float(v) for v in origin))
    return ref


def subject_pose(centre_mm, head_scale: float, rng: np.random.Generator,
                 motion: bool = True) -> sitk.Similarity3DTransform:
    """Scanner point -> phantom point. Motion: up to ~3 degrees and ~3 mm between series."""
    pose = sitk.Similarity3DTransform()
    pose.SetCenter((0.0, 0.0, 0.0))
    pose.SetScale(1.0 / head_scale)
    if motion:
        axis = rng.standard_normal(3)
        pose.SetRotation(tuple(axis / np.linalg.norm(axis)), float(np.deg2rad(rng.uniform(-3, 3))))
    shift = rng.uniform(-3, 3, 3) if motion else np.zeros(3)
    pose.SetTranslation(tuple(float(c + d) for c, d in zip(centre_mm, shift)))
    return pose


def acquire(image: sitk.Image, pose: sitk.Transform, geom: SeriesGeometry, head_scale: float,
            rng: np.random.Generator, noise: float = 0.02, *, corrupt: bool = True) -> sitk.Image:
    """Sample `image` on the series grid: 1 mm sub-slices averaged by a Gaussian slice profile, bias, Rician noise.

    `corrupt=False` leaves out the bias field and the noise (and draws nothing from `rng`): for images that are
    real MR data already (synth/reacquire.py).
    """
    fine = native_grid(geom, head_scale, slice_spacing_mm=1.0)
    sampled = sitk.Resample(image, fine, pose, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(sampled)
    if geom.slice_thickness_mm > 1.5:
        arr = ndimage.gaussian_filter1d(arr, geom.slice_thickness_mm / 2.355, axis=0)
    coarse = native_grid(geom, head_scale)
    step = int(round(geom.slice_spacing_mm))
    assert abs(step - geom.slice_spacing_mm) < 1e-6, "synthetic slice spacing must be a whole number of mm"
    start = int(round(((fine.GetSize()[2] - 1) - (coarse.GetSize()[2] - 1) * step) / 2))
    picks = start + step * np.arange(coarse.GetSize()[2])
    arr = arr[picks]
    origin = np.asarray(fine.GetOrigin()) + np.asarray(fine.GetDirection()).reshape(3, 3)[:, 2] * start
    if corrupt:
        arr = arr * _bias_field(arr.shape, rng)
        level = float(np.percentile(arr[arr > 0], 95)) if np.any(arr > 0) else 1.0
        sigma = noise * level
        arr = np.sqrt((arr + rng.normal(0, sigma, arr.shape)) ** 2 + rng.normal(0, sigma, arr.shape) ** 2)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.SetSpacing(coarse.GetSpacing())
    out.SetDirection(coarse.GetDirection())
    out.SetOrigin(tuple(float(v) for v in origin))
    return out


def _bias_field(shape, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """Smooth multiplicative receive-coil bias: exp of a random quadratic over the normalised grid."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    log_bias = np.zeros(shape, np.float32)
    for dim, coord in enumerate(axes):
        view = [1, 1, 1]
        view[dim] = -1
        a, b = rng.uniform(-1, 1, 2)
        log_bias = log_bias + (a * coord + 0.5 * b * coord**2).reshape(view)
    return np.exp(strength * log_bias)


def labels_on_grid(labels: sitk.Image, pose: sitk.Transform, grid: sitk.Image) -> sitk.Image:
    return sitk.Resample(labels, grid, pose, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def scale_about(centre_mm, head_scale: float) -> sitk.Similarity3DTransform:
    """Atlas point q -> phantom point c + (q - c) / s: what an ideal rigid alignment of a smaller head shows."""
    t = sitk.Similarity3DTransform()
    t.SetCenter(tuple(float(c) for c in centre_mm))
    t.SetScale(1.0 / head_scale)
    return t


def ideal_atlas_view(native: sitk.Image, pose: sitk.Similarity3DTransform, atlas_centre_mm,
                     head_scale: float) -> sitk.Image:
    """The native image resampled once into BraTS space as a perfect rigid registration would place it."""
    to_native = sitk.CompositeTransform([pose.GetInverse(), scale_about(atlas_centre_mm, head_scale)])
    return sitk.Resample(native, brats_reference_grid(), to_native, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
