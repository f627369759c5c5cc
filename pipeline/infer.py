"""Inference stage: the bundle's models on the atlas-space images: an nnU-Net ensemble (pipeline.ensemble) or
DeepMedic members (pipeline.deepmedic), by the bundle's model kind.

Writes the label map (internal BraTS-PEDs 2024 values), one probability map per region and an uncertainty
map (normalised entropy of the ensemble's mean probabilities) as NIfTI on the atlas grid. `--fast` runs the
bundle's fast folds without mirroring TTA. With `--device auto`, a GPU that runs out of memory hands the
run to the CPU. The networks run on the backend and at the precision `pipeline.backend` resolves for the device
(`--backend`, `--precision`); the log and provenance say which.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pedseg.pipeline.atomic import write_image
from pedseg.pipeline.backend import Execution, resolve_execution
from pedseg.pipeline.bundle import BundleModel, ModelBundle
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import BundleError, MissingSequenceError, ResourceError
from pedseg.pipeline.labels import internal_value, region_mask
from pedseg.pipeline.model_output import EnsembleResult
from pedseg.pipeline.types import EnsembleInfo, Prediction, Preprocessed, Uncertainty

logger = logging.getLogger(__name__)

UNCERTAIN_ENTROPY = 0.5  # voxels at or above this normalised entropy count as uncertain in the summary


def pick_device(requested: str):
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BundleError("--device cuda was requested but no CUDA GPU is visible.",
                              hint="Use --device auto or cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


def _read_inputs(pre: Preprocessed, bundle: ModelBundle) -> list[sitk.Image]:
    """The preprocessed images in the bundle's channel order."""
    missing = [role for role in bundle.inputs if role not in pre.images]
    if missing:
        raise MissingSequenceError(
            f"Model bundle '{bundle.name}' needs {missing} but the session provided only {sorted(pre.images)}.",
            hint="Use a bundle trained for the available sequences.",
        )
    by_channel = sorted(bundle.inputs.items(), key=lambda item: item[1])
    return [sitk.ReadImage(str(pre.images[role]), sitk.sitkFloat32) for role, _ in by_channel]


def infer(pre: Preprocessed, bundle: ModelBundle, workdir: Path, config: PipelineConfig) -> Prediction:
    import torch

    # OpenVINO runs on the CPU: asked for by name, it keeps `--device auto` off a GPU.
    device = torch.device("cpu") if config.backend == "openvino" and config.device == "auto" else (
        pick_device(config.device))
    images = _read_inputs(pre, bundle)
    reference = images[0]
    plan = _plan(bundle, images, config)
    execution = _execution(config, bundle, device.type)
    t0 = time.perf_counter()
    try:
        if device.type == "cpu":
            torch.set_num_threads(config.threads or os.cpu_count() or 1)
        result = plan.run(device, execution)
    except torch.OutOfMemoryError as exc:
        if config.device != "auto":
            raise ResourceError("The GPU ran out of memory during inference.",
                                hint="Use --device auto (falls back to the CPU) or --device cpu, or --fast.") from exc
        logger.warning("out of GPU memory (%s): running the ensemble on the CPU instead", str(exc).splitlines()[0])
        device = torch.device("cpu")
        execution = _execution(config, bundle, device.type)
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
        result = plan.run(device, execution)

    out = workdir / "prediction"
    out.mkdir(parents=True, exist_ok=True)
    labels = _to_internal_labels(result.labels, bundle)
    labels_path = _write_like(labels, reference, out / "labels_atlas.nii.gz")
    probabilities = {}
    for channel, values in enumerate(result.channel_labels):
        if values != (0,):
            name = "+".join(bundle.labels[v] for v in values)
            probabilities[name] = _write_like(_rounded(result.probabilities[channel]), reference,
                                              out / f"probability_{name}_atlas.nii.gz")
    entropy = normalised_entropy(result.probabilities, result.has_regions)
    uncertainty_path = _write_like(_rounded(entropy), reference, out / "uncertainty_atlas.nii.gz")
    return Prediction(
        labels=labels_path, probabilities=probabilities, uncertainty=uncertainty_path,
        models_used=[m.name for m in plan.models], folds_used=plan.units, tta=plan.tta, device=device.type,
        ensemble=EnsembleInfo(weights={m.name: m.weight for m in plan.models},
                              preprocessing_runs=result.preprocessing_runs, seconds_per_model=result.model_seconds,
                              seconds=round(time.perf_counter() - t0, 2), backend=execution.backend,
                              precision=execution.precision),
    )


def _execution(config: PipelineConfig, bundle: ModelBundle, device_type: str) -> Execution:
    execution = resolve_execution(config.backend, config.precision, device_type, bundle_name=bundle.name,
                                  allow_bf16=bundle.allow_bf16, kind=_kind(bundle), threads=config.threads)
    logger.info("inference on %s with %s at %s (%s)", device_type, execution.backend, execution.precision,
                execution.reason)
    return execution


def _kind(bundle: ModelBundle) -> str:
    return "deepmedic" if set(bundle.kinds) == {"deepmedic"} else "nnunetv2"


@dataclass(frozen=True)
class _Plan:
    """How a bundle's models run: `run(device, execution)` gives their EnsembleResult; `models` and `units`
    (nnU-Net folds, or the DeepMedic members) are what provenance lists; `tta`: test-time mirroring on."""

    run: Callable[..., EnsembleResult]
    models: list[BundleModel]
    units: list[str]
    tta: bool


def _plan(bundle: ModelBundle, images: list[sitk.Image], config: PipelineConfig) -> _Plan:
    if bundle.kinds == ("deepmedic",):  # no folds, no mirroring, nothing to leave out in --fast
        from pedseg.pipeline.deepmedic import run_deepmedic

        return _Plan(lambda device, execution: run_deepmedic(images, bundle, device, execution), list(bundle.models),
                     [m.name for m in bundle.models], tta=False)
    from pedseg.pipeline.ensemble import Member, nnunet_input, run_ensemble

    tta = bundle.tta and not config.fast
    members = [Member(model, folds) for model, folds in bundle.folds_to_run(config.fast)]
    data, spacing_zyx = nnunet_input(images)
    return _Plan(lambda device, execution: run_ensemble(data, spacing_zyx, members, device, tta, execution),
                 [m.model for m in members],
                 [f"{m.model.name}/fold_{f}" for m in members for f in m.folds], tta)


def normalised_entropy(probabilities: np.ndarray, has_regions: bool) -> np.ndarray:
    """Entropy of the ensemble's mean probabilities scaled to [0, 1] (1: every class equally likely). For
    region-based (sigmoid) models, the mean over regions of each region's binary entropy."""
    p = np.clip(probabilities, 1e-8, 1)
    if has_regions:
        q = np.clip(1 - probabilities, 1e-8, 1)
        return (-(p * np.log(p) + q * np.log(q)) / np.log(2)).mean(0)
    return -(p * np.log(p)).sum(0) / np.log(len(p))


def uncertainty_summary(uncertainty: Path | None, labels: sitk.Image) -> Uncertainty | None:
    """Mean normalised entropy inside the final whole tumour and tumour core, and the volume of uncertain voxels
    anywhere (a tumour the labels missed shows up there)."""
    if uncertainty is None:
        return None
    entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(uncertainty)))
    arr = sitk.GetArrayFromImage(labels)

    def mean_inside(region: str) -> float | None:
        mask = region_mask(arr, region)
        return round(float(entropy[mask].mean()), 4) if mask.any() else None

    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000
    return Uncertainty(
        mean_entropy_WT=mean_inside("WT"), mean_entropy_TC=mean_inside("TC"),
        uncertain_volume_ml=round(float((entropy >= UNCERTAIN_ENTROPY).sum()) * voxel_ml, 2),
        measure=f"normalised entropy of the ensemble's mean class probabilities; uncertain: >= {UNCERTAIN_ENTROPY}")


def _rounded(array: np.ndarray) -> np.ndarray:
    # Three decimals are plenty for display and thresholds, and let the mostly-zero maps compress.
    return np.round(array, 3).astype(np.float32)


def _to_internal_labels(model_labels: np.ndarray, bundle: ModelBundle) -> np.ndarray:
    lut = np.zeros(max(bundle.labels) + 1, np.uint8)
    for value, region in bundle.labels.items():
        lut[value] = internal_value(bundle.label_convention, region)
    return lut[model_labels]


def _write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    write_image(image, path)
    return path
