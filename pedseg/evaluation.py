"""Segmentations held against a reference: Dice per region, and a bundle's labels on atlas-space cases.

Used by the bundle evaluation script, the benchmarks and the tests, so every Dice in the project is counted
the one way nnU-Net's own evaluation counts it (its region-aware true/false positive counts).
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.infer import infer
from pedseg.pipeline.labels import REGIONS, region_mask
from pedseg.pipeline.postprocess import postprocess
from pedseg.pipeline.types import Preprocessed


def mask_dice(reference: np.ndarray, prediction: np.ndarray) -> float | None:
    """Dice of two masks; None when both are empty (undefined, and not to be averaged)."""
    tp, fp, fn, _ = compute_tp_fp_fn_tn(np.asarray(reference, bool), np.asarray(prediction, bool))
    return None if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def region_dice(reference: np.ndarray, prediction: np.ndarray,
                regions: Iterable[str] = tuple(REGIONS)) -> dict[str, float | None]:
    """Dice of every region (composites included) between two label maps in the internal convention."""
    return {name: mask_dice(region_mask(reference, name), region_mask(prediction, name)) for name in regions}


def predict_atlas_case(bundle_dir: Path, images: dict[str, Path], config: PipelineConfig) -> sitk.Image:
    """A bundle's post-processed labels for a case already in atlas space (role -> NIfTI): the inference and
    post-processing stages users get, without ingest and preprocessing."""
    bundle = load_bundle(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="pedseg-evaluate-") as tmp:
        pre = Preprocessed(images=images, brain_mask=Path(), native={}, atlas_to_native={})
        prediction = infer(pre, bundle, Path(tmp), config)
        labels, _ = postprocess(sitk.ReadImage(str(prediction.labels)), bundle.postprocessing)
        return labels
