"""DICOM codes for the tumour regions, and the constants every DICOM output shares.

Region names, colours and label values come from the label table (pedseg.pipeline.labels); this module maps
each region to its coded concept, in one place. A SEG numbers its segments from 1 in the order of its regions:
the sub-region SEG 1 ET, 2 NET, 3 CC, 4 ED (segment number = internal label value), the composite SEG 1 TC,
2 WT.

A segment written by another tool (OHIF, Slicer, highdicom) maps back to a region by its segmented property
type, or else by its label (`region_of_segment`).

Every concept is looked up by keyword in pydicom's copy of the DICOM code dictionary (a typo fails at
import), and every segmented property type is a member of CID 7159 "Lesion Segmentation Types"
(ET, NET and ED also of CID 7169 "Brain Lesion Segmentation Types Without Necrosis"); the tests check
membership.
"""
from __future__ import annotations

from types import MappingProxyType

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pedseg.pipeline.labels import REGIONS

MANUFACTURER = "pedseg"
# The tool is for research use only; viewers and archives can show or filter on this (SEG and SR).
CONTENT_QUALIFICATION = "RESEARCH"
# Equipment modules require a serial number; software has none, so every instance carries this constant.
DEVICE_SERIAL_NUMBER = "0"

CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # 49755003, CID 7150
ANATOMY = codes.SCT.Brain  # 12738006
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence  # 123110, CID 7162
PROCEDURE = codes.DCM.MultiparametricMRI  # 126020, CID 100: the model reads T1, T1c, T2 and FLAIR
VOLUME = codes.SCT.Volume  # 118565006, CID 7469
MILLILITER = Code("ml", "UCUM", "milliliter")  # not in pydicom's dictionary; UCUM code "ml" is exact

# Segmented property type of each region (CID 7159).
PROPERTY_TYPES: MappingProxyType[str, Code] = MappingProxyType({
    "ET": codes.NCIt.EnhancingLesion,  # C113842
    "NET": codes.NCIt.NonEnhancingLesion,  # C81175
    "CC": codes.SCT.Cyst,  # 367643001
    "ED": codes.SCT.Edema,  # 79654002
    "TC": codes.SCT.Neoplasm,  # 108369006
    "WT": codes.SCT.Lesion,  # 52988006
})
# Segment labels other tools write for the regions (lower case, without spaces, hyphens or underscores).
_LABEL_ALIASES = MappingProxyType({
    "et": "ET", "enhancingtumour": "ET", "enhancingtumor": "ET", "enhancinglesion": "ET",
    "net": "NET", "nonenhancingtumour": "NET", "nonenhancingtumor": "NET", "nonenhancinglesion": "NET",
    "ncr": "NET", "necrosis": "NET",
    "cc": "CC", "cyst": "CC", "cysticcomponent": "CC",
    "ed": "ED", "oedema": "ED", "edema": "ED", "snfh": "ED",
    "tc": "TC", "tumourcore": "TC", "tumorcore": "TC", "neoplasm": "TC",
    "wt": "WT", "wholetumour": "WT", "wholetumor": "WT", "lesion": "WT",
})


def segment_numbers(regions: tuple[str, ...]) -> dict[str, int]:
    """Region name -> segment number in a SEG holding `regions`, in that order."""
    return {name: number for number, name in enumerate(regions, start=1)}


def region_of_segment(item) -> str | None:
    """The region a SEG's Segment Sequence item stands for: by its segmented property type code, else by its
    label (display name, region name or a common synonym); None when neither matches."""
    if "SegmentedPropertyTypeCodeSequence" in item:
        coded = item.SegmentedPropertyTypeCodeSequence[0]
        for name, code in PROPERTY_TYPES.items():
            if (coded.CodeValue, coded.CodingSchemeDesignator) == (code.value, code.scheme_designator):
                return name
    label = "".join(ch for ch in str(item.get("SegmentLabel", "")).lower() if ch.isalnum())
    by_display = {"".join(ch for ch in r.display_name.lower() if ch.isalnum()): r.name for r in REGIONS.values()}
    return by_display.get(label) or _LABEL_ALIASES.get(label)
