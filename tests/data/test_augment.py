"""Batch augmentation: every example of a batch draws its own random transform, BatchAffine warps
exactly as torchvision's v2 affine does, and a seed repeats the draws."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

from reuse_core import data
from reuse_core.data.augment import STRENGTHS, BatchAffine, PerExample, pipeline

KINDS = [(1, (8, 8)), (3, (32, 32))]


def _digit_batch(n: int) -> torch.Tensor:
    """One real digit, repeated: whatever differs between the outputs is the augmentation's doing."""
    x = data.load("digits", split="train", seed=0)[0][0]
    return x.expand(n, -1, -1, -1).clone()


@pytest.mark.parametrize("strength", ["light", "strong"])
@pytest.mark.parametrize(("channels", "size"), KINDS)
def test_two_examples_of_one_batch_get_different_transforms(strength, channels, size):
    torch.manual_seed(0)
    batch = _digit_batch(8)
    if channels == 3:
        batch = torch.nn.functional.interpolate(batch, size=size, mode="bilinear").expand(-1, 3, -1, -1)
        batch = batch * torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1)  # a colour image
    out = pipeline(strength, channels=channels, size=size)(batch.clone())
    assert out.shape == batch.shape and out.dtype == batch.dtype
    distinct = {out[i].numpy().tobytes() for i in range(len(out))}
    assert len(distinct) == len(out), "examples of one batch were transformed alike"
    assert not torch.equal(out, batch)


def test_a_v2_transform_on_a_batch_would_draw_once_and_per_example_fixes_it():
    """Why the module exists: v2 draws one set of parameters per call."""
    torch.manual_seed(0)
    batch = _digit_batch(6)
    once = v2.RandomAffine(degrees=30)(batch)
    assert all(torch.equal(once[0], once[i]) for i in range(len(once)))
    each = PerExample(v2.RandomAffine(degrees=30))(batch)
    assert len({each[i].numpy().tobytes() for i in range(len(each))}) == len(each)


def test_batch_affine_warps_as_torchvision_affine_does():
    torch.manual_seed(1)
    batch = torch.rand(7, 2, 6, 9)  # not square, two channels
    t = BatchAffine(degrees=25, translate=(0.2, 0.3), scale=(0.7, 1.3), shear=(-12, 12, -6, 6))
    params = t.draw(len(batch), 6, 9)
    assert len(set(params["angle"].tolist())) == len(batch)
    assert torch.equal(params["tx"], params["tx"].round()) and params["tx"].abs().max() <= round(0.2 * 9)
    out = t.warp(batch, params)
    for i in range(len(batch)):
        ref = TF.affine(batch[i], angle=float(params["angle"][i]), translate=[float(params["tx"][i]),
                        float(params["ty"][i])], scale=float(params["scale"][i]),
                        shear=[float(params["shear_x"][i]), float(params["shear_y"][i])],
                        interpolation=v2.InterpolationMode.BILINEAR)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_a_seed_repeats_the_draws():
    batch = _digit_batch(5)
    aug = pipeline("strong", channels=1, size=(8, 8))
    torch.manual_seed(3)
    first = aug(batch)
    torch.manual_seed(3)
    assert torch.equal(first, aug(batch))


def test_strengths():
    assert STRENGTHS == ("none", "light", "strong")
    assert pipeline("none", channels=1, size=(8, 8)) is None
    with pytest.raises(ValueError, match="one of none, light, strong, got 'wild'"):
        pipeline("wild", channels=1, size=(8, 8))
    with pytest.raises(ValueError, match=r"batch of images \(N, C, H, W\)"):
        BatchAffine(degrees=5)(torch.rand(1, 8, 8))
