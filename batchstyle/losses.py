"""Content, style (Gram) and total-variation losses, each a small module holding its target as a buffer.

Normalisation, and why: every loss is a per-image mean squared error divided by the mean square of its target
(a relative error). Gatys et al. weight each layer by constants tied to its size; dividing by the target's own
energy instead makes each layer's loss start near 1 whatever the layer's size, the image's size, or the weights'
input scale (ImageNet-normalised torchvision VGG and 0..255 Caffe VGG differ by ~100x in activations). That is what
lets one set of default loss weights work for vgg19 and vgg16-hed alike. The target is a constant, so the gradient
is the textbook squared-error gradient, scaled.

Losses return one value per image in the batch, (B,), so batched optimisation can keep images independent.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-8


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 activations are promoted (Gram sums overflow fp16); float64 stays float64 for exact checks."""
    return torch.promote_types(dtype, torch.float32)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C) channel correlations averaged over positions, in fp32.

    Dividing by H*W makes a style's Gram independent of the image size it was measured at, so a style image may be
    resized (style_scale) or measured at another resolution than the output.
    """
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w).to(_at_least_fp32(features.dtype))
    return torch.bmm(flat, flat.transpose(1, 2)) / (h * w)


def _relative_mse(value: torch.Tensor, target: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    diff = (value - target).flatten(1)
    return diff.square().mean(dim=1) / norm


class ContentLoss(nn.Module):
    """Squared error of feature maps against the content image's (Gatys et al., eq. 1)."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().float())
        self.register_buffer("norm", self.target.flatten(1).square().mean(dim=1) + EPS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _relative_mse(features.to(_at_least_fp32(features.dtype)), self.target, self.norm)


class StyleLoss(nn.Module):
    """Squared error of Gram matrices against the style's (Gatys et al., eq. 4). `target` is a Gram matrix."""

    def __init__(self, target_gram: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target_gram.detach().float())
        self.register_buffer("norm", self.target.flatten(1).square().mean(dim=1) + EPS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _relative_mse(gram_matrix(features), self.target, self.norm)


class TVLoss(nn.Module):
    """Squared total variation of the pixels: suppresses the high-frequency noise the optimiser otherwise adds."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dx = (pixels[..., :, 1:] - pixels[..., :, :-1]).flatten(1).square().mean(dim=1)
        dy = (pixels[..., 1:, :] - pixels[..., :-1, :]).flatten(1).square().mean(dim=1)
        return dx + dy
