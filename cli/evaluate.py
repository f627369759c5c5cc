"""`pedseg evaluate PRED GT`: predicted label maps against reference label maps (pedseg.evaluation does the work)."""
from __future__ import annotations

import argparse
from pathlib import Path

# The label conventions an evaluated file may be in (pedseg.evaluation.EVAL_CONVENTIONS, spelled out here so that
# `pedseg --help` does not import the evaluation's libraries; a test holds the two together).
CONVENTION_CHOICES = ("2024", "2023", "brats2020")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate", help="Dice, HD95, volumes and BraTS lesion-wise metrics of label maps against reference ones",
        description="Hold predicted label maps against reference label maps: per region Dice, 95th percentile "
                    "Hausdorff distance (mm), volumes (mL) and the BraTS lesion-wise metrics (lesion TP/FP/FN, "
                    "lesion-wise Dice and HD95, with panoptica). PRED and GT are two NIfTI files, or two folders of "
                    "them paired by file name. Writes metrics.json and metrics.csv into --out.")
    p.add_argument("prediction", type=Path, metavar="PRED", help="predicted label map (NIfTI), or a folder of them")
    p.add_argument("reference", type=Path, metavar="GT", help="reference label map (NIfTI), or a folder of them")
    p.add_argument("--convention", choices=CONVENTION_CHOICES, default="2024",
                   help="label values of both sides: BraTS-PEDs 2024 (1 ET, 2 NET, 3 CC, 4 ED), BraTS-PEDs 2023 "
                        "(1 NCR, 2 ED, 3 ET) or BraTS 2017-2020 (1 NCR/NET, 2 ED, 4 ET); default 2024")
    p.add_argument("--pred-convention", choices=CONVENTION_CHOICES, default=None,
                   help="label values of PRED when they differ from GT's (default: --convention)")
    p.add_argument("--gt-convention", choices=CONVENTION_CHOICES, default=None,
                   help="label values of GT when they differ from PRED's (default: --convention)")
    p.add_argument("--out", type=Path, default=Path("."),
                   help="folder for metrics.json and metrics.csv (default: the current folder)")
    return p


def cmd_evaluate(args) -> int:
    from pedseg.evaluation import evaluate, evaluation_table, write_evaluation

    evaluation = evaluate(args.prediction, args.reference, pred_convention=args.pred_convention or args.convention,
                          gt_convention=args.gt_convention or args.convention)
    print(evaluation_table(evaluation))
    written = write_evaluation(evaluation, args.out)
    print(f"\nmetrics written to {written['json']} and {written['csv']}")
    return 0
