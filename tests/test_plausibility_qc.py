"""Plausibility QC that knows children: brain volume and head size against age and against any age (a wrong voxel
spacing), one acquisition chosen for two roles, a whole tumour too large for its brain, and where a bundle path
came from. Small synthetic arrays only: no registration, no deepbet."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.measure import MAX_WT_FRACTION_OF_BRAIN, measure, tumour_fraction_flag
from pedseg.pipeline.preprocess import (
    BRAIN_ML_BOUNDS,
    HEAD_CIRCUMFERENCE_CM,
    HeadExtent,
    brain_volume_flag,
    head_circumference_flag,
    head_extent_flag,
    head_extent_mm,
    same_acquisition_flags,
)

REPO = Path(__file__).resolve().parents[1]


# --- brain volume against age, and against any age -------------------------------------------------------------

@pytest.mark.parametrize("ml,age", [(400, 0.05), (550, 0.2), (650, 0.4), (900, 1.0), (1100, 1.9), (1400, 12)])
def test_published_infant_and_child_volumes_are_not_flagged(ml, age):
    assert brain_volume_flag(ml, age) is None


def test_two_month_old_with_a_2_7x_overestimate_is_flagged_with_its_reason():
    """~400 mL at 2 months read as ~1080 mL: inside the old 300-1100 mL band for under 6 months, not any more."""
    flag = brain_volume_flag(1080, 2 / 12)
    assert flag == ("brain volume 1080 mL outside 230-700 mL expected at age 0.166667: check the skull stripping "
                    "and the patient's age (tumour volumes of a brain this far off may be wrong too)")


def test_infant_bands_follow_the_norms():
    """Knickmeyer 2008: ~450 mL newborn, ~900 mL at 1 year; every band holds its age's norm, bands grow with age."""
    band = {age: next((lo, hi) for max_age, lo, hi in BRAIN_ML_BOUNDS if age < max_age) for age in (0.05, 0.9, 1.9)}
    assert band[0.05][0] <= 450 <= band[0.05][1] and band[0.05][1] <= 700
    assert band[0.9][0] <= 900 <= band[0.9][1]
    assert band[1.9][0] <= 1100 <= band[1.9][1]
    highs = [hi for _, _, hi in BRAIN_ML_BOUNDS]
    assert highs == sorted(highs)


@pytest.mark.parametrize("ml,age", [(260, 0.05), (270, None)])
def test_a_preterm_infants_brain_near_term_equivalent_age_is_plausible(ml, age):
    """Romberg 2022: very preterm infants at term-equivalent age 379 +- 72 mL; 260 mL is within 2 SD."""
    assert brain_volume_flag(ml, age) is None


@pytest.mark.parametrize("ml,age", [(550, 1.2), (650, 1.9)])
def test_a_toddler_brain_below_3_sd_of_the_norm_is_flagged(ml, age):
    """Knickmeyer 2008: ~950 mL at 1 year, ~1090 mL at 2 years, SD ~8-10 %: 650 mL is below -3 SD."""
    assert "outside 700-1500 mL expected" in brain_volume_flag(ml, age)


@pytest.mark.parametrize("ml,age", [(150, None), (150, 10), (2600, None), (3500, 15)])
def test_brain_volume_implausible_at_any_age_points_at_the_voxel_spacing(ml, age):
    flag = brain_volume_flag(ml, age)
    assert flag is not None and "implausible at any age (expected 200-2500 mL)" in flag
    assert "voxel spacing in the image header may be wrong" in flag


@pytest.mark.parametrize("ml", [300, 1450, 2500])
def test_brain_volume_without_age_inside_physical_bounds_is_not_flagged(ml):
    assert brain_volume_flag(ml, None) is None


# --- head size ---------------------------------------------------------------------------------------------------

def _ellipsoid(lr_mm: float, ap_mm: float, si_mm: float, spacing=(1.0, 1.0, 1.0), shape=(80, 120, 120)) -> np.ndarray:
    """An ellipsoidal head mask [z, y, x] centred on the grid."""
    z, y, x = (np.arange(n) - (n - 1) / 2 for n in shape)
    z, y, x = z[:, None, None] * spacing[2], y[None, :, None] * spacing[1], x[None, None, :] * spacing[0]
    return (x / (lr_mm / 2)) ** 2 + (y / (ap_mm / 2)) ** 2 + (z / (si_mm / 2)) ** 2 <= 1


# WHO Child Growth Standards, head circumference-for-age z-score tables (cm): girls' -3 SD and boys' +3 SD by age in
# years (WHO ends at 5 years).
WHO_GIRLS_MINUS_3SD = {0: 30.3, 0.25: 35.8, 0.5: 38.3, 1: 40.8, 2: 43.0, 5: 45.7}
WHO_BOYS_PLUS_3SD = {0.25: 44.1, 0.5: 47.0, 1: 49.9, 2: 52.3, 5: 55.2}


def test_head_circumference_bands_hold_the_who_3_sd_range_of_their_ages():
    start = 0
    for end, lo, hi in HEAD_CIRCUMFERENCE_CM:
        assert lo <= WHO_GIRLS_MINUS_3SD[min(start, 5)] + 0.3, (start, lo)  # bands are rounded to whole cm
        assert hi >= WHO_BOYS_PLUS_3SD[min(end, 5)] - 0.3, (end, hi)
        start = end


def test_head_extent_and_circumference_of_an_ellipsoid():
    extent = head_extent_mm(_ellipsoid(150, 190, 140, spacing=(2.0, 2.0, 2.0)), (2.0, 2.0, 2.0))
    assert extent.left_right == pytest.approx(150, abs=4) and extent.front_back == pytest.approx(190, abs=4)
    # Ramanujan: an ellipse of 75 x 95 mm semi-axes has a perimeter of 53.4 cm.
    assert extent.circumference_cm == pytest.approx(53.4, abs=1.0)
    assert head_extent_flag(extent) is None
    assert head_circumference_flag(extent, 30) is None


def test_head_extent_on_an_anisotropic_grid_uses_each_axis_spacing():
    extent = head_extent_mm(_ellipsoid(150, 190, 140, spacing=(1.0, 2.0, 4.0), shape=(40, 100, 160)),
                            (1.0, 2.0, 4.0))
    assert extent.left_right == pytest.approx(150, abs=3) and extent.front_back == pytest.approx(190, abs=3)


def test_head_the_wrong_size_for_any_age_points_at_the_voxel_spacing():
    tiny = HeadExtent(left_right=60, front_back=75, section_left_right=60, section_front_back=75)
    assert head_extent_flag(tiny) == ("head extent left-right 60 mm, front-back 75 mm is implausible at any age "
                                      "(expected 80-230 mm): the voxel spacing in the image header may be wrong")
    huge = HeadExtent(left_right=180, front_back=236, section_left_right=180, section_front_back=236)
    assert "front-back 236 mm" in head_extent_flag(huge) and "left-right" not in head_extent_flag(huge)
    assert head_extent_flag(None).startswith("no head found")


def test_adult_sized_head_at_two_months_is_flagged_and_an_infant_head_is_not():
    adult = HeadExtent(left_right=176, front_back=210, section_left_right=170, section_front_back=205)
    infant = HeadExtent(left_right=111, front_back=131, section_left_right=111, section_front_back=131)  # ~38 cm
    assert head_circumference_flag(infant, 2 / 12) is None
    assert head_circumference_flag(adult, 25) is None
    assert head_circumference_flag(adult, None) is None
    flag = head_circumference_flag(adult, 2 / 12)
    assert flag.startswith("head circumference about 59 cm (from the head mask) outside 30-44 cm expected at age")
    assert flag.endswith("check the patient's age and the voxel spacing")
    assert head_circumference_flag(infant, 10).startswith("head circumference about 38 cm")


# --- one acquisition chosen for two roles ------------------------------------------------------------------------

def _image(arr: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(arr.astype(np.float32))


def test_same_images_in_two_roles_are_flagged_and_distinct_contrasts_are_not():
    rng = np.random.default_rng(0)
    shape = (24, 40, 40)
    anatomy = rng.normal(100, 20, shape)
    mask = sitk.GetImageFromArray(np.ones(shape, np.uint8))
    images = {
        "t1n": _image(anatomy + rng.normal(0, 1, shape)),  # the same acquisition as t1c, a little noise apart
        "t1c": _image(anatomy),
        "t2w": _image(300 - anatomy + rng.normal(0, 15, shape)),  # another contrast: anti-correlated
        "t2f": _image(0.5 * anatomy + rng.normal(0, 15, shape)),  # correlated, but not one acquisition
    }
    flags = same_acquisition_flags(images, mask)
    assert len(flags) == 1
    assert flags[0].startswith("t1n and t1c look like one acquisition (correlation 0.99")
    assert flags[0].endswith("inside the brain > 0.995): check that two different series were chosen")


def test_same_acquisition_check_needs_a_brain():
    shape = (10, 10, 10)
    same = _image(np.random.default_rng(1).normal(size=shape))
    assert same_acquisition_flags({"t1n": same, "t1c": same}, sitk.GetImageFromArray(np.zeros(shape, np.uint8))) == []


# --- whole tumour against the brain ------------------------------------------------------------------------------

def test_tumour_fraction_flag_text_and_threshold():
    assert tumour_fraction_flag(700, 1200) == ("whole tumour 700 mL is 58% of the brain volume 1200 mL (implausible "
                                               "above 50%): check the segmentation and the skull stripping")
    assert tumour_fraction_flag(MAX_WT_FRACTION_OF_BRAIN * 1000, 1000) is None
    assert tumour_fraction_flag(100, 1200) is None
    assert tumour_fraction_flag(700, None) is None


def test_measure_adds_the_tumour_fraction_flag_when_given_the_brain_volume():
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[2:18, 2:18, 2:18] = 4  # 4096 voxels of oedema at 1 mm: 4.1 mL of whole tumour
    labels = sitk.GetImageFromArray(arr)
    big = measure(labels, None, qc_flags=["earlier flag"], brain_volume_ml=6.0)
    assert big.qc_flags[0] == "earlier flag"
    assert len(big.qc_flags) == 2 and big.qc_flags[1].startswith("whole tumour 4 mL is 68% of the brain volume 6 mL")
    assert measure(labels, None, qc_flags=[], brain_volume_ml=1200.0).qc_flags == []
    assert measure(labels, None, qc_flags=[]).qc_flags == []


# --- where the bundle path came from -----------------------------------------------------------------------------

def test_bundle_error_names_pedseg_bundle_when_the_path_came_from_it(tmp_path, monkeypatch):
    missing = tmp_path / "no-bundle-here"
    monkeypatch.setenv("PEDSEG_BUNDLE", str(missing))
    with pytest.raises(BundleError) as caught:
        load_bundle(missing)
    assert f"(bundle path from $PEDSEG_BUNDLE={missing})" in caught.value.message
    assert caught.value.message.startswith("No bundle.json in model bundle folder")
    assert caught.value.hint


def test_bundle_error_from_pedseg_bundle_covers_malformed_bundles(tmp_path, monkeypatch):
    root = tmp_path / "bundle"
    shutil.copytree(REPO / "bundles" / "pedseg-demo", root, ignore=shutil.ignore_patterns("*.pth"))
    (root / "bundle.json").write_text("{not json")
    monkeypatch.setenv("PEDSEG_BUNDLE", str(root))
    with pytest.raises(BundleError, match=r"malformed.*\(bundle path from \$PEDSEG_BUNDLE="):
        load_bundle(root)


def test_bundle_error_for_another_path_does_not_mention_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PEDSEG_BUNDLE", str(tmp_path / "elsewhere"))
    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path / "given-on-the-command-line")
    assert "PEDSEG_BUNDLE" not in str(caught.value)
    monkeypatch.delenv("PEDSEG_BUNDLE")
    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path / "given-on-the-command-line")
    assert "PEDSEG_BUNDLE" not in str(caught.value)
