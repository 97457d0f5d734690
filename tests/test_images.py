"""Tests for batchstyle.images, on small images made on the spot."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from batchstyle.images import (
    SUPPORTED_SUFFIXES,
    TEMP_MARKER,
    ImageError,
    check_image,
    is_temp_file,
    load_image,
    output_size,
    read_metadata,
    remove_stale_temp_files,
    resize_long_side,
    save_image_atomic,
    temp_file_target,
    temp_name,
)
from batchstyle.model.pixels import (
    image_to_tensor,
    luminance_image,
    recombine_color,
    rgb_to_yiq,
    tensor_to_image,
    yiq_to_rgb,
)

RNG = np.random.default_rng(0)
Reader = Callable[[Path], object]


def noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


# --- loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_6_is_applied(tmp_path: Path, suffix: str) -> None:
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / f"rotated{suffix}"
    img.save(path, exif=exif)

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert loaded.size == (16, 32)
    assert check_image(path) == (16, 32)
    red, _, blue = pixel(loaded, (13, 2))  # the block is now in the top-right corner
    assert red > 200 and blue < 50
    assert pixel(loaded, (2, 2))[0] < 50


def test_grayscale_l(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (16, 16), 100).save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert pixel(loaded, (3, 3)) == (100, 100, 100)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    values = np.array([[65535, 32768, 0, 1000]] * 4, dtype=np.uint16)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"

    loaded = np.asarray(load_image(path))

    assert loaded.shape == (4, 4, 3)
    assert loaded[0, :, 0].tolist() == [255, 128, 0, 4]
    assert (loaded[..., 0] == loaded[..., 2]).all()


@pytest.mark.parametrize(
    ("mode", "value", "suffix", "expected"),
    [
        ("1", 1, ".png", 255),
        ("F", 0.5, ".tif", 128),
        ("F", 100.0, ".tif", 100),
        ("I", 32768, ".tif", 128),
        ("I;16B", 65535, ".tif", 255),
        ("LA", (0, 0), ".png", 255),
    ],
)
def test_other_grey_modes(tmp_path: Path, mode: str, value: object, suffix: str, expected: int) -> None:
    path = tmp_path / f"grey{suffix}"
    Image.new(mode, (8, 8), value).save(path)
    assert Image.open(path).mode == mode
    assert pixel(load_image(path), (1, 1)) == (expected,) * 3


def test_cmyk(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.tif"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)
    assert pixel(load_image(path), (5, 5)) == (255, 0, 0)


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    img.putpixel((1, 1), (10, 20, 30, 255))
    img.putpixel((2, 2), (0, 0, 0, 128))
    path = tmp_path / "alpha.png"
    img.save(path)

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert pixel(loaded, (0, 0)) == (255, 255, 255)
    assert pixel(loaded, (1, 1)) == (10, 20, 30)
    assert pixel(loaded, (2, 2)) == (127, 127, 127)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([200, 10, 10, 0, 255, 0])
    img.putpixel((4, 4), 1)
    path = tmp_path / "palette.png"
    img.save(path, transparency=1)

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert pixel(loaded, (0, 0)) == (200, 10, 10)
    assert pixel(loaded, (4, 4)) == (255, 255, 255)


@pytest.mark.parametrize("limit", [3000, 2000], ids=["warning-band", "error-band"])
@pytest.mark.parametrize("reader", [load_image, check_image])
def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, reader: Reader) -> None:
    path = tmp_path / "big.png"
    noise(64, 64).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)

    with pytest.raises(ImageError, match=rf"has 4096 pixels, .*limit of {limit}; downscale it first"):
        reader(path)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("reader", [load_image, check_image])
def test_truncated_file(tmp_path: Path, suffix: str, reader: Reader) -> None:
    path = tmp_path / f"cut{suffix}"
    noise(64, 64).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageError, match="truncated") as caught:
        reader(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("reader", [load_image, check_image, read_metadata])
def test_unusable_paths(tmp_path: Path, reader: Reader) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not an image\n")
    for path, hint in [
        (tmp_path / "missing.png", "no such file"),
        (tmp_path, "directory"),
        (fake, "corrupt"),
    ]:
        with pytest.raises(ImageError, match=hint) as caught:
            reader(path)
        assert str(path) in str(caught.value)


# --- sizes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "size", "expected"),
    [
        (64, 32, 16, (16, 8)),
        (32, 64, 16, (8, 16)),
        (33, 33, 16, (16, 16)),
        (45, 30, 20, (20, 13)),
        (1000, 3, 64, (64, 1)),
        (3, 1000, 64, (1, 64)),
        (10, 20, 40, (20, 40)),
    ],
)
def test_output_size_matches_resize(width: int, height: int, size: int, expected: tuple[int, int]) -> None:
    assert output_size(width, height, size) == expected
    assert resize_long_side(noise(width, height), size).size == expected


def test_resize_returns_same_image_when_already_sized() -> None:
    img = noise(40, 30)
    assert resize_long_side(img, 40) is img


def test_output_size_rejects_non_positive() -> None:
    with pytest.raises(ValueError):
        output_size(10, 10, 0)


# --- tensors and colour ---------------------------------------------------------------------------------


def test_tensor_round_trip_is_exact() -> None:
    values = RNG.permutation(np.repeat(np.arange(256, dtype=np.uint8), 3)).reshape(16, 16, 3)
    img = Image.fromarray(values)

    t = image_to_tensor(img)

    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32 and t.is_contiguous()
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert np.array_equal(np.asarray(tensor_to_image(t)), values)
    assert np.array_equal(np.asarray(tensor_to_image(t[0].double())), values)


def test_tensor_to_image_clamps_rounds_and_zeroes_nan() -> None:
    t = torch.tensor([-0.5, 1.5, 0.6 / 255, float("nan")]).reshape(1, 1, 4).expand(3, 1, 4)
    assert np.asarray(tensor_to_image(t))[0, :, 0].tolist() == [0, 255, 1, 0]
    with pytest.raises(ValueError):
        tensor_to_image(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError):
        image_to_tensor(Image.new("L", (4, 4)))


def test_yiq_round_trip() -> None:
    t = torch.rand(2, 3, 8, 8)
    assert torch.allclose(yiq_to_rgb(rgb_to_yiq(t)), t, atol=1e-5)
    grey = rgb_to_yiq(torch.full((3, 4, 4), 0.3))
    assert torch.allclose(grey[0], torch.full((4, 4), 0.3), atol=1e-6)
    assert grey[1:].abs().max() < 1e-6


def test_luminance_image_without_and_with_match() -> None:
    style = 0.4 + 0.2 * torch.rand(1, 3, 16, 16)
    content = 0.2 + 0.5 * torch.rand(1, 3, 24, 24)

    plain = luminance_image(style)
    assert plain.shape == (1, 3, 16, 16)
    assert torch.allclose(plain[:, 0], rgb_to_yiq(style)[:, 0], atol=1e-6)
    assert torch.equal(plain[:, 0], plain[:, 1]) and torch.equal(plain[:, 0], plain[:, 2])

    matched = luminance_image(style, match=content)[:, 0]
    target = rgb_to_yiq(content)[:, 0]
    assert matched.mean().item() == pytest.approx(target.mean().item(), abs=1e-5)
    assert matched.std(correction=0).item() == pytest.approx(target.std(correction=0).item(), abs=1e-5)


def test_recombine_color_keeps_content_chroma() -> None:
    content = 0.4 + 0.2 * torch.rand(1, 3, 16, 16)
    stylized = (0.4 + 0.2 * torch.rand(1, 1, 16, 16)).expand(1, 3, 16, 16)

    out = rgb_to_yiq(recombine_color(stylized, content))

    assert torch.allclose(out[:, 1:], rgb_to_yiq(content)[:, 1:], atol=1e-5)
    assert torch.allclose(out[:, 0], stylized[:, 0], atol=1e-5)


def test_recombine_color_resizes_content() -> None:
    content = torch.tensor([0.6, 0.4, 0.3]).reshape(1, 3, 1, 1).expand(1, 3, 32, 32)
    stylized = torch.full((1, 3, 16, 16), 0.5)

    out = recombine_color(stylized, content)

    assert out.shape == (1, 3, 16, 16)
    assert torch.allclose(rgb_to_yiq(out)[:, 1:], rgb_to_yiq(content)[:, 1:, :16, :16], atol=1e-5)


# --- saving and metadata --------------------------------------------------------------------------------

METADATA = {
    "content": "Ünïcødé ✓ 日本語 photo.jpg",
    "options": json.dumps({"style_weight": 1e6, "layers": ["conv1_1", "conv2_1"], "nested": {"a": None}}),
    "quote": 'say "hi"\nsecond line',
    "empty": "",
}


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"])
def test_save_and_read_metadata_round_trip(tmp_path: Path, suffix: str) -> None:
    img = noise(24, 16)
    path = tmp_path / f"out{suffix}"

    save_image_atomic(img, path, METADATA)

    assert read_metadata(path) == METADATA
    assert list(tmp_path.iterdir()) == [path]
    loaded = load_image(path)
    assert loaded.size == (24, 16)
    if suffix in (".png", ".tif", ".tiff"):
        assert np.array_equal(np.asarray(loaded), np.asarray(img))


def test_save_overwrites_existing_output(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    save_image_atomic(noise(8, 8), path, {"run": "1"})
    save_image_atomic(noise(8, 8), path, {"run": "2"})
    assert read_metadata(path) == {"run": "2"}
    assert list(tmp_path.iterdir()) == [path]


def test_failed_replace_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(Path(src))
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    path = tmp_path / "out.png"

    with pytest.raises(OSError, match="disk on fire"):
        save_image_atomic(noise(8, 8), path, {"k": "v"})

    assert list(tmp_path.iterdir()) == []
    assert (
        seen[0].parent == tmp_path
        and is_temp_file(seen[0])
        and seen[0].name.startswith(f".out.png{TEMP_MARKER}{os.getpid()}-")
    )


def test_failed_encode_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        save_image_atomic(Image.new("RGBA", (8, 8)), tmp_path / "out.jpg", {})
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_bad_suffix_and_png_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'\.bmp'.*\.png"):
        save_image_atomic(noise(8, 8), tmp_path / "out.bmp", {})
    with pytest.raises(ValueError, match="Latin-1"):
        save_image_atomic(noise(8, 8), tmp_path / "out.png", {"日本": "x"})
    assert list(tmp_path.iterdir()) == []
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"} == SUPPORTED_SUFFIXES


def test_read_metadata_of_foreign_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.jpg"
    noise(8, 8).save(plain)
    camera = tmp_path / "camera.jpg"
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = "OLYMPUS DIGITAL CAMERA"
    noise(8, 8).save(camera, exif=exif)
    assert read_metadata(plain) == {}
    assert read_metadata(camera) == {}


# --- temp files -----------------------------------------------------------------------------------------


def test_is_temp_file() -> None:
    """Only the exact shape temp_name makes: a user's `.a.tmp-1.png` or a hidden file is never taken for one."""
    made = temp_name(Path("out/x.png"))
    assert made.parent == Path("out") and is_temp_file(made) and temp_file_target(made) == Path("out/x.png")
    assert made != temp_name(Path("out/x.png"))
    assert is_temp_file(Path(f"out/.x.png{TEMP_MARKER}12-0123456789abcdef"))
    for name in [
        ".a.tmp-1.png",  # the old marker: a user's file deleted on every rerun
        ".x.png.tmp-0123456789abcdef",
        f"x.png{TEMP_MARKER}12-0123456789abcdef",  # not hidden
        f".x.png{TEMP_MARKER}0123456789abcdef",  # no pid
        f".x.png{TEMP_MARKER}12-0123456789ABCDEF",  # not what token_hex writes
        f".x.png{TEMP_MARKER}12-0123456789abcdef.png",
        f".x.png{TEMP_MARKER}12-0123456789abcde",
        ".hidden.png",
        "x.png",
    ]:
        assert not is_temp_file(Path("out", name)), name
    with pytest.raises(ValueError, match="not a batchstyle temp file"):
        temp_file_target(Path("out/.a.tmp-1.png"))


def test_remove_stale_temp_files(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    stale = [temp_name(tmp_path / "x.png"), temp_name(nested / "x.png")]
    kept = [tmp_path / "x.png", nested / "x.png", nested / ".hidden", tmp_path / ".a.tmp-1.png"]
    kept += [nested / ".x.png.tmp-abc", nested / f".x.png{TEMP_MARKER}0123456789abcdef"]
    for path in stale + kept:
        path.write_bytes(b"data")

    assert remove_stale_temp_files(tmp_path) == sorted(stale)

    assert all(path.exists() for path in kept)
    assert not any(path.exists() for path in stale)
    assert remove_stale_temp_files(tmp_path / "missing") == []
