"""Train the demo model bundle: a real nnU-Net v2 3d_fullres model on synthetic pediatric tumour phantoms.

Reproducible: fixed seeds for the synthetic cases, nnU-Net's own planning, preprocessing and trainer.
The network is deliberately small (coarser spacing, narrow features, small patch, short schedule) so it
trains on a 2-core CPU in about an hour; a user's real bundle drops in with the same bundle.json format.

    python scripts/train_demo_bundle.py --workdir scratch/train --out bundles/pedseg-demo

Steps: synthetic cases -> nnUNet_raw dataset -> fingerprint + plans (then narrowed) -> preprocessing ->
nnUNetTrainer (shortened schedule) per fold -> bundle folder with inference-only checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID}_PedSegDemo"
PLANS = "nnUNetPlansDemo"
CONFIGURATION = "3d_fullres"
# nnU-Net's base trainer: its loader finds it without importing optional architectures (timm/torchvision),
# so the bundle loads on a CPU-only install. The shorter schedule below is set on the instance.
TRAINER = "nnUNetTrainer"
EPOCHS = 50
CHANNELS = {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"}
LABELS = {"background": 0, "ET": 1, "NET": 2, "CC": 3, "ED": 4}
# Held-out seeds never overlap training seeds (training uses 0..N-1).
HOLDOUT_SEEDS = (9001, 9002, 9003, 9004)

# The narrowed 3d_fullres configuration (nnU-Net plans it for a GPU; this must train on a CPU).
DEMO_SPACING = [1.5, 1.5, 1.5]
DEMO_PATCH = [48, 48, 48]
DEMO_FEATURES = [8, 16, 32, 64, 128]
DEMO_BATCH = 2


def _write_case(args: tuple[int, Path, Path, str]) -> int:
    import SimpleITK as sitk

    from synth.session import generate_training_case

    seed, images_dir, labels_dir, name = args
    images, labels = generate_training_case(seed)
    for channel, role in CHANNELS.items():
        sitk.WriteImage(images[role], str(images_dir / f"{name}_{int(channel):04d}.nii.gz"), useCompression=True)
    if labels_dir is not None:
        sitk.WriteImage(labels, str(labels_dir / f"{name}.nii.gz"), useCompression=True)
    return seed


def make_dataset(raw: Path, n_cases: int, workers: int) -> None:
    ds = raw / DATASET_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(s, ds / "imagesTr", ds / "labelsTr", f"syn_{s:04d}") for s in range(n_cases)]
    jobs += [(s, ds / "imagesTs", ds / "labelsTs", f"syn_{s:04d}") for s in HOLDOUT_SEEDS]
    jobs = [j for j in jobs if not (j[2] / f"{j[3]}.nii.gz").exists()]
    with ProcessPoolExecutor(workers) as pool:
        for seed in pool.map(_write_case, jobs):
            print(f"case {seed} written", flush=True)
    dataset_json = {
        "channel_names": CHANNELS,
        "labels": LABELS,
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",
        "name": "PedSegDemo",
        "description": "Synthetic pediatric brain-tumour phantoms on the BraTS-space atlas (pedseg demo).",
        "licence": "CC0-1.0",
    }
    (ds / "dataset.json").write_text(json.dumps(dataset_json, indent=2))


def plan_and_preprocess(workers: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.paths import nnUNet_preprocessed

    extract_fingerprints([DATASET_ID], num_processes=workers, check_dataset_integrity=True)
    plan_experiments([DATASET_ID])  # nnU-Net's default plans, then narrowed below into PLANS
    pre = Path(nnUNet_preprocessed) / DATASET_NAME
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    config = plans["configurations"][CONFIGURATION]
    config["spacing"] = DEMO_SPACING
    config["patch_size"] = DEMO_PATCH
    config["batch_size"] = DEMO_BATCH
    config["data_identifier"] = f"{PLANS}_{CONFIGURATION}"
    median_mm = [s * sp for s, sp in zip(config["median_image_size_in_voxels"], plans["original_median_spacing_after_transp"])]
    config["median_image_size_in_voxels"] = [round(m / d) for m, d in zip(median_mm, DEMO_SPACING)]
    n_stages = len(DEMO_FEATURES)
    arch = config["architecture"]["arch_kwargs"]
    arch.update(
        n_stages=n_stages,
        features_per_stage=DEMO_FEATURES,
        kernel_sizes=[[3, 3, 3]] * n_stages,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
        n_conv_per_stage=[2] * n_stages,
        n_conv_per_stage_decoder=[2] * (n_stages - 1),
    )
    plans["configurations"] = {CONFIGURATION: config}
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
    preprocess([DATASET_ID], plans_identifier=PLANS, configurations=[CONFIGURATION], num_processes=[workers])


def train_fold(fold: int, iterations: int, device: str) -> Path:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, fold, TRAINER, PLANS, device=torch.device(device))
    # A CPU-sized budget: nnU-Net's poly schedule over EPOCHS epochs of `iterations` steps (default 1000 x 250).
    trainer.num_epochs = EPOCHS
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = max(5, iterations // 5)
    # Every patch centred on tumour (nnU-Net default: one in three). With so few iterations the small
    # sub-regions (ET rim, cyst) are otherwise never learned; a 72 mm patch still holds plenty of normal brain.
    trainer.oversample_foreground_percent = 1.0
    trainer.save_every = 5
    out = Path(trainer.output_folder)
    if (out / "checkpoint_final.pth").is_file():
        print(f"fold {fold} already trained: {out}", flush=True)
        return out
    if (out / "checkpoint_latest.pth").is_file():
        # An interrupted run resumes from its last saved epoch instead of starting over.
        trainer.load_checkpoint(str(out / "checkpoint_latest.pth"))
    trainer.run_training()
    return Path(trainer.output_folder)


def export_bundle(results_dir: Path, out: Path, folds: list[int], iterations: int, holdout: dict) -> None:
    import torch

    model_dir_name = f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    dst = out / "models" / model_dir_name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        shutil.copy(results_dir / name, dst / name)
    for fold in folds:
        ckpt = torch.load(results_dir / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        # Inference needs weights, init args, trainer name and mirroring axes; optimizer state only bloats the bundle.
        keep = ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes", "current_epoch")
        (dst / f"fold_{fold}").mkdir()
        torch.save({k: ckpt[k] for k in keep if k in ckpt}, dst / f"fold_{fold}" / "checkpoint_final.pth")
    bundle = {
        "format_version": 1,
        "name": "pedseg-demo",
        "version": "1.0.0",
        "licence": "CC0-1.0",
        "description": (
            "Demo nnU-Net v2 model trained only on synthetic phantoms built from the BraTS-space atlas. "
            "It shows the tool working end to end; it is not a model of real pediatric tumours."
        ),
        "inputs": {role: int(ch) for ch, role in CHANNELS.items()},
        "required_inputs": list(CHANNELS.values()),
        "label_convention": "2024",
        "labels": {"1": "ET", "2": "NET", "3": "CC", "4": "ED"},
        "models": [{"path": f"models/{model_dir_name}", "folds": folds, "weight": 1.0, "checkpoint": "checkpoint_final.pth"}],
        "tta": True,
        "fast_folds": folds[:1],
        "postprocessing": {
            "min_component_voxels": {"ET": 8, "NET": 8, "CC": 8, "ED": 20},
            "min_wt_component_voxels": 50,
            "redefine": [],
            "keep_largest_wt": False,
        },
        "training": {
            "script": "scripts/train_demo_bundle.py",
            "trainer": TRAINER,
            "epochs": EPOCHS,
            "iterations_per_epoch": iterations,
            "oversample_foreground_percent": 1.0,
            "plans": PLANS,
            "configuration": CONFIGURATION,
            "spacing_mm": DEMO_SPACING,
            "patch_size": DEMO_PATCH,
            "features_per_stage": DEMO_FEATURES,
            "holdout_dice": holdout,
        },
    }
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "scratch" / "train")
    parser.add_argument("--out", type=Path, default=REPO / "bundles" / "pedseg-demo")
    parser.add_argument("--cases", type=int, default=36)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iterations", type=int, default=50, help="training iterations per epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", nargs="+", default=["data", "plan", "train", "export"])
    args = parser.parse_args()

    work = args.workdir.resolve()
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[var] = str(work / sub)
        (work / sub).mkdir(parents=True, exist_ok=True)
    # One augmentation worker: on a 2-core machine the network itself needs both cores.
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    raw = work / "raw"
    results_dir = work / "results" / DATASET_NAME / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    t0 = time.time()
    if "data" in args.steps:
        make_dataset(raw, args.cases, args.workers)
        print(f"data ready after {time.time() - t0:.0f} s", flush=True)
    if "plan" in args.steps:
        plan_and_preprocess(args.workers)
        print(f"planned and preprocessed after {time.time() - t0:.0f} s", flush=True)
    if "train" in args.steps:
        for fold in args.folds:
            train_fold(fold, args.iterations, args.device)
            print(f"fold {fold} trained after {time.time() - t0:.0f} s", flush=True)
    if "export" in args.steps:
        from scripts.evaluate_bundle import evaluate_holdout

        export_bundle(results_dir, args.out, args.folds, args.iterations, holdout={})
        holdout = evaluate_holdout(args.out, raw / DATASET_NAME)
        export_bundle(results_dir, args.out, args.folds, args.iterations, holdout=holdout)
        print(json.dumps(holdout, indent=2))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
