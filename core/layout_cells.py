"""A layout condition stage with nothing to train: one token per f x f cell, its majority class.

The trained layout VQGAN (`configs/layout.yaml`) reconstructed only 48 % of val pixels after
25 CPU minutes, while "each 16 x 16 cell takes its most frequent class" keeps 86 % of them
(291 val label maps, 128 px centre squares). At f = 16 the transformer sees one condition token
per image token either way, so the cell grid gives it the layout nearly losslessly at the
token scale, with 14 condition ids (the palette's classes and "free") whose meaning never
drifts. It is a checkpoint like the other stages (kind `cells:layout`), so bundles, hashes and
`Pipeline.load` treat it alike; `python train.py cells` writes one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KIND = "cells:layout"


@dataclass
class CellsConfig:
    classes: int = 14  # one-hot channels: the palette's classes and "free"
    downsample_factor: int = 16  # must equal the image VQGAN's f

    @property
    def codebook_size(self) -> int:
        return self.classes


class LayoutCells(nn.Module):
    """One-hot layouts B x classes x H x W <-> cell grids B x H/f x W/f of class ids."""

    def __init__(self, config: CellsConfig):
        super().__init__()
        if config.classes < 2 or config.downsample_factor < 1:
            raise ValueError(
                f"cells need at least 2 classes and f >= 1, got {config.classes} and "
                f"{config.downsample_factor}"
            )
        self.config = config
        # The code table (token id -> class id): the identity, stored so that the checkpoint's
        # weights (and so its hash) name the class count and f.
        self.register_buffer("class_of_token", torch.arange(config.classes))
        self.register_buffer("factor_tensor", torch.tensor(config.downsample_factor))

    @property
    def factor(self) -> int:
        return self.config.downsample_factor

    def encode_indices(self, x: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Class ids B, h, w: the most frequent class of each cell (ties: the lower id).

        `tile` is accepted for the VQGAN interface; pooling needs no tiling.
        """
        if x.dim() != 4 or x.shape[1] != self.config.classes:
            raise ValueError(
                f"expected one-hot layouts B x {self.config.classes} x H x W, got {tuple(x.shape)}"
            )
        f = self.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"layout size {tuple(x.shape[-2:])} is not a multiple of f = {f}")
        counts = F.avg_pool2d(x.float(), f)  # B, classes, h, w: share of each class per cell
        return counts.argmax(dim=1)

    def decode_indices(self, indices: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """One-hot layouts B x classes x h*f x w*f (each cell filled with its class)."""
        one_hot = F.one_hot(self.class_of_token[indices], self.config.classes)
        one_hot = one_hot.permute(0, 3, 1, 2).float()
        return one_hot.repeat_interleave(self.factor, 2).repeat_interleave(self.factor, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and a zero loss, as a VQGAN's forward returns."""
        return self.decode_indices(self.encode_indices(x)), x.new_zeros(())
