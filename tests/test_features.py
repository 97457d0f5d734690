"""The VGG trunk: layer naming, truncation at the deepest tap, preprocessing, and equivalence with torchvision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from batchstyle.model.features import VGGFeatures
from batchstyle.model.layout import conv_names, layer_names, torchvision_indices
from batchstyle.model.weights import CAFFE, IMAGENET, random_state_dict

# Convs per block, from Simonyan & Zisserman's configurations D (VGG-16) and E (VGG-19).
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vgg16_state() -> dict[str, torch.Tensor]:
    state = random_state_dict("vgg16", seed=5)
    # Non-zero biases, so that a bias wired to the wrong layer would show.
    gen = torch.Generator().manual_seed(6)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 if k.endswith(".bias") else v for k, v in state.items()}


# --- names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_layer_and_conv_names(arch: str) -> None:
    expected = []
    for block, count in enumerate(BLOCKS[arch], start=1):
        for i in range(1, count + 1):
            expected += [f"conv{block}_{i}", f"relu{block}_{i}"]
        expected.append(f"pool{block}")
    assert layer_names(arch) == expected
    convs = conv_names(arch)
    assert len(convs) == {"vgg16": 13, "vgg19": 16}[arch]
    assert convs == [n for n in expected if n.startswith("conv")]
    assert conv_names(arch, params=True) == [f"{c}.{k}" for c in convs for k in ("weight", "bias")]


def test_vgg19_has_the_fourth_convs_that_vgg16_lacks() -> None:
    assert {"conv3_4", "conv4_4", "conv5_4"} <= set(conv_names("vgg19"))
    assert not {"conv3_4", "conv4_4", "conv5_4"} & set(conv_names("vgg16"))


# --- truncation and validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "taps", "last"),
    [
        ("vgg16", ["relu2_1"], "relu2_1"),
        ("vgg16", ["relu3_1", "relu1_2", "relu2_1"], "relu3_1"),
        ("vgg16", ["pool2"], "pool2"),
        ("vgg19", ["relu1_1", "relu4_2"], "relu4_2"),
        ("vgg19", ["relu5_4"], "relu5_4"),
    ],
)
def test_trunk_stops_at_the_deepest_tap(arch: str, taps: list[str], last: str) -> None:
    model = VGGFeatures(arch, random_state_dict(arch), IMAGENET, taps)
    names = list(model.layers.keys())
    assert names == layer_names(arch)[: layer_names(arch).index(last) + 1]
    assert names[-1] == last
    out = model(_pixels(1, 3, 16, 16))
    assert set(out) == set(taps)


def test_trunk_needs_only_the_weights_it_uses() -> None:
    state = {k: v for k, v in random_state_dict("vgg16").items() if k.startswith(("conv1_", "conv2_1"))}
    model = VGGFeatures("vgg16", state, IMAGENET, ["relu2_1"])
    assert model(_pixels(1, 3, 8, 8))["relu2_1"].shape == (1, 128, 4, 4)


@pytest.mark.parametrize(("arch", "tap"), [("vgg16", "relu3_4"), ("vgg16", "relu6_1"), ("vgg19", "relu4_5")])
def test_unknown_tap_is_refused(arch: str, tap: str) -> None:
    with pytest.raises(ValueError, match=tap):
        VGGFeatures(arch, random_state_dict(arch), IMAGENET, ["relu1_1", tap])


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="vgg11"):
        VGGFeatures("vgg11", {}, IMAGENET, ["relu1_1"])


# --- what the trunk computes ------------------------------------------------------------------------------------


def test_weights_are_frozen_and_only_pixels_get_gradients(vgg16_state: dict[str, torch.Tensor]) -> None:
    model = VGGFeatures("vgg16", vgg16_state, IMAGENET, ["relu1_1", "relu2_1"])
    params = list(model.parameters())
    assert len(params) == 2 * 3  # conv1_1, conv1_2, conv2_1
    assert not any(p.requires_grad for p in params)
    pixels = _pixels(1, 3, 8, 8).requires_grad_(True)
    out = model(pixels)
    (out["relu1_1"].sum() + out["relu2_1"].sum()).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in params)


def test_trunk_matches_a_functional_vgg(vgg16_state: dict[str, torch.Tensor]) -> None:
    """torchvision's VGG with one departure: pooling keeps an odd side's last row (ceil_mode), so no edge of an
    odd-sized image is cut off from the deeper layers."""
    model = VGGFeatures("vgg16", vgg16_state, IMAGENET, ["relu1_2", "relu2_1"])
    pixels = _pixels(2, 3, 11, 10)
    out = model(pixels)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def conv(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.relu(F.conv2d(x, vgg16_state[f"{name}.weight"], vgg16_state[f"{name}.bias"], padding=1))

    relu1_2 = conv(conv((pixels - mean) / std, "conv1_1"), "conv1_2")
    pooled = F.max_pool2d(relu1_2, 2, ceil_mode=True)
    assert pooled.shape[-2:] == (6, 5)  # the 11th row is pooled on its own, not dropped
    relu2_1 = conv(pooled, "conv2_1")
    torch.testing.assert_close(out["relu1_2"], relu1_2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["relu2_1"], relu2_1, rtol=1e-4, atol=1e-5)


def test_conv_tap_is_the_pre_activation_output(vgg16_state: dict[str, torch.Tensor]) -> None:
    model = VGGFeatures("vgg16", vgg16_state, IMAGENET, ["conv1_1", "relu1_1"])
    out = model(_pixels(1, 3, 8, 8))
    assert out["conv1_1"].min() < 0  # not overwritten by the ReLU that follows it
    torch.testing.assert_close(out["relu1_1"], out["conv1_1"].clamp(min=0))


def test_avg_pooling_changes_outputs_after_the_first_pool(vgg16_state: dict[str, torch.Tensor]) -> None:
    taps = ["relu1_2", "relu2_1", "relu3_1"]
    pixels = _pixels(1, 3, 16, 16)
    max_model = VGGFeatures("vgg16", vgg16_state, IMAGENET, taps, pooling="max")
    avg_model = VGGFeatures("vgg16", vgg16_state, IMAGENET, taps, pooling="avg")
    assert isinstance(max_model.layers["pool1"], nn.MaxPool2d)
    assert isinstance(avg_model.layers["pool2"], nn.AvgPool2d)
    with_max, with_avg = max_model(pixels), avg_model(pixels)
    torch.testing.assert_close(with_max["relu1_2"], with_avg["relu1_2"])
    for tap in ("relu2_1", "relu3_1"):
        assert with_max[tap].shape == with_avg[tap].shape
        assert not torch.allclose(with_max[tap], with_avg[tap], rtol=1e-3, atol=1e-3)
    expected = F.relu(
        F.conv2d(
            F.avg_pool2d(with_avg["relu1_2"], 2), vgg16_state["conv2_1.weight"], vgg16_state["conv2_1.bias"], padding=1
        )
    )
    torch.testing.assert_close(with_avg["relu2_1"], expected, rtol=1e-4, atol=1e-5)


# --- preprocessing --------------------------------------------------------------------------------------------------


def test_caffe_preprocess_is_bgr_0_255_minus_mean() -> None:
    model = VGGFeatures("vgg16", random_state_dict("vgg16"), CAFFE, ["relu1_1"])
    x = _pixels(2, 3, 5, 4)
    expected = x[:, [2, 1, 0]] * 255 - torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalise(x), expected, rtol=1e-6, atol=1e-4)
    # A pure blue pixel is 255 in channel 0 (B) and 0 in the others.
    blue = torch.zeros(1, 3, 1, 1)
    blue[0, 2] = 1.0
    torch.testing.assert_close(
        model.normalise(blue).flatten(), torch.tensor([255 - 103.939, -116.779, -123.68]), rtol=1e-6, atol=1e-4
    )


def test_imagenet_preprocess_is_rgb_standardised() -> None:
    model = VGGFeatures("vgg16", random_state_dict("vgg16"), IMAGENET, ["relu1_1"])
    x = _pixels(2, 3, 5, 4)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalise(x), (x - mean) / std)


# --- torchvision ------------------------------------------------------------------------------------------------


def _torchvision_conv_positions(arch: str) -> list[int]:
    with torch.device("meta"):  # structure only: no weights allocated, nothing downloaded
        model = getattr(torchvision.models, arch)(weights=None)
    return [i for i, module in enumerate(model.features) if isinstance(module, nn.Conv2d)]


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_torchvision_indices_match_torchvision_convs(arch: str) -> None:
    indices = torchvision_indices(arch)
    assert list(indices) == conv_names(arch)
    assert list(indices.values()) == _torchvision_conv_positions(arch)


def test_converted_torchvision_vgg19_matches_torchvision_features() -> None:
    torch.manual_seed(0)
    with torch.device("meta"):
        tv = torchvision.models.vgg19(weights=None)
    features = tv.features.to_empty(device="cpu").eval()
    for module in features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")  # torchvision's own init
            nn.init.normal_(module.bias, std=0.1)
    raw = {f"features.{k}": v for k, v in features.state_dict().items()}
    # batchstyle's departure from torchvision's VGG (see test_trunk_matches_a_functional_vgg), applied to it too.
    for module in features:
        if isinstance(module, nn.MaxPool2d):
            module.ceil_mode = True
    state = {
        f"{name}.{kind}": raw[f"features.{index}.{kind}"]
        for name, index in torchvision_indices("vgg19").items()
        for kind in ("weight", "bias")
    }
    model = VGGFeatures("vgg19", state, IMAGENET, ["relu4_2"])

    pixels = _pixels(1, 3, 24, 20, seed=3)
    normalised = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    relu4_2 = _torchvision_conv_positions("vgg19")[conv_names("vgg19").index("conv4_2")] + 1
    assert isinstance(features[relu4_2], nn.ReLU)
    with torch.no_grad():
        expected = features[: relu4_2 + 1](normalised.clone())
        got = model(pixels)["relu4_2"]
    assert got.shape == expected.shape == (1, 512, 3, 3)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_lowered_trunk_computes_what_autocast_computes(vgg16_state, channels_last: bool) -> None:
    """bf16 runs through a bf16 copy of the trunk, made once: bit for bit what autocast gives, features and pixel
    gradient alike, without recasting the weights on every forward."""
    model = VGGFeatures("vgg16", vgg16_state, CAFFE, ("relu1_1", "relu3_1", "relu4_2"), channels_last=channels_last)
    lowered = model.lowered(torch.bfloat16)
    assert lowered is model.lowered(torch.bfloat16) and model.lowered(torch.float32) is model
    assert model.conv_dtype == torch.float32 and lowered.conv_dtype == torch.bfloat16
    assert lowered.mean.dtype == torch.float32  # preprocessing stays fp32 (Caffe's 0..255 scale)
    assert "_lowered" not in dict(model.named_modules())  # not a submodule: .to() and state_dict ignore it

    def run(net: VGGFeatures, autocast: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        pixels = _pixels(2, 3, 40, 56).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            feats = net(pixels)
        sum(f.float().square().mean() for f in feats.values()).backward()
        return feats, pixels.grad

    (auto_feats, auto_grad), (low_feats, low_grad) = run(model, True), run(lowered, False)
    for name in auto_feats:
        assert low_feats[name].dtype == torch.bfloat16
        assert torch.equal(low_feats[name], auto_feats[name]), name
    assert torch.equal(low_grad, auto_grad)
