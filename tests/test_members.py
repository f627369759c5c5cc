"""Running a bundle of several kinds (pipeline.infer -> pipeline.members): each member gets the sequences and the
brain preparation it declared, per-region weights apply, a session missing a sequence runs the fallback members
and says which were skipped, and a run no member can make stops with exit 3."""
import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import save_model

from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import DEFAULT_BUNDLE, DEMO_BUNDLE, PipelineConfig
from pedseg.pipeline.errors import BundleError, MissingSequenceError
from pedseg.pipeline.infer import infer
from pedseg.pipeline.member_ensemble import LabelSpace, MemberOutput, average
from pedseg.pipeline.monai_member import load_monai_member, predict
from pedseg.pipeline.types import ROLES, Preprocessed

NNUNET = "nnUNetTrainer__nnUNetPlansDemo__3d_fullres"
CPU = torch.device("cpu")
CROP = (112, 112, 96)  # x, y, z voxels around the tumour: small enough for three engines in seconds


def _segresnet(folder, in_channels):
    from monai.networks.nets import SegResNet

    torch.manual_seed(in_channels)
    folder.mkdir(parents=True)
    args = {"spatial_dims": 3, "in_channels": in_channels, "out_channels": 5, "init_filters": 8}
    save_model(SegResNet(**args), str(folder / "model.safetensors"))
    return {"kind": "monai", "path": f"models/{folder.name}", "network": {"name": "SegResNet", "args": args},
            "inference": {"roi_size": [64, 64, 64], "overlap": 0.25, "crop_to_nonzero": True},
            "activation": "softmax", "outputs": [[0], [1], [2], [3], [4]]}


def _bundle(root, models):
    """A 2024-convention bundle in `root` with the demo nnU-Net model, CaPTk's DeepMedic model and the given
    members available under models/."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    sources = {NNUNET: DEMO_BUNDLE / "models" / NNUNET, "deepmedic": DEFAULT_BUNDLE / "models" / "deepmedic"}
    for name, source in sources.items():
        if not (root / "models" / name).exists():
            (root / "models" / name).symlink_to(source.resolve())
    spec = json.loads((DEMO_BUNDLE / "bundle.json").read_text())
    spec.update(name=root.name, models=models, population="synthetic")
    del spec["required_inputs"]  # what every member needs, by default
    (root / "bundle.json").write_text(json.dumps(spec))
    return load_bundle(root)


NNUNET_MEMBER = {"path": f"models/{NNUNET}", "folds": [0], "region_weights": {"ET": 2.0}}
# CaPTk's classes (0, NCR, ED, ET, ET) onto the 2024 labels (NCR -> NET 2, ED 4, ET 1)
DEEPMEDIC_MEMBER = {"kind": "deepmedic", "path": "models/deepmedic", "normalisation": "captk-zscore", "weight": 0.5,
                    "classes": {"0": 0, "1": 2, "2": 4, "3": 1, "4": 1}}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A held-out phantom's skull-stripped BraTS-space images cropped around the tumour, and a 'defaced' version
    of each that differs from it (a block of head outside the brain kept), so a test sees which one a member
    was given."""
    from pedseg.synth.session import generate_training_case

    root = tmp_path_factory.mktemp("phantom")
    images, labels = generate_training_case(9001)
    z, y, x = (int(np.median(i)) for i in np.nonzero(sitk.GetArrayViewFromImage(labels)))
    size = list(CROP)
    index = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip((x, y, z), size, labels.GetSize())]
    paths = {"skull_stripped": {}, "defaced": {}}
    for role in ROLES:
        image = sitk.RegionOfInterest(images[role], size, index)
        head = sitk.GetArrayFromImage(image)
        head[:, :12][head[:, :12] == 0] = 300.0  # tissue the skull stripping removed, outside the brain
        with_head = sitk.GetImageFromArray(head)
        with_head.CopyInformation(image)
        for brain, version in (("skull_stripped", image), ("defaced", with_head)):
            (root / brain).mkdir(exist_ok=True)
            paths[brain][role] = root / brain / f"{role}.nii.gz"
            sitk.WriteImage(version, str(paths[brain][role]))
        mask = sitk.Cast(image > 0, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(root / "brain_mask.nii.gz"))
    return root, paths


def _pre(phantom, roles=ROLES) -> Preprocessed:
    root, paths = phantom
    return Preprocessed(images={r: paths["skull_stripped"][r] for r in roles}, brain_mask=root / "brain_mask.nii.gz",
                        native={}, atlas_to_native={},
                        prepared={"defaced": {r: paths["defaced"][r] for r in roles}})


def _config(bundle) -> PipelineConfig:
    return PipelineConfig(bundle=bundle.root, device="cpu", backend="torch", fast=True, threads=2)


def _labels(prediction) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(prediction.labels)))


def _monai_alone(member, phantom, brain, roles) -> np.ndarray:
    """The member's own softmax on the phantom's `brain` images of `roles`, (C, z, y, x)."""
    _, paths = phantom
    volume = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(paths[brain][r]), sitk.sitkFloat32)).T
                       for r in roles])
    network = load_monai_member(member.monai, member.path / member.weights, "test")
    return predict(network, volume, member.monai, CPU, tta=False).transpose(0, 3, 2, 1)


@pytest.mark.slow
def test_three_kinds_averaged_with_per_region_weights(tmp_path, phantom):
    """nnU-Net (ET weighted 2), DeepMedic (0.5) and a SegResNet on t1c + FLAIR: the stage's labels are the
    weighted mean of each engine's own probabilities, computed here member by member."""
    from pedseg.pipeline.deepmedic import run_deepmedic
    from pedseg.pipeline.ensemble import Member, nnunet_input, run_ensemble

    segresnet = {**_segresnet(tmp_path / "mixed" / "models" / "segresnet", 2), "required_inputs": ["t1c", "t2f"]}
    bundle = _bundle(tmp_path / "mixed", [NNUNET_MEMBER, DEEPMEDIC_MEMBER, segresnet])
    prediction = infer(_pre(phantom), bundle, tmp_path / "work", _config(bundle))
    assert prediction.folds_used == [f"{NNUNET}/fold_0", "deepmedic", "segresnet"]
    assert prediction.ensemble.members_skipped == {} and prediction.ensemble.backend == "torch"

    _, paths = phantom
    images = [sitk.ReadImage(str(paths["skull_stripped"][r]), sitk.sitkFloat32) for r in ROLES]
    nnunet = run_ensemble(*nnunet_input(images), [Member(bundle.models[0], ("0",))], CPU, tta=False)
    deepmedic = run_deepmedic(images, dataclasses.replace(bundle, models=(bundle.models[1],)), CPU)
    outputs = [MemberOutput("nnunet", nnunet.probabilities, nnunet.channel_labels, False),
               MemberOutput("deepmedic", deepmedic.probabilities, deepmedic.channel_labels, False),
               MemberOutput("segresnet", _monai_alone(bundle.models[2], phantom, "skull_stripped", ("t1c", "t2f")),
                            ((0,), (1,), (2,), (3,), (4,)), False)]
    space = LabelSpace.for_members(outputs)  # background, ET, NET, CC, ED
    weights = {"nnunet": [1, 2, 1, 1, 1], "deepmedic": [0.5] * 5, "segresnet": [1] * 5}
    expected = space.labels(average(outputs, weights, space))
    assert (_labels(prediction) == expected).mean() == 1.0
    assert (expected > 0).sum() > 1000  # the demo model finds the phantom's tumour, so the comparison means something


def test_a_session_without_t1n_and_t2w_runs_the_fallback_member_and_says_so(tmp_path, phantom):
    segresnet = {**_segresnet(tmp_path / "fb" / "models" / "segresnet", 2), "required_inputs": ["t1c", "t2f"]}
    bundle = _bundle(tmp_path / "fb", [NNUNET_MEMBER, segresnet])
    assert bundle.required_inputs == ("t1c", "t2f")  # what every member needs
    prediction = infer(_pre(phantom, ("t1c", "t2f")), bundle, tmp_path / "work", _config(bundle))
    assert prediction.models_used == ["segresnet"]
    assert prediction.ensemble.members_skipped == {NNUNET: "needs ['t1n', 't2w'], which the session lacks"}
    expected = _monai_alone(bundle.models[1], phantom, "skull_stripped", ("t1c", "t2f")).argmax(0)
    lut = np.array([0, 1, 2, 3, 4])  # the member's classes are the bundle's 2024 labels
    np.testing.assert_array_equal(_labels(prediction), lut[expected])


def test_a_member_that_declares_defaced_gets_the_defaced_images(tmp_path, phantom):
    segresnet = {**_segresnet(tmp_path / "dfc" / "models" / "segresnet", 4), "brain": "defaced"}
    bundle = _bundle(tmp_path / "dfc", [segresnet])
    labels = _labels(infer(_pre(phantom), bundle, tmp_path / "work", _config(bundle)))
    defaced = _monai_alone(bundle.models[0], phantom, "defaced", ROLES).argmax(0)
    stripped = _monai_alone(bundle.models[0], phantom, "skull_stripped", ROLES).argmax(0)
    assert (defaced != stripped).any()  # the two preparations do give different answers here...
    np.testing.assert_array_equal(labels, defaced)  # ...and the member was given the defaced one


def test_no_member_able_to_run_is_exit_3_naming_what_each_needs(tmp_path, phantom):
    segresnet = {**_segresnet(tmp_path / "none" / "models" / "segresnet", 2), "required_inputs": ["t1c", "t2f"]}
    bundle = _bundle(tmp_path / "none", [NNUNET_MEMBER, segresnet])
    with pytest.raises(MissingSequenceError, match=r"No model of bundle 'none' can run on the session's sequences "
                                                   r"\['t1c', 't1n'\]: .*'segresnet' needs \['t2f'\]") as err:
        infer(_pre(phantom, ("t1n", "t1c")), bundle, tmp_path / "work", _config(bundle))
    assert err.value.exit_code == 3


def test_a_region_weight_the_members_are_not_averaged_over_is_refused_before_any_member_runs(tmp_path, phantom,
                                                                                            monkeypatch):
    import pedseg.pipeline.members as members

    def run_member(member, *args, **kwargs):
        raise AssertionError(f"{member.name} ran")

    monkeypatch.setattr(members, "_run_member", run_member)
    segresnet = {**_segresnet(tmp_path / "rw" / "models" / "segresnet", 4), "region_weights": {"WT": 2.0}}
    bundle = _bundle(tmp_path / "rw", [NNUNET_MEMBER, segresnet])
    with pytest.raises(BundleError, match=r"model 'segresnet' has region_weights for \['WT'\], but its members are "
                                          r"averaged over \['background', 'ET', 'NET', 'CC', 'ED'\]"):
        infer(_pre(phantom), bundle, tmp_path / "work", _config(bundle))


def test_region_weights_are_checked_for_every_set_of_members_before_the_session_is_read(tmp_path):
    """The fallback member alone (a session with t1c and t2f only) weights ED, which it predicts; with the
    nnU-Net member too it is still a class space. 'WT' fails for either set, and a run stops on it before it
    reads its input (exit 6, not 2 for the missing folder)."""
    from pedseg.pipeline.members import check_bundle_region_weights
    from pedseg.runner import run_pipeline

    segresnet = {**_segresnet(tmp_path / "cb" / "models" / "segresnet", 2), "required_inputs": ["t1c", "t2f"],
                 "region_weights": {"ED": 2.0}}
    check_bundle_region_weights(_bundle(tmp_path / "cb", [NNUNET_MEMBER, segresnet]))
    wrong = {**_segresnet(tmp_path / "cb2" / "models" / "segresnet", 2), "required_inputs": ["t1c", "t2f"],
             "region_weights": {"WT": 2.0}}
    with pytest.raises(BundleError, match=r"model 'segresnet' has region_weights for \['WT'\]"):
        check_bundle_region_weights(_bundle(tmp_path / "cb2", [NNUNET_MEMBER, wrong]))
    with pytest.raises(BundleError, match=r"model 'segresnet' has region_weights for \['WT'\]"):
        run_pipeline(tmp_path / "no-such-session", tmp_path / "out", _config(load_bundle(tmp_path / "cb2")))


def test_each_kind_declares_the_channels_its_engine_gives_before_it_runs(tmp_path):
    """What the region-weight check reads: nnU-Net's from its plans and dataset.json (the demo model: classes),
    DeepMedic's from its `classes`, MONAI's from `outputs` and `activation`."""
    from pedseg.pipeline.members import declared_channels

    segresnet = _segresnet(tmp_path / "dc" / "models" / "segresnet", 4)
    bundle = _bundle(tmp_path / "dc", [NNUNET_MEMBER, DEEPMEDIC_MEMBER, segresnet])
    nnunet, deepmedic, monai = (declared_channels(m) for m in bundle.models)
    assert nnunet == (((0,), (1,), (2,), (3,), (4,)), False)
    assert deepmedic == (((0,), (1,), (2,), (4,)), False)
    assert monai == (((0,), (1,), (2,), (3,), (4,)), False)
    spec = bundle.models[2].monai
    regions = dataclasses.replace(spec, activation="sigmoid", outputs=((1, 2, 3, 4), (1, 2, 3), (1,)))
    assert declared_channels(dataclasses.replace(bundle.models[2], monai=regions)) == (regions.outputs, True)


@pytest.mark.slow
def test_a_monai_member_runs_on_openvino_and_provenance_says_so(tmp_path, phantom):
    """The fallback member through the whole inference stage on OpenVINO fp32 against PyTorch fp32: the same
    labels (measured: 99.9996 % of the 112 x 112 x 96 crop's voxels; random weights, so near-ties), and each
    member's backend and precision recorded."""
    segresnet = {**_segresnet(tmp_path / "ov" / "models" / "segresnet", 2), "required_inputs": ["t1c", "t2f"]}
    bundle = _bundle(tmp_path / "ov", [NNUNET_MEMBER, segresnet])
    pre = _pre(phantom, ("t1c", "t2f"))
    torch_run = infer(pre, bundle, tmp_path / "torch", _config(bundle))
    openvino_run = infer(pre, bundle, tmp_path / "openvino", dataclasses.replace(_config(bundle), backend="openvino",
                                                                                 precision="fp32"))
    assert torch_run.ensemble.executions == {"segresnet": {"backend": "torch", "precision": "fp32"}}
    assert openvino_run.ensemble.executions == {"segresnet": {"backend": "openvino", "precision": "fp32"}}
    assert (openvino_run.ensemble.backend, openvino_run.ensemble.precision) == ("openvino", "fp32")
    assert (_labels(openvino_run) == _labels(torch_run)).mean() >= 0.999


def _identification(chosen_roles):
    """Series 3-6 as t1n, t1c, t2w, t2f, of which only `chosen_roles` were recognised; a DWI series besides."""
    from pedseg.pipeline.types import Identification, SeriesDecision

    descriptions = {"t1n": "T1 SE AX", "t1c": "T1 SE AX POST GD", "t2w": "T2 TSE AX", "t2f": "FLAIR AX"}
    decisions = [SeriesDecision(series_uid=f"1.2.3.{n}", series_number=n, description=descriptions[role],
                                role=role if role in chosen_roles else "other",
                                confidence=0.9 if role in chosen_roles else 0.0,
                                reasons=[f"{role} by description"] if role in chosen_roles else ["not recognised"],
                                chosen=role in chosen_roles)
                 for n, role in enumerate(ROLES, start=3)]
    decisions.append(SeriesDecision(series_uid="1.2.3.9", series_number=9, description="ep2d_diff", role="other",
                                    confidence=0.0, reasons=["diffusion"]))
    return Identification(decisions=decisions, chosen={d.role: d.series_uid for d in decisions if d.chosen},
                          missing=[r for r in ROLES if r not in chosen_roles], reference_role="t1c")


def test_no_member_able_to_run_stops_before_preprocessing_with_what_was_identified_in_error_json(tmp_path,
                                                                                                  monkeypatch):
    """The runner refuses at identification (exit 3), before any preprocessing; the console message names the
    missing sequences and what each model needs, and error.json holds the partial report."""
    import pedseg.runner as runner
    from pedseg.workspace import Workspace

    segresnet = {**_segresnet(tmp_path / "pr" / "models" / "segresnet", 2), "required_inputs": ["t1c", "t2f"]}
    bundle = _bundle(tmp_path / "pr", [NNUNET_MEMBER, segresnet])
    monkeypatch.setattr(runner, "identify", lambda session, config: _identification(("t1n", "t1c")))
    monkeypatch.setattr(runner, "preprocess", lambda *a, **k: pytest.fail("preprocessed"))
    with pytest.raises(MissingSequenceError) as err, Workspace(tmp_path / "out") as workspace:
        runner.run_session(None, workspace, _config(bundle), bundle=bundle)
    message = str(err.value)
    assert err.value.exit_code == 3
    assert "No model of bundle 'pr' can run on this session, which lacks T2 (t2w), T2-FLAIR (t2f)." in message
    assert "t1c series 4 'T1 SE AX POST GD' (confidence 0.90)" in message
    assert (f"'{NNUNET}' needs t1n + t1c + t2w + t2f (lacks t2w, t2f); 'segresnet' needs t1c + t2f (lacks t2f)"
            in message)
    error = json.loads((tmp_path / "out" / "error.json").read_text())
    assert error["error"] == "missing_sequence" and error["message"] == err.value.message
    report = error["details"]["identification"]
    assert report["missing"] == ["t2w", "t2f"]
    assert report["chosen"]["t1c"] == {"series_number": 4, "description": "T1 SE AX POST GD", "part": None,
                                       "role": "t1c", "confidence": 0.9, "reasons": ["t1c by description"],
                                       "pinned": False}
    assert report["models"] == {NNUNET: {"needs": ["t1n", "t1c", "t2w", "t2f"], "lacks": ["t2w", "t2f"],
                                         "can_run": False},
                                "segresnet": {"needs": ["t1c", "t2f"], "lacks": ["t2f"], "can_run": False}}
    assert [s["series_number"] for s in report["other_series"]] == [5, 6, 9]
    assert "1.2.3." not in json.dumps(error)  # series by number and description only
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["error.json"]  # nothing half-written beside it



def test_the_refusal_names_what_the_models_lack_even_when_identification_listed_nothing_missing(tmp_path,
                                                                                                monkeypatch):
    """Identification under a permissive missing policy may list no missing role: the message still names the
    sequences the bundle's models lack, never an empty list."""
    import pedseg.runner as runner
    from pedseg.workspace import Workspace

    segresnet = {**_segresnet(tmp_path / "pm" / "models" / "segresnet", 2), "required_inputs": ["t1c", "t2f"]}
    bundle = _bundle(tmp_path / "pm", [NNUNET_MEMBER, segresnet])
    identification = dataclasses.replace(_identification(("t1n", "t1c")), missing=[])
    monkeypatch.setattr(runner, "identify", lambda session, config: identification)
    with pytest.raises(MissingSequenceError, match=r"can run on this session, which lacks T2 \(t2w\), "
                                                   r"T2-FLAIR \(t2f\)\."), Workspace(tmp_path / "out") as workspace:
        runner.run_session(None, workspace, _config(bundle), bundle=bundle)
