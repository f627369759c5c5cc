"""Helpers for the PACS adapter tests: tiny DICOM studies, a C-STORE sender, a destination SCP, a fake pipeline."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import EncapsulatedPDFStorage, MRImageStorage

from pedseg.pacs.instances import list_instances
from pedseg.pacs.scp import storage_ae
from pedseg.reporting.dicom_pdf import write_encapsulated_pdf

from factories import dicom_dataset, write_dicom

PATIENT_NAME, PATIENT_ID = "SENTINEL^PACSPHI", "SENTINEL-MRN-0815"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def make_study(folder: Path, count: int, study_uid: str | None = None) -> list[Path]:
    """`count` 4x4 MR instances of one series; the patient's name and ID are sentinels for PHI checks."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = dicom_dataset(pixels=np.arange(16).reshape(4, 4), StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                           PatientName=PATIENT_NAME, PatientID=PATIENT_ID, Modality="MR", StudyDate="20260105",
                           SeriesNumber=3, InstanceNumber=i + 1)
        path = write_dicom(ds, folder / f"{i:03d}.dcm")
        paths.append(path)
    return paths


def study_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def associate(port: int, called: str = "PEDSEG", calling: str = "SCANNER"):
    ae = AE(ae_title=calling)
    for sop_class in (MRImageStorage, EncapsulatedPDFStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "listener refused the association"
    return assoc


def store(paths: list[Path], port: int, *, abort_after: int | None = None) -> list[int]:
    """C-STORE `paths` over one association; abort it after `abort_after` instances instead of releasing."""
    assoc = associate(port)
    statuses = []
    for i, path in enumerate(paths):
        if abort_after is not None and i == abort_after:
            assoc.abort()
            return statuses
        statuses.append(assoc.send_c_store(pydicom.dcmread(path)).Status)
    assoc.release()
    return statuses


class Destination:
    """A C-STORE SCP standing in for the PACS that receives results."""

    def __init__(self, port: int | None = None, aet: str = "DEST") -> None:
        self.port, self.aet = port or free_port(), aet
        self.received: list[Dataset] = []
        self._server = None

    def __str__(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.port}"

    def start(self) -> Destination:
        def handle(event):
            self.received.append(event.dataset)
            return 0x0000
        self._server = storage_ae(self.aet).start_server(("127.0.0.1", self.port), block=False,
                                                         evt_handlers=[(evt.EVT_C_STORE, handle)])
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()


class FakePipeline:
    """Stands in for `run_pipeline`: writes an encapsulated PDF into the study, as the real one does in report/."""

    def __init__(self, error: Exception | None = None, block: threading.Event | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.stores: list = []  # the measurement store each call was given
        self.error, self.block = error, block
        self.running = 0
        self.max_running = 0

    def __call__(self, input_path: Path, outdir: Path, config, store=None) -> None:
        files = list_instances(Path(input_path))
        self.calls.append((study_uid_of(files[0]), len(files)))
        self.stores.append(store)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.block is not None:
                assert self.block.wait(30), "test never released the fake pipeline"
            if self.error is not None:
                raise self.error
            outdir.mkdir(parents=True, exist_ok=True)
            (outdir / "report.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
            write_encapsulated_pdf(outdir / "report.pdf", files[:1], outdir / "report" / "report_pdf.dcm", title="test")
        finally:
            self.running -= 1


def status(spool: Path) -> dict:
    path = spool / "status.json"
    return json.loads(path.read_text()) if path.exists() else {"studies": {}}


def state(spool: Path, study_uid: str) -> str | None:
    return status(spool)["studies"].get(study_uid, {}).get("state")
