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

from typing import Any

import torch
from torch import nn

EPS = 1e-8


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 activations are promoted (Gram sums overflow fp16); float64 stays float64 for exact checks."""
    return torch.promote_types(dtype, torch.float32)


class _Gram(torch.autograd.Function):
    """The Gram matrix with a one-matmul backward.

    Autograd sees F used twice in F F^T and runs two matmuls (and adds them); since dL/dF = (dG + dG^T) F / HW, one
    matmul does. Style Grams are taken at every style layer on every iteration, so this is the largest piece of the
    loop's cost beyond the network's own forward+backward.
    """

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor) -> torch.Tensor:
        # The input, not its fp32 copy, is saved: under autocast that keeps the bf16 activations alone in memory.
        ctx.save_for_backward(features)
        return _gram(features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (features,) = ctx.saved_tensors
        b, c, h, w = features.shape
        # In the features' own dtype (bf16 keeps fp32's range; fp16 would underflow, so it works in fp32): under
        # bf16 the gradient goes on through bf16 convolutions, so computing it in fp32 from an fp32 copy of the
        # features (the largest, at relu1_1) would only cost time, ~5x at 512 px on a CPU.
        work = torch.float32 if features.dtype == torch.float16 else features.dtype
        flat = features.reshape(b, c, h * w).to(work)
        sym = ((grad + grad.transpose(1, 2)) / (h * w)).to(work)
        if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
            # (F^T sym)^T = sym F, since sym is symmetric: the gradient comes out channels_last, like the features,
            # so the convolution's backward gets the layout it runs in and nothing is copied to convert it.
            grad_flat = torch.bmm(flat.transpose(1, 2), sym).transpose(1, 2)
        else:
            grad_flat = torch.bmm(sym, flat)
        return grad_flat.reshape(b, c, h, w).to(features.dtype)


GRAM_CHUNK = 8192  # positions converted to fp32 at a time on a CPU: the converted chunk stays in cache


def _gram(features: torch.Tensor) -> torch.Tensor:
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w)
    dtype = _at_least_fp32(features.dtype)
    if flat.dtype == dtype or flat.device.type != "cpu" or h * w <= GRAM_CHUNK:
        flat = flat.to(dtype)
        return torch.bmm(flat, flat.transpose(1, 2)) / (h * w)
    # bf16 on a CPU: summed in fp32 a chunk of positions at a time, which halves the Gram's time at relu1_1 (the
    # whole fp32 copy of a 512 px relu1_1 is 50 MB, written and read back from memory).
    gram = flat.new_zeros(b, c, c, dtype=dtype)
    for start in range(0, h * w, GRAM_CHUNK):
        chunk = flat[:, :, start : start + GRAM_CHUNK].to(dtype)
        gram.baddbmm_(chunk, chunk.transpose(1, 2))
    return gram / (h * w)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C) channel correlations averaged over positions, in fp32.

    Dividing by H*W makes a style's Gram independent of the image size it was measured at, so a style image may be
    resized (style_scale) or measured at another resolution than the output. Only a differentiated Gram goes
    through the custom backward: targets and exported graphs keep plain operations an exporter can trace.
    """
    if torch.is_grad_enabled() and features.requires_grad:
        return _Gram.apply(features)
    return _gram(features)


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
