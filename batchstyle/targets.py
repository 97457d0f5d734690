"""Content features and style Gram matrices: what the optimiser is pulled towards.

Targets are forward-only work on fixed images, computed once per job before the pixel loop starts, and kept apart
from the loop so another backend (ONNX Runtime) or a cache can supply them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchstyle.features import VGGFeatures
from batchstyle.losses import gram_matrix


@dataclass(frozen=True)
class Targets:
    content: dict[str, torch.Tensor]  # layer -> (1, C, H, W) feature map of the content image
    style: dict[str, torch.Tensor]  # layer -> (1, C, C) Gram matrix, blended over the row's style images


def style_long_side(output_long_side: int, style_scale: float) -> int:
    """Style images are measured at the output's long side times style_scale, as in Johnson's neural-style."""
    return max(16, round(output_long_side * style_scale))


@torch.no_grad()
def content_features(model: VGGFeatures, content: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    feats = model(content)
    return {name: feats[name].float().clone() for name in layers}


@torch.no_grad()
def style_grams(model: VGGFeatures, style: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    feats = model(style)
    return {name: gram_matrix(feats[name]) for name in layers}


def blend_grams(grams: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Several styles in one row: their Grams mixed by the row's blend weights (normalised to sum to 1)."""
    if len(grams) != len(weights):
        raise ValueError(f"{len(grams)} styles but {len(weights)} blend weights")
    total = float(sum(weights))
    return {layer: sum(g[layer] * (w / total) for g, w in zip(grams, weights)) for layer in grams[0]}


def compute_targets(
    model: VGGFeatures,
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    blend: Sequence[float],
    content_layers: Sequence[str],
    style_layers: Sequence[str],
) -> Targets:
    return Targets(
        content=content_features(model, content, content_layers),
        style=blend_grams([style_grams(model, s, style_layers) for s in styles], blend),
    )
