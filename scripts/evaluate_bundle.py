"""Held-out Dice of a bundle on synthetic BraTS-space cases (imagesTs/labelsTs of the demo dataset).

Runs the pipeline's own inference and post-processing stages, so the figure is the one users get.
    python scripts/evaluate_bundle.py bundles/pedseg-demo scratch/train/raw/Dataset501_PedSegDemo
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pedseg.evaluation import predict_atlas_case, region_dice
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.labels import REGIONS


def evaluate_holdout(bundle_dir: Path, dataset_dir: Path) -> dict:
    channels = json.loads((dataset_dir / "dataset.json").read_text())["channel_names"]
    per_case = {}
    for label_path in sorted((dataset_dir / "labelsTs").glob("*.nii.gz")):
        case = label_path.name[: -len(".nii.gz")]
        images = {role: dataset_dir / "imagesTs" / f"{case}_{int(ch):04d}.nii.gz" for ch, role in channels.items()}
        pred = sitk.GetArrayFromImage(predict_atlas_case(bundle_dir, images, PipelineConfig(device="cpu")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        per_case[case] = region_dice(truth, pred)
        print(case, per_case[case], flush=True)
    mean = {
        region: round(float(np.mean(values)),
                      4) if (values := [c[region] for c in per_case.values() if c[region] is not None]) else None
        for region in REGIONS
    }
    return {"cases": len(per_case), "mean_dice": mean, "per_case": per_case}


if __name__ == "__main__":
    print(json.dumps(evaluate_holdout(Path(sys.argv[1]), Path(sys.argv[2])), indent=2))
