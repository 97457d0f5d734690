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

With a URL --out the store holds the frames: each frame is written in this node's staging area (`local_frames`) and
put to `<output>.frames/` under the out prefix at once, and the node's copy goes; a job starts by fetching the
frames of its range the store holds, and the parent fetches every frame back to assemble the clip, which it puts to
the output's URL in one put before the row is recorded done. Not assembled on a worker's node instead: the chunks of
one clip run on different workers, on a Ray cluster on different nodes, so no one node holds every frame, and a
chunk resumed after a kill may run on another node than the one that made its first frames. The store is the one
place every node and the driver reach; fetching a frame back is one request, making it again its whole optimisation.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
from PIL import Image

from batchstyle import store
from batchstyle.images import ImageError, load_image, read_metadata, resize_long_side, save_image_atomic
from batchstyle.model.frames import FrameChain, blend_weight, flicker, prefetch_contents
from batchstyle.model.optimize import Losses
from batchstyle.model.pixels import tensor_to_image
from batchstyle.model.stylize import Hooks, Inputs, Stylized, Stylizer, style_colours
from batchstyle.run.plan import Job
from batchstyle.store import StoreError
from batchstyle.video import FRAMES_SUFFIX, assemble, frame_files, frames_folder, read_frame, read_frames, select

OnFrameIteration = Callable[[int, Losses], None]  # frames of the job finished, losses: every iteration (a heartbeat)
_LEAD = re.compile(r"lead-(\d{6})\.png$")


def frame_file(folder: Path, position: int, lead: bool = False) -> Path:
    return folder / f"{'lead' if lead else 'frame'}-{position:06d}.png"


def local_frames(job: Job) -> Path:
    """This node's folder of the row's frames: beside the output for a local --out; for a URL --out in this node's
    staging area, beside `store.output_copy`'s file, since a Ray actor on another node can neither reach nor make
    the driver's folders. The chunks of a row share it: each writes only its own positions' names."""
    url = job.row.output_url
    return frames_folder(job.output if url is None else store.output_copy(url))


def frames_url(job: Job) -> str | None:
    """Where a URL --out keeps the row's finished frames, `<output>.frames/` under the out prefix, as a local --out
    keeps them beside the output; None for a local --out."""
    url = job.row.output_url
    return None if url is None else url.rstrip("/") + FRAMES_SUFFIX


def _fetch_stored(remote: str, files: list[Path]) -> None:
    """This node's copies of `files` made what the store holds under `remote`: each one listed there fetched, each
    one not listed removed. A copy the store lacks is a frame whose put a kill cut off; it is made again, since the
    store's frames are the ones every other node and the assembly see."""
    listed = store.names(remote)
    wanted = {store.child(remote, file.name): file for file in files if file.name in listed}
    for file in files:
        if file.name not in listed:
            file.unlink(missing_ok=True)
    for found in store.get_all(wanted).values():
        if isinstance(found, StoreError):
            raise found


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
    already there, frames stylized now, iterations done now). With a URL --out, finished means in the store: each
    frame is put as it is written, and this node keeps no copy once the job ends."""
    part = job.clip
    assert part is not None
    folder = local_frames(job)
    folder.mkdir(parents=True, exist_ok=True)
    files = {p: frame_file(folder, p, lead=p < part.start) for p in range(part.first, part.end)}
    remote = frames_url(job)
    try:
        if remote is not None:
            _fetch_stored(remote, list(files.values()))
        return _run_frames(stylizer, job, cache_dir, files, remote, on_iteration)
    finally:
        if remote is not None:  # the store holds every frame put; this node's copies were only for this job
            for file in files.values():
                file.unlink(missing_ok=True)


def _run_frames(
    stylizer: Stylizer,
    job: Job,
    cache_dir: Path | None,
    files: dict[int, Path],
    remote: str | None,
    on_iteration: OnFrameIteration | None,
) -> tuple[Stylized | None, int, int]:
    """`run_clip`'s work once this node's copies of the job's frames are what is finished: `files`, by position."""
    part = job.clip
    assert part is not None
    s = job.settings
    todo = [p for p in range(part.first, part.end) if not is_finished(files[p], job.key)]
    if not todo:
        return None, 0, 0
    resume, pending = todo[0], set(todo)
    indices = indices_of(job)
    content = job.row.on_this_node(job.row.content)
    styles = [load_image(job.row.on_this_node(path)) for path in job.row.styles]
    # color=auto decides once, on the clip's first frame: every chunk and every frame then keeps the same palette.
    colours = style_colours(s.color, read_frame(content, indices[0]), styles) if s.color == "auto" else ()
    chain = FrameChain(stylizer, s, cache_dir, job.content_digest, indices)
    wanted = range(resume - 1 if resume > part.first else resume, part.end)
    done_iterations = 0
    last: Stylized | None = None
    stylized = 0
    for position, frame in _prefetched(stylizer, job, content, indices, wanted, resume):
        if position not in pending:
            # The frame before the first to do, or one finished already past a gap: the chain goes on from it.
            chain.carry(frame, load_image(files[position]) if chain.coherent else None)
            continue
        inputs = Inputs(
            content=frame,
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
        if remote is not None:  # one put: the frame's object is whole; once there, it is finished work for any node
            store.put(files[position], store.child(remote, files[position].name))
            files[position].unlink()
        done_iterations += last.iterations
        stylized += 1
    return last, stylized, done_iterations


def _heard(on_iteration: OnFrameIteration, finished: int) -> Callable[[int, list[Losses]], None]:
    """A frame's iterations as the job's heartbeat: (frames of the job finished before this one, the losses)."""
    return lambda iteration, losses: on_iteration(finished, losses[0])


CONTENT_BATCH = 8  # frames whose content targets go through the target backend (ONNX Runtime) in one call


def _prefetched(
    stylizer: Stylizer, job: Job, content: Path, indices: list[int], positions: range, resume: int
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

    for offset, frame in read_frames(content, [indices[p] for p in positions]):
        block.append((positions.start + offset, resize_long_side(frame, s.size)))
        if len(block) == CONTENT_BATCH:
            yield from flush()
    yield from flush()


# -- the parent's side: assembly -------------------------------------------------------------------------------------


def final_frames(job: Job, count: int, folder: Path | None = None) -> list[Path]:
    """The clip's frames in order, overlaps blended: where chunk k's lead-in covers a frame of chunk k-1, the two
    are mixed (written once as `blend-*.png`, so an interrupted assembly redoes only the encoding). `folder`: where
    the frames are, beside the output unless given."""
    folder = frames_folder(job.output) if folder is None else folder
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
    """Writes the row's output from its finished frames (every chunk done), atomically; returns the frames used.

    With a URL --out the frames are fetched from the store into this node's staging area, the output is assembled
    beside them and put to its URL before this returns, so the row is recorded done only once its object is there:
    a video in one put (whole, or not there at all), a folder of frames a put per frame, in order. `release_frames`
    removes the local copies once the caller is done with the frames."""
    indices = indices_of(job)
    url, remote = job.row.output_url, frames_url(job)
    folder = local_frames(job)
    if remote is not None:
        _fetch_for_assembly(job, remote, folder, len(indices))
    frames = final_frames(job, len(indices), folder)
    missing = [p for p in frames if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"frame {missing[0].name} of {job.output.name} is missing; run again to make it")
    output = job.output if url is None else store.output_copy(url)
    assemble(frames, job.row.content, indices, output, job.key)
    if url is not None:
        _put_clip(output, url)
    return frames


def _fetch_for_assembly(job: Job, remote: str, folder: Path, count: int) -> None:
    """Every frame and lead-in of the row the store holds, fetched into `folder`, emptied first: every chunk of the
    row is done, so nothing writes there now, and what a killed run left there is no frame the store holds."""
    shutil.rmtree(folder, ignore_errors=True)
    listed = store.names(remote)
    names = [frame_file(folder, p, lead).name for p in range(count) for lead in (False, True)]
    absent = next((name for name in names if name.startswith("frame-") and name not in listed), None)
    if absent is not None:
        raise FileNotFoundError(f"frame {absent} of {job.output.name} is not in {remote}/; run again to make it")
    wanted = {store.child(remote, name): folder / name for name in names if name in listed}
    for found in store.get_all(wanted).values():
        if isinstance(found, StoreError):
            raise found


def _put_clip(output: Path, url: str) -> None:
    """The assembled clip to its URL: a video in one put; a folder's frames a put each, in order (the last frame
    listed says every one was put), then any other object under the folder's prefix deleted, as a local folder is
    replaced whole (a clip assembled before with more frames left its later frames there)."""
    if not output.is_dir():
        store.put(output, url)
        return
    frames = frame_files(output)
    for frame in frames:
        store.put(frame, store.child(url, frame.name))
    kept = {frame.name for frame in frames}
    for name in sorted(store.names(url) - kept):
        store.delete(store.child(url, name))


def release_frames(job: Job) -> None:
    """This node's copies of a URL --out row's frames and assembled output removed, once the output is put (the
    store keeps the frames under `<output>.frames/`); a local --out keeps its frames beside the output."""
    url = job.row.output_url
    if url is None:
        return
    copy = store.output_copy(url)
    shutil.rmtree(local_frames(job), ignore_errors=True)
    if copy.is_dir():
        shutil.rmtree(copy, ignore_errors=True)
    else:
        copy.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        copy.parent.rmdir()  # its own folder in the staging area (`store.output_copy`), empty now


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
