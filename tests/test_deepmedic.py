"""The DeepMedic port against what the original DeepMedic 0.8.4 computed with CaPTk's model on the shared case
(../shared/data/deepmedic_reference): one tile, the tiling, the 64^3 probability crop, the whole-volume labels,
and the bundle that carries the model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors import safe_open

from pedseg.pipeline.backend import Execution
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.deepmedic import (
    DeepMedicArchitecture,
    Tiler,
    load_deepmedic,
    run_deepmedic,
    segment_volume,
    tile_starts,
)
from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.openvino_backend import OpenVINONetwork

from factories import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "captk-deepmedic-brats"
MEMBER = BUNDLE / "models" / "deepmedic"
REFERENCE = SHARED_DATA / "deepmedic_reference"
CASE = "BraTS-GLI-00001-000"
CHANNELS = ("t1", "t1ce", "t2", "flair")  # DeepMedic's order; the bundle maps t1n, t1c, t2w, t2f onto it
ROLE_FILES = {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f"}
CPU = torch.device("cpu")
OPENVINO_FP32 = Execution("openvino", "fp32", threads=2)
ENGINES = [pytest.param(Execution(), id="torch"), pytest.param(OPENVINO_FP32, id="openvino")]


@pytest.fixture(scope="module")
def network():
    return load_deepmedic(MEMBER / "architecture.json", MEMBER / "model.safetensors", bundle_name=BUNDLE.name)


@pytest.fixture(scope="module")
def fixture_json(shared_data):
    return json.loads((REFERENCE / "fixture.json").read_text())


def _normalised_inputs() -> np.ndarray:
    """The four CaPTk-normalised channels DeepMedic read, (C, x, y, z) in NIfTI voxel order."""
    return np.stack([nib.load(REFERENCE / f"{CASE}_input_{c}_captk_zscore.nii.gz").get_fdata(dtype=np.float32)
                     for c in CHANNELS])


@pytest.mark.parametrize("execution", ENGINES)
def test_one_tile_matches_the_original(network, shared_data, execution):
    tile = np.load(REFERENCE / f"{CASE}_single_tile_reference.npz")
    run = OpenVINONetwork(network, execution) if execution.backend == "openvino" else network
    with torch.inference_mode():
        ours = run(torch.from_numpy(tile["x_normal"])[None],
                   [torch.from_numpy(tile["x_sub3"])[None], torch.from_numpy(tile["x_sub5"])[None]])[0].numpy()
    assert ours.shape == (5, 29, 29, 29)
    assert np.abs(ours - tile["prob"]).max() < 1e-4
    assert (ours.argmax(0) == tile["prob"].argmax(0)).all()


def test_tiling_cuts_the_tiles_deepmedic_cut(network, fixture_json):
    geometry = fixture_json["deepmedic"]["inference_geometry"]
    tiler = Tiler(_normalised_inputs(), network.arch)
    assert list(tiler.padded.shape[1:]) == geometry["padded_shape"]
    assert tiler.starts == [geometry["tile_starts_padded"][axis] for axis in "xyz"]
    tile = np.load(REFERENCE / f"{CASE}_single_tile_reference.npz")
    start = tuple(int(s) for s in tile["tile_start_padded"])
    np.testing.assert_array_equal(tiler.tile(start), tile["x_normal"])
    np.testing.assert_array_equal(tiler.subsampled_tile(start, 3), tile["x_sub3"])
    np.testing.assert_array_equal(tiler.subsampled_tile(start, 5), tile["x_sub5"])


def test_tile_starts_end_at_the_border():
    assert tile_starts(256, 45, 29) == [0, 29, 58, 87, 116, 145, 174, 203, 211]
    assert tile_starts(74, 45, 29) == [0, 29]  # exactly two tiles: nothing shifted


@pytest.mark.slow
@pytest.mark.parametrize("execution", ENGINES)
def test_whole_volume_matches_the_original(network, fixture_json, execution):
    """The 64^3 crop of class probabilities within 1e-3 and the labels of every brain voxel, from the normalised
    inputs DeepMedic read (the crop's tiles start at z 0 and 29, where DeepMedic's subsampling grid restarts),
    through PyTorch and through OpenVINO."""
    volume = _normalised_inputs()
    brain = nib.load(SHARED_DATA / "nifti" / f"brats_space_{CASE}" / f"{CASE}-t1n.nii.gz").get_fdata() > 0
    probabilities = segment_volume(network, volume, CPU, roi=brain, execution=execution)
    box = fixture_json["crop_box"]
    crop = tuple(slice(a, b) for a, b in zip(box["start_ijk"], box["end_ijk_exclusive"]))
    reference_crop = nib.load(REFERENCE / f"{CASE}_probs_crop64_classes0-4.nii.gz").get_fdata(dtype=np.float32)
    assert np.abs(probabilities[(slice(None), *crop)].transpose(1, 2, 3, 0) - reference_crop).max() < 1e-3
    labels = np.array([0, 1, 2, 4, 4])[probabilities.argmax(0)]  # CaPTk's class -> BraTS label
    reference = np.asarray(nib.load(REFERENCE / f"{CASE}_deepmedic_labels.nii.gz").dataobj)
    assert (labels[brain] == reference[brain]).mean() >= 0.999
    counts = {v: int((labels == v).sum()) for v in (1, 2, 4)}
    assert counts == {int(k): v for k, v in fixture_json["checks"]["voxels_argmax_class"].items() if k != "0"}


@pytest.mark.slow
def test_bundle_from_raw_images_labels_like_captk(fixture_json):
    """The bundle as the pipeline runs it: raw BraTS-space images (SimpleITK, the atlas grid), CaPTk's
    normalisation, the tiling, CaPTk's class mapping, in the bundle's 2023 labels (1 NCR, 2 ED, 3 ET)."""
    bundle = load_bundle(BUNDLE)
    folder = SHARED_DATA / "nifti" / f"brats_space_{CASE}"
    order = sorted(bundle.inputs, key=bundle.inputs.get)
    images = [sitk.ReadImage(str(folder / f"{CASE}-{ROLE_FILES[role]}.nii.gz"), sitk.sitkFloat32) for role in order]
    result = run_deepmedic(images, bundle, CPU)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(REFERENCE / f"{CASE}_deepmedic_labels.nii.gz")))
    expected = np.array([0, 1, 2, 0, 3])[reference]  # BraTS 1, 2, 4 -> bundle 1, 2, 3
    brain = sitk.GetArrayFromImage(images[0]) > 0
    assert result.labels.shape == reference.shape  # (z, y, x), SimpleITK's order
    assert (result.labels[brain] == expected[brain]).mean() >= 0.999
    assert result.channel_labels == ((0,), (1,), (2,), (3,))
    np.testing.assert_allclose(result.probabilities.sum(0), 1, atol=1e-5)


@pytest.mark.slow
def test_bf16_labels_agree_with_fp32(network, openvino_bf16):
    """The real model at bf16 against fp32, Dice per region, on the brain within 16 voxels of CaPTk's tumour (the
    whole brain measured once: bench/RESULTS.md)."""
    from pedseg.evaluation import region_dice

    volume = _normalised_inputs()
    brain = nib.load(SHARED_DATA / "nifti" / f"brats_space_{CASE}" / f"{CASE}-t1n.nii.gz").get_fdata() > 0
    tumour = np.nonzero(np.asarray(nib.load(REFERENCE / f"{CASE}_deepmedic_labels.nii.gz").dataobj))
    around = tuple(slice(max(0, int(axis.min()) - 16), int(axis.max()) + 17) for axis in tumour)
    roi = np.zeros_like(brain)
    roi[around] = brain[around]
    to_2024 = np.array([0, 2, 4, 1, 1])  # CaPTk's class -> 2024 label (NCR counts as NET, ED, ET)
    fp32, bf16 = (to_2024[segment_volume(network, volume, CPU, roi=roi, execution=e).argmax(0)]
                  for e in (OPENVINO_FP32, Execution("openvino", "bf16", threads=2)))
    scores = region_dice(fp32, bf16)
    assert all(s is None or s >= 0.99 for s in scores.values()), scores
    assert scores["WT"] is not None


def test_conversion_reproduces_the_committed_weights(tmp_path, shared_data):
    out = tmp_path / "member"
    subprocess.run([sys.executable, str(REPO / "scripts" / "convert_deepmedic.py"),
                    str(SHARED_DATA.parent / "models" / "captk-deepmedic-brats"), str(out)], check=True,
                   capture_output=True)
    assert (out / "architecture.json").read_text() == (MEMBER / "architecture.json").read_text()
    with safe_open(str(out / "model.safetensors"), "pt") as new, safe_open(str(MEMBER / "model.safetensors"),
                                                                            "pt") as committed:
        assert new.metadata() == committed.metadata()
        assert set(new.keys()) == set(committed.keys())
        for key in new.keys():
            assert torch.equal(new.get_tensor(key), committed.get_tensor(key)), key
        metadata = committed.metadata()
    fixture = json.loads((REFERENCE / "fixture.json").read_text())["deepmedic"]["checkpoint"]
    assert json.loads(metadata["source_sha256"]) == fixture  # the checkpoint the parity figures come from
    assert "Modified form" in metadata["modified"]


def test_bundle_declares_the_model_and_ships_the_licence():
    bundle = load_bundle(BUNDLE)
    assert (bundle.kinds, bundle.population, bundle.label_convention) == (("deepmedic",), "adult", "2023")
    assert bundle.inputs == {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}  # t1, t1ce, t2, flair
    assert bundle.models[0].classes == {0: 0, 1: 1, 2: 2, 3: 3, 4: 3}
    licence = (BUNDLE / "LICENSE-SBIA.txt").read_text()
    assert "SBIA Contribution and Software License Agreement" in licence
    assert "modified" in json.loads((BUNDLE / "bundle.json").read_text())["licence"]


@pytest.fixture
def deepmedic_copy(tmp_path):
    copy = tmp_path / BUNDLE.name
    shutil.copytree(BUNDLE, copy)
    return copy


def _edit_model(bundle_dir: Path, **changes) -> None:
    spec = json.loads((bundle_dir / "bundle.json").read_text())
    spec["models"][0].update(changes)
    (bundle_dir / "bundle.json").write_text(json.dumps(spec))


@pytest.mark.parametrize(("change", "message"), [
    ({"kind": "tensorflow"}, "at models/0/kind, 'tensorflow' is not one of"),
    ({"normalisation": "nnunet"}, "at models/0/normalisation"),
    ({"weights": "absent.safetensors"}, "lacks absent.safetensors"),
    ({"classes": {"0": 0, "1": 1, "2": 2}}, "has 5 output classes but 'classes' maps \\[0, 1, 2\\]"),
    ({"classes": {"0": 0, "1": 1, "2": 2, "3": 3, "4": 7}}, "label values \\[7\\]"),
])
def test_bad_deepmedic_entries_are_bundle_errors(deepmedic_copy, change, message):
    _edit_model(deepmedic_copy, **change)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(deepmedic_copy)
    assert err.value.exit_code == 6


def test_weights_that_do_not_fit_the_architecture_are_named(deepmedic_copy):
    arch = json.loads((deepmedic_copy / "models/deepmedic/architecture.json").read_text())
    arch["feature_maps"][2] = 15
    (deepmedic_copy / "models/deepmedic/architecture.json").write_text(json.dumps(arch))
    with pytest.raises(BundleError, match=r"weights do not fit architecture.json \(normal.blocks.1.conv.weight is "
                                          r"\(14, 12, 3, 3, 3\), the architecture needs \(15, 12, 3, 3, 3\)") as err:
        load_bundle(deepmedic_copy)
    assert err.value.exit_code == 6


def test_a_mixed_bundle_checks_each_member_by_its_kind(deepmedic_copy):
    spec = json.loads((deepmedic_copy / "bundle.json").read_text())
    spec["models"].append({"path": "models/nnunet", "folds": [0]})
    (deepmedic_copy / "bundle.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match="model folder 'nnunet' has no dataset.json"):
        load_bundle(deepmedic_copy)


def test_architecture_shapes():
    arch = DeepMedicArchitecture.from_json(MEMBER / "architecture.json")
    assert (arch.receptive_field, arch.output_size) == (17, 29)
    assert [arch.subsampled_input_size(f) for f in arch.subsample_factors] == [26, 22]
