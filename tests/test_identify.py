"""Series identification: every rule on synthetic headers, the classic traps, and the real shared series."""
from __future__ import annotations

import json
import random
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pedseg.cli.main import main as pedseg
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import MissingSequenceError
from pedseg.pipeline.identify import classify_session, identify, reference_role, session_to_json
from pedseg.pipeline.identify_rules import RULES
from pedseg.pipeline.ingest import ingest
from pedseg.pipeline.types import Series, SeriesHeader, Session
from pedseg.synth.dicom_writer import StudyInfo, write_series
from pedseg.synth.protocols import Protocol

from factories import SHARED_DATA, needs_shared_data

DICOM = SHARED_DATA / "dicom"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
T0 = 10 * 3600.0  # 10:00:00


def hdr(number: int, description: str, **kw) -> SeriesHeader:
    """A plausible MR series header; keyword arguments override fields."""
    base = dict(
        series_uid=f"1.2.3.{number}", series_number=number, description=description, protocol="", modality="MR",
        manufacturer="SIEMENS", model="Skyra", sop_class_uid=MR_IMAGE, repetition_time=None, echo_time=None,
        inversion_time=None, flip_angle=90.0, scanning_sequence=("SE",), sequence_variant=("SK",), sequence_name="",
        scan_options=(), mr_acquisition_type="2D", image_type=("ORIGINAL", "PRIMARY", "M", "ND"), contrast_agent="",
        contrast_ingredient="", acquisition_time=T0 + 60 * number, num_images=30, slice_thickness=5.0,
        pixel_spacing=(0.9, 0.9), orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), rows=256, columns=256,
        study_uid="1.2.3", frame_of_reference_uid="1.2.3.0",
    )
    base.update(kw)
    return SeriesHeader(**base)


# Typical acquisitions (vendor values as the scanners write them).
def mprage(n, desc="t1_mprage_sag_p2_iso", **kw):
    return hdr(n, desc, **{**dict(
        repetition_time=2300.0, echo_time=2.3, inversion_time=900.0, flip_angle=8.0, scanning_sequence=("GR", "IR"),
        sequence_variant=("SK", "SP", "MP"), sequence_name="*tfl3d1_16ns", mr_acquisition_type="3D", num_images=176,
        slice_thickness=1.0, pixel_spacing=(1.0, 1.0)), **kw})


def t2_tse(n, desc="t2_tse_tra", **kw):
    return hdr(n, desc, **{**dict(repetition_time=5000.0, echo_time=98.0, flip_angle=150.0), **kw})


def flair_2d(n, desc="t2_tirm_tra_dark-fluid", **kw):
    return hdr(n, desc, **{**dict(
        repetition_time=9000.0, echo_time=85.0, inversion_time=2500.0, flip_angle=150.0,
        scanning_sequence=("SE", "IR"), sequence_variant=("SK", "SP", "MP")), **kw})


def flair_3d(n, desc="Sag CUBE FLAIR", **kw):
    return hdr(n, desc, **{**dict(
        repetition_time=6000.0, echo_time=120.0, inversion_time=1800.0, scanning_sequence=("SE", "IR"),
        sequence_variant=("SK", "SS", "MP"), mr_acquisition_type="3D", num_images=176, slice_thickness=1.0,
        pixel_spacing=(1.0, 1.0)), **kw})


def t1_se(n, desc="Ax T1 SE", **kw):
    return hdr(n, desc, **{**dict(repetition_time=550.0, echo_time=12.0), **kw})


# Header values as vendors write them, for series the rules must recognise without a name.
def siemens_3d_scout(n, desc="", **kw):
    """AAHead_Scout: a 1.6 mm 3D gradient echo, TR 3.15 ms, TE 1.37 ms, flip 8°, 160 × 160."""
    return hdr(n, desc, **{**dict(
        repetition_time=3.15, echo_time=1.37, flip_angle=8.0, scanning_sequence=("GR",), sequence_variant=("SP",),
        mr_acquisition_type="3D", image_type=("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), num_images=128,
        slice_thickness=1.6, pixel_spacing=(1.6, 1.6), rows=160, columns=160), **kw})


def philips_dual_echo_b0(n, desc="", **kw):
    """Philips 3D B0 map: dual-echo FFE, TR 20 ms, TE 2.3 / 4.6 ms, both echoes in one enhanced object."""
    return hdr(n, desc, **{**dict(
        manufacturer="Philips", repetition_time=20.0, echo_time=2.3, echo_times=(2.3, 4.6), flip_angle=10.0,
        scanning_sequence=("GR",), sequence_variant=("SP",), mr_acquisition_type="3D",
        image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"), num_images=120, num_echoes=2, slice_thickness=3.0,
        pixel_spacing=(3.0, 3.0), rows=80, columns=80), **kw})


def siemens_tof(n, desc="", **kw):
    """3D multi-slab TOF: TR 21 ms, TE 3.43 ms, flip 18°, 0.5 mm slices in an 80 mm slab."""
    return hdr(n, desc, **{**dict(
        repetition_time=21.0, echo_time=3.43, flip_angle=18.0, scanning_sequence=("GR",),
        sequence_variant=("SP", "OSP"), mr_acquisition_type="3D", num_images=160, slice_thickness=0.5,
        pixel_spacing=(0.3, 0.3), rows=768, columns=696), **kw})


def ge_tof(n, desc="", **kw):
    return siemens_tof(n, desc, **{**dict(manufacturer="GE MEDICAL SYSTEMS", repetition_time=24.0, echo_time=2.6,
                                           flip_angle=20.0, slice_thickness=1.2,
                                           scan_options=("FC_SLICE_AX_GEMS", "VASCTOF_GEMS", "SEQ_GEMS")), **kw})


def session_of(*headers: SeriesHeader) -> Session:
    return Session(series=[Series(h, []) for h in headers], study_uid="1.2.3", root=Path("."))


def decision(ident, number):
    return next(d for d in ident.decisions if d.series_number == number)


def classify_one(h: SeriesHeader):
    return decision(classify_session(session_of(h)), h.series_number)


# (header, expected role, words that must appear in the reasons)
SINGLE_SERIES_CASES = [
    (mprage(1), "t1n", "inversion-prepared gradient echo"),
    (mprage(1, "t1_mprage_sag", pixel_values=3), "other", "label map"),
    (t2_tse(1, "Ax T2", conflicting_instances=2), "other", "inconsistent export"),
    (mprage(1, "Sag 3D BRAVO +C", contrast_agent="GADAVIST"), "t1c", "ContrastBolusAgent 'GADAVIST' set"),
    (mprage(1, "3D T1 TFE sag Gd", scanning_sequence=("GR",), inversion_time=None), "t1c", "matches 'GD'"),
    (mprage(1, "T1 MPRAGE pre Gd"), "t1n", "matches 'PRE'"),
    (mprage(1, "t1_mprage", image_type=("ORIGINAL", "PRIMARY", "POST_CONTRAST", "NONE")), "t1c", "POST_CONTRAST"),
    (mprage(1, "t1_mprage", image_type=("ORIGINAL", "PRIMARY", "PRE_CONTRAST", "NONE")), "t1n", "PRE_CONTRAST"),
    (t1_se(1, "t1_tse_tra_KM"), "t1c", "matches 'KM'"),
    (t1_se(1, "Ax T1 SE +C"), "t1c", "matches '+C'"),
    (t1_se(1, "T1W_TSE", image_type=("ORIGINAL", "PRIMARY", "T1", "NONE")), "t1n", "labels it T1"),
    (hdr(1, "T1W_FFE", repetition_time=256.0, echo_time=3.6, flip_angle=80.0, scanning_sequence=("GR",)), "t1n",
     "spoiled gradient echo"),
    (hdr(1, "Ax T1 FLAIR", repetition_time=2000.0, echo_time=9.0, inversion_time=800.0,
         scanning_sequence=("SE", "IR")), "t1n", "T1-FLAIR"),
    # A T1-FLAIR whose name only says FLAIR: short TE + TI 800 is T1 contrast, not a T2-FLAIR.
    (hdr(1, "Ax FLAIR", repetition_time=2200.0, echo_time=12.0, inversion_time=860.0,
         scanning_sequence=("SE", "IR")), "t1n", "not a T2-FLAIR"),
    (t2_tse(1), "t2w", "T2-weighted (turbo) spin echo"),
    (t2_tse(1, "T2W_TSE", image_type=("ORIGINAL", "PRIMARY", "T2", "NONE")), "t2w", "labels it T2"),
    (flair_2d(1), "t2f", "T2-FLAIR (fluid-attenuated T2)"),
    (flair_2d(1, "Ax T2 FLAIR post contrast", contrast_agent="Dotarem"), "t2f", "matches 'FLAIR'"),
    (flair_3d(1), "t2f", "matches 'FLAIR'"),
    (flair_2d(1, "Ax dark fluid", image_type=("ORIGINAL", "PRIMARY", "FLAIR", "NONE")), "t2f", "labels it FLAIR"),
    # Rejections
    (hdr(1, "localizer", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "other", "localizer"),
    (hdr(1, "AAHScout_MPR_sag"), "other", "localizer"),
    (hdr(1, "3-Plane Loc", num_orientations=3), "other", "several stacks"),
    (hdr(1, "ASSET calibration"), "other", "calibration"),
    (hdr(1, "ep2d_diff_3scan_trace", image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE")), "other", "diffusion"),
    (hdr(1, "Ax DWI ADC", image_type=("DERIVED", "PRIMARY", "ADC")), "other", "diffusion"),
    (hdr(1, "Ax b-values", sequence_name="*ep_b1000t", scanning_sequence=("EP",)), "other", "diffusion"),
    (hdr(1, "ep2d_perf", scanning_sequence=("EP",), num_temporal_positions=50), "other", "perfusion"),
    (hdr(1, "ep2d_bold_rest", scanning_sequence=("EP",), num_temporal_positions=200), "other", "functional MRI"),
    (hdr(1, "ax_asc_35sl", scanning_sequence=("EP",), image_type=("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC")),
     "other", "functional MRI"),
    (hdr(1, "gre_field_mapping", scanning_sequence=("GR",)), "other", "field map"),
    (hdr(1, "t2_swi_tra", image_type=("ORIGINAL", "PRIMARY", "P", "ND")), "other", "phase"),
    (mprage(1, "t1_mprage_sag_MPR_tra", image_type=("DERIVED", "SECONDARY", "MPR")), "other", "derived"),
    (mprage(1, "T1 post", sop_class_uid="1.2.840.10008.5.1.4.1.1.7"), "other", "Secondary Capture"),
    (hdr(1, "Ax SWAN"), "other", "susceptibility"),
    (hdr(1, "tof_3d_multi-slab", scanning_sequence=("GR",)), "other", "angiography"),
    (hdr(1, "CISS 3D", scanning_sequence=("GR",)), "other", "balanced steady-state"),
    (hdr(1, "Cor T2 IR", repetition_time=4000.0, echo_time=60.0, inversion_time=150.0,
         scanning_sequence=("SE", "IR")), "other", "STIR"),
    (hdr(1, "SVS PRESS TE30", num_images=1), "other", "spectroscopy"),
    (t1_se(1, "Ax T1 SE", num_images=5), "other", "fewer than 10 slices"),
    (mprage(1, "t1_vibe_dynamic", num_temporal_positions=40), "other", "4D time series"),
    (t2_tse(1, "Ax T2", modality="CT"), "other", "not an MR series"),
    # Rejections from the header and the physics alone (no name to go by), with vendor values.
    (siemens_3d_scout(1), "other", "low-resolution 3D localizer"),
    (philips_dual_echo_b0(1), "other", "two short echoes a few ms apart"),
    (philips_dual_echo_b0(1, image_type=("ORIGINAL", "PRIMARY", "B0", "B0")), "other", "ImageType B0: field map"),
    (siemens_tof(1), "other", "0.5 mm slices in a 80 mm slab: time-of-flight angiography"),
    (siemens_tof(1, slice_thickness=1.0, num_images=40, scan_options=("FC",)), "other", "flow compensation"),
    (siemens_tof(1, angio_flag=True, slice_thickness=1.0), "other", "AngioFlag Y"),
    (ge_tof(1), "other", "ScanOptions VASCTOF_GEMS: angiography"),
    (hdr(1, "", scanning_sequence=("EP",), b_value=1000.0), "other", "diffusion b-value 1000"),
    (hdr(1, "", scanning_sequence=("EP",), image_type=("ORIGINAL", "PRIMARY", "PERFUSION", "NONE")), "other",
     "ImageType PERFUSION"),
    (hdr(1, "Cor STIR"), "other", "STIR"),
    # A name never outweighs physics that contradicts it: T2 timing named as a post-contrast MPRAGE.
    (t2_tse(1, "T1 MPRAGE +C"), "other", "a name alone never decides"),
    # Weak or contradictory evidence: "other", with what was seen.
    (hdr(1, "series 1"), "other", "not recognised"),
    (hdr(1, "PD TSE", repetition_time=3000.0, echo_time=15.0), "other", "proton-density"),
    (hdr(1, "Ax GRE", repetition_time=600.0, echo_time=20.0, flip_angle=20.0, scanning_sequence=("GR",)), "other",
     "T2*-weighted"),
    (hdr(1, "EPI T2", repetition_time=3000.0, echo_time=80.0, scanning_sequence=("EP",)), "other", "echo-planar"),
]


@pytest.mark.parametrize("header, role, words", SINGLE_SERIES_CASES,
                         ids=[f"{c[0].description}->{c[1]}" for c in SINGLE_SERIES_CASES])
def test_single_series_rules(header, role, words):
    d = classify_one(header)
    assert d.role == role, d.reasons
    assert any(words in r for r in d.reasons), d.reasons
    assert 0.0 <= d.confidence <= 1.0
    if role != "other":
        assert d.chosen
        assert d.confidence > 0.5


def full_session() -> list[SeriesHeader]:
    return [
        hdr(1, "localizer", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), num_images=3),
        mprage(2, "t1_mprage_sag"),
        t2_tse(3, "Ax T2 TSE"),
        flair_2d(4, "Ax T2 FLAIR"),
        hdr(5, "ep2d_diff_trace", image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"), scanning_sequence=("EP",)),
        flair_3d(6, "Sag 3D FLAIR"),
        mprage(7, "t1_mprage_sag", contrast_agent="Gadovist", acquisition_time=T0 + 1800),
        mprage(8, "t1_mprage_sag_MPR_tra", image_type=("DERIVED", "SECONDARY", "MPR"), acquisition_time=T0 + 1800),
    ]


def test_full_session_chooses_one_series_per_role():
    ident = classify_session(session_of(*full_session()))
    assert ident.missing == []
    by_number = {d.series_number: d for d in ident.decisions}
    assert {n: d.role for n, d in by_number.items()} == {
        1: "other", 2: "t1n", 3: "t2w", 4: "t2f", 5: "other", 6: "t2f", 7: "t1c", 8: "other"}
    assert ident.chosen == {"t1n": "1.2.3.2", "t1c": "1.2.3.7", "t2w": "1.2.3.3", "t2f": "1.2.3.6"}
    assert [d.series_number for d in ident.decisions if d.chosen] == [2, 3, 6, 7]
    # The identically named earlier MPRAGE is pre-contrast: it precedes the series that records the agent.
    assert any("acquired before series 7" in r for r in by_number[2].reasons)
    assert any("ContrastBolusAgent 'Gadovist' set: post-contrast" in r for r in by_number[7].reasons)
    assert identify(session_of(*full_session()), PipelineConfig()).chosen == ident.chosen


def test_two_flairs_the_3d_one_wins_and_the_other_says_why():
    ident = classify_session(session_of(flair_2d(4, "Ax T2 FLAIR"), flair_3d(6, "Sag 3D FLAIR")))
    assert ident.chosen["t2f"] == "1.2.3.6"
    loser = decision(ident, 4)
    assert loser.role == "t2f"
    assert not loser.chosen
    assert loser.reasons[-1] == ("not chosen: series 6 'Sag 3D FLAIR' is preferred for T2-FLAIR (t2f): "
                                 "3D (this one is 2D); finer voxels (1 × 1 × 1 mm vs 0.9 × 0.9 × 5 mm); "
                                 "more complete (176 vs 30 images)")


def test_same_quality_t1c_prefers_the_latest_and_others_the_lowest_number():
    ident = classify_session(session_of(t1_se(3, "Ax T1 +C"), t1_se(9, "Ax T1 +C"), t2_tse(4), t2_tse(5)))
    assert ident.chosen["t1c"] == "1.2.3.9"
    assert "acquired later (6 min after this one)" in decision(ident, 3).reasons[-1]
    assert ident.chosen["t2w"] == "1.2.3.4"
    assert "equal quality, and it has the lower series number" in decision(ident, 5).reasons[-1]


def test_post_contrast_mprage_named_only_mprage_is_told_apart_by_the_agent():
    ident = classify_session(session_of(mprage(3, "MPRAGE"), mprage(9, "MPRAGE", contrast_agent="Gadovist")))
    assert (decision(ident, 3).role, decision(ident, 9).role) == ("t1n", "t1c")
    assert decision(ident, 3).chosen
    assert decision(ident, 9).chosen


def test_identical_later_t1_without_any_agent_is_the_likely_post_contrast_repeat():
    ident = classify_session(session_of(mprage(3, "MPRAGE"), t2_tse(5), mprage(12, "MPRAGE")))
    assert (decision(ident, 3).role, decision(ident, 12).role) == ("t1n", "t1c")
    twin = "same protocol and parameters as series 3 'MPRAGE', acquired 9 min later: where a post-contrast repeat"
    assert any(twin in r for r in decision(ident, 12).reasons)
    assert decision(ident, 12).confidence < 0.9  # a guess, and it says so


def test_reconstructions_of_one_acquisition_are_not_a_pre_post_pair():
    # Filtered and unfiltered recons share the acquisition time; different names (CS2/CS4) mean a different protocol.
    ident = classify_session(session_of(mprage(3, "MPRAGE"), mprage(4, "MPRAGE", acquisition_time=T0 + 180 + 30),
                                        mprage(5, "MPRAGE_CS4", acquisition_time=T0 + 900)))
    assert [d.role for d in ident.decisions] == ["t1n", "t1n", "t1n"]
    assert ident.missing == ["t1c", "t2w", "t2f"]


def test_agent_recorded_on_every_series_does_not_make_everything_post_contrast():
    ident = classify_session(session_of(hdr(1, "localizer", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                                            contrast_agent="Gadovist"),
                                        mprage(3, "MPRAGE", contrast_agent="Gadovist"),
                                        mprage(12, "MPRAGE", contrast_agent="Gadovist")))
    assert (decision(ident, 3).role, decision(ident, 12).role) == ("t1n", "t1c")


def test_a_t1_acquired_after_a_series_that_records_the_agent_is_post_contrast():
    ident = classify_session(session_of(t1_se(3, "Ax T1"), flair_2d(6, "Ax FLAIR", contrast_agent="Gadovist"),
                                        t1_se(9, "Cor T1")))
    assert (decision(ident, 3).role, decision(ident, 9).role) == ("t1n", "t1c")
    assert any("acquired after series 6 'Ax FLAIR'" in r for r in decision(ident, 9).reasons)


def session_cases():
    return [full_session(), [flair_2d(4), flair_3d(6)], [mprage(3, "MPRAGE"), t2_tse(5), mprage(12, "MPRAGE")],
            [t1_se(3, "Ax T1"), flair_2d(6, "Ax FLAIR", contrast_agent="Gadovist"), t1_se(9, "Cor T1")],
            [hdr(1, "PD TSE", repetition_time=3000.0, echo_time=15.0)]]


def test_every_rule_in_the_table_is_exercised():
    from pedseg.pipeline.identify import session_facts

    fired = set()
    for headers in [[c[0]] for c in SINGLE_SERIES_CASES] + session_cases():
        for facts in session_facts(headers).values():
            fired |= {rule.name for rule in RULES if rule.predicate(facts)}
    assert fired == {rule.name for rule in RULES}


def test_missing_role_fails_with_plain_words_and_lists_what_was_seen():
    headers = [h for h in full_session() if h.series_number not in (7, 8)]
    with pytest.raises(MissingSequenceError) as err:
        identify(session_of(*headers), PipelineConfig(missing_policy="fail"))
    message = str(err.value)
    assert "missing: post-contrast T1 (t1c)" in message
    assert "series 4 'Ax T2 FLAIR' → t2f (not chosen)" in message
    assert "series 5 'ep2d_diff_trace' → other (ImageType DIFFUSION: diffusion image or map)" in message
    assert "pedseg identify" in message
    assert err.value.exit_code == 3
    allowed = identify(session_of(*headers), PipelineConfig(missing_policy="allow"))
    assert allowed.missing == ["t1c"]


def test_json_is_deterministic_and_complete():
    headers = full_session()
    first = session_to_json(classify_session(session_of(*headers)))
    random.Random(7).shuffle(headers)
    assert session_to_json(classify_session(session_of(*headers))) == first
    payload = json.loads(first)
    assert payload["missing"] == []
    assert [s["SeriesNumber"] for s in payload["series"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert set(payload["series"][0]) == {"SeriesInstanceUID", "part", "SeriesNumber", "SeriesDescription", "role",
                                         "confidence", "reasons", "chosen", "names_available", "decided_by",
                                         "contrast_decided_by"}
    assert payload["series"][0]["part"] is None
    assert payload["chosen"]["t1c"] == "1.2.3.7"
    # What decided each chosen role: the MPRAGEs are T1 by physics (their names agree, but were not needed), and
    # pre/post by the contrast agent series 7 records and series 2 precedes.
    rows = {s["SeriesNumber"]: s for s in payload["series"]}
    assert {n: (rows[n]["decided_by"], rows[n]["contrast_decided_by"]) for n in (1, 2, 3, 4, 6, 7)} == {
        1: ("header", None), 2: ("physics", "acquisition order"), 3: ("physics", None), 4: ("physics", None),
        6: ("physics", None), 7: ("physics", "header")}
    assert all(s["names_available"] for s in payload["series"])


def test_synthetic_headers_use_the_real_dataclass():
    # Guards the helpers above: a renamed field in SeriesHeader must break these tests, not silently pass.
    assert replace(mprage(1), num_images=3).num_images == 3


# ------------------------------------------------------------- sessions written as real DICOM files

STUDY = StudyInfo("SYNTHETIC^IDENTIFY", "SYN000002", "20180301", "M", "007Y", "1.2.826.0.1.3680043.8.498.21",
                  "1.2.826.0.1.3680043.8.498.22", "20260105", T0, "ACC2", "SIEMENS", "Skyra")
# Direction matrix columns (row axis, column axis, slice normal) in LPS, per plane.
AXIAL, CORONAL, SAGITTAL = ((1, 0, 0), (0, 1, 0), (0, 0, 1)), ((1, 0, 0), (0, 0, -1), (0, 1, 0)), \
    ((0, 1, 0), (0, 0, -1), (-1, 0, 0))


def volume(slices: int, spacing=(0.9, 0.9, 5.0), axes=AXIAL) -> sitk.Image:
    """A small image: identification reads headers only, but the geometry must be a real one."""
    image = sitk.GetImageFromArray(np.full((slices, 16, 16), 300, np.float32))
    image.SetSpacing(spacing)
    image.SetDirection(tuple(np.array(axes, float).T.flatten()))
    return image


def write(root: Path, number: int, description: str, volumes, *, tr, te, ti=None, flip=90.0, seq="SE",
          variant="SK\\SP", acquisition="2D", minutes=0.0, agent="", image_type=None, extras=None) -> Path:
    folder = root / f"{number:02d}"
    proto = Protocol("test", description, None, tr, te, ti, flip, seq, variant, "", acquisition,
                     image_type=image_type or ("ORIGINAL", "PRIMARY", "M", "ND"), contrast_agent=agent,
                     minutes_after_start=minutes)
    write_series(volumes, proto, STUDY, number, folder, extras)
    return folder


def acquisition_zips(root: Path) -> list[Path]:
    """One zip per series, as Flywheel stores a session's acquisitions."""
    zips = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        zips.append(root / f"{folder.name}.dicom.zip")
        with zipfile.ZipFile(zips[-1], "w") as zf:
            for f in sorted(folder.iterdir()):
                zf.write(f, f"{folder.name}/{f.name}")
    return zips


def trap_session(root: Path) -> list[Path]:
    """Two FLAIRs (2D and 3D), a T1-FLAIR, a dual-echo PD/T2 under one UID, a 3-plane localizer under one UID,
    and two series named only 'MPRAGE', the later one with ContrastBolusAgent set."""
    mprage = dict(tr=2300.0, te=2.3, ti=900.0, flip=8.0, seq="GR\\IR", variant="SK\\SP\\MP", acquisition="3D")
    iso = (1.0, 1.0, 1.0)
    planes = [volume(3, (1.0, 1.0, 6.0), axes) for axes in (AXIAL, CORONAL, SAGITTAL)]
    localizer = ("ORIGINAL", "PRIMARY", "LOCALIZER")
    write(root, 1, "localizer", planes, tr=8.6, te=4.0, flip=20.0, seq="GR", image_type=localizer)
    write(root, 2, "MPRAGE", [volume(20, iso)], minutes=2, **mprage)
    write(root, 3, "Ax T1 FLAIR", [volume(12)], tr=2000.0, te=9.0, ti=800.0, seq="SE\\IR", minutes=7)
    write(root, 4, "pd+t2_tse_tra", [volume(12), volume(12)], tr=3500.0, te=12.0, minutes=10,
          extras=[{"EchoTime": 12.0, "EchoNumbers": 1}, {"EchoTime": 95.0, "EchoNumbers": 2}])
    write(root, 5, "Ax T2 FLAIR", [volume(12)], tr=9000.0, te=85.0, ti=2500.0, seq="SE\\IR", minutes=13)
    write(root, 6, "Sag 3D FLAIR", [volume(20, iso)], tr=6000.0, te=120.0, ti=1800.0, seq="SE\\IR",
          acquisition="3D", minutes=16)
    write(root, 7, "MPRAGE", [volume(20, iso)], minutes=25, agent="Gadovist", **mprage)
    return acquisition_zips(root)


def identify_json(inputs: list[Path], capsys) -> dict:
    assert pedseg(["identify", *map(str, inputs), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_trap_session_from_acquisition_zips_is_resolved(tmp_path, capsys):
    zips = trap_session(tmp_path)
    payload = identify_json(zips, capsys)
    rows = {(s["SeriesNumber"], s["part"]): s for s in payload["series"]}
    assert {key: (s["role"], s["chosen"]) for key, s in rows.items()} == {
        (1, "ax"): ("other", False), (1, "cor"): ("other", False), (1, "sag"): ("other", False),
        (2, None): ("t1n", True), (3, None): ("t1n", False), (4, "e1"): ("other", False), (4, "e2"): ("t2w", True),
        (5, None): ("t2f", False), (6, None): ("t2f", True), (7, None): ("t1c", True)}
    assert payload["missing"] == []
    # The 3D FLAIR wins, and the 2D one says why.
    assert rows[5, None]["reasons"][-1].startswith(
        "not chosen: series 6 'Sag 3D FLAIR' is preferred for T2-FLAIR (t2f): 3D (this one is 2D); finer voxels")
    # The T1-FLAIR is a T1 (pre-contrast), never the FLAIR; it loses t1n to the 3D MPRAGE.
    assert "T1-FLAIR / T1 inversion recovery (short TE) — T1-weighted, not a T2-FLAIR" in " ".join(
        rows[3, None]["reasons"])
    assert rows[3, None]["reasons"][-1].startswith("not chosen: series 2 'MPRAGE' is preferred for pre-contrast T1")
    # Two series named only 'MPRAGE': the agent makes the later one post-contrast, the earlier one pre.
    assert any("ContrastBolusAgent 'Gadovist' set: post-contrast" in r for r in rows[7, None]["reasons"])
    assert any("acquired before series 7 'MPRAGE'" in r for r in rows[2, None]["reasons"])
    # Dual echo: the long-TE part is the T2, the short-TE part proton density; both keep the real UID.
    assert rows[4, "e1"]["SeriesInstanceUID"] == rows[4, "e2"]["SeriesInstanceUID"]
    assert payload["chosen"]["t2w"] == rows[4, "e2"]["SeriesInstanceUID"] + "#e2"
    assert any("proton-density" in r for r in rows[4, "e1"]["reasons"])
    assert all(any("localizer" in r for r in rows[1, part]["reasons"]) for part in ("ax", "cor", "sag"))
    # Deterministic: the same JSON whatever the order of the inputs, and from the unzipped folders alike.
    first = json.dumps(payload, sort_keys=True)
    assert json.dumps(identify_json(zips[::-1], capsys), sort_keys=True) == first
    assert json.dumps(identify_json([tmp_path], capsys), sort_keys=True) == first


def test_split_parts_are_identified_on_their_own_and_the_chosen_part_is_converted(tmp_path):
    # An acquired axial T2 and its coronal reformat under one SeriesInstanceUID.
    write(tmp_path / "in", 4, "t2_tse_tra", [volume(12), volume(16, (0.9, 0.9, 3.0), CORONAL)], tr=5000.0, te=98.0,
          extras=[{}, {"ImageType": ["DERIVED", "SECONDARY", "MPR"]}])
    session = ingest(tmp_path / "in", tmp_path / "work")
    ident = classify_session(session)
    assert [(d.part, d.role, d.chosen) for d in ident.decisions] == [("ax", "t2w", True), ("cor", "other", False)]
    assert any("derived" in r for r in ident.decisions[1].reasons)
    chosen = session.by_uid(ident.chosen["t2w"])  # how preprocessing finds the series to convert
    assert (chosen.header.part, chosen.header.num_images) == ("ax", 12)
    assert chosen.header.series_uid == ident.decisions[1].series_uid  # both parts keep the real UID


# ------------------------------------------------------------------------------------ real series



@needs_shared_data
@pytest.mark.parametrize("folder, number", [
    ("siemens_skyra_mprage_pediatric_3y", 5),
    ("philips_ingenia_adni_mprage", 1301),
    ("ge_signa_ir_spgr", 10),
    ("philips_t1_multiframe_and_classic/201_T1W_TSE_Sno_CSno_CSAIno", 201),
    ("philips_t1_multiframe_and_classic/501_T1W_TSE_Sno_CSno_CSAI2", 501),
])
def test_real_t1_series_are_pre_contrast_t1(folder, number, tmp_path):
    ident = classify_session(ingest(DICOM / folder, tmp_path))
    d = decision(ident, number)
    assert (d.role, d.chosen, d.part) == ("t1n", True, ""), d.reasons  # one stack, one echo: never split
    assert d.confidence > 0.75
    assert ident.missing == ["t1c", "t2w", "t2f"]


@needs_shared_data
def test_real_philips_ffe_enhanced_and_classic_pair_both_pre_contrast(tmp_path):
    # Same study: 401 (enhanced multi-frame, CS2) then 501 (classic, CS4) a minute later. Not a pre/post pair.
    src = tmp_path / "in"
    for sub in ("401_T1W_FFE_Sno_CS2", "501_T1W_FFE_Sno_CS4"):
        shutil.copytree(DICOM / "philips_t1_multiframe_and_classic" / sub, src / sub)
    ident = classify_session(ingest(src, tmp_path / "work"))
    assert [(d.series_number, d.role) for d in ident.decisions] == [(401, "t1n"), (501, "t1n")]
    assert ident.chosen["t1n"] == decision(ident, 401).series_uid
    assert "equal quality" in decision(ident, 501).reasons[-1]


@needs_shared_data
def test_real_philips_session_mprage_is_t1_and_perfusion_and_field_map_are_not(tmp_path):
    # The ADNI MPRAGE (classic) and the enhanced multi-frame series come from one study: two inputs, one session.
    ident = classify_session(ingest([DICOM / "philips_ingenia_adni_mprage", DICOM / "philips_enhanced_multiframe"],
                                    tmp_path))
    assert [(d.series_number, d.part, d.role) for d in ident.decisions] == [
        (1301, "", "t1n"), (1901, "", "other"), (1903, "", "other"), (2001, "", "other")]  # 2001's echoes: one object
    assert any("perfusion" in r for r in decision(ident, 1901).reasons)
    assert any("field map" in r for r in decision(ident, 2001).reasons)


@needs_shared_data
@pytest.mark.parametrize("folder, words", [("siemens_trio_epi_mosaic", "MOSAIC"), ("ge_mr750_epi", "FMRI")])
def test_real_epi_series_are_never_structural(folder, words, tmp_path):
    ident = classify_session(ingest(DICOM / folder, tmp_path))
    assert [d.role for d in ident.decisions] == ["other"]
    assert any(words in r for r in ident.decisions[0].reasons)
    assert ident.chosen == {}


def test_the_reference_series_falls_back_to_t1c_then_the_first_chosen_and_says_so(caplog):
    chosen = {"t1n": "1.1", "t1c": "1.2", "t2f": "1.4"}
    assert reference_role("t2f", chosen) == "t2f"
    assert not caplog.text
    assert reference_role("t2w", chosen) == "t1c"
    assert "the reference series asked for, T2 (t2w), is not in this session" in caplog.text
    assert reference_role("t1c", {"t2w": "1.3", "t2f": "1.4"}) == "t2w"
    assert classify_session(session_of(*full_session()), reference="t2f").reference_role == "t2f"
