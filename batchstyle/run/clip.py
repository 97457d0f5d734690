"""A video row, frame by frame: what a worker does with a clip job, and how the parent assembles the finished clip.

    worker (run_clip), for one job = a clip row or one chunk of it:
        frames already in <output>.frames/ with this job's key   -> skipped (a resumed run starts after them)
        first frame of the job: a still, every scale, the row's iterations
        each later frame t:
            flow (cached, model.temporal.FlowCache) between content t-1 and t  -> warp + consistency mask
            start = output t-1 warped; + TemporalLoss(temporal_weight) over the consistent pixels
            one scale at the output size, frame_iterations
        each frame saved atomically as a lossless PNG carrying the key and its position
    parent (assemble_clip), once every chunk of the row is done:
        chunk overlaps blended (lead-in frames of chunk k ramp into chunk k-1's over the overlap)
        -> batchstyle.video.assemble: the output video (or frame folder) written to a temp name and renamed

A frame file is finished work, so a run killed at any moment loses at most the frame being optimised, and a
partial video never exists under the output's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from batchstyle.images import ImageError, load_image, read_metadata, resize_long_side, save_image_atomic
from batchstyle.model.optimize import Losses
from batchstyle.model.pixels import image_to_tensor, luminance_image, tensor_to_image
from batchstyle.model.stylize import Hooks, Inputs, Stylized, Stylizer, style_colours
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
from batchstyle.run.plan import Job
from batchstyle.video import assemble, frames_folder, read_frame, read_frames, select

OnFrameIteration = Callable[[int, Losses], None]  # frames of the job finished, losses: every iteration (a heartbeat)
_LEAD = re.compile(r"lead-(\d{6})\.png$")


def frame_file(folder: Path, position: int, lead: bool = False) -> Path:
    return folder / f"{'lead' if lead else 'frame'}-{position:06d}.png"


def is_finished(path: Path, key: str) -> bool:
    """A frame file written by this job's key (an older run with other settings left frames to redo)."""
    if not path.is_file():
        return False
    try:
        return read_metadata(path).get("batchstyle:key") == key
    except Exception:  # noqa: BLE001 - an unreadable frame is simply not finished
        return False


def indices_of(job: Job) -> list[int]:
    assert job.clip is not None
    return select(job.clip.total, job.settings.frame_span(), job.settings.every)


def run_clip(
    stylizer: Stylizer,
    job: Job,
    cache_dir: Path | None,
    on_iteration: OnFrameIteration | None = None,
) -> tuple[Stylized | None, int, int]:
    """Stylizes the job's frames not finished yet; returns (the last frame's result or None when every frame was
    already there, frames stylized now, iterations done now)."""
    part = job.clip
    assert part is not None
    s = job.settings
    folder = frames_folder(job.output)
    folder.mkdir(parents=True, exist_ok=True)
    files = {p: frame_file(folder, p, lead=p < part.start) for p in range(part.first, part.end)}
    todo = [p for p in range(part.first, part.end) if not is_finished(files[p], job.key)]
    if not todo:
        return None, 0, 0
    resume, pending = todo[0], set(todo)
    indices = indices_of(job)
    styles = [load_image(path) for path in job.row.styles]
    # color=auto decides once, on the clip's first frame: every chunk and every frame then keeps the same palette.
    colours = style_colours(s.color, read_frame(job.row.content, indices[0]), styles) if s.color == "auto" else ()
    coherent = s.temporal_weight > 0
    wanted = range(resume - 1 if resume > part.first else resume, part.end)
    previous: torch.Tensor | None = None
    previous_frame: np.ndarray | None = None
    if resume > part.first and coherent:
        previous = image_to_tensor(load_image(files[resume - 1])).to(stylizer.device)
    flows: FlowCache | None = None
    done_iterations = 0
    last: Stylized | None = None
    stylized = 0
    for position, content in _prefetched(stylizer, job, indices, wanted, resume):
        pixels = np.asarray(content)
        if position < resume:  # the frame before the first to do: its content for the flow, its output above
            previous_frame = pixels
            continue
        if position not in pending:  # finished already (a frame past a gap): kept, and the chain goes on from it
            previous, previous_frame = image_to_tensor(load_image(files[position])).to(stylizer.device), pixels
            continue
        inputs = Inputs(
            content=content,
            styles=styles,
            blend=job.row.blend,
            content_id=f"{job.content_digest}:frame{indices[position]}",
            style_ids=job.style_digests,
            colours=colours,
        )
        finished = part.frames - len(todo) + stylized
        hooks = Hooks(
            on_iteration=None if on_iteration is None else (lambda i, losses, n=finished: on_iteration(n, losses[0]))
        )
        if coherent and previous is not None and previous_frame is not None:
            if flows is None:
                flows = FlowCache(cache_dir, FlowCache.key(job.content_digest, indices, content.size))
            backward, forward = flows.get(position, previous_frame, pixels)
            last = stylize_frame(stylizer, inputs, s, hooks, (previous, backward, forward))
        else:
            last = stylize_frame(stylizer, inputs, s, hooks)
        image = last.image.clamp(0, 1)
        save_image_atomic(
            tensor_to_image(image),
            files[position],
            {
                "batchstyle:key": job.key,
                "batchstyle:frame": str(indices[position]),
                "batchstyle:chunk": str(part.first),  # where the chain of warps this frame ends began
                "Software": "batchstyle",
            },
        )
        done_iterations += last.iterations
        stylized += 1
        previous, previous_frame = image, pixels
    return last, stylized, done_iterations


CONTENT_BATCH = 8  # frames whose content targets go through the target backend (ONNX Runtime) in one call
# The band beside a pan's new strip that the temporal loss lets go of: the pixels a pan brings in over BAND_FRAMES
# frames, at least BAND_MIN_PX and at most BAND_MAX of the frame's short side (looked at: see stylize_frame).
BAND_FRAMES = 8
BAND_MIN_PX = 4.0
BAND_MAX = 0.25


def _prefetched(
    stylizer: Stylizer, job: Job, indices: list[int], positions: range, resume: int
) -> Iterator[tuple[int, Image.Image]]:
    """(position, content at the output size) of the frames at `positions`, CONTENT_BATCH at a time. In a coherent
    clip, frames after the job's first are optimised at the output size only: their content targets are computed
    together first, one batched call to the target backend instead of one per frame, and then found in the cache."""
    assert job.clip is not None
    s, first = job.settings, job.clip.first
    block: list[tuple[int, Image.Image]] = []

    def flush() -> Iterator[tuple[int, Image.Image]]:
        later = [(p, c) for p, c in block if p > first and p >= resume]
        if s.temporal_weight > 0 and len(later) > 1:
            # The names Stylizer._scale gives a content's pixels: "rgb", or "luma" under color=luminance.
            luma = s.color == "luminance"
            items = []
            for position, content in later:
                pixels = image_to_tensor(content).to(stylizer.device)
                digest = f"{job.content_digest}:frame{indices[position]}"
                items.append((digest, "luma" if luma else "rgb", luminance_image(pixels) if luma else pixels))
            stylizer.targets.prefetch(stylizer.graph(s), "content", items)
        yield from block
        block.clear()

    for offset, frame in read_frames(job.row.content, [indices[p] for p in positions]):
        block.append((positions.start + offset, resize_long_side(frame, s.size)))
        if len(block) == CONTENT_BATCH:
            yield from flush()
    yield from flush()


def stylize_frame(
    stylizer: Stylizer,
    inputs: Inputs,
    settings: Settings,
    hooks: Hooks | None = None,
    previous: tuple[torch.Tensor, np.ndarray, np.ndarray] | None = None,
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
    temporal = TemporalLoss(warped, mask, settings.temporal_weight)
    return stylizer.stylize(
        [inputs],
        settings,
        hooks,
        plan=[(settings.size, settings.later_frame_iterations())],
        extra_terms=lambda scale, contents: [temporal],
    )[0]


# -- the parent's side: assembly -------------------------------------------------------------------------------------


def blend_weight(position: int, run_start: int, run_end: int) -> float:
    """The weight of chunk k's lead-in frame at `position` of its overlap [run_start, run_end): a linear ramp
    from 1/(n+1) to n/(n+1), so the clip moves from chunk k-1 to chunk k a step at a time, ending just before the
    frame chunk k owns outright."""
    n = run_end - run_start
    return (position - run_start + 1) / (n + 1)


def final_frames(job: Job, count: int) -> list[Path]:
    """The clip's frames in order, overlaps blended: where chunk k's lead-in covers a frame of chunk k-1, the two
    are mixed (written once as `blend-*.png`, so an interrupted assembly redoes only the encoding)."""
    folder = frames_folder(job.output)
    leads = sorted(
        int(m.group(1))
        for p in folder.glob("lead-*.png")
        if (m := _LEAD.search(p.name)) and is_finished(p, job.key) and int(m.group(1)) < count
    )
    runs: list[tuple[int, int]] = []
    for position in leads:
        if runs and runs[-1][1] == position:
            runs[-1] = (runs[-1][0], position + 1)
        else:
            runs.append((position, position + 1))
    frames = [frame_file(folder, p) for p in range(count)]
    for run_start, run_end in runs:
        # Blended only into the chunk that continued from these lead-ins: after a resume with fewer workers the
        # frames past the overlap may come from the chunk before, and then its own frames are the smooth choice.
        if run_end >= count or _chunk_of(frames[run_end]) != run_start:
            continue
        for p in range(run_start, run_end):
            a = blend_weight(p, run_start, run_end)
            with Image.open(frames[p]) as own, Image.open(frame_file(folder, p, lead=True)) as lead:
                mixed = Image.blend(own.convert("RGB"), lead.convert("RGB"), a)
            path = folder / f"blend-{p:06d}.png"
            save_image_atomic(mixed, path, {"batchstyle:key": job.key})
            frames[p] = path
    return frames


def _chunk_of(path: Path) -> int | None:
    try:
        return int(read_metadata(path).get("batchstyle:chunk", ""))
    except (ValueError, OSError, ImageError):
        return None


def assemble_clip(job: Job) -> list[Path]:
    """Writes the row's output from its finished frames (every chunk done), atomically; returns the frames used."""
    indices = indices_of(job)
    frames = final_frames(job, len(indices))
    missing = [p for p in frames if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"frame {missing[0].name} of {job.output.name} is missing; run again to make it")
    assemble(frames, job.row.content, indices, job.output)
    return frames


def clip_temporal_error(job: Job, frames: list[Path], cache_dir: Path | None) -> float | None:
    """The assembled clip's mean temporal error (8-bit levels): output t+1 against output t warped by the content's
    flow, over consistent pixels (the figure `bench video` prints, and the report shows). The flows are the ones the
    workers cached, so this costs a decode and a warp per frame."""
    indices = indices_of(job)
    errors = []
    before: tuple[np.ndarray, np.ndarray] | None = None
    flows: FlowCache | None = None
    for position, frame in read_frames(job.row.content, indices):
        out = np.asarray(load_image(frames[position]))
        content = np.asarray(resize_long_side(frame, job.settings.size))
        if content.shape != out.shape:
            return None
        if before is not None:
            if flows is None:
                flows = FlowCache(cache_dir, FlowCache.key(job.content_digest, indices, (out.shape[1], out.shape[0])))
            backward, forward = flows.get(position, before[0], content)
            errors.append(temporal_error(before[1], out, backward, consistency(backward, forward)))
        before = (content, out)
    return float(np.mean(errors)) if errors else None
