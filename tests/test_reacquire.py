"""A real BraTS-space case re-acquired as a DICOM session (synth/reacquire.py): what the pipeline's ingest and
identification make of it, and whether its geometry brings the real images back, not mirrored."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pedseg.pipeline.atlas import brats_reference_grid
from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.identify import classify_session
from pedseg.pipeline.ingest import ingest
from pedseg.pipeline.types import ROLES
from pedseg.synth.acquire import SeriesGeometry, acquire
from pedseg.synth.reacquire import case_name, find_case_images, reacquire_session

from factories import SHARED_DATA, needs_shared_data

CASE = SHARED_DATA / "nifti" / "brats_space_BraTS-GLI-00001-000"
SEED = 7


@pytest.fixture(scope="module")
def reacquired(tmp_path_factory):
    """The case re-acquired once for the module: its folders, ground-truth summary, ingested session and
    identification."""
    root = tmp_path_factory.mktemp("reacquire")
    dicom_dir = reacquire_session(find_case_images(CASE), root / "session", SEED)
    summary = json.loads((root / "session" / "ground_truth" / "summary.json").read_text())
    session = ingest(dicom_dir, root / "work")
    return root, summary, session, classify_session(session)


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _normal(orientation) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


@needs_shared_data
def test_identification_picks_exactly_the_written_series_per_role(reacquired):
    _, summary, session, identification = reacquired
    assert identification.missing == []
    for role in ROLES:
        assert identification.chosen[role] == summary["series"][role]["series_uid"], role
        assert sum(1 for d in identification.decisions if d.role == role and d.chosen) == 1
    distractors = {summary["series"]["loc"]["series_uid"], summary["series"]["dwi"]["series_uid"]}
    assert {d.series_uid for d in identification.decisions if d.series_uid in distractors} == distractors
    assert all(d.role == "other" for d in identification.decisions if d.series_uid in distractors)


@needs_shared_data
def test_t2_and_flair_are_axial_2d_thick_slices_and_t1s_sagittal_3d(reacquired):
    _, summary, session, identification = reacquired
    headers = {role: session.by_uid(identification.chosen[role]).header for role in ROLES}
    for role in ("t2w", "t2f"):
        h = headers[role]
        assert h.mr_acquisition_type == "2D"
        assert 4.0 <= h.slice_thickness <= 5.0
        assert all(0.5 <= s <= 0.9 for s in h.pixel_spacing)
        assert abs(_normal(h.orientation)[2]) > 0.95, f"{role} is not axial"  # within ~18 degrees of S-I
        assert h.num_images == summary["series"][role]["size"][2]
    for role in ("t1n", "t1c"):
        h = headers[role]
        assert h.mr_acquisition_type == "3D"
        assert h.slice_thickness == pytest.approx(1.0)
        assert h.pixel_spacing == pytest.approx((1.0, 1.0))
        assert abs(_normal(h.orientation)[0]) > 0.99, f"{role} is not sagittal"
    assert headers["t1c"].contrast_agent and not headers["t1n"].contrast_agent
    # The head moved between series (a few degrees, a few mm), and the whole brain stays in every field of view.
    for role in ROLES:
        facts = summary["series"][role]
        assert 0.0 < facts["head_rotation_deg"] < 12.0
        assert 0.0 < np.linalg.norm(facts["isocentre_from_brain_centroid_mm"]) < 12.0
        assert facts["brain_coverage"] >= 0.999, role


@needs_shared_data
@pytest.mark.parametrize(("role", "threshold"), [("t1c", 0.9), ("t2f", 0.85)])
def test_series_resampled_with_the_known_pose_matches_the_original_not_its_mirror(reacquired, role, threshold):
    """dcm2niix (the convert stage) reads the series back; resampled into BraTS space with the inverse of the
    ground-truth pose it lies on the original. The tumour sits on one side, so a left-right mirror would not."""
    root, summary, session, identification = reacquired
    nifti = convert_series(session.by_uid(identification.chosen[role]), root / "converted")
    pose = sitk.ReadTransform(str(root / "session" / "ground_truth" / f"pose_{role}.tfm"))
    native = sitk.ReadImage(str(nifti), sitk.sitkFloat32)
    back = sitk.GetArrayFromImage(sitk.Resample(native, brats_reference_grid(), pose.GetInverse(), sitk.sitkLinear,
                                                0.0, sitk.sitkFloat32))
    original = sitk.GetArrayFromImage(sitk.ReadImage(summary["reference_images"][role], sitk.sitkFloat32))
    brain = original != 0
    mirrored = original[:, :, ::-1]  # BraTS arrays are (z, y, x) with x the left-right axis
    same, flipped = _ncc(back, original, brain), _ncc(back, mirrored, brain)
    assert same > threshold
    assert flipped < same - 0.3
    # No noise or bias was added: intensities are the original's times the recorded scale, background exactly 0.
    scale = summary["series"][role]["intensity_scale"]
    core = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(brain.astype(np.uint8)), [3] * 3)) > 0
    assert np.median(back[core]) == pytest.approx(scale * np.median(original[core]), rel=0.03)
    assert np.mean(sitk.GetArrayViewFromImage(native) == 0) > 0.3


@needs_shared_data
def test_pixels_are_12_bit_scanner_values(reacquired):
    root, summary, _, _ = reacquired
    folder = root / "session" / "dicom" / summary["series"]["t1c"]["folder"]
    files = sorted(folder.glob("*.dcm"))
    peak = max(int(pydicom.dcmread(f).pixel_array.max()) for f in files[::8])
    assert 1000 < peak <= 4095
    assert summary["series"]["t1c"]["intensity_scale"] < 1.0  # this t1c peaks above 15000: scaled, not clipped


def test_case_images_found_by_file_name_token(tmp_path):
    brats = tmp_path / "brats"
    tcga = tmp_path / "tcga"
    for folder, names in ((brats, [f"BraTS-GLI-00001-000-{r}.nii.gz" for r in ROLES]),
                          (tcga, [f"TCGA-DU-7294_{r}_bet.nii.gz" for r in ("t1", "t1c", "t2", "fla")]
                           + ["fusion_consensus.nii.gz"])):
        folder.mkdir()
        for name in names:
            (folder / name).touch()
    found = find_case_images(tcga)
    assert {role: p.name for role, p in found.items()} == {
        "t1n": "TCGA-DU-7294_t1_bet.nii.gz", "t1c": "TCGA-DU-7294_t1c_bet.nii.gz",
        "t2w": "TCGA-DU-7294_t2_bet.nii.gz", "t2f": "TCGA-DU-7294_fla_bet.nii.gz"}
    assert case_name(found) == "TCGA-DU-7294"
    assert case_name(find_case_images(brats)) == "BraTS-GLI-00001-000"
    (brats / "BraTS-GLI-00001-000-t2f.nii.gz").unlink()
    with pytest.raises(ValueError, match="t2f: 0 files"):
        find_case_images(brats)


def test_acquire_without_corruption_is_deterministic_and_draws_nothing():
    image = sitk.GetImageFromArray(np.full((20, 30, 30), 100.0, np.float32))
    geom = SeriesGeometry("ax", 1.0, 3.0, 3.0, (20.0, 20.0, 9.0))
    pose = sitk.TranslationTransform(3, (15.0, 15.0, 10.0))
    rng = np.random.default_rng(0)
    clean = sitk.GetArrayFromImage(acquire(image, pose, geom, 1.0, rng, corrupt=False))
    assert rng.random() == np.random.default_rng(0).random()
    assert np.allclose(clean, 100.0, atol=1e-3)
    noisy = sitk.GetArrayFromImage(acquire(image, pose, geom, 1.0, np.random.default_rng(0)))
    assert not np.allclose(noisy, 100.0, atol=1.0)
