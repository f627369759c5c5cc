"""Report figures: tri-planar overlays and an axial montage, rendered with matplotlib (Agg) to PNG bytes.

Orientation is radiological and is decided in one place, `radiological_plane`: axial slices show patient
anterior at the top and patient right on the image left; coronal and sagittal show superior at the top
(sagittal with anterior on the left). Images are first resampled onto an LPS-aligned grid, so the
on-disk voxel order (RAS NIfTI, oblique, permuted) cannot change what is displayed.
"""
from __future__ import annotations

import datetime as dt
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib import dates as mdates
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from pedseg.pipeline.labels import BASE_REGIONS, INTERNAL, LABEL_VALUES, REGIONS
from pedseg.pipeline.longitudinal import Longitudinal
from pedseg.pipeline.measure import lps_reference

logger = logging.getLogger(__name__)

ALPHA = 0.45
DPI = 150
MONTAGE_SLICES = 12
_CROP_MARGIN = 4  # display voxels around the brain
# Edge letters per view (left, right, top, bottom) in radiological display.
_EDGE_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
VIEWS = ("axial", "coronal", "sagittal")
TREND_COLUMNS = 3
RESPONSE_COLOURS = {"PD": "#c0392b", "PR": "#1f5fbf", "CR": "#1f5fbf", "SD": "#555555", "NE": "#999999"}


def display_grid(reference: sitk.Image) -> sitk.Image:
    """LPS-aligned isotropic grid (finest spacing of `reference`) covering the reference's extent."""
    spacing = min(reference.GetSpacing())
    return lps_reference(reference, (spacing, spacing, spacing))


def to_display(image: sitk.Image, grid: sitk.Image, *, label: bool) -> np.ndarray:
    """Resample onto `grid`; the array axes are [z: inferior→superior, y: anterior→posterior, x: right→left]."""
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    pixel = sitk.sitkUInt8 if label else sitk.sitkFloat32
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), interpolator, 0, pixel))


def radiological_plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """A 2D slice of a `to_display` volume, ready for imshow(origin="upper") in radiological convention.

    axial: rows anterior→posterior, columns patient right→left (array x already runs R→L).
    coronal: rows superior→inferior, columns right→left. sagittal: rows superior→inferior, columns
    anterior→posterior. Only the z axis needs flipping, because array row 0 is drawn at the top.
    """
    if view == "axial":
        return volume[index]
    if view == "coronal":
        return volume[::-1, index, :]
    if view == "sagittal":
        return volume[::-1, :, index]
    raise ValueError(f"unknown view {view!r}")


@dataclass
class DisplayData:
    bases: dict[str, np.ndarray]  # role -> intensity volume, cropped to the brain
    labels: np.ndarray
    spacing: float
    z_mm: np.ndarray  # LPS z of each axial index of the cropped volume

    @property
    def empty(self) -> bool:
        return not self.labels.any()


def load_display_data(images: dict[str, Path], labels: sitk.Image) -> DisplayData:
    """`labels`: internal convention (pedseg.pipeline.labels), on any grid."""
    label_image = sitk.Cast(labels, sitk.sitkUInt8)
    grid = display_grid(label_image)
    label_vol = to_display(label_image, grid, label=True)
    bases = {role: to_display(sitk.ReadImage(str(path), sitk.sitkFloat32), grid, label=False)
             for role, path in images.items()}
    box = _brain_box(list(bases.values()) + [label_vol])
    z0 = box[0].start
    z_mm = np.array([grid.TransformIndexToPhysicalPoint((0, 0, z0 + k))[2] for k in range(box[0].stop - z0)])
    return DisplayData({r: v[box] for r, v in bases.items()}, label_vol[box], grid.GetSpacing()[0], z_mm)


def _brain_box(volumes: list[np.ndarray]) -> tuple[slice, ...]:
    """Bounding box of anything non-zero (skull-stripped images are zero outside the brain), with a margin."""
    nonzero = np.zeros(volumes[0].shape, dtype=bool)
    for v in volumes:
        nonzero |= v != 0
    found = ndimage.find_objects(nonzero.astype(np.uint8))
    if not found:
        return tuple(slice(0, n) for n in nonzero.shape)
    return tuple(slice(max(s.start - _CROP_MARGIN, 0), min(s.stop + _CROP_MARGIN, n))
                 for s, n in zip(found[0], nonzero.shape))


def tumour_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Centroid of the whole tumour in display indices; the volume centre when there is no tumour."""
    if not labels.any():
        return tuple(n // 2 for n in labels.shape)
    return tuple(int(round(c)) for c in ndimage.center_of_mass(labels > 0))


def _window(volume: np.ndarray) -> tuple[float, float]:
    values = volume[volume != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, (0.5, 99.5))
    if hi <= lo:  # a flat image (phantom): mid-grey rather than black
        lo, hi = lo - 1.0, hi + 1.0
    return float(lo), float(hi)


def overlay_rgba(labels2d: np.ndarray) -> np.ndarray:
    """Each sub-region in its colour from the label table (the SEG's recommended display colours)."""
    rgba = np.zeros(labels2d.shape + (4,), dtype=float)
    for name in BASE_REGIONS:
        rgba[labels2d == LABEL_VALUES[INTERNAL][name]] = (*_rgb(name), ALPHA)
    return rgba


def _rgb(region: str) -> tuple[float, float, float]:
    return tuple(channel / 255 for channel in REGIONS[region].colour)


def _draw(ax, base2d: np.ndarray, labels2d: np.ndarray, window: tuple[float, float], view: str | None) -> None:
    ax.imshow(base2d, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    ax.imshow(overlay_rgba(labels2d), interpolation="nearest")
    ax.set_axis_off()
    if view:
        left, right, top, bottom = _EDGE_LETTERS[view]
        style = {"color": "white", "fontsize": 7, "fontweight": "bold", "transform": ax.transAxes}
        ax.text(0.02, 0.5, left, ha="left", va="center", **style)
        ax.text(0.98, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.98, top, ha="center", va="top", **style)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _legend(fig: Figure) -> None:
    handles = [Patch(facecolor=(*_rgb(name), ALPHA + 0.3), edgecolor="black",
                     label=f"{name} {REGIONS[name].display_name.lower()}") for name in BASE_REGIONS]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def triplanar_png(base: np.ndarray, labels: np.ndarray, centre: tuple[int, int, int], title: str) -> bytes:
    """Axial, coronal and sagittal planes through `centre` (display indices z, y, x) with the label overlay."""
    fig = Figure(figsize=(7.2, 3.0))
    window = _window(base)
    axes = fig.subplots(1, 3)
    for ax, view, index in zip(axes, VIEWS, centre):
        _draw(ax, radiological_plane(base, view, index), radiological_plane(labels, view, index), window, view)
        ax.set_title(view, fontsize=8)
    fig.suptitle(title, fontsize=9)
    _legend(fig)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.1, wspace=0.04)
    return _png(fig)


def montage_indices(labels: np.ndarray, count: int = MONTAGE_SLICES) -> list[int]:
    """Up to `count` axial indices evenly spread over the tumour's superior-inferior extent."""
    z = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if z.size == 0:
        return []
    return sorted(set(np.linspace(z[0], z[-1], num=min(count, z[-1] - z[0] + 1)).round().astype(int).tolist()))


def montage_png(base: np.ndarray, labels: np.ndarray, indices: list[int], z_mm: np.ndarray, title: str) -> bytes:
    """Axial slices, inferior to superior, left to right and top to bottom."""
    cols = 4
    rows = max(1, -(-len(indices) // cols))
    fig = Figure(figsize=(7.2, 1.9 * rows + 0.6))
    window = _window(base)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, k in zip(axes, indices):
        _draw(ax, radiological_plane(base, "axial", k), radiological_plane(labels, "axial", k), window,
              "axial" if ax is axes[0] else None)
        ax.set_title(f"z = {z_mm[k]:.0f} mm", fontsize=7)
    fig.suptitle(title, fontsize=9)
    _legend(fig)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.45 / fig.get_figheight(),
                        bottom=0.3 / fig.get_figheight(), wspace=0.03, hspace=0.15)
    return _png(fig)


# What a radiologist calls each sequence, in figure titles.
SEQUENCE_NAMES = {"t1n": "Pre-contrast T1", "t1c": "Post-contrast T1", "t2w": "T2", "t2f": "T2-FLAIR"}


def report_figures(images: dict[str, Path], labels: sitk.Image) -> dict[str, bytes]:
    """PNG figures keyed "triplanar_<role>" (t1c and t2f when given) and "montage" (absent without tumour)."""
    data = load_display_data(images, labels)
    roles = [r for r in ("t1c", "t2f") if r in data.bases] or list(data.bases)[:1]
    centre = tumour_centre(data.labels)
    figures = {f"triplanar_{role}": triplanar_png(data.bases[role], data.labels, centre,
                                                  f"{SEQUENCE_NAMES.get(role, role)} with segmentation overlay")
               for role in roles}
    indices = montage_indices(data.labels)
    if indices:
        role = roles[0]
        figures["montage"] = montage_png(data.bases[role], data.labels, indices, data.z_mm,
                                         f"Axial slices through the tumour extent "
                                         f"({SEQUENCE_NAMES.get(role, role)})")
    logger.debug("rendered %d report figure(s)", len(figures))
    return figures


def trend_png(longitudinal: Longitudinal) -> bytes:
    """Volume over study date, one panel per compared region: baseline (open square) and that region's nadir
    (triangle) marked, this study coloured by its response category."""
    points = [*longitudinal.priors, longitudinal.current]
    dates = [dt.datetime.strptime(tp.study_date, "%Y%m%d") for tp in points]
    regions = list(longitudinal.changes)
    rows = -(-len(regions) // TREND_COLUMNS)
    fig = Figure(figsize=(7.2, 1.9 * rows + 0.5))
    axes = fig.subplots(rows, TREND_COLUMNS, squeeze=False).ravel()
    for ax in axes[len(regions):]:
        ax.set_axis_off()
    for ax, region in zip(axes, regions):
        change = longitudinal.changes[region]
        volumes = [tp.volumes_ml[region] for tp in points]
        nadir = next(i for i, tp in enumerate(points) if tp.study_uid == change.nadir_study_uid)
        ax.plot(dates, volumes, color="#333333", marker="o", markersize=3, linewidth=1)
        ax.plot(dates[0], volumes[0], "s", ms=8, mfc="none", mec="#1f5fbf", mew=1.5, label="baseline")
        ax.plot(dates[nadir], volumes[nadir], "v", ms=7, color="#2e8b57", label="nadir")
        ax.plot(dates[-1], volumes[-1], "o", ms=6, color=RESPONSE_COLOURS[change.response], label="this study")
        ax.set_title(f"{region}: {change.response}", fontsize=8)
        ax.set_ylim(bottom=0, top=max(volumes) * 1.15 or 1.0)
        ax.set_ylabel("mL", fontsize=7)
        locator = mdates.AutoDateLocator(maxticks=4)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.tick_params(labelsize=6.5)
        ax.grid(alpha=0.3, linewidth=0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.3 / fig.get_figheight(), bottom=0.45 / fig.get_figheight(),
                        wspace=0.35, hspace=0.6)
    return _png(fig)
