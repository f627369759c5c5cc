"""Storage SCP pieces shared by the listener and by `pull` (the C-MOVE destination)."""
from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

# Uncompressed only: the pipeline reads what dcm2niix and pydicom read without extra codecs, and a PACS
# transcodes to what the receiver accepts (Orthanc does by default).
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

# C-STORE status codes (PS3.4 B.2.3 and PS3.7 C.4.2).
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def storage_ae(aet: str, allowed_calling_aets: list[str] | None = None) -> AE:
    """An AE that accepts C-ECHO and C-STORE of any storage SOP class."""
    ae = AE(ae_title=aet)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    if allowed_calling_aets:
        ae.require_calling_aet = allowed_calling_aets
    return ae


def read_store_request(event) -> tuple[str, str, bytes]:
    """(StudyInstanceUID, SOPInstanceUID, the instance as a DICOM file) of a C-STORE request; ValueError if unusable."""
    try:
        ds = event.dataset
        study_uid, sop_uid = str(ds.StudyInstanceUID), str(event.request.AffectedSOPInstanceUID)
    except Exception as exc:  # noqa: BLE001 - any decoding problem means we cannot file the instance
        raise ValueError(f"undecodable C-STORE data set ({type(exc).__name__})") from exc
    if not study_uid or not sop_uid:
        raise ValueError("C-STORE data set without Study or SOP Instance UID")
    return study_uid, sop_uid, event.encoded_dataset(include_meta=True)
