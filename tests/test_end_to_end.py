"""A full DICOM -> PDF run on a synthetic session with the committed demo bundle (CI runs it)."""
from __future__ import annotations

import csv
import io
import json
import logging

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pypdf import PdfReader

from pedseg.evaluation import region_dice
from pedseg.pipeline.config import DEMO_BUNDLE, PipelineConfig
from pedseg.reporting.dicom_seg import load_sources
from pedseg.runner import run_pipeline
from pedseg.synth.session import generate_session

from hostile_support import SENTINELS, phi_found, text_files
from readers import read_seg_labels, read_sr_volumes

pytestmark = pytest.mark.slow
SEED = 4  # GE-style session: sagittal 3D T1s, axial 2D T2, sagittal 3D FLAIR


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    if not (DEMO_BUNDLE / "bundle.json").exists():
        pytest.fail(f"demo bundle missing at {DEMO_BUNDLE}: run scripts/train_demo_bundle.py")
    root = tmp_path_factory.mktemp("e2e")
    summary = generate_session(root / "session", SEED)
    for path in (root / "session" / "dicom").rglob("*.dcm"):  # identifiers a leak would show (test_phi.py)
        ds = pydicom.dcmread(path)
        for keyword, value in SENTINELS.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    log = io.StringIO()  # every log line of the run, debug included
    handler, logger = logging.StreamHandler(log), logging.getLogger()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        result = run_pipeline(root / "session" / "dicom", root / "out",
                              PipelineConfig(bundle=DEMO_BUNDLE, device="cpu", threads=2))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (root / "run.log").write_text(log.getvalue())
    return summary, result, root


def test_all_four_roles_identified_as_generated(demo_run):
    summary, result, _ = demo_run
    assert result.identification.missing == []
    for role in ("t1n", "t1c", "t2w", "t2f"):
        assert result.identification.chosen[role] == summary["series_uids"][role]
    rejected = {d.series_uid for d in result.identification.decisions if d.role == "other"}
    assert {summary["series_uids"]["loc"], summary["series_uids"]["dwi"]} <= rejected


def test_outputs_complete_and_no_staging_left(demo_run):
    _, result, root = demo_run
    out = root / "out"
    expected = [
        "identify.json", "measurements.json", "measurements.csv", "report.pdf", "provenance.json",
        "seg/segmentation.dcm", "sr/measurements.dcm", "report/report_pdf.dcm",
        "nifti/t1n.nii.gz", "nifti/t1c.nii.gz", "nifti/t2w.nii.gz", "nifti/t2f.nii.gz",
        "nifti/labels_atlas.nii.gz", "nifti/labels_t1c_native.nii.gz",
    ]
    for name in expected:
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".pedseg-staging-*"))
    assert not (out / "error.json").exists()
    # provenance lists every file the run wrote, so a later run into OUTDIR can remove the ones it no longer writes
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(json.loads((out / "provenance.json").read_text())["outputs"]) == written
    atlas = sitk.ReadImage(str(out / "nifti" / "t1c.nii.gz"))
    assert atlas.GetSize() == (240, 240, 155)
    assert atlas.GetSpacing() == (1.0, 1.0, 1.0)


def test_segmentation_matches_ground_truth_on_native_t1c(demo_run):
    _, _, root = demo_run
    truth = sitk.ReadImage(str(root / "session" / "ground_truth" / "labels_t1c_native.nii.gz"))
    pred = sitk.ReadImage(str(root / "out" / "nifti" / "labels_t1c_native.nii.gz"))
    # Compare in physical space: dcm2niix may store the native grid with a different axis order.
    pred = sitk.Resample(pred, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    scores = region_dice(sitk.GetArrayFromImage(truth), sitk.GetArrayFromImage(pred), ("WT", "TC"))
    assert scores["WT"] >= 0.85, f"whole-tumour Dice {scores['WT']:.3f}"
    assert scores["TC"] >= 0.75, f"tumour-core Dice {scores['TC']:.3f}"


def test_seg_reads_back_to_the_same_voxels(demo_run):
    _, result, root = demo_run
    out = root / "out"
    sources = result.identification.chosen["t1c"]
    files = sorted((root / "session" / "dicom").glob("*_t1c/*.dcm"))
    assert files, sources
    seg_labels = read_seg_labels(out / "seg" / "segmentation.dcm", files)
    native = sitk.ReadImage(str(out / "nifti" / "labels_t1c_native.nii.gz"))
    # The native label map resampled onto the sorted DICOM frames must equal what the SEG stores.
    datasets = load_sources(files)
    expected = np.stack([_label_plane(native, ds) for ds in datasets])
    assert seg_labels.shape == expected.shape
    assert np.array_equal(seg_labels, expected)
    assert (seg_labels > 0).sum() == (sitk.GetArrayFromImage(native) > 0).sum()


def _label_plane(labels: sitk.Image, ds) -> np.ndarray:
    row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    plane = sitk.Image(int(ds.Columns), int(ds.Rows), 1, sitk.sitkUInt8)
    plane.SetOrigin([float(v) for v in ds.ImagePositionPatient])
    plane.SetSpacing((float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), 1.0))
    plane.SetDirection(tuple(np.column_stack([row, col, np.cross(row, col)]).ravel()))
    return sitk.GetArrayFromImage(sitk.Resample(labels, plane, sitk.Transform(), sitk.sitkNearestNeighbor, 0))[0]


def test_volumes_agree_across_json_csv_and_sr(demo_run):
    _, result, root = demo_run
    out = root / "out"
    doc = json.loads((out / "measurements.json").read_text())
    with open(out / "measurements.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    sr = read_sr_volumes(out / "sr" / "measurements.dcm")
    for region in ("ET", "NET", "CC", "ED", "TC", "WT"):
        expected = round(result.measurements.regions[region].volume_ml, 3)
        json_value = doc["regions"][region]["volume_ml"]
        csv_value = next(float(r["volume_ml"]) for r in rows
                         if r["region"] == region and r["convention"] in ("2024", "composite"))
        assert json_value == pytest.approx(expected, abs=1e-3)
        assert csv_value == pytest.approx(expected, abs=1e-3)
        if region in sr:  # the SR states the volume of its SEG's own voxels, on the t1c grid
            assert sr[region] == pytest.approx(result.measurements.regions[region].native_volume_ml, abs=1e-3)
    assert result.measurements.regions["WT"].volume_ml > 1.0


def test_provenance_and_pdf(demo_run):
    summary, result, root = demo_run
    out = root / "out"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["inputs"]["series_instance_uids"]["t1c"] == summary["series_uids"]["t1c"]
    assert len(prov["bundle"]["sha256"]) == 64
    assert {"ingest", "identify", "preprocess", "infer", "postprocess", "measure",
            "report"} <= set(prov["stage_seconds"])
    pdf = (out / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    assert pdf.count(b"/Type /Page") >= 2


def test_no_file_log_or_report_shows_an_identifier(demo_run):
    """The session's headers carry sentinel names, IDs, birth date, accession and institution: no output file,
    log line (debug included) or report text may show any of them."""
    _, result, root = demo_run
    out = root / "out"
    texts = {**text_files(out), "log": (root / "run.log").read_text()}
    texts["report.pdf"] = "".join(page.extract_text() for page in PdfReader(out / "report.pdf").pages)
    assert "preprocess" in texts["log"] and len(texts) > 5  # the scan is not vacuous
    for where, text in texts.items():
        assert not phi_found(text), where
