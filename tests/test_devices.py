"""Device choices decided from capabilities passed in: which device `auto` picks (which precision `auto` runs is
measured: tests/test_precision.py).

No Apple GPU and no CUDA GPU exist where these tests run, so what they decide is tested with the availability given
as values; what runs on those devices themselves is not tested here.
"""

from __future__ import annotations

import pytest
import torch

from batchstyle.errors import RunError
from batchstyle.run import devices, resources
from batchstyle.run.config import RunConfig
from batchstyle.run.devices import parse_devices, pick_device

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda:0"), torch.device("mps")


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
