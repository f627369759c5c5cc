"""`pedseg batch`: sources, done-keys, the summary, worker sizing, and batches on a real two-worker LocalCluster.

The fast tests run sessions that fail at ingest (no real model needed); the slow one is the issue's "done when":
four synthetic sessions, one broken, through the demo bundle, stopped part-way and resumed, with a store.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import zipfile
from pathlib import Path

import pytest

from pedseg.batch.cluster import GIB, plan_workers
from pedseg.batch.executor import Progress, plan
from pedseg.batch.keys import KEY_FILE, done_key, write_key_file
from pedseg.batch.sources import SessionJob, read_sources, safe_name
from pedseg.batch.summary import Row, write_summary
from pedseg.cli.main import main
from pedseg.pipeline.config import DEMO_BUNDLE, PipelineConfig
from pedseg.pipeline.errors import InputError

from factories import fake_bundle


def _session_folder(folder: Path, text: str = "not DICOM") -> Path:
    folder.mkdir(parents=True)
    (folder / "file.txt").write_text(text)
    return folder


# -------------------------------------------------------------------------------------------------- sources


def test_a_folder_source_gives_one_session_per_subfolder_or_zip_with_unique_safe_names(tmp_path):
    source = tmp_path / "cohort"
    for name in ("a b", "a_b", "A_B", ".hidden", "ü"):
        _session_folder(source / name)
    with zipfile.ZipFile(source / "zipped.zip", "w") as archive:
        archive.writestr("x.dcm", b"")
    (source / "notes.txt").write_text("not a session")
    jobs = read_sources([source], tmp_path / "out")
    assert [job.name for job in jobs] == ["A_B", "a_b-2", "a_b-3", "zipped", "session"]
    assert jobs[0].outdir == (tmp_path / "out" / "A_B").absolute()
    assert jobs[3].inputs == ((source / "zipped.zip").absolute(),)
    assert read_sources([source], tmp_path / "out") == jobs  # the same names on every invocation


def test_a_csv_source_gives_inputs_subject_keys_and_outdirs(tmp_path):
    first, second = _session_folder(tmp_path / "s1"), _session_folder(tmp_path / "s2")
    listing = tmp_path / "list.csv"
    listing.write_text("input,subject_key,outdir\ns1,child-7,site-a/s1\n" + f"{second}\n")
    jobs = read_sources([listing], tmp_path / "out")
    assert jobs == [SessionJob("s1", (first.absolute(),), (tmp_path / "out/site-a/s1").absolute(), "child-7"),
                    SessionJob("s2", (second.absolute(),), (tmp_path / "out/s2").absolute(), None)]


@pytest.mark.parametrize(("text", "message"), [
    ("missing\n", "does not exist"),
    ("s1,k,o,extra\n", r"Row 1 of .* is not input\[,subject_key\]\[,outdir\]"),
    ("s1,,same\ns1,,same\n", "Two sessions of the batch write into"),
])
def test_bad_csv_rows_are_clear_input_errors(tmp_path, text, message):
    _session_folder(tmp_path / "s1")
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_sources([tmp_path / "list.csv"], tmp_path / "out")


def test_a_single_session_folder_or_nothing_is_refused(tmp_path):
    with pytest.raises(InputError, match="holds files but no session subfolders"):
        read_sources([_session_folder(tmp_path / "one")], tmp_path / "out")
    with pytest.raises(InputError, match="is not a folder, a .zip or a .csv"):
        read_sources([tmp_path / "absent"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="hold no sessions"):
        read_sources([tmp_path / "empty"], tmp_path / "out")


def test_safe_names():
    assert safe_name("Smith, J. / 2024-01-02") == "Smith_J._2024-01-02"
    assert safe_name("..") == "session"
    assert safe_name("batch-summary") == "batch-summary"  # read_sources then renames it: see below


def test_no_session_takes_the_summary_files_name(tmp_path):
    _session_folder(tmp_path / "src" / "batch-summary")
    assert [job.name for job in read_sources([tmp_path / "src"], tmp_path / "out")] == ["batch-summary-2"]


# -------------------------------------------------------------------------------------------------- keys


def test_the_done_key_follows_inputs_bundle_and_settings_but_not_threads(tmp_path):
    folder = _session_folder(tmp_path / "s")
    config = PipelineConfig(bundle=tmp_path)
    key = done_key([folder], "sha", config, None)
    assert done_key([folder], "sha", PipelineConfig(bundle=tmp_path / "elsewhere", threads=3), None) == key
    assert done_key([folder], "other sha", config, None) != key
    assert done_key([folder], "sha", PipelineConfig(fast=True), None) != key
    assert done_key([folder], "sha", config, tmp_path / "store.db") != key
    (folder / "file.txt").write_text("changed!!")
    assert done_key([folder], "sha", config, None) != key
    os.utime(folder / "file.txt", ns=(1, 1))
    changed = done_key([folder], "sha", config, None)
    (folder / "new.dcm").write_bytes(b"")
    assert done_key([folder], "sha", config, None) != changed


def test_plan_skips_done_keeps_failures_unless_retried_and_reruns_a_killed_or_changed_session(tmp_path):
    bundle = fake_bundle(tmp_path / "bundle")
    config = PipelineConfig(bundle=bundle)
    jobs = [SessionJob(name, (_session_folder(tmp_path / "src" / name),), tmp_path / "out" / name)
            for name in ("done", "failed", "killed", "new", "changed", "errored", "emptied")]
    keys, _ = plan(jobs, config, None)
    outcome = {"done": "done", "failed": "failed", "killed": None, "changed": "done", "errored": "done",
               "emptied": "done"}
    for job in jobs:
        job.outdir.mkdir(parents=True)
        if job.name != "emptied":  # its outputs were deleted by hand
            (job.outdir / "provenance.json").write_text("{}")
        (job.outdir / "measurements.json").write_text(json.dumps({"regions": {r: {"volume_ml": 1.5} for r in (
            "ET", "NET", "CC", "ED", "TC", "WT")}, "qc_flags": ["motion"]}))
        if outcome.get(job.name):
            write_key_file(job.outdir, {"key": keys[job.name], "status": outcome[job.name], "exit_code": 3,
                                        "error": "missing_sequence", "message": "No FLAIR.", "hint": "Add it.",
                                        "wall_s": 12.5})
    (tmp_path / "out/killed/.pedseg-staging-x").mkdir()  # what a killed run leaves: no key, a staging folder
    (tmp_path / "src/changed/file.txt").write_text("new export")
    (tmp_path / "out/errored/error.json").write_text("{}")  # a later `pedseg run` into it failed
    _, rows = plan(jobs, config, None)
    status = {row.session: row.status for row in rows}
    assert status == {"done": "skipped", "failed": "failed_before", "killed": "queued", "new": "queued",
                      "changed": "queued", "errored": "queued", "emptied": "queued"}
    done, failed = rows[0], rows[1]
    assert (done.volumes_ml["WT"], done.qc_flags, done.wall_s) == (1.5, ("motion",), 12.5)
    assert (failed.exit_code, failed.error, failed.message) == (3, "missing_sequence", "No FLAIR. Add it.")
    _, retried = plan(jobs, config, None, retry_failed=True)
    assert retried[1].status == "queued"


# -------------------------------------------------------------------------------------------------- summary


def test_the_summary_has_one_row_per_session_in_csv_and_json(tmp_path):
    rows = [Row("a", "done", 0, wall_s=61.2, volumes_ml={"ET": 1.0, "NET": 0, "CC": 0, "ED": 2.0, "TC": 1.0,
                                                          "WT": 3.0}, qc_flags=("motion", "low_snr"), outdir="/o/a"),
            Row("b", "failed", 3, "missing_sequence", "No FLAIR, add it", 4.0, outdir="/o/b")]
    written = write_summary(tmp_path, rows)
    table = list(csv.DictReader(io.StringIO(written["csv"].read_text())))
    assert [(r["session"], r["status"], r["exit_code"], r["WT_ml"], r["qc_flags"]) for r in table] == [
        ("a", "done", "0", "3.0", "motion;low_snr"), ("b", "failed", "3", "", "")]
    assert table[1]["message"] == "No FLAIR, add it"
    document = json.loads(written["json"].read_text())
    assert [s["session"] for s in document["sessions"]] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-summary.csv", "batch-summary.json"]


def test_progress_is_plain_lines_without_a_terminal():
    from pedseg.batch.executor import BatchResult

    stream = io.StringIO()
    progress = Progress(stream)
    result = BatchResult([Row("a", "done", 0), Row("b", "running"), Row("c", "queued"), Row("d", "skipped", 0)])
    progress(result, 90.0)
    progress(result, 95.0)  # nothing finished since: no new line
    assert stream.getvalue() == "1 done, 0 failed, 1 running, 1 queued, 1 from before; 1m30s, ETA 3m00s\n"


def test_workers_are_sized_to_cores_and_memory():
    assert plan_workers(16, 64 * GIB) == plan_workers(16, 64 * GIB, memory_per_worker_gib=4.0)
    assert plan_workers(16, 64 * GIB).workers == 16 and plan_workers(16, 64 * GIB).threads == 1
    assert (plan_workers(16, 10 * GIB).workers, plan_workers(16, 10 * GIB).threads) == (2, 8)  # memory-bound
    assert plan_workers(16, 64 * GIB, threads=4).workers == 4
    assert plan_workers(2, 1 * GIB).workers == 1  # always one
    assert plan_workers(8, 64 * GIB, workers=2).memory_limit == 32 * GIB


# ------------------------------------------------------------------------------------------ on a cluster


def test_failing_sessions_fail_alone_and_a_second_batch_runs_nothing_again(tmp_path, capsys):
    """Two sessions that fail at ingest on a two-worker LocalCluster: error.json, exit code, summary rows; a second
    invocation keeps them as failed before; --retry-failed runs them again."""
    source = tmp_path / "src"
    _session_folder(source / "one"), _session_folder(source / "two")
    out = tmp_path / "out"
    args = ["batch", str(source), str(out), "--bundle", str(fake_bundle(tmp_path / "bundle")), "--workers", "2",
            "--threads", "1"]
    assert main(args) == 2
    printed = capsys.readouterr()
    assert "2 session(s) on 2 local worker(s) x 1 thread(s); dashboard: " in printed.out
    assert "failed: one (exit 2, bad_input)" in printed.err
    for name in ("one", "two"):
        error = json.loads((out / name / "error.json").read_text())
        assert error["exit_code"] == 2 and error["error"] == "bad_input"
        assert json.loads((out / name / KEY_FILE).read_text())["status"] == "failed"
    rows = {r["session"]: r for r in json.loads((out / "batch-summary.json").read_text())["sessions"]}
    assert {r["status"] for r in rows.values()} == {"failed"}
    assert "DICOM" in rows["one"]["message"]
    stamp = (out / "one" / KEY_FILE).stat().st_mtime_ns
    assert main(args) == 2
    rows = json.loads((out / "batch-summary.json").read_text())["sessions"]
    assert {r["status"] for r in rows} == {"failed_before"}
    assert (out / "one" / KEY_FILE).stat().st_mtime_ns == stamp  # not run again
    assert main([*args, "--retry-failed"]) == 2
    assert (out / "one" / KEY_FILE).stat().st_mtime_ns != stamp


def _synthetic_sessions(root: Path) -> Path:
    from pedseg.synth.session import generate_session

    (root / "cohort").mkdir()
    for number, seed in enumerate((3, 4, 5, 6), start=1):
        generate_session(root / "work" / f"s{number}", seed)
        shutil.move(root / "work" / f"s{number}" / "dicom", root / "cohort" / f"s{number}")
    shutil.rmtree(root / "cohort" / "s4" / "04_t2f")  # the broken one: no FLAIR
    return root / "cohort"


@pytest.mark.slow
def test_four_sessions_one_broken_resume_after_a_stop_and_one_time_point_each(tmp_path, capsys):
    """The issue's "done when": three complete, one fails with error.json and a summary row saying why; a batch
    stopped part-way resumes without recomputing what finished; the store holds one time point per session."""
    cohort = _synthetic_sessions(tmp_path)
    out, db = tmp_path / "out", tmp_path / "store.db"
    options = ["--bundle", str(DEMO_BUNDLE), "--fast", "--device", "cpu", "--db", str(db)]
    # A first batch stopped after s1 and s4: s2's run was killed part-way (a staging folder, no done-key). One
    # worker with both cores: s4 fails at once, so s1 is the only real run (cores and workers are not in the key).
    first = tmp_path / "first.csv"
    first.write_text(f"{cohort / 's1'}\n{cohort / 's4'}\n")
    assert main(["batch", str(first), str(out), *options, "--workers", "1", "--threads", "2"]) == 3
    (out / "s2" / ".pedseg-staging-killed").mkdir(parents=True)
    (out / "s2" / ".pedseg-staging-killed" / "half.nii.gz").write_bytes(b"\x1f\x8b")
    stamp = (out / "s1" / "measurements.json").stat().st_mtime_ns

    assert main(["batch", str(cohort), str(out), *options, "--workers", "2", "--threads", "1"]) == 3
    rows = {r["session"]: r for r in json.loads((out / "batch-summary.json").read_text())["sessions"]}
    assert {name: r["status"] for name, r in rows.items()} == {"s1": "skipped", "s2": "done", "s3": "done",
                                                               "s4": "failed_before"}
    assert (out / "s1" / "measurements.json").stat().st_mtime_ns == stamp
    assert rows["s4"]["exit_code"] == 3 and rows["s4"]["error"] == "missing_sequence"
    assert "t2f" in rows["s4"]["message"]
    assert json.loads((out / "s4" / "error.json").read_text())["error"] == "missing_sequence"
    for name in ("s1", "s2", "s3"):
        measured = json.loads((out / name / "measurements.json").read_text())["regions"]["WT"]["volume_ml"]
        assert rows[name]["volumes_ml"]["WT"] == measured > 0
        assert not list((out / name).glob(".pedseg-staging-*"))
    table = list(csv.DictReader((out / "batch-summary.csv").open()))
    assert [r["session"] for r in table] == ["s1", "s2", "s3", "s4"]

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "batch-summary" not in p.name}
    capsys.readouterr()
    assert main(["batch", str(cohort), str(out), *options]) == 3
    assert "0 done, 3 skipped as done before, 1 failed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed, nothing rewritten

    with sqlite3.connect(db) as conn:
        points = conn.execute("SELECT study_uid, COUNT(*) FROM time_points GROUP BY study_uid").fetchall()
    uids = {json.loads((out / n / "provenance.json").read_text())["inputs"]["study_instance_uid"]
            for n in ("s1", "s2", "s3")}
    assert dict(points) == dict.fromkeys(uids, 1)


@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_the_readme_slurm_recipe_asks_slurm_for_one_session_per_worker():
    """The README's SLURMCluster, built without Slurm: the job script it would submit (no job is submitted)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    recipe = readme.split("```python\n# slurm_cluster.py")[1].split("```")[0].split("cluster.adapt")[0]
    recipe = recipe.split("\n", 1)[1]  # after the comment line
    namespace: dict = {}
    exec(recipe, namespace)  # noqa: S102 - the README's own text, the point of the test
    cluster = namespace["cluster"]
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --cpus-per-task=8" in script and "#SBATCH --mem=32G" in script and "#SBATCH -p cpu" in script
    worker = next(line for line in script.splitlines() if "dask_worker" in line)
    assert worker.startswith("/opt/pedseg/.venv/bin/python -m distributed.cli.dask_worker tcp://")
    assert "--nworkers 2" in worker and "--nthreads 1" in worker and "--memory-limit 16.00GiB" in worker


def _wait_for(summary: Path, statuses: dict[str, set[str]], process, timeout_s: float = 300) -> dict[str, dict]:
    """The summary's rows once every named session has one of its statuses (the batch still running)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the batch ended early (exit {process.returncode})"
        try:
            rows = {r["session"]: r for r in json.loads(summary.read_text())["sessions"]}
        except (OSError, ValueError):
            rows = {}
        if all(rows.get(name, {}).get("status") in wanted for name, wanted in statuses.items()):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"the summary never showed {statuses}")


@pytest.mark.slow
def test_a_batch_killed_mid_run_resumes_without_recomputing_what_finished(tmp_path):
    """A real kill: the batch's whole process group (client, scheduler, workers) gets SIGKILL while the second
    session is running; started again, the finished session is not run again and the killed one is."""
    import signal
    import subprocess
    import sys

    from pedseg.synth.session import generate_session

    source = tmp_path / "src"
    _session_folder(source / "a")  # finishes at once (fails at ingest: not DICOM)
    generate_session(tmp_path / "work", 7)
    shutil.move(tmp_path / "work" / "dicom", source / "b")  # takes minutes
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "pedseg"), "batch", str(source), str(out), "--bundle",
               str(DEMO_BUNDLE), "--fast", "--device", "cpu", "--workers", "1", "--threads", "2"]

    def start():
        # SIGKILL leaves the killed run's work folder behind (nothing can clean up after it): keep it in here
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "TMPDIR": str(tmp_path)})

    first = start()
    try:
        _wait_for(out / "batch-summary.json", {"a": {"failed"}, "b": {"running"}}, first)
        key_a = (out / "a" / KEY_FILE).stat().st_mtime_ns
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (out / "b" / KEY_FILE).exists() and not (out / "b" / "measurements.json").exists()

    second = start()
    try:
        rows = _wait_for(out / "batch-summary.json", {"a": {"failed_before"}, "b": {"running"}}, second)
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
    assert (out / "a" / KEY_FILE).stat().st_mtime_ns == key_a  # what finished was not run again
    assert rows["a"]["exit_code"] == 2 and "DICOM" in rows["a"]["message"]
