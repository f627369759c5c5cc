"""Impossible geometry in a series' headers (NaN, negative or zero spacing, no orientation or position): refused
before conversion, naming the series, the value and how many of its images carry it."""
from __future__ import annotations

from pedseg.pipeline.errors import UnsupportedDataError

from catalogue import refused
from hostile_support import PROTOCOLS, edit_files, tiny_volume, write_role

T2 = f"series 3 '{PROTOCOLS['t2w'].description}' has "
UNTRUSTED = "cannot be trusted"


def _set(attr, value, only=None):
    def change(ds, index):
        if only is None or index == only:
            if value is None:
                delattr(ds, attr)
            else:
                setattr(ds, attr, value)
    return change


GEOMETRY = {
    "nan_pixel_spacing": (_set("PixelSpacing", ["nan", "0.9"]), "PixelSpacing 'nan\\0.9'", "all 12 images"),
    "negative_pixel_spacing": (_set("PixelSpacing", [-0.9, 0.9]), "PixelSpacing '-0.9\\0.9'"),
    "zero_pixel_spacing": (_set("PixelSpacing", [0, 0.9]), "PixelSpacing '0"),
    "infinite_pixel_spacing_in_one_file": (_set("PixelSpacing", ["inf", "0.9"], only=5), "PixelSpacing 'inf\\0.9'",
                                           "1 of its 12 images"),
    "no_pixel_spacing": (_set("PixelSpacing", None), "no PixelSpacing"),
    "negative_slice_thickness": (_set("SliceThickness", -4.0), "SliceThickness '-4"),
    "nan_slice_thickness": (_set("SliceThickness", "nan"), "SliceThickness 'nan'"),
    "no_orientation": (_set("ImageOrientationPatient", None), "no ImageOrientationPatient"),
    "zero_orientation": (_set("ImageOrientationPatient", [0, 0, 0, 0, 0, 0]), "ImageOrientationPatient '0"),
    "no_position_in_one_file": (_set("ImagePositionPatient", None, only=0), "no ImagePositionPatient",
                                "1 of its 12 images"),
}


def _t2_with(change):
    def build(tmp, template, mp):
        edit_files(write_role(tmp / "in", "t2w", volumes=[tiny_volume("ax", (0.9, 0.9, 4.0))]), change)
        return tmp / "in"
    return build


for _name, (_change, *_says) in GEOMETRY.items():
    refused(UnsupportedDataError, T2, *_says, UNTRUSTED, hint="Export the series again", stage="convert",
            name=_name)(_t2_with(_change))
