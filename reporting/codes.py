"""Coded concepts, segment numbers and colours for the tumour regions: one table shared by SEG and SR.

Segment numbers 1-4 equal the internal BraTS-PEDs 2024 label values, so a SEG segment number, a label
value and a region name always mean the same thing. TC and WT are composite, overlapping segments
(5 and 6): the SR's TID 1411 groups reference exactly one segment each, so the composites need their
own segments for their volumes to point at the voxels they were measured on.

Every concept is looked up by keyword in pydicom's copy of the DICOM code dictionary (a typo fails at
import), and every segmented property type is a member of CID 7159 "Lesion Segmentation Types"
(ET, NET and ED also of CID 7169 "Brain Lesion Segmentation Types Without Necrosis"); the tests check
membership.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

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


@dataclass(frozen=True)
class Region:
    name: str  # ET, NET, CC, ED, TC, WT
    segment_number: int
    label: str  # Segment Label shown by viewers
    property_type: Code
    rgb: tuple[int, int, int]  # recommended display colour
    members: tuple[int, ...]  # label values that make up the region


REGIONS: dict[str, Region] = {
    r.name: r
    for r in (
        Region("ET", 1, "Enhancing tumor", codes.NCIt.EnhancingLesion, (230, 25, 25), (1,)),  # C113842
        Region("NET", 2, "Non-enhancing tumor", codes.NCIt.NonEnhancingLesion, (255, 220, 0), (2,)),  # C81175
        Region("CC", 3, "Cystic component", codes.SCT.Cyst, (0, 200, 255), (3,)),  # 367643001
        Region("ED", 4, "Peritumoral edema", codes.SCT.Edema, (40, 200, 60), (4,)),  # 79654002
        Region("TC", 5, "Tumor core", codes.SCT.Neoplasm, (255, 130, 0), (1, 2, 3)),  # 108369006
        Region("WT", 6, "Whole tumor", codes.SCT.Lesion, (170, 80, 230), (1, 2, 3, 4)),  # 52988006
    )
}

LABEL_VALUES = (1, 2, 3, 4)  # the mutually exclusive regions; the rest are unions of these
