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

# Sources the codes were checked against (issue 17), cited by the test that pins them
# (tests/test_dicom_outputs.py::test_region_code_triples_are_pinned_with_their_sources):
# - DICOM PS3.16 CID 7159 "Lesion Segmentation Types" and CID 7169 "Brain Lesion Segmentation Types Without
#   Necrosis", as pydicom ships them (pydicom/sr/_cid_dict.py);
# - MHub's SegDB as its brain tumour model uses it: MHubAI/models models/bamf_mr_brain_tumor (meta.json classes
#   NECROSIS, EDEMA, ENHANCING_LESION; config reviewed in https://github.com/MHubAI/models/pull/93: category
#   C_MORPHOLOGICALLY_ABNORMAL_STRUCTURE, EDEMA type T_EDEMA_MABNORMALITY, ENHANCING_LESION "Enhancing Lesion"
#   NCIt), and MHubAI/SegDB segdb/data/types.csv (T_BRAIN_STRUCTURE 12738006, T_NEOPLASM_MALIGNANT_PRIMARY
#   86049000) and segdb/data/segmentations.csv (C_MORPHOLOGICALLY_ABNORMAL_STRUCTURE for tumours).
# The SegDB rows for EDEMA/NECROSIS/ENHANCING_LESION themselves were not in the stored copy searched: their code
# values are the DICOM ones their meanings name (Edema SCT 79654002, Necrosis SCT 6574001, Enhancing Lesion NCIt
# C113842), not read from SegDB.
CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # 49755003, CID 7150; SegDB C_MORPHOLOGICALLY_ABNORMAL_STRUCTURE
ANATOMY = codes.SCT.Brain  # 12738006; SegDB T_BRAIN_STRUCTURE has the same code (meaning "Brain structure")
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence  # 123110, CID 7162
PROCEDURE = codes.DCM.MultiparametricMRI  # 126020, CID 100: the model reads T1, T1c, T2 and FLAIR
VOLUME = codes.SCT.Volume  # 118565006, CID 7469
MILLILITER = Code("ml", "UCUM", "milliliter")  # not in pydicom's dictionary; UCUM code "ml" is exact

# Segmented property type of each region (CID 7159), also the SR's finding type of the region: one table for both.
PROPERTY_TYPES: MappingProxyType[str, Code] = MappingProxyType({
    # Same as MHub's ENHANCING_LESION; CID 7159 and 7169.
    "ET": codes.NCIt.EnhancingLesion,  # C113842
    # BraTS-PEDs 2024 separates non-enhancing tumour from cyst; CID 7159/7169's own code for it. MHub has only
    # NECROSIS (the adult BraTS label 1): not used for NET, which is not necrosis, but read back as NET below.
    "NET": codes.NCIt.NonEnhancingLesion,  # C81175
    # CID 7159. No SegDB entry for a tumour cyst was found: unverified against SegDB.
    "CC": codes.SCT.Cyst,  # 367643001
    # Same as MHub's EDEMA; CID 7159 and 7169.
    "ED": codes.SCT.Edema,  # 79654002
    # CID 7159. SegDB's only tumour type is "Neoplasm, malignant (primary)" (86049000), which asserts a
    # malignancy a child's low-grade glioma does not have: the generic neoplasm is kept. Unverified against SegDB.
    "TC": codes.SCT.Neoplasm,  # 108369006
    # CID 7159; no SegDB entry for a whole (core + oedema) lesion: unverified against SegDB.
    "WT": codes.SCT.Lesion,  # 52988006
})
# Property types other writers use for a region, read back (never written): MHub's brain tumour model codes the
# necrotic core (adult BraTS label 1, which pedseg counts as NET) as Necrosis.
_IMPORTED_TYPES: MappingProxyType[str, Code] = MappingProxyType({
    "NET": codes.SCT.Necrosis,  # 6574001, CID 7159
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
        for table in (PROPERTY_TYPES, _IMPORTED_TYPES):
            for name, code in table.items():
                if (coded.CodeValue, coded.CodingSchemeDesignator) == (code.value, code.scheme_designator):
                    return name
    label = "".join(ch for ch in str(item.get("SegmentLabel", "")).lower() if ch.isalnum())
    by_display = {"".join(ch for ch in r.display_name.lower() if ch.isalnum()): r.name for r in REGIONS.values()}
    return by_display.get(label) or _LABEL_ALIASES.get(label)
