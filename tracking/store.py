"""The measurement store interface every back end implements."""
from __future__ import annotations

from typing import Protocol

from pedseg.pipeline.longitudinal import TimePoint


class MeasurementStore(Protocol):
    def history(self, subject_key: str) -> list[TimePoint]:
        """Every time point recorded for the subject, in any order."""

    def record(self, time_point: TimePoint) -> None:
        """Add the time point, replacing an earlier record of the same study measured by the same bundle."""
