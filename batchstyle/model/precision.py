"""`--precision auto`, decided by measuring this machine rather than by its CPU flags.

Why: flags say little about speed. An AMD Zen 4 and an Intel Xeon both report AVX512-BF16; on the Zen 4 a bf16
iteration takes 0.56-0.60x the fp32 floor, on the Xeon 1.5-3x fp32 (docs/benchmarks.md). Cloud and virtual machines
report flags that say even less. So `auto` times one forward and backward pass of the run's trunk in each candidate
precision, keeps the faster only when it wins by a clear margin, and remembers the decision per machine, trunk and
torch version in the cache folder, so that only the first run on a machine pays for it.

    precision_decision(device, asked, arch, cache_dir, timings)
        -> the cache file for (device, threads, torch, trunk)  -- found: Decision(measured=False)
        -> else, under a file lock (workers starting together measure once, not at once):
           timings(candidates), i.e. measure(trunk, device, candidates) -> choose(seconds) -> write the file

Only the network runs in the lower precision: Gram matrices, losses and the optimiser stay fp32 everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from batchstyle.images import write_file_atomic
from batchstyle.model.features import VGGFeatures, build
from batchstyle.model.numerics import PRECISIONS
from batchstyle.model.weights import Weights
from batchstyle.options import default_values, make_settings

# What `auto` chooses among on each kind of device; the first is the baseline a faster one must beat. TF32 and bf16
# exist only where the hardware computes them (Ampere and later, bf16-capable CPUs); elsewhere they are emulated and
# the measurement says so. Apple GPUs run fp32: torch's MPS backend has no TF32, and its bf16 is not faster.
CANDIDATES: dict[str, tuple[str, ...]] = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "tf32")}
# A lower precision is kept only when it takes at most this share of the baseline's time: a few percent is within
# the noise of one short measurement, and not worth the precision given up.
MARGIN = 0.85
PROBE_SIDE = 128  # px, square: at 128 px a Xeon's fp32 pass takes ~0.1 s, so the whole decision ~1-2 s, once
WARM_UPS = 2  # untimed passes first: the bf16 copy of the trunk, oneDNN's or cuDNN's first choice of kernels
REPEATS = 3  # timed passes per candidate; the fastest is kept, the least disturbed by other work on the machine
# The trunk timed is the one the default options tap, built as a row builds it (`model.build` times the stylizer's own).
PROBE_SETTINGS = make_settings(default_values())
DECISION_VERSION = 2  # bump when the probe changes, so older decisions are measured again


@dataclass(frozen=True)
class Decision:
    """What `auto` resolved to on one device, and the measurement behind it (empty where nothing was measured)."""

    device: str  # the device as described in the decision's key: `cpu (Intel Xeon Processor)`, `cuda (H200)`
    chosen: str  # what the network runs in
    fastest: str = ""  # what the measurement picked (`choose`); differs from `chosen` where one was asked for
    seconds: dict[str, float] = field(default_factory=dict)  # fastest seconds of one forward+backward per candidate
    measured: bool = False  # measured by this call, not read from an earlier run's decision

    def describe(self) -> str:
        """One line for the log and the ledger: what was timed and what was chosen."""
        if not self.seconds:
            return f"{self.chosen} on {self.device}"
        times = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in self.seconds.items())
        how = "measured" if self.measured else "measured earlier"
        return f"{self.chosen} on {self.device} ({how}, one pass at {PROBE_SIDE} px: {times})"

    @property
    def slower(self) -> bool:
        """Whether the precision that runs was measured here and lost to another by the margin: worth a warning."""
        return bool(self.seconds) and self.fastest != self.chosen


def choose(seconds: Mapping[str, float], baseline: str = "fp32", margin: float = MARGIN) -> str:
    """The fastest candidate when it takes at most `margin` of the baseline's time; else the baseline."""
    best = min(seconds, key=lambda name: seconds[name])
    return best if best != baseline and seconds[best] <= margin * seconds[baseline] else baseline


def device_label(device: torch.device) -> str:
    """The device as a decision depends on it: its model. Not the threads a worker computes with: every worker of a
    machine must run the precision the others run, so that a row's pixels do not depend on which slot took it."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({_cpu_model()})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def decision_path(cache_dir: Path, device: torch.device, arch: str) -> Path:
    """One file per machine, device model, thread count, torch version and trunk: any of them changes the answer."""
    key = json.dumps([DECISION_VERSION, device_label(device), torch.__version__, arch, platform.node()])
    return cache_dir / "precision" / f"{arch}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _tf32(device: torch.device, on: bool) -> Iterator[None]:
    """cuDNN's TF32 switch for the duration of one candidate's timing, restored after."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def measure(
    trunk: VGGFeatures,
    device: torch.device,
    candidates: Sequence[str],
    side: int = PROBE_SIDE,
    repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """The fastest seconds of one forward and backward pass through `trunk` (a `VGGFeatures`) in each candidate
    precision, as an optimiser iteration runs it: pixels that require grad, every tapped layer in the loss.

    A candidate already more than twice the baseline after its first timed pass is not timed again: it has lost."""
    pixels = torch.rand(1, 3, side, side, device=device, generator=torch.Generator(device).manual_seed(0))
    seconds: dict[str, float] = {}
    for name in candidates:
        net = trunk.lowered(torch.bfloat16) if name == "bf16" else trunk

        def one_pass(net: VGGFeatures = net) -> float:
            x = pixels.detach().requires_grad_(True)
            _synchronize(device)
            start = clock()
            features = net(x)
            sum(f.float().square().mean() for f in features.values()).backward()
            _synchronize(device)
            return clock() - start

        times: list[float] = []
        with _tf32(device, name in ("tf32", "bf16")), torch.enable_grad():
            for _ in range(WARM_UPS):
                one_pass()
            for _ in range(repeats):
                times.append(one_pass())
                if seconds and times[0] > 2 * seconds[candidates[0]]:
                    break
        # The fastest, not the median: a decision is kept for good, and at 128 px another process's burst on a
        # 2-core Xeon once moved bf16's median from 0.45x to 0.81x fp32's, nearly past the margin.
        seconds[name] = min(times)
    return seconds


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Held while measuring, so workers that start together on one machine measure once, one after the other, and
    never time each other's load. Where there is no flock (Windows), nothing is locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read(path: Path, device: str, candidates: Sequence[str]) -> Decision | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        decision = Decision(data["device"], data["chosen"], data["chosen"], dict(data["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or unreadable: measure again and overwrite
    if decision.device != device or decision.chosen not in candidates or set(decision.seconds) != set(candidates):
        return None
    return decision


def precision_decision(
    device: torch.device,
    asked: str,
    arch: str,
    cache_dir: Path | None,
    timings: Callable[[Sequence[str]], dict[str, float]],
) -> Decision:
    """What `asked` runs as on `device`. `auto` is decided by measuring (once per machine: the decision is kept in
    `cache_dir`); an explicit precision runs as asked, and its decision says whether this machine measured it slower
    (`Decision.slower`), so the caller can warn. `timings` measures the candidates (`measure` on the trunk of
    `arch`), called only when no decision is kept."""
    if asked not in PRECISIONS:
        raise ValueError(f"unknown precision {asked!r}: use one of {', '.join(PRECISIONS)}")
    candidates = CANDIDATES.get(device.type, ("fp32",))
    label = device_label(device)
    if len(candidates) == 1 or (asked != "auto" and asked not in candidates):
        chosen = asked if asked != "auto" else candidates[0]
        return Decision(label, chosen, chosen)
    decision = None
    if cache_dir is not None:
        path = decision_path(cache_dir, device, arch)
        decision = _read(path, label, candidates)
        if decision is None:
            with _locked(path):
                decision = _read(path, label, candidates)  # another worker may have measured while we waited
                if decision is None:
                    decision = _measured(label, timings(candidates))
                    data = asdict(decision) | {"torch": torch.__version__, "arch": arch, "pid": os.getpid()}
                    write_file_atomic(path, lambda handle: handle.write(json.dumps(data, indent=1).encode()))
    else:
        decision = _measured(label, timings(candidates))
    if asked == "auto":
        return decision
    return Decision(label, asked, decision.fastest, decision.seconds, decision.measured)


def decide(
    weights: Weights,
    device: torch.device,
    asked: str,
    cache_dir: Path | None,
    trunk: Callable[[], VGGFeatures] | None = None,
) -> Decision:
    """`precision_decision` for `weights`, timing `trunk` (default: a trunk tapping the default options' layers, as a
    row builds it) only if no decision is kept for this machine."""

    def timings(candidates: Sequence[str]) -> dict[str, float]:
        net = trunk() if trunk is not None else _default_trunk(weights, device)
        return measure(net, device, candidates)

    return precision_decision(device, asked, weights.arch, cache_dir, timings)


def _default_trunk(weights: Weights, device: torch.device) -> VGGFeatures:
    settings = PROBE_SETTINGS
    taps = (*settings.content_layers, *settings.style_layers)
    return build(weights, taps, settings.pooling, channels_last=True).to(device)


def _measured(label: str, seconds: dict[str, float]) -> Decision:
    best = choose(seconds)
    return Decision(label, best, best, seconds, measured=True)
