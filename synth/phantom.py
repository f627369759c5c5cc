"""Synthetic pediatric brain-tumour phantoms built on the BraTS-space atlas.

A phantom is the atlas head with a simulated tumour made of the four BraTS-PEDs sub-regions
(1 ET enhancing, 2 NET non-enhancing, 3 CC cyst, 4 ED edema) and four MR contrasts synthesised
from tissue classes. Everything is in the atlas frame; `synth.acquire` images it in scanner space.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.stats import norm
from skimage.filters import threshold_multiotsu

from pedseg.pipeline.atlas import load_atlas_brain_mask, load_atlas_t1

ET, NET, CC, ED = 1, 2, 3, 4

# Relative signal per tissue and contrast (normal WM on T1 = 1). Sources: typical 1.5/3 T appearance:
# enhancing rim bright on t1c only; cyst T1-dark, T2-bright, incompletely suppressed on FLAIR;
# edema T2/FLAIR-bright and mildly T1-dark; CSF suppressed on FLAIR.
TISSUE_SIGNAL = {
    #        t1n   t1c   t2w   t2f
    "csf": (0.35, 0.35, 1.00, 0.10),
    "gm": (0.70, 0.70, 0.58, 0.68),
    "wm": (1.00, 1.00, 0.40, 0.50),
    ET: (0.72, 1.55, 0.72, 0.78),
    NET: (0.62, 0.66, 0.80, 0.82),
    CC: (0.28, 0.30, 1.05, 0.38),
    ED: (0.74, 0.74, 0.86, 0.98),
}
ROLE_INDEX = {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}


@dataclass(frozen=True)
class TumourParams:
    centre_mm: tuple[float, float, float]  # LPS, atlas frame
    core_radius_mm: float
    axes_scale: tuple[float, float, float]
    edema_extent: float  # edema reaches this many core radii beyond the core
    et_fraction: float  # 0 = non-enhancing tumour (e.g. DMG), 1 = full enhancing rim
    et_thickness_mm: float
    cyst_radius_frac: float  # 0 = no cyst
    head_scale: float  # < 1 for younger children


@dataclass
class Phantom:
    images: dict[str, sitk.Image]  # role -> float32 atlas-frame image
    labels: sitk.Image  # uint8 BraTS-PEDs 2024 labels
    brain_mask: sitk.Image
    params: TumourParams


def _smooth_noise(shape, rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _tissue_probabilities(t1: np.ndarray, brain: np.ndarray) -> dict[str, np.ndarray]:
    """Soft CSF/GM/WM memberships from the atlas T1 intensity (keeps partial volume at edges)."""
    lo, hi = threshold_multiotsu(t1[brain], 3)
    width = 0.08 * (hi - lo)
    p_above_lo = 1 / (1 + np.exp(-(t1 - lo) / width))
    p_above_hi = 1 / (1 + np.exp(-(t1 - hi) / width))
    return {"csf": 1 - p_above_lo, "gm": p_above_lo - p_above_hi, "wm": p_above_hi}


def sample_params(rng: np.random.Generator, brain: np.ndarray, origin, growth: float = 1.0) -> TumourParams:
    """Random tumour placement inside the brain, away from its surface."""
    inner = ndimage.binary_erosion(brain, iterations=18)
    zyx = np.argwhere(inner)
    z, y, x = zyx[rng.integers(len(zyx))]
    centre = (origin[0] + x, origin[1] + y, origin[2] + z)
    radius = float(rng.uniform(9.0, 20.0)) * growth ** (1 / 3)
    has_et = rng.random() > 0.2
    has_cyst = rng.random() > 0.45
    return TumourParams(
        centre_mm=tuple(float(c) for c in centre),
        core_radius_mm=radius,
        axes_scale=tuple(float(a) for a in rng.uniform(0.75, 1.25, 3)),
        edema_extent=float(rng.uniform(0.25, 0.9)),
        et_fraction=float(rng.uniform(0.5, 1.0)) if has_et else 0.0,
        et_thickness_mm=float(rng.uniform(2.0, 4.5)),
        cyst_radius_frac=float(rng.uniform(0.35, 0.6)) if has_cyst else 0.0,
        head_scale=float(rng.uniform(0.84, 1.04)),
    )


def _tumour_box(params: TumourParams, shape, origin) -> tuple[slice, ...]:
    """Array slices (z, y, x) of a box holding the whole tumour with its edema: all the work happens there."""
    reach = params.core_radius_mm * max(params.axes_scale) * (1 + params.edema_extent + 0.6) + 6
    centre_idx = [params.centre_mm[i] - origin[i] for i in range(3)]  # x, y, z voxel (1 mm, identity grid)
    return tuple(
        slice(max(0, int(centre_idx[axis] - reach)), min(shape[dim], int(centre_idx[axis] + reach) + 1))
        for dim, axis in enumerate((2, 1, 0))
    )


def _tumour_labels(params: TumourParams, box_shape, box_origin, brain: np.ndarray, rng) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in box_shape), indexing="ij")
    cx, cy, cz = params.centre_mm
    offsets = np.stack([xx + box_origin[0] - cx, yy + box_origin[1] - cy, zz + box_origin[2] - cz])
    rotation = _random_rotation(rng)
    rotated = np.tensordot(rotation, offsets, axes=1)
    scaled = rotated / np.asarray(params.axes_scale, dtype=np.float32)[:, None, None, None]
    dist = np.sqrt((scaled**2).sum(0)) / params.core_radius_mm  # 1 at the core boundary
    dist = dist + 0.12 * _smooth_noise(box_shape, rng, 6.0)  # irregular margins

    labels = np.zeros(box_shape, np.uint8)
    edema_noise = 0.2 * _smooth_noise(box_shape, rng, 8.0)
    labels[(dist < 1 + params.edema_extent + edema_noise) & brain] = ED
    core = (dist < 1) & brain
    labels[core] = NET
    if params.et_fraction > 0:
        shell = core & (dist > 1 - params.et_thickness_mm / params.core_radius_mm)
        # A smooth unit-variance field below its et_fraction quantile: patchy enhancement of that extent.
        patchy = _smooth_noise(box_shape, rng, 4.0) < norm.ppf(min(params.et_fraction, 0.999))
        labels[shell & patchy] = ET
    if params.cyst_radius_frac > 0:
        shift = rng.uniform(-0.3, 0.3, 3) * params.core_radius_mm
        cyst_dist = np.sqrt(((rotated - shift[:, None, None, None]) ** 2).sum(0))
        cyst = core & (cyst_dist < params.cyst_radius_frac * params.core_radius_mm) & (labels != ET)
        labels[cyst] = CC
    return labels


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=np.float32,
    )


def make_phantom(seed: int, growth: float = 1.0, params: TumourParams | None = None) -> Phantom:
    """Build one phantom. `growth` scales tumour volume (longitudinal series of one subject)."""
    rng = np.random.default_rng(seed)
    t1_img = load_atlas_t1()
    mask_img = load_atlas_brain_mask()
    t1 = sitk.GetArrayFromImage(t1_img)
    brain = sitk.GetArrayFromImage(mask_img) > 0
    origin = t1_img.GetOrigin()
    if params is None:
        params = sample_params(rng, brain, origin, growth)
    box = _tumour_box(params, t1.shape, origin)
    box_origin = tuple(origin[axis] + box[dim].start for dim, axis in zip((2, 1, 0), (0, 1, 2)))
    labels = np.zeros(t1.shape, np.uint8)
    labels[box] = _tumour_labels(params, labels[box].shape, box_origin, brain[box], rng)

    wm_level = float(np.mean(t1[brain & (t1 > threshold_multiotsu(t1[brain], 3)[1])]))
    tissue = _tissue_probabilities(t1, brain)
    texture = 1 + 0.04 * _smooth_noise(labels[box].shape, rng, 1.5)
    images = {}
    for role, idx in ROLE_INDEX.items():
        brain_signal = sum(tissue[name] * TISSUE_SIGNAL[name][idx] for name in ("csf", "gm", "wm"))
        # Outside the brain keep the atlas' own scalp/skull appearance, scaled per contrast.
        outside_gain = {"t1n": 1.0, "t1c": 1.0, "t2w": 0.7, "t2f": 0.6}[role]
        signal = np.where(brain, brain_signal, outside_gain * t1 / wm_level).astype(np.float32)
        local = signal[box]
        for label in (ED, NET, CC, ET):
            soft = ndimage.gaussian_filter((labels[box] == label).astype(np.float32), 0.7)
            local = local * (1 - soft) + soft * TISSUE_SIGNAL[label][idx] * texture
        signal[box] = local
        img = sitk.GetImageFromArray(signal * 1000)
        img.CopyInformation(t1_img)
        images[role] = img
    label_img = sitk.GetImageFromArray(labels)
    label_img.CopyInformation(t1_img)
    return Phantom(images=images, labels=label_img, brain_mask=mask_img, params=params)
