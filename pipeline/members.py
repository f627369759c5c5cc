"""A bundle's members of any kinds, each on the images it declared, averaged in one label space.

Used when a bundle is more than one engine's ensemble: members of different kinds (nnU-Net, DeepMedic, MONAI),
per-region weights, or a session that only some members can take (fallback members for missing sequences).
Each member runs through its own kind's engine (pipeline.ensemble, pipeline.deepmedic, pipeline.monai_member)
and pipeline.member_ensemble averages their probabilities.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from pedseg.pipeline.backend import Execution
from pedseg.pipeline.bundle import BundleModel, ModelBundle
from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.member_ensemble import LabelSpace, MemberOutput, average, channel_name
from pedseg.pipeline.model_output import EnsembleResult

# The images of one member: its required inputs, in the bundle's channel order, prepared as it declared.
MemberImages = Callable[[BundleModel], list[sitk.Image]]


def run_members(images_of: MemberImages, members: Sequence[BundleModel], bundle: ModelBundle, device: torch.device,
                executions: Mapping[str, Execution], *, tta: bool, fast: bool) -> EnsembleResult:
    """Each member on its own images through its kind's engine (`executions`: kind -> backend and precision),
    then the weighted mean in one label space."""
    outputs, seconds, runs = [], {}, 0
    for member in members:
        t0 = time.perf_counter()
        result = _run_member(member, images_of(member), bundle, device, executions[member.kind], tta=tta, fast=fast)
        outputs.append(MemberOutput(member.name, result.probabilities, result.channel_labels, result.has_regions))
        seconds[member.name] = round(time.perf_counter() - t0, 2)
        runs += result.preprocessing_runs
    space = LabelSpace.for_members(outputs)
    names = [channel_name(c, bundle.labels, bundle.label_convention) for c in space.channels]
    for member in members:  # a weight for a region the members are not averaged in would silently do nothing
        unused = sorted(set(member.region_weights) - set(names))
        if unused:
            raise BundleError(f"Bundle '{bundle.name}': model '{member.name}' has region_weights for {unused}, but "
                              f"its members are averaged over {names}.",
                              hint="Weight the regions the members are averaged over (classes unless a member "
                                   "predicts regions).")
    mean = average(outputs, {m.name: [m.weight_of(n) for n in names] for m in members}, space)
    return EnsembleResult(probabilities=mean, labels=space.labels(mean), channel_labels=space.channels,
                          has_regions=space.has_regions, preprocessing_runs=runs, model_seconds=seconds)


def units(member: BundleModel, bundle: ModelBundle, fast: bool) -> list[str]:
    """What provenance lists for a member: its nnU-Net folds, else the member itself."""
    if member.kind != "nnunetv2":
        return [member.name]
    return [f"{member.name}/fold_{f}" for f in _folds(member, bundle, fast)]


def _folds(member: BundleModel, bundle: ModelBundle, fast: bool) -> tuple[str, ...]:
    return dict((m.name, folds) for m, folds in bundle.folds_to_run(fast))[member.name]


def _run_member(member: BundleModel, images: list[sitk.Image], bundle: ModelBundle, device: torch.device,
                execution: Execution, *, tta: bool, fast: bool) -> EnsembleResult:
    if member.kind == "nnunetv2":
        from pedseg.pipeline.ensemble import Member, nnunet_input, run_ensemble

        data, spacing_zyx = nnunet_input(images)
        return run_ensemble(data, spacing_zyx, [Member(member, _folds(member, bundle, fast))], device, tta, execution)
    if member.kind == "deepmedic":
        from pedseg.pipeline.deepmedic import run_deepmedic

        alone = dataclasses.replace(bundle, models=(member,),
                                    inputs={role: i for i, role in enumerate(member.required_inputs)})
        return run_deepmedic(images, alone, device, execution)
    return _run_monai(member, images, bundle, device, tta=tta)


def _run_monai(member: BundleModel, images: list[sitk.Image], bundle: ModelBundle, device: torch.device, *,
               tta: bool) -> EnsembleResult:
    """Arrays in NIfTI voxel order (x, y, z), as MONAI's LoadImage reads a BraTS-space file; back to (z, y, x)."""
    from pedseg.pipeline.monai_member import load_monai_member, predict

    spec = member.monai
    network = load_monai_member(spec, member.path / member.weights, f"Bundle '{bundle.name}': model '{member.name}'")
    volume = np.stack([sitk.GetArrayViewFromImage(image).T for image in images])
    probabilities = predict(network, volume, spec, device, tta=tta)
    regions = spec.activation == "sigmoid"
    labels = LabelSpace.for_members([MemberOutput(member.name, probabilities, spec.outputs, regions)])
    return EnsembleResult(probabilities=probabilities.transpose(0, 3, 2, 1).copy(),
                          labels=labels.labels(probabilities).T, channel_labels=spec.outputs, has_regions=regions,
                          preprocessing_runs=1, model_seconds={})
