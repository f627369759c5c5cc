"""Process safety: one run per output folder (a lock), and a stopped run (SIGTERM, SIGINT) cleans up like a failed
one: error.json says `interrupted`, no staging, no temporary copy of the input left anywhere."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pedseg.cli.main import main
from pedseg.interrupt import stop_on_signals
from pedseg.pipeline.errors import InputError, InterruptedRun
from pedseg.workspace import ERROR_FILE, LOCK_FILE, STAGING_PREFIX, Workspace, write_error

from factories import fake_bundle

REPO = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO / "bundles" / "pedseg-demo"

# Holds OUTDIR's workspace (lock, staging, work) until its stdin closes, printing its staging folder when ready.
HOLDER = """
import sys
from pathlib import Path
from pedseg.workspace import Workspace
with Workspace(Path(sys.argv[1])) as workspace:
    print(workspace.staging, flush=True)
    sys.stdin.read()
"""


def hold(outdir: Path) -> tuple[subprocess.Popen, Path]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(outdir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    staging = Path(holder.stdout.readline().strip())
    assert staging.name.startswith(STAGING_PREFIX), staging
    return holder, staging


def test_a_second_run_into_a_folder_in_use_stops_and_names_the_running_process(tmp_path, capsys):
    out = tmp_path / "out"
    holder, staging = hold(out)
    try:
        started = json.loads((out / LOCK_FILE).read_text())
        code = main(["run", str(tmp_path / "no-such-input"), str(out), "--bundle", str(fake_bundle(tmp_path / "b"))])
        stderr = capsys.readouterr().err
        assert code == InputError.exit_code == 2
        assert (f"is in use by another pedseg run (process {holder.pid} on {socket.gethostname()}, started "
                f"{started['started']})") in stderr
        assert "Wait for that run to finish" in stderr
        assert staging.is_dir()  # the running one's staging is untouched
        assert not (out / ERROR_FILE).exists()  # and its folder holds no error of ours
        write_error(out, InputError("refused"))  # the gear's fallback writer leaves a folder in use alone too
        assert not (out / ERROR_FILE).exists()
    finally:
        holder.stdin.close()
        assert holder.wait(30) == 0
    assert sorted(p.name for p in out.iterdir()) == []  # lock file and staging gone with the run


def test_a_lock_left_by_a_killed_run_blocks_nothing(tmp_path):
    out = tmp_path / "out"
    holder, staging = hold(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert (out / LOCK_FILE).exists() and staging.is_dir()  # what a crash leaves
    with Workspace(out) as workspace:
        assert not staging.exists()  # the dead run's staging is cleaned up once the lock is ours
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        (workspace.staging / "x.txt").write_text("x")
        workspace.publish({"x": workspace.staging / "x.txt"})
    assert sorted(p.name for p in out.iterdir()) == ["x.txt"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_a_workspace_writes_interrupted_and_removes_staging_and_work(tmp_path, signum):
    out = tmp_path / "out"
    before = signal.getsignal(signum)
    with pytest.raises(InterruptedRun) as caught, stop_on_signals(), Workspace(out) as workspace:
        (workspace.work / "input.dcm").write_bytes(b"copy of patient data")
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises at the next bytecode
        except Exception:  # noqa: BLE001 - a library's broad fallback must not swallow the stop
            pytest.fail("the stop was caught by `except Exception`")
    assert caught.value.exit_code == InterruptedRun.exit_code
    assert signal.Signals(signum).name in str(caught.value)
    assert not workspace.work.exists() and not workspace.staging.exists()
    assert sorted(p.name for p in out.iterdir()) == [ERROR_FILE]
    assert json.loads((out / ERROR_FILE).read_text())["error"] == "interrupted"
    assert signal.getsignal(signum) is before  # the handler goes with the block


def test_a_signal_outside_a_workspace_is_an_interrupted_run_too(tmp_path):
    with pytest.raises(InterruptedRun), stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)


def test_signal_handling_stays_out_of_threads(tmp_path):
    """The PACS listener runs pipelines in threads: there, the context manager changes nothing."""
    errors = []

    def run():
        try:
            with stop_on_signals(), Workspace(tmp_path / "out"):
                pass
        except Exception as exc:  # noqa: BLE001 - signal.signal in a thread raises ValueError
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.fixture(scope="module")
def session_zip(tmp_path_factory) -> Path:
    from pedseg.synth.session import generate_session

    root = tmp_path_factory.mktemp("session")
    generate_session(root / "s", 3)
    return Path(shutil.make_archive(str(root / "input"), "zip", root / "s" / "dicom"))


def test_sigterm_mid_run_cleans_up_and_leaves_no_patient_data_in_tmpdir(tmp_path, session_zip):
    """A real run on a zip (unpacked into the work folder under TMPDIR), stopped by SIGTERM in preprocessing."""
    tmpdir, out = tmp_path / "tmp", tmp_path / "out"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    env.pop("PEDSEG_DB", None)
    run = subprocess.Popen([sys.executable, "-m", "pedseg.cli.main", "run", str(session_zip), str(out),
                            "--bundle", str(DEMO_BUNDLE), "--device", "cpu", "--fast"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        for line in run.stdout:  # identify is logged when it is done: preprocessing (about a minute) has begun
            log.append(line)
            if " identify " in line:
                break
        time.sleep(3)  # into registration
        assert list(tmpdir.glob("pedseg-work-*/input/input-*/**/*.dcm")), "the unpacked copy is in the work folder"
        run.send_signal(signal.SIGTERM)
        log.append(run.communicate(timeout=60)[0])
    finally:
        run.kill()
    text = "".join(log)
    assert run.returncode == InterruptedRun.exit_code, text
    assert "error (interrupted): The run was stopped by SIGTERM" in text
    assert "Traceback" not in text and "Logging error" not in text
    assert " preprocess " not in text  # stopped inside the stage
    assert sorted(p.name for p in out.iterdir()) == [ERROR_FILE]  # no staging, no lock, nothing half-written
    error = json.loads((out / ERROR_FILE).read_text())
    assert (error["error"], error["exit_code"]) == ("interrupted", InterruptedRun.exit_code)
    assert [p for p in tmpdir.rglob("*") if p.is_file()] == []  # no copy of the input, nor anything else


def test_the_gear_reports_a_cancelled_job_as_interrupted(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pedseg.gear import main as gear_main

    def cancelled(job):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(gear_main, "load_job", lambda root: SimpleNamespace(debug=False))
    monkeypatch.setattr(gear_main, "run_job", cancelled)
    assert gear_main.main(["--root", str(tmp_path)]) == InterruptedRun.exit_code
    assert json.loads((tmp_path / "output" / ERROR_FILE).read_text())["error"] == "interrupted"
