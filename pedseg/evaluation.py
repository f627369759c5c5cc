"""Segmentations held against a reference: Dice per region, a bundle's labels on atlas-space cases, and
`pedseg evaluate` (label files against reference files: Dice, HD95, volumes and the BraTS lesion-wise metrics).

Used by the bundle evaluation script, the benchmarks, the tests and `pedseg evaluate`, so every Dice in the project
is counted the one way nnU-Net's own evaluation counts it (its region-aware true/false positive counts); distances
and lesion matching come from panoptica, the BraTS challenges' evaluation library.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import tempfile
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from types import MappingProxyType

import numpy as np
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

from pedseg.pipeline.atomic import write_text
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import InputError
from pedseg.pipeline.infer import infer
from pedseg.pipeline.labels import (
    CONVENTIONS,
    INTERNAL,
    LABEL_VALUES,
    REGIONS,
    comparable_across_conventions,
    convert_labels,
    region_mask,
)
from pedseg.pipeline.postprocess import postprocess
from pedseg.pipeline.types import Preprocessed

logger = logging.getLogger(__name__)


def mask_dice(reference: np.ndarray, prediction: np.ndarray) -> float | None:
    """Dice of two masks; None when both are empty (undefined, and not to be averaged)."""
    tp, fp, fn, _ = compute_tp_fp_fn_tn(np.asarray(reference, bool), np.asarray(prediction, bool))
    return None if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def region_dice(reference: np.ndarray, prediction: np.ndarray,
                regions: Iterable[str] = tuple(REGIONS)) -> dict[str, float | None]:
    """Dice of every region (composites included) between two label maps in the internal convention."""
    return {name: mask_dice(region_mask(reference, name), region_mask(prediction, name)) for name in regions}


def predict_atlas_case(bundle_dir: Path, images: dict[str, Path], config: PipelineConfig) -> sitk.Image:
    """A bundle's post-processed labels for a case already in atlas space (role -> NIfTI): the inference and
    post-processing stages users get, without ingest and preprocessing."""
    bundle = load_bundle(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="pedseg-evaluate-") as tmp:
        pre = Preprocessed(images=images, brain_mask=Path(), native={}, atlas_to_native={})
        prediction = infer(pre, bundle, Path(tmp), config)
        labels, _ = postprocess(sitk.ReadImage(str(prediction.labels)), bundle.postprocessing)
        return labels


# --- Held against a reference from files: `pedseg evaluate PRED GT` ---------------------------------------------------
#
# Per region: Dice (mask_dice above, nnU-Net's counting), HD95 and volumes; per lesion (connected components, 26-
# connected): TP/FP/FN, lesion-wise Dice and HD95, with panoptica, the BraTS challenges' own evaluation library
# (BrainLesion/panoptica, the engine of the official BraTS-evaluation package). The lesion matching is the BraTS
# configuration of that package (connected-component instances, maximum bipartite matching on Dice, any overlap
# counts); the region-wise figures are panoptica's per-region evaluation (each reference lesion's Voronoi region
# scored on its own, then averaged).

# Label conventions the evaluated files may be in: the pipeline's (labels.CONVENTIONS) and BraTS 2017-2020's
# (1 NCR/NET, 2 ED, 4 ET), which are BraTS-PEDs 2023's regions with ET written as 4.
EVAL_CONVENTIONS: tuple[str, ...] = (*CONVENTIONS, "brats2020")
_BRATS2020_TO_2023 = MappingProxyType({0: 0, 1: 1, 2: 2, 4: 3})
GEOMETRY_TOLERANCE_MM = 1e-3  # spacing and origin
DIRECTION_TOLERANCE = 1e-4  # direction cosines
NIFTI_SUFFIXES = (".nii.gz", ".nii")
CASE_SEPARATORS = "_-."
BOTH_EMPTY = "both empty: Dice 1, HD95 0 (BraTS convention)"
METRIC_NAMES = ("dice", "hd95_mm", "volume_ref_ml", "volume_pred_ml", "lesions_ref", "lesions_pred", "lesion_tp",
                "lesion_fp", "lesion_fn", "lesion_dice", "lesion_hd95_mm", "lesion_pq", "regionwise_dice",
                "regionwise_hd95_mm")


@dataclass(frozen=True)
class RegionMetrics:
    """One region of one case. None: undefined (HD95 with one side empty or no overlap, lesion HD95 without a
    matched lesion); `note` says which case applies."""

    dice: float  # mask_dice; 1.0 when both are empty (BraTS convention)
    hd95_mm: float | None
    volume_ref_ml: float
    volume_pred_ml: float
    lesions_ref: int  # connected components (26-connected)
    lesions_pred: int
    lesion_tp: int  # reference lesions matched by a predicted one (any overlap, one-to-one)
    lesion_fp: int  # predicted lesions matching none
    lesion_fn: int  # reference lesions missed
    lesion_dice: float | None  # mean Dice of the matched lesions (panoptica sq_dsc, BraTS' "lesion-wise Dice")
    lesion_hd95_mm: float | None  # mean HD95 of the matched lesions (sq_hd95)
    lesion_pq: float | None  # panoptic quality: lesion Dice x F1 of the counts, so FP and FN lesions pull it down
    regionwise_dice: float | None  # panoptica region-wise: mean Dice over the reference lesions' Voronoi regions
    regionwise_hd95_mm: float | None
    note: str = ""


@dataclass(frozen=True)
class CaseMetrics:
    case: str
    prediction: Path
    reference: Path
    regions: dict[str, RegionMetrics]


@dataclass(frozen=True)
class Evaluation:
    pred_convention: str
    gt_convention: str
    regions: tuple[str, ...]
    cases: list[CaseMetrics]
    unpaired_predictions: list[Path] = field(default_factory=list)
    unpaired_references: list[Path] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        """Mean and median of each metric per region over the cases where it is defined (n of them)."""
        out: dict[str, dict[str, dict[str, float | int | None]]] = {}
        for region in self.regions:
            out[region] = {}
            for metric in METRIC_NAMES:
                values = [v for c in self.cases if (v := getattr(c.regions[region], metric)) is not None]
                out[region][metric] = {"mean": float(np.mean(values)) if values else None,
                                       "median": float(np.median(values)) if values else None, "n": len(values)}
        return out


def evaluated_regions(pred_convention: str, gt_convention: str) -> tuple[str, ...]:
    """The regions that mean the same voxels on both sides: all six when both are BraTS-PEDs 2024, otherwise those
    whose members are whole 2023 regions (ET, ED, TC, WT; 2023's and BraTS 2020's NCR is NET and CC together)."""
    both_2024 = pred_convention == gt_convention == INTERNAL
    return tuple(name for name in REGIONS if both_2024 or comparable_across_conventions(name))


def to_internal(array: np.ndarray, convention: str, path: Path) -> np.ndarray:
    """A label array of an evaluated file in the internal convention; InputError for values outside `convention`."""
    if convention not in EVAL_CONVENTIONS:
        raise InputError(f"Unknown label convention {convention!r}.", hint=f"Use one of {', '.join(EVAL_CONVENTIONS)}.")
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.rint(array)):
        raise InputError(f"'{path.name}' is not a label map: it holds non-integer values.")
    present = set(np.unique(array).astype(np.int64).tolist())
    unknown = sorted(present - set(_allowed_values(convention)))
    if unknown:
        fits = [c for c in EVAL_CONVENTIONS if present <= set(_allowed_values(c))]
        raise InputError(f"'{path.name}' holds label values {unknown} that are not part of the {convention} "
                         f"convention {_allowed_values(convention)}.",
                         hint=(f"Its values fit: {', '.join(fits)}; pass --pred-convention/--gt-convention."
                               if fits else f"Conventions: {', '.join(EVAL_CONVENTIONS)}."))
    array = array.astype(np.uint8)
    if convention == "brats2020":
        lut = np.zeros(max(_BRATS2020_TO_2023) + 1, dtype=np.uint8)
        for value, target in _BRATS2020_TO_2023.items():
            lut[value] = target
        array, convention = lut[array], "2023"
    return array if convention == INTERNAL else convert_labels(array, convention, INTERNAL)


def _allowed_values(convention: str) -> tuple[int, ...]:
    values = _BRATS2020_TO_2023 if convention == "brats2020" else {0, *LABEL_VALUES[convention].values()}
    return tuple(sorted(values))


def check_same_geometry(prediction: sitk.Image, reference: sitk.Image, pred_path: Path, ref_path: Path) -> None:
    """InputError naming the files and what differs unless both images share size, spacing, origin and direction."""
    differences = []
    for what, pred_value, ref_value, tolerance in (
            ("dimension", prediction.GetDimension(), reference.GetDimension(), 0),
            ("size", prediction.GetSize(), reference.GetSize(), 0),
            ("spacing", prediction.GetSpacing(), reference.GetSpacing(), GEOMETRY_TOLERANCE_MM),
            ("origin", prediction.GetOrigin(), reference.GetOrigin(), GEOMETRY_TOLERANCE_MM),
            ("direction", prediction.GetDirection(), reference.GetDirection(), DIRECTION_TOLERANCE)):
        pred_arr, ref_arr = np.atleast_1d(pred_value), np.atleast_1d(ref_value)
        if pred_arr.shape != ref_arr.shape or not np.allclose(pred_arr, ref_arr, rtol=0, atol=tolerance):
            differences.append(f"{what} {_fmt(pred_value)} vs {_fmt(ref_value)}")
        if what in ("dimension", "size") and differences:
            break  # the rest cannot be compared meaningfully
    if differences:
        raise InputError(f"The prediction '{pred_path.name}' and the reference '{ref_path.name}' do not share a "
                         f"voxel grid: {'; '.join(differences)} (prediction vs reference).",
                         hint="Resample the prediction onto the reference's grid (nearest neighbour) first.")


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")"
    return str(value)


def read_label_image(path: Path) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"Cannot read '{path.name}' as an image.", hint="Give NIfTI label maps (.nii.gz).") from exc
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError(f"'{path.name}' is not a 3D label map ({image.GetDimension()}D, "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel).")
    return image


def evaluate_case(prediction: Path, reference: Path, *, pred_convention: str = INTERNAL,
                  gt_convention: str = INTERNAL, case: str | None = None) -> CaseMetrics:
    """Every comparable region of one predicted label map against its reference (two NIfTI files)."""
    pred_image, ref_image = read_label_image(prediction), read_label_image(reference)
    check_same_geometry(pred_image, ref_image, prediction, reference)
    pred = to_internal(sitk.GetArrayFromImage(pred_image), pred_convention, prediction)
    ref = to_internal(sitk.GetArrayFromImage(ref_image), gt_convention, reference)
    spacing_zyx = tuple(float(s) for s in reversed(ref_image.GetSpacing()))  # the arrays are [z, y, x]
    regions = {name: region_metrics(region_mask(ref, name), region_mask(pred, name), spacing_zyx)
               for name in evaluated_regions(pred_convention, gt_convention)}
    return CaseMetrics(case or case_name(reference), prediction, reference, regions)


def region_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...]) -> RegionMetrics:
    """One region's masks (arrays in the order `spacing` is given in, mm) held against each other."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ref, pred = np.asarray(reference, bool), np.asarray(prediction, bool)
    volumes = {"volume_ref_ml": int(ref.sum()) * voxel_ml, "volume_pred_ml": int(pred.sum()) * voxel_ml}
    if not ref.any() and not pred.any():
        return RegionMetrics(dice=1.0, hd95_mm=0.0, **volumes, lesions_ref=0, lesions_pred=0, lesion_tp=0,
                             lesion_fp=0, lesion_fn=0, lesion_dice=1.0, lesion_hd95_mm=0.0, lesion_pq=1.0,
                             regionwise_dice=1.0, regionwise_hd95_mm=0.0, note=BOTH_EMPTY)
    ref8, pred8 = ref.astype(np.uint8), pred.astype(np.uint8)
    (lesions,) = _evaluator(region_wise=False).evaluate(pred8, ref8, voxelspacing=spacing).values()
    # Without any overlap every region scores Dice 0 and HD95 stays undefined; panoptica 2.1.7's region-wise
    # evaluation raises there (and with one side empty its average would read 0 mm), so it runs on overlap only.
    regionwise_dice, regionwise_hd95 = 0.0, None
    if (ref & pred).any():
        (per_region,) = _evaluator(region_wise=True).evaluate(pred8, ref8, voxelspacing=spacing).values()
        regionwise_dice, regionwise_hd95 = _value(per_region, "region_avg_dsc"), _value(per_region, "region_avg_hd95")
    note = ("reference empty" if not ref.any() else "prediction empty" if not pred.any()
            else "no overlap: HD95 undefined" if not (ref & pred).any() else "")
    return RegionMetrics(
        dice=float(mask_dice(ref, pred)), hd95_mm=_value(lesions, "global_bin_hd95"), **volumes,
        lesions_ref=int(lesions.n_ref_instances), lesions_pred=int(lesions.n_pred_instances), lesion_tp=int(lesions.tp),
        lesion_fp=int(lesions.fp), lesion_fn=int(lesions.fn),
        lesion_dice=_value(lesions, "sq_dsc"), lesion_hd95_mm=_value(lesions, "sq_hd95"),
        lesion_pq=_value(lesions, "pq_dsc"), regionwise_dice=regionwise_dice,
        regionwise_hd95_mm=regionwise_hd95, note=note)


def _value(result, name: str) -> float | None:
    """A panoptica result's metric as a finite float, None where it is undefined (inf, NaN, not computed)."""
    try:
        value = getattr(result, name)
    except Exception:  # noqa: BLE001 - panoptica raises its own exception for a metric it could not compute
        return None
    return float(value) if value is not None and np.isfinite(value) else None


@functools.cache
def _evaluator(*, region_wise: bool):
    """panoptica, configured as the official BraTS evaluation's pediatric config: connected components (cc3d,
    26-connected) as instances, maximum bipartite matching on Dice with any overlap enough; Dice and HD95 per
    instance and globally. Zero-overlap edge cases: Dice 0, HD95 infinite (reported as undefined)."""
    from panoptica import (
        ConnectedComponentsInstanceApproximator,
        InputType,
        MaxBipartiteMatching,
        Metric,
        Panoptica_Evaluator,
        disable_citation_reminder,
        set_log_level,
    )
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling

    disable_citation_reminder()  # it prints a banner to standard output
    set_log_level(logging.WARNING)
    zero, inf, nan = EdgeCaseResult.ZERO, EdgeCaseResult.INF, EdgeCaseResult.NAN
    edge_cases = EdgeCaseHandler({
        Metric.DSC: MetricZeroTPEdgeCaseHandling(no_instances_result=nan, default_result=zero),
        Metric.HD95: MetricZeroTPEdgeCaseHandling(no_instances_result=nan, default_result=inf),
    })
    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC, instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=1e-6),
        edge_case_handler=edge_cases, instance_metrics=[Metric.DSC, Metric.HD95],
        global_metrics=[Metric.DSC, Metric.HD95], per_region_evaluation=region_wise)


def case_name(path: Path) -> str:
    return next((path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s)), path.name)


def label_files(folder: Path) -> list[Path]:
    """The NIfTI files of a folder (not its subfolders; hidden files, such as partial writes, left out)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith(NIFTI_SUFFIXES))


def pair_cases(pred_dir: Path, gt_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """(case, prediction, reference) pairs of two folders, and the unpaired predictions and references.

    Case names are file names without .nii.gz/.nii. A prediction and a reference pair when their case names are
    equal, or else when one case name is the other followed by a separator (_ - .) and more, e.g. prediction
    BraTS-PED-00001-000 and reference BraTS-PED-00001-000-seg, provided each is the other's only such candidate.
    """
    preds, refs = _cases(pred_dir), _cases(gt_dir)
    pairs = {name: (preds[name], refs[name]) for name in preds.keys() & refs.keys()}
    rest_pred = sorted(preds.keys() - pairs.keys())
    rest_ref = sorted(refs.keys() - pairs.keys())
    candidates = {r: [p for p in rest_pred if _prefix_match(p, r)] for r in rest_ref}
    claimed = {p: [r for r in rest_ref if _prefix_match(p, r)] for p in rest_pred}
    ambiguous = sorted({r for r, ps in candidates.items() if len(ps) > 1}
                       | {r for p, rs in claimed.items() if len(rs) > 1 for r in rs})
    if ambiguous:
        raise InputError("Cannot pair predictions with references unambiguously: " + "; ".join(
            f"reference {r} matches predictions {', '.join(candidates[r])}" for r in ambiguous if candidates[r]) + ".",
            hint="Name each prediction after its reference (the same file name).")
    for r, ps in candidates.items():
        if ps:
            pairs[r] = (preds[ps[0]], refs[r])
    paired_pred = {p for p, _ in pairs.values()}
    paired_ref = {r for _, r in pairs.values()}
    ordered = [(name, *pairs[name]) for name in sorted(pairs)]
    return (ordered, sorted(set(preds.values()) - paired_pred), sorted(set(refs.values()) - paired_ref))


def _cases(folder: Path) -> dict[str, Path]:
    files = label_files(folder)
    names = [case_name(p) for p in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"Folder '{folder.name}' holds more than one file for case(s) {', '.join(twice)} "
                         f"(.nii and .nii.gz).")
    return dict(zip(names, files))


def _prefix_match(a: str, b: str) -> bool:
    short, long = sorted((a, b), key=len)
    return len(long) > len(short) and long.startswith(short) and long[len(short)] in CASE_SEPARATORS


def evaluate(prediction: Path, reference: Path, *, pred_convention: str = INTERNAL,
             gt_convention: str = INTERNAL) -> Evaluation:
    """Two NIfTI label files, or two folders of them (paired by `pair_cases`)."""
    prediction, reference = Path(prediction), Path(reference)
    for path, what in ((prediction, "prediction"), (reference, "reference")):
        if not path.exists():
            raise InputError(f"The {what} '{path}' does not exist.")
    regions = evaluated_regions(pred_convention, gt_convention)
    if prediction.is_dir() != reference.is_dir():
        raise InputError("Give two label files or two folders of them, not one of each.",
                         hint=f"The prediction is a {'folder' if prediction.is_dir() else 'file'}, the reference "
                              f"a {'folder' if reference.is_dir() else 'file'}.")
    if not prediction.is_dir():
        return Evaluation(pred_convention, gt_convention, regions, [
            evaluate_case(prediction, reference, pred_convention=pred_convention, gt_convention=gt_convention)])
    pairs, lone_pred, lone_ref = pair_cases(prediction, reference)
    if not pairs:
        raise InputError(f"No prediction in '{prediction}' pairs with a reference in '{reference}' "
                         f"({len(lone_pred)} prediction and {len(lone_ref)} reference NIfTI files).",
                         hint="Pair by file name: the same name, or the reference's name followed by _ - or . and "
                              "more (or the other way round).")
    cases = []
    for name, pred_path, ref_path in pairs:
        cases.append(evaluate_case(pred_path, ref_path, pred_convention=pred_convention, gt_convention=gt_convention,
                                   case=name))
        logger.info("evaluated %s", name)
    return Evaluation(pred_convention, gt_convention, regions, cases, lone_pred, lone_ref)


# --- Output: the table on standard output, metrics.json and metrics.csv --------------------------------------------

_COLUMNS = (  # (heading, metric, format)
    ("Dice", "dice", "{:.3f}"), ("HD95 mm", "hd95_mm", "{:.2f}"), ("ref mL", "volume_ref_ml", "{:.2f}"),
    ("pred mL", "volume_pred_ml", "{:.2f}"), ("TP", "lesion_tp", "{:d}"), ("FP", "lesion_fp", "{:d}"),
    ("FN", "lesion_fn", "{:d}"), ("les.Dice", "lesion_dice", "{:.3f}"), ("les.HD95", "lesion_hd95_mm", "{:.2f}"),
    ("reg.Dice", "regionwise_dice", "{:.3f}"), ("reg.HD95", "regionwise_hd95_mm", "{:.2f}"),
)
LEGEND = ("Dice and HD95 (95th percentile Hausdorff distance, mm) per region; volumes in mL; TP/FP/FN: lesions "
          "(connected components) matched one-to-one on any overlap; les.Dice/les.HD95: mean over matched lesions; "
          "reg.Dice/reg.HD95: panoptica region-wise (each reference lesion's Voronoi region, averaged); "
          "'-': undefined (one side empty, or no overlap). Both empty: Dice 1, HD95 0 (BraTS convention).")


def evaluation_table(evaluation: Evaluation) -> str:
    lines = [f"conventions: prediction {evaluation.pred_convention}, reference {evaluation.gt_convention}; "
             f"regions {', '.join(evaluation.regions)}"]
    for case in evaluation.cases:
        lines += ["", f"{case.case}  (prediction {case.prediction.name}, reference {case.reference.name})"]
        lines += _table({name: {metric: getattr(m, metric) for metric in METRIC_NAMES} | {"note": m.note}
                         for name, m in case.regions.items()})
    if len(evaluation.cases) > 1:
        summary = evaluation.summary()
        for statistic in ("mean", "median"):
            lines += ["", f"{statistic} over {len(evaluation.cases)} cases (undefined values left out)"]
            lines += _table({name: {metric: s[statistic] for metric, s in metrics.items()}
                             for name, metrics in summary.items()}, counts_as_float=True)
        undefined = [f"{region} {metric} in {len(evaluation.cases) - s['n']}" for region, metrics in summary.items()
                     for metric, s in metrics.items() if s["n"] < len(evaluation.cases)]
        if undefined:
            lines += ["", textwrap.fill("undefined, so left out of these (region metric in how many cases): "
                                        + ", ".join(undefined), 118)]
    for what, paths in (("predictions", evaluation.unpaired_predictions),
                        ("references", evaluation.unpaired_references)):
        if paths:
            lines += ["", f"unpaired {what} (not evaluated): {', '.join(p.name for p in paths)}"]
    return "\n".join(lines + ["", textwrap.fill(LEGEND, 118)])


def _table(rows: dict[str, dict], *, counts_as_float: bool = False) -> list[str]:
    widths = [max(len(h), 7) for h, _, _ in _COLUMNS]
    out = ["region " + " ".join(h.rjust(w) for (h, _, _), w in zip(_COLUMNS, widths))]
    for name, values in rows.items():
        cells = []
        for (_, metric, fmt), width in zip(_COLUMNS, widths):
            value = values[metric]
            if counts_as_float and fmt == "{:d}" and value is not None:
                fmt = "{:.1f}"
            cells.append(("-" if value is None else fmt.format(value)).rjust(width))
        note = values.get("note")
        out.append(f"{name:<6} " + " ".join(cells) + (f"  {note}" if note else ""))
    return out


def write_evaluation(evaluation: Evaluation, outdir: Path) -> dict[str, Path]:
    """metrics.json (settings, every case and region, summary, unpaired files) and metrics.csv (one row per case
    and region), each written atomically."""
    cases = [{"case": c.case, "prediction": str(c.prediction), "reference": str(c.reference),
              "regions": {name: _json_values(dataclasses.asdict(m)) for name, m in c.regions.items()}}
             for c in evaluation.cases]
    document = {
        "tool": "pedseg evaluate", "pedseg_version": version("pedseg"), "panoptica_version": version("panoptica"),
        "conventions": {"prediction": evaluation.pred_convention, "reference": evaluation.gt_convention},
        "regions": list(evaluation.regions),
        "definitions": {"legend": LEGEND, "both_empty": BOTH_EMPTY,
                        "lesions": "connected components (26-connected); maximum bipartite matching on Dice, "
                                   "any overlap (Dice > 1e-6), as the official BraTS evaluation configures panoptica",
                        "null": "undefined: HD95 with one side empty or no overlap; lesion HD95 without a match"},
        "cases": cases,
        "summary": ({name: {metric: _json_values(s) for metric, s in metrics.items()}
                     for name, metrics in evaluation.summary().items()} if len(evaluation.cases) > 1 else None),
        "unpaired": {"predictions": [str(p) for p in evaluation.unpaired_predictions],
                     "references": [str(p) for p in evaluation.unpaired_references]},
    }
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["case", "region", *METRIC_NAMES, "note", "prediction", "reference"])
    for c in evaluation.cases:
        for name, m in c.regions.items():
            writer.writerow([c.case, name, *(_csv_value(getattr(m, k)) for k in METRIC_NAMES), m.note,
                             c.prediction, c.reference])
    outdir = Path(outdir)
    return {"json": write_text(outdir / "metrics.json", json.dumps(document, indent=2) + "\n"),
            "csv": write_text(outdir / "metrics.csv", stream.getvalue())}


def _json_values(values: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


def _csv_value(value) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
