"""VQGAN stage 1: convolutional encoder, vector quantiser and decoder.

An image (or a condition map) becomes an h×w grid of codebook indices, h = H/f with f = 2^m for
m downsamplings, and back. The same class serves the image model and every spatial condition
stage; only channels and the reconstruction loss differ (see `core.losses`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class VQGANConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 64  # width of the first level; level k has channels * channel_mult[k]
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    res_blocks: int = 1  # residual blocks per level (the decoder uses one more)
    z_channels: int = 128  # encoder output width before the projection to the codebook
    codebook_size: int = 1024
    code_dim: int = 32  # low-dimensional codes are used more evenly
    l2_normalized: bool = True  # compare codes by cosine similarity
    beta: float = 0.25  # commitment weight, applied to the encoder side
    dropout: float = 0.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.norm2 = _norm(channels_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (x if self.shortcut is None else self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of a (low-resolution) feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # B,HW,C
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad keeps H/2 exactly


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        ResBlock(channels, channels, dropout),
        AttentionBlock(channels),
        ResBlock(channels, channels, dropout),
    )


class Encoder(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        current = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.res_blocks):
                layers.append(ResBlock(current, width, config.dropout))
                current = width
            if level == len(widths) - 1:
                layers.append(AttentionBlock(current))  # lowest resolution
            else:
                layers.append(Downsample(current))
        self.down = nn.Sequential(*layers)
        self.mid = _middle(current, config.dropout)
        self.norm_out = _norm(current)
        self.conv_out = nn.Conv2d(current, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.channels * m for m in config.channel_mult]
        current = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, current, 3, padding=1)
        self.mid = _middle(current, config.dropout)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(config.res_blocks + 1):
                layers.append(ResBlock(current, widths[level], config.dropout))
                current = widths[level]
            if level == len(widths) - 1:
                layers.append(AttentionBlock(current))
            if level > 0:
                layers.append(Upsample(current))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(current)
        self.conv_out = nn.Conv2d(current, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # B,D,h,w with the straight-through gradient to the encoder
    indices: torch.Tensor  # B,h,w long
    loss: torch.Tensor  # codebook term + beta * commitment term
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-entry quantiser with a straight-through estimator and dead-code restarts.

    L_VQ = ||sg[z] - z_q||^2 + beta * ||sg[z_q] - z||^2: the first term moves the codebook, the
    second (scaled by beta) commits the encoder.
    """

    def __init__(self, codebook_size: int, code_dim: int, beta: float, l2_normalized: bool):
        super().__init__()
        self.codebook_size = codebook_size
        self.beta = beta
        self.l2_normalized = l2_normalized
        self.codebook = nn.Embedding(codebook_size, code_dim)
        self.codebook.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if l2_normalized:
            self.codebook.weight.data.normal_()

    def entries(self) -> torch.Tensor:
        weight = self.codebook.weight
        return F.normalize(weight, dim=1) if self.l2_normalized else weight

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of the nearest entries to the rows of z (N, D)."""
        codes = self.entries()
        if self.l2_normalized:
            return (z @ codes.t()).argmax(dim=1)
        distances = (z * z).sum(1, keepdim=True) - 2 * z @ codes.t() + (codes * codes).sum(1)
        return distances.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, D, h, w = z.shape
        z = z.float()
        if self.l2_normalized:
            z = F.normalize(z, dim=1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        indices = self.nearest(flat.detach())
        quantized = self.entries()[indices].view(B, h, w, D).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(quantized, z.detach())
        commitment_loss = F.mse_loss(z, quantized.detach())
        loss = codebook_loss + self.beta * commitment_loss
        quantized = z + (quantized - z).detach()  # straight-through
        return QuantizerOutput(
            quantized, indices.view(B, h, w), loss, codebook_loss, commitment_loss
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors B,D,h,w for indices B,h,w."""
        return self.entries()[indices].permute(0, 3, 1, 2)

    @torch.no_grad()
    def restart(self, dead: torch.Tensor, recent: torch.Tensor, generator=None) -> int:
        """Re-seed the entries flagged in `dead` (bool, K) from recent encoder outputs (N, D)."""
        count = int(dead.sum())
        if count == 0 or recent.shape[0] == 0:
            return 0
        picks = torch.randint(0, recent.shape[0], (count,), generator=generator)
        fresh = recent[picks].to(self.codebook.weight)
        noise = torch.randn(fresh.shape, generator=generator).to(fresh)  # CPU generator
        fresh = fresh + 0.01 * fresh.std() * noise
        self.codebook.weight.data[dead] = fresh
        return count


class CodeUsage:
    """Share of codebook entries used over a window of recent batches, and their perplexity."""

    def __init__(self, codebook_size: int, window: int = 50):
        self.codebook_size = codebook_size
        self.window = window
        self.history: list[torch.Tensor] = []

    def update(self, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices.flatten().cpu(), minlength=self.codebook_size)
        self.history = (self.history + [counts])[-self.window :]

    def counts(self) -> torch.Tensor:
        if not self.history:
            return torch.zeros(self.codebook_size, dtype=torch.long)
        return torch.stack(self.history).sum(0)

    def usage(self) -> float:
        return float((self.counts() > 0).float().mean())

    def perplexity(self) -> float:
        counts = self.counts().float()
        if counts.sum() == 0:
            return 0.0
        p = counts / counts.sum()
        return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))

    def dead(self) -> torch.Tensor:
        return self.counts() == 0


class VQGAN(nn.Module):
    """Encoder E, quantiser Q and decoder G: x -> indices -> x_hat."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.code_dim, 1)
        self.quantizer = VectorQuantizer(
            config.codebook_size, config.code_dim, config.beta, config.l2_normalized
        )
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def factor(self) -> int:
        return self.config.downsample_factor

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous codes B,D,h,w before quantisation."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(self.encode_latent(x))

    def decode_quantized(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        quantized = self.encode(x)
        return self.decode_quantized(quantized.quantized), quantized

    def last_layer(self) -> torch.Tensor:
        """The decoder's final weight, where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Indices B,h,w for inputs B,C,H,W (H, W multiples of f); tiled when `tile` is set."""
        if tile is None or max(x.shape[-2:]) <= tile:
            return self.encode(x).indices
        return tiled_encode(self, x, tile)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Decoder output B,C,h*f,w*f for indices B,h,w; tiled when `tile` (in tokens) is set."""
        if tile is None or max(indices.shape[-2:]) <= tile:
            return self.decode_quantized(self.quantizer.lookup(indices))
        return tiled_decode(self, indices, tile)


# ----------------------------------------------------------------------------- tiling


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    count = math.ceil((length - tile) / step) + 1
    starts = [round(k * (length - tile) / (count - 1)) for k in range(count)]
    return sorted(set(starts))


def _blend_ramp(size: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D weights rising over `overlap` at inner edges, flat at the image border."""
    ramp = torch.ones(size)
    if overlap > 0:
        rise = torch.linspace(0, 1, overlap + 2)[1:-1]
        if not at_start:
            ramp[:overlap] = rise
        if not at_end:
            ramp[-overlap:] = rise.flip(0)
    return ramp


def tiled_decode(model: VQGAN, indices: torch.Tensor, tile: int, overlap: int = 4) -> torch.Tensor:
    """Decode a large token grid in overlapping tiles blended with linear ramps.

    GroupNorm statistics and attention see one tile at a time, so the result differs slightly
    from a whole decode; the ramps hide the seams. Peak memory is that of one tile.
    """
    f = model.factor
    B, h, w = indices.shape
    out = None
    weight_sum = torch.zeros(1, 1, h * f, w * f)
    rows, cols = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    for top in rows:
        for left in cols:
            piece = indices[:, top : top + tile, left : left + tile]
            pixels = model.decode_quantized(model.quantizer.lookup(piece)).float()
            if out is None:
                out = torch.zeros(B, pixels.shape[1], h * f, w * f)
            ph, pw = piece.shape[1] * f, piece.shape[2] * f
            ramp_y = _blend_ramp(ph, overlap * f, top == 0, top + tile >= h)
            ramp_x = _blend_ramp(pw, overlap * f, left == 0, left + tile >= w)
            mask = (ramp_y[:, None] * ramp_x[None, :])[None, None]
            y, x = top * f, left * f
            out[:, :, y : y + ph, x : x + pw] += pixels.cpu() * mask
            weight_sum[:, :, y : y + ph, x : x + pw] += mask
    return out / weight_sum


def tiled_encode(model: VQGAN, x: torch.Tensor, tile: int, overlap: int = 64) -> torch.Tensor:
    """Encode a large image in overlapping pixel tiles; each token comes from the tile where it
    sits farthest from a tile edge."""
    f = model.factor
    B, _, H, W = x.shape
    indices = torch.zeros(B, H // f, W // f, dtype=torch.long)
    # tiles start on the token grid, or their tokens would sit up to f-1 pixels off the image's
    rows = [f * s for s in _tile_starts(H // f, tile // f, overlap // f)]
    cols = [f * s for s in _tile_starts(W // f, tile // f, overlap // f)]
    best = torch.full((H // f, W // f), -1.0)
    for top in rows:
        for left in cols:
            piece = x[:, :, top : top + tile, left : left + tile]
            codes = model.encode(piece).indices.cpu()
            th, tw = codes.shape[1:]
            ty, tx = top // f, left // f
            yy = torch.arange(th)[:, None].float()
            xx = torch.arange(tw)[None, :].float()
            margin = torch.minimum(torch.minimum(yy, th - 1 - yy), torch.minimum(xx, tw - 1 - xx))
            region = best[ty : ty + th, tx : tx + tw]
            better = margin > region
            region[better] = margin[better]
            indices[:, ty : ty + th, tx : tx + tw][:, better] = codes[:, better]
    return indices
