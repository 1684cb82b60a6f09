"""Stage 1 by example: the quantiser's gradients and losses, codebook bookkeeping, a tiny model
learning four crops, the adaptive GAN weight and tiled decoding/encoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.losses import adaptive_gan_weight
from core.vqgan import (
    VQGAN,
    CodeUsage,
    QuantizerOutput,
    VectorQuantizer,
    VQGANConfig,
    tiled_decode,
    tiled_encode,
)

torch.set_num_threads(1)


def tiny_config(l2_normalized: bool, channel_mult=(1, 2)) -> VQGANConfig:
    return VQGANConfig(
        channels=8,
        channel_mult=list(channel_mult),
        z_channels=8,
        codebook_size=16,
        code_dim=4,
        l2_normalized=l2_normalized,
    )


def tiny_model(l2_normalized: bool, channel_mult=(1, 2), seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(tiny_config(l2_normalized, channel_mult))


def four_crops() -> torch.Tensor:
    """Four fixed 32×32 RGB images in [-1, 1]: ramps, waves and an edge."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = [
        torch.stack([x, y, x * y]),
        torch.stack([torch.sin(3 * x), torch.cos(2 * y), -x]),
        torch.stack([(x > 0).float() * 1.6 - 0.8, 0.5 * y, torch.sin(4 * (x + y))]),
        torch.stack([torch.cos(5 * x * y), -y, 1.5 * x.abs() - 0.75]),
    ]
    return 0.8 * torch.stack(images)  # 4,3,32,32


def two_code_quantizer(beta: float) -> VectorQuantizer:
    """Codebook of two plain (not normalised) entries: (0, 0) and (1, 0)."""
    quantizer = VectorQuantizer(codebook_size=2, code_dim=2, beta=beta, l2_normalized=False)
    quantizer.codebook.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    return quantizer


def one_latent() -> torch.Tensor:
    """A single code z = (0.9, 0.2), shape 1,2,1,1: nearest entry (1, 0), squared distance 0.05."""
    return torch.tensor([0.9, 0.2]).view(1, 2, 1, 1).requires_grad_(True)


# ----------------------------------------------------------------------------- quantiser


@pytest.mark.parametrize("l2_normalized", [False, True])
def test_straight_through_gradient_reaches_the_encoder(l2_normalized):
    model = tiny_model(l2_normalized)
    images = torch.rand(2, 3, 16, 16) * 2 - 1

    output, _ = model(images)
    (output - images).abs().mean().backward()  # decoder output only, no VQ loss

    grad = model.encoder.conv_in.weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0


def test_vq_loss_is_codebook_plus_beta_times_commitment():
    quantizer = two_code_quantizer(beta=0.25)

    out = quantizer(one_latent())

    assert out.indices.flatten().tolist() == [1]
    # mean over the two code dimensions of (0.1² + 0.2²) = 0.025, on both sides
    assert out.codebook_loss.item() == pytest.approx(0.025)
    assert out.commitment_loss.item() == pytest.approx(0.025)
    assert out.loss.item() == pytest.approx(0.025 + 0.25 * 0.025)


def test_beta_scales_the_gradient_on_z():
    grads = {}
    for beta in (0.25, 0.5):
        z = one_latent()
        two_code_quantizer(beta)(z).loss.backward()
        grads[beta] = z.grad.flatten()

    # d/dz beta * mean((z - q)²) = beta * (z - q) with z - q = (-0.1, 0.2)
    assert torch.allclose(grads[0.25], torch.tensor([-0.025, 0.05]))
    assert torch.allclose(grads[0.5], 2 * grads[0.25])


def test_beta_leaves_the_codebook_gradient_unchanged():
    grads = {}
    for beta in (0.25, 0.5):
        quantizer = two_code_quantizer(beta)
        quantizer(one_latent()).loss.backward()
        grads[beta] = quantizer.codebook.weight.grad.clone()

    # only entry 1 was picked: d/dq mean((q - z)²) = q - z = (0.1, -0.2)
    expected = torch.tensor([[0.0, 0.0], [0.1, -0.2]])
    assert torch.allclose(grads[0.25], expected)
    assert torch.allclose(grads[0.5], expected)


# ----------------------------------------------------------------------------- codebook usage


def test_four_codes_used_evenly_give_usage_a_quarter_and_perplexity_four():
    usage = CodeUsage(codebook_size=16)

    usage.update(torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]))
    usage.update(torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]]))

    assert usage.usage() == pytest.approx(0.25)
    assert usage.perplexity() == pytest.approx(4.0)


def test_usage_forgets_batches_older_than_the_window():
    usage = CodeUsage(codebook_size=16, window=2)

    usage.update(torch.tensor([5, 6, 7, 8]))
    usage.update(torch.tensor([0, 1]))
    usage.update(torch.tensor([0, 1]))

    assert usage.usage() == pytest.approx(2 / 16)
    assert usage.dead().nonzero().flatten().tolist() == list(range(2, 16))


def test_restart_reseeds_exactly_the_dead_entries():
    quantizer = VectorQuantizer(codebook_size=16, code_dim=4, beta=0.25, l2_normalized=False)
    before = quantizer.codebook.weight.detach().clone()
    usage = CodeUsage(codebook_size=16)
    usage.update(torch.tensor([0, 1, 2, 3, 3, 2]))
    recent = torch.full((5, 4), 7.0)  # identical encoder outputs: no jitter, an exact value

    count = quantizer.restart(usage.dead(), recent, torch.Generator().manual_seed(0))

    after = quantizer.codebook.weight.detach()
    assert count == 12
    assert torch.equal(after[:4], before[:4])
    assert torch.equal(after[4:], torch.full((12, 4), 7.0))


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("l2_normalized", [False, True])
def test_tiny_model_overfits_four_crops(l2_normalized):
    model = tiny_model(l2_normalized, channel_mult=(1, 2, 2))  # f = 4: an 8×8 grid per crop
    images = four_crops()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    losses = []
    for _ in range(100):
        output, quantized = model(images)
        l1 = (output - images).abs().mean()
        losses.append(l1.item())
        optimizer.zero_grad()
        (l1 + quantized.loss).backward()
        optimizer.step()

    assert losses[-1] < losses[0] / 3


# ----------------------------------------------------------------------------- adaptive weight


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    last_layer = nn.Parameter(torch.ones(3))
    rec_loss = (last_layer * torch.tensor([3.0, 4.0, 0.0])).sum()  # gradient norm 5
    gan_loss = (last_layer * torch.tensor([0.0, 6.0, 8.0])).sum()  # gradient norm 10

    weight = adaptive_gan_weight(rec_loss, gan_loss, last_layer)

    assert weight.item() == pytest.approx(0.5, rel=1e-5)


def test_adaptive_weight_stays_finite_when_the_gan_gradient_vanishes():
    model = tiny_model(l2_normalized=True)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    output, _ = model(images)
    rec_loss = (output - images).abs().mean()
    gan_loss = 0 * output.sum()

    weight = adaptive_gan_weight(rec_loss, gan_loss, model.last_layer())

    assert torch.isfinite(weight)
    assert weight.item() == 1e4  # clamped


# ----------------------------------------------------------------------------- tiling


def test_tiled_decode_of_a_large_grid_has_the_full_size():
    model = tiny_model(l2_normalized=True).eval()
    indices = torch.randint(0, 16, (1, 12, 20))

    with torch.no_grad():
        pixels = tiled_decode(model, indices, tile=8)

    assert pixels.shape == (1, 3, 24, 40)  # f = 2
    assert torch.isfinite(pixels).all()


def test_tiled_decode_of_a_grid_within_one_tile_equals_a_whole_decode():
    model = tiny_model(l2_normalized=False).eval()
    indices = torch.randint(0, 16, (2, 8, 6))

    with torch.no_grad():
        whole = model.decode_quantized(model.quantizer.lookup(indices))
        tiled = tiled_decode(model, indices, tile=8)

    assert torch.allclose(tiled, whole, atol=1e-6)


class _PositionEncoder(nn.Module):
    """Stands in for a VQGAN whose every token is the mean of its f×f block of pixels, so a tile
    that starts off the token grid mixes two tokens' pixels."""

    factor = 4

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        indices = F.avg_pool2d(x[:, :1], self.factor)[:, 0].round().long()
        zero = torch.zeros(())
        return QuantizerOutput(x, indices, zero, zero, zero)


def test_tiled_encode_keeps_tiles_on_the_token_grid():
    f, h, w = 4, 25, 30  # 100×120 px: tile starts would fall between tokens if not aligned
    token_ids = torch.arange(h * w, dtype=torch.float32).view(h, w)
    image = token_ids.repeat_interleave(f, 0).repeat_interleave(f, 1)[None, None]

    indices = tiled_encode(_PositionEncoder(), image, tile=32, overlap=8)

    assert torch.equal(indices[0], token_ids.long())
