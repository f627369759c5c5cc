"""DICOM network peers as given on the command line: `AET@HOST:PORT`, or an http(s) DICOMweb base URL."""
from __future__ import annotations

from dataclasses import dataclass

from pedseg.pipeline.errors import InputError


@dataclass(frozen=True)
class DicomNode:
    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.aet}@{host}:{self.port}"


def parse_node(text: str) -> DicomNode:
    """Parse `AET@HOST:PORT` (an IPv6 host in brackets)."""
    aet, at, address = text.rpartition("@")
    host, colon, port = address.rpartition(":")
    host = host.strip("[]")
    if not (at and colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise InputError(f"'{text}' is not a DICOM node.",
                         hint="Write it as AET@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242.")
    return DicomNode(check_aet(aet), host, int(port))


def check_aet(aet: str) -> str:
    # PS3.5 AE title: 1-16 characters of the default repertoire, no backslash or control characters.
    if not (0 < len(aet) <= 16 and aet.strip() and aet.isascii() and aet.isprintable() and "\\" not in aet):
        raise InputError(f"'{aet}' is not a valid AE title.",
                         hint="Use 1 to 16 printable ASCII characters, no backslash.")
    return aet


def parse_destination(text: str) -> DicomNode | str:
    """A destination is a DICOM node, or the base URL of a DICOMweb service (STOW-RS / WADO-RS)."""
    if text.startswith(("http://", "https://")):
        return text.rstrip("/")
    return parse_node(text)
