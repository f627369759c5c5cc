"""Atomic output files: write to a temporary name beside the target, then rename into place.

A crash or a full disk therefore never leaves half a file under a final name.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import SimpleITK as sitk

# Below this much free space after an image write that came out short, the cause is a full disk.
NEARLY_FULL_BYTES = 16 * 2**20


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto `target`.

    The temporary name keeps the target's suffixes (".nii.gz", ".dcm") so writers that pick a format
    from the extension behave the same.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem.split('.')[0]}.", suffix=f".partial{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; outputs are shared (gear uploads, PACS senders), so honour the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: Path | str, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_image(image: sitk.Image, target: Path | str) -> Path:
    """Write a .nii.gz image atomically. SimpleITK's NIfTI writer reports a short write (a full disk) on stderr
    only and returns normally, and its reader fills a truncated file with zeros, so the gzip stream is checked
    for completeness before the file takes its final name."""
    target = Path(target)
    if not target.name.endswith(".nii.gz"):
        raise ValueError(f"write_image writes .nii.gz files, not {target.name}")
    with atomic_path(target) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        if not _holds_all_voxels(tmp, image):
            full = shutil.disk_usage(tmp.parent).free < NEARLY_FULL_BYTES
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          "No space left on device" if full else "the image file was cut short", target.name)
    return target


def _holds_all_voxels(path: Path, image: sitk.Image) -> bool:
    voxel_bytes = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    try:
        return gzip_length(path) >= voxel_bytes
    except (EOFError, OSError, zlib.error):  # gzip stream ended early or is damaged
        return False


def gzip_length(path: Path) -> int:
    """Decompress a .gz file to its end and return the decompressed length. gzip's own length and CRC check
    raise EOFError, OSError or zlib.error for a cut-short or damaged file, which ITK would read without
    complaint (the missing voxels come out as zeros)."""
    length = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            length += len(chunk)
    return length
