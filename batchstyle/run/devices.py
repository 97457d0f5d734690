"""Devices, in one place: what `--devices` names, which precision runs where, how a device is set up, and which
failures mean the device (not the row) is at fault.

Both the engine (which plans slots) and the pools (which host workers) import this; nothing here imports either.
"""

from __future__ import annotations

import torch

from batchstyle.errors import RunError


def pick_device(name: str = "auto") -> torch.device:
    """One device, for the benchmarks: `auto` is the current GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(_one_device(name, torch.cuda.device_count()))


def _one_device(name: str, gpus: int) -> str:
    """`cpu` or `cuda:N` for one device name, checked against the GPUs torch sees."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown device {name!r}: use auto, all, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise RunError(f"device {name} is not supported: use auto, all, cpu, cuda or cuda:N")
    if not gpus:
        raise RunError(f"device {name} asked for, but torch sees no CUDA GPU; use --devices cpu")
    index = 0 if device.index is None else device.index
    if index >= gpus:
        raise RunError(f"device {name} asked for, but torch sees {gpus} GPU(s)")
    return f"cuda:{index}"


def parse_devices(text: str, gpus: int | None = None) -> list[str]:
    """`auto` (every GPU, else the CPU), `all` (every GPU), `cpu`, or a list such as `cuda:0,cuda:1` or `cpu,cpu`.

    A device named twice gets two worker slots, like --workers-per-device does for every device.
    """
    gpus = torch.cuda.device_count() if gpus is None else gpus
    text = text.strip().lower()
    if text in ("auto", "all"):
        if gpus:
            return [f"cuda:{i}" for i in range(gpus)]
        if text == "all":
            raise RunError("--devices all asks for every GPU, but torch sees none; use --devices cpu")
        return ["cpu"]
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise RunError("--devices is empty: use auto, all, cpu, or a list such as cuda:0,cuda:1")
    return [_one_device(name, gpus) for name in names]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware, as torch reports it: AVX512-BF16 (Zen 4, Cooper Lake) or AMX-BF16
    (Sapphire Rapids and later). Without it oneDNN emulates bf16 and is slower than fp32."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            found = get()
            return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
        except Exception:  # noqa: BLE001 - an unreadable CPUID is simply no bf16
            return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch before get_capabilities
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def precision_for(device: torch.device, asked: str, cpu_has_bf16: bool | None = None) -> str:
    """The precision a device runs at when `asked` for it; `auto` resolves per device:

    - CUDA: TF32 convolutions (Ampere and later run them ~8x faster than fp32, within the noise of the optimisation).
    - CPU with native bf16 (`cpu_has_bf16`, default: what `cpu_has_native_bf16` reports): bf16 autocast for the
      network, about half the time of fp32 per iteration, with final losses within a few percent (README). Without
      it, fp32: there TF32 does not exist and emulated bf16 is slower.
    - Apple GPUs (mps): fp32.

    Only the network runs in the lower precision: Gram matrices, losses and the optimiser stay fp32 everywhere.
    """
    if asked != "auto":
        return asked
    if device.type == "cuda":
        return "tf32"
    if device.type == "cpu":
        return "bf16" if (cpu_has_native_bf16() if cpu_has_bf16 is None else cpu_has_bf16) else "fp32"
    return "fp32"


def configure_device(device: torch.device, precision: str) -> None:
    """Convolutions may use TF32; matrix products stay fp32, because they compute the Gram matrices."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = False


DEVICE_FAULT_EXIT = 75  # a worker process exits with this after a device fault, so its parent replaces it


class DeviceFault(RuntimeError):
    """A CUDA error other than out-of-memory (illegal address, device-side assert, ECC): the context is poisoned
    and every later row on it would fail too. The worker process dies so that a fresh one takes its rows."""


def is_device_fault(exc: BaseException, device: torch.device) -> bool:
    if device.type != "cuda" or is_out_of_memory(exc):
        return False
    accelerator = getattr(torch, "AcceleratorError", ())
    text = str(exc)
    return isinstance(exc, accelerator) or (
        isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)
    )


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
