"""A Flywheel job as the engine lays it out: `manifest.json`, `config.json`, `input/<name>/<file>`, `output/`,
`work/`.

Translates config.json into one PipelineConfig, the input paths and the gear-only options. The options are
checked against the manifest with Flywheel's own invocation schema (fw-gear), and every option that is not
gear-only is the PipelineConfig field of the same name. One is text the gear parses into its field:
role_overrides ("t1c=6,t1n=2") into PipelineConfig.role_overrides. Nothing here talks to Flywheel: session mode
(downloading through the api-key) lives in `gear.session`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import jsonschema
from fw_gear.invocation_schema import derive_invocation_schema, isolate_config_invocation

from pedseg.pipeline.archive import safe_extract
from pedseg.pipeline.config import BUNDLE_ENV, DEFAULT_BUNDLE, PipelineConfig, parse_role_overrides
from pedseg.pipeline.errors import BundleError, InputError

logger = logging.getLogger(__name__)

FLYWHEEL_ROOT = Path("/flywheel/v0")
# Read by the gear, or (role_overrides) parsed by it into the PipelineConfig field of the same name: the manifest
# holds it as text. Every other option is the PipelineConfig field of the same name, value as it is.
GEAR_OPTIONS = ("force_rerun", "debug", "role_overrides")


@dataclass(frozen=True)
class GearJob:
    root: Path
    config: PipelineConfig
    dicom: Path | None  # None: session mode
    bundle_zip: Path | None  # None: the bundle built into the image
    destination: dict
    edited_seg: Path | None = None  # a reader's edited DICOM SEG (or a zip of it): review it after the run
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
    config_json = _read_json(root / "config.json")
    options = checked_options(config_json.get("config") or {}, _read_json(root / "manifest.json"))
    inputs = config_json.get("inputs") or {}
    api_key = inputs.get("api-key", {}).get("key") or None
    return GearJob(
        root=root,
        config=pipeline_config(options),
        dicom=_input_file(root, inputs, "dicom"),
        bundle_zip=_input_file(root, inputs, "model_bundle"),
        edited_seg=_input_file(root, inputs, "edited_seg"),
        destination=dict(config_json.get("destination") or {}),
        job_id=str((config_json.get("job") or {}).get("id", "")),
        force_rerun=options["force_rerun"],
        debug=options["debug"],
        api_key=api_key,
    )


def checked_options(options: dict, manifest: dict) -> dict:
    """The job's options over the manifest's defaults (as the engine fills them), checked against the manifest's
    config schema: a wrong type, a value outside its enum or an unknown option is the user's input error."""
    defaults = {name: spec["default"] for name, spec in manifest.get("config", {}).items() if "default" in spec}
    options = {**defaults, **options}
    try:
        jsonschema.validate(options, isolate_config_invocation(derive_invocation_schema(manifest)))
    except jsonschema.ValidationError as exc:
        where = f"Gear config option '{exc.path[0]}'" if exc.path else "The gear config"
        raise InputError(f"{where} is not valid: {exc.message}.",
                         hint=f"Known options and their values are in manifest.json: {sorted(defaults)}.") from exc
    return options


def pipeline_config(options: dict) -> PipelineConfig:
    """Checked gear options -> PipelineConfig: each option that is not gear-only is the field of the same name."""
    values = {name: options[name] for name in (f.name for f in fields(PipelineConfig))
              if name in options and name not in GEAR_OPTIONS}
    pins = parse_role_overrides([options.get("role_overrides") or ""], source="Gear config option 'role_overrides'")
    # The image sets PEDSEG_BUNDLE: an installed (non-editable) package cannot find the repo's bundles/ folder.
    return PipelineConfig(bundle=Path(os.environ.get(BUNDLE_ENV, DEFAULT_BUNDLE)), role_overrides=pins,
                          **values)


def unpack_bundle(bundle_zip: Path, dest: Path) -> Path:
    """Unpack a bundle zip (with the pipeline's hardened extractor) and return the folder holding bundle.json."""
    shutil.rmtree(dest, ignore_errors=True)  # a local re-run must not find the previous run's bundle too
    dest.mkdir(parents=True)
    safe_extract(bundle_zip, dest)
    found = sorted(p.parent for p in dest.rglob("bundle.json"))
    if len(found) != 1:
        what = "no bundle.json" if not found else f"{len(found)} bundle.json files"
        raise BundleError(f"The model_bundle archive '{bundle_zip.name}' holds {what}.",
                          hint="Zip exactly one bundle folder (the folder holding bundle.json and the model folders).")
    logger.info("model bundle unpacked from the model_bundle input")
    return found[0]


EDITED_SEG_NAME = "edited_seg.dcm"


def stage_edited_seg(edited_seg: Path, dest: Path) -> Path:
    """The edited_seg input as one DICOM file, dest/edited_seg.dcm: the file itself, or the one file of a zip
    (Flywheel may hold a DICOM file zipped). Copied under a fixed name, so that messages about it never quote the
    input's file name, which may hold the patient's name."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    target = dest / EDITED_SEG_NAME
    if not zipfile.is_zipfile(edited_seg):
        shutil.copyfile(edited_seg, target)
        return target
    unpacked = dest / "unpacked"
    unpacked.mkdir()
    safe_extract(edited_seg, unpacked)
    files = sorted(p for p in unpacked.rglob("*") if p.is_file())
    if len(files) != 1:
        raise InputError(f"The edited_seg archive holds {len(files)} files; it must hold the one DICOM SEG file.",
                         hint="Give the edited segmentation as the DICOM SEG file the viewer exported.")
    files[0].rename(target)
    shutil.rmtree(unpacked)
    return target


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"No {path.name} in the gear folder '{path.parent}'.",
                         hint="Run the gear through Flywheel, or make a gear folder with "
                              "`python -m pedseg.gear.local_run`.") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{path.name} in '{path.parent}' cannot be read as JSON ({exc.__class__.__name__}).") from exc
    if not isinstance(document, dict):
        raise InputError(f"{path.name} does not hold a JSON object.")
    return document


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

