"""The label table: tumour regions, their label values in each BraTS-PEDs convention, composites, names, colours.

Every stage and writer works in the internal convention, BraTS-PEDs 2024 (0 background, 1 ET, 2 NET, 3 CC,
4 ED); a label map leaves the tool in another convention only where a writer converts it (`convert_labels`).
BraTS-PEDs 2023 has three labels (1 NCR, 2 ED, 3 ET): its NCR is NET and CC together, so a cyst cannot be told
apart in 2023 data and comes back as NET. TC and WT are composites, unions of the four base regions.
Region names are the keys everywhere: bundle.json, measurements.json, the longitudinal store, DICOM codes
(reporting.codes maps a region name to its code).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

import numpy as np

Convention = Literal["2024", "2023"]  # BraTS-PEDs label conventions; LABEL_VALUES below gives each one's values
INTERNAL: Convention = "2024"


@dataclass(frozen=True)
class Region:
    name: str  # ET, NET, CC, ED, TC, WT
    display_name: str  # what a report, a viewer's segment list or a legend shows
    members: tuple[str, ...]  # the base regions it is made of (itself, for a base region)
    colour: tuple[int, int, int]  # RGB, the same in the PDF overlays and as the SEG's recommended display colour

    @property
    def is_composite(self) -> bool:
        return self.members != (self.name,)


_TABLE = (
    Region("ET", "Enhancing tumour", ("ET",), (230, 25, 25)),
    Region("NET", "Non-enhancing tumour", ("NET",), (255, 220, 0)),
    Region("CC", "Cystic component", ("CC",), (0, 200, 255)),
    Region("ED", "Oedema", ("ED",), (40, 200, 60)),
    Region("TC", "Tumour core", ("ET", "NET", "CC"), (255, 130, 0)),
    Region("WT", "Whole tumour", ("ET", "NET", "CC", "ED"), (170, 80, 230)),
)
REGIONS: MappingProxyType[str, Region] = MappingProxyType({r.name: r for r in _TABLE})
BASE_REGIONS = tuple(r.name for r in _TABLE if not r.is_composite)  # mutually exclusive: one label value each
COMPOSITES = tuple(r.name for r in _TABLE if r.is_composite)

# Label value of each region per convention; 2023's regions in terms of the internal base regions.
LABEL_VALUES = MappingProxyType({
    "2024": MappingProxyType({name: value for value, name in enumerate(BASE_REGIONS, start=1)}),
    "2023": MappingProxyType({"NCR": 1, "ED": 2, "ET": 3}),
})
CONVENTIONS: tuple[Convention, ...] = get_args(Convention)
REGIONS_2023 = MappingProxyType({"NCR": ("NET", "CC"), "ED": ("ED",), "ET": ("ET",)})


def base_members(convention: str, name: str) -> tuple[str, ...]:
    """The internal base regions a region of `convention` covers (2023's NCR: NET and CC)."""
    return REGIONS_2023[name] if convention == "2023" else REGIONS[name].members


def internal_value(convention: str, name: str) -> int:
    """The internal label value of a model's region: itself, or for 2023's NCR its first member, NET."""
    return LABEL_VALUES[INTERNAL][base_members(convention, name)[0]]


def region_values(name: str) -> tuple[int, ...]:
    """Internal label values that make up a region or composite."""
    return tuple(LABEL_VALUES[INTERNAL][member] for member in REGIONS[name].members)


def region_mask(labels: np.ndarray, name: str) -> np.ndarray:
    if name not in REGIONS:
        raise ValueError(f"unknown region {name!r}; expected one of {tuple(REGIONS)}")
    return np.isin(labels, region_values(name))


def comparable_across_conventions(name: str) -> bool:
    """True when a region means the same voxels in both conventions: its members are whole 2023 regions (ET, ED,
    TC, WT), unlike NET and CC, which 2023 merges into NCR."""
    members = set(REGIONS[name].members)
    return all(set(group) <= members or not set(group) & members for group in REGIONS_2023.values())


def _lookup(src: str, dst: str) -> dict[int, int]:
    """Label value in `src` -> label value in `dst`, derived from the table (background stays 0)."""
    if src not in LABEL_VALUES or dst not in LABEL_VALUES:
        raise ValueError(f"unknown label conversion {src!r} -> {dst!r}")
    mapping = {0: 0}
    for name, value in LABEL_VALUES[src].items():
        first = base_members(src, name)[0]  # 2023 NCR -> NET: the cyst cannot be recovered
        mapping[value] = next(v for n, v in LABEL_VALUES[dst].items() if first in base_members(dst, n))
    return mapping


def convert_labels(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """A label array in convention `src` as convention `dst` (a new array). 2024 -> 2023: ET 3, NET and CC 1
    (NCR), ED 2. 2023 -> 2024: NCR 2 (NET), ED 4, ET 1."""
    mapping = _lookup(src, dst)
    array = np.asarray(array)
    unknown = sorted(set(np.unique(array).tolist()) - set(mapping))
    if unknown:
        raise ValueError(f"label values {unknown} are not part of the {src} convention")
    lut = np.zeros(max(mapping) + 1, dtype=array.dtype)
    for value, target in mapping.items():
        lut[value] = target
    return lut[array.astype(np.intp, copy=False)]
