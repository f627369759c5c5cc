"""Fast unit tests of the stage internals: bundle validation, post-processing, transforms, geometry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pedseg.pipeline.atlas import BRATS_ORIGIN, BRATS_SIZE, brats_reference_grid, load_atlas_brain_mask
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.postprocess import postprocess
from pedseg.pipeline.preprocess import labels_to_native
from pedseg.pipeline.registration import compose, inverse, working_copy
from pedseg.synth.acquire import SeriesGeometry, native_grid
from pedseg.synth.dicom_writer import StudyInfo, write_series
from pedseg.synth.protocols import session_protocols
from pedseg.workspace import Workspace


def _centroid_mm(labels: sitk.Image, value: int = 1) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels == value, sitk.sitkUInt8))
    return np.asarray(stats.GetCentroid(1))


# ------------------------------------------------------------------------------------------------ bundle


def test_demo_bundle_loads_and_hashes(bundle_copy):
    bundle = load_bundle(bundle_copy)
    assert bundle.inputs == {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}
    assert bundle.labels == {1: "ET", 2: "NET", 3: "CC", 4: "ED"}
    assert len(bundle.models[0].folds) >= 2
    assert len(bundle.sha256) == 64


def test_bundle_missing_fold_is_named(bundle_copy):
    model = load_bundle(bundle_copy).models[0]
    shutil.rmtree(model.path / f"fold_{model.folds[-1]}")
    with pytest.raises(BundleError, match=f"lacks fold {model.folds[-1]}") as err:
        load_bundle(bundle_copy)
    assert err.value.exit_code == 6


def _edit(bundle_dir: Path, change) -> None:
    spec = json.loads((bundle_dir / "bundle.json").read_text())
    change(spec)
    (bundle_dir / "bundle.json").write_text(json.dumps(spec))


def test_bundle_channel_mapping_must_match_model(bundle_copy):
    _edit(bundle_copy, lambda s: s.update(inputs={"t1c": 0, "t2f": 1}))
    with pytest.raises(BundleError, match="takes 4 input channels but bundle.json gives it 2 sequences"):
        load_bundle(bundle_copy)


def test_missing_bundle_json(tmp_path):
    with pytest.raises(BundleError, match="No bundle.json"):
        load_bundle(tmp_path)


def test_bundle_rejects_unknown_postprocessing_region(bundle_copy):
    _edit(bundle_copy, lambda s: s["postprocessing"]["redefine"].append(
        {"region": "ET", "below_fraction_of_wt": 0.01, "to": "necrosis"}))
    with pytest.raises(BundleError, match="necrosis"):
        load_bundle(bundle_copy)


def test_bundle_rejects_non_positive_weight(bundle_copy):
    _edit(bundle_copy, lambda s: s["models"][0].update(weight=0))
    with pytest.raises(BundleError, match="weights must be positive"):
        load_bundle(bundle_copy)


def test_bundle_rejects_models_with_different_label_sets(bundle_copy):
    model_dir = bundle_copy / json.loads((bundle_copy / "bundle.json").read_text())["models"][0]["path"]
    other = model_dir.parent / "other"
    shutil.copytree(model_dir, other)
    dataset = json.loads((other / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "ET": 1, "NET": 2, "ED": 3, "CC": 4}
    (other / "dataset.json").write_text(json.dumps(dataset))
    _edit(bundle_copy, lambda s: s["models"].append({**s["models"][0], "path": "models/other"}))
    with pytest.raises(BundleError, match="different label sets"):
        load_bundle(bundle_copy)


# ------------------------------------------------------------------------------------------ postprocess


def _label_image(arr: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(arr.astype(np.uint8))


def test_small_et_speck_inside_net_becomes_net_and_far_speck_is_dropped():
    arr = np.zeros((40, 40, 40), np.uint8)
    arr[10:30, 10:30, 10:30] = 2  # NET block
    arr[20, 20, 20] = 1  # 1-voxel ET speck inside NET
    arr[2:4, 2:4, 2:4] = 4  # 8-voxel isolated ED component, far from the tumour
    out, steps = postprocess(_label_image(arr), {"min_wt_component_voxels": 50, "min_component_voxels": {"ET": 5}})
    result = sitk.GetArrayFromImage(out)
    assert result[20, 20, 20] == 2
    assert result[2:4, 2:4, 2:4].max() == 0
    assert (result == 2).sum() == 20**3
    assert [s.voxels_changed for s in steps] == [8, 1]


def test_redefine_small_et_as_net():
    arr = np.zeros((30, 30, 30), np.uint8)
    arr[5:25, 5:25, 5:25] = 4
    arr[10:20, 10:20, 10:20] = 2
    arr[14:16, 14:16, 14:16] = 1
    rule = {"region": "ET", "below_fraction_of_wt": 0.01, "to": "NET"}
    out, steps = postprocess(_label_image(arr), {"redefine": [rule]})
    assert (sitk.GetArrayFromImage(out) == 1).sum() == 0
    assert steps[0].applied


def test_components_are_26_connected():
    """Two ET voxels touching only at a corner are one 2-voxel component: kept at min 2, absorbed at min 3."""
    arr = np.zeros((10, 10, 10), np.uint8)
    arr[2:8, 2:8, 2:8] = 4
    arr[4, 4, 4] = arr[5, 5, 5] = 1
    kept, steps = postprocess(_label_image(arr), {"min_component_voxels": {"ET": 2}})
    assert (sitk.GetArrayFromImage(kept) == 1).sum() == 2
    assert steps[0].components_removed == 0
    absorbed, steps = postprocess(_label_image(arr), {"min_component_voxels": {"ET": 3}})
    assert (sitk.GetArrayFromImage(absorbed) == 1).sum() == 0
    assert steps[0].voxels_changed == 2
    assert (sitk.GetArrayFromImage(absorbed) == 4).sum() == 6 ** 3


def test_keep_largest_whole_tumour_and_steps_in_order():
    arr = np.zeros((30, 30, 30), np.uint8)
    arr[2:12, 2:12, 2:12] = 4
    arr[4:8, 4:8, 4:8] = 2
    arr[20:24, 20:24, 20:24] = 4  # a second, smaller lesion
    settings = {"keep_largest_wt": True, "redefine": [{"region": "ET", "below_fraction_of_wt": 0.5, "to": "NET"}]}
    out, steps = postprocess(_label_image(arr), settings)
    result = sitk.GetArrayFromImage(out)
    assert result[20:24, 20:24, 20:24].max() == 0
    assert (result > 0).sum() == 1000
    assert [s.step for s in steps] == ["redefine ET as NET below 50% of WT", "keep largest whole-tumour component"]
    assert steps[0].applied is False
    assert steps[1].voxels_changed == 64


def test_redefine_leaves_enough_et_alone():
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[5:15, 5:15, 5:15] = 2
    arr[5:15, 5:15, 5:10] = 1  # half of WT
    out, steps = postprocess(_label_image(arr), {"redefine": [{"region": "ET", "below_fraction_of_wt": 0.2,
                                                               "to": "NET"}]})
    assert (sitk.GetArrayFromImage(out) == 1).sum() == 500
    assert not steps[0].applied


# ---------------------------------------------------------------------------------------------- geometry


def test_brats_grid_matches_shared_brats_case(shared_data):
    case_dir = shared_data / "nifti" / "brats_space_BraTS-GLI-00001-000"
    case = sitk.ReadImage(str(case_dir / "BraTS-GLI-00001-000-t1c.nii.gz"))
    grid = brats_reference_grid()
    assert grid.GetSize() == case.GetSize() == BRATS_SIZE
    assert np.allclose(grid.GetOrigin(), case.GetOrigin())
    assert np.allclose(grid.GetOrigin(), BRATS_ORIGIN)
    assert np.allclose(grid.GetDirection(), case.GetDirection())


def test_atlas_brain_is_oriented_like_the_brats_case(shared_data):
    """Atlas and BraTS case overlap as arrays; mirroring left-right or front-back would lower the overlap."""
    case = sitk.GetArrayFromImage(sitk.ReadImage(str(
        shared_data / "nifti" / "brats_space_BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t1n.nii.gz"))) > 0
    atlas = sitk.GetArrayFromImage(load_atlas_brain_mask()) > 0
    dice = 2 * (case & atlas).sum() / (case.sum() + atlas.sum())
    flipped_ap = atlas[:, ::-1, :]
    dice_flipped = 2 * (case & flipped_ap).sum() / (case.sum() + flipped_ap.sum())
    assert dice > 0.85
    assert dice > dice_flipped + 0.05


def test_compose_and_inverse_round_trip():
    a = sitk.Euler3DTransform((10, -20, 30), 0.1, -0.2, 0.3, (5, 6, 7))
    b = sitk.Euler3DTransform((0, 0, 0), -0.05, 0.15, 0.0, (-3, 2, 1))
    ab = compose(a, b)  # a first, then b
    p = (12.0, -40.0, 55.0)
    assert np.allclose(ab.TransformPoint(p), b.TransformPoint(a.TransformPoint(p)))
    assert np.allclose(inverse(ab).TransformPoint(ab.TransformPoint(p)), p, atol=1e-6)


def test_working_copy_keeps_physical_extent_and_orientation():
    ref = native_grid(SeriesGeometry("sag", 1.0, 1.0, 1.0, (200.0, 220.0, 160.0)), 1.0)
    img = sitk.Image(ref.GetSize(), sitk.sitkFloat32)
    img.CopyInformation(ref)
    small = working_copy(img, 2.0)
    assert small.GetSpacing() == (2.0, 2.0, 2.0)
    assert small.GetDirection() == img.GetDirection()
    assert np.allclose(small.GetOrigin(), img.GetOrigin())


@pytest.mark.parametrize("plane,tilt", [("sag", 0.0), ("ax", 0.0), ("ax", 15.0), ("cor", 0.0)])
def test_labels_back_to_native_land_on_the_same_patient_coordinates(tmp_path, plane, tilt):
    """An asymmetric blob in atlas space, mapped through a known atlas->native rigid transform, must appear at
    the transformed physical position on any native grid (a flip anywhere would move it by centimetres)."""
    atlas = sitk.Image(BRATS_SIZE, sitk.sitkUInt8)
    atlas.CopyInformation(brats_reference_grid())
    arr = sitk.GetArrayFromImage(atlas)
    arr[100:110, 60:80, 150:165] = 1  # left (high x), anterior (low y), superior-ish; elongated: asymmetric
    blob = sitk.GetImageFromArray(arr)
    blob.CopyInformation(atlas)
    atlas_to_native = sitk.Euler3DTransform((120, -120, 77), 0.05, -0.1, 0.2, (-120.0, 115.0, -70.0))
    tfm = tmp_path / "t.tfm"
    sitk.WriteTransform(atlas_to_native, str(tfm))
    grid = native_grid(SeriesGeometry(plane, 1.0, 1.0, 1.0, (240.0, 240.0, 200.0), tilt_deg=tilt), 1.0)
    native_path = tmp_path / "native.nii.gz"
    sitk.WriteImage(sitk.Cast(grid, sitk.sitkUInt8), str(native_path))
    native = labels_to_native(blob, tfm, native_path)
    expected = atlas_to_native.TransformPoint(tuple(_centroid_mm(blob)))
    assert np.linalg.norm(_centroid_mm(native) - np.asarray(expected)) < 1.0


def test_synthetic_dicom_geometry_read_back_by_simpleitk(tmp_path):
    """The synthetic DICOM writer must put voxels where SimpleITK's (ITK/GDCM) DICOM reader finds them."""
    grid = native_grid(SeriesGeometry("ax", 2.0, 2.0, 2.0, (64.0, 80.0, 40.0), tilt_deg=12.0), 1.0)
    arr = np.zeros(sitk.GetArrayFromImage(grid).shape, np.float32)
    arr[5:9, 10:14, 20:30] = 1000  # asymmetric bar
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(grid)
    study = StudyInfo("T^T", "T1", "20200101", "F", "005Y", "1.2.3", "1.2.3.4", "20250101", 36000.0, "A1",
                      "SIEMENS", "Skyra")
    write_series([image], session_protocols("SIEMENS")[1], study, 2, tmp_path / "s")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    read = reader.Execute()
    assert np.linalg.norm(_centroid_mm(read > 500) - _centroid_mm(image > 500)) < 0.5


def test_rerun_removes_only_the_earlier_runs_outputs_it_no_longer_writes(tmp_path):
    """A re-run into OUTDIR that finds no tumour must not leave the earlier run's SEG beside its new report;
    files the earlier run did not list (the user's own) and paths outside OUTDIR are never touched."""
    out = tmp_path / "out"
    for name in ("report.pdf", "seg/segmentation.dcm", "notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    (tmp_path / "outside.txt").write_text("keep")
    listed = ["report.pdf", "seg/segmentation.dcm", "../outside.txt", "provenance.json"]
    (out / "provenance.json").write_text(json.dumps({"outputs": listed}))

    with Workspace(out) as workspace:
        staged = {name: workspace.staging / name for name in ("report.pdf", "provenance.json")}
        for path in staged.values():
            path.write_text("new")
        workspace.publish(staged)
    assert not (out / "seg").exists()  # the file and its emptied folder
    assert (out / "report.pdf").read_text() == "new"
    assert (out / "notes.txt").is_file()
    assert (tmp_path / "outside.txt").is_file()

    (out / "provenance.json").write_text("{not json")  # an unreadable record removes nothing
    with Workspace(out) as workspace:
        (workspace.staging / "other.txt").write_text("new")
        workspace.publish({"other": workspace.staging / "other.txt"})
    assert (out / "report.pdf").is_file()


def test_image_cut_short_by_a_full_disk_is_a_disk_full_error_and_leaves_no_file(tmp_path, monkeypatch):
    """SimpleITK's NIfTI writer returns normally after a short write on a full disk (it only prints "NWAD: wrote
    only 0 of N bytes") and its reader fills a truncated file with zeros; the write must fail with ENOSPC, which
    the runner reports as exit 5, not publish a truncated image."""
    import collections
    import errno

    import pedseg.pipeline.atomic as atomic

    real_write = sitk.WriteImage

    def short_write(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(200)

    image = sitk.GetImageFromArray(np.arange(32 * 32 * 32, dtype=np.float32).reshape(32, 32, 32))
    monkeypatch.setattr(atomic.sitk, "WriteImage", short_write)
    monkeypatch.setattr(atomic.shutil, "disk_usage",
                        lambda path: collections.namedtuple("U", "total used free")(1, 1, 0))
    with pytest.raises(OSError) as raised:
        atomic.write_image(image, tmp_path / "labels.nii.gz")
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # neither the target nor the partial file

    monkeypatch.setattr(atomic.sitk, "WriteImage", real_write)
    written = atomic.write_image(image, tmp_path / "labels.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))), sitk.GetArrayFromImage(image))
