"""The real model from DICOM: a real enhancing glioma (the shared BraTS-GLI-00001-000 case) re-acquired as a
DICOM session in native poses and grids (synth/reacquire.py), run with `pedseg run` and no --bundle, held
against what the original DeepMedic software labelled on the BraTS-preprocessed images.

The comparison is made in the patient's anatomy: the label map on the t1c's native grid is carried into BraTS
space with the known acquisition pose. Our rigid registration to the atlas and BraTS's own preprocessing define
atlas frames a few degrees apart (registering the BraTS-space t1c itself to our atlas turns it by about 7
degrees), so the atlas-space label maps of the two cannot be compared voxel by voxel."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from pedseg.cli.main import main
from pedseg.evaluation import region_dice, to_internal
from pedseg.pipeline.atlas import brats_reference_grid
from pedseg.synth.reacquire import find_case_images, reacquire_session

from factories import SHARED_DATA

CASE = "BraTS-GLI-00001-000"
REFERENCE = SHARED_DATA / "deepmedic_reference" / f"{CASE}_deepmedic_labels.nii.gz"


@pytest.mark.slow
def test_real_glioma_from_dicom_agrees_with_the_original_software(shared_data, tmp_path, capsys):
    dicom = reacquire_session(find_case_images(shared_data / "nifti" / f"brats_space_{CASE}"), tmp_path / "session",
                              seed=1)
    # One thread: multi-threaded registration varies run to run (WT 0.908-0.911 seen); one thread repeats exactly.
    assert main(["run", str(dicom), str(tmp_path / "out"), "--device", "cpu", "--threads", "1"]) == 0

    measurements = json.loads((tmp_path / "out" / "measurements.json").read_text())
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["bundle"]["name"] == "captk-deepmedic-brats"  # the default for real sessions
    assert measurements["population_warning"] is None  # the session's patient is 45
    native = sitk.ReadImage(str(tmp_path / "out" / "nifti" / "labels_t1c_native.nii.gz"))
    brats_to_native = sitk.ReadTransform(str(tmp_path / "session" / "ground_truth" / "pose_t1c.tfm")).GetInverse()
    ours = sitk.GetArrayFromImage(sitk.Resample(native, brats_reference_grid(), brats_to_native,
                                                sitk.sitkNearestNeighbor, 0))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(REFERENCE))).astype(np.uint8)  # BraTS 1 NCR, 2 ED, 4 ET
    reference = to_internal(original, "brats2020", REFERENCE)
    dice = region_dice(reference, ours, ("WT", "TC", "ET"))
    print(f"from DICOM vs the original on BraTS images: {dice}")
    assert dice["WT"] >= 0.90
    assert dice["TC"] >= 0.85
    # The report's volumes are the same tumour: within 25 % of the original's (4-5 mm T2 and FLAIR slices blur the
    # oedema's edge; measured: WT +17 %, TC +5 %).
    for region, values in (("WT", (1, 2, 4)), ("TC", (1, 4))):
        original_ml = np.isin(original, values).sum() / 1000
        assert abs(measurements["regions"][region]["volume_ml"] - original_ml) <= 0.25 * original_ml, region
