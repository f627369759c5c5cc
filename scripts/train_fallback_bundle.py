"""Train the fallback member of bundles/captk-deepmedic-brats-fallback: a real nnU-Net v2 model on T1c + FLAIR.

Data: the five expert-labelled BraTS 2013 glioma cases in ../shared/data/brats2013_t1c_flair/ (CC BY-NC-SA 3.0),
already in BraTS space and z-scored inside the brain. One case is held out (its Dice is the bundle's held-out
figure); fold 0 trains on the other four with nnU-Net's own planning, preprocessing and trainer, narrowed to a
CPU-sized network as the demo bundle is (scripts/train_demo_bundle.py holds the shared steps). Labels are mapped
to BraTS-PEDs 2023 (1 NCR = necrosis + non-enhancing, 2 ED, 3 ET), the label space of the CaPTk DeepMedic member,
so both members of the bundle share one label space. Four cases make a weak model: it is meant only for a session
that lacks the sequences the DeepMedic member needs.

    python -m scripts.train_fallback_bundle --workdir scratch/train-fallback \
        --out bundles/captk-deepmedic-brats-fallback

Steps: data -> plan (fingerprint, plans narrowed to FALLBACK, preprocessing) -> train -> export (the DeepMedic
member copied from bundles/captk-deepmedic-brats, the inference-only nnU-Net checkpoint, bundle.json, held-out
Dice). Steps already done are skipped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from scripts.train_demo_bundle import (
    NNUNET_FOREGROUND_OVERSAMPLING,
    TRAINER,
    CpuTraining,
    DemoConfiguration,
    export_model,
    plan_and_preprocess,
    set_nnunet_paths,
    train_fold,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "brats2013_t1c_flair"
PRIMARY = REPO / "bundles" / "captk-deepmedic-brats"
LICENCE_FILE = "License_CC_BY_NC_SA_3.0.txt"

CASES = tuple(f"brats_2013_pat{n:04d}_1" for n in range(1, 6))
HOLDOUT = "brats_2013_pat0005_1"  # the last case; never seen in training or validation
CHANNELS = {"0": "t1c", "1": "t2f"}  # model channel -> role, in the bundle's channel order
FILES = {"t1c": "T1c_subtrMeanDivStd.nii.gz", "t2f": "Flair_subtrMeanDivStd.nii.gz"}
LABELS_2023 = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
# BraTS 2013 OTMultiClass -> BraTS-PEDs 2023: necrosis and non-enhancing tumour are NCR, edema ED, enhancing ET.
TO_2023 = {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}
TO_INTERNAL = {0: 0, 1: 2, 2: 4, 3: 2, 4: 1}  # the same to the internal 2024 values (the held-out reference)

CONFIGURATION = "3d_fullres"
FALLBACK = CpuTraining(
    dataset_id=502,
    dataset_name="Dataset502_Brats2013T1cFlair",
    plans="nnUNetPlansFallback",
    spacing=[2.0, 2.0, 2.0],
    configurations={CONFIGURATION: DemoConfiguration([48, 48, 48], [8, 16, 32, 64, 128], batch_size=2, epochs=10)},
)
# the second, nnU-Net-default sampling phase (scripts/train_demo_bundle.py train_fold): with four cases, a model
# trained mostly on tumour-centred patches calls every bright FLAIR region oedema; tumour-free patches teach it not to
BALANCED_EPOCHS = 11
MEMBER_DIR = f"{TRAINER}__{FALLBACK.plans}__{CONFIGURATION}"


def _write(case: str, images_dir: Path, labels_dir: Path, mapping: dict[int, int]) -> None:
    """T1c and FLAIR with everything outside the brain mask set to 0 (the pipeline's skull-stripped inputs look
    so, and nnU-Net normalises inside the non-zero region), and the labels mapped by `mapping`."""
    import numpy as np
    import SimpleITK as sitk

    src = DATA / case
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "brainmask.nii.gz"))) > 0
    for channel, role in CHANNELS.items():
        image = sitk.ReadImage(str(src / FILES[role]), sitk.sitkFloat32)
        array = np.where(brain, sitk.GetArrayFromImage(image), 0).astype(np.float32)
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(images_dir / f"{case}_{int(channel):04d}.nii.gz"), useCompression=True)
    labels = sitk.ReadImage(str(src / "OTMultiClass.nii.gz"))
    values = np.rint(sitk.GetArrayFromImage(labels)).astype(np.int64)
    lookup = np.zeros(max(mapping) + 1, np.uint8)
    for source, target in mapping.items():
        lookup[source] = target
    out = sitk.GetImageFromArray(lookup[values])
    out.CopyInformation(labels)
    sitk.WriteImage(out, str(labels_dir / f"{case}.nii.gz"), useCompression=True)


def make_dataset(raw: Path, preprocessed: Path) -> None:
    """nnUNet_raw: the four training cases (imagesTr/labelsTr, labels in 2023 values) and the held-out case
    (imagesTs/labelsTs, labels in the internal convention, as scripts/evaluate_bundle.py compares them); and the
    one split nnU-Net trains: fold 0 on the four, validated (pseudo-Dice only) on one of them."""
    ds = raw / FALLBACK.dataset_name
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    train = [c for c in CASES if c != HOLDOUT]
    for case in CASES:
        held_out = case == HOLDOUT
        labels_dir = ds / ("labelsTs" if held_out else "labelsTr")
        if not (labels_dir / f"{case}.nii.gz").is_file():
            _write(case, ds / ("imagesTs" if held_out else "imagesTr"), labels_dir,
                   TO_INTERNAL if held_out else TO_2023)
            print(f"case {case} written", flush=True)
    dataset_json = {
        "channel_names": CHANNELS,
        "labels": LABELS_2023,
        "numTraining": len(train),
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",
        "name": "Brats2013T1cFlair",
        "description": "Four expert-labelled BraTS 2013 glioma cases (T1c, FLAIR), labels as BraTS-PEDs 2023.",
        "licence": "CC BY-NC-SA 3.0",
        "reference": "BraTS 2013 (Menze et al., IEEE TMI 2015), via the DeepMedic repository's examples",
    }
    (ds / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    # nnU-Net's own 5-fold split needs five cases; this is its splits_final.json format.
    (preprocessed / FALLBACK.dataset_name).mkdir(parents=True, exist_ok=True)
    splits = [{"train": train, "val": train[:1]}]
    (preprocessed / FALLBACK.dataset_name / "splits_final.json").write_text(json.dumps(splits, indent=2))


def fallback_member(epochs: int, iterations: int, note: str | None = None) -> dict:
    """The member's bundle.json entry, with how it was trained under "training" (bundle.json keeps that in its
    top-level "training" section, by member name)."""
    spec = FALLBACK.configurations[CONFIGURATION]
    return {
        "kind": "nnunetv2",
        "path": f"models/{MEMBER_DIR}",
        "folds": [0],
        "checkpoint": "checkpoint_final.pth",
        "required_inputs": list(CHANNELS.values()),
        "fallback": True,
        "training": {
            "script": "scripts/train_fallback_bundle.py",
            "data": "5 expert-labelled BraTS 2013 glioma cases (T1c, FLAIR; ../shared/data/brats2013_t1c_flair), "
                    f"4 trained on, {HOLDOUT} held out",
            "data_licence": "CC BY-NC-SA 3.0",
            "label_mapping": "BraTS 2013 1 necrosis, 3 non-enhancing -> 1 NCR; 2 edema -> 2 ED; 4 enhancing -> 3 ET",
            "trainer": TRAINER,
            "plans": FALLBACK.plans,
            "spacing_mm": FALLBACK.spacing,
            "patch_size": spec.patch_size,
            "features_per_stage": spec.features_per_stage,
            "batch_size": spec.batch_size,
            "epochs": epochs + BALANCED_EPOCHS,
            "tumour_centred_epochs": epochs,
            "iterations_per_epoch": iterations,
            "oversample_foreground_percent": {"tumour-centred phase": 1.0,
                                              "balanced phase": NNUNET_FOREGROUND_OVERSAMPLING},
            **({"note": note} if note else {}),
        },
    }


def write_bundle_json(out: Path, member: dict, holdout: dict, wall_s: float | None) -> None:
    primary = json.loads((PRIMARY / "bundle.json").read_text())
    member = dict(member)
    training = {**member.pop("training"), "train_wall_s": wall_s, "holdout_dice": holdout}
    bundle = {
        **primary,
        "name": out.name,
        "version": f"{primary['version']}+fallback.1",
        "licence": ("DeepMedic member: SBIA Software License Agreement v1.1, research use only (LICENSE-SBIA.txt), "
                    "modified form (weights converted from TensorFlow to safetensors); nnU-Net fallback member: "
                    f"trained on BraTS 2013 data, CC BY-NC-SA 3.0, non-commercial, share-alike ({LICENCE_FILE})"),
        "description": (
            "CaPTk's DeepMedic model for adult glioma (all four sequences) with a fallback nnU-Net v2 model on T1c "
            "and FLAIR only, trained on four expert-labelled BraTS 2013 cases, that runs only when a session lacks "
            "T1n or T2w. Adults only; the fallback is weak (see README.md, the model card)."),
        "population": "adult",
        # a session must have what the fallback needs; the DeepMedic member runs whenever it has all four
        "required_inputs": list(CHANNELS.values()),
        "models": [*primary["models"], member],
        "training": {"deepmedic": primary["training"], MEMBER_DIR: training},
    }
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")


def export(out: Path, results: Path, member: dict, raw: Path, wall_s: float | None) -> dict:
    from scripts.evaluate_bundle import evaluate_holdout

    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PRIMARY / "models" / "deepmedic", out / "models" / "deepmedic", dirs_exist_ok=True)
    shutil.copyfile(PRIMARY / "LICENSE-SBIA.txt", out / "LICENSE-SBIA.txt")
    shutil.copyfile(DATA / HOLDOUT / LICENCE_FILE, out / LICENCE_FILE)
    export_model(results / MEMBER_DIR, out / "models" / MEMBER_DIR, [0])
    write_bundle_json(out, member, holdout={}, wall_s=wall_s)
    holdout = evaluate_holdout(out, raw / FALLBACK.dataset_name)
    holdout["case"] = HOLDOUT
    write_bundle_json(out, member, holdout=holdout, wall_s=wall_s)
    return holdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "scratch" / "train-fallback")
    parser.add_argument("--out", type=Path, default=REPO / "bundles" / "captk-deepmedic-brats-fallback")
    parser.add_argument("--epochs", type=int, default=FALLBACK.configurations[CONFIGURATION].epochs,
                        help="tumour-centred epochs (a balanced phase of BALANCED_EPOCHS follows)")
    parser.add_argument("--iterations", type=int, default=30, help="training iterations per epoch")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", nargs="+", default=["data", "plan", "train", "export"])
    parser.add_argument("--note", help="how this run's training went beyond the defaults (kept in bundle.json)")
    args = parser.parse_args()

    work = args.workdir.resolve()
    set_nnunet_paths(work)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    if "data" in args.steps:
        make_dataset(work / "raw", work / "preprocessed")
    if "plan" in args.steps:
        plan_and_preprocess(args.workers, FALLBACK)
        print(f"planned and preprocessed after {time.time() - t0:.0f} s", flush=True)
    wall_file = work / "train_wall_s.txt"
    if "train" in args.steps:
        t_train = time.time()
        train_fold(CONFIGURATION, 0, args.epochs, args.iterations, args.device, FALLBACK, BALANCED_EPOCHS)
        before = float(wall_file.read_text()) if wall_file.is_file() else 0.0  # an earlier, resumed sitting
        wall_file.write_text(f"{before + time.time() - t_train:.0f}\n")
        print(f"trained after {time.time() - t0:.0f} s", flush=True)
    if "export" in args.steps:
        wall_s = float(wall_file.read_text()) if wall_file.is_file() else None
        holdout = export(args.out.resolve(), work / "results" / FALLBACK.dataset_name,
                         fallback_member(args.epochs, args.iterations, args.note), work / "raw", wall_s)
        print(json.dumps(holdout, indent=2))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
