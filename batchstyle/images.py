"""Everything that touches image files: decoding, checking, resizing, metadata, atomic saving. No torch: the
CLI's light commands (`check`, `report`) use this module, and importing torch would cost them seconds and hundreds
of MB; tensors and colour spaces live in `batchstyle.model.pixels`.

The rest of the package only ever sees 8-bit sRGB ``PIL.Image`` objects (and, in the model layer, float tensors);
every oddity of real-world files (EXIF rotation, embedded colour profiles, 16-bit, CMYK, alpha, palettes,
truncation, absurd sizes, HEIC) is dealt with here, once, and anything that cannot be handled becomes an
:class:`ImageError` whose message names the file and the fix, so a batch run can report it per row instead of
crashing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import secrets
import stat
import struct
import warnings
import zlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path, PurePath
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, PngImagePlugin, features

# Temp files are hidden (leading dot) so globbing for outputs never picks up a half-written one, and are named
# `.{target}.batchstyle-tmp-{pid}-{16 hex digits}` so a later run can tell the ones a killed run left behind from a
# user's file: the sweep deletes only names of exactly that shape. A looser `.tmp-` marker took a user's output named
# `.a.tmp-1.png` for its own and deleted it on every rerun.
TEMP_MARKER: str = ".batchstyle-tmp-"
# `--save-every` writes an output's iterates into a folder of their own beside it, named after it with this suffix.
ITERATES_SUFFIX = ".iterates"
_TEMP_NAME = re.compile(rf"\.(?P<target>.+){re.escape(TEMP_MARKER)}[0-9]+-[0-9a-f]{{16}}")

_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(_FORMATS)
# Formats that hold 16 bits per channel (bit_depth 16); JPEG and WebP are 8-bit formats.
DEEP_SUFFIXES: frozenset[str] = frozenset({".png", ".tif", ".tiff"})
# PNG optimisation costs seconds per large image for a few percent of size; outputs are written often.
_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "PNG": {"optimize": False},
    "JPEG": {"quality": 95},
    "WEBP": {"quality": 95},
    "TIFF": {"compression": "tiff_lzw"},
}
# ImageDescription lives in IFD0, which Pillow reads and writes the same way for JPEG, WebP and TIFF; the
# alternative, UserComment, sits in the Exif sub-IFD and needs a hand-made character-code prefix.
_DESCRIPTION_TAG = ExifTags.Base.ImageDescription
# The EXIF orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# Phones' HEIC photos are read by the pillow-heif plugin (the `heif` extra), registered on first use so that light
# commands that never meet one do not import it. AVIF needs no plugin: Pillow 11.3+ reads it itself.
_HEIF_SUFFIXES = frozenset({".heic", ".heif", ".hif"})


class ImageError(Exception):
    """An image file that cannot be used; message names the file and says what to do."""


def _readable(path: Path) -> None:
    """Refuses what is not a regular file, and registers the decoder `path` needs or says how to install it (before
    Pillow calls the file unreadable). Opening a named pipe waits for a writer: `check` hung on one given as content."""
    with contextlib.suppress(OSError):  # a missing file is Pillow's to report, with its own message
        if not stat.S_ISREG(path.stat().st_mode):
            raise ImageError(
                f"{path} is not a regular file (a named pipe, socket or device); name an image file instead"
            )
    suffix = path.suffix.lower()
    if suffix in _HEIF_SUFFIXES:
        try:
            import pillow_heif
        except ImportError:
            raise ImageError(
                f"{path} is a HEIC/HEIF image, which needs the pillow-heif plugin: pip install 'batchstyle[heif]' "
                "(or convert it to JPEG or PNG)"
            ) from None
        pillow_heif.register_heif_opener()
    elif suffix == ".avif" and not features.check("avif"):
        raise ImageError(f"{path} is an AVIF image, which this Pillow cannot read: pip install -U 'pillow>=11.3'")


@contextlib.contextmanager
def _image_errors(path: Path) -> Iterator[None]:
    """Turn whatever Pillow raises for a bad file into an ImageError a batch run can report per row.

    Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; the warning is escalated so the configured
    limit is the one actually enforced, without touching the global limit itself.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = _BOMB_PIXELS.search(str(exc))
        pixels = found.group(1) if found else "too many"
        raise ImageError(
            f"{path} has {pixels} pixels, over Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS}; downscale it first"
        ) from exc
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file; check the path") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{path} is a directory, not an image file; name an image file instead") from exc
    except PermissionError as exc:
        raise ImageError(f"{path} cannot be read (permission denied); fix its permissions") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's format plugins raise many exception types for malformed data.
        raise ImageError(
            f"{path} cannot be read as an image ({type(exc).__name__}: {exc}); the file is corrupt, "
            "truncated or not an image -- re-export or re-download it"
        ) from exc


def load_image(path: Path) -> Image.Image:
    """Decode ``path`` fully into 8-bit RGB, upright as a viewer would show it.

    Decoding everything here (rather than lazily) makes truncated files fail at load time, with the file's
    name, instead of somewhere inside the optimisation loop.
    """
    path = Path(path)
    with _image_errors(path):
        if path.is_dir():
            raise IsADirectoryError(path)
        _readable(path)
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
        return to_rgb(to_srgb(upright), path)


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.cache
def srgb_profile() -> bytes:
    """The profile every output is tagged with: LittleCMS's built-in sRGB, the space the network was trained in
    and the one a viewer assumes for untagged files, so tagging changes no pixel, only removes the guess."""
    return _srgb().tobytes()


# Image modes LittleCMS converts, by the profile's colour space. Anything else (16-bit, float, palette) is left
# as decoded: those files rarely carry a profile, and to_rgb's own mapping is the best left to do.
_PROFILED_MODES = {"RGB": ("RGB", "RGBA"), "CMYK": ("CMYK",), "GRAY": ("L",)}


def to_srgb(img: Image.Image) -> Image.Image:
    """`img` in sRGB when it embeds another colour profile: Display P3 from phones, Adobe RGB from cameras.

    Without this the network sees P3 or Adobe RGB numbers as if they were sRGB, and outputs come out dull (the
    saturated colours the profile describes are read as duller ones). Relative colorimetric intent: in-gamut
    colours keep their exact values, the few outside sRGB are clipped, as a colour-managed viewer shows them. A
    profile LittleCMS cannot read is ignored, as browsers do, rather than failing the image.
    """
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = source.profile.xcolor_space.strip()
        if img.mode not in _PROFILED_MODES.get(space, ()):
            return img
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(
            img,
            source,
            _srgb(),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode=out_mode,
        )
    except (OSError, ValueError, ImageCms.PyCMSError):
        return img
    assert converted is not None
    converted.info.pop("icc_profile", None)
    return converted


def to_rgb(img: Image.Image, path: Path | str) -> Image.Image:
    """Map any Pillow mode to 8-bit RGB the way a viewer would show it.

    Pillow's own ``convert`` clips 16-bit and float data to 0..255 (a mostly white image) and drops alpha
    (transparent areas show whatever colour they happen to hold), so those cases are handled by hand.
    """
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 32-bit "I" images come from 16-bit sources (older Pillow, some TIFFs), so share the 16-bit scale.
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        # Float images have no defined range; [0, 1] is the usual convention, anything else is read as 0..255.
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.round(np.clip(values, 0, 255)).astype(np.uint8)).convert("RGB")
    try:
        if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"{path} has colour mode {img.mode}, which cannot be converted; re-save it as RGB") from exc


def check_image(path: Path) -> tuple[int, int]:
    """Validate ``path`` for ``batchstyle check`` and return its upright (width, height).

    ``verify()`` catches structural damage but not missing pixel data (it does nothing at all for JPEG,
    WebP or TIFF), so the pixels are decoded too, or a truncated file would pass here and fail hours into a
    run. JPEG, the common case for photos, is decoded at 1/8 scale via ``draft``: that still reads every
    byte of the entropy-coded data, so it catches truncation at a fraction of the cost of a full decode.
    """
    path = Path(path)
    with _image_errors(path):
        if path.is_dir():
            raise IsADirectoryError(path)
        _readable(path)
        with Image.open(path) as img:
            img.verify()
        # verify() leaves the image unusable, so the pixels are decoded from a second open.
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            img.draft(None, (1, 1))
            img.load()
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def output_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The (w, h) that :func:`resize_long_side` produces, so runs can be planned without decoding pixels.

    Integer round-half-up keeps the result identical on every platform, and no side may collapse to zero.
    """
    if width < 1 or height < 1 or size < 1:
        raise ValueError(f"sizes must be positive, got width={width}, height={height}, size={size}")
    if width >= height:
        return size, max(1, (2 * height * size + width) // (2 * width))
    return max(1, (2 * width * size + height) // (2 * height)), size


def resize_long_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the long side is ``size``: optimisation cost grows with pixel count, so it is capped here."""
    target = output_size(img.width, img.height, size)
    if img.size == target:
        return img
    return img.resize(target, Image.Resampling.LANCZOS)


def _format_for(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise ValueError(f"unsupported image suffix {suffix!r} for {path}; use one of {supported}")
    return _FORMATS[suffix]


def _metadata_options(fmt: str, metadata: dict[str, str]) -> dict[str, object]:
    """Save options carrying ``metadata``: PNG text chunks, or one JSON object in EXIF ImageDescription.

    The JSON is ASCII-escaped because Pillow writes EXIF ASCII tags with ``encode("ascii", "replace")``,
    which would turn non-ASCII text into question marks.
    """
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(_png_keyword(key), value)
        return {"pnginfo": info}
    exif = Image.Exif()
    exif[_DESCRIPTION_TAG] = _description(metadata)
    return {"exif": exif}


def _png_keyword(key: str) -> str:
    # PNG keywords are 1-79 Latin-1 characters; Pillow would fail or write an unreadable chunk.
    if not 1 <= len(key) <= 79 or any(ord(char) > 255 for char in key):
        raise ValueError(f"PNG metadata key {key!r} must be 1-79 Latin-1 characters")
    return key


def _description(metadata: dict[str, str]) -> str:
    """The metadata as one ImageDescription (JPEG, WebP and TIFF, 8- or 16-bit), which `read_metadata` reads."""
    return json.dumps(metadata, ensure_ascii=True, sort_keys=True)


def save_image_atomic(img: Image.Image | np.ndarray, path: Path, metadata: dict[str, str]) -> None:
    """Write ``img`` so that ``path`` is either absent or complete, even if the process is killed mid-write.

    ``img`` is an 8-bit RGB image, or an (H, W, 3) uint16 array for 16-bit PNG or TIFF (bit_depth 16). The image
    goes to a hidden temp file in the same directory (``os.replace`` is only atomic within one filesystem), is
    fsynced, renamed over ``path``, and the directory is fsynced so the rename survives a power loss. Resumable
    runs rely on this: an existing output is a finished output. The temp file is created with mode 0o666 so the
    umask applies, as it would for a plain ``open``.
    """
    path = Path(path)
    fmt = _format_for(path)
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint16 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"a deep image is an (H, W, 3) uint16 array, got {img.dtype} {img.shape}")
        if fmt not in ("PNG", "TIFF"):
            raise ValueError(f"{path}: 16 bits per channel need a .png or .tif output, not {path.suffix}")
        writer = _write_png16 if fmt == "PNG" else _write_tiff16
        write_file_atomic(path, lambda handle: handle.write(writer(img, metadata)))
        return
    options = {**_SAVE_OPTIONS[fmt], **_metadata_options(fmt, metadata), "icc_profile": srgb_profile()}
    write_file_atomic(path, lambda handle: img.save(handle, format=fmt, **options))


# Pillow writes 16 bits per channel only for greyscale, so 48-bit RGB is written here: both formats are short.


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png16(pixels: np.ndarray, metadata: dict[str, str]) -> bytes:
    height, width, _ = pixels.shape
    rows = np.ascontiguousarray(pixels, dtype=">u2").view(np.uint8).reshape(height, width * 6)
    up = np.empty_like(rows)  # filter 2: each byte minus the byte above it (mod 256)
    up[0] = rows[0]
    up[1:] = rows[1:] - rows[:-1]
    raw = np.concatenate([np.full((height, 1), 2, np.uint8), up], axis=1).tobytes()
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))]
    chunks.append(_png_chunk(b"iCCP", b"sRGB\0\0" + zlib.compress(srgb_profile())))
    for key, value in metadata.items():
        # iTXt (UTF-8) rather than tEXt (Latin-1): paths in the metadata may be any text. Pillow reads both.
        chunks.append(_png_chunk(b"iTXt", _png_keyword(key).encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(raw, 6)))
    chunks.append(_png_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _write_tiff16(pixels: np.ndarray, metadata: dict[str, str]) -> bytes:
    """A little-endian baseline TIFF: one deflate-compressed strip, the metadata as JSON in ImageDescription (as
    the 8-bit formats carry it) and the sRGB profile, so every reader that opens 16-bit RGB TIFF opens it."""
    height, width, _ = pixels.shape
    strip = zlib.compress(pixels.astype("<u2").tobytes(), 6)
    description = _description(metadata).encode("ascii") + b"\0"
    icc = srgb_profile()
    # (tag, type, count, value-or-bytes): type 3 SHORT, 4 LONG, 2 ASCII, 7 UNDEFINED. Tags in ascending order.
    entries: list[tuple[int, int, int, int | bytes]] = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, struct.pack("<3H", 16, 16, 16)),
        (259, 3, 1, 8),  # Adobe deflate
        (262, 3, 1, 2),  # RGB
        (270, 2, len(description), description),
        (273, 4, 1, 0),  # strip offset, filled in below
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, len(strip)),
        (284, 3, 1, 1),  # chunky
        (34675, 7, len(icc), icc),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    data_at = 8 + ifd_size
    blobs = b""
    placed: list[tuple[int, int, int, int]] = []
    for tag, kind, count, value in entries:
        if isinstance(value, bytes) and len(value) > 4:
            placed.append((tag, kind, count, data_at + len(blobs)))
            blobs += value + b"\0" * (len(value) % 2)
        elif isinstance(value, bytes):
            placed.append((tag, kind, count, int.from_bytes(value.ljust(4, b"\0"), "little")))
        else:
            placed.append((tag, kind, count, value))
    strip_at = data_at + len(blobs)
    ifd = struct.pack("<H", len(placed))
    for tag, kind, count, value in placed:
        value = strip_at if tag == 273 else value
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 and count == 1 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + blobs + strip


def write_file_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`path` is afterwards absent, old or complete, never half-written: a hidden temp file in the same folder,
    fsynced, renamed into place, then the folder fsynced. Any failure removes the temp file."""
    temp = temp_name(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    # Windows cannot open directories and some filesystems refuse to fsync them; the file itself is already
    # durable, so losing only the rename's durability there is the best that can be done.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_metadata(path: Path) -> dict[str, str]:
    """The dict :func:`save_image_atomic` stored in ``path``, so a run can tell how an output was made.

    PNG returns every text chunk (reading them decodes the image, as chunks may follow the pixel data). For
    the EXIF formats, an ImageDescription that is not a JSON object of strings (a camera's "OLYMPUS DIGITAL
    CAMERA", say) was not written by us and reads as ``{}``.
    """
    path = Path(path)
    with _image_errors(path):
        if path.is_dir():
            raise IsADirectoryError(path)
        with Image.open(path) as img:
            if img.format == "PNG":
                return {str(key): str(value) for key, value in img.text.items()}
            description = img.getexif().get(_DESCRIPTION_TAG)
    if isinstance(description, bytes):
        description = description.decode("utf-8", "replace")
    try:
        data = json.loads(description) if isinstance(description, str) else None
    except json.JSONDecodeError:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return {}
    return data


def temp_name(path: Path) -> Path:
    """A fresh temp name for `path`, in its folder: hidden, with this process's id and 64 random bits, so no user's
    file has it by accident and no two writers (workers, shards) share one."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(8)}")


def is_temp_file(path: PurePath) -> bool:
    """Whether ``path`` is named as :func:`temp_name` names temp files (name only; nothing is read)."""
    return is_temp_name(PurePath(path).name)


def is_temp_name(name: str) -> bool:
    """Whether a file name is a temp file's, as `is_temp_file` says of a path (a manifest checks 200,000 names)."""
    return _TEMP_NAME.fullmatch(name) is not None


def temp_file_target(path: Path) -> Path:
    """The file a temp file would have become: `.name.batchstyle-tmp-12-0123456789abcdef` -> `name`, same folder."""
    found = _TEMP_NAME.fullmatch(Path(path).name)
    if found is None:
        raise ValueError(f"{path} is not a batchstyle temp file")
    return Path(path).with_name(found["target"])


def iterates_folder(output: Path) -> Path:
    """Where `--save-every` writes an output's iterates: `night/a.png` -> `night/a.iterates/`, a folder of their own
    so nothing takes one for an output."""
    output = Path(output)
    return output.parent / f"{output.stem}{ITERATES_SUFFIX}"


def iterates_url(output_url: str, name: str) -> str:
    """Where `--save-every` puts the iterate `name` of an output in a store, as `iterates_folder` names the local
    folder: `s3://b/night/a.png` -> `s3://b/night/a.iterates/<name>`."""
    head, _, tail = output_url.rpartition("/")
    return f"{head}/{PurePath(tail).stem}{ITERATES_SUFFIX}/{name}"


def remove_stale_temp_files(folder: Path, outputs: Collection[Path] | None = None) -> list[Path]:
    """Delete temp files that runs killed mid-save left anywhere under ``folder``; return what was removed.

    Call it before a run starts writing: a temp file of a run that is still saving into the same folder
    would be deleted too. Shards share a folder while each runs its own rows, so with ``outputs`` only temp files
    of those outputs (and of their `.iterates/` folders) are removed. Symlinked directories are not followed, so
    nothing outside ``folder`` is touched.
    """
    owned = None if outputs is None else {Path(p).resolve() for p in outputs}
    folders = set() if owned is None else {iterates_folder(o) for o in owned}
    removed: list[Path] = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            candidate = Path(root, name)
            if not is_temp_file(candidate) or candidate.is_symlink():
                continue
            if owned is not None:
                target = temp_file_target(candidate).resolve()
                if target not in owned and target.parent not in folders:
                    continue
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return sorted(removed)
