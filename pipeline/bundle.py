"""Model bundles: a folder with `bundle.json` and one or more nnU-Net v2 trained-model folders.

bundle.json (format_version 1):
  name, version, licence, description
  inputs:            {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}   role -> nnU-Net input channel
  required_inputs:   roles the models need (fewer than four is allowed for a bundle trained that way)
  label_convention:  "2024" (1 ET, 2 NET, 3 CC, 4 ED) or "2023" (1 NCR, 2 ED, 3 ET)
  labels:            {"1": "ET", ...} model output label value -> region name
  models:            [{"path": "models/<trainer>__<plans>__<config>", "folds": [0, 1], "weight": 1.0,
                       "checkpoint": "checkpoint_final.pth"}]
  tta:               mirroring test-time augmentation by default
  fast_folds:        folds used in --fast mode (a model with none of them runs its first fold)
  postprocessing:    {"min_component_voxels": {"ET": 8, ...}, "min_wt_component_voxels": 50,
                      "redefine": [{"region": "ET", "below_fraction_of_wt": 0.0, "to": "NET"}],
                      "keep_largest_wt": false}
                     region names are the internal ones (ET, NET, CC, ED) whatever the label convention.
Models are weighted by "weight" when their class probabilities are averaged; they must share one label set.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.postprocess import REGION_LABEL, SETTINGS
from pedseg.pipeline.types import ROLES

CONVENTIONS = {"2024": {"ET", "NET", "CC", "ED"}, "2023": {"NCR", "ED", "ET"}}


@dataclass(frozen=True)
class BundleModel:
    path: Path
    folds: tuple[str, ...]
    weight: float
    checkpoint: str


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

    def folds_to_run(self, fast: bool) -> list[tuple[BundleModel, tuple[str, ...]]]:
        """Each model with the folds a run uses: all of them, or in fast mode those in fast_folds."""
        if not fast:
            return [(model, model.folds) for model in self.models]
        return [(model, tuple(f for f in model.folds if f in self.fast_folds) or model.folds[:1])
                for model in self.models]

    def sha256(self) -> str:
        """Hash of bundle.json and every checkpoint: identifies exactly which weights produced a result."""
        digest = hashlib.sha256((self.root / "bundle.json").read_bytes())
        for model in self.models:
            for fold in model.folds:
                with open(model.path / f"fold_{fold}" / model.checkpoint, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
        return digest.hexdigest()


def load_bundle(root: Path) -> ModelBundle:
    root = Path(root)
    spec_path = root / "bundle.json"
    if not spec_path.is_file():
        raise BundleError(f"No bundle.json in model bundle folder '{root}'.", hint="Point --bundle at a folder holding bundle.json.")
    try:
        spec = json.loads(spec_path.read_text())
        models = tuple(
            BundleModel(root / m["path"], tuple(str(f) for f in m["folds"]), float(m.get("weight", 1.0)),
                        m.get("checkpoint", "checkpoint_final.pth"))
            for m in spec["models"]
        )
        bundle = ModelBundle(
            root=root,
            name=spec["name"],
            version=str(spec["version"]),
            licence=spec.get("licence", "unspecified"),
            inputs={role: int(ch) for role, ch in spec["inputs"].items()},
            required_inputs=tuple(spec.get("required_inputs", spec["inputs"].keys())),
            label_convention=str(spec["label_convention"]),
            labels={int(k): v for k, v in spec["labels"].items()},
            models=models,
            tta=bool(spec.get("tta", True)),
            fast_folds=tuple(str(f) for f in spec.get("fast_folds", models[0].folds[:1])),
            postprocessing=spec.get("postprocessing", {}),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BundleError(f"bundle.json in '{root}' is malformed ({exc!r}).", hint="See the README's bundle format.") from exc
    _validate(bundle)
    return bundle


def _validate(bundle: ModelBundle) -> None:
    unknown = set(bundle.inputs) - set(ROLES)
    if unknown:
        raise BundleError(f"Bundle '{bundle.name}' maps unknown sequence roles {sorted(unknown)}; known roles are {list(ROLES)}.")
    if sorted(bundle.inputs.values()) != list(range(len(bundle.inputs))):
        raise BundleError(f"Bundle '{bundle.name}' input channels {sorted(bundle.inputs.values())} are not 0..N-1.")
    if bundle.label_convention not in CONVENTIONS or set(bundle.labels.values()) != CONVENTIONS[bundle.label_convention]:
        raise BundleError(
            f"Bundle '{bundle.name}' labels {bundle.labels} do not match label convention '{bundle.label_convention}'.",
            hint="Use 2024 (ET, NET, CC, ED) or 2023 (NCR, ED, ET).",
        )
    _validate_postprocessing(bundle)
    model_labels = {}
    for model in bundle.models:
        if model.weight <= 0:
            raise BundleError(f"Bundle '{bundle.name}': model '{model.path.name}' has weight {model.weight}; weights "
                              "must be positive.")
        for name in ("dataset.json", "plans.json"):
            if not (model.path / name).is_file():
                raise BundleError(f"Bundle '{bundle.name}': model folder '{model.path.name}' has no {name}.")
        dataset = json.loads((model.path / "dataset.json").read_text())
        model_labels[model.path.name] = dataset.get("labels")
        channels = dataset.get("channel_names", {})
        if len(channels) != len(bundle.inputs):
            raise BundleError(
                f"Bundle '{bundle.name}': model '{model.path.name}' takes {len(channels)} input channels but bundle.json "
                f"maps {len(bundle.inputs)} sequences.",
                hint="Fix 'inputs' in bundle.json to match the model's dataset.json channel_names.",
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


def _validate_postprocessing(bundle: ModelBundle) -> None:
    settings = bundle.postprocessing
    regions = set(settings.get("min_component_voxels", {}))
    for rule in settings.get("redefine", []):
        if not {"region", "below_fraction_of_wt", "to"} <= set(rule):
            raise BundleError(f"Bundle '{bundle.name}': redefine rule {rule} needs region, below_fraction_of_wt and to.")
        regions |= {rule["region"], rule["to"]}
    unknown_keys = set(settings) - set(SETTINGS)
    unknown_regions = regions - set(REGION_LABEL)
    if unknown_keys or unknown_regions:
        raise BundleError(
            f"Bundle '{bundle.name}': unknown post-processing settings {sorted(unknown_keys)} or regions "
            f"{sorted(unknown_regions)}.",
            hint=f"Settings are {list(SETTINGS)}; regions are {list(REGION_LABEL)}.")
