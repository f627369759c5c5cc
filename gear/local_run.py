"""Run the gear with no Flywheel instance: lay out a gear folder as the engine would, then (optionally) run it.

    python -m gear.local_run SESSION_DICOM(.zip or folder) GEAR_DIR [--set fast=true ...] [--bundle-zip Z]
        [--edited-seg SEG.dcm] [--run]

GEAR_DIR gets manifest.json, config.json (manifest defaults plus --set overrides), input/dicom/<zip> (and
input/model_bundle/, input/edited_seg/ when given), output/ and work/; `python run.py --root GEAR_DIR` (or
--run) then behaves as the gear does on an engine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pedseg.gear.context import FLYWHEEL_ROOT

REPO_MANIFEST = Path(__file__).resolve().parents[1] / "manifest.json"


def make_gear_root(dicom: Path, root: Path, overrides: dict[str, str] | None = None,
                   bundle_zip: Path | None = None, manifest_path: Path | None = None,
                   edited_seg: Path | None = None) -> Path:
    manifest_text = _manifest_path(manifest_path).read_text(encoding="utf-8")
    manifest = json.loads(manifest_text)
    for sub in ("output", "work"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    inputs = {"dicom": _file_input(root, "dicom", _as_zip(Path(dicom), root / "input" / "dicom"), "dicom")}
    if bundle_zip is not None:
        bundle = _copy(Path(bundle_zip), root / "input" / "model_bundle")
        inputs["model_bundle"] = _file_input(root, "model_bundle", bundle, "archive")
    if edited_seg is not None:
        seg = _copy(Path(edited_seg), root / "input" / "edited_seg")
        inputs["edited_seg"] = _file_input(root, "edited_seg", seg, "dicom")
    config_json = {
        "config": gear_config(manifest, overrides or {}),
        "inputs": inputs,
        "destination": {"type": "analysis", "id": "local"},
    }
    (root / "config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    (root / "manifest.json").write_text(manifest_text, encoding="utf-8")  # the engine's gear folder holds it too
    return root


def gear_config(manifest: dict, overrides: dict[str, str]) -> dict:
    """Manifest defaults, then KEY=VALUE overrides typed by the manifest (booleans true/false)."""
    spec = manifest["config"]
    config = {key: item["default"] for key, item in spec.items() if "default" in item}
    for key, text in overrides.items():
        if key not in spec:
            raise SystemExit(f"unknown config option '{key}'; known: {', '.join(sorted(spec))}")
        if spec[key].get("type") == "boolean":
            if text.lower() not in ("true", "false"):
                raise SystemExit(f"config option '{key}' takes true or false, not '{text}'")
            config[key] = text.lower() == "true"
        else:
            config[key] = text
    return config


def _manifest_path(path: Path | None) -> Path:
    if path is not None:
        return path
    return REPO_MANIFEST if REPO_MANIFEST.is_file() else FLYWHEEL_ROOT / "manifest.json"


def _as_zip(dicom: Path, folder: Path) -> Path:
    """The engine hands the gear one file: a DICOM folder is zipped, a zip is copied."""
    folder.mkdir(parents=True, exist_ok=True)
    if dicom.is_dir():
        return Path(shutil.make_archive(str(folder / dicom.name), "zip", dicom))
    if not dicom.is_file():
        raise SystemExit(f"no DICOM folder or zip at '{dicom}'")
    return _copy(dicom, folder)


def _copy(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(src, folder / src.name))


def _file_input(root: Path, name: str, path: Path, file_type: str) -> dict:
    """An input entry shaped like the engine's (no Flywheel ids or header info: there is no Flywheel)."""
    return {
        "base": "file",
        "hierarchy": {"type": "session", "id": "local"},
        "location": {"path": str(path.resolve()), "name": path.name},
        "object": {"type": file_type, "modality": "MR" if file_type == "dicom" else "", "mimetype": "application/zip",
                   "size": path.stat().st_size, "info": {}, "tags": [], "classification": {}},
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gear.local_run", description=__doc__.splitlines()[0])
    parser.add_argument("dicom", type=Path, help="DICOM session: a folder or a .zip")
    parser.add_argument("root", type=Path, help="gear folder to create (config.json, input/, output/, work/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="gear config option, e.g. --set fast=true --set reference_role=t2f (repeatable)")
    parser.add_argument("--bundle-zip", type=Path, help="zip of a model bundle folder (the model_bundle input)")
    parser.add_argument("--edited-seg", type=Path, help="an edited DICOM SEG to review (the edited_seg input)")
    parser.add_argument("--manifest", type=Path, help="manifest.json giving the config defaults")
    parser.add_argument("--run", action="store_true", help="run the gear on the folder once it is laid out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if any("=" not in item for item in args.overrides):
        raise SystemExit("--set takes KEY=VALUE")
    overrides = dict(item.split("=", 1) for item in args.overrides)
    root = make_gear_root(args.dicom, args.root, overrides, args.bundle_zip, args.manifest, args.edited_seg)
    print(f"gear folder ready: {root}  (run it with: python run.py --root {root})")
    if not args.run:
        return 0
    from pedseg.gear.main import main as gear_main

    return gear_main(["--root", str(root)])


if __name__ == "__main__":
    sys.exit(main())
