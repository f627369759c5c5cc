"""The real fallback bundle (bundles/captk-deepmedic-brats-fallback): CaPTk's DeepMedic model for complete sessions
and an nnU-Net v2 model trained on four expert-labelled BraTS 2013 cases (T1c + FLAIR, scripts/
train_fallback_bundle.py) for sessions without T1 or T2. A complete session runs DeepMedic only; a real glioma
re-acquired as DICOM without its T1 and T2 series is segmented by the fallback model, and the outputs say so."""
from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from pedseg.evaluation import region_dice, to_internal
from pedseg.pipeline.atlas import brats_reference_grid
from pedseg.pipeline.bundle import FALLBACK_NOT_NEEDED, load_bundle
from pedseg.pipeline.config import DEFAULT_BUNDLE
from pedseg.pipeline.types import ROLES

from factories import SHARED_DATA

BUNDLE = DEFAULT_BUNDLE.parent / "captk-deepmedic-brats-fallback"
FALLBACK = "nnUNetTrainer__nnUNetPlansFallback__3d_fullres"
CASE = SHARED_DATA / "nifti" / "TCGA-DU-7294"


def test_a_complete_session_runs_deepmedic_only_and_one_without_t1n_and_t2w_the_fallback():
    bundle = load_bundle(BUNDLE)
    assert [(m.name, m.fallback) for m in bundle.models] == [("deepmedic", False), (FALLBACK, True)]
    assert [m.name for m in bundle.runnable(ROLES)] == ["deepmedic"]
    assert [m.name for m in bundle.runnable({"t1c", "t2f"})] == [FALLBACK]
    assert [m.name for m in bundle.runnable({"t1n", "t1c", "t2f"})] == [FALLBACK]
    assert bundle.runnable({"t1n", "t1c", "t2w"}) == ()  # no FLAIR: nothing can run
    # A complete session does not warn that a model was skipped: the fallback was not needed.
    assert bundle.skip_reasons(ROLES) == {FALLBACK: FALLBACK_NOT_NEEDED}
    assert bundle.skip_reasons({"t1c", "t2f"}) == {"deepmedic": "needs ['t1n', 't2w'], which the session lacks"}
    assert bundle.required_inputs == ("t1c", "t2f") and bundle.has_fallbacks
    # One label space (BraTS-PEDs 2023), the DeepMedic member exactly as in the default bundle.
    primary = load_bundle(DEFAULT_BUNDLE)
    assert (bundle.label_convention, bundle.labels) == (primary.label_convention, primary.labels)
    assert bundle.models[0].classes == primary.models[0].classes
    for name in ("architecture.json", "model.safetensors"):
        assert (BUNDLE / "models" / "deepmedic" / name).read_bytes() == \
            (DEFAULT_BUNDLE / "models" / "deepmedic" / name).read_bytes()
    assert json.loads((BUNDLE / "models" / FALLBACK / "dataset.json").read_text())["labels"] == \
        {"background": 0, "NCR": 1, "ED": 2, "ET": 3}


def test_the_bundle_says_both_licences_and_the_fallbacks_held_out_figure():
    spec = json.loads((BUNDLE / "bundle.json").read_text())
    assert "SBIA" in spec["licence"] and "CC BY-NC-SA 3.0" in spec["licence"]
    for name in ("LICENSE-SBIA.txt", "License_CC_BY_NC_SA_3.0.txt", "README.md"):
        assert (BUNDLE / name).is_file(), name
    assert spec["population"] == "adult"
    holdout = spec["training"][FALLBACK]["holdout_dice"]
    assert holdout["cases"] == 1 and set(holdout["mean_dice"]) >= {"WT", "TC", "ET"}
    checkpoint = BUNDLE / "models" / FALLBACK / "fold_0" / "checkpoint_final.pth"
    assert checkpoint.stat().st_size < 8_000_000  # inference-only (5.7 MB of weights): no optimizer state


@pytest.mark.slow
def test_a_real_glioma_without_t1n_and_t2w_is_segmented_by_the_fallback_model(shared_data, tmp_path):
    from pypdf import PdfReader

    from pedseg.cli.main import main
    from pedseg.synth.reacquire import find_case_images, reacquire_session

    dicom = reacquire_session(find_case_images(CASE), tmp_path / "session", seed=1, distractors=False)
    for role in ("t1n", "t2w"):
        (folder,) = dicom.glob(f"*_{role}")
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    out = tmp_path / "out"
    assert main(["run", str(dicom), str(out), "--bundle", str(BUNDLE), "--device", "cpu", "--threads", "1"]) == 0

    measurements = json.loads((out / "measurements.json").read_text())
    models = measurements["context"]["models"]
    assert models["ran"] == [FALLBACK]
    assert models["skipped"] == {"deepmedic": "needs ['t1n', 't2w'], which the session lacks"}
    first_page = PdfReader(out / "report.pdf").pages[0].extract_text()
    assert "Not every model of the bundle could run" in first_page and "deepmedic" in first_page

    # The tumour is found: held against the five-algorithm BraTS consensus in the patient's anatomy (the labels on
    # the t1c's native grid carried into BraTS space with the known acquisition pose), the fallback covers the
    # consensus' whole tumour. It is a weak four-case model and calls far too much oedema (measured: 95 % of the
    # consensus covered, WT Dice 0.24, 169 mL against 24 mL), so the bounds below catch a model that misses the
    # tumour or labels the whole brain, not one that is merely weak.
    native = sitk.ReadImage(str(out / "nifti" / "labels_t1c_native.nii.gz"))
    pose = sitk.ReadTransform(str(tmp_path / "session" / "ground_truth" / "pose_t1c.tfm"))
    ours = sitk.GetArrayFromImage(sitk.Resample(native, brats_reference_grid(), pose.GetInverse(),
                                                sitk.sitkNearestNeighbor, 0))
    consensus_path = CASE / "fusion_consensus.nii.gz"
    consensus = to_internal(sitk.GetArrayFromImage(sitk.ReadImage(str(consensus_path))), "brats2020", consensus_path)
    dice = region_dice(consensus, ours, ("WT", "TC"))
    covered = float((ours[consensus > 0] > 0).mean())
    wt_ml = measurements["regions"]["WT"]["volume_ml"]
    print(f"fallback from DICOM vs the BraTS consensus: {dice}, {covered:.0%} of its WT covered, WT {wt_ml} mL "
          f"(consensus {(consensus > 0).sum() / 1000} mL)")
    assert covered >= 0.8
    assert dice["WT"] >= 0.15
    assert 20 <= wt_ml <= 400  # the consensus' 24 mL; a brain is 1200-1500 mL
