"""Inference stage: the bundle's models on the atlas-space images: an nnU-Net ensemble (pipeline.ensemble),
DeepMedic members (pipeline.deepmedic), or members of several kinds, per-region weights or fallback members
(pipeline.members), each fed the images it declared.

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
from pedseg.pipeline.bundle import FALLBACK_NOT_NEEDED, BundleModel, ModelBundle
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


def members_to_run(pre: Preprocessed, bundle: ModelBundle) -> tuple[tuple[BundleModel, ...], dict[str, str]]:
    """The members whose sequences the session has, and why each other one is skipped; MissingSequenceError when
    none can run."""
    available = set(pre.images)
    members = bundle.runnable(available)
    skipped = bundle.skip_reasons(available)
    if not members:
        raise MissingSequenceError(
            f"No model of bundle '{bundle.name}' can run on the session's sequences {sorted(available)}: "
            + "; ".join(f"'{name}' {why}" for name, why in skipped.items()) + ".",
            hint="Use a bundle trained for the available sequences.")
    for name, why in skipped.items():
        if why != FALLBACK_NOT_NEEDED:
            logger.warning("model %s of bundle %s skipped: it %s", name, bundle.name, why)
    return members, skipped


def _read_inputs(pre: Preprocessed, bundle: ModelBundle) -> list[sitk.Image]:
    """The preprocessed images in the bundle's channel order."""
    by_channel = sorted(bundle.inputs.items(), key=lambda item: item[1])
    return [sitk.ReadImage(str(pre.images[role]), sitk.sitkFloat32) for role, _ in by_channel]


def infer(pre: Preprocessed, bundle: ModelBundle, workdir: Path, config: PipelineConfig) -> Prediction:
    import torch

    # OpenVINO runs on the CPU: asked for by name, it keeps `--device auto` off a GPU.
    device = torch.device("cpu") if config.backend == "openvino" and config.device == "auto" else (
        pick_device(config.device))
    members, skipped = members_to_run(pre, bundle)
    # the atlas grid every output is written on (all preprocessed images share it)
    reference = sitk.ReadImage(str(pre.images[members[0].required_inputs[0]]))
    plan = _plan(bundle, members, pre, config)
    executions = _executions(config, bundle, plan.models, device.type)
    t0 = time.perf_counter()
    try:
        if device.type == "cpu":
            torch.set_num_threads(config.threads or os.cpu_count() or 1)
        result = plan.run(device, executions)
    except torch.OutOfMemoryError as exc:
        if config.device != "auto":
            raise ResourceError("The GPU ran out of memory during inference.",
                                hint="Use --device auto (falls back to the CPU) or --device cpu, or --fast.") from exc
        logger.warning("out of GPU memory (%s): running the ensemble on the CPU instead", str(exc).splitlines()[0])
        device = torch.device("cpu")
        executions = _executions(config, bundle, plan.models, device.type)
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
        result = plan.run(device, executions)

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
                              seconds=round(time.perf_counter() - t0, 2),
                              backend="+".join(dict.fromkeys(e.backend for e in executions.values())),
                              precision="+".join(dict.fromkeys(e.precision for e in executions.values())),
                              members_skipped=skipped,
                              executions={m.name: {"backend": executions[m.kind].backend,
                                                   "precision": executions[m.kind].precision}
                                          for m in plan.models}),
    )


def _executions(config: PipelineConfig, bundle: ModelBundle, members: list[BundleModel],
                device_type: str) -> dict[str, Execution]:
    """The backend and precision of each member kind that runs, logged once each."""
    executions = {}
    kinds = list(dict.fromkeys(m.kind for m in members))
    for kind in kinds:
        executions[kind] = resolve_execution(
            config.backend, config.precision, device_type, bundle_name=bundle.name, allow_bf16=bundle.allow_bf16,
            kind=kind, threads=config.threads)
        which = f" of {kind} models" if len(kinds) > 1 else ""
        logger.info("inference%s on %s with %s at %s (%s)", which, device_type, executions[kind].backend,
                    executions[kind].precision, executions[kind].reason)
    return executions


@dataclass(frozen=True)
class _Plan:
    """How a bundle's models run: `run(device, executions)` (kind -> Execution) gives their EnsembleResult;
    `models` and `units` (nnU-Net folds, or the other members) are what provenance lists; `tta`: mirroring on."""

    run: Callable[..., EnsembleResult]
    models: list[BundleModel]
    units: list[str]
    tta: bool


def _plan(bundle: ModelBundle, members: tuple[BundleModel, ...], pre: Preprocessed, config: PipelineConfig) -> _Plan:
    tta = bundle.tta and not config.fast
    if not _one_engine(bundle, members):
        from pedseg.pipeline.members import run_members, units

        images_of = _member_images(pre)
        return _Plan(lambda device, executions: run_members(images_of, members, bundle, device, executions,
                                                            tta=tta, fast=config.fast),
                     list(members), [u for m in members for u in units(m, bundle, config.fast)], tta)
    images = _read_inputs(pre, bundle)
    if bundle.kinds == ("deepmedic",):  # no folds, no mirroring, nothing to leave out in --fast
        from pedseg.pipeline.deepmedic import run_deepmedic

        return _Plan(lambda device, executions: run_deepmedic(images, bundle, device, executions["deepmedic"]),
                     list(bundle.models), [m.name for m in bundle.models], tta=False)
    from pedseg.pipeline.ensemble import Member, nnunet_input, run_ensemble

    nnunet = [Member(model, folds) for model, folds in bundle.folds_to_run(config.fast)]
    data, spacing_zyx = nnunet_input(images)
    return _Plan(lambda device, executions: run_ensemble(data, spacing_zyx, nnunet, device, tta,
                                                         executions["nnunetv2"]),
                 [m.model for m in nnunet], [f"{m.model.name}/fold_{f}" for m in nnunet for f in m.folds], tta)


def _one_engine(bundle: ModelBundle, members: tuple[BundleModel, ...]) -> bool:
    """Whether one engine's own ensemble is the whole run: every member runs, all of one kind (nnU-Net or
    DeepMedic), on the skull-stripped images of all the bundle's inputs, without per-region weights."""
    return (len(members) == len(bundle.models) and len(bundle.kinds) == 1 and bundle.kinds[0] != "monai"
            and all(m.brain == "skull_stripped" and not m.region_weights
                    and set(m.required_inputs) == set(bundle.inputs) for m in members))


def _member_images(pre: Preprocessed) -> Callable[[BundleModel], list[sitk.Image]]:
    """Each member's images: its sequences, in the bundle's channel order, prepared as it declared; each file
    read once."""
    cache: dict[Path, sitk.Image] = {}

    def images_of(member: BundleModel) -> list[sitk.Image]:
        paths = [pre.images_for(member.brain)[role] for role in member.required_inputs]
        for path in paths:
            if path not in cache:
                cache[path] = sitk.ReadImage(str(path), sitk.sitkFloat32)
        return [cache[path] for path in paths]

    return images_of


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
