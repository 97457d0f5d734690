"""Colour-managed inputs and outputs, with a real Display P3 profile.

The profile is built here, byte by byte, from the Display P3 specification (DCI-P3 primaries, D65 white, the
sRGB tone curve), as an ICC v2 matrix/TRC profile: the kind phones embed. LittleCMS (through Pillow) parses and
applies it; the expected sRGB values are computed independently from the published primaries, so the test checks
the whole chain, not a number copied from its own output.
"""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, make_painting, make_photo, write_manifest
from PIL import Image, ImageCms

from batchstyle.images import ImageError, check_image, load_image, read_metadata, save_image_atomic, srgb_profile

P3 = {"r": (0.680, 0.320), "g": (0.265, 0.690), "b": (0.150, 0.060)}
SRGB = {"r": (0.640, 0.330), "g": (0.300, 0.600), "b": (0.150, 0.060)}
D65 = (0.3127, 0.3290)
D50_XYZ = np.array([0.9642, 1.0, 0.8249])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def rgb_to_xyz(primaries: dict[str, tuple[float, float]], white: tuple[float, float]) -> np.ndarray:
    """The linear-RGB to XYZ matrix of a colour space from its chromaticities (columns scaled to the white)."""

    def xyz(x: float, y: float) -> np.ndarray:
        return np.array([x / y, 1.0, (1 - x - y) / y])

    columns = np.stack([xyz(*primaries[c]) for c in "rgb"], axis=1)
    scale = np.linalg.solve(columns, xyz(*white))
    return columns * scale


def srgb_decode(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def srgb_encode(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0, 1)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


def s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def display_p3_profile() -> bytes:
    """An ICC v2 display profile for Display P3: header, tag table, desc/wtpt/cprt, D50-adapted colorants and
    the sRGB curve as a 1024-point table."""
    d65 = rgb_to_xyz(P3, D65)[:, :] @ np.ones(3)
    # Colorants are stored adapted to the PCS white (D50) with Bradford, as ICC requires.
    cone_src, cone_dst = BRADFORD @ d65, BRADFORD @ D50_XYZ
    adapt = np.linalg.inv(BRADFORD) @ np.diag(cone_dst / cone_src) @ BRADFORD
    colorants = adapt @ rgb_to_xyz(P3, D65)

    def xyz_tag(v: np.ndarray) -> bytes:
        return b"XYZ " + b"\0" * 4 + b"".join(s15(c) for c in v)

    def text(tag: bytes, s: str) -> bytes:
        if tag == b"desc":
            ascii_ = s.encode() + b"\0"
            return b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * (4 + 4 + 2 + 1 + 67)
        return b"text" + b"\0" * 4 + s.encode() + b"\0"

    curve_points = np.round(srgb_decode(np.linspace(0, 1, 1024)) * 65535).astype(">u2").tobytes()
    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 1024) + curve_points
    tags = [
        (b"desc", text(b"desc", "Display P3 (test)")),
        (b"cprt", text(b"cprt", "No copyright, use freely")),
        (b"wtpt", xyz_tag(D50_XYZ)),
        (b"rXYZ", xyz_tag(colorants[:, 0])),
        (b"gXYZ", xyz_tag(colorants[:, 1])),
        (b"bXYZ", xyz_tag(colorants[:, 2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table, data = struct.pack(">I", len(tags)), b""
    shared: dict[bytes, int] = {}
    for signature, body in tags:
        if body in shared:  # the three TRCs share one curve, as real profiles do
            table += signature + struct.pack(">II", shared[body], len(body))
            continue
        while (offset + len(data)) % 4:
            data += b"\0"
        shared[body] = offset + len(data)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = 128 + table_size + len(data)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + bytes([2, 0x10, 0, 0])
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"APPL"
        + b"\0" * 4  # flags
        + b"\0" * 8  # manufacturer, model
        + b"\0" * 8  # attributes
        + struct.pack(">I", 0)  # perceptual intent
        + b"".join(s15(c) for c in D50_XYZ)
        + b"\0" * 4  # creator
    )
    header += b"\0" * (128 - len(header))
    return header + table + data


def expected_srgb(p3_values: np.ndarray) -> np.ndarray:
    """Display P3 8-bit values -> sRGB 8-bit values, from the primaries alone (both spaces are D65)."""
    linear = srgb_decode(p3_values / 255.0)
    to_srgb = np.linalg.inv(rgb_to_xyz(SRGB, D65)) @ rgb_to_xyz(P3, D65)
    return np.round(srgb_encode(linear @ to_srgb.T) * 255.0)


# In the sRGB gamut once converted (a P3 pure red is not, and would be clipped): skin, sky, foliage, greys.
SWATCHES = np.array(
    [[200, 150, 120], [90, 140, 200], [80, 150, 70], [128, 128, 128], [230, 200, 80], [40, 40, 60]], dtype=np.float64
)


BLOCK = 16  # swatches as 16x16 blocks, read at their centres: JPEG's 8x8 DCT and chroma subsampling stay inside


def tagged(tmp_path: Path, suffix: str) -> Path:
    strip = SWATCHES.astype(np.uint8).reshape(1, -1, 3).repeat(BLOCK, axis=0).repeat(BLOCK, axis=1)
    path = tmp_path / f"p3{suffix}"
    extra = {"quality": 100} if suffix == ".jpg" else {}
    Image.fromarray(strip).save(path, icc_profile=display_p3_profile(), **extra)
    return path


def test_the_test_profile_is_a_real_profile() -> None:
    profile = ImageCms.ImageCmsProfile(io.BytesIO(display_p3_profile()))
    assert ImageCms.getProfileDescription(profile).strip() == "Display P3 (test)"
    assert profile.profile.xcolor_space.strip() == "RGB"


@pytest.mark.parametrize("suffix", [".png", ".tif", ".jpg"])
def test_display_p3_input_is_converted_to_srgb(tmp_path: Path, suffix: str) -> None:
    loaded = np.asarray(load_image(tagged(tmp_path, suffix)), dtype=np.float64)[BLOCK // 2, BLOCK // 2 :: BLOCK]
    expected = expected_srgb(SWATCHES)
    # JPEG's own rounding adds a few levels; PNG and TIFF are exact inputs.
    tolerance = 4 if suffix == ".jpg" else 1
    assert np.abs(loaded - expected).max() <= tolerance, (loaded, expected)
    # And the conversion did something: P3 numbers read as sRGB are up to ~20 levels off for these swatches.
    assert np.abs(SWATCHES - expected).max() >= 10


def test_untagged_and_srgb_tagged_inputs_are_left_alone(tmp_path: Path) -> None:
    strip = SWATCHES.astype(np.uint8).reshape(1, -1, 3)
    Image.fromarray(strip).save(tmp_path / "plain.png")
    Image.fromarray(strip).save(tmp_path / "srgb.png", icc_profile=srgb_profile())
    assert np.array_equal(np.asarray(load_image(tmp_path / "plain.png")), strip)
    assert np.abs(np.asarray(load_image(tmp_path / "srgb.png"), dtype=int) - strip).max() <= 1


def test_an_unreadable_profile_is_ignored_not_fatal(tmp_path: Path) -> None:
    strip = SWATCHES.astype(np.uint8).reshape(1, -1, 3)
    Image.fromarray(strip).save(tmp_path / "junk.png", icc_profile=b"not a profile at all" * 8)
    assert np.array_equal(np.asarray(load_image(tmp_path / "junk.png")), strip)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_outputs_are_tagged_srgb(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    save_image_atomic(Image.new("RGB", (8, 8), (10, 20, 30)), path, {"k": "v"})
    with Image.open(path) as img:
        icc = img.info.get("icc_profile")
    assert icc == srgb_profile()
    assert "sRGB" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))


def photo(width: int = 48, height: int = 32) -> Image.Image:
    """Smooth colour ramps: what lossy codecs keep within a few levels."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, 0.5 + 0 * x * y], axis=2)
    return Image.fromarray(np.round(rgb * 200 + 30).astype(np.uint8))


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
def test_phone_formats_are_read(tmp_path: Path, suffix: str) -> None:
    if suffix == ".heic":
        pillow_heif = pytest.importorskip("pillow_heif", reason="the heif extra is not installed")
        pillow_heif.register_heif_opener()
    path = tmp_path / f"phone{suffix}"
    photo().save(path, quality=95)
    assert check_image(path) == (48, 32)
    loaded = np.asarray(load_image(path), dtype=np.float64)
    assert loaded.shape == (32, 48, 3)
    assert np.abs(loaded - np.asarray(photo(), dtype=np.float64)).mean() < 3


def test_heic_without_the_plugin_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if the extra were not installed
    for read in (load_image, check_image):
        with pytest.raises(ImageError, match=r"IMG_0001\.HEIC.*pip install 'batchstyle\[heif\]'"):
            read(path)


# --- bit_depth 16 -----------------------------------------------------------------------------------------------


def png_bit_depth(path: Path) -> int:
    data = path.read_bytes()
    assert data[12:16] == b"IHDR"
    return data[24]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_outputs_keep_every_level_and_their_metadata(tmp_path: Path, suffix: str) -> None:
    cv2 = pytest.importorskip("cv2")
    deep = (np.random.default_rng(0).random((20, 30, 3)) * 65535).astype(np.uint16)
    path = tmp_path / f"deep{suffix}"
    save_image_atomic(deep, path, {"Software": "batchstyle", "batchstyle:content": "café.png"})
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded[..., ::-1], deep)
    assert read_metadata(path) == {"Software": "batchstyle", "batchstyle:content": "café.png"}
    with Image.open(path) as img:
        assert img.info.get("icc_profile") == srgb_profile()
    # And every reader that only knows 8 bits still shows the picture (Pillow drops the low byte).
    assert np.abs(np.asarray(load_image(path), dtype=int) - deep / 257).max() <= 1.01


def test_16_bit_needs_a_deep_format(tmp_path: Path) -> None:
    deep = np.zeros((4, 4, 3), np.uint16)
    with pytest.raises(ValueError, match=r"\.png or \.tif"):
        save_image_atomic(deep, tmp_path / "x.jpg", {})


def test_a_16_bit_run_writes_16_bit_outputs(tmp_path: Path) -> None:
    make_photo(tmp_path / "in" / "c.png", 32, 24)
    make_painting(tmp_path / "in" / "s.png", 32, 32)
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,bit_depth",
        "in/c.png,in/s.png,deep.png,16",
        "in/c.png,in/s.png,flat.png,",
    )
    result = cli("run", manifest, "--model", "random", "--device", "cpu", "-q", "--size", "32", "--iterations", "5")
    assert result.exit_code == 0, result.output
    assert png_bit_depth(tmp_path / "m" / "deep.png") == 16
    assert png_bit_depth(tmp_path / "m" / "flat.png") == 8
    cv2 = pytest.importorskip("cv2")
    levels = cv2.imread(str(tmp_path / "m" / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert np.count_nonzero(levels % 257) > levels.size // 2  # levels between the 8-bit ones: real 16-bit data


def test_check_refuses_16_bits_in_an_8_bit_format(tmp_path: Path) -> None:
    make_photo(tmp_path / "c.png")
    make_painting(tmp_path / "s.png")
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,bit_depth",
        "c.png,s.png,a.jpg,16",
        "c.png,s.png,b.tif,16",
        "c.png,s.png,c.png,12",
    )
    result = cli("check", manifest)
    assert result.exit_code == 1
    assert (
        "row 1 (line 2), column bit_depth: 16 bits per channel need a .png or .tif output, not a.jpg" in result.output
    )
    assert "row 2" not in result.output
    assert "row 3 (line 4), column bit_depth: '12' is not 8 or 16" in result.output
