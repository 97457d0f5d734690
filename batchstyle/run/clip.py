"""A video row, frame by frame: what a worker does with a clip job, and how the parent assembles the finished clip.

    worker (run_clip), for one job = a clip row or one chunk of it:
        frames already in <output>.frames/ with this job's key   -> skipped (a resumed run starts after them)
        frames read CONTENT_BATCH at a time, resized to the output size
        each frame to do -> model.frames.FrameChain: the job's first frame a still (every scale, the row's
            iterations); each later one from frame t-1's output warped by the flow, with the temporal loss, one scale
            of frame_iterations (the warp, masks and loss are the model layer's; this layer builds none)
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
from contextlib import closing
from pathlib import Path

import numpy as np
from PIL import Image

from batchstyle.images import ImageError, load_image, read_metadata, resize_long_side, save_image_atomic
from batchstyle.model.frames import FrameChain, blend_weight, flicker, prefetch_contents
from batchstyle.model.optimize import Losses
from batchstyle.model.pixels import tensor_to_image
from batchstyle.model.stylize import Hooks, Inputs, Stylized, Stylizer, style_colours
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


def frame_id(job: Job, index: int) -> str:
    """The target-cache address of the clip's frame `index`: the clip file's digest and the frame."""
    return f"{job.content_digest}:frame{index}"


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
    chain = FrameChain(stylizer, s, cache_dir, job.content_digest, indices)
    wanted = range(resume - 1 if resume > part.first else resume, part.end)
    done_iterations = 0
    last: Stylized | None = None
    stylized = 0
    for position, content in _prefetched(stylizer, job, indices, wanted, resume):
        if position not in pending:
            # The frame before the first to do, or one finished already past a gap: the chain goes on from it.
            chain.carry(content, load_image(files[position]) if chain.coherent else None)
            continue
        inputs = Inputs(
            content=content,
            styles=styles,
            blend=job.row.blend,
            content_id=frame_id(job, indices[position]),
            style_ids=job.style_digests,
            colours=colours,
        )
        finished = part.frames - len(todo) + stylized
        hooks = Hooks(on_iteration=None if on_iteration is None else _heard(on_iteration, finished))
        last = chain.stylize(position, inputs, hooks)
        save_image_atomic(
            tensor_to_image(last.image.clamp(0, 1)),
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
    return last, stylized, done_iterations


def _heard(on_iteration: OnFrameIteration, finished: int) -> Callable[[int, list[Losses]], None]:
    """A frame's iterations as the job's heartbeat: (frames of the job finished before this one, the losses)."""
    return lambda iteration, losses: on_iteration(finished, losses[0])


CONTENT_BATCH = 8  # frames whose content targets go through the target backend (ONNX Runtime) in one call


def _prefetched(
    stylizer: Stylizer, job: Job, indices: list[int], positions: range, resume: int
) -> Iterator[tuple[int, Image.Image]]:
    """(position, content at the output size) of the frames at `positions`, CONTENT_BATCH at a time, the content
    targets of the block's frames after the job's first computed together first (`prefetch_contents`)."""
    assert job.clip is not None
    s, first = job.settings, job.clip.first
    block: list[tuple[int, Image.Image]] = []

    def flush() -> Iterator[tuple[int, Image.Image]]:
        later = [(frame_id(job, indices[p]), c) for p, c in block if p > first and p >= resume]
        prefetch_contents(stylizer, s, later)
        yield from block
        block.clear()

    for offset, frame in read_frames(job.row.content, [indices[p] for p in positions]):
        block.append((positions.start + offset, resize_long_side(frame, s.size)))
        if len(block) == CONTENT_BATCH:
            yield from flush()
    yield from flush()


# -- the parent's side: assembly -------------------------------------------------------------------------------------


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
    """The assembled clip's mean temporal error (8-bit levels; `model.frames.flicker`): the figure `bench video`
    prints and the report shows, over the flows the workers cached, so it costs a decode and a warp per frame."""
    indices = indices_of(job)
    with closing(read_frames(job.row.content, indices)) as decoded:
        pairs = (
            (position, np.asarray(resize_long_side(frame, job.settings.size)), np.asarray(load_image(frames[position])))
            for position, frame in decoded
        )
        return flicker(cache_dir, job.content_digest, indices, pairs)
