"""The one configuration object every adapter fills and every stage reads.

Frozen: a run never changes it. Fields with a fixed set of values are `Literal` types; the command line, the
gear and the manifest take their choices from here (`PipelineConfig.choices`), and a test holds the manifest
against them.
"""
from __future__ import annotations

import functools
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from pedseg.pipeline.backend import Backend, Precision
from pedseg.pipeline.errors import InputError
from pedseg.pipeline.identify_rules import ROLE_NAMES
from pedseg.pipeline.labels import Convention
from pedseg.pipeline.longitudinal import ResponseThresholds
from pedseg.pipeline.types import ROLES, Role

SUBJECT_SALT_ENV = "PEDSEG_SUBJECT_SALT"  # a site secret mixed into PatientID hashes (subject keys)
_BUNDLES = Path(__file__).resolve().parent.parent / "bundles"
# The real model, for real sessions: CaPTk's DeepMedic glioma model (adult). PEDSEG_BUNDLE lets an installed copy
# (Docker image, gear) point at its baked-in bundle.
BUNDLE_ENV = "PEDSEG_BUNDLE"
DEFAULT_BUNDLE = Path(os.environ.get(BUNDLE_ENV, _BUNDLES / "captk-deepmedic-brats"))
# The synthetic demo model: the only one that knows the phantoms `pedseg demo` and the tests make.
DEMO_BUNDLE = Path(os.environ.get("PEDSEG_DEMO_BUNDLE", _BUNDLES / "pedseg-demo"))

Device = typing.Literal["auto", "cpu", "cuda"]
MissingPolicy = typing.Literal["fail", "allow"]  # allow: fewer sequences, only with a bundle that accepts them
# (role, SERIES) pairs the user pins, overriding identification; SERIES is a SeriesNumber or a SeriesInstanceUID
# ('UID#part' for one part of a split series), matched against the session by pipeline.identify.
RoleOverrides = tuple[tuple[Role, str], ...]


@dataclass(frozen=True)
class PipelineConfig:
    bundle: Path = DEFAULT_BUNDLE
    device: Device = "auto"
    backend: Backend = "auto"  # engine of the networks: auto = OpenVINO on the CPU, PyTorch on CUDA (pipeline.backend)
    precision: Precision = "auto"  # auto = bf16 on a CPU with native bf16 if the bundle allows it, else fp32
    fast: bool = False  # fewest folds, no mirroring TTA
    reference_role: Role = "t1c"  # series the others are registered to, and the SEG and native label map refer to
    missing_policy: MissingPolicy = "fail"
    label_convention: Convention = "2024"  # label values of the NIfTI label maps a run writes
    write_seg: bool = True
    # DICOM SEG: one per role listed (on that series' own grid; oedema is read on FLAIR), whose series the run used.
    seg_roles: tuple[Role, ...] = ("t1c", "t2f")
    seg_composites: bool = False  # also a second SEG per series with the overlapping composites TC and WT
    seg_keep_empty_frames: bool = False  # write frames without any segment voxel too
    write_sr: bool = True
    write_pdf: bool = True
    pseudonymize: bool = True  # report shows a pseudonym instead of patient name / ID
    threads: int | None = None  # CPU threads for torch and SimpleITK; None = all cores
    keep_workdir: bool = False
    patient_age_years: float | None = None  # for the brain-volume check when headers lack PatientAge
    n4_for_registration: bool = False  # N4 bias correction of the copies that drive registration (CaPTk style)
    # Longitudinal tracking (when the run is given a measurement store):
    subject_key: str | None = None  # None: SHA-256 of subject_salt + PatientID
    subject_salt: str = field(default_factory=lambda: os.environ.get(SUBJECT_SALT_ENV, ""), repr=False)
    compare_across_bundles: bool = False  # compare with time points measured by other bundles or label conventions
    response_thresholds: ResponseThresholds = field(default_factory=ResponseThresholds)
    role_overrides: RoleOverrides = ()  # series pinned to a role by hand (parse_role_overrides), in the given order

    def __post_init__(self) -> None:
        for name, allowed in _choices().items():
            if getattr(self, name) not in allowed:  # adapters check first: this guards against a programming error
                raise ValueError(f"PipelineConfig.{name} is {getattr(self, name)!r}; allowed: {list(allowed)}")
        if not set(self.seg_roles) <= set(ROLES):
            raise ValueError(f"PipelineConfig.seg_roles is {self.seg_roles!r}; each must be one of {ROLES}")
        roles = [role for role, _ in self.role_overrides]
        if (any(role not in ROLES for role in roles) or len(set(roles)) != len(roles)
                or not all(isinstance(series, str) and series for _, series in self.role_overrides)):
            raise ValueError(f"PipelineConfig.role_overrides is {self.role_overrides!r}: each role once, with a "
                             "non-empty SERIES (parse_role_overrides builds it from user text)")

    @staticmethod
    def choices(name: str) -> tuple[str, ...]:
        """The allowed values of a field with a fixed set of values; () for any other field."""
        return _choices().get(name, ())


def parse_role_overrides(items: Iterable[str], *, source: str = "--role") -> RoleOverrides:
    """User text -> PipelineConfig.role_overrides. Each item is ROLE=SERIES, or several joined by commas
    ('t1c=6,t1n=2'); SERIES is a SeriesNumber or a SeriesInstanceUID. `source` names the option in messages.
    Which series SERIES means is decided against the session, in pipeline.identify."""
    overrides: dict[str, str] = {}
    for item in items:
        for text in (part.strip() for part in str(item).split(",")):
            if not text:
                continue
            role, sep, series = (s.strip() for s in text.partition("="))
            if not sep or not role or not series:
                raise InputError(f"{source} '{text}' is not ROLE=SERIES.", hint=_ROLE_HINT)
            role = role.lower()
            if role not in ROLES:
                raise InputError(f"{source} '{text}': unknown role '{role}'.", hint=_ROLE_HINT)
            if role in overrides:
                raise InputError(f"{source} pins {ROLE_NAMES[role]} twice ({role}={overrides[role]} and "
                                 f"{role}={series}).", hint="Pin each role to one series.")
            overrides[role] = series
    return tuple(overrides.items())


_ROLE_HINT = ("Write ROLE=SERIES, e.g. t1c=6: ROLE is one of " + ", ".join(ROLE_NAMES.values()) + "; SERIES is "
              "the SeriesNumber or the SeriesInstanceUID of a series in the session (see `pedseg identify INPUT`).")


@functools.cache
def _choices() -> dict[str, tuple[str, ...]]:
    hints = typing.get_type_hints(PipelineConfig)
    return {f.name: typing.get_args(hints[f.name]) for f in fields(PipelineConfig)
            if typing.get_origin(hints[f.name]) is typing.Literal}
