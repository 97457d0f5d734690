"""Devices, in one place: what `--devices` names and which failures mean the device (not the row) is at fault.
Which precision runs on a device is measured (`model.precision`); what it switches there is `model.numerics`'.

Both the engine (which plans slots) and the pools (which host workers) import this; nothing here imports either.
Torch is imported only where a device is asked about: a run's parent plans a CPU run without it (and a Linux host
with no GPU device node answers "no GPU" without it too), which is most of planning's memory (docs/benchmarks.md).
"""

from __future__ import annotations

import glob
import platform
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from batchstyle.errors import RunError

if TYPE_CHECKING:
    import torch

# Device types torch knows but batchstyle does not run on: named as unsupported rather than unknown.
_OTHER_TYPES = frozenset(
    [
        "xpu",
        "xla",
        "meta",
        "hip",
        "vulkan",
        "ipu",
        "hpu",
        "mtia",
        "privateuseone",
        "mkldnn",
        "opengl",
        "opencl",
        "ideep",
        "fpga",
        "maia",
        "ve",
        "lazy",
    ]
)
# The device nodes a GPU driver makes on Linux (NVIDIA, AMD ROCm, WSL's GPU paravirtualisation): with none of them,
# torch would find no GPU, and is not imported to be asked.
_GPU_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def gpu_count() -> int:
    """The CUDA GPUs torch sees; 0 without importing torch on a Linux host with no GPU device node."""
    if sys.platform.startswith("linux") and not any(glob.glob(pattern) for pattern in _GPU_NODES):
        return 0
    import torch

    return torch.cuda.device_count()


def mps_available() -> bool:
    """Whether torch can run on an Apple GPU here (Apple silicon, macOS 12.3+, a torch built with MPS)."""
    if platform.system() != "Darwin":
        return False
    import torch

    return torch.backends.mps.is_available()


def pick_device(name: str = "auto", gpus: int | None = None, mps: bool | None = None) -> torch.device:
    """One device, for the benchmarks and the facade: `auto` is the current CUDA GPU, else an Apple GPU, else the CPU.

    `gpus` (CUDA devices) and `mps` (an Apple GPU is usable) default to what torch sees; tests pass them in.
    """
    import torch

    gpus = gpu_count() if gpus is None else gpus
    mps = mps_available() if mps is None else mps
    if name == "auto":
        return torch.device("cuda" if gpus else "mps" if mps else "cpu")
    return torch.device(_one_device(name, gpus, mps))


def _one_device(name: str, gpus: int | None, mps: bool = False) -> str:
    """`cpu`, `cuda:N` or `mps` for one device name (as torch.device spells them), checked against the GPUs torch
    sees (`gpus`; None: asked only if a CUDA device is named)."""
    found = re.fullmatch(r"([a-z]+)(?::(\d+))?", name.strip().lower())
    kind = found.group(1) if found else ""
    if kind not in ("cpu", "cuda", "mps", *_OTHER_TYPES):
        raise RunError(f"unknown device {name!r}: use auto, all, cpu, cuda, cuda:N or mps")
    assert found is not None
    if kind == "cpu":
        return "cpu"
    if kind == "mps":
        if not mps:
            raise RunError(
                f"device {name} asked for, but torch sees no Apple GPU (torch.backends.mps.is_available() is "
                "False: it needs Apple silicon, macOS 12.3+ and a torch built with MPS); use --devices cpu"
            )
        return "mps"  # one Apple GPU per machine: mps:0 is mps
    if kind != "cuda":
        raise RunError(f"device {name} is not supported: use auto, all, cpu, cuda, cuda:N or mps")
    gpus = gpu_count() if gpus is None else gpus
    if not gpus:
        raise RunError(f"device {name} asked for, but torch sees no CUDA GPU; use --devices cpu")
    index = int(found.group(2) or 0)
    if index >= gpus:
        raise RunError(f"device {name} asked for, but torch sees {gpus} GPU(s)")
    return f"cuda:{index}"


def parse_devices(text: str, gpus: int | None = None, mps: bool | None = None) -> list[str]:
    """`auto` (every CUDA GPU, else the Apple GPU, else the CPU), `all` (every GPU), `cpu`, `mps`, or a list such as
    `cuda:0,cuda:1` or `cpu,cpu`.

    A device named twice gets two worker slots, like --workers-per-device does for every device. `gpus` (CUDA
    devices) and `mps` (an Apple GPU is usable) default to what torch sees; tests pass them in.
    """
    text = text.strip().lower()
    if text in ("auto", "all"):
        gpus = gpu_count() if gpus is None else gpus
        if gpus:
            return [f"cuda:{i}" for i in range(gpus)]
        if mps_available() if mps is None else mps:
            return ["mps"]
        if text == "all":
            raise RunError("--devices all asks for every GPU, but torch sees none; use --devices cpu")
        return ["cpu"]
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise RunError("--devices is empty: use auto, all, cpu, mps, or a list such as cuda:0,cuda:1")
    needs_mps = any(name.startswith("mps") for name in names)
    mps = (mps_available() if needs_mps else False) if mps is None else mps
    return [_one_device(name, gpus, mps) for name in names]


def free_gpu_memory(names: Sequence[str]) -> dict[str, int]:
    """Free bytes on each CUDA device named, without opening a CUDA context in this process.

    A context costs its process several hundred MB on every GPU it touches, for as long as the process lives: asked
    in a run's parent (which never computes), it would sit on GPU 0 beside that GPU's worker for the whole run. So
    unless this process already has one (a library caller on a GPU), a short-lived spawned process asks and exits.
    It sees the devices as a worker will (same CUDA_VISIBLE_DEVICES and order), which NVML's own numbering need not.
    """
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    import torch

    if torch.cuda.is_initialized():
        return _free_memory(names)
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply_async(_free_memory, (names,)).get(timeout=300)


def _free_memory(names: Sequence[str]) -> dict[str, int]:
    import torch

    return {name: int(torch.cuda.mem_get_info(torch.device(name))[0]) for name in names}


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work: what a timing or a host copy of results needs on an asynchronous device."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def empty_cache(device: torch.device) -> None:
    """Hands the allocator's cached blocks back, before a batch that ran out of memory is redone row by row."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


DEVICE_FAULT_EXIT = 75  # a worker process exits with this after a device fault, so its parent replaces it


class DeviceFault(RuntimeError):
    """A CUDA error other than out-of-memory (illegal address, device-side assert, ECC): the context is poisoned
    and every later row on it would fail too. The worker process dies so that a fresh one takes its rows. (An MPS
    error is taken for the row's own: Metal has no poisoned-context state to escape.)"""


def is_device_fault(exc: BaseException, device: torch.device) -> bool:
    if device.type != "cuda" or is_out_of_memory(exc):
        return False
    import torch

    accelerator = getattr(torch, "AcceleratorError", ())
    text = str(exc)
    return isinstance(exc, accelerator) or (
        isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)
    )


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
