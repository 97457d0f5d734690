"""The VGG trunk, built from a config table, computing only up to the deepest layer a job taps.

Style transfer needs feature maps, never class scores, so the classifier is never built and the trunk stops at the
deepest tapped ReLU: for the default taps that saves the last three convs of VGG-19 on every iteration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from batchstyle.weights import Preprocess, Weights

# torchvision's VGG configurations: channel counts of the 3x3 convs, "M" for a 2x2 pooling.
ARCHS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


def layer_names(arch: str) -> list[str]:
    """conv1_1, relu1_1, conv1_2, ..., pool1, conv2_1, ...: the names Gatys et al. use for taps."""
    names, block, index = [], 1, 1
    for item in ARCHS[arch]:
        if item == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
            index += 1
    return names


def conv_names(arch: str, params: bool = False) -> list[str]:
    convs = [name for name in layer_names(arch) if name.startswith("conv")]
    return [f"{c}.{kind}" for c in convs for kind in ("weight", "bias")] if params else convs


def layer_shape(arch: str, layer: str, height: int, width: int) -> tuple[int, int, int]:
    """(channels, height, width) of a layer's activation for an input of height x width, without running it.

    Lets callers allocate outputs ahead of time (ONNX Runtime IO binding) for any input size.
    """
    channels, h, w = 3, height, width
    for name, item in zip(layer_names(arch), _expanded(arch)):
        if item == "M":
            h, w = h // 2, w // 2
        elif isinstance(item, int):
            channels = item
        if name == layer:
            return channels, h, w
    raise ValueError(f"{arch} has no layer {layer!r}")


def _expanded(arch: str) -> list[int | str | None]:
    """ARCHS aligned with layer_names: a conv's channel count, None for its ReLU, "M" for a pool."""
    out: list[int | str | None] = []
    for item in ARCHS[arch]:
        out += ["M"] if item == "M" else [item, None]
    return out


class VGGFeatures(nn.Module):
    """Maps RGB in [0, 1] to a dict of the tapped layers' activations.

    Preprocessing lives inside the module so that callers (and exported ONNX graphs) feed plain pixels, and the
    weights never require grad: only the pixels are optimised.

    `channels_last` runs the trunk in NHWC, the layout cuDNN's tensor-core convolutions work in (NCHW would be
    transposed around every convolution). Only the normalised copy is converted, inside `forward`: the caller's pixel
    tensor stays contiguous NCHW, which L-BFGS's flat per-image views rely on.
    """

    def __init__(
        self,
        arch: str,
        state_dict: dict[str, torch.Tensor],
        preprocess: Preprocess,
        taps: Iterable[str],
        pooling: str = "max",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}")
        all_names = layer_names(arch)
        self.taps: tuple[str, ...] = tuple(dict.fromkeys(taps))
        missing = [t for t in self.taps if t not in all_names]
        if missing:
            raise ValueError(f"{arch} has no layer {', '.join(missing)}")
        deepest = max(all_names.index(t) for t in self.taps)
        self.arch = arch
        self.layers = nn.ModuleDict()
        in_ch = 3
        for name in all_names[: deepest + 1]:
            if name.startswith("conv"):
                out_ch = state_dict[f"{name}.weight"].shape[0]
                conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
                conv.weight.data.copy_(state_dict[f"{name}.weight"])
                conv.bias.data.copy_(state_dict[f"{name}.bias"])
                self.layers[name] = conv
                in_ch = out_ch
            elif name.startswith("relu"):
                # In place is safe for a tapped ReLU (only read afterwards, by the next conv or pool), not when the
                # conv before it is tapped: its pre-activation output must survive.
                self.layers[name] = nn.ReLU(inplace=name.replace("relu", "conv") not in self.taps)
            else:
                self.layers[name] = nn.MaxPool2d(2, 2) if pooling == "max" else nn.AvgPool2d(2, 2)
        self.channels_last = channels_last
        if channels_last:
            # The weights too, or the convolution would pick an NCHW kernel and convert the activations back.
            self.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()
        order = [2, 1, 0] if preprocess.bgr else [0, 1, 2]
        self.register_buffer("channel_order", torch.tensor(order), persistent=False)
        self.register_buffer("scale", torch.tensor(preprocess.scale), persistent=False)
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.index_select(1, self.channel_order) * self.scale - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalise(pixels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            x = layer(x)
            if name in self.taps:
                out[name] = x
        return out


def build(weights: Weights, taps: Sequence[str], pooling: str = "max", channels_last: bool = False) -> VGGFeatures:
    """A trunk for `weights` tapping `taps`."""
    return VGGFeatures(weights.arch, weights.state_dict, weights.preprocess, taps, pooling, channels_last)
