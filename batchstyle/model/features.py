"""The VGG trunk, built from a config table, computing only up to the deepest layer a job taps.

Style transfer needs feature maps, never class scores, so the classifier is never built and the trunk stops at the
deepest tapped ReLU: for the default taps that saves the last three convs of VGG-19 on every iteration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from batchstyle.model.layout import ARCHS, layer_names

if TYPE_CHECKING:
    from batchstyle.model.weights import Preprocess, Weights


class VGGFeatures(nn.Module):
    """Maps RGB in [0, 1] to a dict of the tapped layers' activations.

    Preprocessing lives inside the module so that callers (and exported ONNX graphs) feed plain pixels, and the
    weights never require grad: only the pixels are optimised.

    `channels_last` runs the trunk in NHWC, the layout cuDNN's tensor-core convolutions work in (NCHW would be
    transposed around every convolution). Only the normalised copy is converted, inside `forward`: the caller's pixel
    tensor stays contiguous NCHW, which L-BFGS's flat per-image views rely on.
    """

    # Buffers, declared so that the checker sees tensors (nn.Module's __getattr__ says "Tensor | Module").
    channel_order: torch.Tensor
    scale: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

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
                # Zero padding, as trained. Replicating the edge in the first conv (crowsonkb's choice) was tried: it
                # runs the first conv through a separate pad whose rounding differs between a batch and a lone
                # image, and 8 L-BFGS iterations amplified that to 37 of 255 levels on a test row, so a batched row
                # no longer came out as it would alone. The band along edges had another cause (see the pooling).
                conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
                conv.load_state_dict({"weight": state_dict[f"{name}.weight"], "bias": state_dict[f"{name}.bias"]})
                self.layers[name] = conv
                in_ch = out_ch
            elif name.startswith("relu"):
                # In place is safe for a tapped ReLU (only read afterwards, by the next conv or pool), not when the
                # conv before it is tapped: its pre-activation output must survive.
                self.layers[name] = nn.ReLU(inplace=name.replace("relu", "conv") not in self.taps)
            else:
                # ceil_mode, as Caffe pools: with floor pooling an odd side drops its last row at that pooling, so the
                # bottom or right edge of most images never reaches the deep layers (11 rows of a 171-px-high image
                # miss relu5_1's style and relu4_2's content) and fills with shallow-layer noise: a band along the edge.
                pool = nn.MaxPool2d if pooling == "max" else nn.AvgPool2d
                self.layers[name] = pool(2, 2, ceil_mode=True)
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

    @property
    def conv_dtype(self) -> torch.dtype:
        return cast(nn.Conv2d, self.layers["conv1_1"]).weight.dtype

    def lowered(self, dtype: torch.dtype) -> VGGFeatures:
        """This trunk with its convolutions in `dtype` (bf16), made once and kept: what autocast would compute,
        without autocast's cost of casting every weight again on every forward (it caches casts only for weights
        that require grad, and these never do), which at 256 px is ~5% of a CPU iteration and at 32 px a third.
        Preprocessing stays fp32; the normalised pixels are cast once, where the first convolution reads them."""
        if dtype == self.conv_dtype:
            return self
        kept: dict[torch.dtype, VGGFeatures] = self.__dict__.setdefault("_lowered", {})  # not a submodule
        if dtype not in kept:
            copy = copy_module(self)
            copy.layers.to(dtype)
            kept[dtype] = copy
        return kept[dtype]

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalise(pixels)
        if x.dtype != self.conv_dtype:
            x = x.to(self.conv_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            x = layer(x)
            if name in self.taps:
                out[name] = x
        return out


def copy_module(module: VGGFeatures) -> VGGFeatures:
    """A deep copy that shares nothing with `module`, without the copies `lowered` keeps."""
    import copy

    kept = module.__dict__.pop("_lowered", None)
    try:
        return copy.deepcopy(module)
    finally:
        if kept is not None:
            module.__dict__["_lowered"] = kept


def build(weights: Weights, taps: Sequence[str], pooling: str = "max", channels_last: bool = False) -> VGGFeatures:
    """A trunk for `weights` tapping `taps`."""
    return VGGFeatures(weights.arch, weights.state_dict, weights.preprocess, taps, pooling, channels_last)
