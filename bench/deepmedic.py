"""The real model on real data: CaPTk's DeepMedic glioma model (bundles/captk-deepmedic-brats) as pedseg runs it.

    .venv/bin/python bench/deepmedic.py [--threads N] [--skip-e2e] [--out bench/deepmedic.json]

Prints, and writes as JSON:
1. parity with the original DeepMedic 0.8.4 on the shared reference case (../shared/data/deepmedic_reference):
   one tile, the 64^3 probability crop, the whole-volume labels;
2. speed of the port on that case, every tile (as DeepMedic runs them) against only the tiles reaching the
   brain (as pedseg runs them), side by side in this run, with the CPU named;
3. TCGA-DU-7294: the model on the BraTS-preprocessed images against the five BraTS 2020 algorithms' consensus
   and each algorithm, next to the algorithms' own spread (each against the consensus);
4. end to end from DICOM: both real cases re-acquired in native poses (synth/reacquire.py) and run with the
   default bundle; labels carried into BraTS space with the known pose and compared, in the patient's anatomy,
   with the model's result on the BraTS-preprocessed images (and, for TCGA-DU-7294, the consensus).
The original software itself cannot run here (DeepMedic 0.8.4 is not on the package index); its recorded
timing (fixture.json) is printed for orientation, not as a side-by-side ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from pedseg.evaluation import region_dice, to_internal
from pedseg.pipeline.atlas import brats_reference_grid
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import DEFAULT_BUNDLE, PipelineConfig
from pedseg.pipeline.deepmedic import load_deepmedic, run_deepmedic, segment_volume
from pedseg.pipeline.labels import convert_labels
from pedseg.runner import run_pipeline
from pedseg.synth.reacquire import find_case_images, reacquire_session

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
REFERENCE = SHARED / "deepmedic_reference"
CASE = "BraTS-GLI-00001-000"
TCGA = SHARED / "nifti" / "TCGA-DU-7294"
REGIONS = ("WT", "TC", "ET", "ED")
CPU = torch.device("cpu")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def brats_labels(path: Path) -> np.ndarray:
    """A BraTS 2017-2020 label map (1 NCR/NET, 2 ED, 4 ET) in the internal convention, SimpleITK array order."""
    return to_internal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), "brats2020", path)


def rounded(dice: dict) -> dict:
    return {k: None if v is None else round(v, 3) for k, v in dice.items()}


def model_on_brats_images(images: dict[str, Path]) -> np.ndarray:
    """The bundle on BraTS-space images (they are on the atlas grid), internal labels, SimpleITK order."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    order = sorted(bundle.inputs, key=bundle.inputs.get)
    result = run_deepmedic([sitk.ReadImage(str(images[role]), sitk.sitkFloat32) for role in order], bundle, CPU)
    return convert_labels(result.labels, "2023", "2024")


def parity_and_speed(threads: int) -> dict:
    bundle = load_bundle(DEFAULT_BUNDLE)
    member = bundle.models[0]
    network = load_deepmedic(member.path / "architecture.json", member.path / member.weights, bundle_name=bundle.name)
    tile = np.load(REFERENCE / f"{CASE}_single_tile_reference.npz")
    with torch.inference_mode():
        ours = network(torch.from_numpy(tile["x_normal"])[None],
                       [torch.from_numpy(tile["x_sub3"])[None], torch.from_numpy(tile["x_sub5"])[None]])[0].numpy()
    volume = np.stack([nib.load(REFERENCE / f"{CASE}_input_{c}_captk_zscore.nii.gz").get_fdata(dtype=np.float32)
                       for c in ("t1", "t1ce", "t2", "flair")])
    brain = nib.load(SHARED / "nifti" / f"brats_space_{CASE}" / f"{CASE}-t1n.nii.gz").get_fdata() > 0
    seconds = {}
    probabilities = {}
    for name, roi in (("every tile (as DeepMedic)", None), ("tiles reaching the brain (pedseg)", brain)):
        t0 = time.perf_counter()
        probabilities[name] = segment_volume(network, volume, CPU, roi=roi)
        seconds[name] = round(time.perf_counter() - t0, 1)
    fixture = json.loads((REFERENCE / "fixture.json").read_text())
    box = fixture["crop_box"]
    crop = tuple(slice(a, b) for a, b in zip(box["start_ijk"], box["end_ijk_exclusive"]))
    reference_crop = nib.load(REFERENCE / f"{CASE}_probs_crop64_classes0-4.nii.gz").get_fdata(dtype=np.float32)
    reference_labels = np.asarray(nib.load(REFERENCE / f"{CASE}_deepmedic_labels.nii.gz").dataobj)
    parity = {}
    for name, p in probabilities.items():
        labels = np.array([0, 1, 2, 4, 4])[p.argmax(0)]
        parity[name] = {
            "crop_max_abs_probability_difference": float(np.abs(p[(slice(None), *crop)].transpose(1, 2, 3, 0)
                                                                - reference_crop).max()),
            "labels_equal_brain_fraction": float((labels[brain] == reference_labels[brain]).mean()),
            "labels_equal_volume_fraction": float((labels == reference_labels).mean()),
        }
    return {
        "tile_max_abs_probability_difference": float(np.abs(ours - tile["prob"]).max()),
        "whole_volume": parity,
        "seconds": seconds, "threads": threads,
        "ratio_every_tile_over_brain_tiles": round(seconds["every tile (as DeepMedic)"]
                                                   / seconds["tiles reaching the brain (pedseg)"], 2),
        "original_recorded": {"forward_pass_s": 130.2, "process_s": fixture["deepmedic"]["wall_time_s"][
            "deepmedic_process"], "runtime": fixture["deepmedic"]["runtime"],
            "note": "recorded when the fixture was made, on another machine: not a side-by-side figure"},
    }


def tcga_against_algorithms() -> dict:
    ours = model_on_brats_images(find_case_images(TCGA))
    consensus = brats_labels(TCGA / "fusion_consensus.nii.gz")
    algorithms = {p.name.removesuffix(".nii.gz"): brats_labels(p)
                  for p in sorted((TCGA / "algorithms").glob("*.nii.gz"))}
    return {
        "model_vs_consensus": rounded(region_dice(consensus, ours, REGIONS)),
        "model_vs_algorithm": {name: rounded(region_dice(labels, ours, REGIONS))
                               for name, labels in algorithms.items()},
        "algorithm_vs_consensus": {name: rounded(region_dice(consensus, labels, REGIONS))
                                   for name, labels in algorithms.items()},
        "volumes_ml": {"model": {r: float(np.isin(ours, v).sum()) / 1000 for r, v in
                                 (("WT", (1, 2, 3, 4)), ("TC", (1, 2, 3)), ("ET", (1,)))},
                       "consensus": {r: float(np.isin(consensus, v).sum()) / 1000 for r, v in
                                     (("WT", (1, 2, 3, 4)), ("TC", (1, 2, 3)), ("ET", (1,)))}},
    }


def end_to_end(threads: int) -> dict:
    cases = {CASE: (SHARED / "nifti" / f"brats_space_{CASE}", None),
             "TCGA-DU-7294": (TCGA, TCGA / "fusion_consensus.nii.gz")}
    results = {}
    for case, (folder, consensus_path) in cases.items():
        images = find_case_images(folder)
        on_brats = model_on_brats_images(images)
        with tempfile.TemporaryDirectory(prefix="pedseg-bench-") as tmp:
            dicom = reacquire_session(images, Path(tmp) / "session", seed=1)
            t0 = time.perf_counter()
            result = run_pipeline(dicom, Path(tmp) / "out", PipelineConfig(device="cpu", threads=threads))
            seconds = round(time.perf_counter() - t0, 1)
            native = sitk.ReadImage(str(result.outputs["nifti_labels_t1c_native"]))
            pose = sitk.ReadTransform(str(Path(tmp) / "session" / "ground_truth" / "pose_t1c.tfm"))
        ours = sitk.GetArrayFromImage(sitk.Resample(native, brats_reference_grid(), pose.GetInverse(),
                                                    sitk.sitkNearestNeighbor, 0))
        results[case] = {"seconds_dicom_to_report": seconds,
                         "vs_model_on_brats_images": rounded(region_dice(on_brats, ours, REGIONS)),
                         "report_volumes_ml": {r: result.measurements.regions[r].volume_ml for r in ("WT", "TC", "ET")},
                         "qc_flags": list(result.measurements.qc_flags)}
        if consensus_path is not None:
            results[case]["vs_consensus"] = rounded(region_dice(brats_labels(consensus_path), ours, REGIONS))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the DICOM runs (about 3 minutes)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    figures = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": threads,
               "torch": torch.__version__, "parity_and_speed": parity_and_speed(threads),
               "tcga_du_7294": tcga_against_algorithms()}
    if not args.skip_e2e:
        figures["end_to_end_from_dicom"] = end_to_end(threads)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
