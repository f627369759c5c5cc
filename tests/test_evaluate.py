"""`pedseg evaluate`: label maps held against reference label maps (pedseg.evaluation, cli/evaluate.py).

Synthetic maps with figures known by construction (two reference lesions, one missed, one false positive), the
BraTS conventions of the input files, the geometry check, folder pairing, the CLI's outputs, and one real case:
five BraTS 2020 algorithms' segmentations of TCGA-DU-7294 held against their fused consensus.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from panoptica import ConnectedComponentsInstanceApproximator, InputType, NaiveThresholdMatching, Panoptica_Evaluator
from panoptica import Metric as PanopticaMetric

from pedseg.cli.evaluate import CONVENTION_CHOICES
from pedseg.cli.main import main
from pedseg.evaluation import (
    BOTH_EMPTY,
    EVAL_CONVENTIONS,
    evaluate,
    evaluate_case,
    mask_dice,
    pair_cases,
    region_dice,
    region_metrics,
    to_internal,
)
from pedseg.pipeline.errors import InputError
from pedseg.pipeline.labels import REGIONS, region_mask

SPACING = (1.0, 1.0, 2.0)  # x, y, z in mm: 2 mm^3 voxels, 0.002 mL
VOXEL_ML = 0.002
ET, NET, CC, ED = 1, 2, 3, 4  # BraTS-PEDs 2024


def reference_labels() -> np.ndarray:
    """[z, y, x]: ET lesion A (400 voxels), ET lesion B (256), an oedema slab (200) apart from both."""
    ref = np.zeros((20, 40, 40), np.uint8)
    ref[4:8, 4:14, 4:14] = ET
    ref[4:8, 26:34, 26:34] = ET
    ref[10:12, 4:14, 4:14] = ED
    return ref


def predicted_labels() -> np.ndarray:
    """A found but 2 voxels off in x (320 of its 400 voxels overlap), B missed, one false ET lesion (32), the slab."""
    pred = np.zeros((20, 40, 40), np.uint8)
    pred[4:8, 4:14, 6:16] = ET
    pred[14:16, 30:34, 2:6] = ET
    pred[10:12, 4:14, 4:14] = ED
    return pred


def write_labels(array: np.ndarray, path: Path, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def as_brats2020(array: np.ndarray) -> np.ndarray:
    """The same tumour in BraTS 2017-2020 values: ET 4, ED 2."""
    return np.select([array == ET, array == ED], [4, 2], 0).astype(np.uint8)


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return (write_labels(predicted_labels(), tmp_path / "pred" / "case.nii.gz"),
            write_labels(reference_labels(), tmp_path / "gt" / "case.nii.gz"))


def test_two_lesions_one_missed_one_false(pair):
    case = evaluate_case(*pair)
    assert list(case.regions) == list(REGIONS)  # both sides BraTS-PEDs 2024: all six regions
    et = case.regions["ET"]
    assert et.dice == pytest.approx(2 * 320 / (656 + 432))
    assert et.volume_ref_ml == pytest.approx(656 * VOXEL_ML)
    assert et.volume_pred_ml == pytest.approx(432 * VOXEL_ML)
    assert (et.lesions_ref, et.lesions_pred) == (2, 2)
    assert (et.lesion_tp, et.lesion_fp, et.lesion_fn) == (1, 1, 1)
    assert et.lesion_dice == pytest.approx(2 * 320 / (400 + 400))  # the matched lesion only
    assert et.lesion_hd95_mm == pytest.approx(2.0)  # 2 voxels of 1 mm along x
    assert et.lesion_pq == pytest.approx(0.8 * 0.5)  # x F1 of the counts: 1 / (1 + (1 + 1) / 2)
    assert et.hd95_mm is not None and et.hd95_mm > 10  # the missed lesion and the false one are far away
    assert et.regionwise_hd95_mm is None  # no prediction at all in B's Voronoi region
    assert case.regions["TC"] == et  # no NET or CC here
    wt = case.regions["WT"]
    assert wt.dice == pytest.approx(2 * 520 / (856 + 632))
    assert (wt.lesion_tp, wt.lesion_fp, wt.lesion_fn) == (2, 1, 1)  # A and the slab; the false one; B
    ed = case.regions["ED"]
    assert (ed.dice, ed.hd95_mm, ed.lesion_tp, ed.note) == (1.0, 0.0, 1, "")
    for name in ("NET", "CC"):  # empty on both sides: BraTS convention
        empty = case.regions[name]
        assert (empty.dice, empty.hd95_mm, empty.lesion_tp, empty.lesion_fp, empty.lesion_fn) == (1.0, 0.0, 0, 0, 0)
        assert empty.note == BOTH_EMPTY


def test_dice_is_the_projects_one_count_and_panoptica_agrees():
    """The Dice column is mask_dice (nnU-Net's counting, what region_dice gives); panoptica's own Dice of the same
    masks, globally and for a single matched lesion, is the same number."""
    rng = np.random.default_rng(3)
    ref = np.zeros((24, 24, 24), bool)
    ref[4:18, 5:19, 6:20] = True
    pred = ref.copy()
    pred[rng.random(pred.shape) < 0.1] = False  # holes, one component still
    pred[3:6, 5:19, 6:20] = True
    ours = mask_dice(ref, pred)
    evaluator = Panoptica_Evaluator(expected_input=InputType.SEMANTIC,
                                    instance_approximator=ConnectedComponentsInstanceApproximator(),
                                    instance_matcher=NaiveThresholdMatching(), global_metrics=[PanopticaMetric.DSC])
    (theirs,) = evaluator.evaluate(pred.astype(np.uint8), ref.astype(np.uint8)).values()
    assert theirs.global_bin_dsc == pytest.approx(ours, abs=1e-12)
    metrics = region_metrics(ref, pred, (1.0, 1.0, 1.0))
    assert metrics.dice == ours
    assert metrics.lesion_dice == pytest.approx(ours, abs=1e-12)
    assert metrics.regionwise_dice == pytest.approx(ours, abs=1e-12)
    assert region_dice(ref.astype(np.uint8) * ET, pred.astype(np.uint8) * ET, ("ET",))["ET"] == ours


def test_brats2020_files_against_2024_ones(tmp_path, pair):
    pred = write_labels(as_brats2020(predicted_labels()), tmp_path / "pred2020.nii.gz")
    case = evaluate_case(pred, pair[1], pred_convention="brats2020", gt_convention="2024")
    assert list(case.regions) == ["ET", "ED", "TC", "WT"]  # NET and CC are NCR together in BraTS 2020
    same = evaluate_case(*pair)
    for name in case.regions:
        assert case.regions[name] == same.regions[name]


def test_a_value_outside_the_convention_names_the_file_and_the_conventions_it_fits(tmp_path):
    path = tmp_path / "seg.nii.gz"
    with pytest.raises(InputError) as caught:
        to_internal(as_brats2020(reference_labels()), "2023", path)
    assert "'seg.nii.gz' holds label values [4]" in str(caught.value)
    assert "fit: 2024, brats2020" in str(caught.value)
    assert EVAL_CONVENTIONS == CONVENTION_CHOICES  # the CLI's choices, spelled out there


@pytest.mark.parametrize("change,expected", [
    ({"spacing": (1.0, 1.0, 1.0)}, "spacing (1, 1, 1) vs (1, 1, 2)"),
    ({"origin": (0.0, 5.0, 0.0)}, "origin (0, 5, 0) vs (0, 0, 0)"),
])
def test_images_on_different_grids_stop_with_exit_code_2(tmp_path, capsys, pair, change, expected):
    pred = write_labels(predicted_labels(), tmp_path / "moved.nii.gz", **change)
    assert main(["evaluate", str(pred), str(pair[1]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error (bad_input): The prediction 'moved.nii.gz' and the reference 'case.nii.gz'" in err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_cli_on_folders_pairs_by_name_and_reports_the_rest(tmp_path, capsys):
    pred_dir, gt_dir, out = tmp_path / "pred", tmp_path / "gt", tmp_path / "out"
    write_labels(predicted_labels(), pred_dir / "BraTS-X-001.nii.gz")
    write_labels(reference_labels(), gt_dir / "BraTS-X-001-seg.nii.gz")  # a case id prefix pairs
    write_labels(reference_labels(), pred_dir / "BraTS-X-002.nii.gz")  # the same file name pairs: a perfect one
    write_labels(reference_labels(), gt_dir / "BraTS-X-002.nii.gz")
    write_labels(reference_labels(), pred_dir / "extra.nii.gz")
    write_labels(reference_labels(), gt_dir / "BraTS-X-003.nii.gz")
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "unpaired predictions (not evaluated): extra.nii.gz" in stdout
    assert "unpaired references (not evaluated): BraTS-X-003.nii.gz" in stdout
    assert "mean over 2 cases" in stdout and "median over 2 cases" in stdout
    document = json.loads((out / "metrics.json").read_text())
    assert [c["case"] for c in document["cases"]] == ["BraTS-X-001-seg", "BraTS-X-002"]
    assert document["cases"][1]["regions"]["WT"]["dice"] == 1.0
    assert document["summary"]["ET"]["dice"]["mean"] == pytest.approx((2 * 320 / 1088 + 1) / 2, abs=1e-6)
    assert document["summary"]["ET"]["lesion_fn"]["median"] == pytest.approx(0.5)
    assert document["cases"][0]["regions"]["NET"]["note"] == BOTH_EMPTY
    assert document["unpaired"]["references"] == [str(gt_dir / "BraTS-X-003.nii.gz")]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 * len(REGIONS)
    assert {(r["case"], r["region"]) for r in rows} >= {("BraTS-X-001-seg", "ET"), ("BraTS-X-002", "WT")}
    assert [r["hd95_mm"] for r in rows if r["case"] == "BraTS-X-001-seg" and r["region"] == "ET"] != [""]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial files left


def test_pairing_refuses_ambiguity_and_mixed_inputs(tmp_path, pair):
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    for name in ("a.nii.gz", "a-seg_v2.nii.gz"):
        write_labels(reference_labels(), pred_dir / name)
    write_labels(reference_labels(), gt_dir / "a-seg.nii.gz")
    with pytest.raises(InputError, match="reference a-seg matches predictions a, a-seg_v2"):
        pair_cases(pred_dir, gt_dir)
    (pred_dir / "a-seg_v2.nii.gz").unlink()
    write_labels(reference_labels(), pred_dir / "a1.nii.gz")  # "a1" does not begin with "a" + separator
    pairs, lone_pred, lone_ref = pair_cases(pred_dir, gt_dir)
    assert [(c, p.name, g.name) for c, p, g in pairs] == [("a-seg", "a.nii.gz", "a-seg.nii.gz")]
    assert [p.name for p in lone_pred] == ["a1.nii.gz"] and lone_ref == []
    with pytest.raises(InputError, match="two label files or two folders"):
        evaluate(pair[0], gt_dir)


def test_tcga_du_7294_algorithm_against_the_fused_consensus(shared_data):
    """A real BraTS-space case in BraTS 2017-2020 labels. hnfnetv1-20 against the five-algorithm consensus:
    WT 0.975, TC 0.909, ED 0.912; ET 0: the consensus has no enhancing tumour, hnfnetv1 calls 0.35 mL of it in
    five specks (the other four algorithms: README "Evaluating segmentations")."""
    case_dir = shared_data / "nifti" / "TCGA-DU-7294"
    prediction, reference = case_dir / "algorithms" / "hnfnetv1-20.nii.gz", case_dir / "fusion_consensus.nii.gz"
    case = evaluate_case(prediction, reference, pred_convention="brats2020", gt_convention="brats2020")
    dice = {name: round(m.dice, 3) for name, m in case.regions.items()}
    assert dice == {"ET": 0.0, "ED": 0.912, "TC": 0.909, "WT": 0.975}
    assert case.regions["WT"].hd95_mm == pytest.approx(1.0)
    assert case.regions["TC"].hd95_mm == pytest.approx(5 ** 0.5)
    assert case.regions["WT"].volume_ref_ml == pytest.approx(24.188)
    et = case.regions["ET"]
    assert (et.lesion_tp, et.lesion_fp, et.lesion_fn, et.hd95_mm, et.note) == (0, 5, 0, None, "reference empty")
    # The same Dice as the project's region_dice on the arrays in the internal convention
    pred = to_internal(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))), "brats2020", prediction)
    ref = to_internal(sitk.GetArrayFromImage(sitk.ReadImage(str(reference))), "brats2020", reference)
    assert region_dice(ref, pred, ("WT", "TC", "ET")) == {
        name: pytest.approx(case.regions[name].dice, abs=1e-12) for name in ("WT", "TC", "ET")}
    assert int(region_mask(ref, "ET").sum()) == 0
