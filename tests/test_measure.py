"""Measurements against synthetic label maps with known volumes and analytic ellipsoids."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from pedseg.pipeline.errors import InternalError
from pedseg.pipeline.labels import CONVENTIONS, LABEL_VALUES, convert_labels
from pedseg.pipeline.measure import measure
from pedseg.pipeline.types import Lesion, Rapno

IDENTITY = np.eye(3)
# Sagittal acquisition: rows run anterior->posterior, columns superior->inferior, slices right->left.
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def image_from(arr_xyz: np.ndarray, spacing, direction=IDENTITY, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)).astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    img.SetOrigin(tuple(float(o) for o in origin))
    return img


def ellipsoids(size, spacing, direction, specs, label=1) -> sitk.Image:
    """Voxels whose centres lie inside any ellipsoid (centre LPS mm, semi-axes mm, in-plane rotation deg)."""
    direction = np.asarray(direction, dtype=float)
    spacing = np.asarray(spacing, dtype=float)
    # Grid centred near the origin, offset so voxel centres do not sit symmetrically on the ellipsoid axes.
    origin = -direction @ (spacing * (np.asarray(size) - 1) / 2) + np.array([0.13, 0.27, 0.31])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    points = (index * spacing) @ direction.T + origin
    inside = np.zeros(len(points), dtype=bool)
    for centre, semi, degrees in specs:
        local = (points - np.asarray(centre)) @ rotation("z", degrees)  # rotates points by -degrees
        inside |= ((local / np.asarray(semi)) ** 2).sum(axis=1) <= 1.0
    return image_from(inside.reshape(tuple(size)) * label, spacing, direction, origin)


def test_volumes_isotropic_exact():
    arr = np.zeros((20, 20, 20), dtype=np.uint8)
    arr[0:2, 0:5, 0:1] = 1  # 10 ET
    arr[5:9, 5:10, 0:1] = 2  # 20 NET
    arr[12:17, 0:1, 0:1] = 3  # 5 CC
    arr[0:10, 10:20, 10:11] = 4  # 100 ED
    m = measure(image_from(arr, (1, 1, 1)), None, qc_flags=["flag_a"])
    expected = {"ET": 10, "NET": 20, "CC": 5, "ED": 100, "TC": 35, "WT": 135}
    for name, voxels in expected.items():
        assert m.regions[name].voxels == voxels
        assert m.regions[name].volume_ml == pytest.approx(voxels / 1000.0)
        assert m.regions[name].native_volume_ml is None
    assert m.qc_flags == ["flag_a"]


def test_volumes_anisotropic_and_native():
    arr = np.zeros((30, 30, 10), dtype=np.uint8)
    arr[0:10, 0:10, 0:4] = 1  # 400 voxels of 0.5 mm3
    arr[20:30, 20:30, 5:10] = 4  # 500 voxels
    native = np.zeros((16, 16, 8), dtype=np.uint8)
    native[0:4, 0:5, 0:2] = 1  # 40 voxels of 3 mm3
    native[8:12, 8:12, 4:6] = 4  # 32 voxels
    m = measure(image_from(arr, (0.5, 0.5, 2.0)), image_from(native, (1.0, 1.0, 3.0)), qc_flags=[])
    assert m.regions["ET"].volume_ml == pytest.approx(400 * 0.5 / 1000)
    assert m.regions["ED"].volume_ml == pytest.approx(500 * 0.5 / 1000)
    assert m.regions["WT"].volume_ml == pytest.approx(900 * 0.5 / 1000)
    assert m.regions["ET"].native_volume_ml == pytest.approx(40 * 3 / 1000)
    assert m.regions["WT"].native_volume_ml == pytest.approx(72 * 3 / 1000)
    assert m.regions["CC"].native_volume_ml == 0.0


def test_components_use_26_connectivity():
    arr = np.zeros((12, 12, 12), dtype=np.uint8)
    arr[1:3, 1:3, 1:3] = 1
    arr[3:5, 3:5, 3:5] = 1  # touches the first cube only at a corner: same component under 26-connectivity
    arr[8:10, 8:10, 8:10] = 2
    m = measure(image_from(arr, (1, 1, 1)), None, qc_flags=[])
    assert m.regions["ET"].components == 1
    assert m.regions["NET"].components == 1
    assert m.regions["TC"].components == 2
    assert m.regions["CC"].components == 0


def rapno(image, region: str) -> Rapno:
    """The RAPNO measurement of one region, as `measure` reports it."""
    return measure(image, None, qc_flags=[], rapno_region=region).rapno


def assert_ellipse_measure(lesion: Lesion, longest: float, perpendicular: float, z: float = 0.0):
    assert lesion.longest_mm == pytest.approx(longest, abs=1.0)
    assert lesion.perpendicular_mm == pytest.approx(perpendicular, abs=1.0)
    assert lesion.product_mm2 == pytest.approx(lesion.longest_mm * lesion.perpendicular_mm)
    assert lesion.slice_z_mm == pytest.approx(z, abs=1.0)
    p0, p1 = np.asarray(lesion.endpoints_lps_mm)
    q0, q1 = np.asarray(lesion.perp_endpoints_lps_mm)
    assert p0[2] == p1[2] == q0[2] == q1[2] == pytest.approx(lesion.slice_z_mm)
    assert np.linalg.norm(p1 - p0) == pytest.approx(lesion.longest_mm)
    # The perpendicular chord is within 5 degrees of perpendicular and measured along the exact normal.
    axis = (p1 - p0) / np.linalg.norm(p1 - p0)
    chord = q1 - q0
    assert abs(chord @ axis) <= math.tan(math.radians(5.0)) * np.linalg.norm(chord) + 1e-9
    assert np.linalg.norm(chord) * math.cos(math.radians(5.0)) <= lesion.perpendicular_mm + 1e-6


@pytest.mark.parametrize("size, spacing, direction, degrees", [
    ((56, 40, 30), (1.0, 1.0, 1.0), IDENTITY, 0.0),
    ((56, 56, 30), (1.0, 1.0, 1.0), IDENTITY, 30.0),
    ((40, 30, 56), (1.0, 1.0, 1.0), SAGITTAL, 30.0),
    ((60, 60, 60), (1.0, 1.0, 1.0), rotation("x", 25.0) @ rotation("z", 40.0), -15.0),
    ((100, 70, 16), (0.5, 0.5, 2.0), IDENTITY, 0.0),
], ids=["axial", "rotated30", "sagittal-grid", "oblique-grid", "anisotropic"])
def test_rapno_ellipsoid_is_grid_independent(size, spacing, direction, degrees):
    img = ellipsoids(size, spacing, direction, [((0.0, 0.0, 0.0), (20.0, 12.0, 8.0), degrees)])
    block = rapno(img, "ET")
    assert (block.region, block.lesions_total) == ("ET", 1)
    (lesion,) = block.lesions
    assert_ellipse_measure(lesion, 40.0, 24.0)
    assert block.sum_product_mm2 == pytest.approx(lesion.product_mm2)


def test_rapno_rotated_longest_axis_follows_the_lesion():
    img = ellipsoids((56, 56, 30), (1.0, 1.0, 1.0), IDENTITY, [((0.0, 0.0, 0.0), (20.0, 12.0, 8.0), 30.0)])
    p0, p1 = np.asarray(rapno(img, "ET").lesions[0].endpoints_lps_mm)
    angle = math.degrees(math.atan2(p1[1] - p0[1], p1[0] - p0[0])) % 180.0
    assert angle == pytest.approx(30.0, abs=5.0)


def test_rapno_two_lesions_each_on_its_own_slice():
    img = ellipsoids((100, 50, 60), (1.0, 1.0, 1.0), IDENTITY, [
        ((-22.0, 0.0, -12.0), (20.0, 12.0, 8.0), 0.0),
        ((30.0, 0.0, 10.0), (10.0, 6.0, 5.0), 0.0),
    ])
    m = measure(img, None, qc_flags=[])
    block = m.rapno
    assert (block.region, block.lesions_total) == ("TC", 2)
    big, small = block.lesions
    assert_ellipse_measure(big, 40.0, 24.0, z=-12.0)
    assert_ellipse_measure(small, 20.0, 12.0, z=10.0)
    assert big.volume_ml > small.volume_ml
    assert block.sum_product_mm2 == pytest.approx(big.product_mm2 + small.product_mm2)
    assert m.regions["TC"].bidimensional_mm2 == pytest.approx(block.sum_product_mm2)
    assert m.regions["WT"].bidimensional_mm2 == pytest.approx(block.sum_product_mm2)
    assert m.regions["ET"].bidimensional_mm2 is None


def test_rapno_measures_at_most_five_lesions_largest_first():
    arr = np.zeros((60, 12, 12), dtype=np.uint8)
    for i, width in enumerate((2, 6, 3, 5, 4, 7)):
        arr[i * 9:i * 9 + width, 2:8, 2:8] = 1
    block = rapno(image_from(arr, (1, 1, 1)), "TC")
    assert block.lesions_total == 6
    assert [lesion.longest_mm for lesion in block.lesions] == sorted(
        (lesion.longest_mm for lesion in block.lesions), reverse=True)
    assert len(block.lesions) == 5
    assert block.lesions[0].volume_ml == pytest.approx(7 * 36 / 1000)


def test_empty_segmentation_gives_zeros():
    m = measure(image_from(np.zeros((10, 10, 10)), (1, 1, 1)), image_from(np.zeros((5, 5, 5)), (2, 2, 2)),
                qc_flags=[])
    for region in m.regions.values():
        assert (region.voxels, region.volume_ml, region.components, region.native_volume_ml) == (0, 0.0, 0, 0.0)
    assert m.rapno.lesions == ()
    assert m.rapno.sum_product_mm2 == 0.0
    assert m.regions["TC"].bidimensional_mm2 == 0.0
    assert m.regions["WT"].bidimensional_mm2 == 0.0


def test_labels_outside_the_convention_are_refused():
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[0, 0, 0] = 7
    with pytest.raises(InternalError, match="outside"):
        measure(image_from(arr, (1, 1, 1)), None, qc_flags=[])


def test_convert_labels_between_conventions():
    assert set(LABEL_VALUES) == set(CONVENTIONS)  # every convention the config accepts has its label values
    labels_2024 = np.array([0, 1, 2, 3, 4], dtype=np.uint8)
    labels_2023 = convert_labels(labels_2024, "2024", "2023")
    np.testing.assert_array_equal(labels_2023, [0, 3, 1, 1, 2])
    assert labels_2023.dtype == np.uint8
    # NCR comes back as NET: the cyst cannot be recovered from 2023 labels.
    np.testing.assert_array_equal(convert_labels(labels_2023, "2023", "2024"), [0, 1, 2, 2, 4])
    np.testing.assert_array_equal(convert_labels(labels_2024, "2024", "2024"), labels_2024)
    with pytest.raises(ValueError):
        convert_labels(np.array([4]), "2023", "2024")
    with pytest.raises(ValueError):
        convert_labels(labels_2024, "2024", "2021")
