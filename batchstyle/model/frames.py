"""A clip's frames stylized one after another (Ruder, Dosovitskiy & Brox, 2016): the model's side of a video row.

    FrameChain, one per chain of frames (a clip row, or one chunk of it), frame by frame in order:
        carry(content, output)       a frame the chain goes on from without stylizing it now (a resumed job's
                                     frame before its first to do, a frame already finished past a gap)
        stylize(position, inputs)    the chain's first frame (or temporal_weight 0): a still, every scale
                                     a later frame: flows from the one before (temporal.FlowCache, on disk)
                                         -> stylize_frame: start from the previous output warped, what a pan brings
                                            into view from the content; + TemporalLoss over the consistent pixels,
                                            let go of over the entering band; one scale, later_frame_iterations
    blend_weight: how a chunk's lead-in frames are blended into the chunk before, where two chains meet
    prefetch_contents: later frames' content targets in one target-backend call, so each frame's lookup is a hit
    flicker: an assembled clip's temporal error, over the flows the chain cached

The run layer (`run/clip.py`) reads and writes the frame files, splits a clip into chunks and assembles it; the
warps, masks and losses are all here, so it builds none of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from batchstyle.model.pixels import image_to_tensor, luminance_image
from batchstyle.model.stylize import Hooks, Inputs, Stylized, Stylizer
from batchstyle.model.temporal import (
    FlowCache,
    TemporalLoss,
    consistency,
    entering_band,
    temporal_error,
    uncovered,
    warp,
)
from batchstyle.options import Settings

# The band beside a pan's new strip that the temporal loss lets go of: the pixels a pan brings in over BAND_FRAMES
# frames, at least BAND_MIN_PX and at most BAND_MAX of the frame's short side (looked at: see stylize_frame).
BAND_FRAMES = 8
BAND_MIN_PX = 4.0
BAND_MAX = 0.25

Previous = tuple[torch.Tensor, np.ndarray, np.ndarray]  # previous output (1, 3, H, W), backward flow, forward flow


def stylize_frame(
    stylizer: Stylizer,
    inputs: Inputs,
    settings: Settings,
    hooks: Hooks | None = None,
    previous: Previous | None = None,
) -> Stylized:
    """One frame. Without `previous` (the first frame, or temporal_weight 0): a still, every scale. With it, the
    previous output (1, 3, H, W) and the (backward, forward) flows to this frame: start from the previous output
    warped, add the temporal loss over the consistent pixels, one scale of `later_frame_iterations`."""
    if previous is None or settings.temporal_weight <= 0:
        return stylizer.stylize([inputs], settings, hooks)[0]
    output, backward, forward = previous
    device = stylizer.device
    mask = torch.from_numpy(consistency(backward, forward))[None, None].to(device)
    flow = torch.from_numpy(backward)[None].to(device)
    # Bicubic: bilinear warps, one a frame, each from the last, visibly softened a 10-frame pan by its end.
    warped = warp(output.to(device), flow, padding="reflection", mode="bicubic")
    if settings.color == "luminance":  # what is optimised there is the grey image; colour is put back after
        warped = luminance_image(warped)
    new = uncovered(backward)
    if new.any():
        # What a pan brings into view starts from the content, and the temporal loss lets go of a band beside it
        # (`entering_band`), so that it is painted together with its neighbours. Looked at frame by frame
        # (`bench video --keep`, chelsea panned under strokes, 12 frames at 192 px): mirroring the previous output
        # there gave horizontal bands; the content alone stayed a photograph, as the rest of the frame already meets
        # the style loss; a Gram matrix over the band alone (a guided Gram) painted it over-saturated in the style's
        # dominant red, as a region carries only part of a style's statistics; a band of 4 frames of motion left
        # vertical stripes, 8 frames did not.
        start = image_to_tensor(inputs.content).to(device)
        if settings.color == "luminance":
            start = luminance_image(start)
        if start.shape[-2:] != warped.shape[-2:]:
            start = torch.nn.functional.interpolate(start, size=warped.shape[-2:], mode="bilinear", antialias=True)
        warped = torch.where(torch.from_numpy(new)[None, None].to(device) > 0, start, warped)
        speed = float(np.median(np.hypot(backward[..., 0], backward[..., 1])[new > 0]))
        width = min(BAND_MAX * min(backward.shape[:2]), max(BAND_MIN_PX, BAND_FRAMES * speed))
        mask = mask * (1 - torch.from_numpy(entering_band(new, width))[None, None].to(device))
    inputs.start = warped
    temporal = TemporalLoss(warped, mask)  # weighted by settings.temporal_weight, as the term named "temporal"
    return stylizer.stylize(
        [inputs],
        settings,
        hooks,
        plan=[(settings.size, settings.later_frame_iterations())],
        extra_terms=lambda scale, contents: {"temporal": temporal},
    )[0]


def _flow_cache(cache_dir: Path | None, clip_digest: str, selection: Sequence[int], size: tuple[int, int]) -> FlowCache:
    """The flows of one clip's frame selection at one size: the cache the chain fills and `flicker` reads."""
    return FlowCache(cache_dir, FlowCache.key(clip_digest, selection, size))


class FrameChain:
    """A chain of a clip's frames, each stylized from the one before it: the previous frame's content (for the flow)
    and output (the start and the temporal loss's target), and the clip's flow cache.

    `selection` is the clip's selected frame indices (the flow cache's address), and a frame's `position` its place
    in them; `clip_digest` the clip file's digest. Frames must come in order of position."""

    def __init__(
        self,
        stylizer: Stylizer,
        settings: Settings,
        cache_dir: Path | None,
        clip_digest: str,
        selection: Sequence[int],
    ) -> None:
        self.stylizer, self.settings = stylizer, settings
        self.cache_dir, self.clip_digest, self.selection = cache_dir, clip_digest, list(selection)
        self.flows: FlowCache | None = None
        self.output: torch.Tensor | None = None
        self.content: np.ndarray | None = None

    @property
    def coherent(self) -> bool:
        """Whether a frame's output carries into the next (temporal_weight > 0): without it every frame is a still,
        and a caller need not read back outputs to `carry`."""
        return self.settings.temporal_weight > 0

    def carry(self, content: Image.Image, output: Image.Image | None) -> None:
        """A frame not stylized now that the next one goes on from: its content at the output size, and its output
        (None when not `coherent`)."""
        self.content = np.asarray(content)
        self.output = None
        if output is not None and self.coherent:
            self.output = image_to_tensor(output).to(self.stylizer.device)

    def stylize(self, position: int, inputs: Inputs, hooks: Hooks | None = None) -> Stylized:
        """The frame at `position`, its content (at the output size) in `inputs`: from the previous frame's output
        when the chain has one and is coherent, else a still."""
        pixels = np.asarray(inputs.content)
        previous: Previous | None = None
        if self.coherent and self.output is not None and self.content is not None:
            if self.flows is None:
                self.flows = _flow_cache(self.cache_dir, self.clip_digest, self.selection, inputs.content.size)
            backward, forward = self.flows.get(position, self.content, pixels)
            previous = (self.output, backward, forward)
        result = stylize_frame(self.stylizer, inputs, self.settings, hooks, previous)
        self.output, self.content = result.image.clamp(0, 1), pixels
        return result


def blend_weight(position: int, run_start: int, run_end: int) -> float:
    """How two chunks of a clip, each a chain of its own, join: the weight of chunk k's lead-in frame at `position`
    of its overlap [run_start, run_end), a linear ramp from 1/(n+1) to n/(n+1), so the clip moves from chunk k-1 to
    chunk k a step at a time, ending just before the frame chunk k owns outright. The run's assembly
    (`run.clip.final_frames`) and `bench video --chunks` both blend by it."""
    n = run_end - run_start
    return (position - run_start + 1) / (n + 1)


def prefetch_contents(stylizer: Stylizer, settings: Settings, frames: Sequence[tuple[str, Image.Image]]) -> None:
    """The content targets of a coherent chain's later frames, (content id, content at the output size), computed
    in one call to the target backend (ONNX Runtime) and cached, so each frame's own lookup is then a hit. Only
    those frames are optimised at the output size alone (`stylize_frame`), so only theirs are known ahead; a still's
    every scale needs its own, and one frame is no batch."""
    if settings.temporal_weight <= 0 or len(frames) < 2:
        return
    # The names Stylizer._scale gives a content's pixels: "rgb", or "luma" under color=luminance.
    luma = settings.color == "luminance"
    items = []
    for content_id, content in frames:
        pixels = image_to_tensor(content).to(stylizer.device)
        items.append((content_id, "luma" if luma else "rgb", luminance_image(pixels) if luma else pixels))
    stylizer.targets.prefetch(stylizer.graph(settings), "content", items)


def flicker(
    cache_dir: Path | None,
    clip_digest: str,
    selection: Sequence[int],
    frames: Iterable[tuple[int, np.ndarray, np.ndarray]],
) -> float | None:
    """A clip's mean temporal error (8-bit levels): output t+1 against output t warped by the content's flow, over
    consistent pixels. `frames` are (position, content at the output size, output), uint8 (H, W, 3), in order; the
    flows are the ones the chain cached, so this costs a warp per frame. None when there is no pair to measure, or
    when an output's size is not its content's."""
    errors = []
    before: tuple[np.ndarray, np.ndarray] | None = None
    flows: FlowCache | None = None
    for position, content, output in frames:
        if content.shape != output.shape:
            return None
        if before is not None:
            if flows is None:
                flows = _flow_cache(cache_dir, clip_digest, selection, (output.shape[1], output.shape[0]))
            backward, forward = flows.get(position, before[0], content)
            errors.append(temporal_error(before[1], output, backward, consistency(backward, forward)))
        before = (content, output)
    return float(np.mean(errors)) if errors else None
