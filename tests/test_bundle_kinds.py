"""Bundles mixing member kinds (nnU-Net, DeepMedic, MONAI) with per-region weights, per-member inputs and declared
preprocessing: they load, and each malformed field is a clear bundle error (exit 6)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_model

from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import DEFAULT_BUNDLE, DEMO_BUNDLE
from pedseg.pipeline.errors import BundleError

NNUNET = "nnUNetTrainer__nnUNetPlansDemo__3d_fullres"
SEGRESNET_ARGS = {"spatial_dims": 3, "in_channels": 2, "out_channels": 5, "init_filters": 8}


def _monai_entry(**changes) -> dict:
    entry = {"kind": "monai", "path": "models/segresnet", "weights": "model.safetensors",
             "network": {"name": "SegResNet", "args": dict(SEGRESNET_ARGS)},
             "inference": {"roi_size": [32, 32, 32], "overlap": 0.25, "crop_to_nonzero": True},
             "normalisation": "zscore-nonzero", "activation": "softmax",
             "outputs": [[0], [1], [2], [3], [4]], "required_inputs": ["t1c", "t2f"],
             "region_weights": {"ET": 0.5, "WT": 1.5}}
    entry.update(changes)
    return entry


@pytest.fixture
def mixed(tmp_path):
    """The demo nnU-Net model, CaPTk's DeepMedic model (its BraTS 2017-2020 classes mapped onto 2024 labels) and
    a SegResNet on two sequences, in one 2024-convention bundle."""
    root = tmp_path / "mixed"
    (root / "models").mkdir(parents=True)
    (root / "models" / NNUNET).symlink_to((DEMO_BUNDLE / "models" / NNUNET).resolve())
    (root / "models" / "deepmedic").symlink_to((DEFAULT_BUNDLE / "models" / "deepmedic").resolve())
    (root / "models" / "segresnet").mkdir()
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    save_model(SegResNet(**SEGRESNET_ARGS), str(root / "models" / "segresnet" / "model.safetensors"))
    spec = json.loads((DEMO_BUNDLE / "bundle.json").read_text())
    spec.update(name="mixed", population="synthetic", preprocessing={"brain": "skull_stripped", "space": "sri24"})
    spec["models"] = [
        {"path": f"models/{NNUNET}", "folds": [0], "region_weights": {"WT": 2.0}},
        {"kind": "deepmedic", "path": "models/deepmedic", "normalisation": "captk-zscore", "weight": 0.5,
         "classes": {"0": 0, "1": 2, "2": 4, "3": 1, "4": 1}},
        _monai_entry(),
    ]
    (root / "bundle.json").write_text(json.dumps(spec))
    return root


def _rewrite(root, change):
    spec = json.loads((root / "bundle.json").read_text())
    change(spec)
    (root / "bundle.json").write_text(json.dumps(spec))


def test_a_bundle_of_three_kinds_loads(mixed):
    bundle = load_bundle(mixed)
    assert bundle.kinds == ("nnunetv2", "deepmedic", "monai")
    nnunet, deepmedic, monai = bundle.models
    assert (nnunet.weight_of("WT"), nnunet.weight_of("ET")) == (2.0, 1.0)
    assert (deepmedic.weight_of("WT"), monai.weight_of("ET"), monai.weight_of("TC")) == (0.5, 0.5, 1.0)
    assert monai.required_inputs == ("t1c", "t2f") and nnunet.required_inputs == ("t1n", "t1c", "t2w", "t2f")
    assert monai.monai.window.crop_to_nonzero and monai.monai.outputs[1] == (1,)
    # Without t1n and t2w only the SegResNet can run.
    assert [m.name for m in bundle.runnable({"t1c", "t2f"})] == ["segresnet"]


def test_a_member_may_declare_its_own_brain_preparation(mixed):
    _rewrite(mixed, lambda s: s["models"][2].update(brain="defaced"))
    bundle = load_bundle(mixed)
    assert [m.brain for m in bundle.models] == ["skull_stripped", "skull_stripped", "defaced"]


@pytest.mark.parametrize("change, message", [
    (lambda s: s["models"][2]["network"].update(name="SegNetX"), "'SegNetX' is not a network in monai.networks.nets"),
    (lambda s: s["models"][2].update(activation="relu"), "softmax: one channel per class"),
    (lambda s: s["models"][2].update(outputs=[[0], [1], [2], [3], [7]]), "label values [7]"),
    (lambda s: s["models"][2].update(required_inputs=["t1c"]), "takes 2 input channels but bundle.json gives it 1"),
    (lambda s: s["models"][2].update(required_inputs=["t1c", "dwi"]), "known sequence roles"),
    (lambda s: s["models"][2]["network"]["args"].update(init_filters=16), "do not fit SegResNet"),
    (lambda s: s["models"][2].update(weights="model.bin"), "safetensors file or a PyTorch state dict"),
    (lambda s: s["models"][0].update(region_weights={"XT": 1}), "region names of the label table"),
    (lambda s: s["models"][0].update(region_weights={"WT": -1}), "must not be negative"),
    (lambda s: s.update(preprocessing={"brain": "bet"}), "brain preparations"),
    (lambda s: s.update(inputs={"t1n": 0, "t1c": 1, "t2w": 2}), "requires ['t2f'], which the bundle's 'inputs'"),
])
def test_each_malformed_field_is_a_bundle_error(mixed, change, message):
    _rewrite(mixed, change)
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_bundle(mixed)
    assert err.value.exit_code == 6


def test_missing_monai_weights_are_named(mixed):
    shutil.rmtree(mixed / "models" / "segresnet")
    (mixed / "models" / "segresnet").mkdir()
    with pytest.raises(BundleError, match="MONAI model 'segresnet' lacks its weights model.safetensors"):
        load_bundle(mixed)


def test_a_fallback_member_runs_only_when_no_primary_member_can(mixed):
    _rewrite(mixed, lambda s: s["models"][2].update(fallback=True))
    bundle = load_bundle(mixed)
    assert [m.fallback for m in bundle.models] == [False, False, True] and bundle.has_fallbacks
    everything = {"t1n", "t1c", "t2w", "t2f"}
    # A complete session runs the primary members only; the SegResNet is not averaged in.
    assert [m.name for m in bundle.runnable(everything)] == [NNUNET, "deepmedic"]
    assert bundle.skip_reasons(everything) == {"segresnet": "fallback member, not needed: the primary members can run"}
    # Without t1n and t2w only the fallback can, and does.
    assert [m.name for m in bundle.runnable({"t1c", "t2f"})] == ["segresnet"]
    assert bundle.skip_reasons({"t1c", "t2f"}) == {NNUNET: "needs ['t1n', 't2w'], which the session lacks",
                                                   "deepmedic": "needs ['t1n', 't2w'], which the session lacks"}
    assert bundle.runnable({"t1c"}) == ()


@pytest.mark.parametrize("fallbacks, message", [
    ([0, 1, 2], "every model is a fallback"),
    # the nnU-Net model needs the four sequences the DeepMedic model needs: it could never run
    ([0], f"fallback model '{NNUNET}' needs ['t1n', 't1c', 't2w', 't2f'], all that model 'deepmedic' needs"),
])
def test_a_fallback_that_could_never_run_is_a_bundle_error(mixed, fallbacks, message):
    _rewrite(mixed, lambda s: [s["models"][i].update(fallback=True) for i in fallbacks])
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_bundle(mixed)
    assert err.value.exit_code == 6


def test_fallback_must_be_a_boolean(mixed):
    _rewrite(mixed, lambda s: s["models"][2].update(fallback="yes"))
    with pytest.raises(BundleError, match="a fallback member runs only when no other member can"):
        load_bundle(mixed)
