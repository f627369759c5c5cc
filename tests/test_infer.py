"""Inference engine: label parity with stock nnU-Net, the weighted multi-model ensemble, fast mode, the stage's
NIfTI outputs and uncertainty summary, the GPU out-of-memory fallback (bundle checks and post-processing:
tests/test_pipeline_units.py).

The parity and ensemble tests run the committed demo bundles on one synthetic held-out case on the CPU, through
PyTorch and through OpenVINO (the CPU default); the variants with all folds and mirroring TTA are marked slow.
bf16 against fp32 runs wherever OpenVINO computes bf16 (natively, or emulated on AVX-512).
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import pedseg.pipeline.ensemble as ensemble
import pedseg.pipeline.infer as infer_module
from pedseg.evaluation import mask_dice, region_dice
from pedseg.pipeline.backend import Execution
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import DEMO_BUNDLE, PipelineConfig
from pedseg.pipeline.ensemble import Member, nnunet_input, preprocessing_key, run_ensemble, tiles_per_batch
from pedseg.pipeline.errors import ResourceError
from pedseg.pipeline.infer import infer, normalised_entropy, uncertainty_summary
from pedseg.pipeline.labels import region_mask
from pedseg.pipeline.types import ROLES, Preprocessed
from pedseg.synth.session import HOLDOUT_SEEDS, generate_training_case

ENSEMBLE_BUNDLE = DEMO_BUNDLE.parent / "pedseg-demo-ensemble"
CPU = torch.device("cpu")
PARITY_DICE = 0.999
BF16_DICE = 0.99  # bf16 against fp32, per region
OPENVINO_FP32 = Execution("openvino", "fp32", threads=2)


def _bundle(path: Path):
    if not (path / "bundle.json").is_file():
        pytest.fail(f"bundle missing at {path}: run scripts/train_demo_bundle.py")
    return load_bundle(path)


def _around_the_tumour(images: dict[str, sitk.Image], truth: sitk.Image, margin_mm: float = 16.0):
    """The case cropped (physical geometry kept) to the tumour's bounding box plus a margin: still several
    overlapping tiles per axis for the sliding window, at a fraction of the whole brain's inference time."""
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(truth > 0)
    x, y, z, sx, sy, sz = shape.GetBoundingBox(1)
    margin = [int(round(margin_mm / s)) for s in truth.GetSpacing()]
    lower = [max(0, a - m) for a, m in zip((x, y, z), margin)]
    upper = [min(n, a + s + m) for a, s, m, n in zip((x, y, z), (sx, sy, sz), margin, truth.GetSize())]
    size = [u - lo for lo, u in zip(lower, upper)]
    crop = {role: sitk.RegionOfInterest(image, size, lower) for role, image in images.items()}
    return crop, sitk.RegionOfInterest(truth, size, lower)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """One held-out synthetic case around its tumour, written as nnU-Net input files (case_0000.nii.gz, ...)
    and as roles."""
    root = tmp_path_factory.mktemp("case")
    images, truth = _around_the_tumour(*generate_training_case(HOLDOUT_SEEDS[0]))
    files, roles = [], {}
    for channel, role in enumerate(ROLES):  # the demo bundles' channel order
        roles[role] = root / f"case_{channel:04d}.nii.gz"
        sitk.WriteImage(images[role], str(roles[role]))
        files.append(str(roles[role]))
    data, spacing = nnunet_input([images[role] for role in roles])
    return {"files": files, "roles": roles, "data": data, "spacing": spacing, "truth": sitk.GetArrayFromImage(truth)}


def _stock_predictor(model, folds: tuple[str, ...], tta: bool, device: torch.device = CPU):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model.path), tuple(int(f) for f in folds), model.checkpoint)
    return predictor


def _assert_parity(ours: np.ndarray, stock: np.ndarray) -> dict:
    scores = region_dice(stock, ours)
    assert all(s is None or s >= PARITY_DICE for s in scores.values()), scores
    assert scores["WT"] is not None  # the case has a tumour: parity is not vacuous
    return scores


# ------------------------------------------------------------------------------------ parity with nnU-Net


ENGINES = [pytest.param("cpu", Execution(), id="cpu-torch"),
           pytest.param("cpu", OPENVINO_FP32, id="cpu-openvino"),
           pytest.param("cuda", Execution("torch", "fp16"), id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA GPU on this machine")])]


@pytest.mark.parametrize(("device", "execution"), ENGINES)
def test_labels_equal_stock_nnunet_one_fold_no_tta(case, device, execution):
    """On the CPU through PyTorch and OpenVINO, and on CUDA where there is a GPU (the engine's autocast and
    on-device accumulation)."""
    bundle = _bundle(DEMO_BUNDLE)
    model = bundle.models[0]
    device = torch.device(device)
    ours = run_ensemble(case["data"], case["spacing"], [Member(model, model.folds[:1])], device, tta=False,
                        execution=execution)
    stock = _stock_predictor(model, model.folds[:1], tta=False, device=device).predict_from_files_sequential(
        [case["files"]], None, save_probabilities=False)[0]
    _assert_parity(ours.labels, stock)
    assert ours.preprocessing_runs == 1


@pytest.mark.slow
def test_labels_equal_stock_nnunet_all_folds_with_tta(case):
    """Through OpenVINO, the CPU default: one compiled model per fold, mirroring as nnU-Net does it."""
    bundle = _bundle(DEMO_BUNDLE)
    model = bundle.models[0]
    ours = run_ensemble(case["data"], case["spacing"], [Member(model, model.folds)], CPU, tta=True,
                        execution=OPENVINO_FP32)
    stock = _stock_predictor(model, model.folds, tta=True).predict_from_files_sequential(
        [case["files"]], None, save_probabilities=False)[0]
    _assert_parity(ours.labels, stock)


def test_a_bundle_allows_bf16_only_where_its_labels_keep_to_fp32s(case, openvino_bf16):
    """bf16 within Dice 0.99 of fp32 per region, or the bundle forbids it (then `auto` runs it in fp32 on any
    CPU). The demo bundles forbid it: enhancing tumour 0.986 on this case (measured 2026-11-30 with OpenVINO's
    emulated bf16, for the ensemble bundle too; bench/RESULTS.md), the other regions 0.996 and up."""
    bundle = _bundle(DEMO_BUNDLE)
    members = [Member(model, folds) for model, folds in bundle.folds_to_run(fast=True)]
    fp32 = run_ensemble(case["data"], case["spacing"], members, CPU, tta=False, execution=OPENVINO_FP32)
    bf16 = run_ensemble(case["data"], case["spacing"], members, CPU, tta=False,
                        execution=Execution("openvino", "bf16", threads=2))
    scores = region_dice(fp32.labels, bf16.labels)
    assert scores["WT"] is not None and scores["WT"] >= BF16_DICE, scores
    assert not bundle.allow_bf16 or all(s is None or s >= BF16_DICE for s in scores.values()), scores


# ------------------------------------------------------------------------------------- multi-model ensemble


def test_two_model_ensemble_matches_weighted_stock_predictions(case, tmp_path, caplog):
    """The multi-model path on the two-model demo bundle in fast mode: one preprocessing for both models, and
    the written probability maps and labels are stock nnU-Net's per-model probabilities averaged with the
    bundle's weights."""
    bundle = _bundle(ENSEMBLE_BUNDLE)
    assert len(bundle.models) == 2
    assert len({m.weight for m in bundle.models}) == 2
    pre = Preprocessed(images=case["roles"], brain_mask=Path(), native={}, atlas_to_native={})
    with caplog.at_level(logging.INFO, logger="pedseg.pipeline.infer"):
        prediction = infer(pre, bundle, tmp_path, PipelineConfig(device="cpu", fast=True, threads=2, precision="fp32"))

    assert prediction.tta is False
    assert prediction.device == "cpu"
    assert (prediction.ensemble.backend, prediction.ensemble.precision) == ("openvino", "fp32")  # auto on a CPU
    assert "inference on cpu with openvino at fp32 (as requested)" in caplog.text
    fast = bundle.folds_to_run(fast=True)
    assert prediction.folds_used == [f"{m.path.name}/fold_{f}" for m, folds in fast for f in folds]
    assert prediction.ensemble.preprocessing_runs == 1  # both models share the demo plans' preprocessing
    assert prediction.ensemble.weights == {m.path.name: m.weight for m in bundle.models}
    assert set(prediction.probabilities) == {"ET", "NET", "CC", "ED"}
    reference = sitk.ReadImage(str(case["roles"]["t1n"]))
    for path in (prediction.labels, prediction.uncertainty, *prediction.probabilities.values()):
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == reference.GetSize()
        assert image.GetOrigin() == reference.GetOrigin()

    expected = 0
    for model, folds in fast:
        _, probabilities = _stock_predictor(model, folds, tta=False).predict_single_npy_array(
            case["data"], {"spacing": case["spacing"]}, None, None, True)
        expected = expected + model.weight * probabilities / sum(m.weight for m in bundle.models)
    for channel, region in ((1, "ET"), (2, "NET"), (4, "ED")):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction.probabilities[region])))
        # Maps are rounded to 0.001; nnU-Net accumulates tiles in half precision, whose rounding differs
        # slightly between a batch of tiles and one tile at a time.
        assert np.abs(written - expected[channel]).max() <= 5e-3, region
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction.labels)))
    assert mask_dice(region_mask(expected.argmax(0), "WT"), region_mask(labels, "WT")) >= PARITY_DICE
    assert mask_dice(region_mask(case["truth"], "WT"), region_mask(labels, "WT")) >= 0.8


def test_fast_mode_runs_fast_folds_or_the_first():
    bundle = _bundle(ENSEMBLE_BUNDLE)
    assert [folds for _, folds in bundle.folds_to_run(fast=False)] == [m.folds for m in bundle.models]
    assert [folds for _, folds in bundle.folds_to_run(fast=True)] == [
        tuple(f for f in m.folds if f in bundle.fast_folds) or m.folds[:1] for m in bundle.models]


# ------------------------------------------------------------------------------------------ engine parts


def _predictor_like(**config) -> SimpleNamespace:
    plans = {"transpose_forward": [0, 1, 2], "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}}}
    base = {"preprocessor_name": "DefaultPreprocessor", "spacing": [1.5, 1.5, 1.5], "patch_size": [48, 48, 48],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [True],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {"order": 3}}
    return SimpleNamespace(plans_manager=SimpleNamespace(plans=plans),
                           configuration_manager=SimpleNamespace(configuration={**base, **config}))


def test_models_share_preprocessing_only_when_it_is_identical():
    same = preprocessing_key(_predictor_like()) == preprocessing_key(_predictor_like(patch_size=[64, 64, 64]))
    assert same  # a different network or patch size preprocesses the same way
    assert preprocessing_key(_predictor_like()) != preprocessing_key(_predictor_like(spacing=[1.0, 1.0, 1.0]))
    assert preprocessing_key(_predictor_like()) != preprocessing_key(_predictor_like(use_mask_for_norm=[False]))


def test_tiles_per_batch_bounds():
    assert tiles_per_batch([48, 48, 48]) == 8  # small patches: batched, off the slow batch-1 CPU kernel
    assert tiles_per_batch([56, 56, 56]) == 5
    assert tiles_per_batch([128, 160, 112]) == 1  # a full-size 3d_fullres patch gains nothing from batching
    assert tiles_per_batch([96, 96]) == 8


def test_normalised_entropy_bounds():
    certain = np.zeros((5, 2, 2, 2), np.float32)
    certain[0] = 1
    uniform = np.full((5, 2, 2, 2), 0.2, np.float32)
    assert np.allclose(normalised_entropy(certain, False), 0, atol=1e-6)
    assert np.allclose(normalised_entropy(uniform, False), 1, atol=1e-6)
    assert np.allclose(normalised_entropy(np.full((3, 2, 2, 2), 0.5, np.float32), True), 1, atol=1e-6)


def test_uncertainty_summary_inside_final_regions(tmp_path):
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:4] = 4  # ED
    labels[4:6] = 2  # NET
    entropy = np.zeros((10, 10, 10), np.float32)
    entropy[2:4] = 0.6
    entropy[4:6] = 0.2
    entropy[8:] = 0.9  # uncertain but not labelled: counts in uncertain_volume_ml only
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((2.0, 1.0, 1.0))
    path = tmp_path / "u.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(entropy), str(path))
    summary = uncertainty_summary(path, image)
    assert summary.mean_entropy_WT == pytest.approx(0.4)
    assert summary.mean_entropy_TC == pytest.approx(0.2)
    assert summary.uncertain_volume_ml == pytest.approx(400 * 2 / 1000)
    assert uncertainty_summary(None, image) is None


def test_out_of_gpu_memory_with_device_cuda_is_a_resource_error(case, tmp_path, monkeypatch):
    """--device cuda never moves to the CPU behind the user's back (auto does: tests/test_hostile_inputs.py)."""
    def run(data, spacing, members, device, tta, execution):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ensemble, "run_ensemble", run)
    monkeypatch.setattr(infer_module, "pick_device", lambda requested: torch.device("cuda"))
    pre = Preprocessed(images=case["roles"], brain_mask=Path(), native={}, atlas_to_native={})
    with pytest.raises(ResourceError, match="GPU ran out of memory"):
        infer(pre, _bundle(DEMO_BUNDLE), tmp_path, PipelineConfig(device="cuda"))
