"""A Flywheel job as the engine lays it out: `config.json`, `input/<name>/<file>`, `output/`, `work/`.

Translates config.json into one PipelineConfig, the input path and the gear-only options. Nothing here
talks to Flywheel: session mode (downloading through the api-key) lives in `gear.session`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pedseg.pipeline.config import DEFAULT_BUNDLE, PipelineConfig
from pedseg.pipeline.errors import BundleError, InputError
from pedseg.pipeline.ingest import _extract_zip
from pedseg.pipeline.types import ROLES

logger = logging.getLogger(__name__)

FLYWHEEL_ROOT = Path("/flywheel/v0")
# Gear config key -> allowed values; each maps to the PipelineConfig field of the same name.
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "reference_role": ROLES,
    "missing_policy": ("fail", "allow"),
    "label_convention": ("2024", "2023"),
}
PIPELINE_FLAGS = ("fast", "write_seg", "write_sr", "write_pdf", "pseudonymize", "compare_across_bundles")
GEAR_FLAGS = ("force_rerun", "debug")  # read by the gear, not by the pipeline


@dataclass(frozen=True)
class GearJob:
    root: Path
    config: PipelineConfig
    dicom: Path | None  # None: session mode
    bundle_zip: Path | None  # None: the bundle built into the image
    destination: dict
    job_id: str = ""
    force_rerun: bool = False
    debug: bool = False
    api_key: str | None = field(default=None, repr=False)  # never in logs or reprs

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"


def load_job(root: Path = FLYWHEEL_ROOT) -> GearJob:
    root = Path(root)
    config_json = _read_config_json(root / "config.json")
    options = config_json.get("config") or {}
    _check_known_keys(options)
    inputs = config_json.get("inputs") or {}
    api_key = inputs.get("api-key", {}).get("key") or None
    return GearJob(
        root=root,
        config=pipeline_config(options),
        dicom=_input_file(root, inputs, "dicom"),
        bundle_zip=_input_file(root, inputs, "model_bundle"),
        destination=dict(config_json.get("destination") or {}),
        job_id=str((config_json.get("job") or {}).get("id", "")),
        force_rerun=_flag(options, "force_rerun", False),
        debug=_flag(options, "debug", False),
        api_key=api_key,
    )


def pipeline_config(options: dict) -> PipelineConfig:
    """Gear config values -> PipelineConfig; a key the config omits keeps the pipeline's default."""
    defaults = PipelineConfig()
    values = {name: _choice(options, name, getattr(defaults, name)) for name in CHOICES}
    values.update({name: _flag(options, name, getattr(defaults, name)) for name in PIPELINE_FLAGS})
    # The image sets PEDSEG_BUNDLE: an installed (non-editable) package cannot find the repo's bundles/ folder.
    return PipelineConfig(bundle=Path(os.environ.get("PEDSEG_BUNDLE", DEFAULT_BUNDLE)), **values)


def unpack_bundle(bundle_zip: Path, dest: Path) -> Path:
    """Unpack a bundle zip (with the pipeline's hardened extractor) and return the folder holding bundle.json."""
    shutil.rmtree(dest, ignore_errors=True)  # a local re-run must not find the previous run's bundle too
    dest.mkdir(parents=True)
    _extract_zip(bundle_zip, dest)
    found = sorted(p.parent for p in dest.rglob("bundle.json"))
    if len(found) != 1:
        what = "no bundle.json" if not found else f"{len(found)} bundle.json files"
        raise BundleError(f"The model_bundle archive '{bundle_zip.name}' holds {what}.",
                          hint="Zip exactly one bundle folder (the folder holding bundle.json and the model folders).")
    logger.info("model bundle unpacked from the model_bundle input")
    return found[0]


def _read_config_json(path: Path) -> dict:
    try:
        config_json = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"No config.json in the gear folder '{path.parent}'.",
                         hint="Run the gear through Flywheel, or make a gear folder with `python -m gear.local_run`.") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"config.json in '{path.parent}' cannot be read as JSON ({exc.__class__.__name__}).") from exc
    if not isinstance(config_json, dict):
        raise InputError("config.json does not hold a JSON object.")
    return config_json


def _check_known_keys(options: dict) -> None:
    unknown = sorted(set(options) - set(CHOICES) - set(PIPELINE_FLAGS) - set(GEAR_FLAGS))
    if unknown:
        raise InputError(f"Unknown gear config option(s) {unknown}.",
                         hint=f"Known options: {sorted({*CHOICES, *PIPELINE_FLAGS, *GEAR_FLAGS})}.")


def _choice(options: dict, name: str, default: str) -> str:
    value = options.get(name, default)
    if value not in CHOICES[name]:
        raise InputError(f"Gear config option '{name}' is {value!r}; allowed values are {list(CHOICES[name])}.")
    return value


def _flag(options: dict, name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise InputError(f"Gear config option '{name}' is {value!r}; it must be true or false.")
    return value


def _input_file(root: Path, inputs: dict, name: str) -> Path | None:
    """Path of a file input. The engine writes absolute /flywheel/v0 paths; a local gear folder elsewhere
    holds the same file under <root>/input/<name>/, so fall back to that."""
    entry = inputs.get(name)
    if not entry:
        return None
    location = entry.get("location") or {}
    candidates = [Path(location["path"])] if location.get("path") else []
    if location.get("name"):
        candidates.append(root / "input" / name / location["name"])
    for path in candidates:
        if path.is_file():
            return path
    raise InputError(f"The '{name}' input file is listed in config.json but missing from the gear's input folder.",
                     hint="Re-run the job; locally, check the file under input/" + name + "/.")

