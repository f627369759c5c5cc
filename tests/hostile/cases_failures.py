"""When the tools, the machine or the bundle fail under a good session: dcm2niix failing, writing a broken image
or hanging; a full disk; no memory left; an unexpected exception quoting patient data; broken bundles."""
from __future__ import annotations

import errno
import shutil
import subprocess

import SimpleITK as sitk

import pedseg.pipeline.convert as convert_module
import pedseg.reporting.writers as writers_module
import pedseg.runner as runner_module
from pedseg.pipeline.errors import BundleError, InternalError, ResourceError, UnsupportedDataError

from catalogue import refused
from factories import fake_bundle, fake_model_stages, tiny_atlas_case
from hostile_support import SENTINELS, copy_session, raising, tiny_volume


def truncated_dcm2niix_output(h, name, indir, rawdir) -> None:
    """Stands in for dcm2niix writing a truncated .nii.gz (killed mid-write, or a bug)."""
    path = rawdir / f"{name}.nii.gz"
    sitk.WriteImage(tiny_volume(), str(path), useCompression=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@refused(UnsupportedDataError, "dcm2niix could not convert series ")
def dcm2niix_fails(tmp, template, mp):
    mp.setattr(convert_module.dcm2niix, "bin", shutil.which("false"))
    return copy_session(template, tmp / "in")


@refused(UnsupportedDataError, "dcm2niix wrote an unreadable image for series ")
def corrupt_nifti_from_dcm2niix(tmp, template, mp):
    mp.setattr(convert_module, "_run_dcm2niix", truncated_dcm2niix_output)
    return copy_session(template, tmp / "in")


@refused(ResourceError, "dcm2niix took longer than 900 s on series ")
def dcm2niix_timeout(tmp, template, mp):
    mp.setattr(convert_module.subprocess, "run", raising(subprocess.TimeoutExpired("dcm2niix", 900)))
    return copy_session(template, tmp / "in")


@refused(ResourceError, "The disk is full: writing the work or output files")
def disk_full_while_writing_outputs(tmp, template, mp):
    fake_model_stages(mp, *tiny_atlas_case(tmp / "atlas"))  # to where the writers start
    mp.setattr(writers_module, "write_text", raising(OSError(errno.ENOSPC, "No space left on device")))
    return copy_session(template, tmp / "in")


@refused(ResourceError, "The run ran out of memory.")
def out_of_memory(tmp, template, mp):
    mp.setattr(runner_module, "identify", raising(MemoryError()))
    return copy_session(template, tmp / "in")


@refused(InternalError, "Unexpected ValueError in ")
def unexpected_exception_with_phi_in_its_text(tmp, template, mp):
    error = ValueError(f"cannot parse header of {SENTINELS['PatientName']} ({SENTINELS['PatientID']})")
    mp.setattr(runner_module, "identify", raising(error))
    return copy_session(template, tmp / "in")


@refused(BundleError, "lacks fold 1")
def bundle_missing_a_fold(tmp, template, mp):
    fake_bundle(tmp / "bundle", missing_fold=1)
    return copy_session(template, tmp / "in")


@refused(BundleError, "takes 2 input channels but bundle.json gives it 4 sequences")
def bundle_channels_do_not_match(tmp, template, mp):
    fake_bundle(tmp / "bundle", channels=2)
    return copy_session(template, tmp / "in")


@refused(BundleError, "No bundle.json")
def bundle_without_bundle_json(tmp, template, mp):
    (tmp / "bundle").mkdir()
    return copy_session(template, tmp / "in")


@refused(BundleError, "bundle.json in", "is malformed")
def bundle_json_malformed(tmp, template, mp):
    bundle = fake_bundle(tmp / "bundle")
    (bundle / "bundle.json").write_text('{"name": "half')
    return copy_session(template, tmp / "in")
