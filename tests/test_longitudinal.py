"""Longitudinal tracking: change computation, the SQLite and Flywheel stores, `pedseg history`, the PDF trend page
and the runner hook. One synthetic child (phantom seed 42) at three dates with tumour growth 1.0, 0.5, 0.8:
the tumour shrinks, then grows back from its nadir.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import multiprocessing
import shutil
import sqlite3
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pedseg.cli.main import main
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import InputError
from pedseg.pipeline.labels import REGIONS
from pedseg.pipeline.longitudinal import (
    REGIONS_ACROSS_CONVENTIONS,
    BundleId,
    ResponseThresholds,
    TimePoint,
    compare,
    subject_key,
    tracking_uids,
    trajectory,
)
from pedseg.pipeline.measure import measure
from pedseg.pipeline.types import Identification, SeriesDecision, StudyContext
from pedseg.reporting.longitudinal import HISTORY_COLUMNS, history_rows, history_table
from pedseg.reporting.pdf import write_report_pdf
from pedseg.reporting.tables import write_measurements_json
from pedseg.synth.phantom import make_phantom
from pedseg.tracking.flywheel import MEASUREMENTS_FILE, NAMESPACE, FlywheelStore, store_for_session
from pedseg.tracking.records import time_point
from pedseg.tracking.sqlite import MIGRATIONS, SQLiteStore

from factories import (
    FakeAnalysis,
    FakeClient,
    FakeSession,
    dicom_dataset,
    fake_bundle,
    fake_model_stages,
    passing_qc,
    write_dicom,
)

PATIENT_ID = "SYN000042"
KEY = subject_key(PATIENT_ID)
GROWTH = (1.0, 0.5, 0.8)
DATES = ("20260105", "20260406", "20260707")
UIDS = tuple(f"1.2.826.0.1.3680043.8.498.7{i}" for i in range(3))
BUNDLE = {"name": "pedseg-demo", "version": "0.1.0", "sha256": "ab" * 32, "label_convention": "2024"}
OTHER_BUNDLE = {"name": "pedseg-large", "version": "2.0.0", "sha256": "cd" * 32, "label_convention": "2024"}


@pytest.fixture(scope="module")
def phantoms():
    """The phantom's ground-truth labels at each growth factor, measured as the pipeline measures."""
    out = []
    for growth in GROWTH:
        phantom = make_phantom(42, growth=growth)
        out.append((phantom, measure(phantom.labels, None, qc_flags=[])))
    return out


@pytest.fixture(scope="module")
def points(phantoms):
    return [time_point(m, subject_key=KEY, study_uid=uid, study_date=date, bundle=BUNDLE)
            for (_, m), uid, date in zip(phantoms, UIDS, DATES)]


def volumes_tp(uid: str, date: str, volumes: dict[str, float], bundle: dict = BUNDLE, key: str = KEY) -> TimePoint:
    """A time point with given volumes (regions not given are 0)."""
    full = {r: float(volumes.get(r, 0.0)) for r in REGIONS}
    return TimePoint(key, uid, date, BundleId(**bundle), full, {"NCR": full["NET"] + full["CC"], "ED": full["ED"],
                                                                 "ET": full["ET"]}, "TC", 100.0)


# --------------------------------------------------------------------------------------- change computation


def test_three_time_points_give_baseline_nadir_changes_and_flags(points):
    first, second, third = trajectory(reversed(points))  # the store may return them in any order
    assert first.current is points[0]
    assert not first.priors
    assert not first.changes
    assert [tp.study_uid for tp in third.priors] == list(UIDS[:2])
    wt = [tp.volumes_ml["WT"] for tp in points]
    assert wt[1] < 0.6 * wt[0]
    assert wt[1] < wt[2] < wt[0]  # shrinks, then grows back
    for region in REGIONS:
        v = [tp.volumes_ml[region] for tp in points]
        change = third.changes[region]
        nadir = min(v[:2])
        assert (change.baseline_ml, change.nadir_ml, change.previous_ml) == (v[0], nadir, v[1])
        assert change.nadir_study_uid == UIDS[v[:2].index(nadir)]
        assert change.vs_baseline.ml == pytest.approx(v[2] - v[0])
        assert change.vs_nadir.pct == pytest.approx(100 * (v[2] - nadir) / nadir)
        assert change.vs_previous.pct == pytest.approx(100 * (v[2] - v[1]) / v[1])
        expected = "PD" if change.vs_nadir.pct >= 40 else "PR" if change.vs_baseline.pct <= -65 else "SD"
        assert change.response == expected, region
    assert second.changes["WT"].vs_baseline.pct == pytest.approx(-50, abs=6)
    assert second.changes["WT"].response == "SD"  # −50 % volume is not yet a partial response (−65 %)
    assert third.changes["WT"].nadir_study_uid == UIDS[1]
    assert third.changes["WT"].vs_nadir.pct > 40
    assert third.changes["WT"].response == "PD"


@pytest.mark.parametrize("volumes, response", [
    ((10.0, 7.0, 9.8), "PD"),  # +40 % vs nadir 7.0
    ((10.0, 7.0, 9.79), "SD"),
    ((10.0, 8.0, 3.5), "PR"),  # −65 % vs baseline
    ((10.0, 8.0, 3.51), "SD"),
    ((10.0, 2.0, 0.05), "CR"),  # at most absent_ml left
    ((0.0, 0.0, 0.0), "NE"),
    ((5.0, 0.0, 0.3), "PD"),  # back after none
])
def test_response_categories_at_the_thresholds(volumes, response):
    tps = [volumes_tp(uid, date, {"WT": v}) for uid, date, v in zip(UIDS, DATES, volumes)]
    assert compare(tps[2], tps).changes["WT"].response == response


def test_thresholds_are_configurable():
    tps = [volumes_tp(uid, date, {"WT": v}) for uid, date, v in zip(UIDS, DATES, (10.0, 7.0, 8.5))]
    assert compare(tps[2], tps).changes["WT"].response == "SD"
    assert compare(tps[2], tps, ResponseThresholds(progression_pct=20.0)).changes["WT"].response == "PD"


@pytest.mark.parametrize("other", [OTHER_BUNDLE, {**BUNDLE, "sha256": "ef" * 32}])
def test_a_run_with_a_different_bundle_is_not_compared_and_says_why(other):
    earlier = [volumes_tp(UIDS[0], DATES[0], {"WT": 10.0}, bundle=other)]
    current = volumes_tp(UIDS[1], DATES[1], {"WT": 20.0})
    result = compare(current, earlier)
    assert not result.priors
    assert not result.changes
    (note,) = result.notes
    assert "1 earlier time point(s) not compared" in note
    assert "--compare-across-bundles" in note
    assert BundleId(**other).describe() in note
    assert BundleId(**BUNDLE).describe() in note
    forced = compare(current, earlier, across_bundles=True)
    assert forced.changes["WT"].response == "PD"
    assert "Compared across bundles as asked" in forced.notes[0]


def test_across_label_conventions_only_regions_both_can_express_are_compared():
    old = volumes_tp(UIDS[0], DATES[0], {"WT": 10.0, "NET": 3.0}, bundle={**OTHER_BUNDLE, "label_convention": "2023"})
    current = volumes_tp(UIDS[1], DATES[1], {"WT": 11.0, "NET": 1.0})
    assert not compare(current, [old]).priors
    assert tuple(compare(current, [old], across_bundles=True).changes) == REGIONS_ACROSS_CONVENTIONS


def test_only_earlier_dated_studies_of_the_subject_are_priors():
    current = volumes_tp(UIDS[1], DATES[1], {"WT": 10.0})
    others = [volumes_tp(UIDS[2], DATES[2], {"WT": 1.0}),  # later
              volumes_tp("1.2.9", "", {"WT": 1.0}),  # undated
              volumes_tp(UIDS[0], DATES[0], {"WT": 1.0}, key="someone else"),
              dataclasses.replace(current, study_date=DATES[0])]  # the same study, recorded with another date
    assert not compare(current, [current, *others]).priors
    undated = compare(dataclasses.replace(current, study_date=""), [volumes_tp(UIDS[0], DATES[0], {"WT": 1.0})])
    assert not undated.priors
    assert "no StudyDate" in undated.notes[0]


def test_tracking_uids_are_stable_per_subject_and_region():
    uids = tracking_uids(KEY)
    assert uids == tracking_uids(KEY)
    assert set(uids) == set(REGIONS)
    assert len(set(uids.values())) == len(REGIONS)
    assert uids["WT"] != tracking_uids(subject_key(PATIENT_ID, "site salt"))["WT"]
    assert all(pydicom.uid.UID(uid).is_valid for uid in uids.values())


# ------------------------------------------------------------------------------------------------- SQLite


def test_sqlite_round_trip_replaces_a_rerun_and_keeps_no_patient_id(tmp_path, points):
    store = SQLiteStore(tmp_path / "m.db")
    for tp in points:
        store.record(tp)
    assert store.history(KEY) == list(points)
    rerun = dataclasses.replace(points[1], qc_flags=("rerun",))
    store.record(rerun)  # same study, same bundle: replaces
    store.record(dataclasses.replace(points[1], bundle=BundleId(**OTHER_BUNDLE)))  # another bundle: kept beside
    history = store.history(KEY)
    assert len(history) == 4
    assert rerun in history
    assert store.history("nobody") == []
    assert PATIENT_ID.encode() not in (tmp_path / "m.db").read_bytes()
    with sqlite3.connect(tmp_path / "m.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM volumes").fetchone()[0] == 4 * (6 + 3)


def test_sqlite_refuses_a_newer_schema_and_a_foreign_file(tmp_path):
    SQLiteStore(tmp_path / "m.db")
    with sqlite3.connect(tmp_path / "m.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(InputError, match="schema version 99"):
        SQLiteStore(tmp_path / "m.db")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(InputError, match="cannot be opened"):
        SQLiteStore(tmp_path / "junk.db")


def _write_many(db: str, writer: int, barrier, count: int) -> None:
    barrier.wait()  # both open (and migrate) the new file at the same moment, then write interleaved
    store = SQLiteStore(db)
    for i in range(count):
        store.record(volumes_tp(f"1.2.3.{writer}.{i}", f"2026{writer + 1:02d}{i + 1:02d}", {"WT": i + writer / 10}))


def test_two_concurrent_writers_lose_nothing(tmp_path):
    db, count = str(tmp_path / "shared.db"), 25
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_write_many, args=(db, w, barrier, count)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
    assert [p.exitcode for p in workers] == [0, 0]
    history = SQLiteStore(db).history(KEY)
    assert sorted(tp.study_uid for tp in history) == sorted(f"1.2.3.{w}.{i}" for w in range(2) for i in range(count))
    assert all(len(tp.volumes_ml) == 6 and len(tp.volumes_2023_ml) == 3 for tp in history)


# ---------------------------------------------------------------------------------------------- pedseg history


@pytest.fixture
def db(tmp_path, points):
    store = SQLiteStore(tmp_path / "m.db")
    for tp in points:
        store.record(tp)
    return tmp_path / "m.db"


def test_history_prints_the_table(db, points, capsys):
    assert main(["history", PATIENT_ID, "--db", str(db)]) == 0  # by PatientID, hashed as run hashes it
    out = capsys.readouterr().out
    assert out.startswith("date")
    assert PATIENT_ID not in out
    assert KEY not in out
    for date in ("2026-01-05", "2026-04-06", "2026-07-07"):
        assert date in out
    blocks = out.split("\n\n")  # header and first time point, then one block per later time point
    assert len(blocks) == 3
    third_wt = next(line for line in blocks[2].splitlines() if line.split()[:1] == ["WT"])
    assert f"{points[2].volumes_ml['WT']:.3f}" in third_wt
    assert third_wt.split()[-1] == "PD"
    assert main(["history", KEY, "--db", str(db)]) == 0
    assert capsys.readouterr().out == out  # by key


def test_history_csv_to_stdout_and_to_a_file(db, points, capsys, tmp_path):
    assert main(["history", PATIENT_ID, "--db", str(db), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert tuple(rows[0]) == HISTORY_COLUMNS
    assert len(rows) == 3 * len(REGIONS)
    wt = [r for r in rows if r["region"] == "WT"]
    assert [r["study_date"] for r in wt] == list(DATES)
    assert [r["response"] for r in wt] == ["", "SD", "PD"]
    assert float(wt[2]["nadir_ml"]) == points[1].volumes_ml["WT"]
    change = points[2].volumes_ml["WT"] - points[0].volumes_ml["WT"]
    assert float(wt[2]["change_vs_baseline_ml"]) == pytest.approx(change, abs=1e-3)
    assert main(["history", PATIENT_ID, "--db", str(db), "--csv", str(tmp_path / "h.csv")]) == 0
    assert list(csv.DictReader((tmp_path / "h.csv").open())) == rows


def test_history_of_an_unknown_subject_or_store_is_a_clear_error(db, tmp_path, capsys):
    assert main(["history", "nobody", "--db", str(db)]) == InputError.exit_code
    assert main(["history", PATIENT_ID, "--db", str(tmp_path / "missing.db")]) == InputError.exit_code
    assert not (tmp_path / "missing.db").exists()
    assert "No time points are recorded" in capsys.readouterr().err


def test_run_options_reach_the_pipeline(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("pedseg.runner.run_pipeline",
                        lambda input_path, outdir, config, store=None: calls.append((config, store)) or
                        SimpleNamespace(measurements=SimpleNamespace(regions={"WT": SimpleNamespace(volume_ml=1.0)}),
                                        outdir=outdir))
    assert main(["run", "in", str(tmp_path / "out"), "--db", str(tmp_path / "m.db"), "--subject-key", "child-7",
                 "--compare-across-bundles"]) == 0
    config, store = calls[0]
    assert (config.subject_key, config.compare_across_bundles) == ("child-7", True)
    assert isinstance(store, SQLiteStore)
    assert store.path == tmp_path / "m.db"
    monkeypatch.delenv("PEDSEG_DB", raising=False)
    assert main(["run", "in", str(tmp_path / "out")]) == 0
    assert calls[1][1] is None  # no store: not tracked


# ------------------------------------------------------------------------------------------- trend page


def longitudinal_page_png(pdf: Path, out: Path) -> Path:
    """Render the report page titled "Longitudinal change" with poppler's pdftoppm."""
    pages = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                           check=True).stdout.split("\f")
    number = next(i for i, text in enumerate(pages, 1) if "Longitudinal change" in text)
    subprocess.run(["pdftoppm", "-f", str(number), "-l", str(number), "-r", "80", "-png", str(pdf), str(out)],
                   check=True)
    return next(out.parent.glob(f"{out.name}-*.png"))


def tracked_report(phantoms, timeline, folder: Path) -> Path:
    """The PDF report of the third time point with `timeline` as its longitudinal comparison."""
    phantom, measurements = phantoms[2]
    folder.mkdir(parents=True, exist_ok=True)
    images = {"t1c": folder / "t1c.nii.gz"}
    sitk.WriteImage(phantom.images["t1c"], str(images["t1c"]))
    return write_report_pdf(folder / "report.pdf", images=images, labels=phantom.labels, measurements=measurements,
                            identification=Identification([], {}, []), qc=passing_qc(), provenance={},
                            context=StudyContext("subject-x", DATES[2], None, KEY), fast_mode=False,
                            longitudinal=timeline)


def pdf_pages(pdf: Path) -> list[str]:
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout.split("\f")


@pytest.mark.skipif(not shutil.which("pdftoppm") or not shutil.which("pdftotext"), reason="needs poppler-utils")
def test_trend_page_renders(phantoms, points, tmp_path):
    from PIL import Image

    pdf = tracked_report(phantoms, compare(points[2], points), tmp_path)
    text = "".join(pdf_pages(pdf))
    assert "Compared with 2 earlier time point(s)" in text
    assert "baseline 2026-01-05" in text
    assert "Response (whole tumour, volumetric): PD" in " ".join(pdf_pages(pdf)[0].split())  # on page 1
    pixels = np.asarray(Image.open(longitudinal_page_png(pdf, tmp_path / "page")).convert("RGB")).astype(int)
    assert (pixels.min(axis=2) < 200).mean() > 0.03  # not a blank page
    near = lambda rgb: (np.abs(pixels - rgb).sum(axis=2) < 60).sum()  # noqa: E731
    assert near((0xc0, 0x39, 0x2b)) > 20  # this study drawn in the PD colour
    assert near((0x1f, 0x5f, 0xbf)) > 20  # baseline marker
    assert near((0x2e, 0x8b, 0x57)) > 20  # nadir marker


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="needs poppler-utils")
def test_first_time_point_and_refused_comparison_get_a_note_not_a_page(phantoms, points, tmp_path):
    alone = pdf_pages(tracked_report(phantoms, compare(points[2], []), tmp_path / "alone"))
    other = [dataclasses.replace(tp, bundle=BundleId(**OTHER_BUNDLE)) for tp in points[:2]]
    refused = pdf_pages(tracked_report(phantoms, compare(points[2], other), tmp_path / "refused"))
    for pages in (alone, refused):
        (section,) = [page for page in pages if "Longitudinal change" in page]
        assert "this study is the baseline for later runs" in section
        assert "Compared with" not in section  # no trend page, no change table
    assert "2 earlier time point(s) not compared" in "".join(refused)


# ------------------------------------------------------------------------------------------- Flywheel


@pytest.fixture
def flywheel_subject(phantoms, tmp_path):
    """Session 1 analysed before the store existed (only its analysis' measurements file), session 2 recorded in
    info, session 3 the one being analysed now."""
    doc = tmp_path / "measurements.json"
    write_measurements_json(phantoms[0][1], doc, context={"study_instance_uid": UIDS[0], "study_date": DATES[0],
                                                          "bundle": BUNDLE})
    subject = "65f0c0ffee00000000000042"
    first = FakeSession("s1", subject, analyses=[
        FakeAnalysis("a1", files={MEASUREMENTS_FILE: doc.read_bytes(), "x.pdf": b""}),
        FakeAnalysis("a2", files={"other.csv": b""})])
    second = FakeSession("s2", subject, info={"keep": 1, NAMESPACE: {"note": "kept"}})
    third = FakeSession("s3", subject)
    return FakeClient([first, second, third]), subject


def test_flywheel_store_with_a_fake_client(flywheel_subject, phantoms, tmp_path):
    client, subject = flywheel_subject
    fw_points = [time_point(m, subject_key=subject, study_uid=uid, study_date=date, bundle=BUNDLE)
                 for (_, m), uid, date in zip(phantoms, UIDS, DATES)]
    FlywheelStore(client, "s2").record(fw_points[1])
    FlywheelStore(client, "s2").record(fw_points[1])  # a re-run replaces its entry
    assert client.get_session("s2").info["keep"] == 1
    assert client.get_session("s2").info[NAMESPACE]["note"] == "kept"
    assert len(client.get_session("s2").info[NAMESPACE]["timepoints"]) == 1
    store, key = store_for_session(client, "s3")
    assert key == subject
    timeline = compare(fw_points[2], store.history(key))
    assert [tp.study_uid for tp in timeline.priors] == list(UIDS[:2])
    assert timeline.priors[0] == fw_points[0]  # read back from the earlier analysis' measurements file
    assert timeline.changes["WT"].nadir_study_uid == UIDS[1]
    assert timeline.changes["WT"].response == "PD"
    store.record(timeline.current)
    history = FlywheelStore(client).history(subject)
    assert sorted(tp.study_uid for tp in history) == list(UIDS)
    sqlite = SQLiteStore(tmp_path / "m.db")  # the same subject's table through either back end
    for tp in fw_points:
        sqlite.record(tp)
    from_sqlite = history_table(history_rows(trajectory(sqlite.history(subject))))
    assert history_table(history_rows(trajectory(history))) == from_sqlite


def test_flywheel_store_reads_an_analysis_only_once_and_skips_malformed_info(flywheel_subject, caplog):
    client, subject = flywheel_subject
    from_file = FlywheelStore(client).history(subject)
    FlywheelStore(client, "s1").record(from_file[0])  # now recorded in info as well
    client.get_session("s3").info[NAMESPACE] = {"timepoints": [{"study_uid": "1.2.3"}]}
    assert len(FlywheelStore(client).history(subject)) == 1
    assert "malformed time point" in caplog.text
    FlywheelStore(client, "s3").record(dataclasses.replace(from_file[0], study_uid=UIDS[2]))  # still records
    assert len(FlywheelStore(client).history(subject)) == 2


# ----------------------------------------------------------------------------------------------- runner hook


def ball_case(folder: Path, growth: float) -> tuple[Path, Path]:
    """A 2 mm head with a tumour ball (ED shell, NET, ET core) whose volume scales with `growth`."""
    size, spacing = 48, 2.0
    zz, yy, xx = np.meshgrid(*[np.arange(size) * spacing - spacing * size / 2] * 3, indexing="ij")
    r = np.sqrt(xx ** 2 + yy ** 2 + zz ** 2)
    t = np.sqrt((xx - 10) ** 2 + yy ** 2 + zz ** 2) / (12 * growth ** (1 / 3))
    labels = np.select([t <= 0.4, t <= 0.7, t <= 1.0], [1, 2, 4], 0).astype(np.uint8)
    image = np.where(r < 40, 100.0, 0.0).astype(np.float32) + 30 * labels
    folder.mkdir(parents=True)
    paths = []
    for name, array in (("t1c.nii.gz", image), ("labels.nii.gz", labels)):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing([spacing] * 3)
        sitk.WriteImage(img, str(folder / name))
        paths.append(folder / name)
    return tuple(paths)


def patient_dicom(path: Path) -> Path:
    return write_dicom(dicom_dataset(PatientID=PATIENT_ID, PatientName="SYNTHETIC^PHANTOM", PatientAge="008Y"), path)


def test_runner_records_each_run_and_reports_the_change(tmp_path, monkeypatch):
    """Three runs of one child through run_pipeline with the model stages faked: the third report has the
    trend page, every SR gets the subject's tracking UIDs, and the store holds three time points."""
    from pedseg import runner

    dcm = patient_dicom(tmp_path / "patient.dcm")
    sr_uids = []
    study = {}

    def output(out) -> Path:  # the runner publishes every output, so the fakes must write one
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"fake")
        return Path(out)

    series = SimpleNamespace(files=[dcm], header=SimpleNamespace(series_number=3))
    monkeypatch.setattr(runner, "ingest", lambda path, work: SimpleNamespace(
        study_uid=study["uid"], study_date=study["date"], series=[series], by_uid=lambda key: series))
    monkeypatch.setattr(runner, "identify", lambda session, config: Identification(
        [SeriesDecision("1.2.3", 3, "T1 post", "t1c", 0.9, [], chosen=True)], {"t1c": "1.2.3"}, []))
    monkeypatch.setattr("pedseg.reporting.writers.write_seg", lambda labels, files, out, **kw: output(out))
    monkeypatch.setattr("pedseg.reporting.writers.write_sr",
                        lambda segs, files, out, **kw: sr_uids.append(kw["tracking_uids"]) or (output(out), {}))
    monkeypatch.setattr("pedseg.reporting.writers.write_encapsulated_pdf", lambda pdf, files, out, **kw: output(out))
    store = SQLiteStore(tmp_path / "m.db")
    config = PipelineConfig(device="cpu", bundle=fake_bundle(tmp_path / "bundle", required=("t1c",), channels=1,
                                                                         model_required=("t1c",)))
    for i, growth in enumerate(GROWTH):
        study.update(uid=UIDS[i], date=DATES[i])
        image, labels = ball_case(tmp_path / f"case{i}", growth)
        fake_model_stages(monkeypatch, {"t1c": image}, labels)
        result = runner.run_pipeline(tmp_path / "in", tmp_path / f"out{i}", config, store)
    assert [tp.study_uid for tp in store.history(KEY)] == list(UIDS)
    assert sr_uids == [tracking_uids(KEY)] * 3
    rows = list(csv.DictReader(result.outputs["longitudinal"].open()))
    wt = next(r for r in rows if r["region"] == "WT")
    assert wt["response"] == "PD"
    assert wt["study_date"] == DATES[2]
    assert result.provenance.bundle.label_convention == "2024"
    text = subprocess.run(["pdftotext", str(result.outputs["pdf"]), "-"], capture_output=True, text=True).stdout
    assert "Longitudinal change" in text
    assert "Compared with 2 earlier time point(s)" in text
    assert PATIENT_ID.encode() not in (tmp_path / "m.db").read_bytes()
