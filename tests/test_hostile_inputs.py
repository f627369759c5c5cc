"""Hostile and messy input through `pedseg run`: every case ends in one clear message (the problem, the series by
number and description, what to do), the exit code its error class defines, the same in error.json, no patient
identifier anywhere, and an output folder holding error.json and nothing half-written.

The session is tiny (16×16 images) and the model bundle has no weights, so every case stops before
preprocessing or in its first step, dcm2niix. Unusual data the pipeline accepts is checked at conversion level.
"""
from __future__ import annotations

import errno
import gzip
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pypdf import PdfReader

import pedseg.pipeline.archive as archive_module
import pedseg.pipeline.convert as convert_module
import pedseg.reporting.writers as writers_module
import pedseg.runner as runner_module
import pedseg.workspace as workspace_module
from pedseg.cli.main import main
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.errors import (
    BundleError,
    InputError,
    InternalError,
    MissingSequenceError,
    ResourceError,
    UnsupportedDataError,
    error_classes,
)
from pedseg.pipeline.identify import classify_session
from pedseg.pipeline.identify_rules import ROLE_NAMES
from pedseg.pipeline.ingest import ingest
from pedseg.pipeline.model_output import EnsembleResult

from factories import fake_bundle, fake_model_stages, tiny_atlas_case
from hostile_support import (
    NUMBERS,
    PROTOCOLS,
    SENTINELS,
    STUDY,
    copy_session,
    phi_found,
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


def edit_files(folder: Path, change) -> None:
    """Apply change(ds, index) to every file of one series folder, in instance order."""
    for index, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        change(ds, index)
        ds.save_as(path)


def zipped(folder: Path, archive: Path, extra: dict[zipfile.ZipInfo | str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
        for info, data in (extra or {}).items():
            zf.writestr(info, data)
    return archive


def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    return info


def mark_encrypted(archive: Path, name: str) -> Path:
    """Set the 'encrypted' flag of one entry (zipfile cannot write encrypted entries) in its local header (flags at
    offset 6, name at 30) and its central-directory header (flags at 8, name at 46)."""
    data = bytearray(archive.read_bytes())
    found = [m.start() for m in re.finditer(re.escape(name.encode()), data)]
    for at, signature, flags, name_offset in ((found[0], b"PK\x03\x04", 6, 30), (found[-1], b"PK\x01\x02", 8, 46)):
        assert data[at - name_offset: at - name_offset + 4] == signature
        data[at - name_offset + flags] |= 0x1
    archive.write_bytes(bytes(data))
    return archive


def truncated_dcm2niix_output(h, name, indir, rawdir) -> None:
    """Stands in for dcm2niix writing a truncated .nii.gz (killed mid-write, or a bug)."""
    path = rawdir / f"{name}.nii.gz"
    sitk.WriteImage(tiny_volume(), str(path), useCompression=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def raising(exc: BaseException):
    """A stand-in for a pipeline function: raises `exc` whatever it is given."""
    def fail(*args, **kwargs):
        raise exc
    return fail


# ------------------------------------------------------------------------------------------------ cases
# Each case prepares tmp/ (input, output folder, monkeypatches) and says which error class ends the run and what
# the message must say. The output folder is tmp/"out".

CASES = {}


def case(function):
    CASES[function.__name__] = function
    return function


@case
def empty_folder(tmp, template, mp):
    (tmp / "in").mkdir()
    return [tmp / "in"], InputError, ["no files at all"]


@case
def not_dicom(tmp, template, mp):
    (tmp / "in").mkdir()
    (tmp / "in" / "README.txt").write_text("scan notes")
    (tmp / "in" / "key_image.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(500))
    return [tmp / "in"], InputError, ["2 files, none of them DICOM"]


@case
def dicom_without_images(tmp, template, mp):
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: DICOM, but no image
    ds.SOPInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.PatientName = SENTINELS["PatientName"]
    (tmp / "in").mkdir()
    ds.save_as(tmp / "in" / "report.dcm", implicit_vr=True, little_endian=True)
    return [tmp / "in"], InputError, ["1 DICOM files, none of them a readable image"]


@case
def input_does_not_exist(tmp, template, mp):
    return [tmp / "nowhere"], InputError, ["The input 'nowhere' does not exist"]


@case
def zip_path_traversal(tmp, template, mp):
    return [zipped(template, tmp / "in.zip", {"t1n/../../../escape.dcm": b"x"})], InputError, ["climbs out"]


@case
def zip_absolute_path(tmp, template, mp):
    return [zipped(template, tmp / "in.zip", {"/tmp/pedseg-escape.dcm": b"x"})], InputError, ["has an absolute path"]


@case
def zip_symlink(tmp, template, mp):
    archive = zipped(template, tmp / "in.zip", {symlink_entry("t1n/link.dcm"): b"/etc/passwd"})
    return [archive], InputError, ["'t1n/link.dcm' is a symbolic link"]


@case
def zip_bomb_ratio(tmp, template, mp):
    archive = zipped(template, tmp / "in.zip", {"zeros.dcm": bytes(20 * 1024**2)})
    return [archive], InputError, ["'zeros.dcm' expands", "zip bomb"]


@case
def zip_over_total_size(tmp, template, mp):
    mp.setattr(archive_module, "MAX_UNPACKED_BYTES", 50_000)
    return [zipped(template, tmp / "in.zip")], InputError, ["allowed for one session"]


@case
def zip_too_many_entries(tmp, template, mp):
    mp.setattr(archive_module, "MAX_ARCHIVE_ENTRIES", 20)
    return [zipped(template, tmp / "in.zip")], InputError, ["entries, more than the 20 allowed"]


@case
def zip_password_protected(tmp, template, mp):
    archive = mark_encrypted(zipped(template, tmp / "in.zip", {"t1n/secret.dcm": b"x"}), "t1n/secret.dcm")
    return [archive], InputError, ["'t1n/secret.dcm' is password-protected"]


@case
def zip_corrupt(tmp, template, mp):
    (tmp / "in.zip").write_bytes(b"PK\x03\x04" + bytes(200))
    return [tmp / "in.zip"], InputError, ["'in.zip' cannot be read as a zip file"]


@case
def gzip_bomb(tmp, template, mp):
    copy_session(template, tmp / "in")
    with gzip.open(tmp / "in" / "bomb.dcm.gz", "wb") as fh:
        fh.write(bytes(128) + b"DICM" + bytes(20 * 1024**2))
    return [tmp / "in"], InputError, ["gzip file 'bomb.dcm.gz' expands beyond its allowed size"]


@case
def two_studies(tmp, template, mp):
    copy_session(template, tmp / "in", without=["t2f"])
    write_role(tmp / "in", "t2f", study=replace(STUDY, study_uid="1.2.826.0.1.3680043.8.498.773"))
    return [tmp / "in"], InputError, ["2 different studies", LABELS["t2f"]]


@case
def two_patients(tmp, template, mp):
    copy_session(template, tmp / "in", without=["t2f"])
    write_role(tmp / "in", "t2f", study=replace(STUDY, patient_id=SENTINELS["PatientID"] + "B"))
    return [tmp / "in"], InputError, ["2 different patients", f"patient 2: {LABELS['t2f']}"]


@case
def missing_slice(tmp, template, mp):
    copy_session(template, tmp / "in")
    (tmp / "in" / "t2w" / "IM00006.dcm").unlink()
    return [tmp / "in"], InputError, [f"{LABELS['t2w']} is incomplete: 1 slice(s) missing"]


@case
def truncated_file_among_good_ones(tmp, template, mp):
    copy_session(template, tmp / "in")
    path = tmp / "in" / "t1c" / "IM00006.dcm"
    path.write_bytes(path.read_bytes()[:-300])
    return [tmp / "in"], InputError, [f"{LABELS['t1c']} is incomplete: 1 slice(s) missing"]


@case
def missing_pixel_data(tmp, template, mp):
    copy_session(template, tmp / "in")
    edit_files(tmp / "in" / "t2f", lambda ds, i: delattr(ds, "PixelData") if i == 5 else None)
    return [tmp / "in"], InputError, [f"{LABELS['t2f']} is incomplete: 1 slice(s) missing"]


@case
def uneven_slice_spacing(tmp, template, mp):
    copy_session(template, tmp / "in")

    def shift(ds, index):  # 4 mm slices, the upper half 1.5 mm further up
        if index >= 6:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 1.5]
    edit_files(tmp / "in" / "t2w", shift)
    return [tmp / "in"], UnsupportedDataError, [f"{LABELS['t2w']} has uneven slice spacing (4.00 to 5.50 mm"]


for _role in ("t1n", "t1c", "t2w", "t2f"):
    def _missing(tmp, template, mp, role=_role):
        copy_session(template, tmp / "in", without=[role])
        return [tmp / "in"], MissingSequenceError, [f"Required sequence(s) missing: {ROLE_NAMES[role]}.",
                                                    LABELS["dwi"]]
    CASES[f"missing_{_role}"] = _missing


@case
def all_four_missing(tmp, template, mp):
    copy_session(template, tmp / "in", without=["t1n", "t1c", "t2w", "t2f"])
    return [tmp / "in"], MissingSequenceError, [", ".join(ROLE_NAMES[r] for r in ("t1n", "t1c", "t2w", "t2f")),
                                                f"{LABELS['dwi']} → other"]


@case
def only_localizers(tmp, template, mp):
    copy_session(template, tmp / "in", without=["t1n", "t1c", "t2w", "t2f", "dwi"])
    return [tmp / "in"], MissingSequenceError, [f"{LABELS['loc']} part ax → other", "localizer / scout"]


@case
def four_d_series(tmp, template, mp):
    copy_session(template, tmp / "in", without=["t1n"])
    write_role(tmp / "in", "t1n", volumes=[tiny_volume("sag"), tiny_volume("sag")])
    return [tmp / "in"], MissingSequenceError, [f"{LABELS['t1n']} → other", "2 temporal positions: a 4D time series"]


@case
def non_ascii_and_very_long_description(tmp, template, mp):
    description = "Ax FLAIR Großhirn 軸位 ñ " + "lang " * 80
    copy_session(template, tmp / "in", without=["t2f", "t2w"])
    write_role(tmp / "in", "t2f", description=description, extra={"SpecificCharacterSet": "ISO_IR 192"})
    return [tmp / "in"], MissingSequenceError, [ROLE_NAMES["t2w"], f"series 4 '{description.strip()}' → t2f"]


@case
def dcm2niix_fails(tmp, template, mp):
    mp.setattr(convert_module.dcm2niix, "bin", shutil.which("false"))
    return [copy_session(template, tmp / "in")], UnsupportedDataError, ["dcm2niix could not convert series "]


@case
def corrupt_nifti_from_dcm2niix(tmp, template, mp):
    mp.setattr(convert_module, "_run_dcm2niix", truncated_dcm2niix_output)
    says = ["dcm2niix wrote an unreadable image for series "]
    return [copy_session(template, tmp / "in")], UnsupportedDataError, says


@case
def dcm2niix_timeout(tmp, template, mp):
    mp.setattr(convert_module.subprocess, "run", raising(subprocess.TimeoutExpired("dcm2niix", 900)))
    return [copy_session(template, tmp / "in")], ResourceError, ["dcm2niix took longer than 900 s on series "]


@case
def disk_full_while_unpacking(tmp, template, mp):
    mp.setattr(archive_module, "_copy_limited", raising(OSError(errno.ENOSPC, "No space left on device")))
    return [zipped(template, tmp / "in.zip")], ResourceError, ["The disk is full: unpacking 'in.zip' failed"]


@case
def disk_full_while_writing_outputs(tmp, template, mp):
    fake_model_stages(mp, *tiny_atlas_case(tmp / "atlas"))  # to where the writers start
    mp.setattr(writers_module, "write_text", raising(OSError(errno.ENOSPC, "No space left on device")))
    return [copy_session(template, tmp / "in")], ResourceError, ["The disk is full: writing the work or output files"]


@case
def out_of_memory(tmp, template, mp):
    mp.setattr(runner_module, "identify", raising(MemoryError()))
    return [copy_session(template, tmp / "in")], ResourceError, ["The run ran out of memory."]


@case
def unexpected_exception_with_phi_in_its_text(tmp, template, mp):
    error = ValueError(f"cannot parse header of {SENTINELS['PatientName']} ({SENTINELS['PatientID']})")
    mp.setattr(runner_module, "identify", raising(error))
    return [copy_session(template, tmp / "in")], InternalError, ["Unexpected ValueError in "]


@case
def leftovers_of_a_killed_run(tmp, template, mp):
    stale = tmp / "out" / ".pedseg-staging-killed"
    stale.mkdir(parents=True)
    (stale / "measurements.json").write_text('{"half": ')
    (tmp / "out" / ".error.x1y2.partial.json").write_text("{")
    return [copy_session(template, tmp / "in", without=["t1c"])], MissingSequenceError, [ROLE_NAMES["t1c"]]


@case
def bundle_missing_a_fold(tmp, template, mp):
    bundle = fake_bundle(tmp / "bundle", missing_fold=1)
    return [copy_session(template, tmp / "in")], BundleError, ["lacks fold 1"], bundle


@case
def bundle_channels_do_not_match(tmp, template, mp):
    bundle = fake_bundle(tmp / "bundle", channels=2)
    return [copy_session(template, tmp / "in")], BundleError, ["takes 2 input channels but bundle.json maps 4"], bundle


@case
def bundle_without_bundle_json(tmp, template, mp):
    (tmp / "bundle").mkdir()
    return [copy_session(template, tmp / "in")], BundleError, ["No bundle.json"], tmp / "bundle"


@case
def bundle_json_malformed(tmp, template, mp):
    bundle = fake_bundle(tmp / "bundle")
    (bundle / "bundle.json").write_text('{"name": "half')
    return [copy_session(template, tmp / "in")], BundleError, ["bundle.json in", "is malformed"], bundle


def run_cli(inputs, out: Path, bundle: Path, capsys, caplog) -> tuple[int, str, str]:
    with caplog.at_level(logging.DEBUG):
        code = main(["run", *map(str, inputs), str(out), "--bundle", str(bundle), "--device", "cpu"])
    return code, capsys.readouterr().err, caplog.text


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # the over-long description, as written
@pytest.mark.parametrize("name", CASES)
def test_hostile_input_ends_in_a_clear_error(name, tmp_path, template, bundle, monkeypatch, capsys, caplog):
    monkeypatch.delenv("PEDSEG_DB", raising=False)
    inputs, error_class, says, *custom_bundle = CASES[name](tmp_path, template, monkeypatch)
    out = tmp_path / "out"
    code, stderr, log = run_cli(inputs, out, custom_bundle[0] if custom_bundle else bundle, capsys, caplog)

    assert code == error_class.exit_code, stderr
    document = json.loads((out / "error.json").read_text(encoding="utf-8"))
    assert (document["error"], document["exit_code"]) == (error_class.kind, error_class.exit_code)
    for phrase in says:
        assert phrase in document["message"]
    assert document["hint"], "every message says what to do"
    assert f"error ({error_class.kind}): {document['message']}" in stderr  # the console says the same
    assert sorted(p.name for p in out.iterdir()) == ["error.json"]  # nothing half-written, no leftovers
    assert not phi_found(stderr + log + json.dumps(document, ensure_ascii=False))
    assert "Traceback" not in stderr + log


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

    def run_ensemble(image, spacing_zyx, members, device, tta):
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
