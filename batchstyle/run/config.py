"""Run-level settings: which weights, where and how wide to compute, how targets are made and kept.

Rows carry their own options (`batchstyle.options`); these are the choices that hold for a whole run.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchstyle.errors import RunError
from batchstyle.model.weights import default_cache_dir
from batchstyle.run.plan import Shard, parse_shard

__all__ = ["RunConfig", "parse_size"]


@dataclass(frozen=True)
class RunConfig:
    """Run-level choices: which weights, where and how wide to compute, and how targets are made and kept."""

    model: str = "auto"
    devices: str = "auto"  # see parse_devices
    force: bool = False
    cache_dir: Path | None = None  # weights, targets and exported graphs; default: weights.default_cache_dir()
    targets: str = "ort"  # ort | torch
    trt_fp16: bool = False
    save_every: int = 0  # write every N-th iterate beside the output, in <output stem>.iterates/
    argv: tuple[str, ...] = ()
    workers_per_device: int = 1
    batch_size: int = 1  # 0: as many as fit the device's memory
    retries: int = 2  # times a row is handed out again after its worker died
    # Seconds a worker holding a batch may stay silent before it is killed as hung; None: plan.default_stall_timeout
    # (minutes beyond the slowest iteration the run expects), 0: never. Not for the parent's own in-process slot.
    stall_timeout: float | None = None
    precision: str = "auto"  # auto | fp32 | tf32 | bf16
    backend: str = "local"  # local | ray
    address: str | None = None  # Ray cluster address; None starts a local Ray
    shard: Shard | None = None
    clip_chunks: int = 0  # chunks a long clip is split into, run in parallel; 0: one per worker slot
    # Bytes a worker's row may use (`--max-memory`); None: the device's free memory on a GPU, 60% of the machine's
    # available memory on a CPU, shared among the workers there. A row that would not fit is tiled (`model.tiles`).
    max_memory: int | None = None
    tile: int | None = None  # None: tile only rows that would not fit; 0: never tile; N: tiles of N px
    # One worker drives every device given: it runs the rows on the first, and deals a tiled row's tiles to all of
    # them. For a few huge rows (prints) on several GPUs, where one row per GPU would leave GPUs idle or take long.
    spread_tiles: bool = False

    @property
    def cache(self) -> Path:
        return self.cache_dir or default_cache_dir()

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RunConfig:
        """A config from the values a person gives (CLI flags, `run_manifest` keywords), in their written forms:
        `batch_size` a number or "auto", `shard` "I/N" or "auto/N", paths as strings. None leaves the default.

        Raises `RunError` naming the value for a form that does not parse, and TypeError for an unknown name.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"unknown run setting {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        given = {name: value for name, value in values.items() if value is not None}
        if isinstance(given.get("batch_size"), str):
            text = given["batch_size"].strip().lower()
            try:
                given["batch_size"] = 0 if text == "auto" else int(text)
            except ValueError:
                raise RunError(f"--batch-size {text!r}: give a whole number of rows, or auto") from None
        if given.get("batch_size", 0) < 0:
            raise RunError(f"--batch-size {given['batch_size']}: give a whole number of rows, or auto")
        if "shard" in given or "shard" in values:
            given["shard"] = (
                given["shard"] if isinstance(given.get("shard"), Shard) else parse_shard(given.get("shard"))
            )
        if isinstance(given.get("max_memory"), str):
            given["max_memory"] = parse_size(given["max_memory"])
        if given.get("tile", 0) < 0:
            raise RunError(f"--tile {given['tile']}: give a tile size in pixels, or 0 for untiled")
        if given.get("cache_dir") is not None:
            given["cache_dir"] = Path(given["cache_dir"]).expanduser()
        if "argv" in given:
            given["argv"] = tuple(given["argv"])
        return cls(**given)


SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
SIZE_UNITS |= {"g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """`3GiB`, `3.5G`, `800MB`, `2048MiB` or plain bytes -> bytes (k, M, G, T are powers of 1000, KiB .. TiB of
    1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise RunError(f"--max-memory {text!r}: give a size such as 3GiB, 800MB or 12G")
    return int(float(match.group(1)) * SIZE_UNITS[unit])
