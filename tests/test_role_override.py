"""Role override (`pedseg run --role t1c=SERIES`, gear option role_overrides): a series pinned to a role by hand
takes it whatever identification said; every wrong pin is a clear input error (exit 2)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from pypdf import PdfReader
from test_identify import T0, decision, flair_2d, full_session, hdr, mprage, session_of, t2_tse

from pedseg import runner
from pedseg.cli.main import main as pedseg
from pedseg.gear import context as gear_context
from pedseg.pipeline.config import PipelineConfig, parse_role_overrides
from pedseg.pipeline.errors import InputError
from pedseg.pipeline.identify import classify_session, identify, session_to_json
from pedseg.pipeline.measure import measure
from pedseg.pipeline.types import StudyContext
from pedseg.reporting.artifacts import BundleRecord, Provenance
from pedseg.reporting.pdf import write_report_pdf

from factories import passing_qc, tiny_atlas_case

REPO = Path(__file__).resolve().parent.parent


def agent_from_the_pre_contrast_t1_on():
    """A site that records the contrast agent on every series from the pre-contrast T1 on (series 4)."""
    return session_of(
        hdr(1, "localizer", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), num_images=3),
        t2_tse(2, "Ax T2 TSE"),
        flair_2d(3, "Ax T2 FLAIR"),
        mprage(4, "t1_mprage_sag", contrast_agent="Gadovist"),
        mprage(9, "t1_mprage_sag", contrast_agent="Gadovist", acquisition_time=T0 + 1800),
    )


def pinned(session, *pins: str, **config):
    return identify(session, PipelineConfig(role_overrides=parse_role_overrides(pins), **config))


# ------------------------------------------------------------------------------------------ identification


def test_automatic_identification_takes_the_pre_contrast_t1_for_post_contrast_and_a_pin_fixes_it():
    automatic = classify_session(agent_from_the_pre_contrast_t1_on())
    assert (decision(automatic, 4).role, decision(automatic, 9).role) == ("t1c", "t1c")
    assert automatic.missing == ["t1n"]
    assert automatic.pinned == {}

    fixed = pinned(agent_from_the_pre_contrast_t1_on(), "t1n=4")
    assert fixed.chosen == {"t1n": "1.2.3.4", "t1c": "1.2.3.9", "t2w": "1.2.3.2", "t2f": "1.2.3.3"}
    assert fixed.missing == []
    assert fixed.pinned == {"t1n": "1.2.3.4"}
    pre = decision(fixed, 4)
    assert (pre.role, pre.chosen, pre.pinned, pre.confidence) == ("t1n", True, True, 1.0)
    assert pre.reasons[0] == ("pinned by the user to pre-contrast T1 (t1n) (automatic identification: t1c, "
                              "confidence " f"{decision(automatic, 4).confidence:.2f})")
    # What the rules said stays on record (automatically, 4 lost post-contrast T1 to the later series 9).
    assert pre.reasons[1:] == decision(automatic, 4).reasons[:-1]
    assert not decision(fixed, 9).pinned


def test_pinning_both_t1s_by_series_number_or_uid_alike():
    by_number = pinned(agent_from_the_pre_contrast_t1_on(), "t1c=9", "t1n=4")
    by_uid = pinned(agent_from_the_pre_contrast_t1_on(), "t1c=1.2.3.9,t1n=1.2.3.4")
    assert by_number.chosen == by_uid.chosen
    assert by_number.pinned == by_uid.pinned == {"t1c": "1.2.3.9", "t1n": "1.2.3.4"}


def test_the_series_that_held_the_role_loses_it_and_says_why():
    ident = pinned(session_of(*full_session()), "t2f=4")  # identification prefers the 3D FLAIR, series 6
    assert ident.chosen["t2f"] == "1.2.3.4"
    displaced = decision(ident, 6)
    assert (displaced.role, displaced.chosen) == ("t2f", False)
    assert displaced.reasons[-1] == "not chosen: series 4 'Ax T2 FLAIR' is pinned to T2-FLAIR (t2f) by the user"


def test_a_pinned_series_leaves_its_former_role_to_the_best_remaining_candidate():
    # Series 6 (3D FLAIR) would be the FLAIR; pinned elsewhere, the 2D FLAIR is the best FLAIR left.
    ident = pinned(session_of(*full_session()), "t2w=6")
    assert ident.chosen["t2w"] == "1.2.3.6"
    assert ident.chosen["t2f"] == "1.2.3.4"
    assert decision(ident, 3).reasons[-1].endswith("is pinned to T2 (t2w) by the user")


def test_a_pin_can_name_a_series_identification_did_not_recognise():
    ident = pinned(session_of(mprage(2), hdr(5, "series 5", repetition_time=500.0, echo_time=10.0)), "t2w=5",
                   missing_policy="allow")
    assert decision(classify_session(session_of(hdr(5, "series 5"))), 5).role == "other"
    assert ident.chosen["t2w"] == "1.2.3.5"


def test_without_pins_identify_is_unchanged():
    assert pinned(session_of(*full_session())).chosen == classify_session(session_of(*full_session())).chosen


def test_identify_json_records_the_pinned_roles():
    payload = json.loads(session_to_json(pinned(agent_from_the_pre_contrast_t1_on(), "t1n=4")))
    assert payload["pinned"] == {"t1n": "1.2.3.4"}
    assert payload["chosen"]["t1n"] == "1.2.3.4"
    (series_4,) = (s for s in payload["series"] if s["SeriesNumber"] == 4)
    assert series_4["reasons"][0].startswith("pinned by the user to pre-contrast T1 (t1n)")


# ------------------------------------------------------------------------------------------------ errors


def input_error(session, *pins: str) -> str:
    with pytest.raises(InputError) as err:
        pinned(session, *pins)
    assert err.value.exit_code == 2
    return str(err.value)


def test_a_series_not_in_the_session_lists_the_series_there():
    message = input_error(agent_from_the_pre_contrast_t1_on(), "t1n=7")
    assert message.startswith("Role override t1n=7: no series of this session has SeriesNumber or "
                              "SeriesInstanceUID '7'. Series in the session: series 1 'localizer'; series 2 "
                              "'Ax T2 TSE'; series 3 'Ax T2 FLAIR'; series 4 't1_mprage_sag'; series 9 "
                              "'t1_mprage_sag'.")


def test_a_number_several_series_share_asks_for_the_uid():
    session = session_of(mprage(4), replace(mprage(4, "t1_mprage_sag_rerun"), series_uid="1.2.3.40"), t2_tse(2))
    message = input_error(session, "t1n=4")
    assert "Role override t1n=4 matches 2 series: series 4 't1_mprage_sag_p2_iso': 1.2.3.4; " in message
    assert "Give the SeriesInstanceUID instead" in message
    assert pinned(session, "t1n=1.2.3.40", missing_policy="allow").chosen["t1n"] == "1.2.3.40"


def test_a_split_series_asks_for_the_part():
    session = session_of(replace(t2_tse(2), part="e1"), replace(t2_tse(2), part="e2"))
    assert "matches 2 series" in input_error(session, "t2w=1.2.3.2")
    assert pinned(session, "t2w=1.2.3.2#e2", missing_policy="allow").chosen["t2w"] == "1.2.3.2#e2"


def test_one_series_cannot_take_two_roles():
    message = input_error(agent_from_the_pre_contrast_t1_on(), "t1n=4", "t1c=1.2.3.4")
    assert message.startswith("Role override pins series 4 't1_mprage_sag' to two roles: pre-contrast T1 (t1n) "
                              "and post-contrast T1 (t1c).")


@pytest.mark.parametrize("number, why", [(1, "localizer"), (8, "derived"), (5, "diffusion")])
def test_a_series_identification_rejected_as_unusable_cannot_be_pinned(number, why):
    message = input_error(session_of(*full_session()), f"t1c={number}")
    assert message.startswith(f"Role override t1c={number}: series {number} ")
    assert "cannot be used as post-contrast T1 (t1c)" in message
    assert why in message.lower()


@pytest.mark.parametrize("text, words", [
    ("t1=6", "--role 't1=6': unknown role 't1'."),
    ("t1c", "--role 't1c' is not ROLE=SERIES."),
    ("t1c=", "--role 't1c=' is not ROLE=SERIES."),
    ("t1c=6,t1c=7", "--role pins post-contrast T1 (t1c) twice (t1c=6 and t1c=7)."),
])
def test_malformed_overrides_are_input_errors(text, words):
    with pytest.raises(InputError) as err:
        parse_role_overrides([text])
    assert str(err.value).startswith(words)
    assert err.value.exit_code == 2


def test_the_config_field_refuses_what_the_parser_would():
    with pytest.raises(ValueError):
        PipelineConfig(role_overrides=(("t1", "6"),))
    with pytest.raises(ValueError):
        PipelineConfig(role_overrides=(("t1c", "6"), ("t1c", "7")))
    assert hash(PipelineConfig(role_overrides=(("t1c", "6"),)))  # frozen and hashable


# --------------------------------------------------------------------------------------------- adapters


@pytest.fixture
def run_calls(monkeypatch):
    calls = []

    def run_pipeline(inputs, outdir, config, store=None):
        calls.append(config)
        wt = SimpleNamespace(volume_ml=0.0)
        return SimpleNamespace(measurements=SimpleNamespace(regions={"WT": wt}), outdir=outdir)

    monkeypatch.setattr(runner, "run_pipeline", run_pipeline)
    return calls


def test_cli_role_options_reach_the_config(tmp_path, run_calls):
    assert pedseg(["run", str(tmp_path), str(tmp_path / "out"), "--role", "t1c=6", "--role", "t1n=2"]) == 0
    assert run_calls[0].role_overrides == (("t1c", "6"), ("t1n", "2"))
    assert pedseg(["run", str(tmp_path), str(tmp_path / "out")]) == 0
    assert run_calls[1].role_overrides == ()


def test_cli_unknown_role_exits_2_before_running(tmp_path, run_calls, capsys):
    assert pedseg(["run", str(tmp_path), str(tmp_path / "out"), "--role", "t1=6"]) == 2
    assert "error (bad_input): --role 't1=6': unknown role 't1'." in capsys.readouterr().err
    assert run_calls == []


def gear_root(root: Path, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "manifest.json", root / "manifest.json")
    (root / "config.json").write_text(json.dumps({"config": config, "inputs": {}, "destination": {}}))
    return root


def test_gear_option_is_parsed_into_the_config(tmp_path):
    job = gear_context.load_job(gear_root(tmp_path, {"role_overrides": "t1c=6, t1n=1.2.840.99"}))
    assert job.config.role_overrides == (("t1c", "6"), ("t1n", "1.2.840.99"))
    assert gear_context.load_job(gear_root(tmp_path / "default", {})).config.role_overrides == ()


def test_gear_option_errors_name_the_option(tmp_path):
    with pytest.raises(InputError) as err:
        gear_context.load_job(gear_root(tmp_path, {"role_overrides": "t1=6"}))
    assert str(err.value).startswith("Gear config option 'role_overrides' 't1=6': unknown role 't1'.")


# -------------------------------------------------------------------------------------- provenance, report


def provenance(**changes) -> Provenance:
    return Provenance(
        pedseg_version="0.1.0", packages={}, bundle=BundleRecord("pedseg-demo", "0.1.0", "CC-BY-4.0", "ab", "2024"),
        study_instance_uid="1.2.3", series_instance_uids={"t1n": "1.2.3.4", "t1c": "1.2.3.9"}, device="cpu",
        fast_mode=True, tta=False, models=["m"], folds=["0"], ensemble=None, postprocessing=(), qc=passing_qc(),
        reference_role="t1c", **changes)


def test_provenance_records_the_pinned_roles():
    assert provenance(pinned_roles={"t1n": "1.2.3.4"}).as_dict()["inputs"]["pinned_roles"] == {"t1n": "1.2.3.4"}
    assert provenance().as_dict()["inputs"]["pinned_roles"] == {}


def test_report_says_which_roles_were_pinned(tmp_path):
    ident = pinned(agent_from_the_pre_contrast_t1_on(), "t1n=4")
    labels = np.zeros((16, 20, 24), np.uint8)
    labels[4:10, 5:12, 6:14] = 4
    images, label_path = tiny_atlas_case(tmp_path / "atlas", labels)
    label_image = sitk.ReadImage(str(label_path))
    out = write_report_pdf(tmp_path / "report.pdf", images=images, labels=label_image,
                           measurements=measure(label_image, None, qc_flags=[]), identification=ident,
                           qc=passing_qc(), provenance=provenance(pinned_roles=dict(ident.pinned)).as_dict(),
                           context=StudyContext("SUBJ-0001", "20240102", None, ""), fast_mode=False)
    text = " ".join(" ".join(page.extract_text() for page in PdfReader(out).pages).split())
    assert "Roles pinned by hand (not chosen by identification): t1n → series 4 't1_mprage_sag'" in text
    assert "pinned" in text.split("Series identification", 1)[1]
