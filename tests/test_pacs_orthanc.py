"""The PACS adapter against a real Orthanc (Debian packages `orthanc`, `orthanc-dicomweb`; `make system-deps`).

The fixture starts Orthanc on loopback with a temporary configuration and storage and stops it afterwards.
Orthanc knows two modalities: our listener (PEDSEG) and the C-MOVE destination of `pedseg pull` (PEDSEGPULL).
The slow test is the round trip the issue asks for: a synthetic session uploaded to Orthanc, sent by Orthanc to
`pedseg listen`, processed by the real pipeline with the demo bundle, results stored back into the same study.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests

from pedseg.cli.main import main
from pedseg.pacs.listener import Listener, ListenerConfig
from pedseg.pacs.node import DicomNode
from pedseg.pipeline.config import DEMO_BUNDLE, PipelineConfig

from pacs_support import FakePipeline, free_port, make_study, state, study_uid_of, wait_for

pytestmark = pytest.mark.orthanc
REPO = Path(__file__).resolve().parents[1]
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    listener_port: int  # where Orthanc's modality "pedseg" (AE PEDSEG) is
    pull_port: int  # where its modality "pedseg-pull" (AE PEDSEGPULL) is
    aet: str = "ORTHANC"

    @property
    def node(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str):
        response = requests.get(self.url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, timeout: float = 120, **kwargs):
        response = requests.post(self.url + path, timeout=timeout, **kwargs)
        response.raise_for_status()
        return response.json()

    def upload(self, files: list[Path]) -> str:
        """POST each file to /instances; returns the Orthanc ID of their study."""
        ids = {self.post("/instances", data=f.read_bytes())["ParentStudy"] for f in files}
        assert len(ids) == 1, ids
        return ids.pop()

    def study_id(self, study_uid: str) -> str:
        [match] = [m for m in self.post("/tools/lookup", data=study_uid) if m["Type"] == "Study"]
        return match["ID"]


def _orthanc_binary() -> str:
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if binary and DICOMWEB_PLUGIN.exists():
        return binary
    reason = "Orthanc or its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)"
    if os.geteuid() != 0:
        pytest.skip(f"{reason}, and installing them needs root: run `make system-deps` as root")
    pytest.fail(f"{reason}: run `make system-deps` (CI does, through `make test`)")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Orthanc:
    binary = _orthanc_binary()
    root = tmp_path_factory.mktemp("orthanc")
    server = Orthanc(dicom_port=free_port(), http_port=free_port(), listener_port=free_port(), pull_port=free_port())
    config = {
        "Name": "pedseg-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "DicomAet": server.aet, "DicomPort": server.dicom_port, "HttpPort": server.http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomModalities": {
            "pedseg": {"AET": "PEDSEG", "Host": "127.0.0.1", "Port": server.listener_port},
            "pedseg-pull": {"AET": "PEDSEGPULL", "Host": "127.0.0.1", "Port": server.pull_port},
        },
        "DicomScuTimeout": 60,  # a busy CI machine may answer slowly; Orthanc's default is 10 s
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = open(root / "orthanc.log", "wb")
    process = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"Orthanc exited ({process.returncode}): {(root / 'orthanc.log').read_text()[-2000:]}")
        try:
            return requests.get(server.url + "/system", timeout=2).ok
        except requests.ConnectionError:
            return False

    try:
        wait_for(up, timeout=60, what="Orthanc to start")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_pull_from_orthanc_by_c_get_c_move_and_wado(orthanc, tmp_path):
    files = make_study(tmp_path / "study", 3)
    uid = study_uid_of(files[0])
    orthanc.upload(files)
    expected = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    ways = {
        "c-get": ["--from", orthanc.node],
        "c-move": ["--from", orthanc.node, "--aet", "PEDSEGPULL", "--move-port", str(orthanc.pull_port)],
        "wado": ["--from", orthanc.url + "/dicom-web"],
    }
    for name, options in ways.items():
        dest = tmp_path / name
        assert main(["pull", uid, "--to", str(dest), *options]) == 0, name
        assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in dest.glob("*.dcm")} == expected, name
    assert main(["pull", "1.2.3.4.5", "--from", orthanc.node, "--to", str(tmp_path / "none")]) == 7


def test_push_to_orthanc_by_c_store_and_stow(orthanc, tmp_path):
    for name, to in (("c-store", orthanc.node), ("stow", orthanc.url + "/dicom-web")):
        files = make_study(tmp_path / name / "study", 1)
        FakePipeline()(files[0].parent, tmp_path / name / "out", None)  # a report/report_pdf.dcm in that study
        assert main(["push", str(tmp_path / name / "out"), "--to", to]) == 0, name
        study = orthanc.get(f"/studies/{orthanc.study_id(study_uid_of(files[0]))}/series")
        assert [s["MainDicomTags"]["Modality"] for s in study] == ["DOC"], name


def test_listener_receives_from_orthanc_and_stores_back_with_a_fake_pipeline(orthanc, tmp_path):
    """The Orthanc wiring in seconds; the slow test below does the same with the real pipeline."""
    files = make_study(tmp_path / "study", 4)
    uid = study_uid_of(files[0])
    study_id = orthanc.upload(files)
    fake = FakePipeline()
    config = ListenerConfig(aet="PEDSEG", port=orthanc.listener_port, bind="127.0.0.1", spool=tmp_path / "spool",
                            destination=DicomNode(orthanc.aet, "127.0.0.1", orthanc.dicom_port), quiet_s=0.5,
                            poll_s=0.1)
    listener = Listener(config, PipelineConfig(), runner=fake)
    listener.start()
    try:
        orthanc.post("/modalities/pedseg/store", json={"Resources": [study_id], "Synchronous": True})
        wait_for(lambda: state(config.spool, uid) == "sent", timeout=30, what="study sent")
    finally:
        listener.stop()
    assert fake.calls == [(uid, 4)]
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in orthanc.get(f"/studies/{study_id}/series"))
    assert modalities == ["DOC", "MR"]


@pytest.mark.slow
def test_orthanc_round_trip_with_the_real_pipeline(orthanc, tmp_path):
    from pedseg.synth.session import generate_session

    if not (DEMO_BUNDLE / "bundle.json").exists():
        pytest.fail(f"demo bundle missing at {DEMO_BUNDLE}: run scripts/train_demo_bundle.py")
    summary = generate_session(tmp_path / "session", 7)
    study_id = orthanc.upload(sorted((tmp_path / "session" / "dicom").rglob("*.dcm")))
    spool, log_path = tmp_path / "spool", tmp_path / "listener.log"
    command = [sys.executable, "-m", "pedseg.cli.main", "listen", "--aet", "PEDSEG",
               "--port", str(orthanc.listener_port),
               "--bind", "127.0.0.1", "--dest", orthanc.node, "--spool", str(spool), "--quiet-seconds", "2",
               "--fast", "--device", "cpu", "--threads", "2", "--bundle", str(DEMO_BUNDLE)]
    with open(log_path, "wb") as log:
        listener = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (spool / "status.json").exists(), timeout=60, what="listener up")
        t0 = time.monotonic()
        orthanc.post("/modalities/pedseg/store", json={"Resources": [study_id], "Synchronous": True}, timeout=600)
        uid = summary["study_uid"]
        final = wait_for(lambda: state(spool, uid) in ("sent", "failed", "send_failed") and state(spool, uid),
                         timeout=1800, what="the study to be processed and sent")
        print(f"Orthanc -> listener -> pipeline -> Orthanc: {time.monotonic() - t0:.0f} s")
        assert final == "sent", f"{final}: {log_path.read_text()[-3000:]}"
    finally:
        listener.send_signal(signal.SIGTERM)
        assert listener.wait(60) == 0, log_path.read_text()[-3000:]

    # SEG, SR and PDF are in Orthanc, in the same study (Orthanc's study ID hashes patient ID and Study UID).
    series = orthanc.get(f"/studies/{study_id}/series")
    by_modality = {s["MainDicomTags"]["Modality"]: s for s in series}
    assert {"SEG", "SR", "DOC"} <= set(by_modality), sorted(by_modality)
    for modality in ("SEG", "SR", "DOC"):
        [instance] = by_modality[modality]["Instances"]
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        assert tags["StudyInstanceUID"] == uid, modality
    # One SEG series per configured source series (t1c and FLAIR), each referencing its own.
    referenced = set()
    for seg_series in (s for s in series if s["MainDicomTags"]["Modality"] == "SEG"):
        [seg_id] = seg_series["Instances"]
        seg = pydicom.dcmread(io.BytesIO(requests.get(f"{orthanc.url}/instances/{seg_id}/file", timeout=60).content))
        referenced.add(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    assert referenced == {summary["series_uids"]["t1c"], summary["series_uids"]["t2f"]}
    assert "SYNTHETIC^PHANTOM" not in log_path.read_text()  # the listener logs no patient names
