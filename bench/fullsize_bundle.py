"""A full-size bundle for timing only: nnU-Net's default 3d_fullres network for this dataset (1 mm, patch
128x160x112, six stages of 32-320 features, what BraTS nnU-Net entries train) with randomly initialised weights.

No trained full-size weights exist here, and speed and memory do not depend on the weights' values, so
bench/inference.py runs this bundle to measure the engine at the scale the issue's figures are about. Its
labels mean nothing; label parity is tested on the trained demo bundle (tests/test_infer.py).

    .venv/bin/python bench/fullsize_bundle.py [--out scratch/bench/fullsize-bundle] [--folds 5]
    .venv/bin/python bench/inference.py --bundle scratch/bench/fullsize-bundle --fast --no-tta

The network is built and saved with nnU-Net's own code and checkpoint layout, so the predictor loads it
exactly as it loads a trained model folder.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEMO_BUNDLE = ROOT / "bundles" / "pedseg-demo"
CONFIGURATION = "3d_fullres"
# nnU-Net 2.x's ExperimentPlanner output for the demo dataset's fingerprint at 1 mm (8 GB GPU target).
FULL_SIZE = {
    "spacing": [1.0, 1.0, 1.0],
    "patch_size": [128, 160, 112],
    "batch_size": 2,
    "architecture": {
        "n_stages": 6,
        "features_per_stage": [32, 64, 128, 256, 320, 320],
        "kernel_sizes": [[3, 3, 3]] * 6,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
        "n_conv_per_stage": [2] * 6,
        "n_conv_per_stage_decoder": [2] * 5,
    },
}


def full_size_plans(demo_plans: dict) -> dict:
    plans = copy.deepcopy(demo_plans)
    plans["plans_name"] = "nnUNetPlansFullSize"
    configuration = plans["configurations"][CONFIGURATION]
    configuration.update({k: FULL_SIZE[k] for k in ("spacing", "patch_size", "batch_size")})
    configuration["data_identifier"] = "nnUNetPlansFullSize_3d_fullres"
    configuration["architecture"]["arch_kwargs"].update(FULL_SIZE["architecture"])
    return plans


def write_fold(model_dir: Path, plans: dict, dataset: dict, fold: int) -> None:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    configuration = manager.get_configuration(CONFIGURATION)
    torch.manual_seed(fold)
    network = get_network_from_plans(
        configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        determine_num_input_channels(manager, configuration, dataset),
        manager.get_label_manager(dataset).num_segmentation_heads, allow_init=True, deep_supervision=False)
    checkpoint = {
        "network_weights": network.state_dict(),
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": fold, "dataset_json": dataset,
                      "device": "cpu"},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "current_epoch": 0,
    }
    (model_dir / f"fold_{fold}").mkdir(parents=True)
    torch.save(checkpoint, model_dir / f"fold_{fold}" / "checkpoint_final.pth")


def build(out: Path, folds: int) -> Path:
    demo = json.loads((DEMO_BUNDLE / "bundle.json").read_text())
    demo_model = DEMO_BUNDLE / demo["models"][0]["path"]
    if out.exists():
        shutil.rmtree(out)
    model_dir = out / "models" / f"nnUNetTrainer__nnUNetPlansFullSize__{CONFIGURATION}"
    model_dir.mkdir(parents=True)
    plans = full_size_plans(json.loads((demo_model / "plans.json").read_text()))
    dataset = json.loads((demo_model / "dataset.json").read_text())
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=1))
    shutil.copy(demo_model / "dataset.json", model_dir)
    shutil.copy(demo_model / "dataset_fingerprint.json", model_dir)
    for fold in range(folds):
        write_fold(model_dir, plans, dataset, fold)
    spec = {**demo, "name": "fullsize-timing-only", "training": {"note": "random weights, for timing only"},
            "description": "nnU-Net default full-size 3d_fullres network with random weights: bench/ timing only.",
            "models": [{"path": str(model_dir.relative_to(out)), "folds": list(range(folds)), "weight": 1.0,
                        "checkpoint": "checkpoint_final.pth"}], "fast_folds": [0]}
    (out / "bundle.json").write_text(json.dumps(spec, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "scratch" / "bench" / "fullsize-bundle")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    print(f"full-size timing bundle written to {build(args.out, args.folds)}")


if __name__ == "__main__":
    main()
