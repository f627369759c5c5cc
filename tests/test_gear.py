"""Flywheel gear adapter: config.json -> PipelineConfig, exit codes, error.json, outputs and .metadata.json.

The runner (`run_pipeline` for a 'dicom' input, `run_session` in session mode) is replaced by a fake that writes
the pipeline's output layout and returns a realistic RunResult, so these tests need no model and take seconds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import shlex
import shutil
import tempfile
import zipfile
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import numpy as np
import pydicom
import pytest
from fw_gear.manifest import Manifest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pedseg.gear import context as gear_context
from pedseg.gear.candidates import flywheel_header, rejection_reasons
from pedseg.gear.idempotency import idempotency_key, series_key
from pedseg.gear.local_run import make_gear_root
from pedseg.gear.main import main
from pedseg.gear.session import FlywheelSession, open_session
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import BundleError, InputError, MissingSequenceError
from pedseg.pipeline.longitudinal import compare
from pedseg.pipeline.types import Identification, Measurements, Rapno, RegionMeasure, SeriesDecision
from pedseg.reporting.artifacts import BundleRecord, Provenance
from pedseg.reporting.tables import write_measurements_json
from pedseg.runner import RunResult
from pedseg.tracking.flywheel import MEASUREMENTS_FILE, FlywheelStore
from pedseg.tracking.records import time_point, to_dict

from factories import (
    FakeAcquisition,
    FakeAnalysis,
    FakeClient,
    FakeSession,
    dicom_dataset,
    fake_bundle,
    passing_qc,
    write_dicom,
)

REPO = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((REPO / "manifest.json").read_text())
ENGINE_METADATA_SCHEMA = json.loads(resources.files("fw_gear").joinpath("engine_metadata_schema.json").read_text())
SENTINELS = ("SENTINEL^PHI", "SENTINEL-ID-4711", "19010203", "Sentinel Childrens Hospital")
API_KEY = "flywheel.example:SENTINEL-API-KEY-0000"
UIDS = {"t1n": "1.2.826.0.1.3680043.8.498.11", "t1c": "1.2.826.0.1.3680043.8.498.12",
        "t2w": "1.2.826.0.1.3680043.8.498.13", "t2f": "1.2.826.0.1.3680043.8.498.14"}
BUNDLE_SHA = "ab" * 32
NON_DEFAULT = {"device": "cpu", "fast": True, "reference_role": "t2f", "missing_policy": "allow",
               "label_convention": "2023", "write_seg": False, "write_sr": False, "write_pdf": False,
               "pseudonymize": False, "compare_across_bundles": True, "force_rerun": True, "debug": True}


# ----------------------------------------------------------------------------------------------- fixtures


def sentinel_dicom_zip(path: Path) -> Path:
    """A one-image DICOM zip whose patient headers carry sentinel values that must never reach outputs."""
    name, patient_id, birth_date, institution = SENTINELS
    ds = dicom_dataset(PatientName=name, PatientID=patient_id, PatientBirthDate=birth_date, InstitutionName=institution,
                       Modality="MR", SeriesInstanceUID=UIDS["t1c"], StudyInstanceUID=generate_uid())
    dcm = write_dicom(ds, path.parent / "image.dcm")
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(dcm, "series/image.dcm")
    dcm.unlink()
    return path


def write_gear_root(root: Path, config: dict | None = None, *, dicom: bool = True, api_key: bool = False,
                    bundle_zip: Path | None = None, edited_seg: Path | None = None) -> Path:
    """A gear folder with manifest.json, and config.json exactly as the engine writes it (absolute /flywheel/v0
    paths included)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "manifest.json", root / "manifest.json")
    inputs = {}
    if dicom:
        name = "SENTINEL^PHI_session.dicom.zip"
        (root / "input" / "dicom").mkdir(parents=True, exist_ok=True)
        sentinel_dicom_zip(root / "input" / "dicom" / name)
        inputs["dicom"] = {
            "base": "file",
            "hierarchy": {"type": "acquisition", "id": "65f0c0ffee0000000000aaaa"},
            "location": {"path": f"/flywheel/v0/input/dicom/{name}", "name": name},
            "object": {"type": "dicom", "modality": "MR", "mimetype": "application/zip", "size": 1234, "tags": [],
                       "classification": {"Intent": ["Structural"], "Measurement": ["T1"]},
                       "info": {"PatientName": SENTINELS[0], "PatientID": SENTINELS[1],
                                "PatientBirthDate": SENTINELS[2], "InstitutionName": SENTINELS[3]},
                       "file_id": "65f0c0ffee0000000000bbbb", "version": 1},
        }
    if bundle_zip is not None:
        (root / "input" / "model_bundle").mkdir(parents=True, exist_ok=True)
        target = root / "input" / "model_bundle" / bundle_zip.name
        target.write_bytes(bundle_zip.read_bytes())
        inputs["model_bundle"] = {"base": "file", "location": {"path": str(target), "name": target.name},
                                  "object": {"type": "archive", "info": {}}}
    if edited_seg is not None:  # named as a viewer may name it: after the patient
        (root / "input" / "edited_seg").mkdir(parents=True, exist_ok=True)
        target = root / "input" / "edited_seg" / f"{SENTINELS[0]}_edited{edited_seg.suffix}"
        target.write_bytes(edited_seg.read_bytes())
        inputs["edited_seg"] = {"base": "file", "location": {"path": f"/flywheel/v0/input/edited_seg/{target.name}",
                                                             "name": target.name},
                                "object": {"type": "dicom", "modality": "SEG", "info": {}}}
    if api_key:
        inputs["api-key"] = {"base": "api-key", "key": API_KEY}
    config_json = {
        "config": {**{k: v["default"] for k, v in MANIFEST["config"].items()}, **(config or {})},
        "inputs": inputs,
        "destination": {"type": "analysis", "id": "65f0c0ffee0000000000cccc"},
        "job": {"id": "65f0c0ffee0000000000dddd"},
    }
    (root / "config.json").write_text(json.dumps(config_json))
    return root


def fake_result(outdir: Path, config: PipelineConfig) -> RunResult:
    """Writes the pipeline's output layout (sub-folders included) and returns what run_pipeline would."""
    files = {
        "nifti_t1n": "nifti/t1n.nii.gz", "nifti_t1c": "nifti/t1c.nii.gz", "nifti_t2w": "nifti/t2w.nii.gz",
        "nifti_t2f": "nifti/t2f.nii.gz", "nifti_brain_mask": "nifti/brain_mask.nii.gz",
        "nifti_labels_atlas": "nifti/labels_atlas.nii.gz", "nifti_labels_t1c_native": "nifti/labels_t1c_native.nii.gz",
        "measurements_json": "measurements.json", "measurements_csv": "measurements.csv",
        "seg": "seg/segmentation.dcm", "sr": "sr/measurements.dcm", "pdf": "report.pdf",
        "pdf_dicom": "report/report_pdf.dcm", "provenance": "provenance.json", "identify": "identify.json",
    }
    outputs = {}
    for key, rel in files.items():
        path = outdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"pedseg test output " + key.encode())
        outputs[key] = path
    regions = {name: RegionMeasure(name, voxels, voxels / 1000, 1, native_volume_ml=voxels / 1000 * 1.01,
                                   bidimensional_mm2=531.75 if name in ("TC", "WT") else None)
               for name, voxels in (("ET", 1215), ("NET", 4000), ("CC", 300), ("ED", 9000), ("TC", 5515),
                                    ("WT", 14515))}
    regions["CC"] = dataclasses.replace(regions["CC"], native_volume_ml=float("nan"))  # must not reach the JSON as NaN
    decisions = [SeriesDecision(uid, number, f"series {number}", role, 0.95, ["rule"], chosen=True)
                 for number, (role, uid) in enumerate(UIDS.items(), start=2)]
    decisions.append(SeriesDecision("1.2.3.99", 1, "localizer", "other", 0.99, ["localizer"]))
    provenance = Provenance(
        pedseg_version="0.1.0", packages={},
        bundle=BundleRecord("pedseg-demo", "0.1.0", "CC-BY-4.0", BUNDLE_SHA, "2024"),
        study_instance_uid="1.2.3", series_instance_uids=dict(UIDS), device="cpu", fast_mode=config.fast,
        tta=not config.fast, models=["m"], folds=["0"], ensemble=None, postprocessing=(), qc=passing_qc(),
        reference_role=config.reference_role,
    )
    rapno = Rapno(region="TC", lesions=(), sum_product_mm2=531.75, lesions_total=1, max_lesions=5, tolerance_deg=5.0)
    return RunResult(
        outdir=outdir, outputs=outputs,
        identification=Identification(decisions=decisions, chosen=dict(UIDS), missing=[]),
        measurements=Measurements(regions=regions, qc_flags=["brain volume below the age norm: check skull stripping"],
                                  rapno=rapno),
        provenance=provenance,
    )


def with_bundle_hash(result: RunResult, sha256: str) -> RunResult:
    """The fake run as made with the bundle of this hash (so keys match as in a real run)."""
    bundle = dataclasses.replace(result.provenance.bundle, sha256=sha256)
    return dataclasses.replace(result, provenance=dataclasses.replace(result.provenance, bundle=bundle))


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Replace run_pipeline; each call is recorded with the temp folder the pipeline would have used."""
    calls = []

    def fake_run_pipeline(input_path, outdir, config, store=None):
        calls.append({"input": Path(input_path), "outdir": Path(outdir), "config": config, "store": store,
                      "tempdir": tempfile.gettempdir()})
        return fake_result(Path(outdir), config)

    monkeypatch.setattr("pedseg.runner.run_pipeline", fake_run_pipeline)
    monkeypatch.delenv("PEDSEG_BUNDLE", raising=False)
    return calls


def raise_from_pipeline(monkeypatch, error: Exception) -> None:
    def failing_run_pipeline(input_path, outdir, config, store=None):
        raise error

    monkeypatch.setattr("pedseg.runner.run_pipeline", failing_run_pipeline)


def run_gear(root: Path) -> int:
    return main(["--root", str(root)])


def assert_no_phi(text: str) -> None:
    for secret in (*SENTINELS, "SENTINEL", API_KEY):
        assert secret not in text


# ------------------------------------------------------------------------------------ config.json mapping


def test_every_gear_config_key_reaches_the_pipeline_config(tmp_path):
    job = gear_context.load_job(write_gear_root(tmp_path, NON_DEFAULT))
    c = job.config
    assert (c.device, c.fast, c.reference_role) == ("cpu", True, "t2f")
    assert (c.missing_policy, c.label_convention) == ("allow", "2023")
    assert (c.write_seg, c.write_sr, c.write_pdf, c.pseudonymize) == (False, False, False, False)
    assert c.compare_across_bundles
    assert (job.force_rerun, job.debug) == (True, True)
    # The engine resolves the input under /flywheel/v0; a local gear folder holds it under ROOT/input/dicom.
    assert job.dicom == tmp_path / "input" / "dicom" / "SENTINEL^PHI_session.dicom.zip"
    assert job.destination == {"type": "analysis", "id": "65f0c0ffee0000000000cccc"}
    assert job.job_id == "65f0c0ffee0000000000dddd"
    assert job.api_key is None
    assert job.bundle_zip is None


def test_manifest_config_matches_the_pipeline_config():
    """Every manifest option is a PipelineConfig field (same default, the field's choices as its enum) or one of
    the gear's own; the gear and the CLI therefore behave alike."""
    pipeline_options = set(MANIFEST["config"]) - set(gear_context.GEAR_OPTIONS)
    assert pipeline_options <= {f.name for f in dataclasses.fields(PipelineConfig)}
    defaults = PipelineConfig()
    for key in pipeline_options:
        assert MANIFEST["config"][key]["default"] == getattr(defaults, key), key
        assert MANIFEST["config"][key].get("enum", []) == list(PipelineConfig.choices(key)), key
    choice_fields = {f.name for f in dataclasses.fields(PipelineConfig) if PipelineConfig.choices(f.name)}
    assert choice_fields <= pipeline_options  # every field with fixed choices is a gear option


def test_omitted_config_keys_keep_the_pipeline_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "inputs": {}, "destination": {}}))
    shutil.copy(REPO / "manifest.json", tmp_path / "manifest.json")
    job = gear_context.load_job(tmp_path)
    assert dataclasses.replace(job.config, bundle=PipelineConfig().bundle) == PipelineConfig()
    assert (job.force_rerun, job.debug, job.dicom) == (False, False, None)


def test_bundle_location_comes_from_the_image_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PEDSEG_BUNDLE", "/opt/pedseg/bundles/pedseg-demo")
    assert gear_context.load_job(write_gear_root(tmp_path)).config.bundle == Path("/opt/pedseg/bundles/pedseg-demo")


@pytest.mark.parametrize("config", [{"device": "tpu"}, {"fast": "yes"}, {"label_convention": 2024}, {"fsat": True}])
def test_invalid_config_is_a_bad_input(tmp_path, pipeline_calls, config):
    assert run_gear(write_gear_root(tmp_path, config)) == InputError.exit_code == 2
    assert json.loads((tmp_path / "output" / "error.json").read_text())["error"] == "bad_input"
    assert not pipeline_calls


def test_unreadable_config_json_is_a_bad_input(tmp_path, pipeline_calls):
    (tmp_path / "config.json").write_text("{not json")
    assert run_gear(tmp_path) == 2
    assert not pipeline_calls


def test_invalid_config_names_the_option_and_its_allowed_values(tmp_path, pipeline_calls):
    assert run_gear(write_gear_root(tmp_path, {"device": "tpu"})) == 2
    message = json.loads((tmp_path / "output" / "error.json").read_text())["message"]
    assert message == "Gear config option 'device' is not valid: 'tpu' is not one of ['auto', 'cpu', 'cuda']."


def test_a_gear_folder_without_its_manifest_is_a_bad_input(tmp_path, pipeline_calls):
    (write_gear_root(tmp_path) / "manifest.json").unlink()
    assert run_gear(tmp_path) == 2
    error = json.loads((tmp_path / "output" / "error.json").read_text())
    assert "No manifest.json in the gear folder" in error["message"]


# -------------------------------------------------------------------------------- exit codes, error.json


def test_no_dicom_input_and_no_api_key_is_a_clear_input_error(tmp_path, pipeline_calls, caplog):
    assert run_gear(write_gear_root(tmp_path, dicom=False)) == 2
    error = json.loads((tmp_path / "output" / "error.json").read_text())
    assert error["error"] == "bad_input"
    assert "'dicom'" in error["message"]
    assert error["hint"]
    assert "No 'dicom' input" in caplog.text
    assert not pipeline_calls


def test_input_listed_but_missing_is_a_bad_input(tmp_path, pipeline_calls):
    root = write_gear_root(tmp_path)
    for path in (root / "input" / "dicom").iterdir():
        path.unlink()
    assert run_gear(root) == 2
    assert not pipeline_calls


@pytest.mark.parametrize("error", [
    MissingSequenceError("Model bundle 'pedseg-demo' requires ['t2f'], which this session lacks.", hint="Add it."),
    BundleError("Bundle 'x' lacks fold 0.", hint="Restore it."),
    InputError("The archive entry 'a/../b' climbs out of the archive folder."),
])
def test_pipeline_error_becomes_its_exit_code_and_error_json(tmp_path, monkeypatch, caplog, error):
    raise_from_pipeline(monkeypatch, error)
    assert run_gear(write_gear_root(tmp_path)) == error.exit_code
    assert json.loads((tmp_path / "output" / "error.json").read_text()) == error.to_dict()
    assert f"exit code {error.exit_code}" in caplog.text
    assert error.message in caplog.text
    assert not (tmp_path / "output" / ".metadata.json").exists()


def test_unexpected_exception_exits_1_without_its_message(tmp_path, monkeypatch, caplog):
    # Library errors may quote header values; only the exception type and place reach the job log.
    raise_from_pipeline(monkeypatch, ValueError(f"bad value {SENTINELS[0]} in PatientName"))
    assert run_gear(write_gear_root(tmp_path)) == 1
    assert "Unexpected ValueError in " in caplog.text
    assert "Traceback" not in caplog.text
    assert_no_phi(caplog.text)
    error = json.loads((tmp_path / "output" / "error.json").read_text())
    assert error["error"] == "internal_error"
    assert error["exit_code"] == 1
    assert_no_phi(json.dumps(error))


def test_unexpected_exception_traceback_only_with_debug(tmp_path, monkeypatch, caplog):
    raise_from_pipeline(monkeypatch, RuntimeError("boom"))
    assert run_gear(write_gear_root(tmp_path, {"debug": True})) == 1
    assert "Traceback" in caplog.text
    assert "boom" in caplog.text


# ------------------------------------------------------------------------------ outputs and .metadata.json


@pytest.fixture
def finished(tmp_path, pipeline_calls, caplog):
    caplog.set_level(logging.DEBUG)
    root = write_gear_root(tmp_path, {"debug": True}, api_key=True)
    assert run_gear(root) == 0
    return root, json.loads((root / "output" / ".metadata.json").read_text()), caplog.text


def test_run_calls_the_pipeline_once_with_the_translated_job(finished, pipeline_calls):
    root, _, _ = finished
    (call,) = pipeline_calls
    assert call["input"] == root / "input" / "dicom" / "SENTINEL^PHI_session.dicom.zip"
    assert call["outdir"] == root / "output"
    assert call["tempdir"] == str(root / "work")  # intermediates on the engine's work disk
    assert tempfile.gettempdir() != str(root / "work")  # and restored afterwards


def test_a_dicom_input_run_is_not_tracked_and_says_so_once(finished, pipeline_calls):
    _, _, log_text = finished
    (call,) = pipeline_calls
    assert call["store"] is None
    assert call["config"].subject_key is None
    assert log_text.count("longitudinal tracking off: runs on a 'dicom' input are not tracked") == 1


def test_outputs_are_flat_for_the_engine_upload(finished):
    root, metadata, _ = finished
    output = root / "output"
    assert not [p for p in output.iterdir() if p.is_dir()]
    names = {p.name for p in output.iterdir()} - {".metadata.json"}
    assert {"pedseg_segmentation.dcm", "pedseg_measurements_sr.dcm", "pedseg_report.pdf", "pedseg_report_pdf.dcm",
            "pedseg_measurements.json", "pedseg_measurements.csv", "pedseg_labels_t1c_native.nii.gz"} <= names
    assert {f["name"] for f in metadata["analysis"]["files"]} == names


def test_metadata_is_valid_engine_metadata_with_the_summary(finished):
    _, metadata, _ = finished
    jsonschema.Draft7Validator(ENGINE_METADATA_SCHEMA).validate(metadata)
    summary = metadata["analysis"]["info"]["pedseg"]
    expected_key = hashlib.sha256("\n".join([*sorted(UIDS.values()), BUNDLE_SHA]).encode()).hexdigest()
    assert summary["idempotency_key"] == expected_key
    assert summary["bundle"] == {"name": "pedseg-demo", "version": "0.1.0", "licence": "CC-BY-4.0",
                                 "sha256": BUNDLE_SHA}
    assert summary["volumes_ml"]["WT"] == pytest.approx(14.515)
    assert summary["native_volumes_ml"]["CC"] is None
    assert summary["series_numbers"] == {"t1n": 2, "t1c": 3, "t2w": 4, "t2f": 5}
    assert summary["rapno"] == {"region": "TC", "lesions_total": 1, "sum_product_mm2": 531.75}


def test_file_entries_carry_type_modality_classification_tags_and_qc(finished):
    _, metadata, _ = finished
    files = {f["name"]: f for f in metadata["analysis"]["files"]}
    assert {name: files[name]["type"] for name in ("pedseg_segmentation.dcm", "pedseg_report.pdf",
                                                   "pedseg_measurements.csv", "pedseg_measurements.json",
                                                   "pedseg_t2f.nii.gz")} == {
        "pedseg_segmentation.dcm": "dicom", "pedseg_report.pdf": "pdf", "pedseg_measurements.csv": "tabular data",
        "pedseg_measurements.json": "source code", "pedseg_t2f.nii.gz": "nifti"}
    assert files["pedseg_t2f.nii.gz"]["modality"] == "MR"
    assert files["pedseg_t2f.nii.gz"]["classification"] == {"Intent": ["Structural"], "Measurement": ["T2"]}
    assert all(f["tags"] == ["pedseg"] for f in files.values())
    qc = files["pedseg_report.pdf"]["info"]["qc"]["pedseg-brain-tumor"]
    assert qc["segmentation"]["state"] == "FAIL"
    assert qc["segmentation"]["flags"]  # a QC flag asks for review
    assert qc["job_info"]["job_id"] == "65f0c0ffee0000000000dddd"


def test_metadata_and_log_hold_no_phi_nor_api_key(finished):
    root, _, log_text = finished
    assert_no_phi((root / "output" / ".metadata.json").read_text())
    assert_no_phi(log_text)
    assert "NaN" not in (root / "output" / ".metadata.json").read_text()


def test_qc_passes_without_flags_and_lands_on_the_table_without_pdf(tmp_path, monkeypatch):
    def run_without_flags(input_path, outdir, config, store=None):
        result = fake_result(Path(outdir), config)
        for key in ("pdf", "pdf_dicom"):
            result.outputs.pop(key).unlink()
        return dataclasses.replace(result, measurements=dataclasses.replace(result.measurements, qc_flags=[]))

    monkeypatch.setattr("pedseg.runner.run_pipeline", run_without_flags)
    assert run_gear(write_gear_root(tmp_path)) == 0
    files = json.loads((tmp_path / "output" / ".metadata.json").read_text())["analysis"]["files"]
    (qc_file,) = [f for f in files if f["info"].get("qc")]
    assert qc_file["name"] == "pedseg_measurements.json"
    assert qc_file["info"]["qc"]["pedseg-brain-tumor"]["segmentation"]["state"] == "PASS"


def test_idempotency_key_ignores_role_order_but_not_the_weights(tmp_path):
    provenance = fake_result(tmp_path, PipelineConfig()).provenance
    reordered = dataclasses.replace(provenance, series_instance_uids=dict(reversed(UIDS.items())))
    retrained = dataclasses.replace(provenance, bundle=dataclasses.replace(provenance.bundle, sha256="cd" * 32))
    assert idempotency_key(provenance) == idempotency_key(reordered) != idempotency_key(retrained)
    assert re.fullmatch(r"[0-9a-f]{64}", idempotency_key(provenance))


# ---------------------------------------------------------------------------------- model_bundle input


def _bundle_zip(path: Path, folder: str | None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        if folder is not None:
            zf.writestr(f"{folder}/bundle.json", "{}")
            zf.writestr(f"{folder}/models/m/plans.json", "{}")
        else:
            zf.writestr("README.txt", "no bundle here")
    return path


def test_bundle_zip_is_unpacked_and_the_bundle_folder_found(tmp_path, pipeline_calls):
    root = write_gear_root(tmp_path / "gear", bundle_zip=_bundle_zip(tmp_path / "my-bundle.zip", "export/pedseg-x"))
    assert run_gear(root) == 0
    assert pipeline_calls[0]["config"].bundle == root / "work" / "bundle" / "export" / "pedseg-x"
    assert run_gear(root) == 0  # a local re-run in the same gear folder


def test_bundle_zip_without_bundle_json_is_a_bundle_error(tmp_path, pipeline_calls):
    root = write_gear_root(tmp_path / "gear", bundle_zip=_bundle_zip(tmp_path / "empty.zip", None))
    assert run_gear(root) == BundleError.exit_code == 6
    assert json.loads((root / "output" / "error.json").read_text())["error"] == "bad_bundle"
    assert not pipeline_calls


def test_unsafe_bundle_zip_is_refused(tmp_path, pipeline_calls):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape/bundle.json", "{}")
    assert run_gear(write_gear_root(tmp_path / "gear", bundle_zip=evil)) == 2
    assert not (tmp_path / "escape").exists()
    assert not pipeline_calls


# --------------------------------------------------------------------------------------- session mode
# A fake Flywheel SDK at the SDK boundary: the same method names the gear calls, a session tree in memory.

ANALYSIS_ID = "65f0c0ffee0000000000cccc"  # write_gear_root's destination
SESSION_ID = "65f0c0ffee0000000000eeee"
SUBJECT_ID = "65f0c0ffee0000000000ffff"  # the session's Flywheel subject: the subject key in session mode
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
# Scanner values as a Siemens writes them: number, description, TR, TE, TI, flip, sequence, variant, 2D/3D,
# contrast agent, minutes after the first series.
SEQUENCES = {
    "t1n": (2, "t1_mprage_sag_p2_iso", 2300, 2.3, 900, 8, "GR\\IR", "SK\\SP\\MP", "3D", "", 0),
    "t2w": (3, "t2_tse_tra", 5000, 98, None, 150, "SE", "SK\\SP\\OSP", "2D", "", 5),
    "t2f": (4, "t2_tirm_tra_dark-fluid", 9000, 85, 2500, 150, "SE\\IR", "SK\\SP\\MP", "2D", "", 10),
    "t1c": (5, "t1_mprage_sag_p2_iso_post", 2300, 2.3, 900, 8, "GR\\IR", "SK\\SP\\MP", "3D", "Gadovist", 20),
}
LOCALIZER = (1, "localizer", 8.6, 4.0, None, 20, "GR", "SP", "2D", "", -2)
DWI = (6, "ep2d_diff_3scan_trace", 5600, 89, None, 90, "EP", "SK\\SP", "2D", "", 15)


def series_zip(uid: str, values: tuple, image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND"),
               slices: int = 12) -> tuple[bytes, dict]:
    """A zipped series of tiny MR images, and the header dict Flywheel's metadata importer keeps of it."""
    number, description, tr, te, ti, flip, seq, variant, kind, agent, minutes = values
    buffer, first = io.BytesIO(), None
    with zipfile.ZipFile(buffer, "w") as zf:
        for k in range(slices):
            ds = dicom_dataset(pixels=np.zeros((4, 4)))
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.InstitutionName = SENTINELS
            ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", STUDY_UID, uid, number
            ds.SeriesDescription = ds.ProtocolName = description
            ds.ImageType = list(image_type)
            ds.ScanningSequence, ds.SequenceVariant = seq.split("\\"), variant.split("\\")
            ds.MRAcquisitionType, ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = kind, tr, te, flip
            if ti is not None:
                ds.InversionTime = ti
            if agent:
                ds.ContrastBolusAgent = agent
            ds.AcquisitionTime = f"10{20 + minutes:02d}00.000000"
            ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [0.0, 0.0, 5.0 * k]
            ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness = [1, 0, 0, 0, 1, 0], [1.0, 1.0], 5.0
            file = io.BytesIO()
            pydicom.dcmwrite(file, ds, enforce_file_format=True)
            zf.writestr(f"{uid}/{k + 1:03d}.dcm", file.getvalue())
            first = first or ds
    return buffer.getvalue(), importer_header(first)


def importer_header(ds: Dataset) -> dict:
    """`file.info.header.dicom` as the metadata importer writes it: keywords, JSON values, lists for multi-values."""
    header = {}
    for element in ds:
        if element.VR in ("OB", "OW", "SQ") or not element.keyword:
            continue
        value = element.value
        if element.VM > 1:
            header[element.keyword] = [v if isinstance(v, (int, float)) else str(v) for v in value]
        else:
            header[element.keyword] = value if isinstance(value, (int, float)) else str(value)
    return header


def flywheel_session(roles=tuple(SEQUENCES), *, header_info: bool = True, **session_kwargs) -> FakeSession:
    """The analysed session: the four sequences (or `roles` of them), a localizer and a DWI, each one Flywheel
    acquisition. The T2-FLAIR's file has no header information, as before the metadata importer has run."""
    downloads: list[str] = []
    acquisitions = []
    series = [(f"{role}.dicom.zip", UIDS[role], SEQUENCES[role], ("ORIGINAL", "PRIMARY", "M", "ND")) for role in roles]
    series += [("localizer.dicom.zip", "1.2.826.0.1.3680043.8.498.91", LOCALIZER, ("ORIGINAL", "PRIMARY", "M", "ND")),
               ("dwi.dicom.zip", "1.2.826.0.1.3680043.8.498.92", DWI, ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"))]
    for name, uid, values, image_type in series:
        data, header = series_zip(uid, values, image_type)
        info = {"header": {"dicom": header}} if header_info and name != "t2f.dicom.zip" else {}
        acquisitions.append(FakeAcquisition({name: ("dicom", data, info), name.replace(".dicom.zip", ".nii.gz"):
                                             ("nifti", b"not DICOM", {})}, downloads))
    session = FakeSession(SESSION_ID, SUBJECT_ID, acquisitions, **session_kwargs)
    session.downloads = downloads
    return session


def fake_client(session: FakeSession, parent_type: str = "session", others: tuple[FakeSession, ...] = ()):
    """The SDK as this job sees it: its analysis (under `parent_type`), the session, the subject's other sessions."""
    return FakeClient([session, *others], analyses=[FakeAnalysis(ANALYSIS_ID, parent=(parent_type, SESSION_ID))])


@pytest.fixture
def fw(tmp_path, monkeypatch, pipeline_calls, caplog):
    """Session mode: a gear folder with the api-key and no 'dicom' input, the fake SDK behind it, a tiny bundle,
    and a fake pipeline whose provenance holds the real bundle hash (so keys match as in a real run)."""
    caplog.set_level(logging.INFO)
    bundle = fake_bundle(tmp_path / "bundle")
    monkeypatch.setenv("PEDSEG_BUNDLE", str(bundle))

    def fake_run_session(session, workspace, config, store=None, *, bundle=None, clock=None):
        pipeline_calls.append({"input": session.root, "outdir": workspace.outdir, "config": config, "store": store,
                               "series": len(session.series)})
        return with_bundle_hash(fake_result(workspace.outdir, config), bundle.sha256)

    monkeypatch.setattr("pedseg.runner.run_session", fake_run_session)
    world = SimpleNamespace(client=None, root=tmp_path / "gear", bundle=bundle,
                            key=series_key(UIDS, load_bundle(bundle).sha256))

    def client_for(api_key):
        world.client.api_keys.append(api_key)
        return world.client

    monkeypatch.setattr("pedseg.gear.session._client", client_for)

    def run(session: FakeSession, config: dict | None = None, others: tuple[FakeSession, ...] = (),
            edited_seg: Path | None = None) -> int:
        world.client = fake_client(session, others=others)
        shutil.rmtree(world.root / "output", ignore_errors=True)  # each job gets a fresh output folder
        shutil.rmtree(world.root / "input", ignore_errors=True)
        return run_gear(write_gear_root(world.root, config, dicom=False, api_key=True, edited_seg=edited_seg))

    world.run = run
    return world


def test_session_mode_downloads_only_candidate_series(fw, pipeline_calls, caplog):
    session = flywheel_session()
    assert fw.run(session) == 0
    # The localizer and the DWI are ruled out by their Flywheel headers; the FLAIR has none, so it is fetched.
    assert sorted(session.downloads) == ["t1c.dicom.zip", "t1n.dicom.zip", "t2f.dicom.zip", "t2w.dicom.zip"]
    assert "series 1 'localizer' (description matches 'LOCALIZER'" in caplog.text
    assert "series 6 'ep2d_diff_3scan_trace' (ImageType DIFFUSION" in caplog.text
    assert "4 DICOM files downloaded (1 without Flywheel header information)" in caplog.text
    (call,) = pipeline_calls
    assert call["input"] == fw.root / "work" / "session"  # the downloaded series, read once
    assert call["series"] == 4
    assert call["outdir"] == fw.root / "output"
    assert fw.client.api_keys == [API_KEY]
    assert_no_phi(caplog.text)


def test_session_results_land_in_session_info_without_touching_other_keys(fw):
    other = {"clinical": {"site": "A", "visit": 2}, "mriqc": {"snr": 11.5}}
    timepoints = [{"study_uid": "1.2.3", "bundle": {"sha256": "cd" * 32}}]  # the measurement store's entries
    session = flywheel_session(info={**other, "pedseg": {"idempotency_key": "0" * 64, "timepoints": timepoints}},
                               tags=["reviewed"])
    assert fw.run(session) == 0
    assert session.info_updates == 1
    assert {k: session.info[k] for k in other} == other  # merged, never replaced
    summary = session.info["pedseg"]
    assert summary.pop("timepoints") == timepoints
    assert summary["idempotency_key"] == fw.key
    assert summary["volumes_ml"]["WT"] == pytest.approx(14.515)
    assert summary["series_numbers"]["t1c"] == 3
    assert session.tags == ["reviewed", "pedseg"]
    metadata = json.loads((fw.root / "output" / ".metadata.json").read_text())
    assert metadata["analysis"]["info"]["pedseg"] == summary
    assert_no_phi(json.dumps(session.info))


def test_session_mode_tracks_the_run_under_the_flywheel_subject(fw, pipeline_calls, monkeypatch, tmp_path):
    """The gear hands run_pipeline a FlywheelStore recording into the session, keyed by the session's subject id.
    Used here as the runner uses it (history, then record) against the fake SDK: earlier time points come from
    the subject's other sessions (info.pedseg.timepoints, and an older analysis' measurements file), and the
    time point recorded survives the summary written after the run."""
    bundle = dataclasses.replace(fake_result(tmp_path / "x", PipelineConfig()).provenance.bundle,
                                 sha256=load_bundle(fw.bundle).sha256).as_dict()
    measurements = fake_result(tmp_path / "y", PipelineConfig()).measurements
    document = write_measurements_json(measurements, tmp_path / "old.json", context={
        "study_instance_uid": "1.2.3.1", "study_date": "20250105", "bundle": bundle}).read_bytes()
    files = {MEASUREMENTS_FILE: document, "pedseg_report.pdf": b""}
    older = FakeSession("s-older", SUBJECT_ID, analyses=[FakeAnalysis("a-older", files=files)])
    earlier_tp = time_point(measurements, subject_key=SUBJECT_ID, study_uid="1.2.3.2", study_date="20250706",
                            bundle=bundle)
    earlier = FakeSession("s-earlier", SUBJECT_ID, info={"pedseg": {"timepoints": [to_dict(earlier_tp)]}})
    seen = {}

    def tracking_pipeline(session, workspace, config, store=None, *, bundle=None, clock=None):
        result = with_bundle_hash(fake_result(workspace.outdir, config), bundle.sha256)
        current = time_point(result.measurements, subject_key=config.subject_key, study_uid=STUDY_UID,
                             study_date="20260105", bundle=result.provenance.bundle.as_dict())
        seen.update(store=store, config=config, timeline=compare(current, store.history(config.subject_key)))
        store.record(current)
        return result

    monkeypatch.setattr("pedseg.runner.run_session", tracking_pipeline)
    session = flywheel_session(info={"clinical": {"site": "A"}})
    assert fw.run(session, others=(older, earlier)) == 0
    assert isinstance(seen["store"], FlywheelStore)
    assert seen["store"].session_id == SESSION_ID
    assert seen["config"].subject_key == SUBJECT_ID
    assert [tp.study_uid for tp in seen["timeline"].priors] == ["1.2.3.1", "1.2.3.2"]
    namespace = session.info["pedseg"]
    (recorded,) = namespace.pop("timepoints")
    assert (recorded["subject_key"], recorded["study_uid"]) == (SUBJECT_ID, STUDY_UID)
    assert recorded["study_date"] == "20260105"
    assert namespace["idempotency_key"] == fw.key
    assert session.info["clinical"] == {"site": "A"}
    assert session.info_updates == 2  # the store's time point, then the summary merged beside it
    assert older.info == {}
    assert earlier.info["pedseg"]["timepoints"] == [to_dict(earlier_tp)]  # only read


def test_session_without_a_subject_runs_untracked(fw, pipeline_calls, caplog):
    session = flywheel_session()
    session.parents.subject = None
    assert fw.run(session) == 0
    assert pipeline_calls[-1]["store"] is None
    assert pipeline_calls[-1]["config"].subject_key is None
    assert "longitudinal tracking off: the session belongs to no Flywheel subject" in caplog.text


def test_a_session_destination_opens_the_store_of_that_session(tmp_path):
    job = gear_context.load_job(write_gear_root(tmp_path, dicom=False, api_key=True))
    job = dataclasses.replace(job, destination={"type": "session", "id": SESSION_ID})
    store, subject_id = open_session(job, client=fake_client(flywheel_session())).measurement_store()
    assert (store.session_id, subject_id) == (SESSION_ID, SUBJECT_ID)


def test_rerun_with_the_same_series_and_bundle_is_skipped(fw, pipeline_calls, caplog):
    session = flywheel_session()
    assert fw.run(session) == 0
    caplog.clear()
    assert fw.run(session) == 0  # e.g. a gear rule firing again when a file is added
    assert len(pipeline_calls) == 1
    assert session.info_updates == 1
    assert not list((fw.root / "output").iterdir())  # nothing for the engine to upload
    assert "the session (info.pedseg) already holds the pedseg result" in caplog.text
    assert "force_rerun=true" in caplog.text


def test_earlier_pedseg_analysis_with_the_same_key_is_found(fw, pipeline_calls, caplog):
    others = [FakeAnalysis("a-other-gear", "mriqc", {"pedseg": {"idempotency_key": fw.key}}),
              FakeAnalysis("a-old-bundle", "pedseg-brain-tumor", {"pedseg": {"idempotency_key": "1" * 64}})]
    assert fw.run(flywheel_session(analyses=others)) == 0
    assert len(pipeline_calls) == 1  # neither counts
    earlier = FakeAnalysis("a-earlier", "pedseg-brain-tumor", {"pedseg": {"idempotency_key": fw.key}})
    assert fw.run(flywheel_session(analyses=[*others, earlier])) == 0
    assert len(pipeline_calls) == 1
    assert "analysis a-earlier already holds" in caplog.text


def test_other_model_weights_run_again(fw, pipeline_calls):
    session = flywheel_session()
    assert fw.run(session) == 0
    fake_bundle(fw.root.parent / "retrained", weights=b"retrained weights")
    shutil.copytree(fw.root.parent / "retrained", fw.bundle, dirs_exist_ok=True)
    assert fw.run(session) == 0
    assert len(pipeline_calls) == 2
    assert session.info["pedseg"]["idempotency_key"] != fw.key


def test_force_rerun_runs_again(fw, pipeline_calls, caplog):
    session = flywheel_session(info={"pedseg": {"idempotency_key": fw.key}})
    assert fw.run(session, {"force_rerun": True}) == 0
    assert len(pipeline_calls) == 1
    assert session.info_updates == 1
    assert (fw.root / "output" / ".metadata.json").is_file()
    assert "force_rerun: running again although the session (info.pedseg) holds a result" in caplog.text


def test_two_missing_dicom_acquisitions_fail_naming_the_sequences(fw, pipeline_calls, caplog):
    session = flywheel_session(roles=("t1n", "t1c"), info={"clinical": {"site": "A"}})
    assert fw.run(session) == MissingSequenceError.exit_code == 3
    error = json.loads((fw.root / "output" / "error.json").read_text())
    assert error["error"] == "missing_sequence"
    assert "T2 (t2w)" in error["message"]
    assert "T2-FLAIR (t2f)" in error["message"]
    assert "exit code 3" in caplog.text
    assert "T2-FLAIR (t2f)" in caplog.text
    assert not pipeline_calls
    assert session.info == {"clinical": {"site": "A"}}
    assert not session.tags
    assert_no_phi(caplog.text + json.dumps(error))


def test_session_of_only_non_candidates_is_a_missing_sequence(fw, pipeline_calls):
    assert fw.run(flywheel_session(roles=())) == 3
    message = json.loads((fw.root / "output" / "error.json").read_text())["message"]
    assert "series 1 'localizer'" in message
    assert "series 6 'ep2d_diff_3scan_trace'" in message
    assert not pipeline_calls


def test_session_without_dicom_files_is_a_bad_input(fw, pipeline_calls):
    assert fw.run(FakeSession(SESSION_ID, SUBJECT_ID, [FakeAcquisition({"t1.nii.gz": ("nifti", b"x", {})})])) == 2
    assert "no DICOM files" in json.loads((fw.root / "output" / "error.json").read_text())["message"]


def test_session_mode_needs_a_session_level_analysis(tmp_path):
    job = gear_context.load_job(write_gear_root(tmp_path, dicom=False, api_key=True))
    with pytest.raises(InputError, match="subject analysis"):
        open_session(job, client=fake_client(flywheel_session(), parent_type="subject"))


def test_single_dicom_files_are_downloaded_as_they_are(tmp_path):
    data, _ = series_zip(UIDS["t1n"], SEQUENCES["t1n"], slices=1)
    single = zipfile.ZipFile(io.BytesIO(data)).read(f"{UIDS['t1n']}/001.dcm")
    session = FakeSession(SESSION_ID, SUBJECT_ID, [FakeAcquisition({"image.dcm": ("dicom", single, {})})])
    folder = FlywheelSession(session, analysis_id=None).download_candidates(tmp_path / "session")
    assert [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()] == ["0001/image.dcm"]


def test_api_key_never_shows_in_the_job_repr(tmp_path):
    job = gear_context.load_job(write_gear_root(tmp_path, api_key=True))
    assert job.api_key == API_KEY
    assert API_KEY not in repr(job)


# ------------------------------------------------------------------------- candidates from Flywheel headers


@pytest.mark.parametrize("values, image_type, reason", [
    (LOCALIZER, ("ORIGINAL", "PRIMARY", "M"), "localizer / scout"),
    (DWI, ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"), "diffusion image or map"),
    (SEQUENCES["t1n"], ("DERIVED", "SECONDARY", "MPR"), "derived / secondary image"),
    (SEQUENCES["t1n"], ("ORIGINAL", "PRIMARY", "P", "ND"), "phase / real / imaginary image"),
])
def test_obvious_non_candidates_are_rejected_by_the_pipeline_rules(values, image_type, reason):
    _, header = series_zip("1.2.3.4", values, image_type, slices=1)
    assert any(reason in r for r in rejection_reasons(flywheel_header(header)))


def test_the_four_sequences_pass_even_from_a_single_header():
    for role, values in SEQUENCES.items():
        _, header = series_zip(UIDS[role], values, slices=1)  # one image: counting rules must not apply
        assert rejection_reasons(flywheel_header(header)) == [], role


def test_importer_header_forms_are_read_alike():
    listed = {"SeriesInstanceUID": "1.2.3", "Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY", "M"],
              "ScanningSequence": ["SE", "IR"], "RepetitionTime": 9000, "InversionTime": "2500", "SeriesNumber": "4"}
    joined = {**listed, "ImageType": "ORIGINAL\\PRIMARY\\M", "ScanningSequence": "SE\\IR", "RepetitionTime": "9000.0"}
    assert flywheel_header(listed) == flywheel_header(joined)
    header = flywheel_header(listed)
    assert (header.scanning_sequence, header.inversion_time, header.series_number) == (("SE", "IR"), 2500.0, 4)
    assert flywheel_header({"Modality": "CT"}) is None
    assert flywheel_header(None) is None
    assert rejection_reasons(flywheel_header({"SeriesInstanceUID": "1.2.3", "Modality": "CT"})) == [
        "modality CT: not an MR series"]


# ------------------------------------------------------------------------- edited_seg input: the review path
# One real run (the runner and every writer; preprocessing and inference replaced, as in test_review) is shared by
# these tests: the fake pipeline copies its output folder into the job's, so the review reads real measurements,
# SR and SEG. The "reader" cuts the oedema back to the tumour core's slices and saves a SEG (pedseg's own writer,
# segments coded as pedseg codes them; test_review covers Slicer/dcmqi and highdicom SEGs).


@pytest.fixture(scope="module")
def automatic_run(tmp_path_factory):
    import SimpleITK as sitk

    from pedseg.reporting.dicom_seg import write_seg

    from factories import fake_pipeline_run

    tmp = tmp_path_factory.mktemp("automatic")
    result, dicom = fake_pipeline_run(tmp)
    labels = sitk.ReadImage(str(tmp / "labels.nii.gz"))
    arr = sitk.GetArrayFromImage(labels)
    arr[26:][arr[26:] == 4] = 0  # z >= 26: below the core, oedema only
    edited = sitk.GetImageFromArray(arr)
    edited.CopyInformation(labels)
    t1c = sorted((dicom / "t1c").rglob("*.dcm")) or sorted(p for p in (dicom / "t1c").rglob("*") if p.is_file())
    seg = write_seg(edited, t1c, tmp / "edited.dcm", algorithm_name="Reader", algorithm_version="1")
    return SimpleNamespace(result=result, seg=seg, other_seg=result.outputs["seg"], tmp=tmp)


def _copied_result(run, outdir: Path, **provenance_changes) -> RunResult:
    """The shared run's outputs copied into `outdir`, as a RunResult there."""
    shutil.copytree(run.result.outdir, outdir, dirs_exist_ok=True)
    outputs = {key: outdir / path.relative_to(run.result.outdir) for key, path in run.result.outputs.items()}
    provenance = dataclasses.replace(run.result.provenance, **provenance_changes)
    return dataclasses.replace(run.result, outdir=outdir, outputs=outputs, provenance=provenance)


@pytest.fixture
def reviewing(monkeypatch, automatic_run):
    """run_pipeline replaced by the shared real run; each call recorded."""
    calls = []

    def fake_run_pipeline(input_path, outdir, config, store=None):
        calls.append({"input": Path(input_path), "outdir": Path(outdir)})
        return _copied_result(automatic_run, Path(outdir))

    monkeypatch.setattr("pedseg.runner.run_pipeline", fake_run_pipeline)
    monkeypatch.delenv("PEDSEG_BUNDLE", raising=False)
    return calls


def test_an_edited_seg_input_adds_reviewed_outputs_and_the_metadata_holds_the_reviewed_volumes(
        tmp_path, reviewing, automatic_run, caplog):
    caplog.set_level(logging.INFO)
    root = write_gear_root(tmp_path, edited_seg=automatic_run.seg)
    assert run_gear(root) == 0
    output = root / "output"
    names = {p.name for p in output.iterdir()} - {".metadata.json"}
    assert not [p for p in output.iterdir() if p.is_dir()]  # review/ flattened too
    assert {"pedseg_reviewed_measurements.json", "pedseg_reviewed_measurements.csv",
            "pedseg_reviewed_measurements_sr.dcm", "pedseg_reviewed_report.pdf",
            "pedseg_measurements.json", "pedseg_measurements_sr.dcm", "pedseg_segmentation.dcm"} <= names
    reviewed = json.loads((output / "pedseg_reviewed_measurements.json").read_text())
    automatic = json.loads((output / "pedseg_measurements.json").read_text())
    assert reviewed["regions"]["ED"]["volume_ml"] < automatic["regions"]["ED"]["volume_ml"]  # the edit shows
    # The reviewed SR revises the automatic SR that this job uploads.
    sr = pydicom.dcmread(output / "pedseg_reviewed_measurements_sr.dcm")
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == pydicom.dcmread(output / "pedseg_measurements_sr.dcm").SOPInstanceUID
    assert "reviewed" in sr.SeriesDescription

    metadata = json.loads((output / ".metadata.json").read_text())
    jsonschema.Draft7Validator(ENGINE_METADATA_SCHEMA).validate(metadata)
    summary = metadata["analysis"]["info"]["pedseg"]
    assert summary["reviewed"] is True
    assert summary["volumes_ml"] == {name: region["volume_ml"] for name, region in reviewed["regions"].items()}
    assert summary["automatic"]["volumes_ml"] == pytest.approx(
        {name: region["volume_ml"] for name, region in automatic["regions"].items()}, abs=1e-3)
    edited_sha = hashlib.sha256(automatic_run.seg.read_bytes()).hexdigest()
    assert summary["edited_seg_sha256"] == edited_sha
    provenance = automatic_run.result.provenance
    assert summary["idempotency_key"] == series_key(provenance.series_instance_uids, provenance.bundle.sha256,
                                                    edited_sha) != idempotency_key(provenance)
    files = {f["name"]: f for f in metadata["analysis"]["files"]}
    assert set(files) == names
    assert files["pedseg_reviewed_report.pdf"]["tags"] == ["pedseg", "reviewed"]
    assert files["pedseg_report.pdf"]["tags"] == ["pedseg"]
    qc = files["pedseg_reviewed_report.pdf"]["info"]["qc"]["pedseg-brain-tumor"]["segmentation"]
    assert qc["reviewed"] is True
    assert qc["whole_tumour_ml"] == reviewed["regions"]["WT"]["volume_ml"]
    assert qc["automatic_whole_tumour_ml"] == summary["automatic"]["volumes_ml"]["WT"]
    assert "qc" not in files["pedseg_report.pdf"]["info"]
    assert "reviewed (automatic" in caplog.text
    assert_no_phi(caplog.text)
    assert_no_phi((output / ".metadata.json").read_text())


def test_an_edited_seg_zip_holding_the_seg_is_reviewed_alike(tmp_path, reviewing, automatic_run):
    archive = tmp_path / "seg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(automatic_run.seg, "export/1-1.dcm")
    root = write_gear_root(tmp_path / "gear", edited_seg=archive)
    assert run_gear(root) == 0
    summary = json.loads((root / "output" / ".metadata.json").read_text())["analysis"]["info"]["pedseg"]
    assert summary["edited_seg_sha256"] == hashlib.sha256(automatic_run.seg.read_bytes()).hexdigest()


def _not_dicom(tmp: Path, run) -> Path:
    return Path(shutil.copy(__file__, tmp / "notes.dcm"))


def _mr_image(tmp: Path, run) -> Path:
    return next(p for p in (run.tmp / "dicom" / "t1c").rglob("*") if p.is_file())


def _unknown_segment(tmp: Path, run) -> Path:
    ds = pydicom.dcmread(run.seg)
    ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue = "10200004"  # Liver
    ds.SegmentSequence[0].SegmentLabel = "Liver"
    ds.save_as(tmp / "liver.dcm")
    return tmp / "liver.dcm"


def _mangled_seg(tmp: Path, run) -> Path:
    ds = pydicom.dcmread(run.seg)
    del ds.SegmentSequence
    ds.save_as(tmp / "mangled.dcm")
    return tmp / "mangled.dcm"


def _two_files_zip(tmp: Path, run) -> Path:
    with zipfile.ZipFile(tmp / "two.zip", "w") as zf:
        zf.write(run.seg, "a.dcm")
        zf.write(run.other_seg, "b.dcm")
    return tmp / "two.zip"


@pytest.mark.parametrize(("make", "says"), [
    (_not_dicom, "edited_seg.dcm cannot be read as DICOM"),
    (_mr_image, "edited_seg.dcm is not a DICOM Segmentation (modality MR)"),
    (_unknown_segment, "edited_seg.dcm: segment 1 'Liver' is not a tumour region pedseg knows"),
    (_mangled_seg, "edited_seg.dcm is a DICOM Segmentation that cannot be read"),
    (_two_files_zip, "The edited_seg archive holds 2 files"),
])
def test_a_malformed_edited_seg_stops_the_job_before_the_run_with_exit_code_2(tmp_path, reviewing, automatic_run,
                                                                               caplog, make, says):
    root = write_gear_root(tmp_path / "gear", edited_seg=make(tmp_path, automatic_run))
    assert run_gear(root) == InputError.exit_code == 2
    error = json.loads((root / "output" / "error.json").read_text())
    assert error["error"] == "bad_input"
    assert says in error["message"]
    assert error["hint"]
    assert not reviewing  # refused before the (long) run
    assert not (root / "output" / ".metadata.json").exists()
    assert_no_phi(json.dumps(error))  # the input's own name (after the patient) is never quoted
    assert_no_phi(caplog.text)


def test_an_edited_seg_of_another_study_fails_after_the_run_with_exit_code_2(tmp_path, reviewing, automatic_run):
    ds = pydicom.dcmread(automatic_run.seg)
    ds.StudyInstanceUID = generate_uid()
    ds.save_as(tmp_path / "other-study.dcm")
    root = write_gear_root(tmp_path / "gear", edited_seg=tmp_path / "other-study.dcm")
    assert run_gear(root) == 2
    assert "belongs to another study" in json.loads((root / "output" / "error.json").read_text())["message"]
    assert not (root / "output" / ".metadata.json").exists()


def test_the_edited_seg_input_is_read_from_config_json(tmp_path, automatic_run):
    job = gear_context.load_job(write_gear_root(tmp_path, edited_seg=automatic_run.seg))
    assert job.edited_seg == tmp_path / "input" / "edited_seg" / f"{SENTINELS[0]}_edited.dcm"
    assert gear_context.load_job(write_gear_root(tmp_path / "plain")).edited_seg is None
    listed_not_there = write_gear_root(tmp_path / "missing", edited_seg=automatic_run.seg)
    for path in (listed_not_there / "input" / "edited_seg").iterdir():
        path.unlink()
    with pytest.raises(InputError, match="'edited_seg' input file is listed"):
        gear_context.load_job(listed_not_there)


def test_the_edited_seg_joins_the_idempotency_key():
    plain = series_key(UIDS, BUNDLE_SHA)
    assert plain == series_key(UIDS, BUNDLE_SHA, "")  # keys of earlier runs stay what they were
    assert len({plain, series_key(UIDS, BUNDLE_SHA, "1" * 64), series_key(UIDS, BUNDLE_SHA, "2" * 64)}) == 3


@pytest.fixture
def fw_review(fw, monkeypatch, automatic_run, pipeline_calls):
    """Session mode over the shared real run: its provenance given the fake session's series and the bundle's
    hash (so keys match as in a real run), and its time point recorded in the Flywheel store as the runner
    records it."""
    def reviewing_session(session, workspace, config, store=None, *, bundle=None, clock=None):
        pipeline_calls.append({"outdir": workspace.outdir, "store": store, "config": config})
        result = _copied_result(automatic_run, workspace.outdir, series_instance_uids=dict(UIDS),
                                bundle=dataclasses.replace(automatic_run.result.provenance.bundle,
                                                           sha256=bundle.sha256))
        if store is not None:
            store.record(time_point(result.measurements, subject_key=config.subject_key,
                                    study_uid=result.provenance.study_instance_uid, study_date="20260105",
                                    bundle=result.provenance.bundle.as_dict()))
        return result

    monkeypatch.setattr("pedseg.runner.run_session", reviewing_session)
    return fw


def test_session_mode_records_the_reviewed_volumes_beside_the_automatic_ones(fw_review, pipeline_calls,
                                                                             automatic_run):
    session = flywheel_session(info={"clinical": {"site": "A"}})
    assert fw_review.run(session, edited_seg=automatic_run.seg) == 0
    namespace = session.info["pedseg"]
    reviewed = json.loads((fw_review.root / "output" / "pedseg_reviewed_measurements.json").read_text())
    (recorded,) = namespace["timepoints"]
    assert recorded["reviewed_volumes_ml"] == {name: r["volume_ml"] for name, r in reviewed["regions"].items()}
    assert recorded["volumes_ml"]["ED"] > recorded["reviewed_volumes_ml"]["ED"]
    assert namespace["reviewed"] is True
    assert namespace["volumes_ml"] == recorded["reviewed_volumes_ml"]
    assert session.info["clinical"] == {"site": "A"}


def test_a_review_reruns_for_another_edited_seg_but_not_for_the_same_one(fw_review, pipeline_calls, automatic_run,
                                                                         caplog):
    session = flywheel_session()
    assert fw_review.run(session) == 0  # the automatic run
    assert fw_review.run(session) == 0  # skipped: same series and weights
    assert len(pipeline_calls) == 1
    assert fw_review.run(session, edited_seg=automatic_run.seg) == 0  # a review is not the automatic run
    assert len(pipeline_calls) == 2
    first_review_key = session.info["pedseg"]["idempotency_key"]
    caplog.clear()
    assert fw_review.run(session, edited_seg=automatic_run.seg) == 0  # the same edited SEG again: skipped
    assert len(pipeline_calls) == 2
    assert "already holds the pedseg result" in caplog.text
    assert fw_review.run(session, edited_seg=automatic_run.other_seg) == 0  # another edited SEG: reviewed
    assert len(pipeline_calls) == 3
    assert session.info["pedseg"]["idempotency_key"] not in (first_review_key, fw_review.key)


# ------------------------------------------------------------------------------------------ local runs


def test_local_run_lays_out_a_gear_folder_the_gear_runs(tmp_path, pipeline_calls):
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    sentinel_dicom_zip(tmp_path / "s.zip")
    zipfile.ZipFile(tmp_path / "s.zip").extractall(dicom)
    root = make_gear_root(dicom, tmp_path / "gear", {"fast": "true", "label_convention": "2023"})
    config_json = json.loads((root / "config.json").read_text())
    assert config_json["config"]["fast"] is True
    assert config_json["config"]["label_convention"] == "2023"
    assert config_json["config"]["write_pdf"] is True  # manifest default
    assert zipfile.is_zipfile(config_json["inputs"]["dicom"]["location"]["path"])
    assert run_gear(root) == 0
    assert pipeline_calls[0]["config"].fast
    assert pipeline_calls[0]["config"].label_convention == "2023"


def test_local_run_lays_out_the_edited_seg_input(tmp_path, reviewing, automatic_run):
    dicom = tmp_path / "s.zip"
    sentinel_dicom_zip(dicom)
    root = make_gear_root(dicom, tmp_path / "gear", edited_seg=automatic_run.seg)
    assert gear_context.load_job(root).edited_seg == root / "input" / "edited_seg" / automatic_run.seg.name
    assert run_gear(root) == 0
    assert (root / "output" / "pedseg_reviewed_measurements_sr.dcm").is_file()


def test_local_run_rejects_unknown_and_mistyped_options(tmp_path):
    with pytest.raises(SystemExit, match="unknown config option"):
        make_gear_root(tmp_path, tmp_path / "gear", {"fsat": "true"})
    with pytest.raises(SystemExit, match="true or false"):
        make_gear_root(tmp_path, tmp_path / "gear", {"fast": "yes"})


# -------------------------------------------------------------------------------------------- manifest


def test_manifest_is_valid_for_flywheel():
    Manifest(REPO / "manifest.json").validate()  # fw-gear's schema plus its default and image-tag checks


def test_manifest_declares_the_gear_contract():
    m = MANIFEST
    assert (m["name"], m["version"], m["license"], m["command"]) == (
        "pedseg-brain-tumor", "0.1.0", "Apache-2.0", "python3 /flywheel/v0/run.py")
    assert m["custom"]["gear-builder"] == {"category": "analysis", "image": "pedseg/brain-tumor:0.1.0"}
    assert m["custom"]["flywheel"]["classification"] == {
        "function": ["Image Processing - Segmentation"], "modality": ["MR"], "organ": ["Brain"],
        "therapeutic_area": ["Oncology"], "species": ["Human"]}
    # The input contract, changed deliberately: 'edited_seg' (issue 17) brings a reader's edited SEG back.
    assert {k: v["base"] for k, v in m["inputs"].items()} == {"dicom": "file", "model_bundle": "file",
                                                              "edited_seg": "file", "api-key": "api-key"}
    assert m["inputs"]["dicom"]["optional"]
    assert m["inputs"]["model_bundle"]["optional"]
    assert m["inputs"]["edited_seg"]["optional"]
    assert m["inputs"]["edited_seg"]["type"] == {"enum": ["dicom", "archive"]}
    assert "pedseg_reviewed_" in m["inputs"]["edited_seg"]["description"]
    assert {"nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "OMP_NUM_THREADS"} <= set(m["environment"])
    assert m["source"].startswith("https://")
    assert m["url"].startswith("https://")  # placeholders until published
    assert "networking" in m["capabilities"]  # session mode talks to the Flywheel API


def test_dockerfile_sets_the_manifest_environment():
    """Flywheel runs the gear with the manifest's environment; a plain `docker run` with the image's ENV."""
    instructions = (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    env = dict(token.split("=", 1) for line in instructions if line.startswith("ENV ")
               for token in shlex.split(line)[1:])
    assert env == MANIFEST["environment"]


def test_dockerfile_contract():
    """CUDA base for NVIDIA hosts and a CPU variant, torch pinned as in constraints-cpu.txt, the default (CaPTk
    DeepMedic) and demo bundles baked in (and kept in the build context), /flywheel/v0 layout, a non-root user.
    Built where Docker runs; linted here."""
    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert args["VARIANT"] == "gpu"
    assert "FROM ${CUDA_IMAGE} AS base-gpu" in text
    assert "FROM ${PYTHON_IMAGE} AS base-cpu" in text
    assert "download.pytorch.org/whl/cpu" in text  # the CPU variant's torch has no CUDA libraries
    constraints = (REPO / "constraints-cpu.txt").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in constraints.split()
    for bundle, variable in (("captk-deepmedic-brats", "PEDSEG_BUNDLE"), ("pedseg-demo", "PEDSEG_DEMO_BUNDLE")):
        assert f"COPY bundles/{bundle} /opt/pedseg/bundles/{bundle}" in text
        assert MANIFEST["environment"][variable] == f"/opt/pedseg/bundles/{bundle}"
        assert f"!bundles/{bundle}" in (REPO / ".dockerignore").read_text().split()
    assert "WORKDIR /flywheel/v0" in text
    assert "manifest.json run.py ./" in text
    user = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert user
    assert not user[-1].startswith(("0", "root"))

