"""The PDF report (reportlab platypus), written for the radiologist who reads it.

Page 1: who and what (pseudonymised subject, study date, model and the population it was trained on), the
volumes on the acquired T1c series (the voxels of the DICOM SEG and SR) beside the atlas-space ones, the RAPNO
measurement, the response when tracked, and the quality checks in one line; then key images with overlays
(axial, coronal and sagittal through the tumour, on T1c and FLAIR); the longitudinal page when tracked; the quality
checks, each pass / warn / fail with its threshold and what to do; how each series was identified; provenance as a
compact appendix. Plain words throughout: no internal key names.

The report carries no patient identifiers beyond the study context's display id (a pseudonym unless a user
turned pseudonymisation off).
Output is deterministic (`invariant`), so the same inputs give byte-identical PDFs.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from xml.sax.saxutils import escape

import SimpleITK as sitk
from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.platypus import Image, KeepTogether, PageBreak, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from pedseg.pipeline.atomic import atomic_path
from pedseg.pipeline.bundle import FALLBACK_NOT_NEEDED
from pedseg.pipeline.identify_rules import ROLE_NAMES
from pedseg.pipeline.labels import REGIONS
from pedseg.pipeline.longitudinal import RESPONSES, Longitudinal
from pedseg.pipeline.types import QC, Identification, Measurements, PopulationWarning, StudyContext
from pedseg.reporting.figures import report_figures, trend_png
from pedseg.reporting.longitudinal import format_change
from pedseg.reporting.qc_checks import Check, qc_checks
from pedseg.reporting.tables import VOLUME_DECIMALS, measurement_rows, rapno_block

logger = logging.getLogger(__name__)

TITLE = "Paediatric brain tumour MRI segmentation report"
DISCLAIMER = ("For research use only. Not for clinical diagnosis or treatment decisions. "
              "This automated segmentation has not been approved as a medical device and may be wrong; "
              "every result must be reviewed by a qualified radiologist.")
FAST_MODE_LINE = "fast mode: fewer folds, no test-time augmentation"
NO_TUMOUR = "No tumour detected"
POPULATION_HEADING = "Model not validated for this patient's age"
FALLBACK_HEADING = "Not every model of the bundle could run on this session's sequences"
REGION_DESCRIPTIONS = {name: region.display_name.lower() + (f" ({' + '.join(region.members)})"
                                                              if region.is_composite else "")
                       for name, region in REGIONS.items()}

_styles = getSampleStyleSheet()
_BODY = ParagraphStyle("body", parent=_styles["BodyText"], fontSize=9, leading=11.5)
_CELL = ParagraphStyle("cell", parent=_BODY, fontSize=8, leading=9.5)
_CELL_HEAD = ParagraphStyle("cell_head", parent=_CELL, fontName="Helvetica-Bold")
_CELL_NUM = ParagraphStyle("cell_num", parent=_CELL, alignment=TA_RIGHT)
_SMALL = ParagraphStyle("small", parent=_BODY, fontSize=7.5, leading=9, textColor=colors.HexColor("#444444"))
_H1 = ParagraphStyle("h1", parent=_styles["Title"], fontSize=16, leading=20, spaceAfter=4)
_H2 = ParagraphStyle("h2", parent=_styles["Heading2"], fontSize=12, leading=15, spaceBefore=8, spaceAfter=4,
                     keepWithNext=1)
_DISCLAIMER = ParagraphStyle("disclaimer", parent=_BODY, fontName="Helvetica-Bold", fontSize=10, leading=13,
                             textColor=colors.HexColor("#8b0000"))
_ALERT = ParagraphStyle("alert", parent=_BODY, fontName="Helvetica-Bold", fontSize=12, leading=15)
_WARNING = ParagraphStyle("warning", parent=_BODY, fontSize=10, leading=13, textColor=colors.HexColor("#6b3a00"))


def write_report_pdf(out_path: Path, *, images: dict[str, Path], labels: sitk.Image, measurements: Measurements,
                     identification: Identification, qc: QC, provenance: dict, context: StudyContext,
                     fast_mode: bool, longitudinal: Longitudinal | None = None,
                     population_warning: PopulationWarning | None = None, model_population: str = "") -> Path:
    """Render the report. `images`: role -> atlas-space NIfTI; `labels`: atlas-space, internal convention.

    `qc` becomes the list of quality checks; its flags and `measurements.qc_flags` are listed with them.
    `provenance` (provenance.json's document) fills the model line and the appendix. `longitudinal` (a tracked
    run): the response on page 1 and a page with the trend and change table when earlier time points were compared.
    `population_warning`: boxed on the first page, under the disclaimer. `model_population`: who the model was
    trained on (the bundle's population).
    """
    figures = report_figures(images, labels)
    checks = qc_checks(qc, age_years=context.age_years, whole_tumour_ml=measurements.regions["WT"].volume_ml)
    flags = list(dict.fromkeys([*measurements.qc_flags, *qc.flags]))
    story = [
        *_header(context, fast_mode, population_warning, provenance, model_population),
        *_volumes(measurements),
        *_rapno(measurements),
        *_summary(checks, flags, longitudinal),
        *_figures(figures, measurements),
        *_longitudinal(longitudinal),
        *_qc(checks, flags),
        *_identification(identification),
        *_provenance(provenance, identification),
    ]
    footer = _footer(context.display_id)
    with atomic_path(out_path) as tmp:
        doc = SimpleDocTemplate(str(tmp), pagesize=A4, leftMargin=16 * mm, rightMargin=16 * mm,
                                topMargin=14 * mm, bottomMargin=16 * mm, title=TITLE,
                                subject="For research use only", creator="pedseg", invariant=1)
        doc.build(story, onFirstPage=footer, onLaterPages=footer)
    logger.debug("wrote PDF report with %d figure(s)", len(figures))
    return Path(out_path)


def _text(value) -> str:
    return escape(str(value))


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    return str(value)


def _date(value: str) -> str:
    value = str(value or "")
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else (value or "—")


def _table(rows: list[list[str]], widths: list[float], *, header: bool = True, numeric_from: int | None = None):
    """A grid table of wrapping paragraphs; columns from `numeric_from` on are right-aligned below the header."""
    def cell(text: str, r: int, c: int) -> Paragraph:
        if header and r == 0:
            style = _CELL_HEAD
        elif numeric_from is not None and c >= numeric_from:
            style = _CELL_NUM
        else:
            style = _CELL
        return Paragraph(_text(text), style)

    cells = [[cell(text, r, c) for c, text in enumerate(row)] for r, row in enumerate(rows)]
    table = Table(cells, colWidths=[w * mm for w in widths], repeatRows=1 if header else 0)
    style = [
        ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#999999")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
    ]
    if header:
        style.append(("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e6e6e6")))
    table.setStyle(TableStyle(style))
    return table


_POPULATIONS = {"pediatric": "children", "adult": "adults", "adult-and-pediatric": "adults and children",
                "synthetic": "synthetic phantoms only (a demonstration model)", "unspecified": "not stated"}


def _header(context: StudyContext, fast_mode: bool, population_warning: PopulationWarning | None,
            provenance: dict, model_population: str) -> list:
    bundle = provenance.get("bundle", {})
    model = f"{bundle.get('name', '—')} {bundle.get('version', '')}".strip()
    rows = [["Subject", context.display_id or "—"], ["Study date", _date(context.study_date)], ["Model", model]]
    if model_population:
        rows.append(["Trained on", _POPULATIONS.get(model_population, model_population)])
    info = _table(rows, [35, 90], header=False)
    info.hAlign = "LEFT"
    disclaimer = Table([[Paragraph(_text(DISCLAIMER), _DISCLAIMER)]], colWidths=[178 * mm])
    disclaimer.setStyle(TableStyle([
        ("BOX", (0, 0), (-1, -1), 1.5, colors.HexColor("#8b0000")),
        ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fdecea")),
        ("TOPPADDING", (0, 0), (-1, -1), 6), ("BOTTOMPADDING", (0, 0), (-1, -1), 6),
    ]))
    flow = [Paragraph(TITLE, _H1), info, Spacer(1, 4 * mm), disclaimer, Spacer(1, 2 * mm)]
    if population_warning is not None:
        flow += [_warning_box(POPULATION_HEADING, population_warning.message), Spacer(1, 2 * mm)]
    skipped = {name: why for name, why in ((provenance.get("ensemble") or {}).get("members_skipped") or {}).items()
               if why != FALLBACK_NOT_NEEDED}
    if skipped:  # fallback members made this result: say which ran and which could not
        ran = ", ".join(provenance.get("models", [])) or "—"
        flow += [_warning_box(FALLBACK_HEADING, f"Made by {ran} only; skipped: "
                              + "; ".join(f"{name} ({why})" for name, why in skipped.items())
                              + ". A model made for fewer sequences is usually less accurate than the full one: "
                                "check its held-out figures in the bundle's model card before trusting volumes."),
                 Spacer(1, 2 * mm)]
    if fast_mode:
        flow.append(Paragraph(f"<b>{_text(FAST_MODE_LINE)}</b>", _BODY))
    return flow


def _warning_box(heading: str, message: str) -> Table:
    box = Table([[Paragraph(f"<b>{_text(heading)}.</b> {_text(message)}", _WARNING)]], colWidths=[178 * mm])
    box.setStyle(TableStyle([
        ("BOX", (0, 0), (-1, -1), 1.5, colors.HexColor("#c77700")),
        ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fff4e0")),
        ("TOPPADDING", (0, 0), (-1, -1), 6), ("BOTTOMPADDING", (0, 0), (-1, -1), 6),
    ]))
    return box


def _volumes(measurements: Measurements) -> list:
    rows = measurement_rows(measurements)
    by_name = {r["region"]: r for r in rows if r["convention"] in ("2024", "composite")}
    volume = f"{{:.{VOLUME_DECIMALS}f}}"
    table_rows = [["Region", "Description", "On the T1c series (mL)", "Atlas space (mL)", "Lesions"]]
    for name in ("ET", "NET", "CC", "ED", "TC", "WT"):
        r = by_name[name]
        native = "—" if r["native_volume_ml"] is None else volume.format(r["native_volume_ml"])
        table_rows.append([name, REGION_DESCRIPTIONS[name], native, volume.format(r["volume_ml"]),
                           str(r["components"])])
    old = {r["region"]: r for r in rows if r["convention"] == "2023"}
    flow = [Paragraph("Tumour volumes", _H2)]
    if measurements.regions["WT"].voxels == 0:
        flow.append(Paragraph(NO_TUMOUR, _ALERT))
    flow += [
        _table(table_rows, [18, 62, 28, 36, 24], numeric_from=2),
        Spacer(1, 1.5 * mm),
        Paragraph("On the T1c series: the segmentation's voxels on the acquired post-contrast T1, the volumes the "
                  "DICOM SEG and SR carry. Atlas space: after rigid registration to the BraTS reference (1 mm "
                  "voxels), the space the model segmented in. Lesions: 3D connected components. "
                  "BraTS-PEDs 2023 convention: " + ", ".join(
                      f"{n} {volume.format(old[n]['volume_ml'])} mL" for n in ("NCR", "ED", "ET"))
                  + " (NCR = NET + CC).", _SMALL),
    ]
    u = measurements.uncertainty
    if u is not None and u.mean_entropy_WT is not None:
        flow.append(Paragraph(f"Model uncertainty (normalised entropy, 0 certain to 1 undecided): mean "
                              f"{u.mean_entropy_WT:.2f} inside WT; {u.uncertain_volume_ml:.1f} mL of voxels "
                              f"at 0.5 or above.", _SMALL))
    return flow


def _rapno(measurements: Measurements) -> list:
    block = rapno_block(measurements.rapno)
    region = block.get("region", "TC")
    flow = [Paragraph(f"RAPNO bidimensional measurements ({_text(region)})", _H2)]
    lesions = block["lesions"]
    if not lesions:
        return flow + [Paragraph(f"No {_text(region)} lesion to measure.", _BODY)]
    rows = [["Lesion", "Axial slice z (mm)", "Longest (mm)", "Perpendicular (mm)", "Product (mm²)",
             "Volume (mL)", "Measurable"]]
    for i, lesion in enumerate(lesions, 1):
        rows.append([str(i), f"{lesion['slice_z_mm']:.1f}", f"{lesion['longest_mm']:.1f}",
                     f"{lesion['perpendicular_mm']:.1f}", f"{lesion['product_mm2']:.1f}",
                     "—" if lesion["volume_ml"] is None else f"{lesion['volume_ml']:.{VOLUME_DECIMALS}f}",
                     _fmt(lesion.get("measurable"))])
    rows.append(["Sum", "", "", "", f"{block['sum_product_mm2']:.1f}", "", ""])
    wt = measurements.regions["WT"].bidimensional_mm2
    note = (f"{len(lesions)} of {block.get('lesions_total', len(lesions))} lesion(s) measured (3D connected "
            f"components, largest first), each on its own axial slice of largest area, resampled to the patient "
            f"axial plane. Longest diameter: maximum Feret diameter; perpendicular: longest chord within "
            f"±{block.get('tolerance_deg', 5.0):g}° of perpendicular. Measurable: both diameters at least 10 mm. ")
    if wt is not None and region != "WT":
        note += f"Whole-tumour sum of products: {wt:.1f} mm²."
    return flow + [_table(rows, [14, 28, 24, 30, 28, 26, 28], numeric_from=1), Spacer(1, 1.5 * mm),
                   Paragraph(_text(note), _SMALL)]


def _image(png: bytes, max_width: float, max_height: float) -> Image:
    width, height = ImageReader(io.BytesIO(png)).getSize()
    scale = min(max_width / width, max_height / height)
    return Image(io.BytesIO(png), width=width * scale, height=height * scale)


def _figures(figures: dict[str, bytes], measurements: Measurements) -> list:
    if measurements.regions["WT"].voxels == 0:
        intro = Paragraph(f"{NO_TUMOUR}: planes through the centre of the imaged volume.", _BODY)
    else:
        intro = Paragraph("Radiological convention: patient right on image left, anterior (axial) or superior "
                          "(coronal, sagittal) at the top. Planes through the tumour centroid.", _SMALL)
    images = [_image(png, 178 * mm, 120 * mm) for png in figures.values()]
    # The heading travels with the first figure so it is never left alone at the foot of a page.
    flow = [KeepTogether([Paragraph("Segmentation overlays", _H2), intro, *images[:1]])]
    return flow + [KeepTogether([Spacer(1, 3 * mm), image]) for image in images[1:]]


def _longitudinal(longitudinal: Longitudinal | None) -> list:
    if longitudinal is None:
        return []
    notes = [Paragraph(_text(note), _SMALL) for note in longitudinal.notes]
    if not longitudinal.priors:
        first = "No earlier time point of this subject to compare with; this study is the baseline for later runs."
        return [Paragraph("Longitudinal change", _H2), *notes, Paragraph(_text(first), _BODY)]
    t = longitudinal.thresholds
    rows = [["Region", "Volume (mL)", "vs baseline (mL, %)", "Nadir (mL)", "vs nadir (mL, %)", "vs previous (mL, %)",
             "Response"]]
    for change in longitudinal.changes.values():
        rows.append([change.region, f"{change.volume_ml:.{VOLUME_DECIMALS}f}",
                     format_change(change.vs_baseline.ml, change.vs_baseline.pct),
                     f"{change.nadir_ml:.{VOLUME_DECIMALS}f}", format_change(change.vs_nadir.ml, change.vs_nadir.pct),
                     format_change(change.vs_previous.ml, change.vs_previous.pct), change.response])
    dates = ", ".join(_date(tp.study_date) for tp in longitudinal.priors)
    intro = (f"Compared with {len(longitudinal.priors)} earlier time point(s) of this subject ({dates}); baseline "
             f"{_date(longitudinal.priors[0].study_date)}, measured with the same model bundle unless noted below.")
    legend = (f"Response per region (RAPNO volumetric thresholds): PD progressive disease, volume ≥ "
              f"{t.progression_pct:+g} % vs nadir (the smallest earlier volume) or tumour back after none; PR partial "
              f"response, ≤ {t.partial_response_pct:+g} % vs baseline; CR complete response, at most "
              f"{t.absent_ml:g} mL left; SD stable disease otherwise; NE: {RESPONSES['NE']}. Atlas-space volumes.")
    return [PageBreak(), Paragraph("Longitudinal change", _H2), Paragraph(_text(intro), _BODY), Spacer(1, 2 * mm),
            _image(trend_png(longitudinal), 178 * mm, 110 * mm), Spacer(1, 2 * mm),
            _table(rows, [16, 22, 32, 20, 32, 32, 24], numeric_from=1), Spacer(1, 1.5 * mm),
            Paragraph(_text(legend), _SMALL), *notes]


_STATUS_COLOURS = {"pass": "#1b7f3b", "warn": "#b36b00", "fail": "#b00020"}
_STATUS_FILLS = {"pass": "#d9f2e1", "warn": "#ffefd1", "fail": "#fbd5da"}


def _summary(checks: list[Check], flags: list[str], longitudinal: Longitudinal | None) -> list:
    """Page 1's closing lines: the response when tracked, and the quality checks in one line."""
    flow = []
    if longitudinal is not None and longitudinal.priors and "WT" in longitudinal.changes:
        wt = longitudinal.changes["WT"]
        flow.append(Paragraph(f"<b>Response (whole tumour, volumetric):</b> {_text(wt.response)} — "
                              f"{_text(RESPONSES.get(wt.response, ''))}; see the longitudinal page.", _BODY))
    counts = {status: sum(c.status == status for c in checks) for status in ("pass", "warn", "fail")}
    text = ", ".join(f'<font color="{_STATUS_COLOURS[k]}"><b>{n} {k}</b></font>' for k, n in counts.items() if n)
    needs = [c.name for c in checks if c.status != "pass"]
    line = f"<b>Quality checks:</b> {text or 'none recorded'}"
    if needs:
        line += " — review: " + _text("; ".join(needs))
    elif flags:
        line += f" — {len(flags)} message(s) from the run"
    return [Spacer(1, 2 * mm), *flow, Paragraph(line + ". Details on the quality page.", _BODY)]


def _qc(checks: list[Check], flags: list[str]) -> list:
    rows = [["Check", "Result", "Found", "Threshold", "What to do"]]
    rows += [[c.name, c.status.upper(), c.found, c.threshold, c.action or "—"] for c in checks]
    table = _table(rows, [36, 14, 42, 32, 54])
    for r, check in enumerate(checks, start=1):
        table.setStyle(TableStyle([("BACKGROUND", (1, r), (1, r), colors.HexColor(_STATUS_FILLS[check.status]))]))
    flow = [PageBreak(), Paragraph("Quality checks", _H2), table, Spacer(1, 2 * mm)]
    if flags:
        flow.append(Paragraph("<b>Messages from the run</b> (each names what to check):", _BODY))
        flow += [Paragraph("• " + _text(flag), _BODY) for flag in flags]
    else:
        flow.append(Paragraph("No messages from the run.", _BODY))
    return flow


def _identification(identification: Identification) -> list:
    rows = [["Series", "Description", "Used as", "Certainty", "Used", "Decided by"]]
    for d in identification.decisions:
        decided = d.decided_by or (d.reasons[0] if d.reasons else "—")
        if d.contrast_decided_by:
            decided += f"; contrast: {d.contrast_decided_by}"
        if not d.names_available:
            decided += " (no series name in the headers)"
        used_as = ROLE_NAMES.get(d.role, "not used" if d.role == "other" else d.role)
        rows.append([_fmt(d.series_number), d.description or "—", used_as,
                     f"{d.confidence:.2f}", ("pinned" if d.pinned else "yes") if d.chosen else "", decided])
    flow = [Paragraph("Series identification", _H2), _table(rows, [14, 44, 30, 20, 14, 56])]
    if identification.pinned:
        pinned = [f"{role} → {_pinned_label(identification, key)}" for role, key in identification.pinned.items()]
        flow.append(Paragraph("<b>Roles pinned by hand</b> (not chosen by identification): "
                              + _text("; ".join(pinned)), _BODY))
    if identification.missing:
        flow.append(Paragraph("Missing sequences: " + _text(", ".join(ROLE_NAMES.get(r, r)
                                                                        for r in identification.missing)), _BODY))
    return flow


def _pinned_label(identification: Identification, key: str) -> str:
    return next((d.label for d in identification.decisions if d.key == key), key)


_STAGES = {"ingest": "reading DICOM", "identify": "identification", "preprocess": "registration and skull "
           "stripping", "infer": "segmentation", "postprocess": "clean-up", "measure": "measurement",
           "report": "reports"}


def _provenance(provenance: dict, identification: Identification) -> list:
    """The appendix: what ran, on which series, how long; the full record is provenance.json."""
    bundle = provenance.get("bundle", {})
    series = {d.key: d for d in identification.decisions}
    inputs = "; ".join(f"{ROLE_NAMES.get(role, role)}: {series[key].label if key in series else key}"
                       for role, key in provenance.get("inputs", {}).get("series_instance_uids", {}).items())
    models = provenance.get("models", [])
    licence = bundle.get("licence") or "licence not stated"
    fingerprint = str(bundle.get("sha256", ""))[:12] or "—"
    rows = [
        ["Model", f"{bundle.get('name', '—')} {bundle.get('version', '')} ({licence}); weights fingerprint "
                  f"{fingerprint}"],
        ["Ran", f"{len(models)} model(s), {len(provenance.get('folds', []))} fold(s), test-time augmentation "
                f"{'on' if provenance.get('tta') else 'off'}, on {provenance.get('device', '—')}"
                + (" (fast mode)" if provenance.get("fast_mode") else "")],
        ["Series used", inputs or "—"],
        ["Clean-up", "; ".join(f"{step['step']}: {step['voxels_changed']} voxels" for step in
                                provenance.get("postprocessing", [])) or "none"],
    ]
    seconds = provenance.get("stage_seconds", {})
    if seconds:
        rows.append(["Time", f"{sum(seconds.values()):.0f} s: " + ", ".join(
            f"{_STAGES.get(stage, stage)} {value:.1f} s" for stage, value in seconds.items())])
    packages = provenance.get("packages", {})
    rows.append(["Software", f"pedseg {provenance.get('pedseg_version', '—')}"
                 + "".join(f", {name} {version}" for name, version in packages.items())])
    return [Paragraph("Appendix: provenance", _H2), _table(rows, [28, 150], header=False),
            Spacer(1, 1.5 * mm), Paragraph("The complete record, with every series UID, is provenance.json.", _SMALL)]


REVIEWED_TITLE = "Reviewed segmentation: tumour volumes"


def write_review_pdf(out_path: Path, *, reviewed: Measurements, automatic_volumes_ml: dict[str, float],
                     study_date: str | None, model: str) -> Path:
    """One page: the volumes of a radiologist's edited segmentation beside the automatic ones (`pedseg review`)."""
    volume = f"{{:.{VOLUME_DECIMALS}f}}"
    rows = [["Region", "Description", "Automatic (mL)", "Reviewed (mL)", "Change (mL)"]]
    for name in REGIONS:
        after = reviewed.regions[name].volume_ml
        before = automatic_volumes_ml.get(name)
        rows.append([name, REGION_DESCRIPTIONS[name], "—" if before is None else volume.format(before),
                     volume.format(after), "—" if before is None else f"{after - before:+.{VOLUME_DECIMALS}f}"])
    info = _table([["Study date", _date(study_date or "")], ["Automatic segmentation by", model or "—"]], [50, 90],
                  header=False)
    info.hAlign = "LEFT"
    rapno = reviewed.rapno
    story = [Paragraph(REVIEWED_TITLE, _H1), info, Spacer(1, 3 * mm),
             Paragraph("<b>REVIEWED</b>: these volumes come from a segmentation edited by a reader, measured on the "
                       "grid of the edited DICOM SEG; they replace the automatic volumes in the longitudinal "
                       "record.", _BODY), Spacer(1, 2 * mm),
             _table(rows, [18, 62, 32, 32, 32], numeric_from=2), Spacer(1, 2 * mm),
             Paragraph(f"RAPNO ({_text(rapno.region)}) sum of products on the reviewed segmentation: "
                       f"{rapno.sum_product_mm2:.1f} mm² over {len(rapno.lesions)} measured lesion(s).", _BODY),
             Spacer(1, 3 * mm), Paragraph(_text(DISCLAIMER), _SMALL)]
    with atomic_path(out_path) as tmp:
        doc = SimpleDocTemplate(str(tmp), pagesize=A4, leftMargin=16 * mm, rightMargin=16 * mm,
                                topMargin=14 * mm, bottomMargin=16 * mm, title=REVIEWED_TITLE,
                                subject="For research use only", creator="pedseg", invariant=1)
        doc.build(story, onFirstPage=_footer(""), onLaterPages=_footer(""))
    return Path(out_path)


def _footer(display_id: str):
    def draw(canvas, doc) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7.5)
        canvas.setFillColor(colors.HexColor("#8b0000"))
        canvas.drawString(doc.leftMargin, 9 * mm, "For research use only. Not for clinical diagnosis.")
        canvas.setFillColor(colors.black)
        label = f"Subject {display_id} · page {doc.page}" if display_id else f"page {doc.page}"
        canvas.drawRightString(A4[0] - doc.rightMargin, 9 * mm, label)
        canvas.restoreState()
    return draw
