"""Run-level settings, in one table: which weights, where and how wide to compute, how targets are made and kept.

Rows carry their own options (`batchstyle.options`); these are the choices that hold for a whole run. Each field of
`RunConfig` is one setting, declared once with `setting(...)`: its type and default, the help of its `batchstyle run`
flag, how its written form is read ("auto", "3GiB", "0/4") and which values it takes. The CLI's flags, the keywords
of `run_manifest` and the settings `StyleTransfer` shares with a run are all made from these records
(`RUN_SETTINGS`), and every value, whichever surface gave it, is checked in one place, `RunConfig.__post_init__`, so
a flag and a keyword can never take different values or say different things about a wrong one.

Torch-free, and light: `batchstyle run --help` builds its flags from this module.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from batchstyle.errors import RunError
from batchstyle.model.numerics import PRECISIONS
from batchstyle.model.weights import default_cache_dir
from batchstyle.store import is_url, local_path

if TYPE_CHECKING:
    from batchstyle.run.plan import Shard

__all__ = ["RUN_SETTINGS", "RunConfig", "RunSetting", "parse_size"]

T = TypeVar("T")


@dataclass(frozen=True)
class RunSetting:
    """What one run setting is besides its type and default (which its `RunConfig` field holds)."""

    name: str
    help: str  # the flag's help; the default is added where it has a printable one
    default: Any
    # A given value in any form it may come in (a flag's text, a keyword's number, text or path) -> the value; raises
    # ValueError where the text does not parse (the message is then the flag, the text and `hint`).
    parse: Callable[[Any], Any] | None = None
    accepts: Callable[[Any], bool] = lambda value: True
    hint: str = ""  # what to give instead of a value it does not accept
    metavar: str | None = None
    flag: bool = True  # `batchstyle run` has a flag for it (cache_dir's is every command's --cache-dir)
    facade: bool = False  # `StyleTransfer` takes it too, by the same name and default
    aliases: tuple[str, ...] = ()  # more flag names

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def read(self, raw: Any) -> Any:
        """A given value in its written form -> the value (checked when the `RunConfig` is made)."""
        if self.parse is None:
            return raw
        try:
            return self.parse(raw)
        except ValueError:
            raise RunError(f"{self.flag_name} {raw!r}: {self.hint}") from None

    def problem(self, value: Any) -> str | None:
        if self.accepts(value):
            return None
        shown = repr(value) if isinstance(value, str) else str(value)
        return f"{self.flag_name} {shown}: {self.hint}"


def setting(
    default: T,
    help: str,
    *,
    parse: Callable[[Any], Any] | None = None,
    accepts: Callable[[Any], bool] | None = None,
    hint: str = "",
    metavar: str | None = None,
    flag: bool = True,
    facade: bool = False,
    aliases: tuple[str, ...] = (),
) -> T:
    """A `RunConfig` field that carries its `RunSetting` (named after the field when the table is read).

    Typed as its default, as `dataclasses.field` is, so the field keeps its annotated type."""
    record = RunSetting(
        "",
        help,
        default,
        parse,
        accepts or (lambda value: isinstance(value, type(default))),
        hint,
        metavar,
        flag,
        facade,
        aliases,
    )
    return dataclasses.field(default=default, metadata={"setting": record})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(minimum: int) -> Callable[[Any], bool]:
    return lambda value: _is_int(value) and value >= minimum


def _text_as(kind: Callable[[str], Any]) -> Callable[[Any], Any]:
    """Text read as `kind`; a Python value kept as given, for `accepts` to judge."""
    return lambda raw: kind(raw) if isinstance(raw, str) else raw


def _batch_size(raw: Any) -> Any:
    if isinstance(raw, str):
        return 0 if raw.strip().lower() == "auto" else int(raw)
    return raw


def _shard(raw: Any) -> Any:
    from batchstyle.run.plan import Shard, parse_shard  # the plan's imports (manifests, video) stay out of --help

    return raw if isinstance(raw, Shard) or raw is None else parse_shard(raw)


def _is_shard(value: Any) -> bool:
    from batchstyle.run.plan import Shard

    return value is None or isinstance(value, Shard)


CACHE_FOLDER_HELP = "Cache for weights, targets and ONNX graphs [default: $BATCHSTYLE_CACHE or ~/.cache/batchstyle]."


def _cache_place(raw: Any) -> Path | str | None:
    """A folder as a Path, a store URL as given (a Path would fold its `//`), `file://` as the folder it names."""
    if raw is None:
        return None
    text = str(raw)
    if is_url(text):
        return Path(local_path(text)).expanduser() if text.lower().startswith("file://") else text
    return Path(text).expanduser()


def _shared_url(text: str) -> bool:
    """A store a cache can be written to: not https://, which is read-only."""
    return is_url(text) and not text.lower().startswith(("http://", "https://"))


def _optional(accepts: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or accepts(value)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: value in choices


@dataclass(frozen=True)
class RunConfig:
    """Run-level choices: which weights, where and how wide to compute, and how targets are made and kept.

    Made from written values (flags, `run_manifest` keywords) by `from_values`; every field's value is checked on
    construction, so no `RunConfig` holds a value its flag would refuse."""

    model: str = setting(
        "auto",
        "auto, vgg19, vgg16, vgg16-hed, random, or a .safetensors/.pth file.",
        hint="give a weights name (batchstyle weights list) or a .safetensors/.pth file",
        facade=True,
    )
    devices: str = setting(
        "auto",
        "auto (every CUDA GPU, else the Apple GPU, else the CPU), all (every GPU), cpu, mps, or a list: "
        "cuda:0,cuda:1 or cpu,cpu.",
        hint="give auto, all, cpu, mps, or a list such as cuda:0,cuda:1",
        aliases=("--device",),
    )
    workers_per_device: int = setting(
        1,
        "Worker processes per device: more than one keeps a big GPU busy while another worker loads or saves.",
        parse=_text_as(int),
        accepts=_whole(1),
        hint="give a whole number of worker processes, at least 1",
        metavar="N",
    )
    batch_size: int = setting(  # 0: as many as fit the device's memory
        1,
        "Rows of the same size and settings optimised together; auto fills the GPU's free memory (1 on CPU).",
        parse=_batch_size,
        accepts=_whole(0),
        hint="give a whole number of rows, or auto",
        metavar="N|auto",
    )
    retries: int = setting(
        2,
        "Times a row is handed out again after its worker died (out of memory, crash, killed).",
        parse=_text_as(int),
        accepts=_whole(0),
        hint="give a whole number of retries, 0 or more",
        metavar="N",
    )
    # Seconds a worker holding a batch may stay silent before it is killed as hung; None: resources.stall_timeout
    # (minutes beyond the slowest iteration the run expects), 0: never. Not for the parent's own in-process slot.
    stall_timeout: float | None = setting(
        None,
        "A worker process or Ray actor silent this long while it holds rows is killed as hung and replaced, its "
        "rows retried; 0 never [default: 3 minutes plus 3 of the run's slowest predicted iterations].",
        parse=_text_as(float),
        accepts=_optional(lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0),
        hint="give seconds, 0 or more (0: never)",
        metavar="SECONDS",
    )
    precision: str = setting(
        "auto",
        "The network's precision. auto: TF32 on CUDA, bf16 on a CPU with native bf16 (AVX512-BF16, AMX), else "
        "fp32. Gram matrices, losses and the optimiser stay fp32.",
        accepts=_one_of(*PRECISIONS),
        hint=f"give one of {', '.join(PRECISIONS)}",
        metavar="[" + "|".join(PRECISIONS) + "]",
        facade=True,
    )
    backend: str = setting(
        "local",
        "local: a process per device slot on this machine; ray: Ray actors, one per GPU, across a cluster.",
        accepts=_one_of("local", "ray"),
        hint="give local or ray",
        metavar="[local|ray]",
    )
    address: str | None = setting(  # None starts a local Ray
        None,
        "Ray cluster address (auto: the cluster this node belongs to).",
        accepts=_optional(lambda value: isinstance(value, str)),
        hint="give a Ray cluster address, or auto",
    )
    shard: Shard | None = setting(  # given as None: the scheduler's own (SLURM), when it says
        None,
        "Run slice I of N (0-based) of the manifest; auto/N takes I from SLURM or Kubernetes "
        "[default: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set].",
        parse=_shard,
        accepts=_is_shard,
        hint="give I/N or auto/N",
        metavar="I/N",
    )
    clip_chunks: int = setting(
        0,
        "Split each video row into N chunks that run in parallel, blended over a few overlapping frames; 0: one "
        "chunk per worker (a clip stays whole on one worker).",
        parse=_text_as(int),
        accepts=_whole(0),
        hint="give a whole number of chunks, or 0 for one per worker",
        metavar="N",
    )
    force: bool = setting(False, "Redo every row, even those already done.", hint="give True or False")
    targets: str = setting(
        "ort",
        "Compute content/style targets with ONNX Runtime (TensorRT -> CUDA -> CPU) or PyTorch.",
        accepts=_one_of("ort", "torch"),
        hint="give ort or torch",
        metavar="[ort|torch]",
        facade=True,
    )
    trt_fp16: bool = setting(False, "Let TensorRT build fp16 engines for targets.", hint="give True or False")
    save_every: int = setting(  # iterates go beside the output, in <output stem>.iterates/
        0,
        "Also write every N-th iterate, into <output stem>.iterates/ beside the output.",
        parse=_text_as(int),
        accepts=_whole(0),
        hint="give a whole number of iterations, or 0 for none",
        metavar="N",
    )
    # Bytes a worker's row may use; None: the device's free memory on a GPU, 60% of the machine's available memory on
    # a CPU, shared among the workers there. A row that would not fit is tiled (`model.tiles`).
    max_memory: int | None = setting(
        None,
        "Memory a worker's row may use, e.g. 3GiB or 800MB: a row that would not fit is optimised in tiles, exactly "
        "[default: the GPU's free memory; on a CPU 60% of the machine's available memory, shared by its workers].",
        parse=lambda raw: parse_size(raw) if isinstance(raw, str) else raw,
        accepts=_optional(lambda value: _is_int(value) and value > 0),
        hint="give a size such as 3GiB, 800MB or 12G",
        metavar="SIZE",
        facade=True,
    )
    tile: int | None = setting(  # None: tile only rows that would not fit; 0: never tile; N: tiles of N px
        None,
        "Force tiles of PX pixels (0: never tile) [default: tiles only where a row would not fit, as large as fit].",
        parse=_text_as(int),
        accepts=_optional(_whole(0)),
        hint="give a tile size in pixels, or 0 for untiled",
        metavar="PX",
        facade=True,
    )
    # One worker drives every device given: it runs the rows on the first, and deals a tiled row's tiles to all of
    # them. For a few huge rows (prints) on several GPUs, where one row per GPU would leave GPUs idle or take long.
    spread_tiles: bool = setting(
        False,
        "One worker drives all --devices: rows run on the first, a tiled row's tiles are dealt to all of them.",
        hint="give True or False",
    )
    # Weights, targets and exported graphs; None: weights.default_cache_dir(). A store URL keeps each node's cache
    # local (the default folder) and shares targets and graphs through the store: `cache` and `cache_url`.
    cache_dir: Path | str | None = setting(
        None,
        CACHE_FOLDER_HELP + " A URL (s3://bucket/cache/) shares targets and graphs between machines through the "
        "store; each keeps a local copy in its default cache.",
        parse=_cache_place,
        accepts=_optional(lambda value: isinstance(value, Path) or (isinstance(value, str) and _shared_url(value))),
        hint="give a folder, or an s3://, gs:// or az:// URL",
        flag=False,
        facade=True,
    )
    ledger: Path | None = setting(  # None: store.work_dir of the --out URL, in the cache
        None,
        "Where --out is a URL (s3://bucket/out/): the local folder for the run's ledger and lock, and for each output "
        "until it is put [default: remote-out/<hash of the URL> in the cache].",
        parse=lambda raw: None if raw is None else Path(raw).expanduser(),
        accepts=_optional(lambda value: isinstance(value, Path)),
        hint="give a local folder",
        metavar="DIR",
    )
    argv: tuple[str, ...] = setting(  # the command line, for the ledger
        (),
        "The command line the run was started with, as the ledger records it.",
        parse=tuple,
        flag=False,
    )

    def __post_init__(self) -> None:
        for name, record in RUN_SETTINGS.items():
            problem = record.problem(getattr(self, name))
            if problem:
                raise RunError(problem)
        if self.spread_tiles and (self.backend == "ray" or self.workers_per_device > 1):
            raise RunError(
                "--spread-tiles runs one worker over this machine's devices: "
                "drop --workers-per-device and --backend ray"
            )

    @property
    def cache(self) -> Path:
        """This machine's cache folder: the one given, else the default (also where a URL cache is copied to)."""
        return self.cache_dir if isinstance(self.cache_dir, Path) else default_cache_dir()

    @property
    def cache_url(self) -> str | None:
        """The store the cache is shared through, where `--cache-dir` is a URL."""
        return self.cache_dir if isinstance(self.cache_dir, str) else None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RunConfig:
        """A config from the values a person gives (CLI flags, `run_manifest` keywords), in their written forms:
        `batch_size` a number or "auto", `shard` "I/N" or "auto/N", `max_memory` "3GiB", paths as strings. None
        leaves the default, except that `shard` given as None asks the scheduler (SLURM) for one.

        Raises `RunError` naming the flag and the value for one it does not take, and TypeError for an unknown name.
        """
        unknown = sorted(set(values) - set(RUN_SETTINGS))
        if unknown:
            raise TypeError(f"unknown run setting {', '.join(unknown)}; known: {', '.join(RUN_SETTINGS)}")
        given = {name: RUN_SETTINGS[name].read(raw) for name, raw in values.items() if raw is not None}
        if "shard" in values and values["shard"] is None:
            given["shard"] = _shard_from_scheduler()
        return cls(**{name: value for name, value in given.items() if value is not None})


def _shard_from_scheduler() -> Shard | None:
    from batchstyle.run.plan import parse_shard

    return parse_shard(None)


RUN_SETTINGS: dict[str, RunSetting] = {
    field.name: dataclasses.replace(field.metadata["setting"], name=field.name)
    for field in dataclasses.fields(RunConfig)
}


SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
SIZE_UNITS |= {"g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """`3GiB`, `3.5G`, `800MB`, `2048MiB` or plain bytes -> bytes (k, M, G, T are powers of 1000, KiB .. TiB of
    1024). Raises ValueError for anything else (`RUN_SETTINGS["max_memory"].read` says which forms to give)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size such as 3GiB, 800MB or 12G")
    return int(float(match.group(1)) * SIZE_UNITS[unit])
