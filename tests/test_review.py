"""`pedseg review`: an edited SEG from another writer (dcmqi's itkimage2segimage, as 3D Slicer exports; highdicom,
as OHIF's writer is built on the same IOD) comes back as reviewed volumes, SR, tables, PDF and store record.

One tracked run through the real runner and writers (preprocessing and inference replaced, as in
factories.fake_model_stages) is shared by the module; a reader then "edits" its segmentation: the oedema is cut
back to the slices of the tumour core, which changes ED and WT and nothing else.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pypdf import PdfReader

from pedseg.cli.main import main
from pedseg.pipeline.labels import BASE_REGIONS, REGIONS
from pedseg.pipeline.longitudinal import compare
from pedseg.reporting.dicom_seg import load_sources, segment_volumes_ml
from pedseg.tracking.sqlite import SQLiteStore

from factories import fake_pipeline_run

SUBJECT = "subject-review"
DCMQI_COLOURS = {"ET": [230, 25, 25], "NET": [255, 220, 0], "CC": [0, 200, 255], "ED": [40, 200, 60]}
# Slicer-style segment names with a generic property type: the label decides the region.
DCMQI_NAMES = {"ET": "Enhancing tumor", "NET": "Non-enhancing tumor", "CC": "Cyst", "ED": "Edema"}


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    store = SQLiteStore(tmp / "store.db")
    result, session = fake_pipeline_run(tmp, store, subject_key=SUBJECT)
    return tmp, result, session, store


def _t1c_grid_labels(tmp: Path, session: Path) -> tuple[sitk.Image, list[Path]]:
    """The run's label map on the t1c DICOM grid, with the oedema cut back to the tumour core's slices (z)."""
    files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(session / "t1c"))]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    grid = reader.Execute()
    labels = sitk.ReadImage(str(tmp / "labels.nii.gz"))
    on_grid = sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    arr = sitk.GetArrayFromImage(on_grid)
    index = np.argwhere(arr == 4)
    z_mm = np.array([on_grid.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]])[2] for i in index])
    cut = index[(z_mm < -8) | (z_mm > 10)]  # outside the core's z range
    arr[tuple(cut.T)] = 0
    edited = sitk.GetImageFromArray(arr)
    edited.CopyInformation(on_grid)
    return edited, files


def _dcmqi_seg(edited: sitk.Image, files: list[Path], tmp: Path) -> Path:
    present = [name for name in BASE_REGIONS if (sitk.GetArrayViewFromImage(edited) == BASE_REGIONS.index(name)
                                                  + 1).any()]
    meta = {
        "ContentCreatorName": "Reader^One", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "Edited tumour segmentation", "SeriesNumber": "300", "InstanceNumber": "1",
        "BodyPartExamined": "BRAIN", "ContentLabel": "EDITED", "ContentDescription": "edited in Slicer",
        "segmentAttributes": [[{
            "labelID": BASE_REGIONS.index(name) + 1, "SegmentLabel": DCMQI_NAMES[name],
            "SegmentDescription": DCMQI_NAMES[name], "SegmentAlgorithmType": "MANUAL",
            "recommendedDisplayRGBValue": DCMQI_COLOURS[name],
            "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT",
                                                      "CodeMeaning": "Tissue"},
            "SegmentedPropertyTypeCodeSequence": {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT",
                                                  "CodeMeaning": "Tissue"},
        } for name in present]],
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    sitk.WriteImage(edited, str(tmp / "edited.nrrd"))
    out = tmp / "edited_dcmqi.dcm"
    subprocess.run([_tool("itkimage2segimage"), "--inputImageList", str(tmp / "edited.nrrd"),
                    "--inputDICOMList", ",".join(str(f) for f in files), "--outputDICOM", str(out),
                    "--inputMetadata", str(tmp / "meta.json")],
                   check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def reviewed(tracked_run):
    tmp, result, session, store = tracked_run
    edited, files = _t1c_grid_labels(tmp, session)
    seg = _dcmqi_seg(edited, files, tmp)
    assert main(["review", str(seg), str(result.outdir), "--db", str(tmp / "store.db"),
                 "--subject-key", SUBJECT]) == 0
    return tmp, result, seg, edited


def _tid1500_volumes(sr_path: Path, out: Path) -> dict[str, float]:
    subprocess.run([_tool("tid1500reader"), "--inputDICOM", str(sr_path), "--outputMetadata", str(out)],
                   check=True, capture_output=True, timeout=120)
    return {group["TrackingIdentifier"]: float(item["value"]) for group in json.loads(out.read_text())["Measurements"]
            for item in group["measurementItems"] if item["quantity"]["CodeValue"] == "118565006"}


def test_a_slicer_seg_maps_by_label_and_is_measured_on_its_own_grid(reviewed):
    tmp, result, seg, edited = reviewed
    document = json.loads((result.outdir / "review" / "measurements.json").read_text())
    voxel_ml = float(np.prod(edited.GetSpacing())) / 1000
    arr = sitk.GetArrayFromImage(edited)
    for name, value in (("ET", 1), ("NET", 2), ("ED", 4)):
        assert document["regions"][name]["volume_ml"] == pytest.approx(int((arr == value).sum()) * voxel_ml,
                                                                       abs=1e-3), name
    automatic_seg = segment_volumes_ml(result.outputs["seg"])  # the automatic SEG, on the same t1c grid
    assert document["regions"]["ED"]["volume_ml"] < automatic_seg["ED"]  # the edit shows
    assert document["regions"]["ET"]["volume_ml"] == automatic_seg["ET"]  # and changes nothing else
    assert document["regions"]["NET"]["volume_ml"] == automatic_seg["NET"]
    # RAPNO on the SEG's grid is in the patient's own coordinates: its endpoints lie on the edited tumour core.
    core = np.argwhere(np.isin(arr, (1, 2, 3)))
    core_lps = np.array([edited.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in core])
    for end in document["rapno"]["lesions"][0]["endpoints_lps_mm"]:
        assert np.min(np.linalg.norm(core_lps - np.asarray(end), axis=1)) <= 2.0


def test_the_reviewed_sr_revises_the_automatic_one_with_the_seg_voxel_volumes(reviewed):
    tmp, result, seg, _ = reviewed
    sr_path = result.outdir / "review" / "measurements_reviewed.dcm"
    volumes = _tid1500_volumes(sr_path, tmp / "tid1500.json")
    assert volumes == segment_volumes_ml(seg)  # by label: Edema -> ED, ...
    sr = pydicom.dcmread(sr_path)
    automatic = pydicom.dcmread(result.outputs["sr"], stop_before_pixels=True)
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == automatic.SOPInstanceUID
    assert "reviewed" in sr.SeriesDescription
    assert sr.SeriesNumber != automatic.SeriesNumber
    assert sr.StudyInstanceUID == automatic.StudyInstanceUID
    text = " ".join(page.extract_text() for page in PdfReader(result.outdir / "review" / "report_reviewed.pdf").pages)
    assert "REVIEWED" in text
    document = json.loads((result.outdir / "review" / "measurements.json").read_text())
    assert f"{document['regions']['WT']['volume_ml']:.3f}" in text
    assert f"{document['context']['reviewed']['automatic_volumes_ml']['WT']:.3f}" in text


def test_the_store_keeps_both_and_comparisons_prefer_the_reviewed_volumes(reviewed, tracked_run):
    tmp, result, _, _ = reviewed
    store = tracked_run[3]
    (point,) = store.history(SUBJECT)
    document = json.loads((result.outdir / "review" / "measurements.json").read_text())
    assert point.reviewed_volumes_ml == {name: document["regions"][name]["volume_ml"] for name in REGIONS}
    assert point.volumes_ml["ED"] == document["context"]["reviewed"]["automatic_volumes_ml"]["ED"]
    later = type(point)(**{**point.__dict__, "study_uid": "1.2.3.4", "study_date": "29991231",
                           "reviewed_volumes_ml": {}})
    change = compare(later, [point]).changes["ED"]
    assert change.baseline_ml == point.reviewed_volumes_ml["ED"] != point.volumes_ml["ED"]


def test_a_highdicom_seg_with_an_unknown_segment_is_refused_naming_it(tracked_run, tmp_path, capsys):
    tmp, result, session, _ = tracked_run
    edited, files = _t1c_grid_labels(tmp, session)
    sources = load_sources(files)
    mask = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    mask[:, :4, :4] = 1
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Liver", segmented_property_category=hd.sr.CodedConcept(
            "49755003", "SCT", "Morphologically Abnormal Structure"),
        segmented_property_type=hd.sr.CodedConcept("10200004", "SCT", "Liver"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(sources, mask, hd.seg.SegmentationTypeValues.BINARY, [description], hd.UID(), 301,
                              hd.UID(), 1, "OHIF", "viewer", "3.9", "0")
    path = tmp_path / "ohif.dcm"
    seg.save_as(path)
    assert main(["review", str(path), str(result.outdir)]) == 2
    assert "segment 1 'Liver' is not a tumour region" in capsys.readouterr().err


def test_an_unedited_seg_maps_by_code_and_gives_the_automatic_seg_volumes(tracked_run, tmp_path):
    _, result, _, _ = tracked_run
    outdir = Path(shutil.copytree(result.outdir, tmp_path / "out"))
    assert main(["review", str(outdir / "seg" / "segmentation.dcm"), str(outdir)]) == 0
    document = json.loads((outdir / "review" / "measurements.json").read_text())
    for name, volume in segment_volumes_ml(outdir / "seg" / "segmentation.dcm").items():
        assert document["regions"][name]["volume_ml"] == pytest.approx(volume, abs=1e-3), name


def test_history_shows_the_reviewed_volumes_and_keeps_the_automatic_ones(reviewed, capsys):
    tmp, result, _, _ = reviewed
    capsys.readouterr()
    assert main(["history", SUBJECT, "--db", str(tmp / "store.db"), "--csv", "-"]) == 0
    rows = {row["region"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    document = json.loads((result.outdir / "review" / "measurements.json").read_text())
    assert float(rows["ED"]["volume_ml"]) == document["regions"]["ED"]["volume_ml"]
    assert float(rows["ED"]["automatic_volume_ml"]) == document["context"]["reviewed"]["automatic_volumes_ml"]["ED"]
    assert rows["ED"]["reviewed"] == "True"


def test_a_seg_of_another_study_is_refused_and_nothing_is_written(reviewed, tmp_path, capsys):
    _, result, seg, _ = reviewed
    other = pydicom.dcmread(seg)
    other.StudyInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "other.dcm"
    other.save_as(path)
    outdir = Path(shutil.copytree(result.outdir, tmp_path / "out", ignore=shutil.ignore_patterns("review")))
    assert main(["review", str(path), str(outdir)]) == 2
    assert "belongs to another study" in capsys.readouterr().err
    assert not (outdir / "review").exists() and not list(outdir.glob(".review*"))
