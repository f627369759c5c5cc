"""A bundle's members of any kinds, each on the images it declared, averaged in one label space.

Used when a bundle is more than one engine's ensemble: members of different kinds (nnU-Net, DeepMedic, MONAI),
per-region weights, or a session that only some members can take (fallback members for missing sequences).
Each member runs through its own kind's engine (pipeline.ensemble, pipeline.deepmedic, pipeline.monai_member)
and pipeline.member_ensemble averages their probabilities.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from pedseg.pipeline.backend import Execution
from pedseg.pipeline.bundle import BundleModel, ModelBundle
from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.member_ensemble import Channels, LabelSpace, MemberOutput, average, channel_name
from pedseg.pipeline.model_output import EnsembleResult

# The images of one member: its required inputs, in the bundle's channel order, prepared as it declared.
MemberImages = Callable[[BundleModel], list[sitk.Image]]


def run_members(images_of: MemberImages, members: Sequence[BundleModel], bundle: ModelBundle, device: torch.device,
                executions: Mapping[str, Execution], *, tta: bool, fast: bool) -> EnsembleResult:
    """Each member on its own images through its kind's engine (`executions`: kind -> backend and precision),
    then the weighted mean in one label space. The members' region weights are checked before any of them runs."""
    check_region_weights(members, bundle)
    outputs, seconds, runs = [], {}, 0
    for member in members:
        t0 = time.perf_counter()
        output, member_runs = _run_member(member, images_of(member), bundle, device, executions[member.kind],
                                          tta=tta, fast=fast)
        outputs.append(output)
        seconds[member.name] = round(time.perf_counter() - t0, 2)
        runs += member_runs
    space = LabelSpace.for_members(outputs)
    names = _channel_names(space, bundle)
    mean = average(outputs, {m.name: [m.weight_of(n) for n in names] for m in members}, space)
    return EnsembleResult(probabilities=mean, labels=space.labels(mean), channel_labels=space.channels,
                          has_regions=space.has_regions, preprocessing_runs=runs, model_seconds=seconds)


def check_region_weights(members: Sequence[BundleModel], bundle: ModelBundle) -> None:
    """BundleError when a member weights a region these members are not averaged over (a weight that would
    silently do nothing), or when their regions cannot be averaged; from what each member declares it predicts,
    without loading a network."""
    names = _channel_names(LabelSpace.of([declared_channels(m) for m in members]), bundle)
    for member in members:
        unused = sorted(set(member.region_weights) - set(names))
        if unused:
            raise BundleError(f"Bundle '{bundle.name}': model '{member.name}' has region_weights for {unused}, but "
                              f"its members are averaged over {names}.",
                              hint="Weight the regions the members are averaged over (classes unless a member "
                                   "predicts regions).")


def check_bundle_region_weights(bundle: ModelBundle) -> None:
    """`check_region_weights` for every set of members a session can run (one per set of the bundle's inputs a
    session may have), so a bundle loader can refuse a bad bundle before any session is read."""
    roles = list(bundle.inputs)
    groups = {tuple(m.name for m in bundle.runnable(chosen)): bundle.runnable(chosen)
              for n in range(1, len(roles) + 1) for chosen in itertools.combinations(roles, n)}
    for group in groups.values():
        if group and any(m.region_weights for m in group):
            check_region_weights(group, bundle)


def declared_channels(member: BundleModel) -> tuple[Channels, bool]:
    """The label values of each probability channel the member will give, and whether they are regions: from
    its bundle.json entry (MONAI, DeepMedic) or its nnU-Net plans and dataset.json, as its engine reports them."""
    if member.kind == "monai":
        return member.monai.outputs, member.monai.activation == "sigmoid"
    if member.kind == "deepmedic":  # pipeline.deepmedic: one channel per label value its classes map to
        return tuple((v,) for v in sorted(set(member.classes.values()))), False
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset = json.loads((member.path / "dataset.json").read_text())
    manager = PlansManager(str(member.path / "plans.json")).get_label_manager(dataset)
    channels = manager.foreground_regions if manager.has_regions else manager.all_labels  # as pipeline.ensemble
    return tuple(tuple(np.atleast_1d(c).tolist()) for c in channels), manager.has_regions


def _channel_names(space: LabelSpace, bundle: ModelBundle) -> list[str]:
    return [channel_name(c, bundle.labels, bundle.label_convention) for c in space.channels]


def units(member: BundleModel, bundle: ModelBundle, fast: bool) -> list[str]:
    """What provenance lists for a member: its nnU-Net folds, else the member itself."""
    if member.kind != "nnunetv2":
        return [member.name]
    return [f"{member.name}/fold_{f}" for f in _folds(member, bundle, fast)]


def _folds(member: BundleModel, bundle: ModelBundle, fast: bool) -> tuple[str, ...]:
    return dict((m.name, folds) for m, folds in bundle.folds_to_run(fast))[member.name]


def _run_member(member: BundleModel, images: list[sitk.Image], bundle: ModelBundle, device: torch.device,
                execution: Execution, *, tta: bool, fast: bool) -> tuple[MemberOutput, int]:
    """The member's probabilities on the shared grid, and how many preprocessings its engine ran."""
    if member.kind == "monai":
        return _run_monai(member, images, bundle, device, execution, tta=tta), 1
    if member.kind == "nnunetv2":
        from pedseg.pipeline.ensemble import Member, nnunet_input, run_ensemble

        data, spacing_zyx = nnunet_input(images)
        result = run_ensemble(data, spacing_zyx, [Member(member, _folds(member, bundle, fast))], device, tta,
                              execution)
    else:
        from pedseg.pipeline.deepmedic import run_deepmedic

        alone = dataclasses.replace(bundle, models=(member,),
                                    inputs={role: i for i, role in enumerate(member.required_inputs)})
        result = run_deepmedic(images, alone, device, execution)
    return (MemberOutput(member.name, result.probabilities, result.channel_labels, result.has_regions),
            result.preprocessing_runs)


def _run_monai(member: BundleModel, images: list[sitk.Image], bundle: ModelBundle, device: torch.device,
               execution: Execution, *, tta: bool) -> MemberOutput:
    """Arrays in NIfTI voxel order (x, y, z), as MONAI's LoadImage reads a BraTS-space file; back to (z, y, x).
    No labels here: the ensemble makes them from the mean."""
    from pedseg.pipeline.monai_member import load_monai_member, predict

    spec = member.monai
    network = load_monai_member(spec, member.path / member.weights, f"Bundle '{bundle.name}': model '{member.name}'")
    volume = np.stack([sitk.GetArrayViewFromImage(image).T for image in images])
    probabilities = predict(network, volume, spec, device, tta=tta, execution=execution)
    return MemberOutput(member.name, np.ascontiguousarray(probabilities.transpose(0, 3, 2, 1)), spec.outputs,
                        spec.activation == "sigmoid")
