"""Device choices decided from capabilities passed in: which device `auto` picks, which precision `auto` resolves to.

No Apple GPU and no CUDA GPU exist where these tests run, so what they decide is tested with the availability given
as values; what runs on those devices themselves is not tested here.
"""

from __future__ import annotations

import pytest
import torch

from batchstyle.errors import RunError
from batchstyle.run import devices, resources
from batchstyle.run.config import RunConfig
from batchstyle.run.devices import cpu_has_native_bf16, parse_devices, pick_device, precision_for

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda:0"), torch.device("mps")


@pytest.mark.parametrize(
    ("device", "asked", "bf16", "expected"),
    [
        (CPU, "auto", True, "bf16"),  # AVX512-BF16 or AMX: the network in bf16, about half the fp32 time
        (CPU, "auto", False, "fp32"),  # emulated bf16 is slower than fp32
        (CUDA, "auto", False, "tf32"),
        (CUDA, "auto", True, "tf32"),
        (MPS, "auto", True, "fp32"),  # the host CPU's bf16 says nothing about the Apple GPU
        (CPU, "fp32", True, "fp32"),  # asked for, always honoured
        (CPU, "bf16", False, "bf16"),
        (CUDA, "bf16", False, "bf16"),
        (MPS, "fp32", False, "fp32"),
    ],
)
def test_precision_auto_resolves_per_device_and_cpu_capability(
    device: torch.device, asked: str, bf16: bool, expected: str
) -> None:
    assert precision_for(device, asked, cpu_has_bf16=bf16) == expected


def test_precision_auto_on_this_cpu_follows_what_torch_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    found = torch.cpu.get_capabilities()
    assert cpu_has_native_bf16() == bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    assert precision_for(CPU, "auto") == ("bf16" if cpu_has_native_bf16() else "fp32")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "avx512_bw": True})
    assert not cpu_has_native_bf16()  # AVX-512 alone runs bf16 emulated: not native
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert cpu_has_native_bf16()


def test_auto_devices_prefer_cuda_then_the_apple_gpu_then_the_cpu() -> None:
    assert parse_devices("auto", gpus=0, mps=True) == ["mps"]
    assert parse_devices("all", gpus=0, mps=True) == ["mps"]
    assert parse_devices("auto", gpus=2, mps=True) == ["cuda:0", "cuda:1"]
    assert parse_devices("auto", gpus=0, mps=False) == ["cpu"]
    assert pick_device("auto", gpus=0, mps=True) == MPS
    assert pick_device("auto", gpus=1, mps=True) == torch.device("cuda")
    assert pick_device("auto", gpus=0, mps=False) == CPU


def test_mps_is_named_like_any_device_and_refused_where_there_is_none() -> None:
    assert parse_devices("mps", gpus=0, mps=True) == ["mps"]
    assert parse_devices("MPS:0, mps", gpus=0, mps=True) == ["mps", "mps"]  # two worker slots on the one Apple GPU
    assert parse_devices("mps,cpu", gpus=0, mps=True) == ["mps", "cpu"]
    assert pick_device("mps", gpus=0, mps=True) == MPS
    with pytest.raises(RunError, match="no Apple GPU"):
        parse_devices("mps", gpus=0, mps=False)
    with pytest.raises(RunError, match="no Apple GPU"):
        pick_device("mps", gpus=4, mps=False)
    assert precision_for(MPS, "auto") == "fp32"


def test_auto_batch_size_asks_free_memory_without_a_cuda_context_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent never computes: it must not open a CUDA context (hundreds of MB on GPU 0 for the whole run) just
    to read free memory, so it asks `free_gpu_memory`, which asks from a short-lived process."""

    def refuse(*args: object) -> None:
        raise AssertionError("torch.cuda.mem_get_info called in the parent")

    asked: list[list[str]] = []

    def free(names: list[str]) -> dict[str, int]:
        asked.append(list(names))
        return {name: 80 << 30 for name in dict.fromkeys(names)}

    monkeypatch.setattr(torch.cuda, "mem_get_info", refuse)
    monkeypatch.setattr(resources, "free_gpu_memory", free)
    slots = ["cuda:0", "cuda:1", "cuda:1"]
    budgets = resources.memory_budgets(RunConfig(), slots)
    assert budgets == {"cuda:0": 80 << 30, "cuda:1": 40 << 30}  # a GPU's free memory, shared by its slots
    assert asked == [slots]
    assert resources.auto_batch_size(slots, budgets, [], {}, "vgg19") == 1  # no job: nothing to fit
    assert resources.auto_batch_size(["cpu"], {"cpu": 80 << 30}, [], {}, "vgg19") == 1
    assert resources.auto_batch_size(["mps"], {}, [], {}, "vgg19") == 1  # unified memory: one image, as on a CPU
    assert len(asked) == 1
    assert devices.free_gpu_memory([]) == {}
