"""DICOM codes for the tumour regions, and the constants every DICOM output shares.

Region names, colours and label values come from the label table (pedseg.pipeline.labels); this module maps
each region to its coded concept, in one place. Segment numbers follow the table's order (1 ET, 2 NET, 3 CC,
4 ED, 5 TC, 6 WT), so for the four sub-regions a SEG segment number equals the internal label value. TC and WT
are composite, overlapping segments: the SR's TID 1411 groups reference exactly one segment each, so the
composites need their own segments for their volumes to point at the voxels they were measured on.

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
SEGMENT_NUMBERS: MappingProxyType[str, int] = MappingProxyType(
    {name: number for number, name in enumerate(REGIONS, start=1)})
