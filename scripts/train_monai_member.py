"""Train the MONAI member of the multi-kind demo bundle and build the bundle: a small SegResNet on the same
synthetic phantoms as the demo nnU-Net model (seeds 0..N-1), averaged with that model per region.

    python scripts/train_monai_member.py --workdir scratch/monai-train --out bundles/pedseg-demo-multikind
    python scripts/train_monai_member.py --steps bundle ...   # weights and held-out Dice again, from the caches

Reproducible: fixed phantom seeds, `monai.utils.set_determinism`, one CPU thread. The member sees exactly what
the pipeline feeds a MONAI member (pipeline.members._run_monai): the skull-stripped BraTS-space images at 1 mm,
as arrays in NIfTI voxel order (x, y, z), cropped to the box of non-zero voxels (`crop_to_nonzero`) and
z-scored per channel over the non-zero voxels (MONAI NormalizeIntensity, `zscore-nonzero`). It predicts nested
regions (sigmoid): WT, TC, ET+NET, ET, which nest one label at a time so the ensemble can paint labels from them.

MONAI's own pieces throughout: SegResNet, FgBgToIndicesd + RandCropByPosNegLabeld patches, RandFlipd,
RandScaleIntensityd/RandShiftIntensityd, DiceLoss (with PyTorch's BCEWithLogitsLoss), WarmupCosineSchedule; the
members are evaluated through the pipeline's own inference (pipeline.members.run_members, which runs this one
with MONAI's SlidingWindowInferer).

Speed: PyTorch's default of one thread per core made each 64^3 step 12-30 s on a 2-core machine shared with
other work (its OpenMP threads wait on each other), against 2-3.5 s on one thread; training runs on one thread,
48^3 patches (0.9-3.5 s per step, depending on the other load).

The `bundle` step picks the per-region weights on validation phantoms (VALIDATION_SEEDS, neither trained on nor
held out), then reports every member's and the ensemble's Dice on the held-out phantoms (HOLDOUT_SEEDS).
Intermediate files (phantom crops, each member's probabilities keyed by a hash of its weights) stay in --workdir.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pedseg.pipeline.labels import REGIONS
from pedseg.pipeline.types import ROLES
from pedseg.synth.session import HOLDOUT_SEEDS

REPO = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO / "bundles" / "pedseg-demo"
NNUNET_MEMBER = "nnUNetTrainer__nnUNetPlansDemo__3d_fullres"
MONAI_MEMBER = "segresnet"
# Phantoms used to choose the ensemble's weights: trained on by neither member, and not the held-out ones.
VALIDATION_SEEDS = (9101, 9102, 9103, 9104)

# Nested regions, largest first, each adding one 2024 label to the next (ED, CC, NET, ET).
OUTPUTS = ([1, 2, 3, 4], [1, 2, 3], [1, 2], [1])
NETWORK_ARGS = {"spatial_dims": 3, "in_channels": len(ROLES), "out_channels": len(OUTPUTS), "init_filters": 8,
                "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
# Mirroring test-time augmentation off for the whole bundle: this demo runs (and was evaluated) on a shared 2-core
# CPU, where mirroring would multiply both members' time by 8 and 2.
TTA = False
INFERENCE = {"roi_size": [48, 48, 48], "overlap": 0.25, "mode": "gaussian", "sw_batch_size": 2,
             "mirror_axes": [0], "crop_to_nonzero": True}


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """Two phases, as scripts/train_demo_bundle.py trains nnU-Net: first most patches centred on tumour (the small
    sub-regions are otherwise hardly seen in so few steps), then nnU-Net's default one in three, so the network
    also learns what tumour-free brain looks like (after the first phase alone it calls much of the brain
    tumour). Each phase: AdamW, linear warm-up then cosine decay."""

    cases: int = 16
    patch: int = 48
    samples_per_case: int = 2  # the batch: patches cropped from one case per step
    iterations: int = 300  # tumour-centred phase
    positive_fraction: float = 2 / 3  # patches centred on tumour; the rest on brain voxels
    learning_rate: float = 2e-3
    balanced_iterations: int = 350
    balanced_positive_fraction: float = 1 / 3
    balanced_learning_rate: float = 1e-3
    warmup: int = 25
    seed: int = 0


# --- The member's input, as the pipeline prepares it ------------------------------------------------------------------

def member_volume(images) -> np.ndarray:
    """(C, x, y, z) float32 in the bundle's channel order: what pipeline.members hands a MONAI member."""
    import SimpleITK as sitk

    return np.stack([sitk.GetArrayViewFromImage(image).T for image in images]).astype(np.float32)


def _case(seed: int) -> dict[str, np.ndarray]:
    """One phantom cropped to its non-zero box (as crop_to_nonzero does), images z-scored over non-zero voxels and
    labels as region channels; x, y, z order."""
    import SimpleITK as sitk
    from monai.transforms import NormalizeIntensity

    from pedseg.synth.session import generate_training_case

    images, labels = generate_training_case(seed)
    volume = member_volume([images[role] for role in ROLES])
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(volume.any(0)))
    image = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(volume[(slice(None), *box)]), np.float32)
    label = sitk.GetArrayFromImage(labels).T[box]
    return {"image": image, "label": np.stack([np.isin(label, region) for region in OUTPUTS]).astype(np.uint8)}


def _cache_case(args: tuple[int, Path]) -> int:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # two workers on two cores
    seed, path = args
    if not path.is_file():
        np.savez(path.with_suffix(".tmp.npz"), **_case(seed))
        path.with_suffix(".tmp.npz").rename(path)
    return seed


def prepare_cases(workdir: Path, seeds: list[int], workers: int) -> list[Path]:
    (workdir / "cases").mkdir(parents=True, exist_ok=True)
    paths = [workdir / "cases" / f"syn_{s:04d}.npz" for s in seeds]
    with ProcessPoolExecutor(workers) as pool:
        for seed in pool.map(_cache_case, zip(seeds, paths)):
            print(f"case {seed} ready", flush=True)
    return paths


# --- Training ---------------------------------------------------------------------------------------------------------

def train(workdir: Path, settings: TrainingSettings) -> Path:
    import torch
    from monai.losses import DiceLoss
    from monai.networks.nets import SegResNet
    from monai.optimizers import WarmupCosineSchedule
    from monai.transforms import (
        Compose,
        FgBgToIndicesd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )
    from monai.utils import set_determinism
    from safetensors.torch import load_model, save_model

    torch.set_num_threads(1)
    set_determinism(settings.seed)
    t0 = time.perf_counter()
    paths = prepare_cases(workdir, list(range(settings.cases)), workers=2)
    index = FgBgToIndicesd(keys="label", image_key="image")  # tumour vs brain voxels, once per case
    cases = [index(dict(np.load(p))) for p in paths]
    for case in cases:
        case["label"] = case["label"].astype(np.float32)
    prepared_s = time.perf_counter() - t0
    network = SegResNet(**NETWORK_ARGS)
    # Dice + binary cross-entropy per region channel. Not DiceCELoss: with more than one channel its CE part is a
    # softmax cross-entropy across the channels even with sigmoid=True, which never penalises a region predicted
    # where no region is (the first version of this member called half the brain tumour).
    dice_loss, bce_loss = DiceLoss(sigmoid=True), torch.nn.BCEWithLogitsLoss()

    def loss_fn(logits, target):
        return dice_loss(logits, target) + bce_loss(logits, target)

    out = workdir / MONAI_MEMBER
    out.mkdir(parents=True, exist_ok=True)
    losses: dict[str, list[float]] = {}
    seconds: dict[str, int | None] = {}  # per phase, as trained (a phase loaded from its checkpoint: then)
    phases = (("tumour-centred", settings.iterations, settings.positive_fraction, settings.learning_rate),
              ("balanced", settings.balanced_iterations, settings.balanced_positive_fraction,
               settings.balanced_learning_rate))
    for phase, (name, iterations, positive_fraction, learning_rate) in enumerate(phases):
        checkpoint = out / f"phase{phase + 1}.safetensors"
        if checkpoint.is_file():  # a phase already trained with these settings: go on from its weights
            load_model(network, str(checkpoint))
            done = json.loads(checkpoint.with_suffix(".json").read_text())
            losses[name], seconds[name] = done["loss_every_25"], done.get("seconds")
            print(f"{name} phase: weights from {checkpoint.name}", flush=True)
            continue
        positive = round(positive_fraction * 3)
        augment = Compose([
            RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(settings.patch,) * 3,
                                   pos=positive, neg=3 - positive, num_samples=settings.samples_per_case,
                                   fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices"),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),  # left-right, as the inference mirrors
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]).set_random_state(settings.seed + phase)
        optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-5)
        schedule = WarmupCosineSchedule(optimiser, warmup_steps=settings.warmup, t_total=iterations)
        order = np.random.default_rng(settings.seed + phase)
        losses[name] = []
        started = time.perf_counter()
        network.train()
        for step in range(iterations):
            patches = augment(cases[order.integers(len(cases))])
            x = torch.stack([torch.as_tensor(p["image"]) for p in patches]).float()
            y = torch.stack([torch.as_tensor(p["label"]) for p in patches]).float()
            optimiser.zero_grad()
            loss = loss_fn(network(x), y)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses[name].append(round(float(loss.detach()), 4))
            if step % 25 == 0 or step == iterations - 1:
                print(f"{name} step {step:4d}  loss {np.mean(losses[name][-25:]):.4f}  "
                      f"{time.perf_counter() - t0:6.0f} s", flush=True)
        save_model(network, str(checkpoint))
        losses[name] = losses[name][::25] + losses[name][-1:]
        seconds[name] = round(time.perf_counter() - started)
        checkpoint.with_suffix(".json").write_text(json.dumps({"loss_every_25": losses[name],
                                                               "seconds": seconds[name]}) + "\n")
    out = workdir / MONAI_MEMBER
    out.mkdir(parents=True, exist_ok=True)
    save_model(network.eval(), str(out / "model.safetensors"))
    record = {**dataclasses.asdict(settings), "network": {"name": "SegResNet", "args": NETWORK_ARGS},
              "outputs": OUTPUTS, "loss": "DiceLoss (sigmoid) + BCEWithLogitsLoss, per region channel",
              "optimiser": "AdamW, warmup-cosine",
              "augmentation": "left-right flip, intensity scale and shift (0.1)", "cpu_threads": 1,
              "training_seconds": seconds, "data_seconds": round(prepared_s),
              "loss_every_25": losses}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


# --- The bundle: weights chosen on validation phantoms, Dice on held-out ones ---------------------------------------

def member_probabilities(bundle, member_name: str, seeds: list[int], workdir: Path) -> dict[int, np.ndarray]:
    """Per phantom: one member's probabilities in the region space (WT, TC, ET+NET, ET, on the (z, y, x) grid)
    through the pipeline's inference (pipeline.members.run_members, TTA as the bundle says, PyTorch fp32);
    cached in workdir."""
    import SimpleITK as sitk
    import torch

    from pedseg.pipeline.backend import TORCH_FP32
    from pedseg.pipeline.member_ensemble import LabelSpace, MemberOutput
    from pedseg.pipeline.members import run_members
    from pedseg.synth.session import generate_training_case

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    member = next(m for m in bundle.models if m.name == member_name)
    alone = dataclasses.replace(member, region_weights={})  # its own label space, where region weights mean nothing
    weights_key = _weights_key(member)  # a retrained member is evaluated afresh
    space = LabelSpace(tuple(tuple(o) for o in OUTPUTS), has_regions=True)
    found = {}
    for seed in seeds:
        path = workdir / "probabilities" / f"{member_name}-{weights_key}" / f"syn_{seed:04d}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            images, labels = generate_training_case(seed)
            truth = workdir / "truth" / path.name
            if not truth.is_file():
                truth.parent.mkdir(parents=True, exist_ok=True)
                np.save(truth, sitk.GetArrayFromImage(labels))
            t0 = time.perf_counter()
            result = run_members(lambda m, images=images: [images[r] for r in m.required_inputs], [alone], bundle,
                                 torch.device("cpu"), {member.kind: TORCH_FP32}, tta=TTA, fast=False)
            output = MemberOutput(member.name, result.probabilities, result.channel_labels, result.has_regions)
            np.save(path, space.convert(output).astype(np.float16))
            print(f"syn_{seed:04d} {member_name}: {time.perf_counter() - t0:.0f} s", flush=True)
        found[seed] = np.load(path).astype(np.float32)
    return found


def _weights_key(member) -> str:
    digest = hashlib.sha256()
    for path in member.weight_files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def truths(seeds: list[int], workdir: Path) -> dict[int, np.ndarray]:
    """The phantoms' label maps (z, y, x), cached in workdir."""
    import SimpleITK as sitk

    from pedseg.synth.session import generate_training_case

    found = {}
    for seed in seeds:
        path = workdir / "truth" / f"syn_{seed:04d}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, sitk.GetArrayFromImage(generate_training_case(seed)[1]))
        found[seed] = np.load(path)
    return found


def _bundle_json(out: Path, weights: dict[str, dict[str, float]], training: dict) -> dict:
    """`weights`: member -> {"weight": w, region: w, ...}; the demo bundle's inputs, labels and post-processing."""
    demo = json.loads((DEMO_BUNDLE / "bundle.json").read_text())

    def weighting(member: str) -> dict:
        given = dict(weights.get(member, {}))
        return {"weight": given.pop("weight", 1.0), **({"region_weights": given} if given else {})}

    nnunet = {**{k: v for k, v in demo["models"][0].items() if k != "weight"}, **weighting(NNUNET_MEMBER)}
    monai = {"kind": "monai", "path": f"models/{MONAI_MEMBER}", "weights": "model.safetensors",
             "network": {"name": "SegResNet", "args": NETWORK_ARGS}, "inference": INFERENCE,
             "normalisation": "zscore-nonzero", "activation": "sigmoid", "outputs": [list(o) for o in OUTPUTS],
             **weighting(MONAI_MEMBER)}
    return {"format_version": demo["format_version"], "name": out.name, "version": "1.0.0", "licence": "CC0-1.0",
            "allow_bf16": demo["allow_bf16"],  # the nnU-Net member's measured bf16 accuracy (train_demo_bundle.py)
            "description": "Demo ensemble of two kinds of model, the pedseg-demo nnU-Net v2 model and a MONAI "
                           "SegResNet, averaged per region; both trained only on synthetic phantoms built from the "
                           "BraTS-space atlas. It shows cross-kind, region-weighted ensembling; it is not a model "
                           "of real pediatric tumours.",
            **{k: demo[k] for k in ("inputs", "required_inputs", "population", "label_convention", "labels")},
            "models": [nnunet, monai],
            "tta": TTA, **{k: demo[k] for k in ("fast_folds", "postprocessing")},
            **({"training": training} if training else {})}


def _dice(labels: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Dice of every region, and of the ensemble's ET+NET channel (solid tumour)."""
    from pedseg.evaluation import mask_dice, region_dice

    return {**region_dice(truth, labels), "ET+NET": mask_dice(np.isin(truth, (1, 2)), np.isin(labels, (1, 2)))}


def _mean(per_case: dict[str, dict]) -> dict[str, float | None]:
    mean = {}
    for region in next(iter(per_case.values())):
        values = [c[region] for c in per_case.values() if c[region] is not None]
        mean[region] = round(float(np.mean(values)), 4) if values else None
    return mean


def _postprocessed(labels: np.ndarray, bundle) -> np.ndarray:
    import SimpleITK as sitk

    from pedseg.pipeline.postprocess import postprocess

    return sitk.GetArrayFromImage(postprocess(sitk.GetImageFromArray(labels), bundle.postprocessing)[0])


def _class_labels(regions: np.ndarray) -> np.ndarray:
    """A class member's own labels (argmax of its classes) back from its region probabilities (sums of classes)."""
    wt, tc, solid, et = regions
    classes = np.stack([1 - wt, et, solid - et, tc - solid, wt - tc])  # background, ET, NET, CC, ED
    return classes.argmax(0).astype(np.uint8)


class _Evaluation:
    """Cached member probabilities of some phantoms, labelled and scored the pipeline's way."""

    def __init__(self, bundle, seeds: list[int], workdir: Path):
        from pedseg.pipeline.member_ensemble import LabelSpace

        self.bundle = bundle
        self.space = LabelSpace(tuple(tuple(o) for o in OUTPUTS), has_regions=True)
        self.truth = truths(seeds, workdir)
        self.probabilities = {m.name: member_probabilities(bundle, m.name, seeds, workdir) for m in bundle.models}

    def ensemble(self, weights: dict[str, list[float]]) -> dict[str, dict]:
        """Per case Dice of the members averaged with per-channel `weights` (pipeline.member_ensemble.average)."""
        from pedseg.pipeline.member_ensemble import MemberOutput, average

        per_case = {}
        for seed, truth in self.truth.items():
            outputs = [MemberOutput(name, self.probabilities[name][seed], self.space.channels, True)
                       for name in weights]
            mean = average(outputs, weights, self.space)
            per_case[f"syn_{seed}"] = _dice(_postprocessed(self.space.labels(mean), self.bundle), truth)
        return per_case

    def alone(self, name: str) -> dict[str, dict]:
        """Per case Dice of one member as a bundle of it alone would label: the nnU-Net member by argmax of its
        classes, the MONAI member from its regions."""
        per_case = {}
        for seed, truth in self.truth.items():
            p = self.probabilities[name][seed]
            labels = _class_labels(p) if name == NNUNET_MEMBER else self.space.labels(p)
            per_case[f"syn_{seed}"] = _dice(_postprocessed(labels, self.bundle), truth)
        return per_case


GRID = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)  # the nnU-Net member's share of a region; the MONAI member: the rest


def choose_weights(validation: _Evaluation, names: list[str]) -> tuple[dict[str, float], dict]:
    """Per channel, the nnU-Net member's share with the best mean validation Dice of the region the channel stands
    for, one channel at a time from the largest (each channel's weight moves only that channel's probability);
    ties go to the larger nnU-Net share (the stronger member alone)."""
    share = {name: 0.5 for name in names}
    search = {}
    for name in names:
        scores = {}
        # a channel no region name stands for (ET+NET) takes the members' plain weights, which must be positive
        for s in GRID if name in REGIONS else GRID[1:-1]:
            trial = {**share, name: s}
            weights = {NNUNET_MEMBER: [trial[n] for n in names], MONAI_MEMBER: [1 - trial[n] for n in names]}
            scores[s] = _mean(validation.ensemble(weights))[name] or 0.0
            print(f"validation: nnU-Net share {s} of {name}: Dice {scores[s]:.4f}", flush=True)
        share[name] = max(scores, key=lambda s: (round(scores[s], 4), s))
        search[name] = {str(s): round(v, 4) for s, v in scores.items()}
    return share, search


def build_bundle(workdir: Path, out: Path) -> dict:
    """Copy both members into `out`, choose per-region weights on the validation phantoms, write bundle.json with
    the held-out Dice of each member and of the ensemble."""
    from pedseg.pipeline.bundle import load_bundle
    from pedseg.pipeline.member_ensemble import channel_name

    (out / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(DEMO_BUNDLE / "models" / NNUNET_MEMBER, out / "models" / NNUNET_MEMBER, dirs_exist_ok=True)
    (out / "models" / MONAI_MEMBER).mkdir(exist_ok=True)
    shutil.copy(workdir / MONAI_MEMBER / "model.safetensors", out / "models" / MONAI_MEMBER / "model.safetensors")
    (out / "bundle.json").write_text(json.dumps(_bundle_json(out, {}, {}), indent=2) + "\n")
    bundle = load_bundle(out)
    validation = _Evaluation(bundle, list(VALIDATION_SEEDS), workdir)
    names = [channel_name(c, bundle.labels, bundle.label_convention) for c in validation.space.channels]
    share, search = choose_weights(validation, names)
    weights = {NNUNET_MEMBER: [share[n] for n in names], MONAI_MEMBER: [round(1 - share[n], 2) for n in names]}
    # Named regions take region_weights; the unnamed ET+NET channel each member's plain weight.
    declared = {member: {"weight": w[names.index("ET+NET")],
                         **{n: v for n, v in zip(names, w) if n in REGIONS}} for member, w in weights.items()}

    holdout = _Evaluation(bundle, list(HOLDOUT_SEEDS), workdir)
    report = {}
    for label, per_case in {NNUNET_MEMBER: holdout.alone(NNUNET_MEMBER), MONAI_MEMBER: holdout.alone(MONAI_MEMBER),
                            "ensemble": holdout.ensemble(weights)}.items():
        report[label] = {"mean_dice": _mean(per_case), "per_case": per_case}
    monai_training = json.loads((workdir / MONAI_MEMBER / "training.json").read_text())
    training = {
        "script": "scripts/train_monai_member.py",
        "members": {
            NNUNET_MEMBER: "the pedseg-demo bundle's model (scripts/train_demo_bundle.py), unchanged",
            MONAI_MEMBER: {k: v for k, v in monai_training.items() if k not in ("network", "outputs")},
        },
        "region_weights": {
            "validation_seeds": list(VALIDATION_SEEDS),
            "chosen_on": "validation phantoms: trained on by neither member (seeds 0..N-1), not held out",
            "method": "per channel (WT, TC, ET+NET, ET), the nnU-Net member's share from a grid, the MONAI member "
                      "taking the rest, with the best mean validation Dice of that channel's region (labels painted "
                      "and post-processed as the pipeline does), one channel at a time from WT down",
            "validation_dice_by_nnunet_share": search,
        },
        "holdout_dice": {
            "cases": len(HOLDOUT_SEEDS), "seeds": list(HOLDOUT_SEEDS),
            "computed_with": "each member through pipeline.members.run_members (no TTA, as the bundle runs; "
                             "PyTorch fp32), averaged "
                             "by pipeline.member_ensemble.average with the chosen weights, labels painted from the "
                             "regions and post-processed as the bundle declares; a member alone labelled as a "
                             "bundle of it alone would (nnU-Net: argmax of its classes)",
            **report},
    }
    spec = _bundle_json(out, declared, training)
    (out / "bundle.json").write_text(json.dumps(spec, indent=2) + "\n")
    load_bundle(out)
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "scratch" / "monai-train")
    parser.add_argument("--out", type=Path, default=REPO / "bundles" / "pedseg-demo-multikind")
    parser.add_argument("--steps", nargs="+", default=["train", "bundle"], choices=["train", "bundle"])
    for field in dataclasses.fields(TrainingSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    settings = TrainingSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingSettings)})
    t0 = time.time()
    if "train" in args.steps:
        train(args.workdir, settings)
        print(f"trained after {time.time() - t0:.0f} s", flush=True)
    if "bundle" in args.steps:
        spec = build_bundle(args.workdir, args.out)
        print(json.dumps({k: v["mean_dice"] for k, v in spec["training"]["holdout_dice"].items()
                          if isinstance(v, dict)}, indent=2))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
