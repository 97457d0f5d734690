"""Content, style (Gram), total-variation and structure (Laplacian) losses, each a small module holding its target
as a buffer.

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
RIDGE = 1e-3  # of the mean feature variance, added to covariances before their square roots
# The moments loss is scaled so that one style_weight means about the same pull for both losses: at the content
# image, the Gram loss's pixel gradient was 0.55-4.1x the moments loss's (geometric mean 1.7) over five pairs
# (astronaut x Starry Night and strokes, chelsea x Matisse, tubingen x Hubble, coffee x The Scream; 256 px).
MOMENTS_GAIN = 1.7


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


def region_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) masks at the image's size -> (B, K, h, w) at a layer's size: each position's share of its
    region, carried down by area averaging (a layer position stands for a block of pixels: Gatys et al. 2017 guide
    each layer by the mask at that layer's resolution)."""
    h, w = like.shape[-2:]
    if mask.shape[-2:] == (h, w):
        return mask
    return torch.nn.functional.adaptive_avg_pool2d(mask, (h, w))


class ContentLoss(nn.Module):
    """Squared error of feature maps against the content image's (Gatys et al., eq. 1).

    `weights` (B, 1, H, W) at the image's size weight the error per position (a content mask: more content where it
    is white); the loss stays a mean, so an all-ones map is the plain loss.
    """

    # Buffers, declared so that the checker sees tensors (nn.Module's __getattr__ says "Tensor | Module").
    target: torch.Tensor
    norm: torch.Tensor
    weights: torch.Tensor | None

    def __init__(self, target: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().float())
        self.register_buffer("norm", self.target.flatten(1).square().mean(dim=1) + EPS)
        self.register_buffer("weights", None if weights is None else region_weights(weights.float(), self.target))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(_at_least_fp32(features.dtype))
        if self.weights is None:
            return _relative_mse(features, self.target, self.norm)
        diff = (features - self.target).square() * self.weights
        return diff.flatten(1).mean(dim=1) / (self.weights.flatten(1).mean(dim=1) * self.norm)


def masked_moments(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) features and (B, K, h, w) region weights -> per region the Gram (B, K, C, C) and mean (B, K, C),
    each averaged over the region's positions (weighted by the mask): a guided Gram matrix (Gatys et al. 2017)."""
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w).to(_at_least_fp32(features.dtype))
    m = masks.reshape(b, -1, h * w).to(flat.dtype)
    area = m.sum(dim=2).clamp(min=EPS)  # (B, K)
    weighted = flat[:, None] * m[:, :, None]  # (B, K, C, N)
    gram = weighted @ flat[:, None].transpose(2, 3) / area[..., None, None]
    mean = weighted.sum(dim=3) / area[..., None]
    return gram, mean


class _SqrtmPSD(torch.autograd.Function):
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition, with the backward of the
    Sylvester equation X dS + dS X = dA solved in the eigenbasis: dA_ij / (sqrt(l_i) + sqrt(l_j)). Autograd through
    `eigh` would divide by l_i - l_j instead, which is infinite for the many equal (zero) eigenvalues of a
    rank-deficient feature covariance; this only needs both eigenvalues not to be zero, and EPS guards that."""

    @staticmethod
    def forward(ctx: Any, matrix: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(matrix)
        roots = values.clamp(min=0).sqrt()
        ctx.save_for_backward(roots, vectors)
        return (vectors * roots[..., None, :]) @ vectors.transpose(-2, -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        roots, vectors = ctx.saved_tensors
        vt = vectors.transpose(-2, -1)
        inner = vt @ grad @ vectors / (roots[..., :, None] + roots[..., None, :] + EPS)
        return vectors @ inner @ vt


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    return _SqrtmPSD.apply(matrix)


def wasserstein2(
    mean: torch.Tensor, cov: torch.Tensor, target_mean: torch.Tensor, target_cov_root: torch.Tensor
) -> torch.Tensor:
    """Squared 2-Wasserstein distance between Gaussians N(mean, cov) and N(target_mean, target_cov), the latter
    given by its square root R: |m - m_t|^2 + tr(cov + target_cov - 2 (R cov R)^(1/2)). Batched over leading dims."""
    cross = sqrtm_psd(target_cov_root @ cov @ target_cov_root)
    target_cov = target_cov_root @ target_cov_root
    trace = torch.diagonal(cov + target_cov - 2 * cross, dim1=-2, dim2=-1).sum(-1)
    return (mean - target_mean).square().sum(-1) + trace


class StyleLoss(nn.Module):
    """The style of one layer against K styles' targets: `grams` (B, K, C, C) and `means` (B, K, C).

    kind "gram": squared error of Gram matrices (Gatys et al., eq. 4), relative to the target's mean square.
    kind "moments": the Wasserstein-2 distance between Gaussians with the features' mean and covariance
    (crowsonkb's style-transfer-pytorch uses it), relative to the target's second moment tr(G); covariance =
    Gram - mean mean^T, so the same cached targets serve both.

    Without `masks`, K is 1 (several styles were blended) and the whole image is compared. With `masks` (B, K, H, W)
    at the image's size, style k is compared over its region only (guided Gram matrices, Gatys et al. 2017), and the
    K losses are summed with `weights` (B, K).
    """

    # Buffers, declared so that the checker sees tensors (nn.Module's __getattr__ says "Tensor | Module"). target
    # is kind "gram"'s alone; ridge, target_mean and target_root are kind "moments"'s alone.
    masks: torch.Tensor | None
    weights: torch.Tensor
    norm: torch.Tensor
    target: torch.Tensor
    ridge: torch.Tensor
    target_mean: torch.Tensor
    target_root: torch.Tensor

    def __init__(
        self,
        grams: torch.Tensor,
        means: torch.Tensor | None = None,
        kind: str = "gram",
        masks: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("gram", "moments"):
            raise ValueError(f"unknown style loss {kind!r}: use gram or moments")
        if means is None:
            if kind == "moments":
                raise ValueError("the moments style loss needs the style's mean features")
            means = grams.new_zeros(grams.shape[:-1])
        if grams.dim() == 3:  # one style per image: (B, C, C)
            grams, means = grams[:, None], means[:, None]
        self.kind = kind
        grams, means = grams.detach().float(), means.detach().float()
        k = grams.shape[1]
        self.register_buffer("masks", None if masks is None else masks.detach().float())
        self.register_buffer("weights", torch.ones(grams.shape[0], k) / k if weights is None else weights.float())
        if kind == "gram":
            self.register_buffer("target", grams)
            self.register_buffer("norm", grams.flatten(2).square().mean(dim=2) + EPS)  # (B, K)
        else:
            cov = grams - means[..., :, None] * means[..., None, :]
            # A small ridge, relative to the layer's own variance, on both covariances: ReLU features are rank
            # deficient, and the square root's gradient grows without bound as an eigenvalue nears zero.
            ridge = RIDGE * torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp(min=EPS)  # (B, K)
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            self.register_buffer("ridge", (ridge[..., None, None] * eye).double())
            self.register_buffer("target_mean", means.double())
            self.register_buffer("target_root", sqrtm_psd(cov.double() + self.ridge))
            self.register_buffer("norm", torch.diagonal(grams, dim1=-2, dim2=-1).sum(-1) + EPS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.masks is None and self.kind == "gram":
            return self.from_moments(gram_matrix(features)[:, None])
        b, c, h, w = features.shape
        masks = features.new_ones(b, 1, h, w) if self.masks is None else region_weights(self.masks, features)
        return self.from_moments(*masked_moments(features, masks))

    def from_moments(self, gram: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """The loss, (B,), from the layer's Gram (B, K, C, C) and mean (B, K, C) per region: all it depends on,
        which is what lets a tiled evaluation sum these over tiles first (`model.tiles`). `mean` only for moments."""
        if self.kind == "gram":
            loss = _relative_mse_k(gram, self.target, self.norm)
        else:
            if mean is None:
                raise ValueError("the moments style loss needs the features' mean")
            # In float64: the square root's eigendecomposition of a 512x512 covariance in float32 gives a gradient
            # too inexact for L-BFGS (measured: the loss climbed from 42 to 400 in 30 iterations at 128 px).
            cov = (gram - mean[..., :, None] * mean[..., None, :]).double() + self.ridge
            w2 = wasserstein2(mean.double(), cov, self.target_mean, self.target_root).to(self.norm.dtype)
            loss = MOMENTS_GAIN * w2 / self.norm
        return (loss * self.weights).sum(dim=1)


def _relative_mse_k(value: torch.Tensor, target: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) against (B, K, ...) -> (B, K), each relative to its target's mean square."""
    return (value - target).flatten(2).square().mean(dim=2) / norm


class TVLoss(nn.Module):
    """Squared total variation of the pixels: suppresses the high-frequency noise the optimiser otherwise adds."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dx = (pixels[..., :, 1:] - pixels[..., :, :-1]).flatten(1).square().mean(dim=1)
        dy = (pixels[..., 1:, :] - pixels[..., :-1, :]).flatten(1).square().mean(dim=1)
        return dx + dy


# The 4-neighbour Laplacian, as Li et al. 2017 (and lapstyle) filter with: an edge or a line gives a strong
# response, a flat or evenly shaded region none.
LAPLACIAN_KERNEL = ((0.0, -1.0, 0.0), (-1.0, 4.0, -1.0), (0.0, -1.0, 0.0))
# The floor of the structure term's normalisation: a flat content (a solid colour) has no Laplacian, and dividing
# by its mean square alone would make one 8-bit level of change cost as much as a whole photo's edges.
LAPLACIAN_FLOOR = (1.0 / 255.0) ** 2


def laplacian(pixels: torch.Tensor, pool: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, ceil(H/pool), ceil(W/pool)): the Laplacian of the channels' sum after `pool` x `pool`
    average pooling, as Li et al. 2017 take it (lapstyle sums the three channels' responses in one convolution).

    Two departures, both at the edges: a last partial pooling window counts (averaged over the pixels it has,
    `ceil_mode`, as the network pools), and the pooled image is padded by repeating its border, so its edge rows
    are compared too (lapstyle's unpadded convolution leaves them out) and a border draws no false edge."""
    pooled = pixels
    if pool > 1:
        pooled = torch.nn.functional.avg_pool2d(pixels, pool, ceil_mode=True)
    summed = pooled.sum(dim=1, keepdim=True)
    kernel = torch.tensor(LAPLACIAN_KERNEL, dtype=summed.dtype, device=summed.device).view(1, 1, 3, 3)
    padded = torch.nn.functional.pad(summed, (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(padded, kernel)


class LaplacianLoss(nn.Module):
    """The structure term of Li et al. 2017 ("Laplacian-Steered Neural Style Transfer"): squared error of the
    output's pooled Laplacian against the content's, relative to the content's (its mean square, floored at
    LAPLACIAN_FLOOR), like every other term. The content and style losses see features whose receptive fields are
    tens of pixels wide, so strokes may move an eye or a mouth; the Laplacian of the lightly pooled pixels pins the
    outlines where they are, at little cost (a pooled image is 1/pool^2 of the pixels, and no network).

    Pixel-level and image-sized, as the temporal loss is: a tiled objective evaluates it on the whole image, so tiled
    equals untiled by construction, and batched images each keep their own target and value."""

    target: torch.Tensor
    norm: torch.Tensor

    def __init__(self, content: torch.Tensor, pool: int) -> None:
        super().__init__()
        self.pool = pool
        target = laplacian(content.detach().float(), pool)
        self.register_buffer("target", target)
        self.register_buffer("norm", target.flatten(1).square().mean(dim=1).clamp(min=LAPLACIAN_FLOOR))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        value = laplacian(pixels.to(_at_least_fp32(pixels.dtype)), self.pool)
        return _relative_mse(value, self.target.to(value.dtype), self.norm.to(value.dtype))
