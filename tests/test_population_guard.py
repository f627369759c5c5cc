"""The population guard: a child's study segmented by a model bundle not trained on children says so on the
report's first page, in measurements.json, in the gear's QC result and on the console (pipeline/population.py).
The age comes from the configuration, else PatientAge, else PatientBirthDate and StudyDate. Model stages are
faked (tests/factories.py), so a run takes seconds."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pypdf import PdfReader

from pedseg.gear.metadata import GEAR_NAME, build_metadata, run_summary, write_metadata
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.population import NOT_VALIDATED, TRAINED_ON, population_warning
from pedseg.pipeline.study import age_from_dates, header_age_years, patient_age_years
from pedseg.pipeline.types import PopulationWarning
from pedseg.reporting.pdf import POPULATION_HEADING
from pedseg.reporting.tables import measurements_document
from pedseg.runner import RunResult, run_pipeline

from factories import dicom_dataset, fake_bundle, fake_model_stages, tiny_atlas_case, write_dicom
from hostile_support import NUMBERS, STUDY, phi_found, write_role

CHILD_BIRTH_DATE = "20170101"  # 7 years before STUDY's study date (20240611)
ADULT_MESSAGE = ("Model trained on adult patients, not children; this patient is 7 years old. Volumes and labels "
                 "have not been validated for children.")


# ------------------------------------------------------------------------------------------ the decision


@pytest.mark.parametrize("population", ["adult", "synthetic", "unspecified"])
@pytest.mark.parametrize("age", [0.0, 0.4, 7.0, 17.9])
def test_a_child_and_a_bundle_not_trained_on_children_warn(population, age):
    warning = population_warning(population, age)
    assert isinstance(warning, PopulationWarning)
    assert warning.bundle_population == population
    assert warning.message.startswith(TRAINED_ON[population] + "; this patient is ")
    assert warning.message.endswith(NOT_VALIDATED)


@pytest.mark.parametrize("population", ["adult", "synthetic", "unspecified", "pediatric", "adult-and-pediatric"])
@pytest.mark.parametrize("age", [18.0, 18.01, 45.0, None, float("nan"), -1.0])
def test_adults_and_unknown_ages_never_warn(population, age):
    assert population_warning(population, age) is None


@pytest.mark.parametrize("population", ["pediatric", "adult-and-pediatric"])
@pytest.mark.parametrize("age", [0.0, 7.0, 17.9])
def test_a_bundle_trained_on_children_never_warns(population, age):
    assert population_warning(population, age) is None


def test_the_messages_word_the_population_and_the_age():
    assert population_warning("adult", 7.0).message == ADULT_MESSAGE
    assert population_warning("synthetic", 7.44).message == (
        "Model trained on synthetic phantoms, not patients; this patient is 7 years old. Volumes and labels have "
        "not been validated for children.")
    assert population_warning("unspecified", 17.9).message == (
        "The model bundle does not say who its model was trained on; this patient is 17 years old. Volumes and "
        "labels have not been validated for children.")
    assert population_warning("adult", 17.9).as_dict() == {
        "patient_age_years": 17.0, "bundle_population": "adult",
        "message": "Model trained on adult patients, not children; this patient is 17 years old. Volumes and labels "
                   "have not been validated for children."}


@pytest.mark.parametrize(("age", "stated", "text"), [
    (2.0, 2.0, "2 years old"), (1.5, 1.5, "18 months old"), (7 / 12, 0.58, "7 months old"),
    (1 / 12, 0.08, "1 month old"), (0.01, 0.0, "less than a month old")])
def test_young_children_are_aged_in_months_and_no_finer(age, stated, text):
    warning = population_warning("adult", age)
    assert warning.patient_age_years == stated
    assert f"this patient is {text}." in warning.message


# ----------------------------------------------------------------------------------------------- the age


def test_patient_age_comes_first():
    assert header_age_years(dicom_dataset(PatientAge="008Y", PatientBirthDate="20000101", StudyDate="20240101")) == 8.0
    assert patient_age_years("018M") == 1.5
    assert patient_age_years("008X") is None  # not a DICOM AS unit


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # pydicom, on purpose
@pytest.mark.parametrize("patient_age", [None, "", "8 yrs", "08Y", "008X"])
def test_without_a_usable_patient_age_the_birth_and_study_dates_give_it(patient_age, tmp_path):
    attributes = {"PatientBirthDate": "20170315", "StudyDate": "20240314"}
    if patient_age is not None:
        attributes["PatientAge"] = patient_age
    ds = pydicom.dcmread(write_dicom(dicom_dataset(**attributes), tmp_path / "image.dcm"))
    age = header_age_years(ds)
    assert age == pytest.approx(6.998, abs=1e-3)
    assert population_warning("adult", age).message.startswith(
        "Model trained on adult patients, not children; this patient is 6 years old.")


def test_the_session_study_date_stands_in_for_a_header_without_one():
    ds = dicom_dataset(PatientBirthDate="20170101")
    assert header_age_years(ds) is None
    assert header_age_years(ds, study_date="20240101") == pytest.approx(7.0, abs=1e-2)


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # pydicom, on purpose
@pytest.mark.parametrize(("birth", "study"), [("", "20240101"), ("20170101", ""), ("2017-01-01", "20240101"),
                                              ("20170230", "20240101"), ("20250101", "20240101"), ("ABCDEFGH", "2024")])
def test_unusable_dates_give_no_age(birth, study):
    assert age_from_dates(birth, study) is None
    assert header_age_years(dicom_dataset(PatientBirthDate=birth, StudyDate=study)) is None


# ---------------------------------------------------------------------------------- a run, end to end


def child_session(folder: Path) -> Path:
    """The sentinel session of a 7-year-old whose headers have no PatientAge: the age comes from the dates."""
    study = replace(STUDY, age="", birth_date=CHILD_BIRTH_DATE)
    for role in NUMBERS:
        write_role(folder, role, study=study)
    return folder


def bundle_of(root: Path, population: str) -> Path:
    fake_bundle(root)
    spec = json.loads((root / "bundle.json").read_text())
    (root / "bundle.json").write_text(json.dumps({**spec, "population": population}))
    return root


def run(tmp_path: Path, monkeypatch, population: str, **config) -> RunResult:
    labels = np.zeros((16, 20, 24), np.uint8)
    labels[4:12, 5:15, 6:18] = 4
    labels[6:10, 7:13, 8:16] = 1
    fake_model_stages(monkeypatch, *tiny_atlas_case(tmp_path / "atlas", labels))
    return run_pipeline(child_session(tmp_path / "dicom"), tmp_path / "out",
                        PipelineConfig(bundle=bundle_of(tmp_path / "bundle", population), **config))


@pytest.fixture(scope="module")
def child_run(tmp_path_factory) -> RunResult:
    """A 7-year-old (by birth and study date) segmented with an adult bundle."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run(tmp_path_factory.mktemp("child"), monkeypatch, "adult")


def test_the_run_result_carries_the_warning(child_run):
    assert child_run.population_warning == PopulationWarning(7.0, "adult", ADULT_MESSAGE)


def test_measurements_json_carries_the_warning(child_run):
    document = json.loads(child_run.outputs["measurements_json"].read_text())
    assert document["schema_version"] == "1.1"
    assert document["population_warning"] == {"patient_age_years": 7.0, "bundle_population": "adult",
                                              "message": ADULT_MESSAGE}
    assert CHILD_BIRTH_DATE not in json.dumps(document)


def test_the_report_says_it_on_its_first_page(child_run):
    first_page = " ".join(PdfReader(child_run.outputs["pdf"]).pages[0].extract_text().split())
    assert f"{POPULATION_HEADING}. {ADULT_MESSAGE}" in first_page
    assert first_page.index(ADULT_MESSAGE) < first_page.index("Tumour volumes")  # near the top


def test_the_gear_qc_result_carries_the_warning(child_run, tmp_path):
    summary = run_summary(child_run)
    metadata = build_metadata(summary, child_run.outputs, "analysis", "job-1")
    write_metadata(metadata, tmp_path)  # the engine's schema accepts it
    assert metadata["analysis"]["info"]["pedseg"]["population_warning"]["message"] == ADULT_MESSAGE
    (report,) = [f for f in metadata["analysis"]["files"] if f["name"] == "report.pdf"]
    qc = report["info"]["qc"][GEAR_NAME]["segmentation"]
    assert qc["state"] == "FAIL"
    assert ADULT_MESSAGE in qc["flags"]
    assert qc["population_warning"] == {"patient_age_years": 7.0, "bundle_population": "adult",
                                        "message": ADULT_MESSAGE}


def test_the_console_says_it_once_as_a_warning_without_identifiers(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.DEBUG):
        run(tmp_path, monkeypatch, "synthetic")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "this patient is" in r.getMessage()]
    assert [(r.name, r.getMessage()) for r in warnings] == [
        ("pedseg.runner", "population: Model trained on synthetic phantoms, not patients; this patient is 7 years "
                          "old. Volumes and labels have not been validated for children.")]
    assert not phi_found(caplog.text)
    assert CHILD_BIRTH_DATE not in caplog.text


def test_the_configured_age_wins_and_an_adult_gets_no_warning(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        result = run(tmp_path, monkeypatch, "adult", patient_age_years=30.0)
    assert result.population_warning is None
    assert "this patient is" not in caplog.text
    assert json.loads(result.outputs["measurements_json"].read_text())["population_warning"] is None
    assert POPULATION_HEADING not in PdfReader(result.outputs["pdf"]).pages[0].extract_text()
    files = build_metadata(run_summary(result), result.outputs, "analysis")["analysis"]["files"]
    (report,) = [f for f in files if f["name"] == "report.pdf"]
    assert report["info"]["qc"][GEAR_NAME]["segmentation"]["population_warning"] is None


def test_measurements_json_always_has_the_key(child_run):
    document = measurements_document(child_run.measurements, context={})
    assert document["population_warning"] is None
