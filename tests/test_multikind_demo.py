"""The multi-kind demo bundle (bundles/pedseg-demo-multikind, made by scripts/train_monai_member.py): the demo
nnU-Net model and a MONAI SegResNet averaged per region. It loads and validates, both members find a held-out
phantom's tumour through the pipeline's inference, the ensemble is the per-region weighted mean of the members'
probabilities, and its recorded held-out figures hold the ensemble to its best member."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pedseg.evaluation import mask_dice
from pedseg.pipeline.backend import TORCH_FP32
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.member_ensemble import LabelSpace, MemberOutput
from pedseg.pipeline.members import run_members
from pedseg.pipeline.types import ROLES
from pedseg.synth.session import HOLDOUT_SEEDS

from factories import write_training_case

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "pedseg-demo-multikind"
NNUNET = "nnUNetTrainer__nnUNetPlansDemo__3d_fullres"
MONAI = "segresnet"
REGIONS = ("WT", "TC", "ET+NET", "ET")  # the ensemble's channels, largest first
CROP = (96, 96, 80)  # x, y, z voxels around the tumour: both members in seconds on a CPU
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE)


@pytest.fixture(scope="module")
def phantom():
    """A held-out phantom's BraTS-space images, cropped around its tumour, and its labels (z, y, x)."""
    from pedseg.synth.session import generate_training_case

    images, labels = generate_training_case(HOLDOUT_SEEDS[1])
    z, y, x = (int(np.median(i)) for i in np.nonzero(sitk.GetArrayViewFromImage(labels)))
    index = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip((x, y, z), CROP, labels.GetSize())]
    cropped = {role: sitk.RegionOfInterest(images[role], CROP, index) for role in ROLES}
    return cropped, sitk.GetArrayFromImage(sitk.RegionOfInterest(labels, CROP, index))


def test_bundle_loads_with_both_kinds_and_region_weights(bundle):
    spec = json.loads((BUNDLE / "bundle.json").read_text())
    assert bundle.kinds == ("nnunetv2", "monai") and bundle.licence == "CC0-1.0"
    assert bundle.population == "synthetic"
    nnunet, monai = bundle.models
    assert (nnunet.name, monai.name) == (NNUNET, MONAI)
    assert monai.monai.network == "SegResNet" and monai.monai.activation == "sigmoid"
    assert monai.monai.outputs == ((1, 2, 3, 4), (1, 2, 3), (1, 2), (1,))
    # every named region is weighted, and each region's weights are shares of one
    for region in ("WT", "TC", "ET"):
        assert region in nnunet.region_weights and region in monai.region_weights
        assert nnunet.weight_of(region) + monai.weight_of(region) == pytest.approx(1.0)
    assert nnunet.weight + monai.weight == pytest.approx(1.0)  # the ET+NET channel: the plain weights
    # the weights bundle.json declares are the ones its training record says were chosen on validation phantoms
    record = spec["training"]["region_weights"]
    validation = record["validation_seeds"]
    assert not set(validation) & set(HOLDOUT_SEEDS) and min(validation) >= 9000  # neither trained on nor held out
    for region, scores in record["validation_dice_by_nnunet_share"].items():
        best = max(scores.values())
        chosen = nnunet.weight_of(region) if region != "ET+NET" else nnunet.weight
        assert scores[str(chosen)] == best, region


def test_recorded_holdout_ensemble_whole_tumour_is_not_below_its_best_member():
    holdout = json.loads((BUNDLE / "bundle.json").read_text())["training"]["holdout_dice"]
    assert holdout["seeds"] == list(HOLDOUT_SEEDS) and holdout["cases"] == len(HOLDOUT_SEEDS)
    members = [holdout[NNUNET]["mean_dice"], holdout[MONAI]["mean_dice"]]
    ensemble = holdout["ensemble"]["mean_dice"]
    assert ensemble["WT"] >= max(m["WT"] for m in members)
    for scores in (*members, ensemble):  # each figure is the mean of the per-case ones it claims to be
        assert 0.5 < scores["WT"] <= 1
    for name in (NNUNET, MONAI, "ensemble"):
        per_case = holdout[name]["per_case"]
        assert sorted(per_case) == [f"syn_{s}" for s in HOLDOUT_SEEDS]
        assert holdout[name]["mean_dice"]["WT"] == pytest.approx(np.mean([c["WT"] for c in per_case.values()]),
                                                                 abs=1e-4)


def test_both_members_run_and_each_region_is_their_weighted_mean(bundle, phantom):
    images, truth = phantom

    def images_of(member):
        return [images[role] for role in member.required_inputs]

    executions = {"nnunetv2": TORCH_FP32, "monai": TORCH_FP32}
    # each member alone, in its own label space (where per-region weights mean nothing)
    alone = {m.name: run_members(images_of, [dataclasses.replace(m, region_weights={})], bundle, CPU, executions,
                                 tta=False, fast=True) for m in bundle.models}
    both = run_members(images_of, bundle.models, bundle, CPU, executions, tta=False, fast=True)

    assert both.has_regions and both.channel_labels == ((1, 2, 3, 4), (1, 2, 3), (1, 2), (1,))
    assert both.probabilities.shape == (4, *truth.shape)
    space = LabelSpace(both.channel_labels, has_regions=True)
    regions = {name: space.convert(MemberOutput(name, r.probabilities, r.channel_labels, r.has_regions))
               for name, r in alone.items()}
    # each member alone finds the phantom's whole tumour
    for name, probabilities in regions.items():
        assert mask_dice(truth > 0, probabilities[0] > 0.5) > 0.8, name
    nnunet, monai = bundle.models
    for channel, region in enumerate(REGIONS):
        w_n, w_m = (nnunet.weight_of(region), monai.weight_of(region))
        expected = (w_n * regions[NNUNET][channel] + w_m * regions[MONAI][channel]) / (w_n + w_m)
        np.testing.assert_allclose(both.probabilities[channel], expected, atol=1e-5, err_msg=region)
    # the regions' weights differ somewhere, so per-region weighting is what the check above exercised
    assert len({nnunet.weight_of(r) for r in REGIONS}) > 1
    # labels painted from the averaged regions, largest first: ET from its own channel, last
    assert (both.labels[both.probabilities[0] > 0.5] > 0).all()
    assert ((both.labels == 1) == (both.probabilities[3] > 0.5)).all()
    assert mask_dice(truth > 0, both.labels > 0) > 0.8


@pytest.mark.slow
def test_a_heldout_case_through_inference_and_postprocessing_matches_the_record(tmp_path):
    """The whole inference and post-processing stages users get, on a held-out phantom: the recorded per-case
    ensemble Dice (the bundle's defaults: both folds, PyTorch fp32) is what a run gives."""
    from pedseg.evaluation import predict_atlas_case, region_dice
    from pedseg.pipeline.config import PipelineConfig

    seed = HOLDOUT_SEEDS[0]
    paths, truth = write_training_case(seed, tmp_path)
    config = PipelineConfig(device="cpu", backend="torch", precision="fp32", threads=2)
    scores = region_dice(sitk.GetArrayFromImage(truth), sitk.GetArrayFromImage(predict_atlas_case(BUNDLE, paths,
                                                                                                  config)))
    recorded = json.loads((BUNDLE / "bundle.json").read_text())["training"]["holdout_dice"]["ensemble"]
    expected = recorded["per_case"][f"syn_{seed}"]
    assert scores["WT"] > 0.8
    for region, value in scores.items():
        if value is not None and expected[region] is not None:
            assert value == pytest.approx(expected[region], abs=0.01), region
