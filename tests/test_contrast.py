"""Post-contrast T1 from the images (pipeline/contrast.py): synthetic pre/post heads on different grids and
poses, the issue's post-contrast T1 known only by its name, and a real case re-acquired with no contrast tags."""
from __future__ import annotations

import json

import pytest
from test_identify import SAGITTAL, identify_json, write

from pedseg.pipeline import contrast
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import MissingSequenceError
from pedseg.pipeline.identify import classify_session, identify
from pedseg.pipeline.ingest import ingest
from pedseg.synth.reacquire import find_case_images, reacquire_session

from factories import CONTRAST_ATTRIBUTES, SHARED_DATA, blank_names, grid, needs_shared_data, t1_head

# A 3D T1 (1.5 mm, sagittal) and a 2D axial spin-echo T1 (1.2 mm, 4 mm slices, the head turned 8 degrees). The
# phantom is sampled at voxel centres, not integrated over the voxel as a scanner does, so grids of 2 mm or more
# alias its sharp edges: finer grids stand in for real acquisitions.
PRE_GRID = dict(size=(107, 127, 113), spacing=(1.5, 1.5, 1.5))
POST_GRID = dict(size=(143, 172, 42), spacing=(1.2, 1.2, 4.0), rotate_deg=8.0)


def test_the_post_contrast_head_is_found_whichever_was_acquired_first():
    pre = t1_head(grid(**PRE_GRID), post=False, seed=1)
    post = t1_head(grid(**POST_GRID), post=True, seed=2)
    forward = contrast.enhancement(pre, post, same_frame=True)
    assert forward.brighter_in_later > 5 * forward.brighter_in_earlier
    call = contrast.decide("pre", "post", forward)
    assert (call.post, call.pre) == ("post", "pre") and call.confidence >= contrast.MIN_CONFIDENCE
    # Acquired the other way round (post first), the images outweigh the order, but the call is less sure.
    backward = contrast.decide("post", "pre", contrast.enhancement(post, pre, same_frame=True))
    assert backward.post == "post" and 0.5 < backward.confidence < call.confidence
    assert "the images outweigh it" in " ".join(backward.reasons)


def test_two_pre_contrast_heads_are_not_told_apart():
    first = t1_head(grid(**PRE_GRID), post=False, seed=1)
    second = t1_head(grid(**POST_GRID), post=False, seed=3)
    call = contrast.decide("first", "second", contrast.enhancement(first, second, same_frame=True))
    assert call.confidence < contrast.MIN_CONFIDENCE  # acquisition order alone is a tie-breaker, not a decision


def t1_session(root, *, post: bool) -> None:
    """The issue's case 4: a 3D T1 TFE, a T2, then a 2D T1 spin echo whose only header mark of contrast is its
    name 'T1W_SE_tra +C' (`post`: it was really acquired after contrast)."""
    write(root, 2, "T1W_3D_TFE", [t1_head(grid(**PRE_GRID, axes=SAGITTAL), post=False, seed=1)], tr=8.1, te=3.7,
          flip=8.0, seq="GR", variant="SP\\MP", acquisition="3D", minutes=2)
    write(root, 3, "T2W_TSE", [t1_head(grid((64, 76, 30), (3.0, 3.0, 5.0)), post=False)], tr=3000.0, te=80.0,
          minutes=6)
    write(root, 4, "T1W_SE_tra +C", [t1_head(grid(**POST_GRID), post=post, seed=2)], tr=550.0, te=12.0, minutes=20)


def test_a_post_contrast_t1_known_only_by_its_name_is_found_from_the_images(tmp_path, capsys):
    t1_session(tmp_path / "named", post=True)
    named = identify_json([tmp_path / "named"], capsys)
    blanked = identify_json([blank_names(tmp_path / "named", tmp_path / "blanked")], capsys)
    for payload in (named, blanked):
        rows = {s["SeriesNumber"]: s for s in payload["series"]}
        assert {n: rows[n]["role"] for n in rows} == {2: "t1n", 3: "t2w", 4: "t1c"}
        assert rows[4]["chosen"] and rows[4]["contrast_decided_by"] == "images"
        assert rows[2]["contrast_decided_by"] == "images"
        assert payload["contrast_from_images"]["confidence"] >= contrast.MIN_CONFIDENCE
        assert payload["contrast_from_images"]["unresolved"] is None
    rows = {s["SeriesNumber"]: s for s in blanked["series"]}
    assert rows[4]["reasons"][0].startswith("post-contrast from the images, confidence")
    assert "vessels, dural sinuses, choroid plexus, pituitary" in rows[4]["reasons"][0]
    assert not rows[4]["names_available"] and rows[4]["decided_by"] == "physics"


@pytest.mark.slow
def test_two_post_contrast_t1s_after_one_injection_are_both_post_contrast(tmp_path):
    # A 2D spin echo and a 3D T1 after contrast: both are t1c candidates, and the 3D one is chosen.
    t1_session(tmp_path / "in", post=True)
    write(tmp_path / "in", 5, "T1W_3D_TFE", [t1_head(grid(**PRE_GRID, axes=SAGITTAL), post=True, seed=5)], tr=8.1,
          te=3.7, flip=8.0, seq="GR", variant="SP\\MP", acquisition="3D", minutes=24)
    ident = classify_session(ingest(blank_names(tmp_path / "in", tmp_path / "blanked"), tmp_path / "work"))
    number = {d.series_number: d for d in ident.decisions}
    assert {n: number[n].role for n in (2, 4, 5)} == {2: "t1n", 4: "t1c", 5: "t1c"}
    assert ident.chosen["t1c"] == number[5].key and ident.chosen["t1n"] == number[2].key
    assert all(number[n].contrast_decided_by == "images" for n in (2, 4, 5))


def test_two_pre_contrast_t1s_stop_the_run_and_ask_which_is_post_contrast(tmp_path):
    t1_session(tmp_path / "in", post=False)
    session = ingest(blank_names(tmp_path / "in", tmp_path / "blanked"), tmp_path / "work")
    ident = classify_session(session)
    assert "Cannot tell which T1 is post-contrast" in ident.contrast_unresolved
    with pytest.raises(MissingSequenceError) as err:
        identify(session, PipelineConfig())
    assert "Cannot tell which T1 is post-contrast" in str(err.value)
    assert "--role t1c=SERIES" in err.value.hint and err.value.exit_code == 3
    # The user says which one: the run goes on, with that series as t1c and no image comparison needed.
    pinned = identify(session, PipelineConfig(role_overrides=(("t1c", "4"),), missing_policy="allow"))
    assert pinned.chosen["t1c"] == next(d.key for d in pinned.decisions if d.series_number == 4)
    assert not pinned.contrast_unresolved


def reacquired_without_contrast_tags(case: str, vendor: str, tmp_path):
    """A shared real case re-acquired as DICOM, with its names blanked and every contrast attribute removed: the
    session, and the series numbers of its real t1n and t1c."""
    dicom = reacquire_session(find_case_images(SHARED_DATA / "nifti" / case), tmp_path / "session", seed=7,
                              vendor=vendor)
    summary = json.loads((tmp_path / "session" / "ground_truth" / "summary.json").read_text())
    stripped = blank_names(dicom, tmp_path / "stripped", remove=CONTRAST_ATTRIBUTES)
    numbers = summary["series"]["t1n"]["series_number"], summary["series"]["t1c"]["series_number"]
    return ingest(stripped, tmp_path / "work"), numbers


@pytest.mark.slow
@needs_shared_data
def test_real_enhancing_glioma_reacquired_without_contrast_tags_or_names(tmp_path):
    session, (t1n, t1c) = reacquired_without_contrast_tags("brats_space_BraTS-GLI-00001-000", "SIEMENS", tmp_path)
    ident = classify_session(session)
    number = {d.series_number: d for d in ident.decisions}
    assert (number[t1n].role, number[t1c].role) == ("t1n", "t1c")
    assert ident.chosen["t1c"] == number[t1c].key and ident.chosen["t1n"] == number[t1n].key
    assert number[t1c].contrast_decided_by == "images" and not number[t1c].names_available
    assert ident.contrast_confidence >= contrast.MIN_CONFIDENCE
    assert ident.missing == [] and not ident.contrast_unresolved


@pytest.mark.slow
@needs_shared_data
def test_real_non_enhancing_glioma_without_contrast_tags_stops_and_asks(tmp_path):
    # A lower-grade glioma that does not enhance: only vessels and sinuses brighten, too little to be sure. The
    # images lean the right way, but the run stops and asks rather than guess.
    session, (t1n, t1c) = reacquired_without_contrast_tags("TCGA-DU-7294", "GE MEDICAL SYSTEMS", tmp_path)
    with pytest.raises(MissingSequenceError) as err:
        identify(session, PipelineConfig())
    assert "Cannot tell which T1 is post-contrast" in str(err.value) and "--role t1c=SERIES" in err.value.hint
    ident = classify_session(session)
    assert 0.5 < ident.contrast_confidence < contrast.MIN_CONFIDENCE
    assert f"best: series {t1c} (no description) against series {t1n} (no description)" in ident.contrast_unresolved
