"""`batchstyle bench video`: how much a clip flickers stylized frame by frame, and what coherence costs.

    clip frames (a video file, or a pan-and-zoom made from a still)
        -> for each variant: temporal_weight 0 (independent frames: every frame a still, every scale) and the
           coherent ones (warped start + temporal loss, frame_iterations per frame after the first)
           every frame through model.frames.stylize_frame, the worker's own per-frame step
        -> temporal error: mean |output t+1 - output t warped by the content's flow| over consistent pixels, in
           8-bit levels, and seconds per frame (first frame included)

The goal set in issue 12: coherent at most a third of the independent error, at no more than 1.3x its time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from batchstyle.images import load_image, resize_long_side
from batchstyle.model.frames import blend_weight, stylize_frame
from batchstyle.model.pixels import tensor_to_image
from batchstyle.model.stylize import Inputs, Stylizer
from batchstyle.model.temporal import consistency, flow_pair, temporal_error
from batchstyle.model.weights import Weights
from batchstyle.options import Settings


@dataclass(frozen=True)
class VideoFigures:
    label: str
    temporal_weight: float
    frame_iterations: int  # for frames after the first (independent: the first frame's iterations)
    temporal_error: float  # 8-bit levels, mean over the clip's frame pairs
    seconds_per_frame: float
    seconds_later_frame: float  # frames after the first only


def pan_and_zoom(photo: Image.Image, frames: int, size: tuple[int, int]) -> list[Image.Image]:
    """A camera move over a still: a pan right by ~1% of the width a frame with a slow zoom in (1% a frame), so
    the flow is neither uniform nor trivial and the clip has a disoccluded edge every frame."""
    w, h = size
    out = []
    for t in range(frames):
        zoom = 1.0 + 0.01 * t
        crop_w, crop_h = photo.width / (1.3 * zoom), photo.height / (1.3 * zoom)
        left = (photo.width - crop_w) * (0.2 + 0.6 * t / max(1, frames - 1))
        top = (photo.height - crop_h) / 2
        out.append(photo.resize((w, h), Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h)))
    return out


def video_figures(
    weights: Weights,
    device: torch.device,
    frames: Sequence[Image.Image],
    style: Image.Image,
    settings: Settings,
    variants: Sequence[tuple[float, int | None]],
    keep: Path | None = None,
    say: Callable[[str], None] = lambda text: None,
) -> list[VideoFigures]:
    """Each variant (temporal_weight, frame_iterations) over the same frames; temporal_weight 0 is independent.
    With `keep`, every variant's frames are written there as PNGs, for looking at frame by frame."""
    stylizer = Stylizer.local(weights, device)
    contents = [resize_long_side(frame, settings.size) for frame in frames]
    pixels = [np.asarray(c) for c in contents]
    flows = [flow_pair(a, b) for a, b in zip(pixels, pixels[1:])]
    masks = [consistency(backward, forward) for backward, forward in flows]
    figures = []
    for weight, later in variants:
        s = dataclasses.replace(settings, temporal_weight=weight, frame_iterations=later)
        label = "independent" if weight == 0 else f"coherent w={weight:g} it={s.later_frame_iterations()}"
        outputs: list[np.ndarray] = []
        seconds: list[float] = []
        previous: torch.Tensor | None = None
        for t, content in enumerate(contents):
            inputs = Inputs(content=content, styles=[style])
            start = time.perf_counter()
            step = None if previous is None else (previous, *flows[t - 1])
            result = stylize_frame(stylizer, inputs, s, previous=step)
            seconds.append(time.perf_counter() - start)
            previous = result.image.clamp(0, 1)
            image = tensor_to_image(previous)
            outputs.append(np.asarray(image))
            if keep is not None:
                folder = keep / label.replace(" ", "_").replace("=", "")
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"frame-{t:03d}.png")
        errors = [temporal_error(a, b, flow[0], mask) for a, b, flow, mask in zip(outputs, outputs[1:], flows, masks)]
        figure = VideoFigures(
            label,
            weight,
            s.later_frame_iterations() if weight > 0 else settings.iterations,
            float(np.mean(errors)),
            float(np.mean(seconds)),
            float(np.mean(seconds[1:])) if len(seconds) > 1 else seconds[0],
        )
        say(format_video(figure))
        figures.append(figure)
    return figures


@dataclass(frozen=True)
class ChunkFigures:
    overlap: int
    border_error: float  # mean temporal error of the frame pairs across the overlap and into the chunk's own frames
    rest_error: float  # of every other pair
    hard_cut_error: float  # the pair at the border when the second chunk starts cold at its first frame, no overlap


def _coherent_run(
    stylizer: Stylizer,
    contents: Sequence[Image.Image],
    flows: Sequence[tuple[np.ndarray, np.ndarray]],
    style: Image.Image,
    s: Settings,
) -> list[np.ndarray]:
    """A chunk as a worker runs it: the first frame a still, each later one from the previous warped."""
    outputs: list[torch.Tensor] = []
    for t, content in enumerate(contents):
        step = None if not outputs else (outputs[-1], *flows[t - 1])
        outputs.append(stylize_frame(stylizer, Inputs(content=content, styles=[style]), s, previous=step).image)
    return [np.asarray(tensor_to_image(x.clamp(0, 1))).astype(np.float32) for x in outputs]


def chunk_figures(
    weights: Weights,
    device: torch.device,
    frames: Sequence[Image.Image],
    style: Image.Image,
    settings: Settings,
    overlap: int = 4,
    keep: Path | None = None,
    say: Callable[[str], None] = lambda text: None,
) -> ChunkFigures:
    """Two chunks as `--clip-chunks 2` runs them: the second starts `overlap` frames early and is blended into the
    first over those frames (`blend_weight`, the ramp the run's assembly uses). Temporal error at the border against
    the rest, and against a cold start with no overlap. With `keep`, the joined clip's frames are written to
    `keep`/chunked."""
    stylizer = Stylizer.local(weights, device)
    contents = [resize_long_side(frame, settings.size) for frame in frames]
    pixels = [np.asarray(c) for c in contents]
    flows = [flow_pair(a, b) for a, b in zip(pixels, pixels[1:])]
    masks = [consistency(backward, forward) for backward, forward in flows]
    n, start = len(contents), len(contents) // 2
    final = _coherent_run(stylizer, contents[:start], flows, style, settings)
    second = _coherent_run(stylizer, contents[start - overlap :], flows[start - overlap :], style, settings)
    for k in range(overlap):
        p = start - overlap + k
        a = blend_weight(p, start - overlap, start)
        final[p] = (1 - a) * final[p] + a * second[k]
    final += second[overlap:]
    if keep is not None:
        (keep / "chunked").mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(final):
            Image.fromarray(frame.round().clip(0, 255).astype(np.uint8)).save(keep / "chunked" / f"frame-{t:03d}.png")
    errors = [temporal_error(final[t], final[t + 1], flows[t][0], masks[t]) for t in range(n - 1)]
    border = set(range(start - overlap - 1, start))  # pairs (t, t+1) that touch a blended or the first owned frame
    cold = _coherent_run(stylizer, contents[start : start + 1], [], style, settings)[0]
    cut = temporal_error(final[start - 1], cold, flows[start - 1][0], masks[start - 1])
    figures = ChunkFigures(
        overlap,
        float(np.mean([errors[t] for t in sorted(border)])),
        float(np.mean([e for t, e in enumerate(errors) if t not in border])),
        cut,
    )
    say(
        f"chunks of {start} and {n - start} frames, overlap {overlap}: temporal error at the border "
        f"{figures.border_error:.2f}, elsewhere {figures.rest_error:.2f}; a cold start without overlap "
        f"{figures.hard_cut_error:.2f} at its first frame"
    )
    return figures


def video_header() -> str:
    return f"{'variant':<28} {'temporal error':>14} {'s/frame':>8} {'s/later frame':>13}"


def format_video(fig: VideoFigures) -> str:
    return f"{fig.label:<28} {fig.temporal_error:>14.2f} {fig.seconds_per_frame:>8.2f} {fig.seconds_later_frame:>13.2f}"


def clip_frames(path: Path, frames: int) -> list[Image.Image]:
    """The first `frames` frames of a video file or frame folder, or a pan-and-zoom over a still image."""
    from batchstyle.video import VIDEO_SUFFIXES, read_frames

    if path.suffix.lower() in VIDEO_SUFFIXES or path.is_dir():
        return [image for _, image in read_frames(path, range(frames))]
    photo = load_image(path)
    height = round(photo.height * 512 / photo.width) // 2 * 2
    return pan_and_zoom(photo, frames, (512, height))
