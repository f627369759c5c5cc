"""PACS listener, push and pull without a model or an archive: pynetdicom peers and a fake pipeline.

The pipeline call is injected (`FakePipeline`), so these tests check only the adapter: filing, dedupe,
completion, the persisted queue, sending with backoff. tests/test_pacs_orthanc.py runs the real pipeline.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pydicom
import pytest

from pedseg.cli.main import main
from pedseg.pacs.instances import list_instances
from pedseg.pacs.journal import Journal, StudyRecord
from pedseg.pacs.listener import Listener, ListenerConfig
from pedseg.pacs.node import DicomNode, parse_destination, parse_node
from pedseg.pacs.send import SendPolicy, send_files
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import InputError, MissingSequenceError, NetworkError
from pedseg.tracking.sqlite import SQLiteStore

from pacs_support import (
    PATIENT_ID,
    PATIENT_NAME,
    Destination,
    FakePipeline,
    associate,
    free_port,
    make_study,
    state,
    status,
    store,
    study_uid_of,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
FAST_SEND = SendPolicy(attempts=3, first_delay_s=0.05, max_delay_s=0.2, timeout_s=5)


@pytest.fixture
def destination():
    dest = Destination().start()
    yield dest
    dest.stop()


@pytest.fixture
def listen(tmp_path):
    """Start listeners on `tmp_path/spool`; all are stopped at the end."""
    started = []

    def start(runner, dest, *, quiet_s=0.3, spool=None, send=FAST_SEND, port=None, store=None,
              workers=1) -> Listener:
        config = ListenerConfig(aet="PEDSEG", port=port or free_port(), bind="127.0.0.1",
                                spool=spool or tmp_path / "spool", destination=parse_node(str(dest)), quiet_s=quiet_s,
                                send=send, poll_s=0.05, workers=workers)
        listener = Listener(config, PipelineConfig(), runner=runner, store=store)
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


def _spooled(listener: Listener, study_uid: str) -> list[Path]:
    record = listener.records()[study_uid]
    return list_instances(listener.journal.dicom_dir(record))


def test_duplicates_are_filed_once_and_the_study_runs_once(listen, destination, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake = FakePipeline()
    listener = listen(fake, destination, quiet_s=0.5)
    files = make_study(tmp_path / "in", 4)
    uid = study_uid_of(files[0])
    assert store(files, listener.config.port) == [0] * 4
    assert store(files[:2] + files, listener.config.port) == [0] * 6  # the same instances again
    wait_for(lambda: state(listener.config.spool, uid) == "sent", what="study sent")
    assert fake.calls == [(uid, 4)]
    assert len(_spooled(listener, uid)) == 4
    [result] = destination.received
    assert result.Modality == "DOC"
    assert result.StudyInstanceUID == uid
    # A whole study sent again, and our own result routed back to us, change nothing.
    store(files, listener.config.port)
    output = listener.journal.output_dir(listener.records()[uid]) / "report" / "report_pdf.dcm"
    store([output], listener.config.port)
    assert len(_spooled(listener, uid)) == 4
    assert state(listener.config.spool, uid) == "sent"
    # Never PHI in the log or the status file.
    text = caplog.text + (listener.config.spool / "status.json").read_text()
    assert PATIENT_NAME not in text
    assert PATIENT_ID not in text


def test_each_study_run_gets_the_measurement_store(listen, destination, tmp_path):
    db = SQLiteStore(tmp_path / "measurements.db")
    fake = FakePipeline()
    listener = listen(fake, destination, store=db)
    first, second = make_study(tmp_path / "a", 2), make_study(tmp_path / "b", 2)
    store(first, listener.config.port)
    store(second, listener.config.port)
    wait_for(lambda: {state(listener.config.spool, study_uid_of(f[0])) for f in (first, second)} == {"sent"},
             what="both studies sent")
    assert fake.stores == [db, db]
    assert listen(FakePipeline(), destination, spool=tmp_path / "untracked").store is None


def test_listen_db_option_and_pedseg_db_default_open_the_store(tmp_path, monkeypatch, destination):
    """`pedseg listen --db PATH` (default $PEDSEG_DB) opens an SQLite store and hands it to the listener; the
    subject key is left to the runner (a salted PatientID hash, as `pedseg run` without --subject-key)."""
    started = []

    class Recorder:
        def __init__(self, config, pipeline_config, runner=None, store=None):
            started.append((pipeline_config, store))

        def serve_forever(self):
            pass

    monkeypatch.setattr("pedseg.pacs.listener.Listener", Recorder)
    monkeypatch.setattr("pedseg.pipeline.bundle.load_bundle", lambda path: None)
    common = ["listen", "--port", "11112", "--dest", str(destination), "--spool", str(tmp_path / "spool")]
    monkeypatch.setenv("PEDSEG_DB", str(tmp_path / "env.db"))
    assert main(common) == 0
    assert main([*common, "--db", str(tmp_path / "flag.db"), "--compare-across-bundles"]) == 0
    monkeypatch.delenv("PEDSEG_DB")
    assert main(common) == 0
    [(config, env_store), (across, flag_store), (_, no_store)] = started
    assert isinstance(env_store, SQLiteStore)
    assert env_store.path == tmp_path / "env.db"
    assert isinstance(flag_store, SQLiteStore)
    assert flag_store.path == tmp_path / "flag.db"
    assert no_store is None
    assert config.subject_key is None
    assert not config.compare_across_bundles
    assert across.compare_across_bundles


def test_aborted_association_keeps_what_was_acknowledged(listen, destination, tmp_path):
    fake = FakePipeline()
    listener = listen(fake, destination, quiet_s=1.0)
    files = make_study(tmp_path / "in", 5)
    uid = study_uid_of(files[0])
    assert store(files, listener.config.port, abort_after=3) == [0] * 3
    wait_for(lambda: len(_spooled(listener, uid)) == 3, what="3 instances filed")
    spool_files = listener.journal.dicom_dir(listener.records()[uid]).iterdir()
    assert all(not p.name.startswith(".") for p in spool_files), "a partial file was left"
    store(files, listener.config.port)  # the sender retries the whole study
    wait_for(lambda: state(listener.config.spool, uid) == "sent", what="study sent")
    assert fake.calls == [(uid, 5)]


def test_study_completes_after_quiet_period_and_only_once_the_association_closed(listen, destination, tmp_path):
    fake = FakePipeline()
    listener = listen(fake, destination, quiet_s=0.4)
    files = make_study(tmp_path / "in", 3)
    uid = study_uid_of(files[0])
    assoc = associate(listener.config.port)
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    threading.Event().wait(1.2)  # three quiet periods, association still open
    assert state(listener.config.spool, uid) == "receiving"
    assert fake.calls == []
    assoc.release()
    wait_for(lambda: state(listener.config.spool, uid) == "sent", what="study sent")
    assert fake.calls == [(uid, 3)]


def test_second_study_waits_while_one_is_processed(listen, destination, tmp_path):
    release = threading.Event()
    fake = FakePipeline(block=release)
    listener = listen(fake, destination)
    first, second = make_study(tmp_path / "a", 2), make_study(tmp_path / "b", 3)
    uid_a, uid_b = study_uid_of(first[0]), study_uid_of(second[0])
    store(first, listener.config.port)
    wait_for(lambda: state(listener.config.spool, uid_a) == "running", what="first study running")
    store(second, listener.config.port)
    wait_for(lambda: state(listener.config.spool, uid_b) == "queued", what="second study queued")
    assert state(listener.config.spool, uid_a) == "running"
    release.set()
    wait_for(lambda: state(listener.config.spool, uid_b) == "sent", what="second study sent")
    assert fake.calls == [(uid_a, 2), (uid_b, 3)]
    assert fake.max_running == 1
    assert {ds.StudyInstanceUID for ds in destination.received} == {uid_a, uid_b}


def test_new_instances_while_running_process_the_study_again(listen, destination, tmp_path):
    release = threading.Event()
    fake = FakePipeline(block=release)
    listener = listen(fake, destination)
    files = make_study(tmp_path / "in", 4)
    uid = study_uid_of(files[0])
    store(files[:2], listener.config.port)
    wait_for(lambda: state(listener.config.spool, uid) == "running", what="study running")
    store(files[2:], listener.config.port)  # the rest of the study arrives late
    release.set()
    wait_for(lambda: len(fake.calls) == 2 and state(listener.config.spool, uid) == "sent", what="second run sent")
    assert fake.calls == [(uid, 2), (uid, 4)]
    assert len(destination.received) == 1, "results of the incomplete first run must not be sent"


def test_pipeline_error_fails_the_study_and_the_listener_goes_on(listen, destination, tmp_path):
    fake = FakePipeline(error=MissingSequenceError("Model bundle 'demo' requires ['t2f'], which this session lacks."))
    listener = listen(fake, destination)
    files = make_study(tmp_path / "in", 2)
    uid = study_uid_of(files[0])
    store(files, listener.config.port)
    wait_for(lambda: state(listener.config.spool, uid) == "failed", what="study failed")
    assert "missing_sequence" in status(listener.config.spool)["studies"][uid]["message"]
    # An unexpected error is reported by type and place only: its text may quote header values.
    fake.error = RuntimeError(f"bad header for {PATIENT_NAME}")
    second = make_study(tmp_path / "second", 2)
    store(second, listener.config.port)
    wait_for(lambda: state(listener.config.spool, study_uid_of(second[0])) == "failed", what="second study failed")
    message = status(listener.config.spool)["studies"][study_uid_of(second[0])]["message"]
    assert message.startswith("internal_error: Unexpected RuntimeError in pacs_support.py:")
    assert PATIENT_NAME not in message
    fake.error = None
    other = make_study(tmp_path / "other", 2)
    store(other, listener.config.port)
    wait_for(lambda: state(listener.config.spool, study_uid_of(other[0])) == "sent", what="next study sent")


def test_a_study_that_keeps_killing_the_listener_is_given_up(listen, destination, tmp_path):
    spool = tmp_path / "spool"
    journal = Journal(spool)
    record = StudyRecord("1.2.3.4", state="running", queued_at=1.0, attempts=3)
    journal.save(record)
    make_study(journal.dicom_dir(record), 1, study_uid="1.2.3.4")
    fake = FakePipeline()
    listen(fake, destination, spool=spool)
    wait_for(lambda: state(spool, "1.2.3.4") == "failed", what="study given up")
    assert fake.calls == []
    assert "after 3 interrupted runs" in status(spool)["studies"]["1.2.3.4"]["message"]


_HANGING_LISTENER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pedseg.pacs.listener import Listener, ListenerConfig
    from pedseg.pacs.node import parse_node
    from pedseg.pipeline.config import PipelineConfig

    def hang(input_path, outdir, config, store=None):
        time.sleep(3600)  # killed mid-run

    config = ListenerConfig(aet="PEDSEG", port=int(sys.argv[1]), bind="127.0.0.1", spool=Path(sys.argv[2]),
                           destination=parse_node(sys.argv[3]), quiet_s=0.3, poll_s=0.05)
    Listener(config, PipelineConfig(), runner=hang).serve_forever()
""")


def test_listener_killed_while_processing_loses_no_study(listen, destination, tmp_path):
    spool, port = tmp_path / "spool", free_port()
    process = subprocess.Popen([sys.executable, "-c", _HANGING_LISTENER, str(port), str(spool), str(destination)],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        # A cold interpreter importing pydicom, pynetdicom and the pipeline: slow on a busy 2-core machine.
        wait_for(lambda: (spool / "status.json").exists(), timeout=180, what="first listener up")
        first, second = make_study(tmp_path / "a", 3), make_study(tmp_path / "b", 2)
        uid_a, uid_b = study_uid_of(first[0]), study_uid_of(second[0])
        store(first, port)
        wait_for(lambda: state(spool, uid_a) == "running", what="first study running")
        store(second, port)
        wait_for(lambda: state(spool, uid_b) == "queued", what="second study queued")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    fake = FakePipeline()
    listener = listen(fake, destination, spool=spool)  # a new listener process on the same spool
    wait_for(lambda: state(spool, uid_a) == state(spool, uid_b) == "sent", what="both studies sent after restart")
    assert fake.calls == [(uid_a, 3), (uid_b, 2)]
    assert listener.records()[uid_a].attempts == 2  # the killed run counted
    assert {ds.StudyInstanceUID for ds in destination.received} == {uid_a, uid_b}


def test_destination_down_retries_then_keeps_results_and_says_so(listen, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    down = Destination()  # not started: nothing listens on its port
    listener = listen(FakePipeline(), down)
    files = make_study(tmp_path / "in", 2)
    uid = study_uid_of(files[0])
    store(files, listener.config.port)
    wait_for(lambda: state(listener.config.spool, uid) == "send_failed", what="send failed")
    entry = status(listener.config.spool)["studies"][uid]
    assert "after 3 attempts" in entry["message"]
    assert f"pedseg push {entry['output_dir']}" in entry["message"]
    assert caplog.text.count("retrying in") == 2
    outdir = Path(entry["output_dir"])
    assert (outdir / "report" / "report_pdf.dcm").is_file()
    # Once the destination is back, the kept results go with one command.
    up = Destination(port=down.port).start()
    try:
        assert main(["push", str(outdir), "--to", str(up)]) == 0
        assert [ds.StudyInstanceUID for ds in up.received] == [uid]
    finally:
        up.stop()


def test_send_backs_off_exponentially_and_fails_with_the_network_exit_code(tmp_path):
    delays = []
    FakePipeline()(make_study(tmp_path / "in", 1)[0].parent, tmp_path / "out", None)
    pdf = tmp_path / "out" / "report" / "report_pdf.dcm"
    policy = SendPolicy(attempts=4, first_delay_s=1.0, max_delay_s=3.0, timeout_s=2)
    with pytest.raises(NetworkError) as caught:
        send_files([pdf], DicomNode("NOBODY", "127.0.0.1", free_port()), calling_aet="PEDSEG", policy=policy,
                   sleep=delays.append)
    assert delays == [1.0, 2.0, 3.0]
    assert caught.value.exit_code == 7
    assert "1 of 1 instances" in str(caught.value)
    assert main(["push", str(tmp_path / "out"), "--to", f"NOBODY@127.0.0.1:{free_port()}", "--send-attempts", "1"]) == 7


def test_listener_start_errors_have_exit_codes(listen, destination, tmp_path):
    running = listen(FakePipeline(), destination)
    with pytest.raises(InputError, match="Another listener"):
        listen(FakePipeline(), destination)  # same spool
    with pytest.raises(NetworkError, match="Cannot listen"):
        listen(FakePipeline(), destination, spool=tmp_path / "other", port=running.config.port)
    common = ["listen", "--dest", str(destination), "--spool", str(tmp_path / "cli"), "--bind", "127.0.0.1"]
    assert main([*common, "--port", str(free_port()), "--bundle", str(tmp_path / "no-bundle")]) == 6


def test_node_and_destination_parsing():
    assert parse_node("ORTHANC@pacs.example.org:4242") == DicomNode("ORTHANC", "pacs.example.org", 4242)
    assert parse_node("A@B@[::1]:104") == DicomNode("A@B", "::1", 104)
    assert parse_destination("https://pacs/dicom-web/") == "https://pacs/dicom-web"
    for bad in ("ORTHANC@host", "host:4242", "@host:1", "A@host:0", "THIS-AE-TITLE-IS-TOO-LONG@h:1", "A\\B@h:1"):
        with pytest.raises(InputError):
            parse_node(bad)


# ------------------------------------------------------------------------- workers: `pedseg listen --workers N`


def test_two_workers_process_two_studies_at_once_each_once(listen, destination, tmp_path):
    release = threading.Event()
    fake = FakePipeline(block=release)
    listener = listen(fake, destination, workers=2)
    studies = [make_study(tmp_path / name, 2) for name in "abc"]
    uids = [study_uid_of(files[0]) for files in studies]
    for files in studies:
        store(files, listener.config.port)
    spool = listener.config.spool
    wait_for(lambda: sorted(state(spool, uid) for uid in uids) == ["queued", "running", "running"],
             what="two studies running, the third queued")
    release.set()
    wait_for(lambda: all(state(spool, uid) == "sent" for uid in uids), what="all three sent")
    assert sorted(uid for uid, _ in fake.calls) == sorted(uids)  # each study run once
    assert fake.max_running == 2


def test_studies_run_on_a_dask_cluster_and_its_errors_keep_their_kind(listen, destination, tmp_path):
    """ClusterRunner hands the run to a Dask worker (pedseg.batch.task.run_one, the real pipeline call): a study
    the pipeline refuses fails in the journal with the error model's kind, and the listener goes on."""
    from distributed import Client, LocalCluster

    from pedseg.batch.task import ClusterRunner

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        listener = listen(ClusterRunner(client), destination, workers=2)
        files = make_study(tmp_path / "in", 2)  # two MR images: no series the model could use
        uid = study_uid_of(files[0])
        store(files, listener.config.port)
        wait_for(lambda: state(listener.config.spool, uid) == "failed", timeout=120, what="study failed")
    message = status(listener.config.spool)["studies"][uid]["message"]
    assert message.startswith(("missing_sequence: ", "bad_input: ", "unsupported_data: ")), message
    assert (listener.journal.output_dir(listener.records()[uid]) / "error.json").is_file()


def test_listen_workers_and_scheduler_options_hand_studies_to_the_executor(tmp_path, monkeypatch, destination):
    started = []

    class Recorder:
        def __init__(self, config, pipeline_config, runner=None, store=None):
            started.append((config, pipeline_config, runner))

        def serve_forever(self):
            pass

    monkeypatch.setattr("pedseg.pacs.listener.Listener", Recorder)
    monkeypatch.setattr("pedseg.pipeline.bundle.load_bundle", lambda path: None)
    common = ["listen", "--port", "11112", "--dest", str(destination), "--spool", str(tmp_path / "spool")]
    assert main([*common, "--workers", "2", "--threads", "1"]) == 0
    assert main(common) == 0
    [(config, pipeline_config, runner), (plain, _, plain_runner)] = started
    assert config.workers == 2 and pipeline_config.threads == 1
    assert type(runner).__name__ == "ClusterRunner"
    assert plain.workers == 1 and plain_runner is None
    with pytest.raises(SystemExit):
        main([*common, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])  # one or the other
