"""Hostile and messy input beyond the catalogue (tests/hostile/, one builder per case): an unwritable output
folder, an interrupted run, a damaged file in a series not used, unusual but valid series (checked at conversion
level), an enhanced multi-frame series missing a frame, an empty segmentation, running out of GPU memory, and the
README's troubleshooting table.

The session is tiny (16×16 images) and the model bundle has no weights, so every run stops before preprocessing.
"""
from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pypdf import PdfReader

import pedseg.runner as runner_module
import pedseg.workspace as workspace_module
from pedseg.cli.main import main
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.errors import InputError, error_classes
from pedseg.pipeline.identify import classify_session
from pedseg.pipeline.ingest import ingest
from pedseg.pipeline.model_output import EnsembleResult

from factories import fake_bundle, fake_model_stages, tiny_atlas_case
from hostile_support import (
    NUMBERS,
    PROTOCOLS,
    copy_session,
    edit_files,
    phi_found,
    raising,
    tiny_volume,
    write_role,
    write_session,
)

LABELS = {role: f"series {NUMBERS[role]} '{PROTOCOLS[role].description}'" for role in NUMBERS}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return write_session(tmp_path_factory.mktemp("template") / "dicom")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def run_cli(inputs, out: Path, bundle: Path, capsys, caplog) -> tuple[int, str, str]:
    with caplog.at_level(logging.DEBUG):
        code = main(["run", *map(str, inputs), str(out), "--bundle", str(bundle), "--device", "cpu"])
    return code, capsys.readouterr().err, caplog.text


def test_unwritable_output_folder_fails_before_any_work(tmp_path, template, bundle, monkeypatch, capsys, caplog):
    # Root ignores file modes, so the refusal is simulated where the runner first writes into OUTDIR.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(workspace_module.tempfile, "NamedTemporaryFile", refuse)
    code, stderr, log = run_cli([template], tmp_path / "out", bundle, capsys, caplog)
    assert code == InputError.exit_code
    assert "Cannot write to the output folder" in stderr
    assert "(Permission denied)" in stderr
    assert "Choose a writable output folder." in stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupted_run_leaves_nothing_behind(tmp_path, template, bundle, monkeypatch, capsys, caplog):
    monkeypatch.setattr(runner_module, "identify", raising(KeyboardInterrupt()))
    code, stderr, _ = run_cli([template], tmp_path / "out", bundle, capsys, caplog)
    assert code == 130
    assert "interrupted" in stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_a_damaged_file_in_a_series_not_used_is_left_out_with_a_warning(tmp_path, template, caplog):
    copy_session(template, tmp_path / "in")
    damaged = tmp_path / "in" / "dwi" / "IM00003.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        session = ingest(tmp_path / "in", tmp_path / "work")
    identification = classify_session(session)
    assert identification.missing == []
    assert f"{LABELS['dwi']}: 1 file(s) with missing or truncated pixel data left out" in caplog.text
    assert not phi_found(caplog.text)


# -------------------------------------------------------------------------------- unusual but valid series


def _j2k(ds: pydicom.Dataset, index: int) -> None:
    """Re-encode one image as JPEG 2000 lossless (GDCM through SimpleITK: pydicom has no encoder here)."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(f"{tmp}/j2k.dcm")
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG2000")
        writer.Execute(sitk.GetImageFromArray(ds.pixel_array))
        encoded = pydicom.dcmread(f"{tmp}/j2k.dcm")
    ds.PixelData = encoded.PixelData
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID


def _tilt(ds: pydicom.Dataset, index: int) -> None:
    """Gantry tilt: each slice 15° sheared along the column axis, as CT-style tilted stacks are."""
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y + index * 4.0 * np.tan(np.deg2rad(15)), z]
    ds.GantryDetectorTilt = 15


UNUSUAL = {
    # name: (volume, per-file change, expected NIfTI size, expected spacing)
    "jpeg2000": (tiny_volume("ax", (0.9, 0.9, 4.0)), _j2k, (16, 16, 12), (0.9, 0.9, 4.0)),
    "gantry_tilt": (tiny_volume("ax", (0.9, 0.9, 4.0)), _tilt, None, (0.9, 0.9, 4.0)),
    "non_square_pixels": (tiny_volume("ax", (0.6, 1.2, 4.0)), None, (16, 16, 12), (0.6, 1.2, 4.0)),
    "slices_8_mm": (tiny_volume("ax", (0.9, 0.9, 8.0)), None, (16, 16, 12), (0.9, 0.9, 8.0)),
    "huge_fov_480_mm": (tiny_volume("ax", (30.0, 30.0, 5.0)), None, (16, 16, 12), (30.0, 30.0, 5.0)),
}


@pytest.mark.parametrize("name", UNUSUAL)
def test_unusual_but_valid_series_convert_with_their_geometry(name, tmp_path, caplog):
    volume, change, size, spacing = UNUSUAL[name]
    folder = write_role(tmp_path / "in", "t2w", volumes=[volume])
    if change:
        edit_files(folder, change)
    series = ingest(tmp_path / "in", tmp_path / "work").series[0]
    assert series.header.num_images == 12
    with caplog.at_level(logging.INFO):
        image = sitk.ReadImage(str(convert_series(series, tmp_path / "nifti")))
    assert image.GetSpacing() == pytest.approx(spacing, abs=1e-3)
    if size:
        assert image.GetSize() == size
    else:  # dcm2niix's tilt-corrected volume is chosen: it grows along the sheared axis
        assert "using series3_Tilt_1.nii.gz" in caplog.text
        assert image.GetSize()[1] > 16


def test_enhanced_multiframe_series_missing_a_frame_is_refused_by_name(shared_data, tmp_path):
    folder = shared_data / "dicom" / "philips_t1_multiframe_and_classic" / "401_T1W_FFE_Sno_CS2"
    series = ingest(folder, tmp_path / "work").series[0]
    ds = pydicom.dcmread(series.files[0])
    del ds.PerFrameFunctionalGroupsSequence[5]  # slice positions come from the per-frame functional groups
    ds.save_as(tmp_path / "one_frame_less.dcm")
    with pytest.raises(InputError, match=r"series 401 'T1W_FFE_Sno_CS2' is incomplete: 1 slice\(s\) missing"):
        convert_series(replace(series, files=[tmp_path / "one_frame_less.dcm"]), tmp_path / "nifti")
    assert not (tmp_path / "nifti").exists() or not list((tmp_path / "nifti").iterdir())


# --------------------------------------------------------------------- after inference: empty segmentation


def test_no_tumour_found_gives_a_report_that_says_so_and_no_seg(tmp_path, template, monkeypatch, caplog):
    """An empty label map (the model found nothing): measurements, CSV, PDF saying so; no SEG, no SR."""
    from pedseg.reporting.pdf import NO_TUMOUR
    from pedseg.runner import run_pipeline

    fake_model_stages(monkeypatch, *tiny_atlas_case(tmp_path / "atlas"))
    with caplog.at_level(logging.INFO):
        result = run_pipeline(template, tmp_path / "out", PipelineConfig(bundle=fake_bundle(tmp_path / "bundle")))
    outputs = result.outputs
    assert {"seg", "sr"}.isdisjoint(outputs)
    assert {"measurements_json", "measurements_csv", "pdf"} <= set(outputs)
    assert json.loads(outputs["measurements_json"].read_text())["regions"]["WT"]["volume_ml"] == 0
    assert NO_TUMOUR in "".join(page.extract_text() for page in PdfReader(outputs["pdf"]).pages)
    assert "no tumour found: the report says so, and no DICOM SEG or SR" in caplog.text


# ------------------------------------------------------------------------------ out of GPU memory: CPU


def test_out_of_gpu_memory_falls_back_to_cpu_and_says_so(tmp_path, monkeypatch, caplog):
    ensemble = pytest.importorskip("pedseg.pipeline.ensemble")  # the ensemble runner infer hands the predictors to
    import torch

    import pedseg.pipeline.infer as infer_module
    from pedseg.pipeline.bundle import load_bundle
    from pedseg.pipeline.types import Preprocessed

    devices = []

    def run_ensemble(image, spacing_zyx, members, device, tta, execution=None):
        devices.append(device.type)
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        probabilities = np.zeros((5, *image.shape[1:]), np.float32)
        probabilities[0] = 1
        return EnsembleResult(probabilities=probabilities, labels=np.zeros(image.shape[1:], np.uint8),
                                       channel_labels=((0,), (1,), (2,), (3,), (4,)), has_regions=False,
                                       preprocessing_runs=1, model_seconds={})

    monkeypatch.setattr(ensemble, "run_ensemble", run_ensemble)
    monkeypatch.setattr(infer_module, "pick_device", lambda requested: torch.device("cuda"))
    images = {}
    for role in ("t1n", "t1c", "t2w", "t2f"):
        images[role] = tmp_path / f"{role}.nii.gz"
        sitk.WriteImage(tiny_volume(), str(images[role]))
    pre = Preprocessed(images=images, brain_mask=images["t1c"], native=images, atlas_to_native={})
    bundle = load_bundle(fake_bundle(tmp_path / "bundle"))
    with caplog.at_level(logging.WARNING):
        prediction = infer_module.infer(pre, bundle, tmp_path, PipelineConfig(device="auto", threads=1))
    assert devices == ["cuda", "cpu"]
    assert prediction.device == "cpu"  # provenance.json records the device
    assert "out of GPU memory" in caplog.text
    assert "on the CPU instead" in caplog.text


# ------------------------------------------------------------------------------------------ documentation


def test_readme_troubleshooting_table_is_generated_from_the_error_model():
    script = Path(__file__).resolve().parents[1] / "scripts" / "error_table.py"
    check = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    codes = [cls.exit_code for cls in error_classes()]
    assert codes == sorted(set(codes))  # one class per exit code
    assert {1, 2, 3, 4, 5, 6, 7} <= set(codes)
