"""Series: grouping image headers into the series of one session.

Owns grouping images by SeriesInstanceUID, splitting a series that mixes orientations or echoes into stacks
named by plane and echo, the per-series tallies (images, echoes, volumes, orientations, acquisition times) that
`dicom_header.series_header` summarises, and the checks that the images come from one study of one patient.
Also owns what happens when files share a SOPInstanceUID (`distinct_instances`): copies of one image count once;
different images under one UID are never merged: kept and flagged within a series, refused across two series.
Messages name series by number and description only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from pedseg.pipeline.dicom_header import (
    as_float,
    as_int,
    as_text,
    dataset_label,
    group_value,
    pixel_content_digest,
    rounded,
    rounded_float,
    sampled_pixel_values,
    series_header,
    session_seconds,
)
from pedseg.pipeline.errors import InputError
from pedseg.pipeline.types import Series

logger = logging.getLogger(__name__)

# Direction cosines of one stack agree far closer than this; a reformat or another plane differs by degrees.
ORIENTATION_TOLERANCE = 1e-3


@dataclass
class DicomImage:
    """One image object: its header (no pixels) and path."""

    path: Path
    ds: Dataset


@dataclass
class _Stats:
    """Per-series tallies over all images (and frames, for enhanced multi-frame objects)."""

    images: int = 0
    acquisition_times: list[float] = field(default_factory=list)
    echoes: set = field(default_factory=set)
    temporal: set = field(default_factory=set)
    declared_temporal: int = 1
    orientations: list = field(default_factory=list)  # one ImageOrientationPatient per distinct orientation
    positions: dict = field(default_factory=dict)  # (position, echo, image type) -> count

    def add(self, ds: Dataset) -> None:
        if "PerFrameFunctionalGroupsSequence" in ds:
            self._add_enhanced(ds)
        else:
            self._add_classic(ds)
        self.declared_temporal = max(self.declared_temporal, as_int(ds.get("NumberOfTemporalPositions")) or 1)

    def _add_classic(self, ds: Dataset) -> None:
        self.images += 1
        echo = _echo(ds)
        self.echoes.add(echo)
        if ds.get("TemporalPositionIdentifier") is not None:
            self.temporal.add(as_int(ds.get("TemporalPositionIdentifier")))
        self._orientation(ds.get("ImageOrientationPatient"))
        t = session_seconds(ds, ds.get("AcquisitionTime"), "AcquisitionDate")
        if t is not None:
            self.acquisition_times.append(t)
        position = rounded(ds.get("ImagePositionPatient"), 1)
        if position is not None:
            key = (position, echo, tuple(ds.get("ImageType") or ()))
            self.positions[key] = self.positions.get(key, 0) + 1

    def _add_enhanced(self, ds: Dataset) -> None:
        frames = ds.PerFrameFunctionalGroupsSequence
        self.images += as_int(ds.get("NumberOfFrames")) or len(frames)
        t = session_seconds(ds, ds.get("AcquisitionDateTime"))
        if t is not None:
            self.acquisition_times.append(t)
        for frame in frames:
            self.echoes.add(rounded_float(group_value(ds, "MREchoSequence", "EffectiveEchoTime", frame), 1))
            index = group_value(ds, "FrameContentSequence", "TemporalPositionIndex", frame)
            if index is not None:
                self.temporal.add(as_int(index))
            self._orientation(group_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient", frame))

    def _orientation(self, iop) -> None:
        iop = rounded(iop, 6)
        if iop is None or len(iop) != 6:  # absent or malformed: no orientation to count or split by
            return
        if not any(_same_orientation(iop, o) for o in self.orientations):
            self.orientations.append(iop)

    def temporal_positions(self) -> int:
        # Repeats of one slice position (same echo, same image type) mean repeated volumes: a time series,
        # also on scanners that write no temporal position attributes (e.g. Siemens DSC without mosaic).
        repeats = max(self.positions.values(), default=1)
        return max(self.declared_temporal, len(self.temporal), repeats, 1)


def _echo(ds: Dataset) -> float | None:
    """Which echo a classic image holds: its TE (what makes PD and T2 of a dual-echo differ), else its number."""
    return rounded_float(ds.get("EchoTime"), 1) or as_float(ds.get("EchoNumbers"))


def _same_orientation(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= ORIENTATION_TOLERANCE for x, y in zip(a, b))


def build_series(images: list[DicomImage]) -> list[Series]:
    """The images grouped into series, each split into single stacks, ordered by series number.

    Copies of one image count once; an InputError when one SOPInstanceUID is in two series (`distinct_instances`).
    Each stack's header carries the distinct values of a few sampled slices (`sampled_pixel_values`) and how
    many of its SOPInstanceUIDs are held by different images."""
    images, conflicting = distinct_instances(images)
    groups: dict[str, list[DicomImage]] = {}
    for image in images:
        groups.setdefault(str(image.ds.SeriesInstanceUID), []).append(image)
    series = []
    for members in groups.values():
        members.sort(key=lambda im: (as_int(im.ds.get("InstanceNumber")) or 0, str(im.path)))
        for part, stack in _stacks(members).items():
            stats = _Stats()
            for image in stack:
                stats.add(image.ds)
            pixel_values = sampled_pixel_values([(im.path, as_int(im.ds.get("NumberOfFrames")) or 1) for im in stack])
            conflicts = len({_sop_uid(im) for im in stack} & conflicting)
            header = series_header(stack[0].ds, part, stats, pixel_values=pixel_values,
                                   conflicting_instances=conflicts)
            series.append(Series(header=header, files=[im.path for im in stack]))
    series.sort(key=lambda s: (s.header.series_number is None, s.header.series_number or 0, s.header.series_uid,
                               s.header.part))
    return series


def _sop_uid(image: DicomImage) -> str:
    return as_text(image.ds.get("SOPInstanceUID"))


def distinct_instances(images: list[DicomImage]) -> tuple[list[DicomImage], set[str]]:
    """The images without second copies of one image, and the SOPInstanceUIDs held by different images.

    A SOPInstanceUID names one image. Files that share one are compared (decoded pixels and position, read only
    for them): copies of one image (a folder exported beside its own copy, an instance in two inputs) count once.
    Different images under one UID within one series (an anonymiser or converter that re-used UIDs) are all kept
    and the UID returned, so the series is reported and never used (`identify_rules`), rather than losing
    images to a merge. One UID in two series (a modified copy that kept the image UIDs) is an InputError naming
    both series: which of the two is right cannot be told.
    """
    by_uid: dict[str, list[DicomImage]] = {}
    for image in images:
        uid = _sop_uid(image)
        if uid:
            by_uid.setdefault(uid, []).append(image)
    shared = {uid: members for uid, members in by_uid.items() if len(members) > 1}
    if not shared:
        return images, set()
    _refuse_shared_across_series(shared)
    dropped: set[int] = set()
    conflicting: set[str] = set()
    for uid, members in shared.items():
        first_of: dict[str, DicomImage] = {}
        for image in members:
            digest = pixel_content_digest(image.path)
            if digest in first_of:
                dropped.add(id(image))
            else:
                first_of[digest] = image
        if len(first_of) > 1:
            conflicting.add(uid)
    if dropped:
        logger.debug("%d second copies of an image left out (same SOP Instance UID, same pixels)", len(dropped))
    per_series: dict[str, int] = {}
    for uid in conflicting:
        label = dataset_label(shared[uid][0].ds)
        per_series[label] = per_series.get(label, 0) + 1
    for label, count in sorted(per_series.items()):
        logger.warning("%s: %d SOP Instance UID(s) each held by different images (different pixels or position): "
                       "all kept, and the series is not used", label, count)
    return [im for im in images if id(im) not in dropped], conflicting


def _refuse_shared_across_series(shared: dict[str, list[DicomImage]]) -> None:
    """An InputError listing, per set of series, how many SOPInstanceUIDs they share; series by number first."""
    order = {str(im.ds.SeriesInstanceUID): (as_int(im.ds.get("SeriesNumber")) is None,
                                            as_int(im.ds.get("SeriesNumber")) or 0, dataset_label(im.ds),
                                            str(im.ds.SeriesInstanceUID))
             for members in shared.values() for im in members}
    groups: dict[tuple[str, ...], int] = {}
    for members in shared.values():
        series_uids = tuple(sorted({str(im.ds.SeriesInstanceUID) for im in members}, key=order.__getitem__))
        if len(series_uids) > 1:
            groups[series_uids] = groups.get(series_uids, 0) + 1
    if not groups:
        return
    listing = "; ".join(
        f"{count} image(s) in both " + " and ".join(order[uid][2] for uid in uids)
        + (" (two different series under one label)" if len({order[uid][2] for uid in uids}) < len(uids) else "")
        for uids, count in sorted(groups.items(), key=lambda item: [order[uid] for uid in item[0]])
    )
    raise InputError(
        f"The same images (same SOP Instance UIDs) appear in different series: {listing}. One of them is a "
        "modified copy that kept the original image UIDs, and which series the images belong to cannot be told.",
        hint="Give one copy of each series: leave out the copied or re-exported folder, or export the session "
             "again from the scanner or PACS.",
    )


def _stacks(members: list[DicomImage]) -> dict[str, list[DicomImage]]:
    """One series' images split into stacks of one orientation and one echo, keyed by part name ('' if whole).

    Scanners may put a 3-plane localizer, an acquired stack with its reformat, or both echoes of a dual-echo
    PD/T2 under one SeriesInstanceUID; each stack is a different image, identified and converted on its own.
    Parts are named from content alone (plane, then echo in TE order: 'ax', 'cor_e2'), so names are stable.
    An enhanced object holding several stacks in one file cannot be split by file: that series stays whole.
    """
    signatures = []
    for image in members:
        stats = _Stats()
        stats.add(image.ds)
        if len(stats.orientations) != 1 or len(stats.echoes) != 1:
            return {"": members}
        signatures.append((stats.orientations[0], next(iter(stats.echoes))))
    orientations: list[tuple[float, ...]] = []
    for iop, _ in signatures:
        if not any(_same_orientation(iop, o) for o in orientations):
            orientations.append(iop)
    echoes = sorted({echo for _, echo in signatures}, key=lambda e: (e is None, e or 0.0))
    if len(orientations) == 1 and len(echoes) == 1:
        return {"": members}
    plane_names = _plane_names(sorted(orientations)) if len(orientations) > 1 else {}
    stacks: dict[str, list[DicomImage]] = {}
    for image, (iop, echo) in zip(members, signatures):
        plane = next((name for o, name in plane_names.items() if _same_orientation(iop, o)), "")
        echo_name = f"e{echoes.index(echo) + 1}" if len(echoes) > 1 else ""
        stacks.setdefault("_".join(n for n in (plane, echo_name) if n), []).append(image)
    logger.info("%s mixes %d orientation(s) and %d echo(es): identified as %d separate parts (%s)",
                dataset_label(members[0].ds), len(orientations), len(echoes), len(stacks), ", ".join(sorted(stacks)))
    return dict(sorted(stacks.items()))


def _plane_names(orientations: list[tuple[float, ...]]) -> dict[tuple[float, ...], str]:
    """'sag', 'cor' or 'ax' from each stack's slice normal; numbered when two stacks share a plane (oblique)."""
    planes = {}
    for iop in orientations:
        normal = [abs(v) for v in _cross(iop[:3], iop[3:6])]
        planes[iop] = ("sag", "cor", "ax")[normal.index(max(normal))]
    counts = {name: list(planes.values()).count(name) for name in set(planes.values())}
    seen: dict[str, int] = {}
    for iop, name in planes.items():
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            planes[iop] = f"{name}{seen[name]}"
    return planes


def _cross(a, b) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


# ------------------------------------------------------------------------------- one study, one patient


def single_study(series: list[Series]) -> str:
    """The StudyInstanceUID all series share; refuses series of several studies."""
    studies: dict[str, list[Series]] = {}
    for s in series:
        studies.setdefault(s.header.study_uid, []).append(s)
    if len(studies) == 1:
        return next(iter(studies))
    listing = "; ".join(
        f"study {i}: " + ", ".join(s.header.label for s in members)
        for i, members in enumerate(studies.values(), start=1)
    )
    raise InputError(
        f"The input holds {len(studies)} different studies (MRI sessions): {listing}.",
        hint="Give one study at a time, e.g. one folder or .zip per session.",
    )


def single_patient(images: list[DicomImage]) -> None:
    """One study holding two PatientIDs is a mixed export or a broken anonymisation: which images belong to the
    child cannot be told. The message lists series per patient, never the identifiers."""
    patients: dict[str, set[str]] = {}
    for image in images:
        patient_id = as_text(image.ds.get("PatientID"))
        if patient_id:
            patients.setdefault(patient_id, set()).add(dataset_label(image.ds))
    if len(patients) > 1:
        listing = "; ".join(f"patient {i}: " + ", ".join(sorted(labels))
                            for i, labels in enumerate(patients.values(), start=1))
        raise InputError(
            f"The input holds images of {len(patients)} different patients (different PatientIDs): {listing}.",
            hint="Give the session of one patient at a time; if all series are the same child, correct the "
                 "PatientID of the odd series (e.g. re-export them) before running.",
        )
