"""Ensemble inference through nnU-Net v2's own network construction, checkpoint loading and sliding window.

Each bundle model (an nnU-Net trained-model folder) runs its folds with nnUNetPredictor; the models'
class probabilities are averaged with the bundle's weights, then nnU-Net's label manager turns the average
into labels, so label-based and region-based (BraTS-style) models are both handled by nnU-Net itself.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.bundle import ModelBundle
from pipeline.config import PipelineConfig
from pipeline.errors import BundleError, MissingSequenceError
from pipeline.types import Prediction, Preprocessed

logger = logging.getLogger(__name__)

# Region name -> internal (BraTS-PEDs 2024) label value. 2023's NCR has no cyst/non-enhancing split: it becomes NET.
INTERNAL_LABELS = {"ET": 1, "NET": 2, "CC": 3, "ED": 4, "NCR": 2}


def pick_device(requested: str):
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BundleError("--device cuda was requested but no CUDA GPU is visible.", hint="Use --device auto or cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


def _stack_inputs(pre: Preprocessed, bundle: ModelBundle) -> tuple[np.ndarray, sitk.Image]:
    missing = [role for role in bundle.inputs if role not in pre.images]
    if missing:
        raise MissingSequenceError(
            f"Model bundle '{bundle.name}' needs {missing} but the session provided only {sorted(pre.images)}.",
            hint="Use a bundle trained for the available sequences.",
        )
    by_channel = sorted(bundle.inputs.items(), key=lambda item: item[1])
    images = [sitk.ReadImage(str(pre.images[role]), sitk.sitkFloat32) for role, _ in by_channel]
    # SimpleITK array order (z, y, x), as nnU-Net's SimpleITKIO reads BraTS NIfTI during training.
    return np.stack([sitk.GetArrayFromImage(img) for img in images]).astype(np.float32), images[0]


def infer(pre: Preprocessed, bundle: ModelBundle, workdir: Path, config: PipelineConfig) -> Prediction:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = pick_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
    data, reference = _stack_inputs(pre, bundle)
    spacing_zyx = list(reversed(reference.GetSpacing()))
    use_tta = bundle.tta and not config.fast
    averaged, total_weight, label_manager, folds_used = None, 0.0, None, []
    for model in bundle.models:
        folds = tuple(f for f in model.folds if not config.fast or f in bundle.fast_folds) or model.folds[:1]
        t0 = time.perf_counter()
        predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=use_tta,
            perform_everything_on_device=device.type == "cuda", device=device, verbose=False, allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(
            str(model.path), use_folds=tuple(int(f) if f != "all" else f for f in folds), checkpoint_name=model.checkpoint
        )
        _, probabilities = predictor.predict_single_npy_array(data, {"spacing": spacing_zyx}, None, None, True)
        weighted = model.weight * probabilities.astype(np.float32)
        averaged = weighted if averaged is None else averaged + weighted
        total_weight += model.weight
        label_manager = predictor.label_manager
        folds_used += [f"{model.path.name}/fold_{f}" for f in folds]
        logger.info("model %s, folds %s, TTA %s on %s: %.1f s", model.path.name, ",".join(folds), use_tta, device.type,
                    time.perf_counter() - t0)
    averaged /= total_weight
    model_labels = np.asarray(label_manager.convert_probabilities_to_segmentation(averaged))
    labels = _to_internal_labels(model_labels, bundle)

    out = workdir / "prediction"
    out.mkdir(parents=True, exist_ok=True)
    labels_path = _write_like(labels.astype(np.uint8), reference, out / "labels_atlas.nii.gz")
    entropy = -(averaged * np.log(np.clip(averaged, 1e-8, 1))).sum(0) / np.log(averaged.shape[0])
    uncertainty_path = _write_like(entropy.astype(np.float32), reference, out / "uncertainty_atlas.nii.gz")
    probabilities_path = out / "probabilities_atlas.npz"
    np.savez_compressed(probabilities_path, probabilities=averaged.astype(np.float16))
    return Prediction(
        labels=labels_path, probabilities=probabilities_path, uncertainty=uncertainty_path,
        label_names={v: k for k, v in INTERNAL_LABELS.items() if k != "NCR"},
        models_used=[m.path.name for m in bundle.models], folds_used=folds_used, tta=use_tta, device=device.type,
    )


def _to_internal_labels(model_labels: np.ndarray, bundle: ModelBundle) -> np.ndarray:
    lut = np.zeros(max(bundle.labels) + 1, np.uint8)
    for value, region in bundle.labels.items():
        lut[value] = INTERNAL_LABELS[region]
    return lut[model_labels]


def _write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path
