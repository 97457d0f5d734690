"""What the network computes in: the precision names every surface takes, and the switches each sets on a device.

The names live here, torch-free, because `batchstyle run --help` lists them without importing torch, and the model
layer checks them (`optimize.optimize_batch`) without knowing of runs. Which precision `auto` picks on a device is
measured (`model.precision`); what bf16 changes in the network is `VGGFeatures.lowered`; what TF32 changes is cuDNN's
switch, set by `configure_device` here, which every stylizer is built after (`model.build.build_stylizer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NETWORK_PRECISIONS = ("fp32", "tf32", "bf16")  # what a network runs in
PRECISIONS = ("auto", *NETWORK_PRECISIONS)  # what --precision takes: auto is measured per device (`model.precision`)

# cuDNN's exhaustive algorithm search (cudnn.benchmark) runs once per new input shape. A run meets many shapes: every
# scale of coarse-to-fine is a new one, and so is every aspect ratio among the photos, and each target is computed
# once at its shape. With the search on, every one of those shapes pays for trying every convolution algorithm of
# the ~13 layers forward and backward, a cost of the order of a second, while a 256 px scale of 200 iterations takes
# about as long on a modern GPU; for VGG's plain 3x3 convolutions cuDNN's heuristics pick the same or a close
# algorithm. So it stays off; `batchstyle bench device` prints the first-iteration cost and per-iteration gain of
# both settings, which is what would justify turning it on.
CUDNN_BENCHMARK = False


def configure_device(device: torch.device, precision: str, cudnn_benchmark: bool = CUDNN_BENCHMARK) -> None:
    """Convolutions may use TF32; matrix products stay fp32, because they compute the Gram matrices."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = False
