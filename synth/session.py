"""Synthetic DICOM sessions and synthetic training cases from one phantom model.

`generate_session` writes what a scanner would send (several series, each in its own native geometry and
pose, plus a localizer and a DWI distractor) and the ground truth. `generate_training_case` images the same
kind of phantom and places it in BraTS space as an ideal preprocessing would, for training the demo model.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pedseg.pipeline.atlas import brats_reference_grid
from pedseg.pipeline.types import ROLES
from pedseg.synth.acquire import (
    SeriesGeometry,
    acquire,
    ideal_atlas_view,
    labels_on_grid,
    native_grid,
    scale_about,
    subject_pose,
)
from pedseg.synth.dicom_writer import StudyInfo, write_series
from pedseg.synth.phantom import Phantom, make_phantom
from pedseg.synth.protocols import VENDORS, session_protocols

logger = logging.getLogger(__name__)
# Training cases of the demo bundle use seeds 0..N-1; these held-out cases are never trained on.
HOLDOUT_SEEDS = (9001, 9002, 9003, 9004)


def _brain_centre(phantom: Phantom) -> tuple[float, float, float]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(phantom.brain_mask)
    return stats.GetCentroid(1)


def _study_info(rng: np.random.Generator, vendor: str, head_scale: float, study_date: dt.date,
                subject_seed: int) -> StudyInfo:
    subject_rng = np.random.default_rng(subject_seed)
    age_years = int(subject_rng.integers(2, 6)) if head_scale < 0.9 else int(subject_rng.integers(6, 18))
    birth = study_date - dt.timedelta(days=int(365.25 * age_years) + int(subject_rng.integers(0, 300)))
    return StudyInfo.new_study(rng, patient_name=f"SYNTHETIC^PHANTOM{subject_seed:04d}",
                               patient_id=f"SYN{subject_seed:06d}", birth_date=birth,
                               sex=str(subject_rng.choice(["F", "M"])), age=f"{age_years:03d}Y",
                               study_date=study_date, vendor=vendor)


def _localizer_volumes(phantom: Phantom, pose, head_scale, rng) -> list[sitk.Image]:
    planes = []
    for plane in ("sag", "cor", "ax"):
        geom = SeriesGeometry(plane, 2.0, 6.0, 6.0, (260.0, 260.0, 18.0))
        planes.append(acquire(phantom.images["t1n"], pose, geom, head_scale, rng, noise=0.04))
    return planes


def generate_session(outdir: Path, seed: int, *, vendor: str | None = None, growth: float = 1.0,
                     subject_seed: int | None = None, study_date: dt.date | None = None) -> dict:
    """Write `outdir/dicom/<nn>_<desc>/*.dcm` and `outdir/ground_truth/`; return a summary dict.

    `subject_seed` fixes the child (head, tumour position and shape) so several sessions of one subject differ
    only by `growth` (tumour volume factor) and by pose and noise.
    """
    subject_seed = seed if subject_seed is None else subject_seed
    rng = np.random.default_rng(seed)
    vendor = vendor or list(VENDORS)[seed % len(VENDORS)]
    phantom = make_phantom(subject_seed, growth=growth)
    scale = phantom.params.head_scale
    centre = _brain_centre(phantom)
    study = _study_info(rng, vendor, scale, study_date or dt.date(2026, 1, 5) + dt.timedelta(days=seed % 300),
                        subject_seed)
    dicom_dir = outdir / "dicom"
    gt_dir = outdir / "ground_truth"
    gt_dir.mkdir(parents=True, exist_ok=True)
    series_uids: dict[str, str] = {}
    for number, proto in enumerate(session_protocols(vendor), start=1):
        pose = subject_pose(centre, scale, rng)
        # Ground-truth pose (scanner point -> phantom point) of every series, for registration accuracy tests.
        sitk.WriteTransform(pose, str(gt_dir / f"pose_{proto.role}.tfm"))
        folder = dicom_dir / f"{number:02d}_{proto.role}"
        if proto.role == "loc":
            volumes, extras = _localizer_volumes(phantom, pose, scale, rng), None
        elif proto.role == "dwi":
            b0 = acquire(phantom.images["t2w"], pose, proto.geometry, scale, rng, noise=0.05)
            b1000 = sitk.Cast(b0 * 0.35, sitk.sitkFloat32)
            volumes = [b0, b1000]
            extras = [{"DiffusionBValue": 0, "SequenceName": "*ep_b0"}, {"DiffusionBValue": 1000,
                                                                         "SequenceName": "*ep_b1000t"}]
        else:
            image = acquire(phantom.images[proto.role], pose, proto.geometry, scale, rng)
            volumes, extras = [image], None
            if proto.role == "t1c":
                truth = labels_on_grid(phantom.labels, pose, native_grid(proto.geometry, scale))
                sitk.WriteImage(truth, str(gt_dir / "labels_t1c_native.nii.gz"), useCompression=True)
        series_uids[proto.role] = write_series(volumes, proto, study, number, folder, extras)
    sitk.WriteImage(phantom.labels, str(gt_dir / "labels_atlas.nii.gz"), useCompression=True)
    summary = {
        "seed": seed,
        "subject_seed": subject_seed,
        "vendor": vendor,
        "growth": growth,
        "study_uid": study.study_uid,
        "study_date": study.study_date,
        "series_uids": series_uids,
        "tumour": asdict(phantom.params),
        "label_voxels_atlas": {
            str(k): int(v) for k, v in zip(*np.unique(sitk.GetArrayViewFromImage(phantom.labels),
                                                      return_counts=True)) if k
        },
    }
    (gt_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("synthetic session seed %d (%s) written to %s", seed, vendor, outdir)
    return summary


def generate_training_case(seed: int) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """Four skull-stripped BraTS-space images and their labels, as the pipeline's preprocessing would give them.

    Each sequence is imaged on its own vendor protocol grid (thick slices blur like real T2/FLAIR) and put back
    into BraTS space through the ideal rigid alignment, so the model learns from what inference will see.
    """
    rng = np.random.default_rng(seed)
    vendor = list(VENDORS)[seed % len(VENDORS)]
    phantom = make_phantom(seed)
    scale = phantom.params.head_scale
    centre = _brain_centre(phantom)
    protocols = {p.role: p for p in session_protocols(vendor)}
    ref = brats_reference_grid()
    to_phantom = scale_about(centre, scale)
    brain = sitk.Resample(phantom.brain_mask, ref, to_phantom, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # Brain extraction is never exact: jitter the mask border by a voxel or two, as deepbet's would vary.
    if rng.random() < 0.5:
        brain = sitk.BinaryDilate(brain, [int(rng.integers(0, 3))] * 3)
    else:
        brain = sitk.BinaryErode(brain, [1] * 3)
    images = {}
    for role in ROLES:
        pose = subject_pose(centre, scale, rng)
        native = acquire(phantom.images[role], pose, protocols[role].geometry, scale, rng)
        atlas_view = ideal_atlas_view(native, pose, centre, scale)
        images[role] = sitk.Mask(atlas_view, brain)
    labels = sitk.Resample(phantom.labels, ref, to_phantom, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return images, sitk.Mask(labels, brain)
