"""Every case of the hostile-input catalogue (tests/hostile/cases_*.py) through the stage its decorator names.

A refusal must carry the exit code of its error class, every phrase the case lists, a hint, and no patient
identifier; through `pedseg run` the console and error.json say the same, and the output folder holds error.json
and nothing else. An accepted input must give the series it holds, every file inside the input or the work
folder, no archive left packed in the work folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import pedseg.pipeline.convert as convert_module
from pedseg.cli.main import main
from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.ingest import ingest

import cases_archives  # noqa: F401  (each module registers its cases)
import cases_failures  # noqa: F401
import cases_geometry  # noqa: F401
import cases_session  # noqa: F401
from catalogue import CATALOGUE, Case
from factories import fake_bundle
from hostile_support import phi_found, write_session

# Where the archive entries that climb out or give absolute paths would land.
ESCAPES = (Path("/abs.dcm"), Path("/tmp/pedseg-escape.dcm"))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return write_session(tmp_path_factory.mktemp("template") / "dicom")


@pytest.fixture(scope="module")
def template_series(template, tmp_path_factory) -> tuple[int, ...]:
    return _numbers(ingest(template, tmp_path_factory.mktemp("work")))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def _numbers(session) -> tuple[int, ...]:
    return tuple(sorted({s.header.series_number for s in session.series}))


def _inputs(built) -> list[Path]:
    return [built] if isinstance(built, Path) else list(built)


def _refused_through_the_cli(case: Case, inputs, tmp: Path, bundle: Path, capsys, caplog) -> None:
    out = tmp / "out"
    own_bundle = tmp / "bundle"
    with caplog.at_level(logging.DEBUG):
        code = main(["run", *map(str, inputs), str(out), "--bundle", str(own_bundle if own_bundle.exists() else bundle),
                     "--device", "cpu"])
    stderr, error = capsys.readouterr().err, case.error
    assert code == error.exit_code, stderr
    document = json.loads((out / "error.json").read_text(encoding="utf-8"))
    assert (document["error"], document["exit_code"]) == (error.kind, error.exit_code)
    for phrase in case.says:
        assert phrase in document["message"]
    assert document["hint"] and case.hint in document["hint"], "every message says what to do"
    assert f"error ({error.kind}): {document['message']}" in stderr  # the console says the same
    assert sorted(p.name for p in out.iterdir()) == ["error.json"]  # nothing half-written, no leftovers
    assert not phi_found(stderr + caplog.text + json.dumps(document, ensure_ascii=False))
    assert "Traceback" not in stderr + caplog.text


def _refused_by_a_stage(case: Case, inputs, tmp: Path, mp) -> None:
    with pytest.raises(case.error) as raised:
        session = ingest(inputs, tmp / "work")
        if case.stage == "convert":
            def refuse(*_args, **_kwargs):
                raise AssertionError("dcm2niix ran on a series the checks should have refused")
            mp.setattr(convert_module, "_run_dcm2niix", refuse)
            convert_series(session.series[0], tmp / "nifti")
    error = raised.value
    assert error.exit_code == case.error.exit_code
    for phrase in case.says:
        assert phrase in error.message
    assert error.hint and case.hint in error.hint
    assert not phi_found(str(error) + error.hint)
    assert not (tmp / "nifti").exists() or not list((tmp / "nifti").iterdir())


@pytest.mark.parametrize("name", [pytest.param(name, marks=case.marks) for name, case in CATALOGUE.items()])
def test_hostile_input(name, tmp_path, template, template_series, bundle, monkeypatch, capsys, caplog):
    monkeypatch.delenv("PEDSEG_DB", raising=False)
    case = CATALOGUE[name]
    inputs = _inputs(case.build(tmp_path, template, monkeypatch))
    if case.error is None:
        session = ingest(inputs, tmp_path / "work")
        assert _numbers(session) == (case.series or template_series)
        assert all(f.is_file() and f.is_relative_to(tmp_path) for s in session.series for f in s.files)
        assert not list((tmp_path / "work").rglob("*.zip"))  # inner archives are deleted once unpacked
    elif case.stage == "run":
        _refused_through_the_cli(case, inputs, tmp_path, bundle, capsys, caplog)
    else:
        _refused_by_a_stage(case, inputs, tmp_path, monkeypatch)
    assert not [p for p in ESCAPES + (tmp_path.parent / "escape.dcm",) if p.exists()]  # nothing written outside
