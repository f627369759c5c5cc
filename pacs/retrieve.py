"""`pedseg pull`: fetch one study into a folder by C-GET, by C-MOVE to a temporary SCP of ours, or by WADO-RS."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom import sop_class as sop

from pedseg.pacs.instances import list_instances, write_instance
from pedseg.pacs.node import DicomNode
from pedseg.pacs.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, read_store_request, storage_ae
from pedseg.pipeline.errors import NetworkError

logger = logging.getLogger(__name__)

# C-GET negotiates a storage context per SOP class up front (at most 128 in all): MR images and the
# derived objects a study next to a segmentation tool holds.
GET_STORAGE_CLASSES = (
    sop.MRImageStorage, sop.EnhancedMRImageStorage, sop.CTImageStorage, sop.EnhancedCTImageStorage,
    sop.SecondaryCaptureImageStorage, sop.SegmentationStorage, sop.ComprehensiveSRStorage,
    sop.Comprehensive3DSRStorage, sop.EnhancedSRStorage, sop.BasicTextSRStorage, sop.EncapsulatedPDFStorage,
)
_PENDING = {0xFF00, 0xFF01}


def pull_study(study_uid: str, source: DicomNode | str, dest: Path, *, calling_aet: str,
               move_port: int | None = None, timeout_s: float = 60.0) -> int:
    """Write every instance of `study_uid` held by `source` into `dest`; returns how many files `dest` holds."""
    dest.mkdir(parents=True, exist_ok=True)
    if isinstance(source, str):
        _wado(study_uid, source, dest, timeout_s)
    else:
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
        if move_port is None:
            _c_get(query, source, dest, calling_aet, timeout_s)
        else:
            _c_move(query, source, dest, calling_aet, move_port, timeout_s)
    count = len(list_instances(dest))
    if not count:
        raise NetworkError(f"{source} returned no instances of study {study_uid}.",
                           hint="Check the Study Instance UID, and that the archive lets this AE title retrieve.")
    logger.info("pulled study %s from %s: %d instances in %s", study_uid, source, count, dest)
    return count


def _store_into(dest: Path):
    def handle(event) -> int:
        try:
            _, sop_uid, encoded = read_store_request(event)
        except ValueError as exc:
            logger.warning("skipped an instance: %s", exc)
            return CANNOT_UNDERSTAND  # one failed sub-operation; the rest of the study still arrives
        try:
            write_instance(dest, sop_uid, encoded)
        except OSError as exc:
            logger.error("cannot store an instance (%s)", exc.strerror)
            return OUT_OF_RESOURCES
        return SUCCESS
    return handle


def _associate(ae: AE, node: DicomNode, timeout_s: float, **kwargs):
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(node.host, node.port, ae_title=node.aet, **kwargs)
    if not assoc.is_established:
        raise NetworkError(f"{node} did not accept an association from {ae.ae_title}.",
                           hint="Check host, port and AE title, and that the archive knows this AE title.")
    return assoc


def _c_get(query: Dataset, node: DicomNode, dest: Path, calling_aet: str, timeout_s: float) -> None:
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(sop.StudyRootQueryRetrieveInformationModelGet)
    for sop_class in GET_STORAGE_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    roles = [build_role(sop_class, scp_role=True) for sop_class in GET_STORAGE_CLASSES]
    assoc = _associate(ae, node, timeout_s, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, _store_into(dest))])
    try:
        _check_responses(assoc.send_c_get(query, sop.StudyRootQueryRetrieveInformationModelGet), node, "C-GET")
    finally:
        if assoc.is_established:
            assoc.release()


def _c_move(query: Dataset, node: DicomNode, dest: Path, calling_aet: str, port: int, timeout_s: float) -> None:
    # The archive sends to the AE title it knows as `calling_aet`: it must map that title to this host and port.
    server = storage_ae(calling_aet).start_server(("0.0.0.0", port), block=False,
                                                  evt_handlers=[(evt.EVT_C_STORE, _store_into(dest))])
    try:
        ae = AE(ae_title=calling_aet)
        ae.add_requested_context(sop.StudyRootQueryRetrieveInformationModelMove)
        assoc = _associate(ae, node, timeout_s)
        try:
            responses = assoc.send_c_move(query, calling_aet, sop.StudyRootQueryRetrieveInformationModelMove)
            _check_responses(responses, node, "C-MOVE")
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        server.shutdown()


def _check_responses(responses, node: DicomNode, what: str) -> None:
    final = None
    for status, _ in responses:
        if status and status.Status not in _PENDING:
            final = status
    if final is None:
        raise NetworkError(f"{node} gave no final {what} status (timeout or aborted association).")
    if final.Status not in (0x0000, 0xB000):  # B000: some sub-operations failed, the rest arrived
        raise NetworkError(f"{node} answered {what} with status 0x{final.Status:04X}.",
                           hint="Check that the archive allows this AE title to retrieve, and knows its address "
                                "for C-MOVE.")
    if final.Status == 0xB000:
        logger.warning("%s: %s finished with %s failed sub-operations", node, what,
                       final.get("NumberOfFailedSuboperations", "some"))


def _wado(study_uid: str, url: str, dest: Path, timeout_s: float) -> None:
    import requests
    from dicomweb_client.api import DICOMwebClient

    try:
        datasets = DICOMwebClient(url=url, timeout=timeout_s).retrieve_study(study_uid)
    except (requests.RequestException, OSError) as exc:
        raise NetworkError(f"{url}: WADO-RS retrieve failed ({type(exc).__name__}).") from exc
    for ds in datasets:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        write_instance(dest, str(ds.SOPInstanceUID), buffer.getvalue())
