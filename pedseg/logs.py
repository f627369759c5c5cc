"""Logging in one place: pedseg's own loggers at INFO (DEBUG when verbose), every library at WARNING.

Every module logs through `logger = logging.getLogger(__name__)`, so all of pedseg sits under the "pedseg"
logger. A run shows one line per stage (pedseg.runner) and the warnings; verbose adds pedseg's own detail but
never a library's INFO chatter (highdicom logs nine lines per object written, quoting its UIDs).
"""
from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(message)s"
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that log at INFO themselves: held at WARNING even where a host application set the root lower.
LIBRARIES = ("highdicom", "pydicom", "pynetdicom", "nnunetv2", "deepbet", "matplotlib", "PIL", "numexpr",
             "dicomweb_client", "urllib3", "fw_gear", "flywheel", "jsonschema")


def configure_logging(verbose: bool = False) -> None:
    """For a command-line entry point; does not replace handlers a host (or a test runner) installed."""
    logging.basicConfig(level=logging.WARNING, format=VERBOSE_FORMAT if verbose else FORMAT)
    logging.getLogger("pedseg").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
