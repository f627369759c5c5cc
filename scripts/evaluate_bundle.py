"""Held-out Dice of a bundle on synthetic BraTS-space cases (imagesTs/labelsTs of the demo dataset).

Runs the pipeline's own inference and post-processing stages, so the figure is the one users get.
    python scripts/evaluate_bundle.py bundles/pedseg-demo scratch/train/raw/Dataset501_PedSegDemo
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.bundle import load_bundle  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.infer import infer  # noqa: E402
from pipeline.postprocess import postprocess  # noqa: E402
from pipeline.types import Preprocessed  # noqa: E402

REGIONS = {"ET": (1,), "NET": (2,), "CC": (3,), "ED": (4,), "TC": (1, 2, 3), "WT": (1, 2, 3, 4)}


def dice(pred: np.ndarray, truth: np.ndarray, labels: tuple[int, ...]) -> float | None:
    p, t = np.isin(pred, labels), np.isin(truth, labels)
    if not t.any() and not p.any():
        return None  # region absent in both: Dice undefined, not counted
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


def predict_case(bundle_dir: Path, images: dict[str, Path], config: PipelineConfig) -> sitk.Image:
    bundle = load_bundle(bundle_dir)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Preprocessed(images=images, brain_mask=Path(), native={}, atlas_to_native={})
        prediction = infer(pre, bundle, Path(tmp), config)
        labels, _ = postprocess(sitk.ReadImage(str(prediction.labels)), bundle.postprocessing)
        return labels


def evaluate_holdout(bundle_dir: Path, dataset_dir: Path) -> dict:
    channels = json.loads((dataset_dir / "dataset.json").read_text())["channel_names"]
    per_case = {}
    for label_path in sorted((dataset_dir / "labelsTs").glob("*.nii.gz")):
        case = label_path.name[: -len(".nii.gz")]
        images = {role: dataset_dir / "imagesTs" / f"{case}_{int(ch):04d}.nii.gz" for ch, role in channels.items()}
        pred = sitk.GetArrayFromImage(predict_case(bundle_dir, images, PipelineConfig(device="cpu")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        per_case[case] = {region: dice(pred, truth, labels) for region, labels in REGIONS.items()}
        print(case, per_case[case], flush=True)
    mean = {
        region: round(float(np.mean(values)), 4) if (values := [c[region] for c in per_case.values() if c[region] is not None]) else None
        for region in REGIONS
    }
    return {"cases": len(per_case), "mean_dice": mean, "per_case": per_case}


if __name__ == "__main__":
    print(json.dumps(evaluate_holdout(Path(sys.argv[1]), Path(sys.argv[2])), indent=2))
