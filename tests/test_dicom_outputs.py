"""DICOM SEG, SR and encapsulated PDF outputs on synthetic MR series in three geometries.

The phantom is asymmetric (an L-shaped ET block left-anterior-superior, NET under it, ED right-posterior-
inferior, CC empty), lives on a flipped 1 mm grid unlike any DICOM grid here, and the series' files are
written and passed in shuffled order: any flip, transpose or ordering bug moves a label's centroid by
centimetres.
"""
from __future__ import annotations

import datetime
import json
import random
import shutil
import subprocess
import sys
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

from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import InternalError
from pedseg.pipeline.labels import BASE_REGIONS, COMPOSITES, INTERNAL, LABEL_VALUES, REGIONS, region_values
from pedseg.reporting import codes
from pedseg.reporting.derived import COMPOSITE_SEG_INDEX, PATIENT_STUDY_ATTRIBUTES, SR_INDEX, RunStamp
from pedseg.reporting.dicom_pdf import write_encapsulated_pdf
from pedseg.reporting.dicom_seg import load_sources, segment_volumes_ml, write_seg
from pedseg.reporting.dicom_sr import write_sr

from factories import (
    dicom_dataset,
    fake_pipeline_run,
    write_dicom,
)
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
        PatientID="PHANTOM-001", PatientBirthDate="20150601", PatientSex="F", PatientAge="008Y",
        PatientAddress="1 Phantom Road", OtherPatientNames="Other^Name", StudyInstanceUID=uids["study"],
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


def make_series(folder: Path, geometry: str, seed: int = 0, study_uid: str | None = None) -> Series:
    row_dir, col_dir = (np.asarray(v, float) for v in GEOMETRIES[geometry])
    normal = np.cross(row_dir, col_dir)
    first = (-(COLS - 1) / 2 * PIXEL_SPACING[1] * row_dir - (ROWS - 1) / 2 * PIXEL_SPACING[0] * col_dir
             - (SLICES - 1) / 2 * SLICE_STEP * normal)
    ipps = np.array([first + k * SLICE_STEP * normal for k in range(SLICES)])
    # Rounded like the headers, so the test's expected grid is the one written to disk.
    ipps = np.round(ipps, 6)
    iop = [*row_dir, *col_dir]
    uids = {key: pydicom.uid.generate_uid() for key in ("study", "series", "frame")}
    uids["study"] = study_uid or uids["study"]
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
    """The sub-region SEG and the composite SEG of one series, as a run writes them (one stamp)."""
    folder = tmp_path_factory.mktemp(request.param)
    series = make_series(folder / "mr", request.param)
    stamp = RunStamp.now(ALGORITHM["algorithm_name"])
    seg_path = write_seg(labels, series.files, folder / "out" / "seg.dcm", stamp=stamp, **ALGORITHM)
    composites = write_seg(labels, series.files, folder / "out" / "composites.dcm", stamp=stamp,
                           regions=COMPOSITES, series_index=COMPOSITE_SEG_INDEX, **ALGORITHM)
    return series, seg_path, composites


def test_seg_frames_match_source_grid_exactly(written, labels):
    series, seg_path, _ = written
    expected = expected_on_dicom_grid(labels, series)
    assert set(np.unique(expected)) == {0, 1, 2, 4}  # the phantom really lands in the series
    np.testing.assert_array_equal(read_seg_labels(seg_path, series.files), expected)


def dcmqi_segments(seg_path: Path, series: Series, out: Path) -> dict[int, np.ndarray]:
    """dcmqi's segimage2itkimage (an independent C++ reader): segment number -> its mask sampled at every source
    pixel centre, in the frame order of `series.ipps`."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage"),
                    "--inputDICOM", str(seg_path), "--outputDirectory", str(out), "--outputType", "nrrd"],
                   check=True, capture_output=True, timeout=120)
    grid = sitk.Image(COLS, ROWS, SLICES, sitk.sitkUInt8)
    grid.SetOrigin(series.ipps[0].tolist())
    grid.SetSpacing((PIXEL_SPACING[1], PIXEL_SPACING[0], SLICE_STEP))
    grid.SetDirection(np.column_stack([series.row_dir, series.col_dir,
                                       np.cross(series.row_dir, series.col_dir)]).flatten().tolist())
    masks = {}
    meta = json.loads((out / "meta.json").read_text())
    for attributes in (item for group in meta["segmentAttributes"] for item in group):
        number = int(attributes["labelID"])
        image = sitk.ReadImage(str(out / f"{number}.nrrd"))
        on_grid = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        masks[number] = sitk.GetArrayFromImage(on_grid) > 0
    return masks


def test_dcmqi_reads_every_seg_voxel_for_voxel(written, labels, tmp_path):
    series, seg_path, composites = written
    expected = expected_on_dicom_grid(labels, series)
    masks = dcmqi_segments(seg_path, series, tmp_path / "sub-regions")
    assert np.sum([mask.astype(int) for mask in masks.values()], axis=0).max() == 1  # no voxel in two segments
    combined = np.zeros_like(expected)
    for number, mask in masks.items():
        combined[mask] = number  # segment number = internal label value
    np.testing.assert_array_equal(combined, expected)
    masks = dcmqi_segments(composites, series, tmp_path / "composites")
    for name, number in codes.segment_numbers(COMPOSITES).items():
        np.testing.assert_array_equal(masks[number], np.isin(expected, region_values(name)), err_msg=name)


def test_seg_omits_empty_frames_and_references_its_source_images(written, labels):
    series, seg_path, _ = written
    seg = pydicom.dcmread(seg_path)
    sources = {ds.SOPInstanceUID: ds for ds in load_sources(series.files)}
    expected = expected_on_dicom_grid(labels, series)
    ordered = load_sources(series.files)
    occupied = {(number, ordered[k].SOPInstanceUID) for name, number in codes.segment_numbers(BASE_REGIONS).items()
                for k in range(SLICES) if np.isin(expected[k], region_values(name)).any()}
    assert seg.NumberOfFrames == len(occupied) < SLICES * len(BASE_REGIONS)
    seen = []
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[uid].ImagePositionPatient])
        seen.append((segment, uid))
    assert sorted(seen) == sorted(occupied)


def test_seg_keeps_empty_frames_when_asked(tmp_path, labels):
    series = make_series(tmp_path / "mr", "axial")
    seg_path = write_seg(labels, series.files, tmp_path / "seg.dcm", keep_empty_frames=True, **ALGORITHM)
    assert pydicom.dcmread(seg_path, stop_before_pixels=True).NumberOfFrames == SLICES * len(BASE_REGIONS)


def test_seg_labels_keep_patient_coordinates_highdicom(written, labels):
    series, seg_path, _ = written
    volume = hd.seg.segread(seg_path).get_volume(combine_segments=True)
    source_lps = sitk_index_to_lps(labels)
    for value in (1, 2, 4):
        before = centroid_mm(sitk.GetArrayFromImage(labels) == value, source_lps)
        after = centroid_mm(volume.array == value, affine_index_to_lps(volume.affine))
        assert np.linalg.norm(after - before) <= ONE_VOXEL_MM, (value, before, after)


def test_sub_regions_do_not_overlap_and_composites_are_unions_in_their_own_seg(written, labels):
    series, seg_path, composite_path = written
    seg, composites = hd.seg.segread(seg_path), hd.seg.segread(composite_path)
    assert seg.SegmentsOverlap == "NO"
    assert composites.SegmentsOverlap == "YES"
    for dataset, regions in ((seg, BASE_REGIONS), (composites, COMPOSITES)):
        assert dataset.ContentQualification == "RESEARCH"
        assert [codes.region_of_segment(item) for item in dataset.SegmentSequence] == list(regions)
        for name, number in codes.segment_numbers(regions).items():
            region = REGIONS[name]
            desc = dataset.get_segment_description(number)
            assert desc.segment_label == region.display_name
            assert desc.segmented_property_type == codes.PROPERTY_TYPES[name]
            lab = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue).lab
            rgb = skimage.color.lab2rgb(np.array([[lab]]))[0, 0] * 255  # the PDF overlays' colours too
            np.testing.assert_allclose(rgb, region.colour, atol=2)
            assert desc.segmented_property_category == dcm_codes.SCT.MorphologicallyAbnormalStructure
            assert desc.anatomic_regions[0] == dcm_codes.SCT.Brain
            assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
            assert desc.algorithm_identification[0].AlgorithmName == ALGORITHM["algorithm_name"]
    uids = [ds.SOPInstanceUID for ds in load_sources(series.files)]
    both = composites.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    expected = expected_on_dicom_grid(labels, series)
    np.testing.assert_array_equal(both[..., 0], np.isin(expected, region_values("TC")))
    np.testing.assert_array_equal(both[..., 1], np.isin(expected, region_values("WT")))


def test_segments_written_by_other_tools_map_to_regions():
    def item(label, code=None):
        ds = Dataset()
        ds.SegmentLabel = label
        if code is not None:
            coded = Dataset()
            coded.CodeValue, coded.CodingSchemeDesignator, coded.CodeMeaning = code.value, code.scheme_designator, "x"
            ds.SegmentedPropertyTypeCodeSequence = [coded]
        return ds

    assert codes.region_of_segment(item("Segment_1", codes.PROPERTY_TYPES["ED"])) == "ED"  # the code decides
    assert codes.region_of_segment(item("Enhancing tumour")) == "ET"
    assert codes.region_of_segment(item("non-enhancing tumor")) == "NET"
    assert codes.region_of_segment(item("Whole_Tumor")) == "WT"
    assert codes.region_of_segment(item("liver", dcm_codes.SCT.Liver)) is None


def test_region_codes_come_from_the_segmentation_context_groups():
    assert set(codes.PROPERTY_TYPES) == set(REGIONS)
    for name, code in codes.PROPERTY_TYPES.items():
        assert code in dcm_codes.cid7159.concepts.values(), name
    assert codes.CATEGORY in dcm_codes.cid7150.concepts.values()
    for name, number in codes.segment_numbers(BASE_REGIONS).items():  # segment number = internal label value
        assert number == LABEL_VALUES[INTERNAL][name]


# Each region's segmented property type (the SEG's segment code and the SR's finding type), pinned with where it
# was checked (issue 17):
# - CID: DICOM PS3.16 CID 7159 "Lesion Segmentation Types" / CID 7169 "Brain Lesion Segmentation Types Without
#   Necrosis" (pydicom/sr/_cid_dict.py);
# - MHub: the SegDB segment MHub's brain tumour model writes (MHubAI/models models/bamf_mr_brain_tumor/meta.json,
#   its config in https://github.com/MHubAI/models/pull/93): ENHANCING_LESION "Enhancing Lesion" NCIt, EDEMA
#   (T_EDEMA_MABNORMALITY), NECROSIS; category C_MORPHOLOGICALLY_ABNORMAL_STRUCTURE; MHubAI/SegDB
#   segdb/data/types.csv for the brain (T_BRAIN_STRUCTURE 12738006).
# - "none": no SegDB/MHub segment found for the region; the CID 7159 code stands, unverified against SegDB.
REGION_CODES = {
    "ET": (("C113842", "NCIt", "Enhancing Lesion"), "CID 7159, 7169; MHub ENHANCING_LESION"),
    "NET": (("C81175", "NCIt", "Non-Enhancing Lesion"), "CID 7159, 7169; none (MHub has NECROSIS only)"),
    "CC": (("367643001", "SCT", "Cyst"), "CID 7159; none"),
    "ED": (("79654002", "SCT", "Edema"), "CID 7159, 7169; MHub EDEMA"),
    "TC": (("108369006", "SCT", "Neoplasm"), "CID 7159; none (SegDB's 86049000 asserts malignancy)"),
    "WT": (("52988006", "SCT", "Lesion"), "CID 7159; none"),
}


def test_region_code_triples_are_pinned_with_their_sources():
    assert {name: (code.value, code.scheme_designator, code.meaning) for name, code in codes.PROPERTY_TYPES.items()} \
        == {name: triple for name, (triple, _) in REGION_CODES.items()}
    for triple in ((codes.CATEGORY, ("49755003", "SCT", "Morphologically Abnormal Structure")),  # SegDB's category
                   (codes.ANATOMY, ("12738006", "SCT", "Brain"))):  # SegDB T_BRAIN_STRUCTURE: same code
        assert (triple[0].value, triple[0].scheme_designator, triple[0].meaning) == triple[1]
    for cid in ("7159", "7169"):  # the sources' CID claims hold
        values = {code.value for code in getattr(dcm_codes, f"cid{cid}").concepts.values()}
        assert {name for name, (triple, _) in REGION_CODES.items() if triple[0] in values} \
            == {name for name, (_, source) in REGION_CODES.items() if cid in source}, cid
    # MHub's NECROSIS (adult BraTS label 1) is read back as NET; never written.
    necrosis = Dataset()
    necrosis.SegmentLabel = "Segment_1"
    coded = Dataset()
    coded.CodeValue, coded.CodingSchemeDesignator, coded.CodeMeaning = "6574001", "SCT", "Necrosis"
    necrosis.SegmentedPropertyTypeCodeSequence = [coded]
    assert codes.region_of_segment(necrosis) == "NET"
    assert dcm_codes.SCT.Necrosis not in codes.PROPERTY_TYPES.values()


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


def tid1500_volumes(sr_path: Path, tmp_path: Path) -> dict[str, float]:
    """dcmqi's tid1500reader (independent of highdicom): tracking identifier -> Volume in mL, as written."""
    out = tmp_path / "tid1500.json"
    subprocess.run([shutil.which("tid1500reader") or str(Path(sys.executable).parent / "tid1500reader"),
                    "--inputDICOM", str(sr_path), "--outputMetadata", str(out)], check=True, capture_output=True,
                   timeout=120)
    volumes = {}
    for group in json.loads(out.read_text())["Measurements"]:
        for item in (m for m in group["measurementItems"] if m["quantity"]["CodeValue"] == codes.VOLUME.value):
            assert item["units"]["CodeValue"] == "ml"
            volumes[group["TrackingIdentifier"]] = item["value"]
    return volumes


def test_sr_volumes_are_the_segs_own_voxel_volumes(written, labels, tmp_path):
    series, seg_path, composites = written
    given = {"WT": pydicom.uid.generate_uid(), "ET": pydicom.uid.generate_uid()}
    sr_path, uids = write_sr([seg_path, composites], series.files, tmp_path / "sr.dcm", tracking_uids=given,
                             **ALGORITHM)
    expected = expected_on_dicom_grid(labels, series)
    voxel_ml = PIXEL_SPACING[0] * PIXEL_SPACING[1] * SLICE_STEP / 1000
    on_the_seg_grid = {name: float(f"{int(np.isin(expected, region_values(name)).sum()) * voxel_ml + 1e-9:.3f}")
                       for name in REGIONS}  # to 0.001 mL, halves up
    as_written = tid1500_volumes(sr_path, tmp_path)
    assert {name: float(text) for name, text in as_written.items()} == pytest.approx(on_the_seg_grid, abs=1e-9)
    assert all(len(text.partition(".")[2]) <= 3 for text in as_written.values()), as_written  # no float noise
    assert read_sr_volumes(sr_path) == {name: float(text) for name, text in as_written.items()}
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
    segs = {name: (seg_path, number) for name, number in codes.segment_numbers(BASE_REGIONS).items()}
    segs |= {name: (composites, number) for name, number in codes.segment_numbers(COMPOSITES).items()}
    for name in REGIONS:
        (group,) = sr.content.get_volumetric_roi_measurement_groups(tracking_uid=uids[name])
        assert group.tracking_identifier == name
        assert group.finding_type == codes.PROPERTY_TYPES[name]
        assert group.reference_type == dcm_codes.DCM.ReferencedSegment
        (measurement,) = group.get_measurements(name=codes.VOLUME)
        assert measurement.method == dcm_codes.DCM.SumOfSegmentedVoxelMethodForVolume  # says how it was measured
        segment_item = group.referenced_segment[0]
        path, number = segs[name]
        assert segment_item.referenced_sop_instance_uid == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert segment_item.referenced_segment_numbers == [number]
        # The SR's finding codes are the referenced segment's own codes, read back from the SEG file.
        (described,) = [item for item in pydicom.dcmread(path, stop_before_pixels=True).SegmentSequence
                        if item.SegmentNumber == number]
        assert group.finding_type == hd.sr.CodedConcept.from_dataset(described.SegmentedPropertyTypeCodeSequence[0])
        assert group.finding_category == hd.sr.CodedConcept.from_dataset(
            described.SegmentedPropertyCategoryCodeSequence[0])
        assert [site.value for site in group.finding_sites] == [
            hd.sr.CodedConcept.from_dataset(described.AnatomicRegionSequence[0])]

    _, again_uids = write_sr([seg_path, composites], series.files, tmp_path / "sr2.dcm", tracking_uids=uids,
                             **ALGORITHM)
    assert again_uids == uids


def test_sr_evidence_lists_every_input_series(written, tmp_path):
    series, seg_path, _ = written
    study = pydicom.dcmread(series.files[0], stop_before_pixels=True).StudyInstanceUID
    other = make_series(tmp_path / "flair", "axial", seed=5, study_uid=study)
    sr_path, _ = write_sr([seg_path], series.files + other.files, tmp_path / "sr.dcm", **ALGORITHM)
    sr = pydicom.dcmread(sr_path)
    listed = {item.SeriesInstanceUID: {ref.ReferencedSOPInstanceUID for ref in item.ReferencedSOPSequence}
              for study in sr.CurrentRequestedProcedureEvidenceSequence for item in study.ReferencedSeriesSequence}
    for files in (series.files, other.files):
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        assert listed[headers[0].SeriesInstanceUID] == {h.SOPInstanceUID for h in headers}
    assert pydicom.dcmread(seg_path, stop_before_pixels=True).SeriesInstanceUID in listed
    assert set(read_sr_volumes(sr_path)) == set(BASE_REGIONS)  # no composite SEG given: no composite groups


def test_sr_fresh_uids_without_tracking(written, tmp_path):
    series, seg_path, _ = written
    _, first = write_sr([seg_path], series.files, tmp_path / "a.dcm", **ALGORITHM)
    _, second = write_sr([seg_path], series.files, tmp_path / "b.dcm", **ALGORITHM)
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


def _all_objects(written, tmp_path, stamp: RunStamp) -> dict[str, Path]:
    series, seg_path, composites = written
    sr_path, _ = write_sr([seg_path, composites], series.files, tmp_path / "sr.dcm", stamp=stamp, **ALGORITHM)
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(MINIMAL_PDF)
    pdf_path = write_encapsulated_pdf(pdf, series.files, tmp_path / "report.dcm", title="Report", stamp=stamp)
    return {"seg": seg_path, "composites": composites, "sr": sr_path, "pdf": pdf_path}


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(written, tmp_path):
    for path in _all_objects(written, tmp_path, RunStamp.now("pedseg")).values():
        assert dciodvfy_errors(path) == [], path.name


def test_derived_objects_share_the_patient_and_study_and_tell_runs_apart(written, tmp_path):
    series, seg_path, _ = written
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    stamp = RunStamp(datetime.datetime(2026, 11, 30, 14, 5, 9), "pedseg-demo")
    objects = {name: pydicom.dcmread(path, stop_before_pixels=True)
               for name, path in _all_objects(written, tmp_path, stamp).items() if name in ("sr", "pdf")}
    objects |= {name: pydicom.dcmread(path, stop_before_pixels=True) for name, path in
                (("seg", seg_path), ("composites", written[2]))}
    for name, ds in objects.items():
        for keyword in PATIENT_STUDY_ATTRIBUTES:
            assert ds.get(keyword, "") == source.get(keyword, ""), (name, keyword)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesDate and ds.SeriesTime, name
        assert "PatientAddress" not in ds and "OtherPatientNames" not in ds  # only the allow-list travels
    assert objects["sr"].SeriesNumber == 914050901 and objects["sr"].SeriesDate == "20261130"
    assert objects["sr"].SeriesTime == "140509"
    assert objects["pdf"].SeriesNumber == 914050902
    numbers = [int(ds.SeriesNumber) for ds in objects.values()]
    assert len(set(numbers)) == len(numbers)
    assert objects["seg"].ContentCreatorName == "pedseg-nnunet^"  # the stamp each SEG of the fixture got
    (concept,) = objects["pdf"].ConceptNameCodeSequence
    assert (concept.CodeValue, concept.CodingSchemeDesignator) == ("18748-4", "LN")
    later = RunStamp(datetime.datetime(2026, 11, 30, 14, 5, 10), "pedseg-demo")
    assert later.series_number(SR_INDEX) != stamp.series_number(SR_INDEX)  # a re-run is a distinct series


# ----------------------------------------------------------------------------- the writers in a pipeline run


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """One run through the real runner and writers (preprocessing and inference replaced, as in
    factories.fake_model_stages) on a DICOM session whose sagittal T1c and axial FLAIR both cross the tumour."""
    tmp = tmp_path_factory.mktemp("run")
    result, session = fake_pipeline_run(tmp, seg_composites=True)
    return result, session


def _series_uid(folder: Path) -> str:
    return pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID


def test_a_run_writes_a_seg_on_each_configured_series_own_grid(pipeline_run):
    result, session = pipeline_run
    assert PipelineConfig().seg_roles == ("t1c", "t2f") and not PipelineConfig().seg_composites
    for key, role, regions in (("seg", "t1c", BASE_REGIONS), ("seg_t2f", "t2f", BASE_REGIONS),
                               ("seg_composites", "t1c", COMPOSITES), ("seg_composites_t2f", "t2f", COMPOSITES)):
        seg = hd.seg.segread(result.outputs[key])
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == _series_uid(session / role), key
        assert [codes.region_of_segment(item) for item in seg.SegmentSequence] == list(regions)
        assert seg.SegmentsOverlap == ("YES" if regions == COMPOSITES else "NO")
        volumes = segment_volumes_ml(result.outputs[key])
        assert volumes["WT" if regions == COMPOSITES else "ED"] > 0, key  # the tumour crosses both series
    files = sorted((session / "t2f").iterdir())
    flair = read_seg_labels(result.outputs["seg_t2f"], files)
    assert set(np.unique(flair)) == {0, 1, 2, 4}


def test_a_run_numbers_its_series_apart_and_lists_every_input_in_the_sr(pipeline_run):
    result, session = pipeline_run
    derived = [pydicom.dcmread(path, stop_before_pixels=True) for key, path in result.outputs.items()
               if path.suffix == ".dcm"]
    assert len(derived) == 6  # 4 SEGs, the SR, the PDF
    assert len({int(ds.SeriesNumber) for ds in derived}) == len(derived)
    assert len({(ds.SeriesDate, ds.SeriesTime) for ds in derived}) == 1  # one run, one stamp
    sr = pydicom.dcmread(result.outputs["sr"])
    listed = {item.SeriesInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
              for item in study.ReferencedSeriesSequence}
    chosen = {_series_uid(session / role) for role in ("t1n", "t1c", "t2w", "t2f")}
    assert chosen <= listed
    volumes = read_sr_volumes(result.outputs["sr"])
    on_t1c = segment_volumes_ml(result.outputs["seg"]) | segment_volumes_ml(result.outputs["seg_composites"])
    assert volumes == on_t1c  # the volumes of the SEGs the SR points at, not the atlas grid's


@needs_dciodvfy
def test_dciodvfy_reports_no_errors_on_a_runs_objects(pipeline_run):
    result, _ = pipeline_run
    for key, path in result.outputs.items():
        if path.suffix == ".dcm":
            assert dciodvfy_errors(path) == [], key


def test_a_runs_sr_draws_the_rapno_diameters_on_the_patient(pipeline_run, tmp_path):
    result, session = pipeline_run
    sr = hd.sr.srread(result.outputs["sr"])
    seg = pydicom.dcmread(result.outputs["seg"], stop_before_pixels=True)
    rapno = result.measurements.rapno
    assert rapno.lesions
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2 * len(rapno.lesions)
    # The fake stages hand the runner this map as the t1c's native one: RAPNO was measured on it.
    native = sitk.ReadImage(str(session.parent / "labels.nii.gz"))
    core = np.argwhere(np.isin(sitk.GetArrayFromImage(native), region_values(rapno.region)))
    core_lps = np.array([native.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in core])
    for number, lesion in enumerate(rapno.lesions, start=1):
        for kind, length in (("longest", lesion.longest_mm), ("perpendicular", lesion.perpendicular_mm)):
            (group,) = [g for g in groups if g.tracking_identifier == f"{rapno.region} lesion {number} {kind} diameter"]
            region = group.roi
            assert region.frame_of_reference_uid == seg.FrameOfReferenceUID
            points = region.value
            chord = np.linalg.norm(points[1] - points[0])
            # The perpendicular diameter is the chord's extent along the exact perpendicular (within 5 degrees).
            assert length - 0.01 <= chord <= length / np.cos(np.radians(rapno.tolerance_deg)) + 0.01
            # On the tumour core, in the native map's (the series') patient coordinates.
            assert np.min(np.linalg.norm(core_lps[None] - points[:, None], axis=-1), axis=1).max() <= 1.0
            (measurement,) = [m for m in group.get_measurements() if m.name.value != "RAPNO-BDP"]
            assert measurement.value == pytest.approx(length, abs=0.01)
    assert set(tid1500_volumes(result.outputs["sr"], tmp_path)) == set(BASE_REGIONS) | {"TC", "WT"}
