"""Model bundles: a folder with `bundle.json` and one or more trained models (members) of any kind: nnU-Net v2
trained-model folders, DeepMedic members (architecture.json + model.safetensors, made by
scripts/convert_deepmedic.py) and MONAI networks (pipeline/monai_member.py), ensembled in one label space.

bundle.json (format_version 1; its shape is the JSON Schema in bundle.schema.json, which `load_bundle` checks;
the README's "Model bundles" section describes every field):
  name, version, licence, description
  inputs:            {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}   role -> model input channel
  required_inputs:   roles a session must have (default: those every member needs)
  population:        who the models were trained on: pediatric, adult, adult-and-pediatric or synthetic
  label_convention:  "2024" (1 ET, 2 NET, 3 CC, 4 ED) or "2023" (1 NCR, 2 ED, 3 ET)
  labels:            {"1": "ET", ...} model output label value -> region name
  models:            [{"path": "models/<trainer>__<plans>__<config>", "folds": [0, 1], "weight": 1.0,
                       "checkpoint": "checkpoint_final.pth"}]                    (kind "nnunetv2", the default)
                     [{"kind": "deepmedic", "path": "models/deepmedic", "weights": "model.safetensors",
                       "normalisation": "captk-zscore", "classes": {"0": 0, "1": 1, "2": 2, "3": 3, "4": 3}}]
                     classes: DeepMedic output class -> bundle label value
                     [{"kind": "monai", "path": "models/swin", "network": {...}, "inference": {...},
                       "activation": "sigmoid", "outputs": [[1, 2, 3], [1, 3], [3]]}]    (pipeline/monai_member.py)
                     any member: "region_weights": {"ET": 0.7, ...} its weight per region in the ensemble;
                     "required_inputs": the sequences it needs (default all), so a session missing one still
                     runs the members that do not need it; "brain": overrides the bundle's preprocessing;
                     "fallback": true: it runs only when no other member can (a session lacking a sequence the
                     primary members need), never alongside them (default false)
  preprocessing:     {"brain": "skull_stripped" | "defaced" | "none", "space": "sri24"}   what the members were
                     trained on (default skull_stripped)
  tta:               mirroring test-time augmentation by default
  allow_bf16:        whether `--precision auto` may run the networks in bf16 where the CPU has it (default true:
                     nnU-Net trains under mixed precision; false for a model whose bf16 labels differ from fp32)
  fast_folds:        folds used in --fast mode (a model with none of them runs its first fold)
  postprocessing:    {"min_component_voxels": {"ET": 8, ...}, "min_wt_component_voxels": 50,
                      "redefine": [{"region": "ET", "below_fraction_of_wt": 0.0, "to": "NET"}],
                      "keep_largest_wt": false}
                     region names are the internal ones (ET, NET, CC, ED) whatever the label convention.
Members are weighted by "weight" (per region by "region_weights") when their probabilities are averaged
(pipeline.member_ensemble); nnU-Net members must share one label set.
The code checks only what the schema cannot: the model folders on disk and how they agree with bundle.json.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import jsonschema

from pedseg.pipeline.config import BUNDLE_ENV
from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.labels import BASE_REGIONS, CONVENTIONS, LABEL_VALUES, REGIONS
from pedseg.pipeline.types import ROLES

if TYPE_CHECKING:
    from pedseg.pipeline.monai_member import MonaiSpec

SCHEMA_FILE = "bundle.schema.json"
ModelKind = Literal["nnunetv2", "deepmedic", "monai"]
BrainPreparation = Literal["skull_stripped", "defaced", "none"]
Population = Literal["pediatric", "adult", "adult-and-pediatric", "synthetic", "unspecified"]
DEEPMEDIC_ARCHITECTURE = "architecture.json"
# Why a fallback member did not run on a complete session (not a reason to warn the reader)
FALLBACK_NOT_NEEDED = "fallback member, not needed: the primary members can run"


@dataclass(frozen=True)
class BundleModel:
    path: Path
    weight: float
    kind: ModelKind = "nnunetv2"
    folds: tuple[str, ...] = ()  # nnunetv2: the folds, each fold_<f>/<checkpoint>
    checkpoint: str = ""
    weights: str = ""  # deepmedic: the safetensors file in `path`
    normalisation: str = ""  # deepmedic: the intensity normalisation it was trained with
    classes: dict[int, int] = field(default_factory=dict)  # deepmedic: output class -> bundle label value
    monai: MonaiSpec | None = None  # monai: the network, its sliding window, activation and outputs
    region_weights: dict[str, float] = field(default_factory=dict)  # region name -> weight, overriding `weight`
    required_inputs: tuple[str, ...] = ()  # the roles it needs, in the bundle's channel order
    brain: BrainPreparation = "skull_stripped"
    fallback: bool = False  # runs only when no other (primary) member can

    @property
    def weight_files(self) -> tuple[Path, ...]:
        """The files holding this model's trained weights (and, for DeepMedic, its shape)."""
        if self.kind == "deepmedic":
            return self.path / DEEPMEDIC_ARCHITECTURE, self.path / self.weights
        if self.kind == "monai":
            return (self.path / self.weights,)
        return tuple(self.path / f"fold_{fold}" / self.checkpoint for fold in self.folds)

    def lacks(self, available: Collection[str]) -> list[str]:
        """The sequences it needs that are not `available`, in its channel order."""
        return [role for role in self.required_inputs if role not in available]

    def weight_of(self, region: str) -> float:
        return self.region_weights.get(region, self.weight)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class ModelBundle:
    root: Path
    name: str
    version: str
    licence: str
    inputs: dict[str, int]
    required_inputs: tuple[str, ...]
    label_convention: str
    labels: dict[int, str]
    models: tuple[BundleModel, ...]
    tta: bool
    fast_folds: tuple[str, ...]
    postprocessing: dict = field(default_factory=dict)
    population: Population = "unspecified"
    allow_bf16: bool = True  # `--precision auto` may choose bf16 (pipeline.backend)

    @property
    def kinds(self) -> tuple[ModelKind, ...]:
        """The members' kinds, each once, in member order."""
        return tuple(dict.fromkeys(model.kind for model in self.models))

    def runnable(self, available: Collection[str]) -> tuple[BundleModel, ...]:
        """The members whose sequences are all `available`: the primary ones, or when none of them can run, the
        fallback members."""
        can_run = [m for m in self.models if not m.lacks(available)]
        return tuple(m for m in can_run if not m.fallback) or tuple(can_run)

    def skip_reasons(self, available: Collection[str]) -> dict[str, str]:
        """Why each member that `runnable` leaves out does not run, by member name."""
        running = self.runnable(available)
        return {m.name: (f"needs {sorted(m.lacks(available))}, which the session lacks" if m.lacks(available)
                         else FALLBACK_NOT_NEEDED)
                for m in self.models if m not in running}

    @property
    def has_fallbacks(self) -> bool:
        """Some member needs fewer sequences than the bundle maps, so a session missing one may still run."""
        return any(set(m.required_inputs) != set(self.inputs) for m in self.models)

    def folds_to_run(self, fast: bool) -> list[tuple[BundleModel, tuple[str, ...]]]:
        """Each model with the folds a run uses: all of them, or in fast mode those in fast_folds."""
        if not fast:
            return [(model, model.folds) for model in self.models]
        return [(model, tuple(f for f in model.folds if f in self.fast_folds) or model.folds[:1])
                for model in self.models]

    @functools.cached_property
    def sha256(self) -> str:
        """Hash of bundle.json and every weight file: identifies exactly which weights produced a result. Read once
        per loaded bundle (real weights are hundreds of MB; the gear needs it before and after a run)."""
        digest = hashlib.sha256((self.root / "bundle.json").read_bytes())
        for model in self.models:
            for path in model.weight_files:
                with open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
        return digest.hexdigest()


def load_bundle(root: Path) -> ModelBundle:
    """The bundle in `root`, checked; a BundleError names where the path came from when it was $PEDSEG_BUNDLE."""
    root = Path(root)
    try:
        return _load_bundle(root)
    except BundleError as exc:
        origin = _from_environment(root)
        if origin:
            raise BundleError(f"{exc.message} (bundle path from {origin})", hint=exc.hint) from exc
        raise


def _from_environment(root: Path) -> str | None:
    """'$PEDSEG_BUNDLE=<value>' when `root` is the path that variable gives (config.DEFAULT_BUNDLE), else None."""
    value = os.environ.get(BUNDLE_ENV)
    if not value:
        return None
    try:
        same = Path(value).resolve() == root.resolve()
    except OSError:
        same = Path(value) == root
    return f"${BUNDLE_ENV}={value}" if same else None


def _load_bundle(root: Path) -> ModelBundle:
    spec_path = root / "bundle.json"
    if not spec_path.is_file():
        raise BundleError(f"No bundle.json in model bundle folder '{root}'.",
                          hint="Point --bundle at a folder holding bundle.json.")
    try:
        spec = json.loads(spec_path.read_text())
    except ValueError as exc:
        raise BundleError(f"bundle.json in '{root}' is malformed ({exc}).", hint=_FORMAT_HINT) from exc
    error = jsonschema.exceptions.best_match(_validator().iter_errors(spec))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "the top level"
        why = f" ({error.schema['description']})" if "description" in error.schema else ""
        raise BundleError(f"bundle.json in '{root}' is malformed: at {where}, {error.message}{why}.",
                          hint=_FORMAT_HINT)
    inputs = dict(spec["inputs"])
    brain = spec.get("preprocessing", {}).get("brain", "skull_stripped")
    models = tuple(_model(root, m, inputs, brain) for m in spec["models"])
    bundle = ModelBundle(
        root=root,
        name=spec["name"],
        version=str(spec["version"]),
        licence=spec.get("licence", "unspecified"),
        inputs=inputs,
        # by default what every member needs (all inputs, unless some member is a fallback needing fewer)
        required_inputs=tuple(spec.get("required_inputs", [r for r in inputs
                                                           if all(r in m.required_inputs for m in models)])),
        label_convention=spec["label_convention"],
        labels={int(k): v for k, v in spec["labels"].items()},
        models=models,
        tta=spec.get("tta", True),
        allow_bf16=spec.get("allow_bf16", True),
        fast_folds=tuple(str(f) for f in spec.get("fast_folds", models[0].folds[:1])),
        postprocessing=spec.get("postprocessing", {}),
        population=spec.get("population", "unspecified"),
    )
    _check_consistency(bundle)
    _check_model_folders(bundle)
    _check_deepmedic_members(bundle)
    _check_monai_members(bundle)
    return bundle


def _model(root: Path, entry: dict, inputs: dict[str, int], brain: BrainPreparation) -> BundleModel:
    kind = entry.get("kind", "nnunetv2")
    common = {"path": root / entry["path"], "weight": float(entry.get("weight", 1.0)), "kind": kind,
              "region_weights": {k: float(v) for k, v in entry.get("region_weights", {}).items()},
              # the member's channels: its roles in the bundle's channel order
              "required_inputs": tuple(sorted(entry.get("required_inputs", inputs), key=lambda r: inputs.get(r, -1))),
              "brain": entry.get("brain", brain), "fallback": bool(entry.get("fallback", False))}
    if kind == "deepmedic":
        return BundleModel(**common, weights=entry.get("weights", "model.safetensors"),
                           normalisation=entry["normalisation"],
                           classes={int(k): int(v) for k, v in entry["classes"].items()})
    if kind == "monai":
        from pedseg.pipeline.monai_member import MonaiSpec

        return BundleModel(**common, weights=entry.get("weights", "model.safetensors"),
                           normalisation=entry.get("normalisation", "zscore-nonzero"),
                           monai=MonaiSpec.from_entry(entry))
    return BundleModel(**common, folds=tuple(str(f) for f in entry["folds"]),
                       checkpoint=entry.get("checkpoint", "checkpoint_final.pth"))


_FORMAT_HINT = "See the README's Model bundles section for the format of bundle.json."


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    """The schema with role and region names filled in from the label table, so they live in one place."""
    schema = json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text())
    names = {"role": ROLES, "convention": CONVENTIONS, "base_region": BASE_REGIONS,
             "weighted_region": ("background", *REGIONS),
             "model_region": tuple(dict.fromkeys(name for values in LABEL_VALUES.values() for name in values))}
    for name, values in names.items():
        schema["$defs"][name]["enum"] = list(values)
    schema["$defs"]["kind"]["enum"] = list(get_args(ModelKind))
    schema["$defs"]["population"]["enum"] = [p for p in get_args(Population) if p != "unspecified"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _check_consistency(bundle: ModelBundle) -> None:
    """What the schema cannot say: channels numbered 0..N-1, labels of exactly the declared convention, members
    needing only sequences the bundle maps, fallback members that can ever run."""
    for model in bundle.models:
        unknown = sorted(set(model.required_inputs) - set(bundle.inputs))
        if unknown:
            raise BundleError(f"Bundle '{bundle.name}': model '{model.name}' requires {unknown}, which the bundle's "
                              f"'inputs' {sorted(bundle.inputs)} do not map.",
                              hint="Add them to 'inputs' or remove them from the model's 'required_inputs'.")
    _check_fallbacks(bundle)
    if sorted(bundle.inputs.values()) != list(range(len(bundle.inputs))):
        raise BundleError(f"Bundle '{bundle.name}' input channels {sorted(bundle.inputs.values())} are not 0..N-1.")
    if set(bundle.labels.values()) != set(LABEL_VALUES[bundle.label_convention]):
        raise BundleError(
            f"Bundle '{bundle.name}' labels {bundle.labels} do not match label convention '{bundle.label_convention}'.",
            hint="Use 2024 (ET, NET, CC, ED) or 2023 (NCR, ED, ET).",
        )


def _check_fallbacks(bundle: ModelBundle) -> None:
    """At least one primary member, and no fallback member needing every sequence some primary member needs: it
    could run only when that member can, that is never."""
    fallbacks = [m for m in bundle.models if m.fallback]
    primaries = [m for m in bundle.models if not m.fallback]
    if fallbacks and not primaries:
        raise BundleError(f"Bundle '{bundle.name}': every model is a fallback ('fallback': true), so none is the "
                          "primary model a complete session runs.",
                          hint="Remove 'fallback' from the model(s) a session with every sequence should run.")
    for model in fallbacks:
        shadowed_by = [p.name for p in primaries if set(p.required_inputs) <= set(model.required_inputs)]
        if shadowed_by:
            raise BundleError(
                f"Bundle '{bundle.name}': fallback model '{model.name}' needs {list(model.required_inputs)}, all "
                f"that model '{shadowed_by[0]}' needs, so it could never run: a fallback runs only when no primary "
                "model can.",
                hint="A fallback model must need fewer sequences than the primary models (set its "
                     "'required_inputs'), or drop 'fallback' to ensemble it with them.")


def _check_model_folders(bundle: ModelBundle) -> None:
    """Every nnU-Net model folder holds its plans, dataset description and folds, takes its inputs, and all
    predict one label set."""
    model_labels = {}
    for model in (m for m in bundle.models if m.kind == "nnunetv2"):
        for name in ("dataset.json", "plans.json"):
            if not (model.path / name).is_file():
                raise BundleError(f"Bundle '{bundle.name}': model folder '{model.path.name}' has no {name}.")
        dataset = json.loads((model.path / "dataset.json").read_text())
        model_labels[model.path.name] = dataset.get("labels")
        channels = dataset.get("channel_names", {})
        if len(channels) != len(model.required_inputs):
            raise BundleError(
                f"Bundle '{bundle.name}': model '{model.path.name}' takes {len(channels)} input channels but "
                f"bundle.json gives it {len(model.required_inputs)} sequences.",
                hint="Fix 'inputs' (or the model's 'required_inputs') in bundle.json to match the model's "
                     "dataset.json channel_names.",
            )
        for fold in model.folds:
            if not (model.path / f"fold_{fold}" / model.checkpoint).is_file():
                raise BundleError(
                    f"Bundle '{bundle.name}': model '{model.path.name}' lacks fold {fold} ({model.checkpoint}).",
                    hint="Restore the fold folder or remove the fold from bundle.json.",
                )
    if len({json.dumps(labels, sort_keys=True) for labels in model_labels.values()}) > 1:
        raise BundleError(f"Bundle '{bundle.name}': its models predict different label sets {model_labels}; "
                          "their probabilities cannot be averaged.", hint="Ensemble models trained on one label set.")


def _check_deepmedic_members(bundle: ModelBundle) -> None:
    """Each member's architecture and weights load, their shapes agree, it takes the bundle's channels, and its
    classes map onto the bundle's labels."""
    from pedseg.pipeline.deepmedic import load_deepmedic

    for model in (m for m in bundle.models if m.kind == "deepmedic"):
        missing = [path.name for path in model.weight_files if not path.is_file()]
        if missing:
            raise BundleError(f"Bundle '{bundle.name}': DeepMedic model '{model.name}' lacks {', '.join(missing)}.",
                              hint="Restore the member folder (scripts/convert_deepmedic.py writes both files).")
        network = load_deepmedic(model.path / DEEPMEDIC_ARCHITECTURE, model.path / model.weights,
                                 bundle_name=bundle.name)
        if network.arch.input_channels != len(model.required_inputs):
            raise BundleError(
                f"Bundle '{bundle.name}': DeepMedic model '{model.name}' takes {network.arch.input_channels} input "
                f"channels but bundle.json gives it {len(model.required_inputs)} sequences.",
                hint="Fix 'inputs' in bundle.json to match the model's channels.")
        if sorted(model.classes) != list(range(network.arch.classes)):
            raise BundleError(
                f"Bundle '{bundle.name}': DeepMedic model '{model.name}' has {network.arch.classes} output classes "
                f"but 'classes' maps {sorted(model.classes)}.", hint="Map every class 0..N-1 to a label value.")
        unknown = sorted(set(model.classes.values()) - {0, *bundle.labels})
        if unknown or model.classes[0] != 0:
            raise BundleError(
                f"Bundle '{bundle.name}': DeepMedic model '{model.name}' maps classes to label values {unknown} "
                "that bundle.json's labels do not name, or class 0 (background) to a tumour label.",
                hint="Map classes to 0 or to the values in 'labels'.")


def _check_monai_members(bundle: ModelBundle) -> None:
    """Each MONAI member's network builds, its weights fit, it takes its sequences and its outputs are the
    bundle's label values."""
    from pedseg.pipeline.monai_member import load_monai_member

    for model in (m for m in bundle.models if m.kind == "monai"):
        where = f"Bundle '{bundle.name}': MONAI model '{model.name}'"
        if not (model.path / model.weights).is_file():
            raise BundleError(f"{where} lacks its weights {model.weights}.",
                              hint="Restore the member folder or fix 'weights' in bundle.json.")
        in_channels = model.monai.network_args.get("in_channels")
        if in_channels is not None and in_channels != len(model.required_inputs):
            raise BundleError(f"{where} takes {in_channels} input channels but bundle.json gives it "
                              f"{len(model.required_inputs)} sequences {list(model.required_inputs)}.",
                              hint="Fix the model's 'required_inputs' or the network's in_channels.")
        unknown = sorted({v for out in model.monai.outputs for v in out} - {0, *bundle.labels})
        if unknown:
            raise BundleError(f"{where} maps outputs to label values {unknown} that bundle.json's labels do not name.",
                              hint="Map each output channel to 0 or to values in 'labels'.")
        load_monai_member(model.monai, model.path / model.weights, where)
