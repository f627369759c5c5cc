"""Send result instances to a DICOM node (C-STORE) or a DICOMweb service (STOW-RS), retrying with backoff."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from pedseg.pacs.instances import list_instances
from pedseg.pacs.node import DicomNode
from pedseg.pipeline.errors import InputError, NetworkError

logger = logging.getLogger(__name__)

# The pipeline's DICOM outputs (pedseg.reporting.writers): DICOM-SEG, TID 1500 SR, encapsulated PDF report.
RESULT_FOLDERS = ("seg", "sr", "report")
# C-STORE statuses that mean "stored": success and the coercion / element warnings of PS3.4 B.2.3.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class SendPolicy:
    attempts: int = 5
    first_delay_s: float = 2.0  # doubles after each failed attempt
    max_delay_s: float = 60.0
    timeout_s: float = 30.0  # association, DIMSE and network timeouts

    def delay(self, failed_attempt: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** (failed_attempt - 1))


def result_files(outdir: Path) -> list[Path]:
    return [f for folder in RESULT_FOLDERS for f in list_instances(Path(outdir) / folder)]


def push_results(outdir: Path, destination: DicomNode | str, *, calling_aet: str, policy: SendPolicy) -> int:
    """Send a pipeline output folder's SEG, SR and encapsulated PDF; returns how many instances were sent."""
    files = result_files(outdir)
    if not files:
        raise InputError(f"No result DICOM files under '{outdir}' ({', '.join(f + '/' for f in RESULT_FOLDERS)}).",
                         hint="Give the output folder of a finished pedseg run.")
    send_files(files, destination, calling_aet=calling_aet, policy=policy)
    return len(files)


def send_files(files: list[Path], destination: DicomNode | str, *, calling_aet: str, policy: SendPolicy,
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Deliver every file, retrying what is left after a failed attempt; NetworkError when attempts run out."""
    pending = list(files)
    if not pending:
        return
    for attempt in range(1, policy.attempts + 1):
        try:
            if isinstance(destination, DicomNode):
                pending = _c_store(pending, destination, calling_aet, policy)
            else:
                pending = _stow(pending, destination, policy)
        except NetworkError as error:
            problem = str(error)
        else:
            if not pending:
                logger.info("sent %d instances to %s", len(files), destination)
                return
            problem = f"{len(pending)} instances were not accepted"
        if attempt < policy.attempts:
            wait = policy.delay(attempt)
            logger.warning("sending to %s, attempt %d/%d failed: %s; retrying in %.0f s",
                           destination, attempt, policy.attempts, problem, wait)
            sleep(wait)
    raise NetworkError(f"Could not deliver {len(pending)} of {len(files)} instances to {destination} "
                       f"after {policy.attempts} attempts ({problem}).",
                       hint="Check that the destination is running and knows this AE title.")


def _c_store(files: list[Path], node: DicomNode, calling_aet: str, policy: SendPolicy) -> list[Path]:
    """One association: returns the files not stored."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = policy.timeout_s
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(sop_class, sorted({syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    assoc = ae.associate(node.host, node.port, ae_title=node.aet)
    if not assoc.is_established:
        why = ("association rejected" if assoc.is_rejected else "association aborted" if assoc.is_aborted
               else "no connection")
        raise NetworkError(f"{node}: {why}")
    left = []
    try:
        for path, ds in zip(files, datasets):
            if not assoc.is_established:  # the peer aborted part-way
                left.append(path)
                continue
            status = assoc.send_c_store(ds)
            code = status.get("Status") if status else None  # empty status: timeout or abort
            if code not in _STORED:
                logger.warning("%s refused %s (status %s)", node, path.name,
                               f"0x{code:04X}" if code is not None else "none")
                left.append(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return left


def _stow(files: list[Path], url: str, policy: SendPolicy) -> list[Path]:
    import requests
    from dicomweb_client.api import DICOMwebClient

    try:
        DICOMwebClient(url=url, timeout=policy.timeout_s).store_instances([pydicom.dcmread(f) for f in files])
    except (requests.RequestException, OSError) as exc:
        raise NetworkError(f"{url}: STOW-RS failed ({type(exc).__name__})") from exc
    return []
