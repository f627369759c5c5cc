"""Measurement tables, figure orientation and the PDF report, on small synthetic phantoms."""
from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
import zlib

import numpy as np
import pytest
import SimpleITK as sitk
from pypdf import PdfReader
from scipy import ndimage

from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.labels import convert_labels, region_mask
from pedseg.pipeline.measure import measure
from pedseg.pipeline.types import Identification, SeriesDecision, Similarity, StudyContext
from pedseg.reporting.figures import VIEWS, display_grid, radiological_plane, report_figures, to_display
from pedseg.reporting.pdf import DISCLAIMER, FAST_MODE_LINE, NO_TUMOUR, write_report_pdf
from pedseg.reporting.tables import CSV_COLUMNS, SCHEMA_VERSION, write_measurements_csv, write_measurements_json
from pedseg.runner import run_pipeline

from factories import fake_bundle, fake_model_stages, passing_qc, tiny_atlas_case
from hostile_support import write_session

CONTEXT = {"study_instance_uid": "1.2.826.0.1.3680043.2.1125.1",
           "series_instance_uids": {"t1c": "1.2.3", "t2f": "1.2.4"},
           "bundle": {"name": "pedseg-demo", "version": "0.1.0", "sha256": "abc123"}, "fast_mode": True,
           "study_date": "20250131"}
# Direction matrices (columns = patient direction of each index axis): plain LPS, a RAS-stored NIfTI,
# and a sagittal grid whose index axes are permuted.
GRIDS = {
    "lps": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    "sagittal": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}


ONE_BLOB = ((np.array([-20.0, 10.0, 5.0]), 14.0),)


def phantom(direction=GRIDS["lps"], size=64, spacing=2.0, blobs=ONE_BLOB):
    """A head (sphere of radius 50 mm around the LPS origin) and labels in blobs (centre LPS mm, radius mm).

    Returns (image, labels) with ET core, NET shell, CC centre and ED halo in each blob.
    """
    img = sitk.Image([size] * 3, sitk.sitkFloat32)
    img.SetSpacing([spacing] * 3)
    img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    img.SetOrigin(tuple(-np.asarray(direction, dtype=float) @ np.full(3, spacing * (size - 1) / 2)))
    index = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    points = (index * spacing) @ np.asarray(direction, dtype=float).T + np.asarray(img.GetOrigin())
    intensity = np.where(np.linalg.norm(points, axis=1) < 50.0, 100.0, 0.0)
    labels = np.zeros(len(points), dtype=np.uint8)
    for centre, radius in blobs:
        r = np.linalg.norm(points - centre, axis=1) / radius
        labels[(r <= 1.0) & (labels == 0)] = 4
        labels[r <= 0.7] = 2
        labels[r <= 0.5] = 1
        labels[r <= 0.25] = 3
    intensity[labels > 0] += 50.0 * labels[labels > 0]

    def volume(values, pixel):
        out = sitk.GetImageFromArray(values.reshape((size,) * 3).transpose(2, 1, 0).astype(pixel))
        out.CopyInformation(img)
        return out
    return volume(intensity, np.float32), volume(labels, np.uint8)


@pytest.fixture(scope="module")
def measured():
    _, labels = phantom()
    return measure(labels, labels, qc_flags=["t2f_registration_low_similarity"])


def test_json_and_csv_share_volumes_and_schema(measured, tmp_path):
    json_path = write_measurements_json(measured, tmp_path / "m.json", context=CONTEXT)
    csv_path = write_measurements_csv(measured, tmp_path / "m.csv", context=CONTEXT)
    doc = json.loads(json_path.read_text())
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)

    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["schema"] == "pedseg-measurements"
    assert set(doc) >= {"units", "context", "regions", "conventions", "rapno", "qc_flags"}
    assert doc["context"] == CONTEXT
    assert doc["qc_flags"] == ["t2f_registration_low_similarity"]
    assert set(doc["regions"]) == {"ET", "NET", "CC", "ED", "TC", "WT"}
    assert set(doc["conventions"]["brats_peds_2024"]) == {"ET", "NET", "CC", "ED"}
    assert set(doc["conventions"]["brats_peds_2023"]) == {"NCR", "ED", "ET"}
    for region in doc["regions"].values():
        assert set(region) >= {"volume_ml", "native_volume_ml", "voxels", "components", "bidimensional_mm2"}
    assert {"region", "lesions", "sum_product_mm2"} <= set(doc["rapno"])
    assert set(doc["rapno"]["lesions"][0]) >= {"slice_z_mm", "longest_mm", "perpendicular_mm", "product_mm2",
                                               "endpoints_lps_mm", "perp_endpoints_lps_mm"}

    assert len(rows) == 9
    for row in rows:
        block = "regions" if row["convention"] in ("2024", "composite") else None
        entry = (doc[block][row["region"]] if block
                 else doc["conventions"]["brats_peds_2023"][row["region"]])
        assert float(row["volume_ml"]) == entry["volume_ml"]
        assert float(row["native_volume_ml"]) == entry["native_volume_ml"]
        assert int(row["voxels"]) == entry["voxels"]
        assert row["study_instance_uid"] == CONTEXT["study_instance_uid"]
        assert row["fast_mode"] == "true"
        assert (row["bundle_name"], row["bundle_sha256"], row["study_date"]) == ("pedseg-demo", "abc123", "20250131")
        assert row["qc_flags"] == "t2f_registration_low_similarity"
    wt = doc["regions"]["WT"]
    assert wt["volume_ml"] == round(measured.regions["WT"].volume_ml, 3)
    assert doc["regions"]["TC"]["bidimensional_mm2"] == doc["rapno"]["sum_product_mm2"]
    assert wt["bidimensional_mm2"] > doc["rapno"]["sum_product_mm2"]
    ncr = doc["conventions"]["brats_peds_2023"]["NCR"]
    assert ncr["voxels"] == doc["regions"]["NET"]["voxels"] + doc["regions"]["CC"]["voxels"]
    assert ncr["components"] is None


def test_context_keys_always_present(measured, tmp_path):
    doc = json.loads(write_measurements_json(measured, tmp_path / "m.json", context={"extra": 1}).read_text())
    assert doc["context"]["study_instance_uid"] is None
    assert doc["context"]["bundle"] is None
    assert doc["context"]["extra"] == 1


@pytest.mark.parametrize("grid", GRIDS)
def test_radiological_orientation(grid):
    # Blob in patient left (+x), anterior (-y), superior (+z) in LPS.
    image, labels = phantom(GRIDS[grid], size=40, spacing=2.0, blobs=((np.array([20.0, -18.0, 16.0]), 8.0),))
    display = display_grid(labels)
    volume = to_display(labels, display, label=True)
    centre = [int(round(c)) for c in ndimage.center_of_mass(volume > 0)]
    expected = {"axial": ("top", "right"), "coronal": ("top", "right"), "sagittal": ("top", "left")}
    for view, index in zip(VIEWS, centre):
        plane = radiological_plane(volume, view, index)
        rows, cols = np.nonzero(plane)
        assert rows.size, view
        vertical = "top" if rows.mean() < plane.shape[0] / 2 else "bottom"
        horizontal = "left" if cols.mean() < plane.shape[1] / 2 else "right"
        assert (vertical, horizontal) == expected[view], view


def pdf_text(path) -> bytes:
    """Every stream decoded (reportlab: ASCII85 then Flate); text is in literal strings of the page content."""
    data = path.read_bytes()
    chunks = [data]
    for stream in re.finditer(rb"stream\r?\n(.*?)endstream", data, re.S):
        raw = stream.group(1).strip()
        try:
            raw = base64.a85decode(raw[:-2]) if raw.endswith(b"~>") else raw
            chunks.append(zlib.decompress(raw))
        except (ValueError, zlib.error):
            chunks.append(raw)
    return b"\n".join(chunks)


def page_count(path) -> int:
    return len(re.findall(rb"/Type /Page(?!s)\b", path.read_bytes()))


def write_inputs(tmp_path, blobs):
    image, labels = phantom(GRIDS["ras"], blobs=blobs)
    images = {}
    for role in ("t1c", "t2f"):
        images[role] = tmp_path / f"{role}.nii.gz"
        sitk.WriteImage(image, str(images[role]))
    return images, labels


def report(tmp_path, blobs, *, fast_mode):
    images, labels = write_inputs(tmp_path, blobs)
    m = measure(labels, None, qc_flags=["example_flag"])
    identification = Identification(
        decisions=[SeriesDecision("1.2.3", 7, "AX T1 POST <GAD> & more", "t1c", 0.95, ["contrast agent"], True),
                   SeriesDecision("1.2.4", 9, "AX FLAIR", "t2f", 0.9, [], True)],
        chosen={"t1c": "1.2.3", "t2f": "1.2.4"}, missing=["t1n", "t2w"])
    out = write_report_pdf(
        tmp_path / "report.pdf", images=images, labels=labels, measurements=m, identification=identification,
        qc=passing_qc(registration={"t2f_to_t1c_mattes_mi": -0.81}, brain_volume_ml=1234.5),
        provenance={"bundle": {"name": "pedseg-demo", "version": "0.1.0", "hash": "abc"}, "device": "cpu",
                    "stage_seconds": {"infer": 12.5}},
        context=StudyContext("SUBJ-0001", "20240102", None, ""), fast_mode=fast_mode)
    return out, m


def test_pdf_report(tmp_path):
    out, m = report(tmp_path, ((np.array([-20.0, 10.0, 5.0]), 14.0),), fast_mode=True)
    assert out.is_file()
    assert page_count(out) >= 2
    text = pdf_text(out)
    assert DISCLAIMER.split(". ")[0].encode() in text
    assert b"For research use only. Not for clinical diagnosis." in text
    assert f"{round(m.regions['WT'].volume_ml, 3):.3f}".encode() in text
    assert FAST_MODE_LINE.encode() in text
    assert b"SUBJ-0001" in text
    assert b"2024-01-02" in text
    assert NO_TUMOUR.encode() not in text
    assert not list(tmp_path.glob(".*partial*"))


def test_pdf_report_without_tumour(tmp_path):
    out, m = report(tmp_path, (), fast_mode=False)
    assert m.regions["WT"].voxels == 0
    assert page_count(out) >= 2
    text = pdf_text(out)
    assert NO_TUMOUR.encode() in text
    assert FAST_MODE_LINE.encode() not in text


def test_figures_skip_montage_without_tumour(tmp_path):
    images, labels = write_inputs(tmp_path, ())
    figures = report_figures(images, labels)
    assert set(figures) == {"triplanar_t1c", "triplanar_t2f"}
    assert all(png.startswith(b"\x89PNG") for png in figures.values())


def test_a_2023_run_draws_and_names_every_region_as_the_2024_run_does(tmp_path, monkeypatch):
    """The label convention changes the values in the NIfTI label maps a run writes, and nothing else: the
    report's overlays and legend come from the internal labels (a 2023 run once drew oedema as non-enhancing
    tumour and enhancing tumour as cyst)."""
    labels = np.zeros((16, 20, 24), np.uint8)
    labels[2:14, 3:17, 3:21] = 4  # ED around a core of all three core sub-regions
    labels[5:11, 6:14, 6:18] = 2
    labels[6:10, 7:13, 7:10] = 1
    labels[6:10, 7:13, 14:17] = 3
    fake_model_stages(monkeypatch, *tiny_atlas_case(tmp_path / "atlas", labels))
    session = write_session(tmp_path / "dicom")
    runs = {convention: run_pipeline(session, tmp_path / convention, PipelineConfig(
        bundle=fake_bundle(tmp_path / f"bundle{convention}"), label_convention=convention))
        for convention in ("2024", "2023")}

    written = {c: sitk.GetArrayFromImage(sitk.ReadImage(str(r.outputs["nifti_labels_atlas"]))) for c, r in runs.items()}
    np.testing.assert_array_equal(written["2023"], convert_labels(written["2024"], "2024", "2023"))
    assert set(np.unique(written["2023"])) == {0, 1, 2, 3}  # NCR, ED, ET: the conversion really happened
    figures = {c: [image.data for page in PdfReader(r.outputs["pdf"]).pages for image in page.images]
               for c, r in runs.items()}
    assert len(figures["2024"]) >= 2  # the overlays (their legend is part of each figure)
    assert figures["2023"] == figures["2024"]


def test_rapno_endpoints_in_measurements_json_lie_on_the_lesion_in_the_patient(tmp_path):
    """Atlas coordinates are not the patient's: RAPNO is measured on the reference series' native label map, so the
    endpoints measurements.json gives lie on the lesion's border in that series' own LPS space."""
    _, atlas_labels = phantom(blobs=((np.array([-20.0, 10.0, 5.0]), 14.0),))
    atlas_to_native = sitk.Euler3DTransform((0, 0, 0), np.radians(8), np.radians(-5), np.radians(20), (35, -25, 40))
    native_grid = sitk.Image([96] * 3, sitk.sitkUInt8)  # where the head lay in the scanner: moved and turned
    native_grid.SetSpacing((2.0, 2.0, 2.0))
    native_grid.SetOrigin((-60.0, -110.0, -50.0))
    native_labels = sitk.Resample(atlas_labels, native_grid, atlas_to_native.GetInverse(), sitk.sitkNearestNeighbor)
    measured = measure(atlas_labels, native_labels, qc_flags=[])
    doc = json.loads(write_measurements_json(measured, tmp_path / "m.json", context=CONTEXT).read_text())
    (lesion,) = doc["rapno"]["lesions"]
    tumour = np.argwhere(region_mask(sitk.GetArrayFromImage(native_labels), "TC"))[:, ::-1]  # (x, y, z) index
    tumour_lps = np.array([native_labels.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in tumour])
    ends = np.array(lesion["endpoints_lps_mm"] + lesion["perp_endpoints_lps_mm"])
    nearest = np.min(np.linalg.norm(tumour_lps[None] - ends[:, None], axis=-1), axis=1)
    assert nearest.max() <= 2.0 * np.sqrt(3)  # on the lesion, within a native voxel
    atlas_ends = np.array(measure(atlas_labels, None, qc_flags=[]).rapno.lesions[0].endpoints_lps_mm)
    assert np.min(np.linalg.norm(tumour_lps[None] - atlas_ends[:, None], axis=-1)) > 20  # atlas mm are elsewhere
    assert np.linalg.norm(ends[0] - ends[1]) == pytest.approx(lesion["longest_mm"], abs=0.01)


INTERNAL_KEYS = ("step_seconds", "stage_seconds", "t1c_to_atlas_mattes_mi", "t2f_to_t1c_mattes_mi", "_vs_",
                 "brain_inside_atlas_brain", "mask_fraction_of_head", "similarity_in_brain", "series_instance_uids")


def rendered_report(tmp_path):
    """A report whose inputs carry every kind of internal key (QC metrics, stage timings, provenance), rendered
    page by page with poppler: (PNG paths, the text pdftotext reads)."""
    images, labels = write_inputs(tmp_path, ONE_BLOB)
    m = measure(labels, labels, qc_flags=[])
    identification = Identification(
        decisions=[SeriesDecision("1.2.3", 7, "AX T1 POST", "t1c", 0.95, ["contrast agent"], True),
                   SeriesDecision("1.2.4", 9, "AX FLAIR", "t2f", 0.9, ["inversion time"], True)],
        chosen={"t1c": "1.2.3", "t2f": "1.2.4"}, missing=["t1n", "t2w"])
    qc = passing_qc(registration={"t1c_to_atlas_mattes_mi": -0.4553, "t2f_to_t1c_mattes_mi": -0.81},
                    similarity_in_brain={"t2f_vs_t1c": Similarity(nmi=1.21, peak=1.08)},
                    step_seconds={"convert": 1.5}, flags=("t2f to t1c alignment is not a clear similarity peak "
                                                          "(1.08 < 1.15): check the registration",))
    provenance = {"pedseg_version": "0.1.0", "packages": {"highdicom": "0.28.2"},
                  "bundle": {"name": "pedseg-demo", "version": "0.1.0", "licence": "CC-BY-4.0", "sha256": "ab" * 32},
                  "inputs": {"series_instance_uids": {"t1c": "1.2.3", "t2f": "1.2.4"}}, "device": "cpu",
                  "models": ["3d_fullres"], "folds": ["0", "1"], "tta": True, "fast_mode": False,
                  "postprocessing": [{"step": "drop whole-tumour components", "voxels_changed": 12}],
                  "stage_seconds": {"ingest": 1.5, "infer": 12.5}, "qc": qc.as_dict()}
    out = write_report_pdf(tmp_path / "report.pdf", images=images, labels=labels, measurements=m,
                           identification=identification, qc=qc, provenance=provenance,
                           context=StudyContext("SUBJ-0001", "20240102", 7.0, ""), fast_mode=False,
                           model_population="synthetic")
    subprocess.run(["pdftoppm", "-r", "70", "-png", str(out), str(tmp_path / "page")], check=True, timeout=120)
    text = subprocess.run(["pdftotext", str(out), "-"], check=True, capture_output=True, text=True,
                          timeout=120).stdout
    return sorted(tmp_path.glob("page-*.png")), text, m


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="poppler-utils not installed")
def test_every_page_renders_and_reads_without_internal_keys(tmp_path):
    pages, text, m = rendered_report(tmp_path)
    assert len(pages) == page_count(tmp_path / "report.pdf") >= 3
    assert all(png.stat().st_size > 5000 for png in pages)  # drawn, not blank
    for key in INTERNAL_KEYS:
        assert key not in text, key
    assert not re.findall(r"\b[a-z0-9]+_[a-z0-9_]+\b", text)  # no identifier-like snake_case word at all
    first = " ".join(text.split("\f")[0].split())
    text = " ".join(text.split())
    for words in ("SUBJ-0001", "pedseg-demo 0.1.0", "synthetic phantoms", "On the T1c series",
                  f"{m.regions['WT'].native_volume_ml:.3f}", "RAPNO", "Quality checks:", "1 fail"):
        assert words in first, words
    assert "Each series aligned with the post-contrast T1" in text
    assert "FAIL" in text and "similarity peak at least 1.15" in text  # the threshold beside the result
    assert "T2-FLAIR (t2f): series 9 'AX FLAIR'" in text  # series by number and name, not by UID
    assert "Appendix: provenance" in text
