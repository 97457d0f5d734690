"""Build the demo gallery that ``manifests/gallery.csv`` refers to.

Run from anywhere::

    python manifests/make_gallery.py            # writes manifests/samples/
    python manifests/make_gallery.py --out DIR  # writes somewhere else

What it writes (all images have a long side of 384 px):

* content photos ``astronaut.jpg``, ``chelsea.jpg``, ``coffee.jpg``: scikit-image's bundled sample
  photos, resized (aspect ratio kept), JPEG quality 90;
* style ``hubble.jpg``: the Hubble eXtreme Deep Field, centre-cropped to a square and resized;
* content ``rocket.jpg``: scikit-image's launch photo, for the masked row;
* masks ``rocket-sky.png`` / ``rocket-ground.png``: where the dusk sky is (blue over red, a colour threshold
  smoothed) and everything else, one per style of the masked row; ``astronaut-face.png``: a soft ellipse over the
  astronaut's face, the content mask that keeps it legible;
* style ``strokes.png``: a 384x384 "painting" made here from a seeded RNG with numpy only: thick,
  bristly brush strokes in a warm palette that follow a swirling flow field (think of a Van Gogh
  sky), lit as impasto;
* ``LICENSE.md``: where every file comes from and under which terms.

Only images whose licence scikit-image documents as CC0 or public domain are used (see
``LICENSE.md``). The output is deterministic: the same numpy/Pillow/scikit-image versions give
byte-identical files. Needs numpy, Pillow and scikit-image (the ``gallery`` extra); the images
used are bundled with scikit-image, so no network access is needed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LONG_SIDE = 384
JPEG_QUALITY = 90
STROKES_SEED = 1889  # the year of "The Starry Night"
DEFAULT_OUT = Path(__file__).resolve().parent / "samples"


@dataclass(frozen=True)
class Sample:
    """One gallery image taken from ``skimage.data``."""

    filename: str
    role: str  # "content" or "style"
    loader: str  # name of the skimage.data function
    crop: tuple[int, int, int, int] | None  # (left, top, right, bottom) in the original's pixels, or None
    credit: str  # origin and licence, as scikit-image documents them


SKIMAGE_SAMPLES = (
    Sample(
        "astronaut.jpg",
        "content",
        "astronaut",
        None,
        "Photograph of astronaut Eileen Collins, from the NASA Great Images database "
        '(https://flic.kr/p/r9qvLn). scikit-image: "No known copyright restrictions, released into '
        'the public domain." (NASA media guidelines ask that it not be used to imply endorsement.)',
    ),
    Sample(
        "chelsea.jpg",
        "content",
        "chelsea",
        None,
        'Chelsea the cat. scikit-image: "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)."',
    ),
    Sample(
        "coffee.jpg",
        "content",
        "coffee",
        None,
        'Coffee cup, courtesy of Pikolo Espresso Bar. scikit-image: "No copyright restrictions. '
        'CC0 by the photographer (Rachel Michetti)."',
    ),
    Sample(
        "hubble.jpg",
        "style",
        "hubble_deep_field",
        (64, 0, 936, 872),  # centred 872x872 square of the 1000x872 original
        "Hubble eXtreme Deep Field, from HubbleSite "
        "(http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/). scikit-image: "
        '"The image was captured by NASA and may be freely used in the public domain." '
        "Credit: NASA.",
    ),
    Sample(
        "rocket.jpg",
        "content",
        "rocket",
        None,
        "Launch photo of DSCOVR on Falcon 9 by SpaceX "
        "(https://www.flickr.com/photos/spacexphotos/16511594820/). scikit-image: "
        '"The image was captured by SpaceX and released in the public domain."',
    ),
)


# --------------------------------------------------------------------------------------------------
# Photos from skimage.data
# --------------------------------------------------------------------------------------------------


def _resize_long_side(img: Image.Image, long_side: int = LONG_SIDE) -> Image.Image:
    w, h = img.size
    scale = long_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def load_sample(sample: Sample) -> Image.Image:
    """Load, crop and resize one ``skimage.data`` image."""
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("make_gallery.py needs scikit-image: pip install 'batchstyle[gallery]'") from exc
    loader: Callable[[], np.ndarray] = getattr(data, sample.loader)
    img = Image.fromarray(np.asarray(loader())).convert("RGB")
    if sample.crop is not None:
        img = img.crop(sample.crop)
    return _resize_long_side(img)


# --------------------------------------------------------------------------------------------------
# Procedural brush-stroke style (numpy only)
# --------------------------------------------------------------------------------------------------

# Warm palette (cadmium yellows, oranges, vermilion, crimson) with a few cool accents so the strokes
# read as paint rather than as a colour gradient.
WARM = np.array(
    [
        [255, 214, 58],  # cadmium yellow
        [250, 176, 32],  # yellow ochre / deep yellow
        [244, 128, 26],  # orange
        [226, 74, 30],  # vermilion
        [186, 32, 38],  # cadmium red deep
        [120, 22, 44],  # alizarin crimson
    ],
    dtype=np.float64,
)
COOL = np.array(
    [
        [28, 64, 150],  # ultramarine
        [32, 128, 160],  # cerulean / teal
        [250, 240, 200],  # titanium white, warm
    ],
    dtype=np.float64,
)


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Periodic Gaussian-filtered white noise, normalised to zero mean and unit std."""
    white = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    kernel = np.exp(-2.0 * (np.pi * scale) ** 2 * (fx**2 + fy**2))
    field = np.fft.ifft2(np.fft.fft2(white) * kernel).real
    return (field - field.mean()) / field.std()


def _flow_field(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of a swirling flow: a few vortices on a gently turning drift."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    drift = 0.6 * _smooth_noise(rng, size, 60.0)
    vx = np.cos(drift)
    vy = 0.35 * np.sin(drift)
    for _ in range(5):
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        radius = rng.uniform(0.12, 0.22) * size
        spin = rng.choice([-1.0, 1.0]) * rng.uniform(2.0, 3.0)
        dy, dx = yy - cy, xx - cx
        weight = spin * np.exp(-(dx**2 + dy**2) / (2.0 * radius**2)) / radius
        vx += -dy * weight
        vy += dx * weight
    norm = np.hypot(vx, vy) + 1e-9
    return vx / norm, vy / norm


def _trace(vx: np.ndarray, vy: np.ndarray, start: np.ndarray, steps: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Follow the flow from each start point; returns points (n, steps, 2) and unit directions."""
    size = vx.shape[0]
    pos = start.astype(np.float64).copy()
    pts = np.empty((len(start), steps, 2))
    dirs = np.empty((len(start), steps, 2))
    for k in range(steps):
        iy = np.clip(pos[:, 0].astype(int), 0, size - 1)
        ix = np.clip(pos[:, 1].astype(int), 0, size - 1)
        d = np.stack([vy[iy, ix], vx[iy, ix]], axis=1)
        pts[:, k] = pos
        dirs[:, k] = d
        pos = pos + step * d
    return pts, dirs


def _paint_layer(
    canvas: np.ndarray,
    height: np.ndarray,
    rng: np.random.Generator,
    flow: tuple[np.ndarray, np.ndarray],
    hue_field: np.ndarray,
    *,
    count: int,
    width: tuple[float, float],
    length: tuple[int, int],
    cool_share: float,
) -> None:
    """Lay ``count`` bristly strokes onto ``canvas`` (H, W, 3 floats) and ``height`` (impasto)."""
    size = canvas.shape[0]
    margin = 24
    start = rng.uniform(-margin, size + margin, (count, 2))
    steps = int(length[1])
    pts, dirs = _trace(*flow, start, steps, 1.0)
    lengths = rng.integers(length[0], length[1] + 1, count)
    widths = rng.uniform(*width, count)
    bristles = rng.uniform(0.35, 1.0, (count, 16))
    for n in range(count):
        p, d = pts[n, : lengths[n]], dirs[n, : lengths[n]]
        half = widths[n]
        lo = np.floor(p.min(axis=0) - half - 1).astype(int)
        hi = np.ceil(p.max(axis=0) + half + 2).astype(int)
        lo, hi = np.maximum(lo, 0), np.minimum(hi, size)
        if np.any(hi <= lo):
            continue
        yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]].astype(np.float64)
        vy_, vx_ = yy[..., None] - p[:, 0], xx[..., None] - p[:, 1]
        nearest = np.argmin(vy_**2 + vx_**2, axis=-1)
        ry = np.take_along_axis(vy_, nearest[..., None], -1)[..., 0]
        rx = np.take_along_axis(vx_, nearest[..., None], -1)[..., 0]
        dy, dx = d[nearest, 0], d[nearest, 1]
        along = nearest + ry * dy + rx * dx  # arc length from the stroke's start
        across = rx * dy - ry * dx  # signed distance from the centre line
        t = np.clip(along / max(lengths[n] - 1, 1), 0.0, 1.0)
        taper = half * (0.75 + 0.25 * np.sin(np.pi * np.clip(t * 1.15, 0, 1)))
        # Round caps: past either end the stroke closes as a half-ellipse.
        end = lengths[n] - 1
        overshoot = np.maximum(-along, along - end) / (0.8 * half)
        cap = np.sqrt(np.clip(1.0 - np.maximum(overshoot, 0.0) ** 2, 0.0, 1.0))
        taper = taper * cap
        inside = (np.abs(across) < taper) & (overshoot < 1.0)
        if not inside.any():
            continue
        # Bristle tracks: brightness varies across the stroke, constant along it.
        tracks = min(16, max(3, round(1.5 * half)))  # wider brushes have more bristles
        track = np.clip(((across / (2 * half)) + 0.5) * tracks, 0, tracks - 1).astype(int)
        bristle = bristles[n][track]
        # Paint thins out towards the end of the stroke; edges are soft.
        edge = np.clip((taper - np.abs(across)) / 1.2, 0.0, 1.0)
        alpha = edge * (1.0 - 0.55 * t**2) * (0.75 + 0.25 * bristle)
        alpha = np.where(inside, alpha, 0.0)
        cy = int(np.clip(p[0, 0], 0, size - 1))
        cx = int(np.clip(p[0, 1], 0, size - 1))
        if rng.random() < cool_share:
            colour = COOL[rng.integers(len(COOL))]
        else:
            idx = np.clip(hue_field[cy, cx] + rng.normal(0.0, 0.55), 0, len(WARM) - 1)
            i0 = int(idx)
            i1 = min(i0 + 1, len(WARM) - 1)
            colour = WARM[i0] + (idx - i0) * (WARM[i1] - WARM[i0])
        colour = np.clip(colour * rng.uniform(0.9, 1.1), 0, 255)
        # Bristle streaks, and a slightly darker rim where the paint piles up at the stroke's edges.
        rim = 1.0 - 0.18 * np.clip(np.abs(across) / np.maximum(taper, 1e-6) - 0.6, 0.0, 0.4) / 0.4
        shade = ((0.72 + 0.36 * bristle) * rim)[..., None]
        region = canvas[lo[0] : hi[0], lo[1] : hi[1]]
        region += alpha[..., None] * (colour * shade - region)
        h_region = height[lo[0] : hi[0], lo[1] : hi[1]]
        ridge = bristle * np.sqrt(np.clip(1.0 - (across / np.maximum(taper, 1e-6)) ** 2, 0.0, 1.0))
        h_region += alpha * (ridge * half * 0.35 - h_region)


def make_masks(rocket: Image.Image, astronaut: Image.Image) -> dict[str, Image.Image]:
    """The gallery's masks, made from the photos themselves so they line up with the resized files."""
    rgb = np.asarray(rocket, dtype=np.float64)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    sky = Image.fromarray((((blue > red + 25) & (blue > green)) * 255).astype(np.uint8))
    sky = sky.filter(ImageFilter.MedianFilter(5)).filter(ImageFilter.GaussianBlur(1))  # no speckle, soft edges
    face = Image.new("L", astronaut.size, 0)
    w, h = astronaut.size  # the face, as fractions of skimage's 512x512 original
    ImageDraw.Draw(face).ellipse((0.342 * w, 0.117 * h, 0.551 * w, 0.381 * h), fill=255)
    face = face.filter(ImageFilter.GaussianBlur(w / 64))
    return {
        "rocket-sky.png": sky,
        "rocket-ground.png": Image.fromarray(255 - np.asarray(sky)),
        "astronaut-face.png": face,
    }


def make_strokes(size: int = LONG_SIDE, seed: int = STROKES_SEED) -> np.ndarray:
    """A seeded, numpy-only brush-stroke painting; returns an (size, size, 3) uint8 array."""
    rng = np.random.default_rng(seed)
    flow = _flow_field(rng, size)
    # Where on the warm palette each part of the canvas sits (0 = yellow ... 5 = crimson).
    hue_field = np.clip(2.5 + 1.6 * _smooth_noise(rng, size, 40.0), 0, len(WARM) - 1)
    base = WARM[np.clip(hue_field.round().astype(int), 0, len(WARM) - 1)]
    canvas = base * 0.8 + 0.2 * WARM[3]
    height = np.zeros((size, size))
    layers = (  # coarse underpainting first, fine highlights last
        {"count": 900, "width": (6.0, 9.0), "length": (26, 44), "cool_share": 0.08},
        {"count": 1800, "width": (3.5, 6.0), "length": (16, 32), "cool_share": 0.10},
        {"count": 1000, "width": (2.2, 3.5), "length": (12, 26), "cool_share": 0.12},
    )
    for layer in layers:
        _paint_layer(canvas, height, rng, flow, hue_field, **layer)
    # Impasto: light from the upper left on the paint-thickness map.
    gy, gx = np.gradient(height)
    light = np.clip(1.0 + 0.3 * (-gx - gy), 0.6, 1.4)
    out = canvas * light[..., None]
    return np.clip(out, 0, 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

STROKES_CREDIT = (
    f"Generated by make_gallery.py (numpy only, seed {STROKES_SEED}): brush strokes along a swirling "
    "flow field. Dedicated to the public domain under CC0 1.0."
)


def describe_changes(sample: Sample) -> str:
    """How the gallery file differs from the ``skimage.data`` original, for LICENSE.md."""
    crop = ""
    if sample.crop is not None:
        left, top, right, bottom = sample.crop
        crop = f"cropped to x {left}-{right}, y {top}-{bottom}; "
    return f"{crop}resized to long side {LONG_SIDE} px (Lanczos); JPEG quality {JPEG_QUALITY}"


def write_license(out: Path, entries: list[tuple[str, str, str, str, str]]) -> None:
    """Write ``LICENSE.md``: one row (file, role, source, changes, credit) per gallery image."""
    lines = [
        "# Gallery images: sources and licences",
        "",
        "Written by `manifests/make_gallery.py`; do not edit by hand, rerun the script instead.",
        "Every image below is CC0 or public domain as documented by its source. The licence quotes",
        "are from the docstrings of the `skimage.data` functions named.",
        "",
        "| File | Role | Source | Changes | Origin and licence |",
        "| --- | --- | --- | --- | --- |",
    ]
    for filename, role, source, changes, credit in entries:
        lines.append(f"| `{filename}` | {role} | {source} | {changes} | {credit} |")
    lines.append("")
    (out / "LICENSE.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    entries: list[tuple[str, str, str, str, str]] = []
    loaded = {}
    for sample in SKIMAGE_SAMPLES:
        img = loaded[sample.filename] = load_sample(sample)
        img.save(out / sample.filename, quality=JPEG_QUALITY, optimize=True)
        source = f"`skimage.data.{sample.loader}()`"
        entries.append((sample.filename, sample.role, source, describe_changes(sample), sample.credit))

    for name, mask in make_masks(loaded["rocket.jpg"], loaded["astronaut.jpg"]).items():
        mask.save(out / name, optimize=True)
        base = "rocket.jpg" if name.startswith("rocket") else "astronaut.jpg"
        entries.append((name, "mask", f"made by make_gallery.py from `{base}`", "none (made here), PNG", "CC0 1.0"))

    Image.fromarray(make_strokes()).save(out / "strokes.png", optimize=True)
    source = "generated by make_gallery.py (CC0)"
    entries.append(("strokes.png", "style", source, "none (made here), PNG", STROKES_CREDIT))

    write_license(out, entries)
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size:>8}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
