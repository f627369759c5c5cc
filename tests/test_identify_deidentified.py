"""Identification of de-identified sessions: SeriesDescription, ProtocolName and SequenceName blanked (the DICOM
Basic Application Level Confidentiality Profile without "Retain Descriptors"), everything else as the scanner
wrote it. Every session must score as it does with its names: the same role for every series, the same series
chosen for every role, and each choice made on header and physics evidence."""
from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
from test_identify import (
    SINGLE_SERIES_CASES,
    acquisition_zips,
    classify_one,
    full_session,
    identify_json,
    mprage,
    philips_dual_echo_b0,
    session_cases,
    session_of,
    siemens_3d_scout,
    siemens_tof,
    t2_tse,
    trap_session,
    volume,
    write,
)

from pedseg.pipeline.identify import classify_session
from pedseg.pipeline.ingest import ingest
from pedseg.pipeline.types import SeriesHeader

from factories import SHARED_DATA, blank_names, needs_shared_data

DICOM = SHARED_DATA / "dicom"


@pytest.fixture
def deidentify(tmp_path):
    """Blanks SeriesDescription, ProtocolName and SequenceName with pydicom: returns a copy of the DICOM files
    under the given folder (or file) with those attributes empty."""
    numbers = itertools.count()
    return lambda src: blank_names(src, tmp_path / f"deidentified-{next(numbers)}")


def without_names(h: SeriesHeader) -> SeriesHeader:
    return replace(h, description="", protocol="", sequence_name="")


def outcome(ident) -> tuple[dict, dict]:
    """What must not change without names: each series' role, and the series chosen for each role."""
    return {(d.series_number, d.part): d.role for d in ident.decisions}, dict(ident.chosen)


# ------------------------------------------------------------------------------------- header sessions

# The single-series cases whose role only their name gave: a post-contrast T1 known by its name alone cannot be
# told from a pre-contrast one by its header (a session with both finds it from the images: test_contrast.py);
# and T2 physics named as a post-contrast MPRAGE, which the name made "other" and is a T2 without it.
NAME_ONLY = {"3D T1 TFE sag Gd": "t1n", "t1_tse_tra_KM": "t1n", "Ax T1 SE +C": "t1n", "T1 MPRAGE +C": "t2w"}


@pytest.mark.parametrize("header, role, words", SINGLE_SERIES_CASES,
                         ids=[f"{c[0].description}->{c[1]}" for c in SINGLE_SERIES_CASES])
def test_every_single_series_case_scores_the_same_without_names(header, role, words):
    d = classify_one(without_names(header))
    assert d.role == NAME_ONLY.get(header.description, role), d.reasons
    assert not d.names_available or not (header.description or header.protocol or header.sequence_name)
    if d.role != "other":
        assert d.decided_by in ("physics", "header"), d.reasons


def issue_sessions() -> dict[str, list[SeriesHeader]]:
    """The sessions of issue 21, as the scanners wrote them (names included)."""
    return {
        "siemens 3D scout and MPRAGE": [
            siemens_3d_scout(1, "AAHead_Scout_64ch-head-coil", sequence_name="*fl3d1_ns"),
            mprage(2, "t1_mprage_sag_p2_iso"), t2_tse(3), mprage(9, "t1_mprage_sag_p2_iso", contrast_agent="Gadovist")],
        "philips dual-echo field map": [
            philips_dual_echo_b0(1, "B0_map_dual_echo", protocol="WIP B0 map"),
            mprage(2, "T1W_3D_TFE", manufacturer="Philips", inversion_time=None, scanning_sequence=("GR",),
                   sequence_variant=("SK", "MP")), t2_tse(3, "T2W_TSE")],
        "3D TOF": [mprage(2, "t1_mprage_sag"),
                   siemens_tof(4, "tof_fl3d_tra_p2_multi-slab", sequence_name="*fl3d1r_t70"), t2_tse(5)],
    }


@pytest.mark.parametrize("headers", [full_session(), *session_cases(), *issue_sessions().values()],
                         ids=["full session", *(f"session case {i}" for i in range(len(session_cases()))),
                              *issue_sessions()])
def test_every_header_session_scores_the_same_without_names(headers):
    named = classify_session(session_of(*headers))
    blanked = classify_session(session_of(*map(without_names, headers)))
    assert outcome(blanked) == outcome(named)
    for d in blanked.decisions:
        assert not d.names_available
        if d.chosen:
            assert d.decided_by in ("physics", "header"), d.reasons


def test_the_issue_series_are_recognised_by_their_physics():
    sessions = {name: classify_session(session_of(*map(without_names, headers)))
                for name, headers in issue_sessions().items()}
    scout, tof = sessions["siemens 3D scout and MPRAGE"], sessions["3D TOF"]
    assert scout.chosen["t1n"] == "1.2.3.2" and scout.chosen["t1c"] == "1.2.3.9"
    assert scout.decisions[0].role == "other" and scout.decisions[0].decided_by == "physics"
    assert "3D gradient echo with TR 3.15 ms / TE 1.37 ms and 1.6 mm voxels" in scout.decisions[0].reasons[0]
    field_map = sessions["philips dual-echo field map"].decisions[0]
    assert field_map.role == "other"
    assert "echoes at TE 2.3 / 4.6 ms" in field_map.reasons[0]
    assert tof.chosen == {"t1n": "1.2.3.2", "t2w": "1.2.3.5"}
    assert "0.5 mm slices in a 80 mm slab: time-of-flight angiography" in tof.decisions[1].reasons[0]


def test_a_name_never_makes_a_series_one_of_the_four_against_its_physics():
    # A 3D scout named as an MPRAGE is still a scout; a TOF named as a T1 is still an angiogram.
    assert classify_one(siemens_3d_scout(1, "t1_mprage_sag")).role == "other"
    assert classify_one(siemens_tof(1, "T1 3D FLASH")).role == "other"


# ----------------------------------------------------------------------- sessions written as DICOM files


def vendor_session(root: Path) -> list[Path]:
    """A session holding the issue's traps as DICOM files: a Siemens 3D scout, a classic dual-echo field map (its
    echoes split into two parts by ingest), a 3D TOF, and the four sequences."""
    mprage_args = dict(tr=2300.0, te=2.3, ti=900.0, flip=8.0, seq="GR\\IR", variant="SK\\SP\\MP", acquisition="3D")
    write(root, 1, "AAHead_Scout", [volume(20, (1.6, 1.6, 1.6))], tr=3.15, te=1.37, flip=8.0, seq="GR", variant="SP",
          acquisition="3D")
    write(root, 2, "t1_mprage_sag", [volume(20, (1.0, 1.0, 1.0))], minutes=2, **mprage_args)
    write(root, 3, "B0_map", [volume(12, (3.0, 3.0, 3.0)), volume(12, (3.0, 3.0, 3.0))], tr=20.0, te=2.3, flip=10.0,
          seq="GR", variant="SP", acquisition="3D", minutes=6,
          extras=[{"EchoTime": 2.3, "EchoNumbers": 1}, {"EchoTime": 4.6, "EchoNumbers": 2}])
    write(root, 4, "tof_fl3d_tra", [volume(40, (0.4, 0.4, 0.5))], tr=21.0, te=3.43, flip=18.0, seq="GR",
          variant="SP\\OSP", acquisition="3D", minutes=8)
    write(root, 5, "t2_tse_tra", [volume(12)], tr=5000.0, te=98.0, minutes=12)
    write(root, 6, "t2_flair_tra", [volume(12)], tr=9000.0, te=85.0, ti=2500.0, seq="SE\\IR", minutes=15)
    write(root, 7, "t1_mprage_sag", [volume(20, (1.0, 1.0, 1.0))], minutes=25, agent="Gadovist", **mprage_args)
    return acquisition_zips(root)


def series_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


@pytest.mark.parametrize("build", [trap_session, vendor_session])
def test_dicom_sessions_score_the_same_without_names(build, tmp_path, deidentify, capsys):
    zips = build(tmp_path / "named")
    named = identify_json(zips, capsys)
    blanked = identify_json([deidentify(folder) for folder in series_folders(tmp_path / "named")], capsys)

    def rows(payload):
        return {(s["SeriesNumber"], s["part"]): (s["role"], s["chosen"]) for s in payload["series"]}

    assert rows(blanked) == rows(named)
    assert blanked["chosen"] == named["chosen"] and blanked["missing"] == named["missing"] == []
    assert all(s["SeriesDescription"] == "" and not s["names_available"] for s in blanked["series"])
    assert all(s["decided_by"] in ("physics", "header") for s in blanked["series"] if s["chosen"])


def test_vendor_session_traps_are_rejected_for_what_they_are(tmp_path, deidentify, capsys):
    vendor_session(tmp_path / "named")
    payload = identify_json([deidentify(folder) for folder in series_folders(tmp_path / "named")], capsys)
    rows = {(s["SeriesNumber"], s["part"]): s for s in payload["series"]}
    assert "low-resolution 3D localizer" in rows[1, None]["reasons"][0]
    assert [rows[3, part]["role"] for part in ("e1", "e2")] == ["other", "other"]
    assert all("echoes at TE 2.3 / 4.6 ms" in rows[3, part]["reasons"][0] for part in ("e1", "e2"))
    assert "time-of-flight angiography" in rows[4, None]["reasons"][0]
    assert payload["chosen"]["t1n"] == rows[2, None]["SeriesInstanceUID"]


# ------------------------------------------------------------------------------------ real series


REAL = ["siemens_skyra_mprage_pediatric_3y", "philips_ingenia_adni_mprage", "ge_signa_ir_spgr",
        "philips_t1_multiframe_and_classic/201_T1W_TSE_Sno_CSno_CSAIno",
        "philips_t1_multiframe_and_classic/401_T1W_FFE_Sno_CS2",
        "philips_t1_multiframe_and_classic/501_T1W_TSE_Sno_CSno_CSAI2", "siemens_trio_epi_mosaic", "ge_mr750_epi"]


@needs_shared_data
@pytest.mark.parametrize("folder", REAL)
def test_real_series_score_the_same_without_names(folder, tmp_path, deidentify):
    named = classify_session(ingest(DICOM / folder, tmp_path / "named"))
    blanked = classify_session(ingest(deidentify(DICOM / folder), tmp_path / "blanked"))
    assert outcome(blanked) == outcome(named)
    assert all(not d.names_available for d in blanked.decisions)


@needs_shared_data
def test_real_philips_ffe_pair_without_names_is_still_not_a_pre_post_pair(tmp_path, deidentify):
    # 401 (CS2) and 501 (CS4), a minute apart: only their names told the protocols apart; the minute still does.
    folders = [DICOM / "philips_t1_multiframe_and_classic" / sub for sub in ("401_T1W_FFE_Sno_CS2",
                                                                           "501_T1W_FFE_Sno_CS4")]
    ident = classify_session(ingest([deidentify(f) for f in folders], tmp_path))
    assert [(d.series_number, d.role) for d in ident.decisions] == [(401, "t1n"), (501, "t1n")]


@needs_shared_data
def test_real_philips_dual_echo_field_map_is_a_field_map_by_its_echoes(tmp_path, deidentify):
    # The enhanced multi-frame series (pCASL, its source, the dual-echo field map) score the same without names.
    named = classify_session(ingest(DICOM / "philips_enhanced_multiframe", tmp_path / "named"))
    ident = classify_session(ingest(deidentify(DICOM / "philips_enhanced_multiframe"), tmp_path / "blanked"))
    assert outcome(ident) == outcome(named)
    field_map = next(d for d in ident.decisions if d.series_number == 2001)
    assert field_map.role == "other"
    assert "gradient echo with echoes at TE 2.3 / 4.6 ms" in field_map.reasons[0]
    assert field_map.decided_by == "physics"
