"""Vendor-style acquisition protocols for synthetic sessions: header values a real scanner would write."""
from __future__ import annotations

from dataclasses import dataclass, field

from pedseg.synth.acquire import SeriesGeometry


@dataclass(frozen=True)
class Protocol:
    role: str  # t1n, t1c, t2w, t2f, or a distractor name
    description: str
    geometry: SeriesGeometry
    tr: float
    te: float
    ti: float | None
    flip: float
    scanning_sequence: str
    sequence_variant: str
    sequence_name: str
    acquisition_type: str
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND", "NORM")
    contrast_agent: str = ""
    minutes_after_start: float = 0.0
    extra: dict = field(default_factory=dict)


SAG_3D = SeriesGeometry("sag", 1.0, 1.0, 1.0, (240.0, 240.0, 176.0))
AX_3D = SeriesGeometry("ax", 1.0, 1.0, 1.0, (220.0, 220.0, 170.0))
AX_T2 = SeriesGeometry("ax", 0.9, 4.0, 4.0, (220.0, 220.0, 160.0))
AX_FLAIR_OBLIQUE = SeriesGeometry("ax", 0.9, 5.0, 5.0, (220.0, 220.0, 160.0), tilt_deg=12.0)
SAG_FLAIR_3D = SeriesGeometry("sag", 1.0, 1.0, 1.0, (240.0, 240.0, 176.0))
AX_DWI = SeriesGeometry("ax", 1.8, 5.0, 5.0, (230.0, 230.0, 140.0))

VENDORS = {
    "SIEMENS": {
        "model": "Skyra",
        "t1n": ("t1_mprage_sag_p2_iso", SAG_3D, 2300, 2.3, 900, 8, "GR\\IR", "SK\\SP\\MP", "*tfl3d1_16ns", "3D"),
        "t1c": ("t1_mprage_sag_p2_iso_post", SAG_3D, 2300, 2.3, 900, 8, "GR\\IR", "SK\\SP\\MP", "*tfl3d1_16ns", "3D"),
        "t2w": ("t2_tse_tra_4mm", AX_T2, 5000, 98, None, 150, "SE", "SK\\SP\\OSP", "*tse2d1_15", "2D"),
        "t2f": ("t2_tirm_tra_dark-fluid_5mm", AX_FLAIR_OBLIQUE, 9000, 85, 2500, 150, "SE\\IR", "SK\\SP\\MP",
                "*tir2d1_16", "2D"),
        "dwi": ("ep2d_diff_3scan_trace_p2", AX_DWI, 5600, 89, None, 90, "EP", "SK\\SP", "*ep_b0", "2D"),
        "loc": ("localizer", None, 8.6, 4.0, None, 20, "GR", "SP", "*fl2d1", "2D"),
        "agent": "Gadovist",
    },
    "GE MEDICAL SYSTEMS": {
        "model": "DISCOVERY MR750",
        "t1n": ("Sag 3D BRAVO", SAG_3D, 8.2, 3.2, 450, 12, "GR\\IR", "SS\\SK", "efgre3d", "3D"),
        "t1c": ("Sag 3D BRAVO +C", SAG_3D, 8.2, 3.2, 450, 12, "GR\\IR", "SS\\SK", "efgre3d", "3D"),
        "t2w": ("Ax T2 FSE", AX_T2, 4800, 102, None, 111, "SE", "SK\\OSP", "fse-xl", "2D"),
        "t2f": ("Sag CUBE FLAIR", SAG_FLAIR_3D, 6000, 120, 1800, 90, "SE\\IR", "SK\\SS\\MP", "Cube", "3D"),
        "dwi": ("Ax DWI", AX_DWI, 6000, 80, None, 90, "EP", "SK\\SS", "epi", "2D"),
        "loc": ("3Plane Loc", None, 5.1, 1.7, None, 30, "GR", "SS", "fgre", "2D"),
        "agent": "GADAVIST",
    },
    "Philips": {
        "model": "Ingenia",
        "t1n": ("3D T1 TFE sag", SAG_3D, 8.1, 3.7, 1000, 8, "GR", "SP\\MP", "", "3D"),
        "t1c": ("3D T1 TFE sag Gd", SAG_3D, 8.1, 3.7, 1000, 8, "GR", "SP\\MP", "", "3D"),
        "t2w": ("T2W_TSE_tra", AX_T2, 3000, 80, None, 90, "SE", "SK", "", "2D"),
        "t2f": ("FLAIR_tra", AX_FLAIR_OBLIQUE, 11000, 125, 2800, 90, "SE\\IR", "SK\\MP", "", "2D"),
        "dwi": ("DWI_tra", AX_DWI, 4000, 70, None, 90, "EP", "SK", "", "2D"),
        "loc": ("Survey", None, 11.0, 4.6, None, 15, "GR", "SS", "", "2D"),
        "agent": "Dotarem",
    },
}


def session_protocols(vendor: str) -> list[Protocol]:
    """The series of one exam, in acquisition order; t1c is acquired last, after the contrast injection."""
    v = VENDORS[vendor]
    order = [("loc", 0.0), ("t1n", 2.0), ("t2w", 9.0), ("t2f", 13.0), ("dwi", 18.0), ("t1c", 24.0)]
    out = []
    for role, minutes in order:
        desc, geom, tr, te, ti, flip, seq, var, seqname, acq = v[role]
        image_type = ("ORIGINAL", "PRIMARY", "M", "ND", "NORM")
        if role == "dwi":
            image_type = ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE")
        elif role == "loc":
            image_type = ("ORIGINAL", "PRIMARY", "LOCALIZER")
        out.append(
            Protocol(
                role=role, description=desc, geometry=geom, tr=tr, te=te, ti=ti, flip=flip,
                scanning_sequence=seq, sequence_variant=var, sequence_name=seqname, acquisition_type=acq,
                image_type=image_type, contrast_agent=v["agent"] if role == "t1c" else "",
                minutes_after_start=minutes,
            )
        )
    return out
