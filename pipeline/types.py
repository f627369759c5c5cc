"""Typed records passed between pipeline stages.

Each stage (ingest → identify → preprocess → infer → postprocess → measure) takes and returns these, so the
runner, the writers and the adapters never depend on a stage's internals.
Geometry convention: every image on disk is NIfTI read/written through SimpleITK (LPS physical space).
Label maps are in the internal convention of `pipeline.labels` (BraTS-PEDs 2024).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

Role = Literal["t1n", "t1c", "t2w", "t2f"]  # pre-contrast T1, post-contrast T1, T2, T2-FLAIR
ROLES: tuple[Role, ...] = get_args(Role)


def series_key(series_uid: str, part: str) -> str:
    """Names a series within its session: its SeriesInstanceUID, plus '#part' for one stack of a series that
    mixed orientations or echoes (the parts share the real UID, which DICOM outputs must reference)."""
    return f"{series_uid}#{part}" if part else series_uid


def series_label(number: int | None, description: str, part: str = "") -> str:
    """How messages name a series: number and description (never patient identifiers), and the part."""
    named = f"'{description}'" if description.strip() else "(no description)"  # de-identified data often has none
    label = f"series {number if number is not None else '?'} {named}"
    return f"{label} part {part}" if part else label


class _NamedSeries:
    """`key` and `label` for anything that carries series_uid, part, series_number and description."""

    @property
    def key(self) -> str:
        return series_key(self.series_uid, self.part)

    @property
    def label(self) -> str:
        return series_label(self.series_number, self.description, self.part)


# ------------------------------------------------------------------------------------------- ingest


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
    # seconds after midnight of the StudyDate (AcquisitionDate/Time or SeriesDate/Time): after 86400 for a series
    # acquired past midnight, so comparing two of them orders a session that ran across midnight
    acquisition_time: float | None
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
    # distinct pixel values in a few sampled slices (slices of one value left out; 1 when all are flat); None when
    # no pixels were read (a header alone). A handful means a label map (mask, ROI, segmentation), not an image.
    pixel_values: int | None = None
    # SOPInstanceUIDs this series holds twice with different pixel data or position: an inconsistent export
    conflicting_instances: int = 0
    # Physics that identification reads without names: every echo time of an enhanced multi-frame object (the parts
    # of a split classic series carry one each), AngioFlag / TimeOfFlightContrast, and the diffusion b-value.
    echo_times: tuple[float, ...] = ()
    angio_flag: bool = False
    b_value: float | None = None


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


@dataclass(frozen=True)
class StudyContext:
    """Who and when, from the reference series' headers: what the report shows (pseudonymised unless configured
    otherwise), the patient's age (for the brain-volume check) and the subject key for longitudinal tracking."""

    display_id: str  # a pseudonym, or "NAME (ID)" when pseudonymisation is off
    study_date: str  # YYYYMMDD or ""
    age_years: float | None
    subject_key: str  # salted SHA-256 of the PatientID; "" without one


@dataclass(frozen=True)
class PopulationWarning:
    """A child's study segmented by a model bundle not trained on children (pipeline.population): what the
    report's first page, measurements.json, the gear's QC result and the console say."""

    patient_age_years: float  # as the message states it: whole years from 2 years on, whole months below
    bundle_population: str  # the bundle's declared population (pipeline.bundle.Population)
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------- identify


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
    pinned: bool = False  # the user pinned this series to `role` (PipelineConfig.role_overrides)
    # Whether the series still had a SeriesDescription, ProtocolName or SequenceName (de-identified data often
    # has none), and which kind of evidence decided its role: "physics" (TR/TE/TI/flip, sequence type, geometry),
    # "header" (ImageType, counts, contrast agent, flags), "names", "acquisition order" or "images" (contrast seen
    # in the pixels, pipeline.contrast). `contrast_decided_by`: what told pre from post for a T1, else "".
    names_available: bool = True
    decided_by: str = ""
    contrast_decided_by: str = ""


@dataclass
class Identification:
    decisions: list[SeriesDecision]
    chosen: dict[str, str]  # role -> series key (the SeriesInstanceUID, or 'UID#part' for part of a split series)
    missing: list[str]
    # The role every other series is registered to, whose grid the native label map and the DICOM SEG take:
    # the configured one when chosen, else t1c, else the first chosen (pipeline.identify.reference_role).
    reference_role: str = "t1c"
    # Roles the user pinned by hand (PipelineConfig.role_overrides): role -> series key, a subset of `chosen`.
    pinned: dict[str, str] = field(default_factory=dict)
    # Two or more T1s and no header saying which is post-contrast: what the images said (pipeline.contrast), in
    # words, and its confidence; `contrast_unresolved` says why no T1 could be made post-contrast ("" when none
    # was needed or the images decided): a run then stops and asks for `--role t1c=SERIES`.
    contrast_from_images: tuple[str, ...] = ()
    contrast_confidence: float | None = None
    contrast_unresolved: str = ""


# --------------------------------------------------------------------------------------- preprocess


@dataclass(frozen=True)
class Similarity:
    nmi: float  # normalised mutual information inside the brain
    peak: float  # how sharply it peaks at the alignment (registration.similarity_peak)


@dataclass(frozen=True)
class QC:
    """Preprocessing quality checks; `flags` are the ones that ask a reader to look."""

    registration: dict[str, float]  # "<moving>_to_<fixed>_mattes_mi" -> final metric value
    flags: tuple[str, ...]
    step_seconds: dict[str, float]
    brain_extraction: str  # "deepbet", or "atlas-mask-fallback" when deepbet failed
    similarity_in_brain: dict[str, Similarity]  # "<role>_vs_<reference>" -> similarity
    brain_inside_atlas_brain: float
    brain_volume_ml: float
    mask_fraction_of_head: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preprocessed:
    """Atlas-space (BraTS 240x240x155, 1 mm), skull-stripped images plus everything needed to go back."""

    images: dict[str, Path]  # role -> atlas-space skull-stripped NIfTI
    brain_mask: Path  # atlas-space uint8 mask
    native: dict[str, Path]  # role -> native NIfTI (dcm2niix output)
    # role -> SimpleITK transform file mapping atlas points to that series' native points: resampling a native
    # image with it gives BraTS space; its inverse takes an atlas-space label map back to the native grid.
    atlas_to_native: dict[str, Path]
    qc: QC | None = None  # None only where a caller prepared the images itself (evaluation on atlas-space cases)
    # Other brain preparations a bundle's members declared ("defaced", "none": the whole head): role -> NIfTI.
    prepared: dict[str, dict[str, Path]] = field(default_factory=dict)

    def images_for(self, brain: str) -> dict[str, Path]:
        """The atlas-space images prepared as `brain` ("skull_stripped", "defaced" or "none") declares."""
        return self.images if brain == "skull_stripped" else self.prepared[brain]


# -------------------------------------------------------------------------------------------- infer


@dataclass(frozen=True)
class EnsembleInfo:
    weights: dict[str, float]  # model folder -> weight of its probabilities in the mean
    preprocessing_runs: int  # nnU-Net preprocessings: one per group of models whose plans preprocess alike
    seconds_per_model: dict[str, float]
    seconds: float
    backend: str = "torch"  # what ran the networks: torch or openvino (pipeline.backend)
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast)
    # Members of the bundle that did not run, with why (fallback members ran for a session missing a sequence).
    members_skipped: dict[str, str] = field(default_factory=dict)
    # What each member that ran ran with: model name -> {"backend": ..., "precision": ...}
    executions: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    labels: Path  # atlas-space label map in the internal (2024) label convention
    probabilities: dict[str, Path]  # bundle region name -> atlas-space float32 NIfTI of its ensemble probability
    uncertainty: Path | None  # atlas-space normalised entropy of the ensemble probabilities (0 certain, 1 uniform)
    models_used: list[str]
    folds_used: list[str]
    tta: bool
    device: str
    ensemble: EnsembleInfo | None = None


# -------------------------------------------------------------------------------------- postprocess


@dataclass(frozen=True)
class PostprocessStep:
    """One post-processing step as provenance records it; fields a step does not have stay None."""

    step: str
    voxels_changed: int
    min_voxels: int | None = None
    components_removed: int | None = None
    applied: bool | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# ------------------------------------------------------------------------------------------ measure


@dataclass
class RegionMeasure:
    name: str  # ET, NET, CC, ED, TC, WT
    voxels: int
    volume_ml: float
    components: int
    native_volume_ml: float | None = None
    bidimensional_mm2: float | None = None


@dataclass(frozen=True)
class Lesion:
    """One RAPNO lesion: its two diameters on its axial slice of largest area (pipeline.measure)."""

    slice_z_mm: float
    longest_mm: float
    perpendicular_mm: float
    product_mm2: float
    measurable: bool  # both diameters at least 10 mm
    endpoints_lps_mm: tuple[tuple[float, float, float], tuple[float, float, float]]
    perp_endpoints_lps_mm: tuple[tuple[float, float, float], tuple[float, float, float]]
    volume_ml: float


@dataclass(frozen=True)
class Rapno:
    region: str  # the region measured (TC by default)
    lesions: tuple[Lesion, ...]  # largest first, at most max_lesions
    sum_product_mm2: float
    lesions_total: int  # lesions found, measured or not
    max_lesions: int
    tolerance_deg: float  # perpendicular within this many degrees


@dataclass(frozen=True)
class Uncertainty:
    """The ensemble's uncertainty over the final labels (pipeline.infer.uncertainty_summary)."""

    mean_entropy_WT: float | None  # noqa: N815 - region names are upper case everywhere
    mean_entropy_TC: float | None  # noqa: N815
    uncertain_volume_ml: float
    measure: str  # what the numbers are, for readers of measurements.json


@dataclass
class Measurements:
    regions: dict[str, RegionMeasure]
    rapno: Rapno
    qc_flags: list[str]
    uncertainty: Uncertainty | None = None
