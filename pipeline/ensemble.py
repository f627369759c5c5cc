"""Weighted ensemble of nnU-Net v2 trained-model folders × folds, run through nnU-Net's own predictor.

nnU-Net builds each network from its plans and trainer class, loads every fold's checkpoint into that one
network, averages the folds' logits over its Gaussian-weighted sliding window (with mirroring TTA when on),
and its export code resamples the logits to the input grid and applies the softmax. On top of that:
- one preprocessing per group of models whose plans preprocess identically (nnU-Net's DefaultPreprocessor,
  which also crops to the non-zero, i.e. brain, bounding box) instead of one per model;
- several sliding-window tiles per forward pass when the patch is small: on CPU PyTorch sends the batch-1 3D
  convolutions of a small tile to its slow reference kernel, a batch of tiles to oneDNN (about 5x faster per
  tile on the demo network);
- the models' class probabilities are averaged with the bundle's weights (nnU-Net's own ensembling averages
  models' probabilities too, unweighted); one model is resident at a time;
- the network call goes through the run's `Execution` (pipeline.backend): OpenVINO on the CPU, or PyTorch with
  the chosen autocast precision; tiling, weighting and mirroring stay nnU-Net's.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache

from pedseg.pipeline.backend import TORCH_FP32, Execution
from pedseg.pipeline.bundle import BundleModel
from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.model_output import EnsembleResult
from pedseg.pipeline.openvino_backend import OpenVINONetwork

logger = logging.getLogger(__name__)

# Configuration keys that decide what nnU-Net's preprocessor makes of a case (with the plans' transpose and
# intensity statistics): models agreeing on all of them share one preprocessed tensor.
PREPROCESSING_KEYS = ("preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm",
                      "resampling_fn_data", "resampling_fn_data_kwargs")
TILE_STEP_SIZE = 0.5  # nnU-Net's default overlap


@dataclass(frozen=True)
class Member:
    """One bundle model with the folds this run uses."""

    model: BundleModel
    folds: tuple[str, ...]


class TileBatchPredictor(nnUNetPredictor):
    """nnUNetPredictor running `tiles_per_batch` sliding-window tiles per forward pass. Tile order, Gaussian
    weighting, half-precision accumulation, mirroring and the caller's out-of-memory retry are nnU-Net's.
    `autocast_dtype` (None: fp32) replaces nnU-Net's fixed choice (fp16 autocast on CUDA, none on the CPU)."""

    tiles_per_batch = 1
    autocast_dtype: torch.dtype | None = None

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        results_device = self.device if do_on_device else torch.device("cpu")
        logits = counts = tiles = predictions = None
        try:
            empty_cache(self.device)
            data = data.to(results_device)
            logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half,
                                 device=results_device)
            counts = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
            gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                        value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
            for start in range(0, len(slicers), self.tiles_per_batch):
                batch = slicers[start:start + self.tiles_per_batch]
                tiles = torch.stack([data[s] for s in batch]).to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    predictions = self._internal_maybe_mirror_and_predict(tiles).to(results_device)
                for prediction, s in zip(predictions, batch):
                    if self.use_gaussian:
                        prediction *= gaussian
                    logits[s] += prediction
                    counts[s[1:]] += gaussian
            torch.div(logits, counts, out=logits)
            if torch.any(torch.isinf(logits)):
                raise RuntimeError("Encountered inf in the predicted logits.")
            return logits
        except Exception:
            # Free device memory before nnU-Net's out-of-memory retry: the traceback keeps this frame alive.
            logits = counts = tiles = predictions = None
            empty_cache(self.device)
            raise


def tiles_per_batch(patch_size: list[int]) -> int:
    """About 2^20 input voxels per forward pass, 1 to 8 tiles. Measured on 2 CPU cores: a 48^3 tile of the demo
    network takes 0.30 s alone and 0.06 s in a batch (the slow kernel); from 96^3 up, and for the full-size
    network at any size, batching gains nothing per tile and only costs memory, so a full-size patch runs alone."""
    return max(1, min(8, 2 ** 20 // math.prod(patch_size)))


def load_member(member: Member, device: torch.device, tta: bool,
                execution: Execution = TORCH_FP32) -> TileBatchPredictor:
    # On CPU nnU-Net prints "perform_everything_on_device=True is only supported for cuda devices!" whatever
    # the argument says; users would read it as a misconfiguration.
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = TileBatchPredictor(tile_step_size=TILE_STEP_SIZE, use_gaussian=True, use_mirroring=tta,
                                       perform_everything_on_device=device.type == "cuda", device=device,
                                       verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(member.model.path), use_folds=tuple(f if f == "all" else int(f) for f in member.folds),
        checkpoint_name=member.model.checkpoint)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise BundleError(f"Model '{member.model.path.name}' is a cascade stage; cascades are not supported.",
                          hint="Use full-resolution (non-cascade) nnU-Net configurations in the bundle.")
    predictor.tiles_per_batch = tiles_per_batch(predictor.configuration_manager.patch_size)
    if execution.backend == "openvino":
        predictor.network = OpenVINONetwork(predictor.network, execution)
    else:
        predictor.autocast_dtype = execution.autocast_dtype
    return predictor


def preprocessing_key(predictor: nnUNetPredictor) -> str:
    plans = predictor.plans_manager.plans
    config = predictor.configuration_manager.configuration
    return json.dumps({"transpose_forward": plans["transpose_forward"],
                       "intensity": plans["foreground_intensity_properties_per_channel"],
                       **{k: config.get(k) for k in PREPROCESSING_KEYS}}, sort_keys=True)


def nnunet_input(images: list[sitk.Image]) -> tuple[np.ndarray, list[float]]:
    """`run_ensemble`'s image and spacing from images given in the model's channel order: (channels, z, y, x)
    float32 and (z, y, x) spacing, SimpleITK's array order, as nnU-Net's SimpleITKIO reads NIfTI in training."""
    data = np.stack([sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)) for image in images])
    return data, list(reversed(images[0].GetSpacing()))


def run_ensemble(image: np.ndarray, spacing_zyx: list[float], members: list[Member], device: torch.device,
                 tta: bool, execution: Execution = TORCH_FP32) -> EnsembleResult:
    """`image`, `spacing_zyx`: see `nnunet_input`."""
    preprocessed: dict[str, tuple[torch.Tensor, dict]] = {}
    mean = label_manager = None
    total_weight = 0.0
    seconds = {}
    for member in members:
        t0 = time.perf_counter()
        predictor = load_member(member, device, tta, execution)
        key = preprocessing_key(predictor)
        if key not in preprocessed:
            data, _, properties = predictor.configuration_manager.preprocessor_class(verbose=False).run_case_npy(
                image, None, {"spacing": list(spacing_zyx)}, predictor.plans_manager, predictor.configuration_manager,
                predictor.dataset_json)
            tensor = torch.from_numpy(data)
            preprocessed[key] = (tensor.pin_memory() if device.type == "cuda" else tensor, properties)
        data, properties = preprocessed[key]
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
        if isinstance(predictor.network, OpenVINONetwork):
            predictor.network.release()
        _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties,
            return_probabilities=True)
        weighted = member.model.weight * probabilities
        mean = weighted if mean is None else mean + weighted
        total_weight += member.model.weight
        label_manager = predictor.label_manager
        del predictor, logits, probabilities  # one model resident at a time
        empty_cache(device)
        seconds[member.model.path.name] = round(time.perf_counter() - t0, 2)
        logger.debug("model %s, folds %s, TTA %s on %s: %.1f s", member.model.path.name, ",".join(member.folds), tta,
                     device.type, seconds[member.model.path.name])
    mean /= total_weight
    labels = np.asarray(label_manager.convert_probabilities_to_segmentation(mean))
    channels = label_manager.foreground_regions if label_manager.has_regions else label_manager.all_labels
    return EnsembleResult(probabilities=mean.astype(np.float32, copy=False), labels=labels,
                          channel_labels=tuple(tuple(np.atleast_1d(c).tolist()) for c in channels),
                          has_regions=label_manager.has_regions, preprocessing_runs=len(preprocessed),
                          model_seconds=seconds)
