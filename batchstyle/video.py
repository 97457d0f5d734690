"""Everything that touches video containers and frame folders: probing, decoding, and the atomic assembly of a
stylized clip. No torch, and PyAV is imported only when a clip is met, so `check` stays light for image manifests.

    clip (.mp4 .mov .mkv .webm .gif, or a folder of frames sorted by name)
        probe_clip  -> ClipInfo: frames, size, frame rate, audio        (`check`, the manifest, planning)
        select      -> the frame indices a row's `frames`/`every` keep
        read_frames -> (index, RGB image) of the selected frames, in order   (the worker's clip runner)
    <output>.frames/frame-000123.png: finished frames, lossless, each written atomically
        assemble    -> the output video (or folder of PNGs), written to a hidden temp name and renamed into place,
                       with the selected frames' own timestamps, the audio packets copied unchanged, and the
                       row's job key in its metadata (clip_key reads it back)

Errors are `VideoError`s (an `ImageError`, so a run reports them per row) whose message names the file and the fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

from batchstyle.images import (
    SUPPORTED_SUFFIXES,
    ImageError,
    _fsync_directory,
    load_image,
    temp_name,
    write_file_atomic,
)

VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".mov", ".mkv", ".webm", ".gif"})
FOLDER_RATE = Fraction(25)  # a folder of frames has no rate of its own; a video made from one plays at 25 fps
MAX_FRAME_PIXELS = 8192 * 8192  # beyond this a frame is a damaged header or a mistake, not footage
MAX_FRAMES = 1_000_000  # ~11 hours at 25 fps: more is a damaged header
FRAME_NAME = "frame-{:06d}.png"
FRAMES_SUFFIX = ".frames"  # a clip output's frames folder is named after it with this suffix
INSTALL = "pip install 'batchstyle[video]'"
# Encoders per output kind: lossless-looking defaults (x264 CRF 16 is visually transparent on stylized frames).
_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".gif": "gif"}
_CODECS = {
    ".mp4": ("libx264", "yuv420p", {"crf": "16", "preset": "medium"}),
    ".mov": ("libx264", "yuv420p", {"crf": "16", "preset": "medium"}),
    ".mkv": ("libx264", "yuv420p", {"crf": "16", "preset": "medium"}),
    ".webm": ("libvpx-vp9", "yuv420p", {"crf": "20", "b": "0"}),
    ".gif": ("gif", "rgb8", {}),  # swscale cannot make pal8; rgb8 is a fixed 3-3-2 palette
}
_WEBM_AUDIO = frozenset({"opus", "vorbis"})  # all WebM can hold: other audio cannot be copied unchanged
# The row's job key in an assembled video's container metadata, so that a finished clip is known from the file alone
# (a rerun after the ledger is lost, or with the output in a bucket). Matroska and WebM write tag names upper-case.
KEY_TAG = "batchstyle_key"
# FFmpeg's MP4 and QuickTime muxers write only the tags they know (title, comment, ...) unless told to keep others.
_MUXER_OPTIONS = {".mp4": {"movflags": "use_metadata_tags"}, ".mov": {"movflags": "use_metadata_tags"}}


class VideoError(ImageError):
    """A clip that cannot be used; the message names the file and says what to do."""


def _need_av() -> None:
    """PyAV is an extra: its absence is a VideoError naming the install, raised before the first `import av`."""
    try:
        import av  # noqa: F401
    except ImportError as exc:
        raise VideoError(f"video rows need PyAV and OpenCV, which are not installed: {INSTALL}") from exc


def is_clip(path: Path) -> bool:
    """A video file by its extension, or a folder (of frames). A GIF of one frame is a still image, as a viewer shows
    it: refusing it as a style ("is a video") was wrong, and Pillow reads it as it reads a PNG. Only a regular file is
    opened to count its frames (a named pipe would wait for a writer)."""
    path = Path(path)
    if path.suffix.lower() == ".gif" and path.is_file():
        try:
            with Image.open(path) as img:
                return bool(getattr(img, "is_animated", False))
        except Exception:  # Pillow raises many types for a damaged file: a clip by extension, whose probe says why
            return True
    return path.suffix.lower() in VIDEO_SUFFIXES or path.is_dir()


def is_clip_output(path: Path) -> bool:
    """An output that holds a clip: a video file by extension, or a name without one (a folder of PNG frames)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES or Path(path).suffix == ""


@dataclass(frozen=True)
class ClipInfo:
    frames: int
    width: int
    height: int
    rate: Fraction  # average frames per second
    audio: bool
    folder: bool = False
    audio_codec: str | None = None


def output_problem(info: ClipInfo, output: Path) -> str | None:
    """Why this clip cannot go to this output kind unchanged, or None."""
    if Path(output).suffix.lower() == ".webm" and info.audio and info.audio_codec not in _WEBM_AUDIO:
        return (
            f"WebM holds only Opus or Vorbis audio, and the clip's audio is {info.audio_codec}, which is copied "
            "unchanged; write .mkv or .mp4 instead"
        )
    return None


def frame_files(folder: Path) -> list[Path]:
    """A frame folder's images, sorted by name (hidden files, e.g. temp files, left out)."""
    return sorted(
        p for p in Path(folder).iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
    )


@contextlib.contextmanager
def _open(path: Path) -> Iterator[InputContainer]:
    _need_av()
    import av

    if not path.exists():
        raise VideoError(f"{path}: no such file; check the path")
    if not path.is_file():  # a named pipe blocks FFmpeg's open until something writes to it: `check` hung on one
        raise VideoError(f"{path} is not a regular file (a named pipe, socket or device); name a video file instead")
    try:
        container = av.open(str(path))
    except Exception as exc:  # noqa: BLE001 - FFmpeg raises many kinds for a bad file
        raise VideoError(
            f"{path} cannot be read as a video ({type(exc).__name__}: {exc}); the file is corrupt, truncated or not a "
            "video -- re-export it (H.264 in .mp4 always works)"
        ) from exc
    try:
        yield container
    finally:
        container.close()


def _quarter_turns(frame: VideoFrame | None) -> int:
    """Counterclockwise quarter turns that show `frame` upright: its display matrix's rotation (phones record
    portrait clips on their side and say so there), 0 without one."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def upright(frame: VideoFrame) -> Image.Image:
    """A decoded frame as RGB, turned as its display matrix says, so that a portrait phone clip is stylized (and
    written) standing up, as every player shows it."""
    image = frame.to_image().convert("RGB")
    turns = _quarter_turns(frame)
    if turns:
        image = image.transpose(
            (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[turns - 1]
        )
    return image


def _first_frame(path: Path, container: InputContainer, stream: VideoStream) -> VideoFrame | None:
    try:
        return next(iter(container.decode(stream)))
    except StopIteration:
        return None
    except Exception as exc:  # noqa: BLE001 - FFmpeg raises many kinds for a bad stream
        raise VideoError(f"{path}: its first frame cannot be decoded ({exc}); re-export the clip") from exc


def probe_clip(path: Path) -> ClipInfo:
    """The clip's header, checked: frame count, size, rate, audio. Raises VideoError for what cannot be used."""
    path = Path(path)
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise VideoError(f"{path}: a folder with no frames (.png, .jpg, ...); put the clip's frames in it")
        sizes = set()
        for file in files:
            try:
                with Image.open(file) as img:
                    sizes.add(img.size)
            except Exception as exc:  # noqa: BLE001
                raise VideoError(f"{file} cannot be read as an image ({exc}); re-export the frame") from exc
        if len(sizes) > 1:
            raise VideoError(f"{path}: frames of {len(sizes)} different sizes; export every frame at one size")
        width, height = sizes.pop()
        _check_size(path, width, height, len(files))
        return ClipInfo(len(files), width, height, FOLDER_RATE, False, folder=True)
    with _open(path) as container:
        videos = container.streams.video
        if not videos:
            raise VideoError(f"{path} has no video stream (audio only?); give a video file")
        stream = videos[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if _quarter_turns(_first_frame(path, container, stream)) % 2:
            width, height = height, width  # shown upright: a phone's portrait clip is stored on its side
        container.seek(0)
        frames = stream.frames
        if not frames:
            # Matroska, WebM and GIF headers carry no count: count the packets (demuxing only, no decoding).
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        rate = stream.average_rate or stream.guessed_rate or FOLDER_RATE
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
    _check_size(path, width, height, frames)
    return ClipInfo(frames, width, height, Fraction(rate), audio is not None, audio_codec=audio)


def _check_size(path: Path, width: int, height: int, frames: int) -> None:
    if frames <= 0:
        raise VideoError(f"{path} has no frames; re-export the clip")
    if frames > MAX_FRAMES:
        raise VideoError(f"{path} claims {frames} frames, over {MAX_FRAMES}: the header is damaged; re-export it")
    if width <= 0 or height <= 0 or width * height > MAX_FRAME_PIXELS:
        raise VideoError(
            f"{path} has frames of {width}x{height}, not a usable size (at most {MAX_FRAME_PIXELS} pixels); "
            "re-export or downscale it"
        )


def select(total: int, span: tuple[int, int | None] = (0, None), every: int = 1) -> list[int]:
    """The frame indices a row keeps: START:END of the clip, every N-th."""
    start, end = span
    return list(range(start, min(total, end if end is not None else total), max(1, every)))


def read_frames(path: Path, indices: Sequence[int]) -> Generator[tuple[int, Image.Image], None, None]:
    """The selected frames, decoded to RGB, in order, as (position in `indices`, image)."""
    path = Path(path)
    wanted = {index: position for position, index in enumerate(indices)}
    if not wanted:
        return
    last = max(wanted)
    if path.is_dir():
        files = frame_files(path)
        for index in indices:
            yield wanted[index], load_image(files[index])
        return
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                yield wanted[index], upright(frame)
            if index >= last:
                return
    raise VideoError(f"{path} ended after {index + 1} frames, before frame {last}; the file is truncated")


def read_frame(path: Path, index: int) -> Image.Image:
    """One frame, decoded to RGB; the decoder's container is closed on return, not when a generator is collected."""
    frames = read_frames(path, [index])
    try:
        return next(frames)[1]
    finally:
        frames.close()


def _timestamps(container: InputContainer, stream: VideoStream) -> list[int]:
    """Presentation timestamps of every frame, in display order (demuxed, not decoded)."""
    stamps = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
    container.seek(0)
    return stamps


def frames_folder(output: Path) -> Path:
    """Where a clip's finished frames are kept, beside its output: `clip.mp4` -> `clip.mp4.frames/`."""
    output = Path(output)
    return output.with_name(output.name + FRAMES_SUFFIX)


def frame_path(folder: Path, position: int) -> Path:
    return Path(folder) / FRAME_NAME.format(position)


def assemble(frames: Sequence[Path], source: Path, indices: Sequence[int], output: Path, key: str = "") -> None:
    """Writes the output clip from finished frame files, atomically: a hidden temp name in the output's folder,
    renamed into place, so a partial video never exists under the output's name.

    A video keeps the source's timestamps for the kept frames (so a variable frame rate stays variable, and every
    N-th frame lasts N frames) and its audio packets, copied unchanged over the kept time span, and carries `key`
    (the row's job key) in its metadata, where the container holds any (`clip_key`). A name without an extension
    gets a folder of PNG frames (each frame file carries the key already).
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix:
        suffix = output.suffix.lower()
        write_file_atomic(output, lambda handle: _encode(frames, Path(source), indices, handle, suffix, key))
        return
    temp = temp_name(output)
    try:
        temp.mkdir()
        for position, frame in enumerate(frames):
            shutil.copyfile(frame, frame_path(temp, position))
        if output.exists():
            old = temp_name(output)
            os.replace(output, old)
            os.replace(temp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, output)
        _fsync_directory(output.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def clip_key(path: Path) -> str | None:
    """The job key an assembled video carries (`assemble`), or None: a GIF (FFmpeg's GIF muxer writes no metadata),
    a folder of frames, a video made by anything else. Raises VideoError for a file that cannot be read as a video."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in _CONTAINERS:
        return None
    with _open(path) as container:
        tags = {str(name).lower(): str(value) for name, value in container.metadata.items()}
    return tags.get(KEY_TAG)


def _encode(
    frames: Sequence[Path], source: Path, indices: Sequence[int], handle: BinaryIO, suffix: str, key: str = ""
) -> None:
    _need_av()
    import av

    codec, pix_fmt, options = _CODECS[suffix]
    first = Image.open(frames[0])
    # 4:2:0 chroma needs even sides: an odd row or column is dropped (a pixel at the edge, not a resize).
    even = pix_fmt == "yuv420p"
    width, height = (first.width // 2 * 2, first.height // 2 * 2) if even else first.size
    first.close()
    source_box: contextlib.AbstractContextManager[InputContainer | None] = (
        contextlib.nullcontext(None) if source.is_dir() else _open(source)
    )
    with source_box as src, av.open(handle, "w", format=_CONTAINERS[suffix], options=_MUXER_OPTIONS.get(suffix)) as out:
        if key:
            out.metadata[KEY_TAG] = key
        if src is not None:
            video_in = src.streams.video[0]
            stamps = _timestamps(src, video_in)
            time_base = video_in.time_base
            if time_base is None:  # FFmpeg's demuxers always set one: a stream without is damaged
                raise VideoError(f"{source}: its video stream has no time base; re-export the clip")
            rate = video_in.average_rate or video_in.guessed_rate or FOLDER_RATE
            if len(stamps) <= max(indices):  # a header without timestamps: frames at the average rate
                stamps = [round(i / rate / time_base) for i in range(max(indices) + 1)]
            pts = [stamps[i] for i in indices]
        else:
            rate, time_base = FOLDER_RATE, Fraction(1, int(FOLDER_RATE))
            pts, stamps = list(indices), []  # only copying audio reads stamps, and a folder has no audio
        stream = out.add_stream(codec, rate=Fraction(rate))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.options = options
        audio_in = src.streams.audio[0] if src is not None and src.streams.audio and suffix != ".gif" else None
        audio_out = out.add_stream_from_template(audio_in) if audio_in is not None else None
        for file, stamp in zip(frames, pts):
            with Image.open(file) as img:
                rgb = np.asarray(img.convert("RGB"))[:height, :width]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if pix_fmt != "rgb24":
                frame = frame.reformat(format=pix_fmt)
            frame.pts, frame.time_base = stamp, time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if src is not None and audio_in is not None and audio_out is not None:
            # The whole clip's audio when the row keeps its ends (priming packets before 0 included), else the
            # packets that start within the kept span.
            begin = pts[0] * time_base if indices[0] > 0 else None
            end = (pts[-1] * time_base) + 1 / Fraction(rate) if indices[-1] < len(stamps) - 1 else None
            src.seek(0)
            for packet in src.demux(audio_in):
                if packet.dts is None or packet.pts is None:
                    continue
                at = packet.pts * packet.time_base  # a demuxed packet's is its stream's
                if (begin is not None and at < begin) or (end is not None and at >= end):
                    continue
                packet.stream = audio_out
                out.mux(packet)
