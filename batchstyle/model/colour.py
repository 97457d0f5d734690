"""Colour control (Gatys et al. 2017, "Controlling Perceptual Factors in Neural Style Transfer", section 5).

`color=transfer` recolours each style image to the content's colour statistics before its targets are taken: the
output keeps the content's palette while the style's strokes, textures and contrasts come through in full colour.
The map is the linear Monge-Kantorovich one between the two Gaussians (the optimal transport map, as in Pitie and
Kokaram's linear colour transfer): of all linear maps matching mean and covariance it moves colours least, so it
does not swap hues the way a plain whitening-colouring (Cholesky) map can. It works in OkLab, a perceptual space, by
default; RGB is what the paper used.

`color=auto`, the default, keeps the painting's palette unless a style's tones are far from the content's
(`tone_gap`, `TONE_GAP`): then that style is recoloured as under `transfer`. A departure from the paper, which leaves
colour to the user: a near-black style otherwise pulls a daylight subject into black (measured on the panel).
"""

from __future__ import annotations

import torch

EPS = 1e-5

# Björn Ottosson's OkLab, from linear sRGB (https://bottosson.github.io/posts/oklab/).
_RGB_TO_LMS = torch.tensor(
    [
        [0.4122214708, 0.5363325363, 0.0514459929],
        [0.2119034982, 0.6806995451, 0.1073969566],
        [0.0883024619, 0.2817188376, 0.6299787005],
    ],
    dtype=torch.float64,
)
_LMS_TO_LAB = torch.tensor(
    [
        [0.2104542553, 0.7936177850, -0.0040720468],
        [1.9779984951, -2.4285922050, 0.4505937099],
        [0.0259040371, 0.7827717662, -0.8086757660],
    ],
    dtype=torch.float64,
)


def _mix(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", matrix.to(image), image)


def srgb_to_oklab(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> OkLab (L in [0, 1], a and b about +-0.4)."""
    linear = torch.where(image <= 0.04045, image / 12.92, ((image.clamp(min=0) + 0.055) / 1.055) ** 2.4)
    lms = _mix(_RGB_TO_LMS, linear)
    return _mix(_LMS_TO_LAB, torch.sign(lms) * lms.abs() ** (1 / 3))


def oklab_to_srgb(image: torch.Tensor) -> torch.Tensor:
    """The inverse of `srgb_to_oklab`, clamped to [0, 1] (a recoloured style may leave the gamut)."""
    lms = _mix(torch.linalg.inv(_LMS_TO_LAB), image) ** 3
    linear = _mix(torch.linalg.inv(_RGB_TO_LMS), lms).clamp(0, 1)
    srgb = torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)
    return srgb.clamp(0, 1)


def colour_moments(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, H, W) -> mean (3,) and covariance (3, 3) of its pixels, in float64."""
    pixels = image.reshape(3, -1).double()
    mean = pixels.mean(dim=1)
    centred = pixels - mean[:, None]
    return mean, centred @ centred.T / pixels.shape[1]


def _sqrtm(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def transfer_map(source_cov: torch.Tensor, target_cov: torch.Tensor) -> torch.Tensor:
    """The symmetric A with A source_cov A = target_cov closest to the identity: the Monge-Kantorovich map."""
    eye = torch.eye(3, dtype=torch.float64, device=source_cov.device)
    source = source_cov + EPS * eye  # a flat (one-colour) style has no covariance to invert
    root = _sqrtm(source)
    inverse_root = torch.linalg.inv(root)
    return inverse_root @ _sqrtm(root @ target_cov @ root) @ inverse_root


def match_colours(style: torch.Tensor, content: torch.Tensor, space: str = "oklab") -> torch.Tensor:
    """`style` (1, 3, H, W) recoloured so its pixels' mean and covariance in `space` equal `content`'s."""
    if space not in ("oklab", "rgb"):
        raise ValueError(f"unknown colour space {space!r}: use oklab or rgb")
    to, back = (srgb_to_oklab, oklab_to_srgb) if space == "oklab" else (lambda x: x, lambda x: x.clamp(0, 1))
    s, c = to(style.double()), to(content.double())
    s_mean, s_cov = colour_moments(s)
    c_mean, c_cov = colour_moments(c)
    a = transfer_map(s_cov, c_cov)
    moved = torch.einsum("ij,bjhw->bihw", a, s - s_mean.view(1, 3, 1, 1)) + c_mean.view(1, 3, 1, 1)
    return back(moved).to(style.dtype)


# color=auto: a style whose tones are this far from the content's is recoloured (as color=transfer) instead of
# painting its own palette over the subject. The gap is the Wasserstein-2 distance between the two images' OkLab
# lightness, taken as Gaussians: sqrt((mean difference)^2 + (spread difference)^2). Chosen on the panel at 512 px
# and the gallery (docs/benchmarks.md#the-panel), each pair's own palette against the recoloured one, side by side:
# - above it, recoloured was plainly better: the near-black Hubble deep field on the five daylight subjects
#   (0.36-0.46: the face, the cat, the street, the bridge and the cup come back from black) and the strokes on the
#   night scene (0.28: the arches and the roofline come back);
# - below it the painting's palette was as good or better: the gallery's launch pad under the strokes (0.23, its
#   mask's region: fiery, where recoloured it went a dull blue), the night scene under the Matisse (0.25: legible
#   both ways, Matisse's colours or the night's), under the deep field (0.20) and The Starry Night (0.18), and every
#   other daylight pair (at most 0.16).
TONE_GAP = 0.26
TONE_SIZE = 256  # long side the tones are measured at: enough for two moments, and cheap at any input size


def _lightness(image: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and spread of OkLab lightness over (1, 3, H, W) `image`, each pixel counted by `weights` (1, 1, H, W)."""
    lightness = srgb_to_oklab(image.double())[:, :1]
    w = torch.ones_like(lightness) if weights is None else weights.double().expand_as(lightness)
    w = w / w.sum().clamp(min=EPS)
    mean = (w * lightness).sum()
    return mean, (w * (lightness - mean) ** 2).sum().sqrt()


def tone_gap(content: torch.Tensor, style: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """How far apart two images' tones are: the W2 distance between their OkLab lightness, as Gaussians. `where`
    (1, 1, H, W) in [0, 1] counts only the content under a style's mask, the part that style paints."""
    (cm, cs), (sm, ss) = _lightness(content, where), _lightness(style)
    return float(((cm - sm) ** 2 + (cs - ss) ** 2).sqrt())


def auto_colour(content: torch.Tensor, style: torch.Tensor, where: torch.Tensor | None = None) -> str:
    """What color=auto does with one style: keep its palette ("style") or recolour it first ("transfer")."""
    return "transfer" if tone_gap(content, style, where) > TONE_GAP else "style"
