"""DICOM SEG, SR and encapsulated PDF outputs on synthetic MR series in three geometries.

The phantom is asymmetric (an L-shaped ET block left-anterior-superior, NET under it, ED right-posterior-
inferior, CC empty), lives on a flipped 1 mm grid unlike any DICOM grid here, and the series' files are
written and passed in shuffled order: any flip, transpose or ordering bug moves a label's centroid by
centimetres.
"""
from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.uid
import pytest
import SimpleITK as sitk
import skimage.color
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from pedseg.pipeline.errors import InternalError
from pedseg.pipeline.labels import BASE_REGIONS, INTERNAL, LABEL_VALUES, REGIONS
from pedseg.pipeline.types import Measurements, Rapno, RegionMeasure
from pedseg.reporting import codes
from pedseg.reporting.dicom_pdf import write_encapsulated_pdf
from pedseg.reporting.dicom_seg import load_sources, write_seg
from pedseg.reporting.dicom_sr import write_sr

from factories import dicom_dataset, write_dicom
from readers import read_seg_labels, read_sr_volumes

ROWS, COLS, SLICES = 64, 56, 20  # not square, and anisotropic pixels: a transpose or swapped spacing shows
PIXEL_SPACING = (2.5, 3.0)  # (between rows, between columns)
SLICE_STEP = 5.0


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


_OBLIQUE = _rotation(2, 15) @ _rotation(0, 20)
GEOMETRIES = {
    "axial": ((1, 0, 0), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "oblique": (tuple(_OBLIQUE[:, 0]), tuple(_OBLIQUE[:, 1])),
    # Feet-first supine: the scanner's axial rows run from the patient's left to right (IOP -1,0,0 / 0,1,0).
    "axial_feet_first": ((-1, 0, 0), (0, 1, 0)),
}


@dataclass
class Series:
    files: list[Path]  # shuffled
    ipps: np.ndarray  # (SLICES, 3) in ascending order along the slice normal
    row_dir: np.ndarray
    col_dir: np.ndarray


def _mr_slice(k: int, ipp: np.ndarray, iop: list[float], uids: dict[str, str], position: str = "HFS") -> Dataset:
    return dicom_dataset(
        pixels=np.full((ROWS, COLS), 100 + k), SpecificCharacterSet="ISO_IR 100", PatientName="Phantom^Test",
        PatientID="PHANTOM-001", PatientBirthDate="20150601", PatientSex="F", StudyInstanceUID=uids["study"],
        SeriesInstanceUID=uids["series"], FrameOfReferenceUID=uids["frame"], StudyDate="20240301",
        SeriesDate="20240301", ContentDate="20240301", StudyTime="101500", SeriesTime="101500", ContentTime="101500",
        StudyID="1", AccessionNumber="ACC1", ReferringPhysicianName="", Modality="MR", Manufacturer="Synthetic",
        SeriesNumber=7, SeriesDescription="T1 post contrast", InstanceNumber=k + 1,
        ImageType=["ORIGINAL", "PRIMARY", "OTHER"], ScanningSequence="GR", SequenceVariant="SP", ScanOptions="",
        MRAcquisitionType="3D", RepetitionTime=2000.0, EchoTime=3.0, EchoTrainLength=1, MagneticFieldStrength=3.0,
        SliceThickness=SLICE_STEP, PositionReferenceIndicator="", PatientPosition=position, BodyPartExamined="BRAIN",
        ImagePositionPatient=[round(float(v), 6) for v in ipp],
        ImageOrientationPatient=[round(float(v), 6) for v in iop],
        PixelSpacing=list(PIXEL_SPACING), WindowCenter=110, WindowWidth=40)


def make_series(folder: Path, geometry: str, seed: int = 0) -> Series:
    row_dir, col_dir = (np.asarray(v, float) for v in GEOMETRIES[geometry])
    normal = np.cross(row_dir, col_dir)
    first = (-(COLS - 1) / 2 * PIXEL_SPACING[1] * row_dir - (ROWS - 1) / 2 * PIXEL_SPACING[0] * col_dir
             - (SLICES - 1) / 2 * SLICE_STEP * normal)
    ipps = np.array([first + k * SLICE_STEP * normal for k in range(SLICES)])
    # Rounded like the headers, so the test's expected grid is the one written to disk.
    ipps = np.round(ipps, 6)
    iop = [*row_dir, *col_dir]
    uids = {key: pydicom.uid.generate_uid() for key in ("study", "series", "frame")}
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(SLICES))
    rng = random.Random(seed)
    rng.shuffle(order)
    files = []
    for k in order:
        path = folder / f"{rng.getrandbits(32):08x}.dcm"
        position = "FFS" if geometry.endswith("feet_first") else "HFS"
        write_dicom(_mr_slice(k, ipps[k], iop, uids, position), path)
        files.append(path)
    return Series(files, ipps, np.round(row_dir, 6), np.round(col_dir, 6))


def phantom() -> sitk.Image:
    """1 mm grid stored flipped in x and y (as a RAS-minded NIfTI writer would), origin off the DICOM grid."""
    size = 201
    arr = np.zeros((size, size, size), np.uint8)  # (z, y, x) array index of the flipped grid
    origin = np.array([100.4, 100.4, -100.4])

    def box(x0, x1, y0, y1, z0, z1, value):
        # Physical LPS ranges → indices of this grid (x and y axes run towards -x and -y).
        xi = slice(int(origin[0] - x1), int(origin[0] - x0))
        yi = slice(int(origin[1] - y1), int(origin[1] - y0))
        zi = slice(int(z0 - origin[2]), int(z1 - origin[2]))
        arr[zi, yi, xi] = value

    box(15, 35, -35, -15, 15, 22, 1)  # ET foot: left (+x), anterior (-y), superior (+z)
    box(15, 22, -35, -15, 22, 40, 1)  # ET upright: the L
    box(15, 35, -35, -15, 2, 15, 2)  # NET under the ET
    box(-35, -12, 5, 30, -30, -8, 4)  # ED: right, posterior, inferior
    image = sitk.GetImageFromArray(arr)
    image.SetOrigin(origin.tolist())
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return image


def expected_on_dicom_grid(labels: sitk.Image, series: Series) -> np.ndarray:
    """Nearest-neighbour sampling of `labels` at every DICOM pixel centre, computed with plain numpy."""
    r, c = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
    offsets = (c[..., None] * PIXEL_SPACING[1] * series.row_dir + r[..., None] * PIXEL_SPACING[0] * series.col_dir)
    points = series.ipps[:, None, None, :] + offsets[None]  # (slices, rows, cols, xyz)
    direction = np.asarray(labels.GetDirection()).reshape(3, 3)
    continuous = (points - np.asarray(labels.GetOrigin())) @ np.linalg.inv(direction).T
    index = np.floor(continuous / np.asarray(labels.GetSpacing()) + 0.5).astype(int)  # ITK rounds half up
    arr = sitk.GetArrayFromImage(labels)
    inside = np.all((index >= 0) & (index < np.asarray(labels.GetSize())), axis=-1)
    out = np.zeros(points.shape[:3], np.uint8)
    i = index[inside]
    out[inside] = arr[i[:, 2], i[:, 1], i[:, 0]]
    return out


def centroid_mm(mask: np.ndarray, index_to_lps) -> np.ndarray:
    """Mean LPS position of a boolean array's voxels; `index_to_lps` maps (n, 3) array indices to mm."""
    return index_to_lps(np.argwhere(mask).astype(float)).mean(axis=0)


def sitk_index_to_lps(image: sitk.Image):
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    return lambda zyx: origin + (zyx[:, ::-1] * spacing) @ direction.T


def affine_index_to_lps(affine: np.ndarray):
    return lambda ijk: ijk @ affine[:3, :3].T + affine[:3, 3]


def dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")

ALGORITHM = {"algorithm_name": "pedseg-nnunet", "algorithm_version": "0.1.0"}
ONE_VOXEL_MM = max(*PIXEL_SPACING, SLICE_STEP)


@pytest.fixture(scope="module")
def labels() -> sitk.Image:
    return phantom()


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def written(request, tmp_path_factory, labels):
    folder = tmp_path_factory.mktemp(request.param)
    series = make_series(folder / "mr", request.param)
    seg_path = write_seg(labels, series.files, folder / "out" / "seg.dcm", **ALGORITHM)
    return series, seg_path


def test_seg_frames_match_source_grid_exactly(written, labels):
    series, seg_path = written
    expected = expected_on_dicom_grid(labels, series)
    assert set(np.unique(expected)) == {0, 1, 2, 4}  # the phantom really lands in the series
    np.testing.assert_array_equal(read_seg_labels(seg_path, series.files), expected)


def test_seg_frames_reference_their_source_images(written):
    series, seg_path = written
    seg = pydicom.dcmread(seg_path)
    sources = {ds.SOPInstanceUID: ds for ds in load_sources(series.files)}
    assert seg.NumberOfFrames == len(sources) * len(REGIONS)  # all frames of all segments, empty ones too
    seen = []
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[uid].ImagePositionPatient])
        seen.append((segment, uid))
    assert sorted(seen) == sorted((codes.SEGMENT_NUMBERS[name], uid) for name in REGIONS for uid in sources)


def test_seg_labels_keep_patient_coordinates_highdicom(written, labels):
    series, seg_path = written
    volume = hd.seg.segread(seg_path).get_volume(segment_numbers=[1, 2, 3, 4], combine_segments=True)
    source_lps = sitk_index_to_lps(labels)
    for value in (1, 2, 4):
        before = centroid_mm(sitk.GetArrayFromImage(labels) == value, source_lps)
        after = centroid_mm(volume.array == value, affine_index_to_lps(volume.affine))
        assert np.linalg.norm(after - before) <= ONE_VOXEL_MM, (value, before, after)


def test_seg_segments_are_coded_and_composites_are_unions(written):
    _, seg_path = written
    seg = hd.seg.segread(seg_path)
    assert seg.SegmentsOverlap == "YES"
    assert seg.ContentQualification == "RESEARCH"
    for region in REGIONS.values():
        desc = seg.get_segment_description(codes.SEGMENT_NUMBERS[region.name])
        assert desc.segment_label == region.display_name
        assert desc.segmented_property_type == codes.PROPERTY_TYPES[region.name]
        lab = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue).lab
        rgb = skimage.color.lab2rgb(np.array([[lab]]))[0, 0] * 255  # the PDF overlays' colours too
        np.testing.assert_allclose(rgb, region.colour, atol=2)
        assert desc.segmented_property_category == dcm_codes.SCT.MorphologicallyAbnormalStructure
        assert desc.anatomic_regions[0] == dcm_codes.SCT.Brain
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert desc.algorithm_identification[0].AlgorithmName == ALGORITHM["algorithm_name"]
    vol = seg.get_volume().array  # (frames, rows, cols, segments)
    np.testing.assert_array_equal(vol[..., 4], vol[..., 0:3].any(axis=-1))
    np.testing.assert_array_equal(vol[..., 5], vol[..., 0:4].any(axis=-1))


def test_region_codes_come_from_the_segmentation_context_groups():
    assert set(codes.PROPERTY_TYPES) == set(REGIONS)
    for name, code in codes.PROPERTY_TYPES.items():
        assert code in dcm_codes.cid7159.concepts.values(), name
    assert codes.CATEGORY in dcm_codes.cid7150.concepts.values()
    assert [codes.SEGMENT_NUMBERS[name] for name in REGIONS] == [1, 2, 3, 4, 5, 6]
    for name in BASE_REGIONS:  # a sub-region's segment number is its internal label value
        assert codes.SEGMENT_NUMBERS[name] == LABEL_VALUES[INTERNAL][name]


def test_seg_from_enhanced_multiframe_source(tmp_path, labels):
    series = make_series(tmp_path / "mr", "oblique", seed=3)
    legacy = [pydicom.dcmread(f) for f in series.files]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(legacy, hd.UID(), 8, hd.UID(), 1)
    enhanced_path = tmp_path / "enhanced.dcm"
    pydicom.dcmwrite(enhanced_path, enhanced, enforce_file_format=True)
    seg_path = write_seg(labels, [enhanced_path], tmp_path / "seg.dcm", **ALGORITHM)
    got = read_seg_labels(seg_path, [enhanced_path])
    # Compare position by position: the converter decides the frame order.
    frame_ipps = [
        [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        for frame in pydicom.dcmread(enhanced_path, stop_before_pixels=True).PerFrameFunctionalGroupsSequence
    ]
    order = [int(np.argmin(np.abs(series.ipps - ipp).sum(axis=1))) for ipp in frame_ipps]
    np.testing.assert_array_equal(got, expected_on_dicom_grid(labels, series)[order])


def test_seg_rejects_labels_outside_the_convention(tmp_path):
    series = make_series(tmp_path / "mr", "axial")
    bad = sitk.Image(8, 8, 8, sitk.sitkUInt8) + 7
    with pytest.raises(InternalError, match=r"values 7..7; the DICOM SEG expects the internal labels 0..4"):
        write_seg(bad, series.files, tmp_path / "seg.dcm", **ALGORITHM)
    assert not (tmp_path / "seg.dcm").exists()


def _measurements() -> Measurements:
    volumes = {"ET": 4.2, "NET": 3.1, "CC": 0.0, "ED": 12.75, "TC": 7.3, "WT": 20.05}
    regions = {name: RegionMeasure(name, int(ml * 1000), ml, 1 if ml else 0) for name, ml in volumes.items()}
    return Measurements(regions=regions, rapno=Rapno("TC", (), 0.0, 0, 5, 5.0), qc_flags=[])


def test_sr_volumes_round_trip_and_tracking_uids(written, tmp_path):
    series, seg_path = written
    given = {"WT": pydicom.uid.generate_uid(), "ET": pydicom.uid.generate_uid()}
    sr_path, uids = write_sr(_measurements(), seg_path, series.files, tmp_path / "sr.dcm", tracking_uids=given,
                             **ALGORITHM)
    assert read_sr_volumes(sr_path) == pytest.approx({n: r.volume_ml for n, r in _measurements().regions.items()})
    assert set(uids) == set(REGIONS)
    assert uids["WT"] == given["WT"]
    assert uids["ET"] == given["ET"]
    assert len(set(uids.values())) == len(uids)

    sr = hd.sr.srread(sr_path)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    assert sr.SeriesInstanceUID != seg.SeriesInstanceUID
    assert sr.ContentQualification == "RESEARCH"
    assert sr.content.get_observer_contexts(observer_type=dcm_codes.DCM.Device)
    assert not sr.content.get_observer_contexts(observer_type=dcm_codes.DCM.Person)
    for name in REGIONS:
        (group,) = sr.content.get_volumetric_roi_measurement_groups(tracking_uid=uids[name])
        assert group.tracking_identifier == name
        assert group.finding_type == codes.PROPERTY_TYPES[name]
        assert group.reference_type == dcm_codes.DCM.ReferencedSegment
        segment_item = group.referenced_segment[0]
        assert segment_item.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment_item.referenced_segment_numbers == [codes.SEGMENT_NUMBERS[name]]

    _, again_uids = write_sr(_measurements(), seg_path, series.files, tmp_path / "sr2.dcm", tracking_uids=uids,
                                 **ALGORITHM)
    assert again_uids == uids


def test_sr_fresh_uids_without_tracking(written, tmp_path):
    series, seg_path = written
    _, first = write_sr(_measurements(), seg_path, series.files, tmp_path / "a.dcm", **ALGORITHM)
    _, second = write_sr(_measurements(), seg_path, series.files, tmp_path / "b.dcm", **ALGORITHM)
    assert not set(first.values()) & set(second.values())


MINIMAL_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)


def test_encapsulated_pdf(tmp_path):
    series = make_series(tmp_path / "mr", "axial")
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(MINIMAL_PDF)
    out = write_encapsulated_pdf(pdf, series.files, tmp_path / "report.dcm", title="Tumor volumetry report")
    ds = pydicom.dcmread(out)
    src = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    assert ds.SOPClassUID == pydicom.uid.EncapsulatedPDFStorage
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.DocumentTitle == "Tumor volumetry report"
    assert len(MINIMAL_PDF) % 2 == 1  # so the even-length padding of the OB value is exercised
    assert ds.EncapsulatedDocumentLength == len(MINIMAL_PDF)
    assert bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength] == MINIMAL_PDF


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(written, tmp_path):
    series, seg_path = written
    sr_path, _ = write_sr(_measurements(), seg_path, series.files, tmp_path / "sr.dcm", **ALGORITHM)
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(MINIMAL_PDF)
    pdf_path = write_encapsulated_pdf(pdf, series.files, tmp_path / "report.dcm", title="Report")
    for path in (seg_path, sr_path, pdf_path):
        assert dciodvfy_errors(path) == [], path.name
