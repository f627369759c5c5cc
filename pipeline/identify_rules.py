"""The series-identification rule table: data, read top to bottom like a technologist's checklist.

Each rule is (name, predicate, evidence weights per role, reason template). A predicate looks at the
`Facts` of one series (its header plus a few session-level relations) and returns a short description of
what it saw (truthy) or None. Weights are log-odds-like evidence added to each role's score; the weight
`REJECT` means "never one of the four inputs", whatever else is true. The reason template is formatted
with `f` (the Facts) and `hit` (what the predicate saw) and must read well to an MR technologist.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pedseg.pipeline.types import SeriesHeader

OTHER = "other"
REJECT: Mapping[str, float] = MappingProxyType({OTHER: float("inf")})

ROLE_NAMES = {
    "t1n": "pre-contrast T1 (t1n)",
    "t1c": "post-contrast T1 (t1c)",
    "t2w": "T2 (t2w)",
    "t2f": "T2-FLAIR (t2f)",
}

# Values some scanners write into ContrastBolusAgent when no agent was given.
_NO_AGENT = {"", "NONE", "NO", "N/A", "NA", "0", "-", "NIL", "NULL", "NO CONTRAST", "WITHOUT", "UNKNOWN"}


@dataclass(frozen=True)
class Facts:
    """One series as the rules see it: header values made comparable, plus relations to other series."""

    h: SeriesHeader
    description: str  # upper case, '_' turned into spaces, so word boundaries work on vendor names
    protocol: str
    tr: float | None
    te: float | None
    ti: float | None
    flip: float | None
    seq: frozenset[str]  # ScanningSequence terms: SE, GR, IR, EP, RM
    variant: frozenset[str]  # SequenceVariant terms: SK, SP, SS, MP, OSP, MTC...
    image_type: tuple[str, ...]
    agent: str  # contrast agent/ingredient, "" when absent or a "none" placeholder
    agent_informative: bool  # False when every series of the session carries an agent (typed in once)
    after_agent: SeriesHeader | None  # an earlier series that records a contrast agent
    before_agent: SeriesHeader | None  # the first series that records an agent, acquired after this one
    earlier_twin: SeriesHeader | None  # same protocol and parameters, acquired earlier
    twin_minutes: float | None
    echo_times: tuple[float, ...] = ()  # every echo of the acquisition: this series' and its split parts'
    names_available: bool = True  # SeriesDescription, ProtocolName or SequenceName is not blank

    @property
    def timing(self) -> str:
        parts = [f"{name} {_num(v)} ms" for name, v in (("TR", self.tr), ("TE", self.te), ("TI", self.ti)) if v]
        return " / ".join(parts) if parts else "no TR/TE recorded"

    @property
    def gre(self) -> bool:
        return "GR" in self.seq and "SE" not in self.seq and "EP" not in self.seq

    @property
    def prepared(self) -> bool:
        """Inversion- or T2-prepared (MPRAGE, IR-SPGR, FLAIR): the preparation, not TR, sets the contrast."""
        return self.ti is not None or "MP" in self.variant or "IR" in self.seq

    @property
    def voxel_edge(self) -> float | None:
        """The coarsest voxel edge in mm, from PixelSpacing and SliceThickness."""
        h = self.h
        return max(*h.pixel_spacing, h.slice_thickness) if h.pixel_spacing and h.slice_thickness else None

    @property
    def coverage_mm(self) -> float | None:
        """How far the stack reaches through the head: slices × thickness (a slab for 3D)."""
        return self.h.num_images * self.h.slice_thickness if self.h.num_images and self.h.slice_thickness else None

    @property
    def spin_echo(self) -> bool:
        """Spin-echo family (SE, TSE/FSE, inversion-recovery SE); unknown sequence types count as SE."""
        return not ({"GR", "EP"} & self.seq) or ("SE" in self.seq and "EP" not in self.seq)


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.upper().replace("_", " ")).strip()


def clean_agent(*values: str) -> str:
    for value in values:
        if value.strip().upper() not in _NO_AGENT:
            return value.strip()
    return ""


def same_protocol(a: SeriesHeader, b: SeriesHeader) -> bool:
    """Two series run from one protocol: same name (contrast words aside), same timing, both 2D or both 3D."""
    def close(x: float | None, y: float | None) -> bool:
        return x is None and y is None or x is not None and y is not None and abs(x - y) <= 0.01 * max(abs(x), 1.0)

    return (
        strip_contrast_words(a.description) == strip_contrast_words(b.description)
        and a.mr_acquisition_type == b.mr_acquisition_type
        and all(close(x, y) for x, y in ((a.repetition_time, b.repetition_time), (a.echo_time, b.echo_time),
                                         (a.inversion_time, b.inversion_time), (a.flip_angle, b.flip_angle)))
    )


# ----------------------------------------------------------------------------------- text patterns
# Matched on the normalised SeriesDescription, then ProtocolName. Vendor and language variants included.

_POST = (r"\+ ?C\b|(?<![A-Z0-9])C ?\+|\bPOST\b(?! ?OP)|\bGAD|\bGD\b|\bKM\b|[CK]ONTRAST|\bCE\b|\bENH|\bW ?/ ?C\b"
         r"|\bWITH C\b")
_PRE = (r"\bPRE\b|\bPRE ?(CONTRAST|GAD|GD|KM)|\bNATIV|OHNE KM|\bSIN (CONTRASTE|GAD)|\bSANS\b|\bW ?/ ?O\b|WITHOUT"
        r"|NON ?-?CON|(?<![A-Z0-9])C-(?![A-Z0-9])")
PATTERNS = {
    "localizer": r"LOCALI[SZ]ER|SCOUT|SURVEY|AAH ?SCOUT|3 ?PLANE|TRI ?PILOT|\bPILOT\b|\bLOC\b|\bPLANNING",
    "calibration": r"CALIBRATION|ASSET ?CAL|\bCAL\b|REF ?SCAN|SENSE ?REF|COIL ?SURVEY|\bPURE\b",
    "diffusion": r"\bDWI|\bDTI|DIFFUSION|\bADC\b|TRACE|\bFA\b|\bEADC|TENSOR|\bB ?1000|\bDIFF\b|HARDI|NODDI|RESOLVE"
                 r"|\bDSI\b",
    "perfusion": r"PERFUSION|\bPERF\b|\bDSC\b|\bDCE\b|PCASL|PASL|(?<![A-Z])C?ASL(?![A-Z])|\bCBF\b|\bR?CBV\b|\bMTT\b"
                 r"|\bTTP\b",
    "fmri": r"FMRI|\bBOLD\b|RESTING|\bREST\b|\bTASK\b|FCMRI",
    "field_map": r"FIELD ?MAP|\bFMAP\b|\bB[01] ?MAP|GRE ?FIELD|\bTB1|\bDREAM\b|PHASE ?DIFF",
    "derived": r"\bMPR\b|\bMIP\b|MIN ?IP|REFORMAT|\bRFMT\b|PROJECTION|SUBTRACT|\bSUB\b|SCREEN ?(SAVE|CAPTURE|SHOT)"
               r"|SNAPSHOT",
    "susceptibility": r"\bSWI|\bSWAN\b|T2 ?\*|T2 ?STAR|\bHEMO|SUSCEPT|VEN ?BOLD",
    "angio": r"\bTOF\b|\bMRA\b|\bMRV\b|ANGIO|VENOGRA|INHANCE",
    "bssfp": r"CISS|FIESTA|TRUE ?FISP|TRUFI|\bB ?FFE\b|BFFE",
    "stir": r"\bSTIR\b",
    "spectroscopy": r"SPECTRO|\bSVS\b|\bCSI\b|\bMRS\b",
    "t1_flair": r"T1 ?FLAIR|FLAIR ?T1(?![0-9])|T1 ?TIRM?\b",
    "flair": r"FLAIR|DARK[ -]?FLUID|\bTIRM\b",
    "t1": r"T1(?![0-9])(?! ?MAP)(?! ?RHO)",
    "t1_family": r"MP ?-?RAGE|BRAVO|\bTFE\b|T1 ?TFE|F?SPGR|\bFLASH\b|\bVIBE\b|\bTFL\b|\bLAVA\b|\bTHRIVE\b",
    "t2": r"T2(?![0-9*])(?! ?STAR)",
    "tse_family": r"\bT?SE\b|\bFSE\b|\bTSE\b|\bSPACE\b|\bCUBE\b|\bVISTA\b|\bHASTE\b|SSFSE|PROPELLER|BLADE|MULTIVANE",
    "pd": r"\bPD\b|\bPDW|PROTON",
    "post": _POST,
    "pre": _PRE,
}
_COMPILED = {name: re.compile(pattern) for name, pattern in PATTERNS.items()}
_CONTRAST_WORDS = re.compile(f"{_POST}|{_PRE}")


def strip_contrast_words(description: str) -> str:
    return re.sub(r"[\s+\-]+", " ", _CONTRAST_WORDS.sub(" ", normalise_text(description))).strip()


def text(name: str) -> Callable[[Facts], str | None]:
    """Predicate: pattern `name` occurs in the description (checked first) or the protocol name."""
    pattern = _COMPILED[name]

    def predicate(f: Facts) -> str | None:
        for field_name, value in (("description", f.description), ("protocol name", f.protocol)):
            match = pattern.search(value)
            if match:
                return f"{field_name} matches '{match.group(0).strip()}'"
        return None

    return predicate


def image_type(*values: str) -> Callable[[Facts], str | None]:
    """Predicate: one of `values` occurs in ImageType."""
    def predicate(f: Facts) -> str | None:
        found = [v for v in values if v in f.image_type]
        return f"ImageType {found[0]}" if found else None

    return predicate


def any_of(*predicates: Callable[[Facts], str | None]) -> Callable[[Facts], str | None]:
    def predicate(f: Facts) -> str | None:
        return next((hit for p in predicates if (hit := p(f))), None)

    return predicate


def physics(condition: Callable[[Facts], bool]) -> Callable[[Facts], str | None]:
    """Predicate over timing/sequence values; reports the timing it saw."""
    def predicate(f: Facts) -> str | None:
        return f.timing if condition(f) else None

    return predicate


def _between(x: float | None, lo: float, hi: float) -> bool:
    return x is not None and lo <= x <= hi


def _at_least(x: float | None, lo: float) -> bool:
    return x is not None and x >= lo


def _below(x: float | None, hi: float) -> bool:
    return x is not None and x < hi


def _sequence_name(pattern: str) -> Callable[[Facts], str | None]:
    compiled = re.compile(pattern, re.IGNORECASE)

    def predicate(f: Facts) -> str | None:
        return f"sequence name '{f.h.sequence_name}'" if compiled.search(f.h.sequence_name) else None

    return predicate


def _phase_only(f: Facts) -> str | None:
    parts = set(f.image_type[2:])
    if parts & {"P", "PHASE", "R", "REAL", "I", "IMAGINARY"} and not parts & {"M", "MAGNITUDE", "MIXED"}:
        return "ImageType " + "\\".join(f.image_type)
    return None


def _not_mr(f: Facts) -> str | None:
    return f"modality {f.h.modality}" if f.h.modality and f.h.modality.upper() != "MR" else None


def _secondary_capture(f: Facts) -> str | None:
    return "SOP class Secondary Capture" if f.h.sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.7") else None


# ImageType values of reformats, projections, arithmetic on images and parametric maps (classic vendor terms and
# the enhanced MR 'derived pixel contrast' terms): derived, whatever the first value claims.
_DERIVED_TYPES = ("MPR", "CSA MPR", "MIP", "MNIP", "MINIP", "MIN IP", "PROJECTION IMAGE", "REFORMATTED", "SUBTRACTION",
                  "ADDITION", "DIVISION", "MULTIPLICATION", "MAXIMUM", "MINIMUM", "STD_DEVIATION", "COMPOSED",
                  "T1_MAP", "T2_MAP", "T2_STAR_MAP", "PROTON_DENSITY_MAP", "T1 MAP", "T2 MAP", "T2* MAP", "T1MAP",
                  "T2MAP", "R2STAR", "FAT_FRACTION", "WATER_FRACTION", "PHASE_MAP", "VELOCITY")
# Perfusion maps: the enhanced MR terms and Siemens/GE values.
_PERFUSION_TYPES = ("PERFUSION", "RCBF", "RCBV", "CBF", "CBV", "RELCBF", "RELCBV", "MTT", "TTP", "ASL")
# A label map holds this many distinct values or fewer (background and a few labels); an MR image hundreds.
LABEL_MAP_MAX_VALUES = 8


def _derived_image_type(f: Facts) -> str | None:
    if f.image_type[:1] == ("DERIVED",) or f.image_type[1:2] == ("SECONDARY",):
        return "ImageType " + "\\".join(f.image_type[:3])
    return image_type(*_DERIVED_TYPES)(f)


def _label_map(f: Facts) -> str | None:
    """A mask, ROI or segmentation saved as an MR image, whatever its ImageType claims: a handful of distinct
    values in the sampled slices. One value (a blank image) is not a label map."""
    n = f.h.pixel_values
    return f"{n} distinct values" if n is not None and 2 <= n <= LABEL_MAP_MAX_VALUES else None


def _conflicting_instances(f: Facts) -> str | None:
    n = f.h.conflicting_instances
    return f"{n} SOP Instance UID(s) each held by different images" if n else None


def _epi_time_series(f: Facts) -> str | None:
    # Gradient-echo EPI, as BOLD uses; spin-echo hybrids (GraSE ASL) are caught by the perfusion rule.
    repeated = "EP" in f.seq and "SE" not in f.seq and f.h.num_temporal_positions > 1
    return "echo-planar series with several volumes" if repeated else None


def _few_images(f: Facts) -> str | None:
    return f"{f.h.num_images} image(s)" if f.h.num_images < 10 else None


def _time_series(f: Facts) -> str | None:
    n = f.h.num_temporal_positions
    return f"{n} temporal positions" if n > 1 else None


def _several_orientations(f: Facts) -> str | None:
    n = f.h.num_orientations
    return f"images in {n} different orientations" if n > 1 else None


# Siemens' 3D head scout (AAHead_Scout: TR 3.15 ms, TE 1.37 ms, flip 8°, 1.6 mm) is a low-resolution 3D gradient
# echo with a TR no diagnostic T1 uses; a 3D T1 (MPRAGE, BRAVO, 3D TFE, VIBE) has 1.2 mm voxels or finer.
SCOUT_MAX_TR_MS = 5.0
SCOUT_MIN_VOXEL_MM = 1.5
SCOUT_MAX_MATRIX = 160
# A gradient-echo field map measures the phase that builds up between two short echoes (Siemens 4.92/7.38 ms,
# Philips 2.3/4.6 ms): the echoes differ by a few ms and both are short. A multi-echo T2* series has long echoes;
# a multi-echo MPRAGE is inversion-prepared.
FIELD_MAP_MAX_TE_MS = 10.0
FIELD_MAP_MAX_DELTA_TE_MS = 3.0
# A time-of-flight angiogram: a 3D spoiled gradient echo with short TR, a high flip angle for inflow contrast, and
# thin slices in a slab that covers the circle of Willis rather than the whole head.
TOF_MAX_TR_MS = 60.0
TOF_MIN_FLIP = 15.0
TOF_MAX_SLICE_MM = 0.8
TOF_MAX_SLAB_MM = 120.0


def _scout_3d(f: Facts) -> str | None:
    if f.h.mr_acquisition_type != "3D" or not f.gre or f.prepared or not _below(f.tr, SCOUT_MAX_TR_MS):
        return None
    coarse = f.voxel_edge is not None and f.voxel_edge >= SCOUT_MIN_VOXEL_MM
    small = 0 < max(f.h.rows, f.h.columns) <= SCOUT_MAX_MATRIX
    if not (coarse or small):
        return None
    grid = f"{f.voxel_edge:g} mm voxels" if coarse else f"a {f.h.rows} × {f.h.columns} matrix"
    return f"3D gradient echo with {f.timing} and {grid}"


def _echo_pair(f: Facts) -> str | None:
    echoes = sorted(set(f.echo_times))
    if len(echoes) < 2 or not f.gre or f.prepared or "DIXON" in f.image_type:
        return None
    if echoes[-1] < FIELD_MAP_MAX_TE_MS and echoes[-1] - echoes[0] <= FIELD_MAP_MAX_DELTA_TE_MS:
        return "gradient echo with echoes at TE " + " / ".join(_num(e) for e in echoes) + " ms"
    return None


def _flow_compensated(f: Facts) -> bool:
    return any(o == "FC" or o.startswith("FC_") for o in (v.upper() for v in f.h.scan_options))


def _tof_option(f: Facts) -> str | None:
    found = next((o for o in f.h.scan_options if "TOF" in o.upper()), None)
    return f"ScanOptions {found}" if found else None


def _tof(f: Facts) -> str | None:
    if f.h.mr_acquisition_type != "3D" or not f.gre or f.prepared or not _below(f.tr, TOF_MAX_TR_MS):
        return None
    if not (_below(f.te, 10) and _at_least(f.flip, TOF_MIN_FLIP)):
        return None
    signs = []
    if _flow_compensated(f):
        signs.append("flow compensation")
    thickness, coverage = f.h.slice_thickness, f.coverage_mm
    if thickness and thickness <= TOF_MAX_SLICE_MM and coverage and coverage <= TOF_MAX_SLAB_MM:
        signs.append(f"{thickness:g} mm slices in a {coverage:.0f} mm slab")
    if not signs:
        return None
    return f"3D gradient echo, {f.timing}, flip {f.flip:g}°, " + ", ".join(signs)


def _angio_header(f: Facts) -> str | None:
    if f.h.angio_flag:
        return "AngioFlag Y / TimeOfFlightContrast YES"
    return image_type("ANGIO")(f) or _tof_option(f)


def _b_value(f: Facts) -> str | None:
    b = f.h.b_value
    return f"diffusion b-value {b:g} s/mm²" if b else None


def _stir(f: Facts) -> bool:
    return f.spin_echo and _between(f.ti, 80, 300)


def _agent(f: Facts) -> str | None:
    return f"ContrastBolusAgent '{f.agent}'" if f.agent and f.agent_informative else None


def _post_text(f: Facts) -> str | None:
    return None if text("pre")(f) else text("post")(f)


def _after_agent(f: Facts) -> str | None:
    s = f.after_agent
    return s.label if s is not None and f.agent_informative else None


def _before_agent(f: Facts) -> str | None:
    s = f.before_agent
    return s.label if s is not None and f.agent_informative else None


def _later_twin(f: Facts) -> str | None:
    s = f.earlier_twin
    return s.label if s is not None else None


_T1_FLAIR = text("t1_flair")
_POST_EVIDENCE = (_agent, _post_text, image_type("POST_CONTRAST"), _after_agent, _later_twin)


def _no_contrast_evidence(f: Facts) -> str | None:
    if any(p(f) for p in _POST_EVIDENCE):
        return None
    return "no contrast agent recorded" if not f.agent else "the contrast agent field is set on every series alike"


# What kind of evidence a rule reads; names never outweigh physics that contradicts them (identify._decide).
PHYSICS, HEADER, NAMES, ORDER, IMAGES = "physics", "header", "names", "acquisition order", "images"


@dataclass(frozen=True)
class Rule:
    name: str
    predicate: Callable[[Facts], str | None]
    weights: Mapping[str, float]
    reason: str
    kind: str


def _t1(w: float, t2: float = 0.0, t2f: float | None = None) -> dict[str, float]:
    """Evidence for a T1 contrast, pre or post alike (contrast rules split them), and against the T2 roles."""
    return {"t1n": w, "t1c": w, "t2w": t2, "t2f": t2 if t2f is None else t2f}


def _all(w: float) -> dict[str, float]:
    return {"t1n": w, "t1c": w, "t2w": w, "t2f": w}


RULES: tuple[Rule, ...] = (
    # --- Hard rejections: these series are never one of the four inputs. Header and physics first; a name can
    # also reject (a series called 'localizer' is not worth the risk) but never make a series one of the four.
    Rule("not_mr", _not_mr, REJECT, "{hit}: not an MR series", HEADER),
    Rule("secondary_capture", _secondary_capture, REJECT, "{hit}: a screenshot or scanned page, not MR image data",
         HEADER),
    Rule("localizer", image_type("LOCALIZER"), REJECT, "{hit}: localizer / scout", HEADER),
    Rule("scout_3d", _scout_3d, REJECT, "{hit}: a low-resolution 3D localizer / scout, too coarse and too short a TR "
         "for a diagnostic T1", PHYSICS),
    Rule("diffusion", any_of(image_type("DIFFUSION", "ADC", "TRACEW", "FA", "EADC", "TENSOR"), _b_value), REJECT,
         "{hit}: diffusion image or map", HEADER),
    Rule("perfusion", image_type(*_PERFUSION_TYPES), REJECT, "{hit}: perfusion", HEADER),
    Rule("fmri", image_type("MOSAIC", "FMRI"), REJECT, "{hit}: functional MRI (BOLD / EPI time series)", HEADER),
    Rule("epi_time_series", _epi_time_series, REJECT,
         "{hit}: functional MRI (BOLD / EPI time series) or perfusion", PHYSICS),
    Rule("field_map", image_type("FIELD_MAP", "B0", "B1"), REJECT, "{hit}: field map (a calibration scan)", HEADER),
    Rule("field_map_echoes", _echo_pair, REJECT,
         "{hit}: two short echoes a few ms apart, as a field map (a calibration scan) measures", PHYSICS),
    Rule("phase", _phase_only, REJECT, "{hit}: phase / real / imaginary image, not magnitude", HEADER),
    Rule("derived", any_of(_derived_image_type, _secondary_capture), REJECT,
         "{hit}: derived / secondary image (reformat, projection, subtraction, parametric map or screen capture), "
         "not the acquired data", HEADER),
    Rule("label_map", _label_map, REJECT,
         "pixel values look like a label map ({hit} in the sampled slices): a mask, ROI or segmentation, "
         "not an MR image", IMAGES),
    Rule("conflicting_instances", _conflicting_instances, REJECT,
         "{hit} (different pixels or position): an inconsistent export; this series cannot be trusted", HEADER),
    Rule("angio", _angio_header, REJECT, "{hit}: angiography", HEADER),
    Rule("tof", _tof, REJECT, "{hit}: time-of-flight angiography", PHYSICS),
    Rule("stir", physics(_stir), REJECT, "{hit}: short-TI inversion recovery (STIR)", PHYSICS),
    Rule("few_images", _few_images, REJECT, "{hit}: fewer than 10 slices, not a brain volume", HEADER),
    Rule("time_series", _time_series, REJECT, "{hit}: a 4D time series, not a single volume", HEADER),
    Rule("orientations", _several_orientations, REJECT, "{hit}: several stacks in one series (e.g. 3-plane)", HEADER),
    Rule("localizer_name", text("localizer"), REJECT, "{hit}: localizer / scout", NAMES),
    Rule("calibration_name", text("calibration"), REJECT, "{hit}: coil calibration / reference scan", NAMES),
    Rule("diffusion_name", any_of(text("diffusion"), _sequence_name(r"ep_b|diff|dwi")), REJECT,
         "{hit}: diffusion image or map", NAMES),
    Rule("perfusion_name", any_of(text("perfusion"), _sequence_name(r"perf")), REJECT, "{hit}: perfusion", NAMES),
    Rule("fmri_name", text("fmri"), REJECT, "{hit}: functional MRI (BOLD / EPI time series)", NAMES),
    Rule("field_map_name", text("field_map"), REJECT, "{hit}: field map (a calibration scan)", NAMES),
    Rule("derived_name", text("derived"), REJECT, "{hit}: derived / secondary image (reformat, projection, "
         "subtraction), not the acquired data", NAMES),
    Rule("susceptibility_name", text("susceptibility"), REJECT, "{hit}: susceptibility / T2*-weighted", NAMES),
    Rule("angio_name", text("angio"), REJECT, "{hit}: angiography", NAMES),
    Rule("bssfp_name", any_of(text("bssfp"), _sequence_name(r"ci3d|tfi|trufi")), REJECT,
         "{hit}: balanced steady-state (CISS / FIESTA / TrueFISP)", NAMES),
    Rule("stir_name", text("stir"), REJECT, "{hit}: short-TI inversion recovery (STIR)", NAMES),
    Rule("spectroscopy_name", text("spectroscopy"), REJECT, "{hit}: spectroscopy", NAMES),
    # --- Physics: what TR, TE, TI, flip angle and sequence type make the image look like. ---
    Rule("t1_ir_gre",
         physics(lambda f: f.gre and _below(f.te, 10) and (_between(f.ti, 300, 1300) or "MP" in f.variant)
                 and not _at_least(f.tr, 3000)),
         _t1(3, -3), "{hit}: T1-weighted inversion-prepared gradient echo (MPRAGE / IR-SPGR / BRAVO / TFE)", PHYSICS),
    Rule("t1_spoiled_gre",
         physics(lambda f: f.gre and _below(f.te, 10) and f.ti is None and "MP" not in f.variant
                 and (_below(f.tr, 50) and _at_least(f.flip, 8) or _between(f.tr, 50, 800) and _at_least(f.flip, 40))),
         _t1(2.5, -3), "{hit}, flip {f.flip:g}°: T1-weighted spoiled gradient echo (FLASH / SPGR / FFE)", PHYSICS),
    Rule("t1_spin_echo",
         physics(lambda f: f.spin_echo and f.ti is None and _below(f.te, 30) and _between(f.tr, 300, 1000)),
         _t1(3, -3), "{hit}: T1-weighted (turbo) spin echo", PHYSICS),
    # TI 350-1300 with short TE: T1-FLAIR, or the T1 inversion recovery used for neonatal myelination.
    Rule("t1_flair",
         physics(lambda f: f.spin_echo and _between(f.ti, 350, 1300) and _below(f.te, 40) and _at_least(f.tr, 1000)),
         _t1(3, -3, -4), "{hit}: T1-FLAIR / T1 inversion recovery (short TE) — T1-weighted, not a T2-FLAIR", PHYSICS),
    Rule("t2_spin_echo",
         physics(lambda f: f.spin_echo and f.ti is None and _at_least(f.te, 70) and _at_least(f.tr, 1800)),
         {"t2w": 3.5, "t2f": -1, "t1n": -3, "t1c": -3}, "{hit}, no inversion: T2-weighted (turbo) spin echo", PHYSICS),
    Rule("t2_flair",
         physics(lambda f: f.spin_echo and _at_least(f.ti, 1400) and _at_least(f.te, 70) and _at_least(f.tr, 4000)),
         {"t2f": 4, "t2w": -2, "t1n": -3, "t1c": -3}, "{hit}: T2-FLAIR (fluid-attenuated T2)", PHYSICS),
    Rule("proton_density",
         physics(lambda f: f.spin_echo and f.ti is None and _below(f.te, 40) and _at_least(f.tr, 1800)),
         _all(-2), "{hit}: long TR with short TE — proton-density weighted", PHYSICS),
    Rule("t2star_gre", physics(lambda f: f.gre and _at_least(f.te, 15)), _all(-2),
         "{hit}: gradient echo with long TE — T2*-weighted", PHYSICS),
    Rule("epi_readout", lambda f: "ScanningSequence EP" if "EP" in f.seq else None, _all(-1.5),
         "{hit}: echo-planar readout — distorted and low resolution", PHYSICS),
    # --- Image flavour written by enhanced MR objects (ImageType value 3). ---
    Rule("flavour_t1", lambda f: "ImageType T1" if f.image_type[2:3] == ("T1",) else None, _t1(1),
         "{hit}: the scanner labels it T1-weighted", HEADER),
    Rule("flavour_t2", lambda f: "ImageType T2" if f.image_type[2:3] == ("T2",) else None,
         {"t2w": 1, "t2f": 0.5}, "{hit}: the scanner labels it T2-weighted", HEADER),
    Rule("flavour_flair", lambda f: "ImageType FLAIR" if f.image_type[2:3] == ("FLAIR",) else None,
         {"t2f": 1.5, "t2w": -0.5}, "{hit}: the scanner labels it FLAIR", HEADER),
    # --- Names: SeriesDescription / ProtocolName, vendor and language variants. They add confidence; a role that
    # only names support while the physics speaks against it is not given (identify._decide). ---
    Rule("text_t1_flair", text("t1_flair"), _t1(2, -1, -3), "{hit}: a T1-FLAIR, which is T1-weighted", NAMES),
    Rule("text_flair", lambda f: None if _T1_FLAIR(f) else text("flair")(f), {"t2f": 2.5, "t2w": -1.5},
         "{hit}: FLAIR", NAMES),
    Rule("text_t1", text("t1"), _t1(2, -1), "{hit}: T1-weighted", NAMES),
    Rule("text_t1_family", text("t1_family"), _t1(2, -1), "{hit}: a T1-weighted 3D gradient-echo sequence", NAMES),
    Rule("text_t2", text("t2"), {"t2w": 2, "t2f": 1, "t1n": -1, "t1c": -1}, "{hit}: T2-weighted", NAMES),
    Rule("text_tse", text("tse_family"), {"t2w": 0.5, "t2f": 0.5}, "{hit}: turbo spin echo, usually T2 or FLAIR",
         NAMES),
    Rule("text_pd", text("pd"), _all(-1), "{hit}: proton density", NAMES),
    # --- Contrast: splits T1 into pre (t1n) and post (t1c). ---
    Rule("contrast_agent", _agent, {"t1c": 3, "t1n": -3}, "{hit} set: post-contrast", HEADER),
    Rule("flavour_post", image_type("POST_CONTRAST"), {"t1c": 3, "t1n": -3}, "{hit}: post-contrast", HEADER),
    Rule("flavour_pre", image_type("PRE_CONTRAST"), {"t1n": 2, "t1c": -3}, "{hit}: pre-contrast", HEADER),
    Rule("text_post", _post_text, {"t1c": 2.5, "t1n": -2.5}, "{hit}: post-contrast", NAMES),
    Rule("text_pre", text("pre"), {"t1n": 2, "t1c": -2.5}, "{hit}: pre-contrast", NAMES),
    Rule("after_agent", _after_agent, {"t1c": 2, "t1n": -2},
         "acquired after {hit}, which records a contrast agent: post-contrast", ORDER),
    Rule("before_agent", lambda f: None if f.agent else _before_agent(f), {"t1n": 1.5, "t1c": -1.5},
         "acquired before {hit}, the first series that records a contrast agent: pre-contrast", ORDER),
    Rule("later_twin", _later_twin, {"t1c": 1, "t1n": -1},
         "same protocol and parameters as {hit}, acquired {f.twin_minutes:.0f} min later: where a post-contrast "
         "repeat usually comes", ORDER),
    Rule("no_contrast_evidence", _no_contrast_evidence, {"t1n": 1.5},
         "{hit}, and nothing marks it post-contrast: pre-contrast", HEADER),
)
