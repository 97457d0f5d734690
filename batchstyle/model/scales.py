"""Coarse-to-fine, once: which sizes a stylization passes through, with how many iterations, and at what size its
styles are measured. Torch-free, so planning, checking and TensorRT shape profiles use the very same sequence the
model layer runs.
"""

from __future__ import annotations

import math

from batchstyle.options import Settings


def scale_sizes(min_size: int, size: int) -> list[int]:
    """Long sides for coarse-to-fine: from min_size up to size in steps of about sqrt(2) (each scale doubles the
    pixel count), so every scale starts from an upsampled image that is already close to its own optimum."""
    if not min_size or min_size >= size:
        return [size]
    steps = max(1, math.ceil(math.log(size / min_size) / math.log(math.sqrt(2)) - 1e-9))
    return [round(min_size * (size / min_size) ** (i / steps)) for i in range(steps + 1)]


def scale_plan(settings: Settings) -> list[tuple[int, int]]:
    """(long side, iterations) per scale, coarse to fine; `scale_iterations` is the first scale's when there are
    several."""
    sizes = scale_sizes(settings.min_size, settings.size)
    first = settings.scale_iterations if settings.scale_iterations and len(sizes) > 1 else settings.iterations
    return [(size, first if k == 0 else settings.iterations) for k, size in enumerate(sizes)]


def style_long_side(output_long_side: int, style_scale: float) -> int:
    """Style images are measured at the output's long side times style_scale, as in Johnson's neural-style."""
    return max(16, round(output_long_side * style_scale))
