"""PHI hygiene: a session whose headers carry sentinel PatientName, PatientID, birth date, AccessionNumber and
InstitutionName; no log line (debug included), console output or text/JSON/CSV file may show any of them.
(Every failing case in test_hostile_inputs.py checks its message, log and error.json the same way.)"""
from __future__ import annotations

import gzip
import json
import logging

import pydicom
import pytest
from pypdf import PdfReader

from pedseg.cli.main import main
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.identify import classify_session, session_to_json
from pedseg.pipeline.ingest import ingest

from factories import fake_bundle, fake_model_stages, tiny_atlas_case, tiny_tumour_labels
from hostile_support import SENTINELS, phi_found, text_files, write_session


def test_ingest_identify_and_conversion_never_show_patient_identifiers(tmp_path, capsys, caplog):
    dicom = write_session(tmp_path / "dicom")
    assert pydicom.dcmread(next((dicom / "t1c").iterdir())).PatientName == SENTINELS["PatientName"]
    with caplog.at_level(logging.DEBUG):
        session = ingest(dicom, tmp_path / "work")
        identification = classify_session(session)
        nifti = convert_series(session.by_uid(identification.chosen["t1c"]), tmp_path / "nifti")
        assert main(["identify", str(dicom), "--json"]) == 0
        assert main(["identify", str(dicom)]) == 0
    console = capsys.readouterr()
    assert identification.missing == []
    assert "t1c" in console.out
    produced = {**text_files(tmp_path / "nifti"), tmp_path / "identify.json": session_to_json(identification)}
    assert any(p.suffix == ".json" for p in produced)  # dcm2niix's sidecar is among them
    # The NIfTI header's free-text fields (descrip, intent name) come from dcm2niix as well.
    produced[nifti] = gzip.decompress(nifti.read_bytes())[:1024].decode("latin-1")
    for where, text in {"log": caplog.text, "console": console.out + console.err, **produced}.items():
        assert not phi_found(text), where


def test_a_run_interrupted_leaves_nothing_and_the_next_clears_a_killed_runs_leftover(tmp_path, monkeypatch,
                                                                                     caplog):
    """A run interrupted once the DICOM is unpacked, converted and identified leaves nothing; a leftover of a
    killed run is cleared by the next run, which writes every output, and no file, log or report text shows an
    identifier. The model stages of the second run are stand-ins (factories.fake_model_stages): the whole run
    with the demo bundle, on sentinel headers, is tests/test_end_to_end.py."""
    import pedseg.runner as runner

    dicom = write_session(tmp_path / "dicom")
    out, config = tmp_path / "out", PipelineConfig(bundle=fake_bundle(tmp_path / "bundle"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch, caplog.at_level(logging.DEBUG):
        patch.setattr(runner, "preprocess", interrupt)
        with pytest.raises(KeyboardInterrupt):
            runner.run_pipeline(dicom, out, config)
    assert list(out.iterdir()) == []
    (out / ".pedseg-staging-killed").mkdir()  # what SIGKILL would leave
    (out / ".pedseg-staging-killed" / "report.pdf").write_bytes(b"%PDF-1.4 half")

    images, _ = tiny_atlas_case(tmp_path / "atlas")
    fake_model_stages(monkeypatch, images, tiny_tumour_labels(tmp_path / "labels.nii.gz"))
    with caplog.at_level(logging.DEBUG):
        result = runner.run_pipeline(dicom, out, config)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(out)) for p in result.outputs.values()) == names
    assert not any(name.startswith(".") or ".partial" in name or name == "error.json" for name in names)
    texts = {**text_files(out), "log": caplog.text}
    texts["report.pdf"] = "".join(page.extract_text() for page in PdfReader(out / "report.pdf").pages)
    for where, text in texts.items():
        assert not phi_found(text), where
    assert json.loads((out / "measurements.json").read_text())["regions"]["WT"]["volume_ml"] > 0
