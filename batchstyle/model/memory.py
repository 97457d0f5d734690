"""How many bytes optimising a scale takes, and how many a worker may use: the one memory model.

Three decisions read it: `tiles.choose_tiling` (does a scale fit whole, else how large may its tiles be),
`--batch-size auto` (how many images fit beside each other, `batch_that_fits`), and `batchstyle bench memory`
(what it predicted, beside what it measured). All three use one formula, so a batch the run chose never makes its
rows tile, and a prediction the benchmark checks is the one the run acts on.

    peak = batch * (network + 4 * (image vectors + content targets + mask planes) + L-BFGS pairs) + FIXED_BYTES

The network is `layout.activation_floats` up to the deepest tap, over the whole image or one tile with its halo, at
a measured number of bytes per float; everything else is counted in float32 and fitted to `bench memory` rows
(docs/benchmarks.md#memory-and-tiles). The constants were measured on a CPU; no GPU was lent to check them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from batchstyle.model.layout import activation_floats, deepest, halo, layer_shape, stride

STORES = ("fp32", "bf16", "file")  # where L-BFGS keeps its pairs (`history.pair_store`)


def bytes_per_float(store: str) -> int:
    """What one stored float costs the memory budget: a file's floats cost none of it."""
    return {"fp32": 4, "bf16": 2, "file": 0}[store]


LBFGS_HISTORY_BYTES = 1 << 30
MIN_PAIRS = 5  # L-BFGS pairs an image keeps at the least, however large it is


def lbfgs_history(numel: int, budget: int = LBFGS_HISTORY_BYTES) -> int:
    """L-BFGS correction pairs per image: 100 (neural-style's choice) while they fit in 1 GiB, fewer for big images.

    Each pair holds two image-sized float32 vectors, so at 2048x1536 a history of 100 alone takes 7.5 GB, more than
    the network's activations; 14 pairs there keep the curvature estimate and bound the memory. The budget is per
    image, not per batch, so that a row comes out of a batch as it would alone; `--batch-size auto` counts the
    history in what each image of a batch needs.
    """
    return max(MIN_PAIRS, min(100, budget // (2 * 4 * numel)))


# Bytes of a forward+backward per float of `layout.activation_floats` (fp32; conv and in-place ReLU outputs are both
# counted there though they share memory, and the backward's temporaries come on top). Measured as the peak resident
# memory of one `Objective.gradient` in a fresh process less what was resident before it, vgg16 to relu5_1 on a CPU
# (docs/large-outputs.md#the-memory-model): 342 MiB at 512x384 and 1584 MiB at 1024x768, against 421 and 1686 MiB.
NET_BYTES_PER_FLOAT = 1.0
# A tile keeps more per float: pass 2's surrogate keeps its A F products (`_Quadratic`) beside the features, and the
# tile's pixel gradient is added into the whole image's. Measured with `bench memory` at 1024x768 (the image's vectors
# taken out as the untiled row gives them): 512 px tiles 954 MiB for 752 MiB of floats read (1.27), 832 px tiles
# 1821 MiB for 1500 (1.21); and at 2048x1536 560 px tiles worked 12% above a prediction made with 1.0.
TILED_NET_BYTES_PER_FLOAT = 1.3
# Image-sized float32 vectors a scale keeps per image besides BatchLBFGS's 2h + 6: the pixels, their gradient, the
# lowest-loss iterate, the content twice (the scale's and the batch's), the start, and ~3 temporaries of an L-BFGS
# step and the lowest-loss update; and bytes beyond the network and the vectors (the target graph's copy of the
# weights, the allocator's slack). Both fitted to `bench memory` rows at 1024x768 on a CPU: working memory 3096 MiB
# untiled and 2334 MiB in 512 px tiles, 261 and 217 MiB above the model with 7 vectors and nothing fixed.
IMAGE_VECTORS = 10
FIXED_BYTES = 256 << 20
CPU_MEMORY_SHARE = 0.6  # of the machine's available memory: the default budget on a CPU
# `--batch-size auto` never batches more: beyond ~8 a GPU is already saturated and a batch only delays every output
# in it.
AUTO_BATCH_LIMIT = 8


def scale_bytes(
    arch: str,
    content_layers: Sequence[str],
    style_layers: Sequence[str],
    width: int,
    height: int,
    batch: int = 1,
    history: int = 0,
    tile: int = 0,
    regions: int = 0,
    store: str = "fp32",
) -> int:
    """Predicted peak bytes of optimising `batch` images of width x height: the network over the whole image, or
    over one tile with its halo, plus the image-sized vectors (`history` L-BFGS pairs in `store` among them), the
    content targets at their layers' sizes and `regions` mask planes (style masks and the content mask)."""
    last = deepest(arch, (*content_layers, *style_layers))
    network = network_bytes(arch, last, width, height, tile)
    floats = (IMAGE_VECTORS + 6) * 3 * width * height + regions * width * height
    floats += sum(math.prod(layer_shape(arch, name, height, width)) for name in content_layers)
    pairs = 2 * history * 3 * width * height * bytes_per_float(store)
    return int(batch * (network + 4 * floats + pairs) + FIXED_BYTES)


def network_bytes(arch: str, deepest: str, width: int, height: int, tile: int = 0) -> int:
    """Predicted peak bytes of one forward+backward of the network to `deepest`, over the whole image or over one
    tile of `tile` px read with its halo."""
    side_h, side_w = height, width
    if tile:
        margin, step = halo(arch, deepest), stride(deepest)
        tile = max(step, tile // step * step)
        side_h, side_w = min(height, tile + 2 * margin), min(width, tile + 2 * margin)
    per_float = TILED_NET_BYTES_PER_FLOAT if tile else NET_BYTES_PER_FLOAT
    return int(per_float * 4 * activation_floats(arch, deepest, side_h, side_w))


def batch_that_fits(
    budget: int,
    arch: str,
    content_layers: Sequence[str],
    style_layers: Sequence[str],
    width: int,
    height: int,
    history: int = 0,
    regions: int = 0,
    limit: int = AUTO_BATCH_LIMIT,
) -> int:
    """The most images, up to `limit`, whose scale fits `budget` untiled (at least 1): what `--batch-size auto` runs.
    Fitted with the tiling's own model and budget, so batching never tips a row into tiles it would not need alone."""
    one = scale_bytes(arch, content_layers, style_layers, width, height, 1, history, regions=regions)
    per_image = one - FIXED_BYTES
    return max(1, min(limit, (budget - FIXED_BYTES) // per_image))


def available_memory() -> int:
    """Bytes the machine could give a new process without swapping: MemAvailable on Linux, free pages where the OS
    counts them, else half its memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass  # macOS counts no available pages (an Apple GPU's slot reaches here), Windows has no sysconf
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2  # half the machine, unknown load
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # nothing to ask: a modest machine's share; --max-memory says otherwise


def cpu_budget() -> int:
    """What the CPU workers of this machine may use between them when no --max-memory is given: CPU_MEMORY_SHARE of
    its available memory (the rest is other processes', and the page cache the image files come through)."""
    return int(CPU_MEMORY_SHARE * available_memory())
