"""The hostile-input catalogue: every case is one builder function, registered with the outcome it must have.

A builder takes (tmp, template, mp): a fresh folder, the tiny six-series session of hostile_support (sentinel
patient identifiers in its headers; read-only, copy it first) and pytest's monkeypatch, and returns the input (a
path or a list of paths). A builder that writes a bundle at tmp/"bundle" runs with that bundle.

    @refused(InputError, "no files at all")            # through `pedseg run`: exit code, error.json, console
    @refused(UnsupportedDataError, "...", stage="convert")  # the cheapest stage that shows the refusal
    @accepted()                                        # ingest finds the template's series, nothing lost

Stages: "run" (`pedseg run` with a bundle without weights: stops before preprocessing), "ingest" (`ingest`),
"convert" (ingest, then `convert_series` of the first series). Adding a case is adding one function to one of
the cases_*.py modules beside this one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pedseg.pipeline.errors import PipelineError

Stage = Literal["run", "ingest", "convert"]


@dataclass(frozen=True)
class Case:
    build: Callable[..., Path | list[Path]]
    stage: Stage
    error: type[PipelineError] | None  # None: the input is accepted
    says: tuple[str, ...] = ()  # each a substring of the message
    hint: str = ""  # a substring of the hint (every refusal has one)
    series: tuple[int, ...] | None = None  # accepted: the series numbers ingest finds (None: the template's)
    marks: tuple = field(default=())


CATALOGUE: dict[str, Case] = {}


def register(name: str, case: Case) -> None:
    if name in CATALOGUE:
        raise ValueError(f"two hostile cases named {name!r}")
    CATALOGUE[name] = case


def refused(error: type[PipelineError], *says: str, hint: str = "", stage: Stage = "run", marks: tuple = (),
            name: str = ""):
    """The input ends in `error` (its exit code), with every one of `says` in the message and `hint` in what to do.
    `name`: the case's name when it is not the builder's (builders made in a loop)."""
    def add(build):
        register(name or build.__name__, Case(build, stage, error, says, hint, marks=marks))
        return build
    return add


def accepted(*, series: tuple[int, ...] | None = None, marks: tuple = ()):
    """The input is read as the session it holds: ingest finds `series` (the template's series by default)."""
    def add(build):
        register(build.__name__, Case(build, "ingest", None, series=series, marks=marks))
        return build
    return add
