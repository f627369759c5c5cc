"""Defacing (pipeline.deface): the face goes, the brain stays, whatever the grid's orientation."""
import numpy as np
import pytest
import SimpleITK as sitk

from pedseg.pipeline.deface import deface

SIZE = 96  # 1 mm voxels; identity direction: index x -> Left, y -> Posterior, z -> Superior (LPS)


def _phantom() -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """A head (ellipsoid), a brain in its upper back part, and a 'face' block in front of and below the brain;
    returns the image, the brain mask and the face's voxel mask, arrays (z, y, x)."""
    z, y, x = np.mgrid[:SIZE, :SIZE, :SIZE]
    head = ((x - 48) / 40) ** 2 + ((y - 48) / 44) ** 2 + ((z - 48) / 44) ** 2 <= 1
    brain = ((x - 48) / 30) ** 2 + ((y - 54) / 30) ** 2 + ((z - 58) / 26) ** 2 <= 1
    face = (y < 20) & (z < 30) & (abs(x - 48) < 15) & head
    values = np.where(brain, 400.0, np.where(head, 150.0, 0.0)).astype(np.float32)
    values[face] = 600.0
    image = sitk.GetImageFromArray(values)
    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask, face


def test_defacing_keeps_the_brain_and_zeroes_the_face():
    image, mask, face = _phantom()
    before = sitk.GetArrayFromImage(image)
    after = sitk.GetArrayFromImage(deface(image, mask))
    brain = sitk.GetArrayFromImage(mask) > 0
    np.testing.assert_array_equal(after[brain], before[brain])
    assert (after[face] == 0).all()
    # Everything anterior-inferior of the brain (in front of its front, below its bottom) is gone...
    z, y, _ = np.nonzero(brain)
    front_below = np.zeros_like(brain)
    front_below[: z.min(), : y.min(), :] = True
    assert (after[front_below] == 0).all()
    # ...and the back of the head (behind and above the brain's centre) is kept.
    back_of_head = (before > 0) & ~brain
    back_of_head[:, :60, :] = False
    back_of_head[:40] = False
    assert back_of_head.sum() > 1000 and (after[back_of_head] == before[back_of_head]).all()


def test_defacing_follows_anatomy_not_array_order():
    """The same head stored right-to-left and anterior-to-posterior (RAS index order, as NIfTI from other tools
    often is) loses the same voxels once both are compared in one physical grid: a flip cannot pass."""
    image, mask, _ = _phantom()
    expected = sitk.GetArrayFromImage(deface(image, mask))

    def flipped(img: sitk.Image) -> sitk.Image:
        return sitk.Flip(img, [True, True, False])  # keeps physical positions, reverses the index order

    stored_ras = deface(flipped(image), flipped(mask))
    assert stored_ras.GetDirection() != image.GetDirection()
    back = sitk.Resample(stored_ras, image, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)


def test_defacing_refuses_a_mask_on_another_grid_or_empty():
    image, mask, _ = _phantom()
    moved = sitk.Image(mask)
    moved.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="same grid"):
        deface(image, moved)
    with pytest.raises(ValueError, match="empty"):
        deface(image, mask * 0)
