"""Registration accuracy on real brains and the atlas <-> native round trip of label maps.

Accuracy: a real image is re-acquired through a known random rigid pose (+-20 degrees, +-20 mm) on another
grid (thick axial slices, oblique slices, coarser voxels; slice profile, bias field and noise from
synth.acquire), registered back with `register_rigid`, and the recovered transform is compared with the truth
at every sampled brain voxel.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import dcm2niix
import numpy as np
import pytest
import SimpleITK as sitk

from pedseg.evaluation import mask_dice
from pedseg.pipeline.atlas import brats_reference_grid, load_atlas_brain_mask, load_atlas_t1
from pedseg.pipeline.preprocess import (
    HEAD_FRACTION_BOUNDS,
    MIN_SIMILARITY_PEAK,
    brain_volume_flag,
    extract_brain,
    labels_to_native,
    quality_checks,
)
from pedseg.pipeline.registration import bias_corrected, register_rigid, resample_labels, similarity_peak
from pedseg.synth.acquire import SeriesGeometry, acquire, native_grid

BRATS_CASE = Path("nifti") / "brats_space_BraTS-GLI-00001-000"
AXIAL_2D_4MM = SeriesGeometry("ax", 1.0, 4.0, 4.0, (240.0, 240.0, 180.0))
OBLIQUE_2D_5MM = SeriesGeometry("ax", 0.9, 5.0, 5.0, (230.0, 230.0, 170.0), tilt_deg=15.0)
CORONAL_3D_COARSE = SeriesGeometry("cor", 1.2, 2.0, 2.0, (240.0, 240.0, 200.0))
SAGITTAL_3D = SeriesGeometry("sag", 1.0, 1.0, 1.0, (240.0, 240.0, 176.0))


# ------------------------------------------------------------------------------------------------ helpers


def _random_pose(rng: np.random.Generator, head_centre) -> sitk.Euler3DTransform:
    """Scanner point -> image point: the head at a random rotation (+-20 deg per axis) and a random offset
    (+-20 mm) from the scanner isocentre, where synth.acquire centres the native grid."""
    pose = sitk.Euler3DTransform()
    pose.SetRotation(*(float(a) for a in np.deg2rad(rng.uniform(-20, 20, 3))))
    pose.SetTranslation(tuple(float(c + d) for c, d in zip(head_centre, rng.uniform(-20, 20, 3))))
    return pose


def _affine(transform: sitk.Euler3DTransform) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with T(x) = A x + b, for vectorised evaluation at many points."""
    a = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c, t = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    return a, c + t - a @ c


def _voxel_points(mask: sitk.Image, step: int = 5) -> np.ndarray:
    """Physical (LPS mm) positions of every `step`-th voxel of a mask, N x 3."""
    ijk = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[::step, ::-1].astype(float)
    direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    return np.asarray(mask.GetOrigin()) + (ijk * np.asarray(mask.GetSpacing())) @ direction.T


def _centroid(mask: sitk.Image) -> tuple[float, float, float]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    return stats.GetCentroid(1)


def _registration_errors(fixed: sitk.Image, moving_source: sitk.Image, brain: sitk.Image, geometry: SeriesGeometry,
                         seed: int) -> np.ndarray:
    """Re-acquire `moving_source` (aligned with `fixed`) through a random pose, register, return errors in mm."""
    rng = np.random.default_rng(seed)
    pose = _random_pose(rng, _centroid(brain))
    moving = acquire(moving_source, pose, geometry, 1.0, rng)
    found, _ = register_rigid(fixed, moving, same_frame=False)
    # Registration maps fixed points to scanner points; the truth is the inverse pose.
    truth = pose.GetInverse()
    points = _voxel_points(brain)
    (a1, b1), (a2, b2) = _affine(found), _affine(truth)
    return np.linalg.norm(points @ (a1 - a2).T + (b1 - b2), axis=1)


def _assert_accurate(errors: np.ndarray) -> None:
    median, worst = float(np.median(errors)), float(errors.max())
    assert median <= 1.0, f"median {median:.2f} mm, worst {worst:.2f} mm"
    assert worst <= 2.0, f"median {median:.2f} mm, worst {worst:.2f} mm"


@pytest.fixture(scope="module")
def brats_case(shared_data):
    folder = shared_data / BRATS_CASE
    return {role: sitk.ReadImage(str(folder / f"BraTS-GLI-00001-000-{role}.nii.gz"), sitk.sitkFloat32)
            for role in ("t1c", "t2f")}


def _mprage(shared_data: Path, folder: str, outdir: Path) -> sitk.Image:
    subprocess.run([dcm2niix.bin, "-z", "n", "-b", "n", "-f", "mprage", "-o", str(outdir),
                    str(shared_data / "dicom" / folder)], check=True, capture_output=True, timeout=120)
    return sitk.ReadImage(str(outdir / "mprage.nii"), sitk.sitkFloat32)


def _head_mask(image: sitk.Image) -> sitk.Image:
    """Otsu foreground: the whole head and neck, a superset of the brain, so its error bound is the stricter."""
    return sitk.OtsuThreshold(image, 0, 1)


# ----------------------------------------------------------------------------------------------- accuracy


def test_flair_thick_axial_slices_register_to_t1c_of_the_real_brats_case(brats_case):
    """Cross-contrast (FLAIR onto T1 post-contrast), 4 mm axial slices, error over the skull-stripped brain.
    (Not t2w: this case's own t2w sits ~0.9 mm from its t1c, so it cannot serve as ground truth.)"""
    brain = brats_case["t1c"] > 0
    _assert_accurate(_registration_errors(brats_case["t1c"], brats_case["t2f"], brain, AXIAL_2D_4MM, seed=1))


def test_pediatric_mprage_registers_back_from_a_coarse_coronal_acquisition(shared_data, tmp_path):
    """The real 3-year-old's sagittal MPRAGE re-acquired coronally at 1.2 x 1.2 x 2 mm."""
    mprage = _mprage(shared_data, "siemens_skyra_mprage_pediatric_3y", tmp_path)
    _assert_accurate(_registration_errors(mprage, mprage, _head_mask(mprage), CORONAL_3D_COARSE, seed=2))


@pytest.mark.slow
@pytest.mark.parametrize("role,geometry,seed", [("t2f", OBLIQUE_2D_5MM, 3), ("t1c", OBLIQUE_2D_5MM, 8)])
def test_oblique_slices_register_to_t1c_of_the_real_brats_case(brats_case, role, geometry, seed):
    brain = brats_case["t1c"] > 0
    _assert_accurate(_registration_errors(brats_case["t1c"], brats_case[role], brain, geometry, seed))


@pytest.mark.slow
@pytest.mark.parametrize("folder,geometry,seed", [
    ("siemens_skyra_mprage_pediatric_3y", AXIAL_2D_4MM, 4),
    ("philips_ingenia_adni_mprage", OBLIQUE_2D_5MM, 5),
    ("ge_signa_ir_spgr", AXIAL_2D_4MM, 6),
    ("ge_signa_ir_spgr", CORONAL_3D_COARSE, 7),
], ids=["skyra-3y-axial-4mm", "philips-oblique-5mm", "ge-vial-phantom-axial-4mm", "ge-vial-phantom-coronal-1.2mm"])
def test_real_mprages_register_back_from_other_grids(shared_data, tmp_path, folder, geometry, seed):
    """The shared GE "IR-SPGR" series images a phantom of vials, not a head: kept as a non-brain object."""
    mprage = _mprage(shared_data, folder, tmp_path)
    _assert_accurate(_registration_errors(mprage, mprage, _head_mask(mprage), geometry, seed))


# --------------------------------------------------------------------------------------------- round trip


def _tumour_labels() -> sitk.Image:
    """BraTS-like nested labels in atlas space, off-centre and asymmetric (a flip anywhere would show):
    edema (4) around a core (2) with an enhancing rim (1) and an eccentric cyst (3)."""
    reference = brats_reference_grid()
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in reference.GetSize()[::-1]], indexing="ij")
    r = np.sqrt(((x - 150) / 30) ** 2 + ((y - 100) / 24) ** 2 + ((z - 90) / 26) ** 2)
    labels = np.zeros(r.shape, np.uint8)
    labels[r < 1.0], labels[r < 0.6], labels[r < 0.45] = 4, 1, 2
    labels[((x - 154) / 5) ** 2 + ((y - 100) / 6) ** 2 + ((z - 87) / 5) ** 2 < 1] = 3
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    return image


@pytest.mark.parametrize("geometry,min_subregion_dice", [
    (SAGITTAL_3D, 0.97),
    (AXIAL_2D_4MM, 0.85),  # a 4 mm enhancing rim cannot survive 4 mm slices intact; the whole tumour does
    (OBLIQUE_2D_5MM, 0.85),
], ids=["sagittal-3d-1mm", "axial-2d-4mm", "oblique-axial-2d-5mm"])
def test_label_round_trip_atlas_native_atlas_keepsmask_dice(tmp_path, geometry, min_subregion_dice):
    """Atlas -> native (nearest) -> atlas (shape-based) through a rigid pose, via NIfTI files (RAS on disk)."""
    labels = _tumour_labels()
    atlas_to_native = sitk.Euler3DTransform((120.0, -120.0, 77.0), 0.1, -0.15, 0.2, (-120.0, 118.0, -74.0))
    tfm, native_path = tmp_path / "atlas_to_native.tfm", tmp_path / "native.nii.gz"
    sitk.WriteTransform(atlas_to_native, str(tfm))
    sitk.WriteImage(sitk.Cast(native_grid(geometry, 1.0), sitk.sitkUInt8), str(native_path))
    native = labels_to_native(labels, tfm, native_path)
    back = sitk.GetArrayFromImage(resample_labels(native, brats_reference_grid(), atlas_to_native, method="distance"))
    before = sitk.GetArrayFromImage(labels)
    assert mask_dice(before > 0, back > 0) >= 0.97
    for value in (1, 2, 3, 4):
        assert mask_dice(before == value, back == value) >= min_subregion_dice, f"label {value}"


def test_distance_resampling_beats_nearest_between_thick_slices():
    """From 5 mm slices back to 1 mm, shape-based interpolation keeps more of the shape than nearest."""
    labels = _tumour_labels()
    to_thick = sitk.Euler3DTransform((0, 0, 0), 0, 0, 0, (120, -120, 77))
    thick = resample_labels(labels, native_grid(OBLIQUE_2D_5MM, 1.0), to_thick)
    to_native = sitk.Euler3DTransform((0, 0, 0), 0, 0, 0, (-120, 120, -77))
    before = sitk.GetArrayFromImage(labels) > 0
    scores = {method: mask_dice(before,
                                sitk.GetArrayFromImage(resample_labels(thick, labels, to_native, method=method)) > 0)
              for method in ("nearest", "distance")}
    assert scores["distance"] > scores["nearest"] + 0.005, scores


# ------------------------------------------------------------------------------------ QC, N4, fallback


def test_similarity_peak_separates_aligned_from_shifted_series(brats_case):
    """Cross-contrast QC figure: the real case's FLAIR on its t1c peaks clearly; 6 mm off it does not."""
    brain = brats_case["t1c"] > 0
    _, aligned = similarity_peak(brats_case["t2f"], brats_case["t1c"], brain)
    shifted = sitk.Resample(brats_case["t2f"], brats_case["t1c"], sitk.TranslationTransform(3, (6.0, 0.0, 0.0)))
    _, off = similarity_peak(shifted, brats_case["t1c"], brain)
    assert aligned > MIN_SIMILARITY_PEAK > off


def test_bias_correction_removes_most_of_a_smooth_field_and_keeps_geometry():
    """The atlas (an average, free of bias) times a known field: the corrected image is closer to the atlas."""
    atlas = load_atlas_t1()
    xyz = sitk.GetArrayFromImage(sitk.PhysicalPointSource(sitk.sitkVectorFloat32, atlas.GetSize(), atlas.GetOrigin(),
                                                          atlas.GetSpacing(), atlas.GetDirection()))
    x, z = ((xyz[..., i] - xyz[..., i].mean()) / np.ptp(xyz[..., i]) for i in (0, 2))
    field = np.exp(0.4 * x + 0.3 * z**2).astype(np.float32)  # left-right ramp, stronger at top and bottom
    biased = sitk.GetImageFromArray(sitk.GetArrayFromImage(atlas) * field)
    biased.CopyInformation(atlas)
    corrected = bias_corrected(biased)
    head = sitk.GetArrayFromImage(sitk.OtsuThreshold(atlas, 0, 1)) > 0

    def residual(image: sitk.Image) -> float:
        log_ratio = np.log(sitk.GetArrayViewFromImage(image)[head] / sitk.GetArrayViewFromImage(atlas)[head])
        return float(np.std(log_ratio))

    assert residual(corrected) < 0.8 * residual(biased)
    assert corrected.GetSize() == atlas.GetSize()
    assert corrected.GetDirection() == atlas.GetDirection()


def test_deepbet_failure_falls_back_to_the_atlas_mask_with_a_flag(tmp_path, monkeypatch):
    import deepbet

    def broken(*args, **kwargs):
        raise RuntimeError("no weights")

    monkeypatch.setattr(deepbet, "run_bet", broken)
    flags = []
    mask, extraction = extract_brain(sitk.Cast(brats_reference_grid(), sitk.sitkFloat32), tmp_path, flags)
    assert extraction == "atlas-mask-fallback"
    assert any("no weights" in flag and "atlas brain mask" in flag for flag in flags)
    assert sitk.GetArrayViewFromImage(mask).sum() == (sitk.GetArrayFromImage(load_atlas_brain_mask()) > 0).sum()


@pytest.mark.parametrize("ml,age,flagged", [(1450, 0.3, True), (450, 0.3, False), (1450, 1.5, False), (450, 4, True),
                                             (1450, 10.0, False), (2100, 16, True), (2100, None, False)])
def test_brain_volume_is_checked_against_age(ml, age, flagged):
    assert (brain_volume_flag(ml, age) is not None) == flagged


def test_quality_checks_on_the_atlas_report_volume_head_fraction_and_atlas_overlap():
    """The atlas head and brain, as a perfectly registered and skull-stripped adult would give them."""
    t1 = sitk.Resample(load_atlas_t1(), brats_reference_grid(), sitk.Transform(), sitk.sitkLinear, 0.0,
                       sitk.sitkFloat32)
    flags = []
    qc = quality_checks({"t1c": t1}, "t1c", load_atlas_brain_mask() > 0, "deepbet", flags, patient_age_years=0.3)
    assert 1300 < qc["brain_volume_ml"] < 1600
    assert qc["brain_inside_atlas_brain"] > 0.99
    lo, hi = HEAD_FRACTION_BOUNDS
    assert lo < qc["mask_fraction_of_head"] < hi
    assert [flag for flag in flags if "brain volume" in flag] == [brain_volume_flag(qc["brain_volume_ml"], 0.3)]
