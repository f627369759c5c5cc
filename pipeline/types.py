"""Typed records passed between pipeline stages.

Each stage (ingest → identify → preprocess → infer → postprocess → measure) takes and returns these,
so adapters (CLI, Flywheel, PACS) and reporting never depend on a stage's internals.
Geometry convention: every image on disk is NIfTI read/written through SimpleITK (LPS physical space).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("t1n", "t1c", "t2w", "t2f")


def series_key(series_uid: str, part: str) -> str:
    """Names a series within its session: its SeriesInstanceUID, plus '#part' for one stack of a series that
    mixed orientations or echoes (the parts share the real UID, which DICOM outputs must reference)."""
    return f"{series_uid}#{part}" if part else series_uid


def series_label(number: int | None, description: str, part: str = "") -> str:
    """How messages name a series: number and description (never patient identifiers), and the part."""
    label = f"series {number if number is not None else '?'} '{description}'"
    return f"{label} part {part}" if part else label


class _NamedSeries:
    """`key` and `label` for anything that carries series_uid, part, series_number and description."""

    @property
    def key(self) -> str:
        return series_key(self.series_uid, self.part)

    @property
    def label(self) -> str:
        return series_label(self.series_number, self.description, self.part)


@dataclass(frozen=True)
class SeriesHeader(_NamedSeries):
    """What identification needs from one series' DICOM headers. No patient identifiers."""

    series_uid: str
    series_number: int | None
    description: str
    protocol: str
    modality: str
    manufacturer: str
    model: str
    sop_class_uid: str
    repetition_time: float | None  # ms
    echo_time: float | None  # ms
    inversion_time: float | None  # ms
    flip_angle: float | None
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    sequence_name: str
    scan_options: tuple[str, ...]
    mr_acquisition_type: str  # "2D", "3D" or ""
    image_type: tuple[str, ...]
    contrast_agent: str  # ContrastBolusAgent, "" when absent
    contrast_ingredient: str
    acquisition_time: float | None  # seconds after midnight (AcquisitionTime or SeriesTime)
    num_images: int  # instances, or frames for enhanced multi-frame
    slice_thickness: float | None
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient of the first image
    rows: int
    columns: int
    study_uid: str
    frame_of_reference_uid: str
    num_echoes: int = 1
    num_temporal_positions: int = 1
    num_orientations: int = 1
    part: str = ""  # "" for a whole series; e.g. "e2", "cor", "ax_e1" for one stack of a split series


@dataclass
class Series:
    header: SeriesHeader
    files: list[Path]


@dataclass
class Session:
    """A study as found in the input: its series, and where its files were unpacked."""

    series: list[Series]
    study_uid: str
    root: Path  # the input folder; the work folder when archives were unpacked or several inputs merged
    study_date: str = ""  # YYYYMMDD, not PHI on its own and needed for longitudinal ordering

    def by_uid(self, key: str) -> Series:
        """The series with this key: its SeriesInstanceUID, or 'UID#part' for one part of a split series."""
        for s in self.series:
            if s.header.key == key:
                return s
        raise KeyError(key)


@dataclass
class SeriesDecision(_NamedSeries):
    series_uid: str
    series_number: int | None
    description: str
    role: str  # one of ROLES or "other"
    confidence: float  # in [0, 1]
    reasons: list[str]
    chosen: bool = False
    part: str = ""


@dataclass
class Identification:
    decisions: list[SeriesDecision]
    chosen: dict[str, str]  # role -> series key (the SeriesInstanceUID, or 'UID#part' for part of a split series)
    missing: list[str]

    def to_dict(self) -> dict:
        return {
            "series": [vars(d) for d in self.decisions],
            "chosen": dict(self.chosen),
            "missing": list(self.missing),
        }


@dataclass
class Preprocessed:
    """Atlas-space (BraTS 240x240x155, 1 mm), skull-stripped images plus everything needed to go back."""

    images: dict[str, Path]  # role -> atlas-space skull-stripped NIfTI
    brain_mask: Path  # atlas-space uint8 mask
    native: dict[str, Path]  # role -> native NIfTI (dcm2niix output)
    # role -> SimpleITK transform file mapping atlas points to that series' native points: resampling a native
    # image with it gives BraTS space; its inverse takes an atlas-space label map back to the native grid.
    atlas_to_native: dict[str, Path]
    qc: dict = field(default_factory=dict)


@dataclass
class Prediction:
    labels: Path  # atlas-space label map in the internal (2024) label convention
    probabilities: dict[str, Path]  # bundle region name -> atlas-space float32 NIfTI of its ensemble probability
    uncertainty: Path | None  # atlas-space normalised entropy of the ensemble probabilities (0 certain, 1 uniform)
    label_names: dict[int, str]  # label value -> region name ("ET", "NET", "CC", "ED")
    models_used: list[str]
    folds_used: list[str]
    tta: bool
    device: str
    ensemble: dict = field(default_factory=dict)  # model weights, preprocessing runs, seconds per model


@dataclass
class RegionMeasure:
    name: str  # ET, NET, CC, ED, TC, WT
    voxels: int
    volume_ml: float
    components: int
    native_volume_ml: float | None = None
    bidimensional_mm2: float | None = None


@dataclass
class Measurements:
    regions: dict[str, RegionMeasure]
    rapno: dict  # longest diameter, perpendicular, product, slice index, per lesion
    qc_flags: list[str]
    uncertainty: dict = field(default_factory=dict)  # model uncertainty summary (pipeline.infer.uncertainty_summary)


@dataclass
class RunResult:
    """What one pipeline run produced; adapters translate this into their world."""

    outdir: Path
    outputs: dict[str, Path]  # e.g. "seg", "sr", "pdf", "measurements_json", "measurements_csv", "provenance"
    identification: Identification
    measurements: Measurements
    provenance: dict
