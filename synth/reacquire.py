"""Re-acquire a real BraTS-space case as a DICOM MR session, the way `synth/session.py` images a phantom.

A real case already in BraTS space (four skull-stripped 1 mm images t1n, t1c, t2w, t2f on the 240x240x155 grid)
is imaged again, series by series, on one vendor's protocol grids (`synth/protocols.py`) in a realistic head
pose, and written as classic single-frame MR DICOM with that vendor's headers (`synth/dicom_writer.py`), so
the whole pipeline (ingest, identification, registration to the atlas, a trained model) can be run from DICOM
on real anatomy and real tumour contrast. With the default vendor (SIEMENS) the session holds, in acquisition
order:

| # | role | series | grid |
|---|------|--------|------|
| 1 | loc  | localizer: sagittal, coronal, axial planes, 3 slices each | 2 mm in-plane, 6 mm slices |
| 2 | t1n  | t1_mprage_sag_p2_iso, 3D sagittal MPRAGE | 1 mm isotropic, 240 x 240 x 176 |
| 3 | t2w  | t2_tse_tra_4mm, 2D axial TSE | 0.9 mm in-plane, 4 mm slices, 244 x 244 x 40 |
| 4 | t2f  | t2_tirm_tra_dark-fluid_5mm, 2D axial FLAIR, 12 degrees oblique | 0.9 mm in-plane, 5 mm slices, 32 slices |
| 5 | dwi  | ep2d_diff_3scan_trace_p2, b0 and b1000 (a distractor) | 1.8 mm in-plane, 5 mm slices |
| 6 | t1c  | t1_mprage_sag_p2_iso_post, 3D sagittal MPRAGE after Gadovist | 1 mm isotropic |

(Philips is alike; GE's protocol has a 3D sagittal CUBE FLAIR instead of the 2D axial one.)

Pose. Every series sees the head through its own transform, scanner point p -> BraTS point q = R p + t, with
the scanner isocentre (the centre of every series' grid) at the brain's centroid: one head placement per session
(a nod of up to `placement_deg` about the left-right axis, up to a third of it about the other two axes, a few mm
off centre) and, on top of it, each series' own motion from `subject_pose` (up to 3 degrees about a random axis
and 3 mm). These transforms are the ground truth (`ground_truth/pose_<role>.tfm`, readable with
`sitk.ReadTransform`); resampling a series with the inverse transform onto the BraTS grid puts it back on the
original images, which are the reference for anything computed from the session.

Intensities. The images are real MR data: no bias field and no noise are added (`acquire(..., corrupt=False)`),
only the scanner's resampling: linear interpolation and, for 2D series, the slice profile (a Gaussian of the
slice thickness as FWHM). Negative values (interpolation overshoot of BraTS preprocessing) are clipped to 0 and
an image whose maximum exceeds the writer's 12-bit range is scaled down by one factor per series (recorded in
`ground_truth/summary.json`), as a scanner scales its reconstruction.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pedseg.pipeline.atlas import brats_reference_grid
from pedseg.pipeline.types import ROLES
from pedseg.synth.acquire import SeriesGeometry, acquire, native_grid, subject_pose
from pedseg.synth.dicom_writer import StudyInfo, write_series
from pedseg.synth.protocols import VENDORS, Protocol, session_protocols

logger = logging.getLogger(__name__)

# The writer stores 12 bits (BitsStored 12); brighter images are scaled into this range.
MAX_STORED = 4095
# File-name tokens of the four roles, as BraTS 2023+ (`-t1n`), older BraTS and TCGA tutorial data (`_t1`,
# `_flair`, `_fla`) name them; a trailing `_bet` (brain-extracted) is ignored.
ROLE_TOKENS = {
    "t1n": ("t1n", "t1"),
    "t1c": ("t1c", "t1ce", "t1gd"),
    "t2w": ("t2w", "t2"),
    "t2f": ("t2f", "flair", "fla"),
}
LOCALIZER_PLANES = ("sag", "cor", "ax")


def find_case_images(folder: Path) -> dict[str, Path]:
    """The four role images of a case folder, by file-name token (`*-t1n.nii.gz`, `*_t1c_bet.nii.gz`, ...).

    Other NIfTI files (segmentations, consensus labels) are ignored; a role found twice or not at all raises
    ValueError.
    """
    found: dict[str, list[Path]] = {role: [] for role in ROLES}
    for path in sorted(Path(folder).glob("*.nii*")):
        role = _role_of(path)
        if role:
            found[role].append(path)
    problems = [f"{role}: {len(paths)} files" for role, paths in found.items() if len(paths) != 1]
    if problems:
        raise ValueError(f"{folder} does not hold exactly one image per role ({'; '.join(problems)})")
    return {role: paths[0] for role, paths in found.items()}


def _role_of(path: Path) -> str | None:
    stem = re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)
    stem = re.sub(r"[_-]bet$", "", stem, flags=re.IGNORECASE)
    token = re.split(r"[_\-.]", stem)[-1].lower()
    return next((role for role, tokens in ROLE_TOKENS.items() if token in tokens), None)


def case_name(images: dict[str, Path]) -> str:
    """The case identifier the file names share: 'BraTS-GLI-00001-000', 'TCGA-DU-7294'."""
    stem = re.sub(r"\.nii(\.gz)?$", "", Path(images["t1c"]).name, flags=re.IGNORECASE)
    stem = re.sub(r"[_-]bet$", "", stem, flags=re.IGNORECASE)
    return re.sub(r"[_\-.][^_\-.]+$", "", stem) or stem


def reacquire_session(images: dict[str, Path], outdir: Path, seed: int, *, vendor: str = "SIEMENS",
                      age: str = "045Y", sex: str = "O", placement_deg: float = 6.0, distractors: bool = True,
                      study_date: dt.date | None = None) -> Path:
    """Write the re-acquired DICOM session of a real BraTS-space case; return its DICOM folder.

    `images`: role (t1n, t1c, t2w, t2f) -> BraTS-space NIfTI (see `find_case_images`). `outdir` receives
    `dicom/<nn>_<role>/IM<nnnnn>.dcm` (the input for `pedseg run`) and `ground_truth/`: `pose_<role>.tfm` (scanner
    point -> BraTS point of each series) and `summary.json` (the source images, which stay the reference; vendor,
    study and series UIDs, each series' grid, pose, intensity scale and how much of the brain its field of view
    covers). `seed` fixes the study date and time, the head placement and the motion. `vendor`: a key of
    `protocols.VENDORS`; `age`: DICOM AS of the (adult) patient; `sex`: PatientSex (M, F or O);
    `placement_deg`: the largest nod of the head placement; `distractors`: also write the localizer and the
    DWI series, which identification must reject.
    """
    missing = [role for role in ROLES if role not in images]
    if missing:
        raise ValueError(f"images for {', '.join(missing)} missing")
    if vendor not in VENDORS:
        raise ValueError(f"unknown vendor {vendor!r}; one of {', '.join(VENDORS)}")
    rng = np.random.default_rng(seed)
    outdir = Path(outdir)
    volumes = {role: _read_brats_space(Path(images[role])) for role in ROLES}
    support = [sitk.GetArrayViewFromImage(v) != 0 for v in volumes.values()]
    brain = sitk.GetImageFromArray(np.logical_or.reduce(support).astype(np.uint8))
    brain.CopyInformation(volumes["t1c"])
    brain = sitk.BinaryFillhole(brain)
    centre = _centroid(brain)
    name = case_name(images)
    study = _study_info(rng, vendor, name, age, sex, study_date or dt.date(2026, 2, 2) + dt.timedelta(
        days=int(rng.integers(0, 300))))
    placement_r, placement_t = _head_placement(rng, placement_deg)
    dicom_dir, gt_dir = outdir / "dicom", outdir / "ground_truth"
    gt_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, dict] = {}
    for number, proto in enumerate(session_protocols(vendor), start=1):
        if proto.role in ("loc", "dwi") and not distractors:
            continue
        pose = _series_pose(placement_r, placement_t, subject_pose(centre, 1.0, rng))
        sitk.WriteTransform(pose, str(gt_dir / f"pose_{proto.role}.tfm"))
        extras = None
        if proto.role == "loc":
            grids = [SeriesGeometry(plane, 2.0, 6.0, 6.0, (260.0, 260.0, 18.0)) for plane in LOCALIZER_PLANES]
            native = [acquire(volumes["t1n"], pose, g, 1.0, rng, corrupt=False) for g in grids]
        elif proto.role == "dwi":
            b0 = acquire(volumes["t2w"], pose, proto.geometry, 1.0, rng, corrupt=False)
            native = [b0, sitk.Cast(b0 * 0.35, sitk.sitkFloat32)]
            extras = [{"DiffusionBValue": 0, "SequenceName": "*ep_b0"},
                      {"DiffusionBValue": 1000, "SequenceName": "*ep_b1000t"}]
        else:
            native = [acquire(volumes[proto.role], pose, proto.geometry, 1.0, rng, corrupt=False)]
        native, scale = _scanner_range(native)
        folder = dicom_dir / f"{number:02d}_{proto.role}"
        uid = write_series(native, proto, study, number, folder, extras)
        series[proto.role] = _series_facts(proto, number, folder, uid, native[0], pose, centre, scale,
                                           _coverage(brain, pose, proto) if proto.geometry else None)
    summary = {
        "case": name,
        "reference_images": {role: str(Path(images[role]).resolve()) for role in ROLES},
        "seed": seed,
        "vendor": vendor,
        "study_uid": study.study_uid,
        "study_date": study.study_date,
        "brain_centroid_mm": [round(c, 3) for c in centre],
        "pose": "pose_<role>.tfm maps a scanner (DICOM patient) point to the BraTS-space point it images",
        "series": series,
    }
    (gt_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("real case %s re-acquired as a %s session in %s", name, vendor, dicom_dir)
    return dicom_dir


def _read_brats_space(path: Path) -> sitk.Image:
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if image.GetSize() != brats_reference_grid().GetSize() or max(abs(s - 1.0) for s in image.GetSpacing()) > 1e-3:
        raise ValueError(f"{path.name} is not on the 240x240x155 1 mm BraTS grid "
                         f"(size {image.GetSize()}, spacing {image.GetSpacing()})")
    return image


def _centroid(mask: sitk.Image) -> tuple[float, float, float]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    return stats.GetCentroid(1)


def _study_info(rng: np.random.Generator, vendor: str, name: str, age: str, sex: str,
                study_date: dt.date) -> StudyInfo:
    years = int(age[:3]) if age[:3].isdigit() and age.endswith("Y") else 45
    birth = study_date - dt.timedelta(days=int(365.25 * years) + int(rng.integers(0, 300)))
    clean = re.sub(r"[^A-Za-z0-9]", "", name).upper()[:40] or "CASE"
    return StudyInfo.new_study(rng, patient_name=f"REACQUIRED^{clean}", patient_id=f"RAQ-{clean}"[:64],
                               birth_date=birth, sex=sex, age=age, study_date=study_date, vendor=vendor)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _head_placement(rng: np.random.Generator, max_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """How the head lies in the coil for the whole session: a nod about left-right (x), less roll and yaw,
    a few mm off the isocentre."""
    nod, roll, yaw = rng.uniform(-1, 1, 3) * np.array([max_deg, max_deg / 3, max_deg / 3])
    rotation = _rotation(0, nod) @ _rotation(1, roll) @ _rotation(2, yaw)
    return rotation, rng.uniform(-4, 4, 3)


def _series_pose(placement_r: np.ndarray, placement_t: np.ndarray,
                 motion: sitk.Similarity3DTransform) -> sitk.Euler3DTransform:
    """Scanner point p -> BraTS point: the series' motion (about the brain centre) after the head placement."""
    m = np.asarray(motion.GetMatrix()).reshape(3, 3)
    t = np.asarray(motion.GetTranslation())  # subject_pose rotates about the isocentre (its centre is 0)
    pose = sitk.Euler3DTransform()
    pose.SetMatrix(tuple(float(v) for v in (m @ placement_r).flatten()))
    pose.SetTranslation(tuple(float(v) for v in m @ placement_t + t))
    return pose


def _scanner_range(volumes: list[sitk.Image]) -> tuple[list[sitk.Image], float]:
    """Negative values clipped to 0; one factor for the whole series when it would overflow 12 bits."""
    clipped = [sitk.Clamp(v, sitk.sitkFloat32, 0.0) for v in volumes]
    peak = max(float(sitk.GetArrayViewFromImage(v).max()) for v in clipped)
    scale = min(1.0, MAX_STORED / peak) if peak > 0 else 1.0
    if scale < 1.0:
        clipped = [sitk.Cast(v * scale, sitk.sitkFloat32) for v in clipped]
    return clipped, scale


def _coverage(brain: sitk.Image, pose: sitk.Transform, proto: Protocol) -> float:
    """Fraction of the brain inside the series' field of view (slab included)."""
    grid = native_grid(proto.geometry, 1.0)
    inside = sitk.Image(grid.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(grid)
    # Half a voxel (half a slice) beyond the centres of the outer voxels still lies in the field of view.
    inside = sitk.ConstantPad(inside, [1, 1, 1], [1, 1, 1], 1)
    back = sitk.Resample(inside, brain, pose.GetInverse(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    brain_arr = sitk.GetArrayViewFromImage(brain) > 0
    return float(np.mean(sitk.GetArrayViewFromImage(back)[brain_arr] > 0))


def _series_facts(proto: Protocol, number: int, folder: Path, uid: str, image: sitk.Image,
                  pose: sitk.Euler3DTransform, centre, scale: float, coverage: float | None) -> dict:
    matrix = np.asarray(pose.GetMatrix()).reshape(3, 3)
    isocentre = np.asarray(pose.GetTranslation())
    return {
        "series_number": number,
        "series_uid": uid,
        "description": proto.description,
        "folder": folder.name,
        "plane": proto.geometry.plane if proto.geometry else "sag+cor+ax",
        "acquisition_type": proto.acquisition_type,
        "size": list(image.GetSize()),
        "spacing_mm": [round(s, 4) for s in image.GetSpacing()],
        "slice_thickness_mm": proto.geometry.slice_thickness_mm if proto.geometry else 6.0,
        "direction": [round(v, 6) for v in image.GetDirection()],
        # The head's rotation from the BraTS orientation, and where the scanner isocentre lies in BraTS space
        # (the brain centroid plus the placement and motion offsets).
        "head_rotation_deg": round(float(np.rad2deg(np.arccos(np.clip((np.trace(matrix) - 1) / 2, -1, 1)))), 3),
        "isocentre_from_brain_centroid_mm": [round(float(v), 3) for v in isocentre - np.asarray(centre)],
        "intensity_scale": round(scale, 6),
        "brain_coverage": None if coverage is None else round(coverage, 5),
    }
