"""Images as tensors: RGB `PIL.Image` <-> (1, 3, H, W) float32 in [0, 1], and the YIQ colour space that luminance-only
transfer works in. The model layer's half of image handling; files (decoding, checking, saving) stay in
`batchstyle.images`, which imports no torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# NTSC (FCC) RGB -> YIQ. The inverse is computed rather than taken from a table so that the round trip is
# exact to float precision; published inverse coefficients are rounded to three digits.
_RGB_TO_YIQ = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ],
    dtype=torch.float64,
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [0, 1].

    Other modes are refused rather than converted: a silent ``convert`` would treat alpha differently from
    :func:`batchstyle.images.load_image`, which is the way images should enter the pipeline.
    """
    if img.mode != "RGB":
        raise ValueError(f"image_to_tensor needs an RGB image, got mode {img.mode}; load it with load_image")
    array = np.array(img, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().unsqueeze(0).to(torch.float32).div_(255.0)


ENCODE_ROWS = 256


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) tensor in [0, 1] -> RGB image, rounding to the nearest 8-bit value.

    NaNs (a diverged optimisation) become black instead of undefined bytes.
    """
    return Image.fromarray(_quantised(t, 255, np.uint8))


def tensor_to_deep(t: torch.Tensor) -> np.ndarray:
    """The same, to an (H, W, 3) uint16 array (bit_depth 16): the optimiser's pixels are floats, and 8 bits band
    the smooth gradients of skies and skin once an output is graded or printed large."""
    return _quantised(t, 65535, np.uint16)


def _quantised(t: torch.Tensor, top: int, dtype: type[np.integer]) -> np.ndarray:
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (1, 3, H, W) or (3, H, W) tensor, got shape {tuple(t.shape)}")
    _, height, width = t.shape
    array = np.empty((height, width, 3), dtype)
    # A band of rows at a time: converting the whole image at once would hold three float copies of it beside the
    # tensor (1.8 GB at 8192x6144), more than a tiled row's network needs.
    for first in range(0, height, ENCODE_ROWS):
        band = t[:, first : first + ENCODE_ROWS].detach().to("cpu", torch.float32)
        values = torch.nan_to_num(band, nan=0.0).clamp(0.0, 1.0)
        array[first : first + ENCODE_ROWS] = values.mul(top).round().to(torch.int32).permute(1, 2, 0).numpy()
    return array


def _apply_colour_matrix(matrix: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 3 or t.shape[-3] != 3:
        raise ValueError(f"expected a (..., 3, H, W) tensor, got shape {tuple(t.shape)}")
    return torch.einsum("ij,...jhw->...ihw", matrix.to(device=t.device, dtype=t.dtype), t)


def rgb_to_yiq(t: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> YIQ: separates luminance (Y) from chroma (I, Q) for colour preservation."""
    return _apply_colour_matrix(_RGB_TO_YIQ, t)


def yiq_to_rgb(t: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) YIQ -> RGB, the exact inverse of :func:`rgb_to_yiq` (no clamping)."""
    return _apply_colour_matrix(_YIQ_TO_RGB, t)


def luminance_image(t: torch.Tensor, match: torch.Tensor | None = None) -> torch.Tensor:
    """Y of an RGB tensor as a grey 3-channel image (same shape as ``t``), clamped to [0, 1].

    Luminance-only transfer ("preserving colour", Gatys et al. 2016) optimises on these grey images and
    puts the content's colour back afterwards with :func:`recombine_color`. With ``match`` (the content),
    Y is mapped affinely so its mean and population standard deviation equal ``match``'s Y; otherwise a
    dark or low-contrast style would shift the content's brightness. A flat Y has no contrast to scale and
    is only shifted.
    """
    y = rgb_to_yiq(t)[..., :1, :, :]
    if match is not None:
        target = rgb_to_yiq(match.to(device=y.device, dtype=y.dtype))[..., :1, :, :]
        std = y.std(correction=0)
        y = y - y.mean()
        if std > 0:
            y = y * (target.std(correction=0) / std)
        y = y + target.mean()
    return y.clamp(0.0, 1.0).expand(*y.shape[:-3], 3, *y.shape[-2:]).contiguous()


def recombine_color(stylized: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Luminance of ``stylized`` with the chroma of ``content``: the "preserving colour" recombination step.

    ``content`` is resized (bicubic) to the stylised size if they differ, because the stylised output may
    have been produced at a different resolution than the content tensor at hand.
    """
    for name, tensor in (("stylized", stylized), ("content", content)):
        if tensor.dim() != 4 or tensor.shape[1] != 3:
            raise ValueError(f"{name} must be (N, 3, H, W), got shape {tuple(tensor.shape)}")
    content = content.to(device=stylized.device, dtype=stylized.dtype)
    if content.shape[-2:] != stylized.shape[-2:]:
        content = F.interpolate(content, size=stylized.shape[-2:], mode="bicubic", align_corners=False)
        content = content.clamp(0.0, 1.0)
    yiq = torch.cat([rgb_to_yiq(stylized)[:, :1], rgb_to_yiq(content)[:, 1:]], dim=1)
    return yiq_to_rgb(yiq).clamp(0.0, 1.0)
