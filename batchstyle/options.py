"""The option table: one definition per option, shared by the CLI, the manifest columns and the job key.

Keeping a single table means a manifest column, a command-line flag and the hash that decides whether a row must be
redone can never disagree about an option's name, type, range or default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchstyle.model.layout import ALL_RELUS


class OptionError(ValueError):
    """A value that does not fit its option; the message says what would. `option` names it, where known."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "y", "on"}:
        return True
    if value in {"0", "false", "no", "n", "off"}:
        return False
    raise OptionError(f"{raw!r} is not a yes/no value (use true or false)")


FINITE_FIX = "give a finite number"


class NotFinite(OptionError):
    """A number that is not finite: nan, inf, or one too large for a float (1e400). Python reads them all as
    floats, and no range check refuses nan (every comparison with it is false), so each would reach the loss and
    make every iterate nan. `Option.from_text` completes the fix with an example of the option's own."""

    def __init__(self, raw: str, example: str = "") -> None:
        fix = f"{FINITE_FIX}, e.g. {example}" if example else FINITE_FIX
        super().__init__(f"{raw.strip()!r} is not a finite number; {fix}")
        self.raw = raw


def _parse_number(kind: type) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw.strip())
        except ValueError:
            name = "an integer" if kind is int else "a number"
            raise OptionError(f"{raw!r} is not {name}") from None
        if not math.isfinite(value):
            raise NotFinite(raw)
        return value

    return parse


def _parse_layers(raw: str) -> tuple[str, ...]:
    layers = tuple(part.strip() for part in raw.replace(";", ",").split(",") if part.strip())
    if not layers:
        raise OptionError("no layer given")
    unknown = [name for name in layers if name not in ALL_RELUS]
    if unknown:
        raise OptionError(f"unknown layer {', '.join(unknown)} (layers are ReLU outputs: relu1_1 .. relu5_4)")
    if len(set(layers)) != len(layers):
        raise OptionError("a layer is listed twice")
    return layers


def parse_weight_list(raw: str) -> tuple[float, ...]:
    """Weights as in `0.7;0.3` (a comma works too): finite non-negative numbers, at least one, not all zero."""
    parts = [part.strip() for part in raw.replace(",", ";").split(";") if part.strip()]
    try:
        weights = tuple(float(part) for part in parts)
    except ValueError:
        raise OptionError(f"{raw!r} is not a list of numbers such as 0.7;0.3") from None
    bad = [part for part, weight in zip(parts, weights) if not math.isfinite(weight)]
    if bad:
        raise OptionError(f"{raw!r}: {bad[0]!r} is not a finite number; {FINITE_FIX} for each weight, e.g. 0.7;0.3")
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise OptionError(f"{raw!r}: weights must be non-negative numbers, not all zero")
    return weights


def _range(lo: float | None, hi: float | None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if lo is not None and value < lo:
            return f"must be at least {lo}"
        if hi is not None and value > hi:
            return f"must be at most {hi}"
        return None

    return check


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise OptionError(f"{raw!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _parse_bit_depth(raw: str) -> int:
    value = raw.strip()
    if value not in ("8", "16"):
        raise OptionError(f"{raw!r} is not 8 or 16")
    return int(value)


def _parse_paths(raw: str) -> tuple[str, ...]:
    """`a.png;b.png`: file paths, resolved and checked by whoever reads them (the manifest reader, the CLI)."""
    return tuple(part.strip() for part in raw.split(";") if part.strip())


def _parse_init(raw: str) -> str:
    """`content`, `noise`, or an image path (checked against the manifest's folder by the manifest reader)."""
    value = raw.strip()
    if not value:
        raise OptionError("empty init (use content, noise or an image path)")
    return value.lower() if value.lower() in {"content", "noise"} else value


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    check: Callable[[Any], str | None] = lambda value: None
    metavar: str = "VALUE"
    separator: str = ","  # between a tuple's items in text

    def from_text(self, raw: str) -> Any:
        """Parses and range-checks a manifest cell or command-line string."""
        try:
            value = self.parse(raw)
        except NotFinite as exc:
            raise NotFinite(exc.raw, self.example()) from None
        problem = self.check(value)
        if problem:
            raise OptionError(f"{raw.strip()!r} {problem}")
        return value

    def example(self) -> str:
        """A value the option takes, for a message's fix: its default where that is a number, else 1."""
        number = isinstance(self.default, (int, float)) and not isinstance(self.default, bool)
        return f"{self.default:g}" if number else "1"

    def coerce(self, value: Any) -> Any:
        """A value from Python (`512`, `("relu1_1", "relu2_1")`, `True`) or text, parsed and checked exactly as a
        manifest cell is: through its text, so no keyword can accept what a manifest column would refuse."""
        if isinstance(value, str):
            return self.from_text(value)
        if isinstance(value, list):
            value = tuple(value)
        return self.from_text(self.to_text(value))

    def to_text(self, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, tuple):
            return self.separator.join(str(v) for v in value)
        return str(value).lower() if isinstance(value, bool) else str(value)


STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
COLORS = ("auto", "style", "luminance", "transfer")
STOP_WINDOW = 20  # iterations over which a scale's relative improvement is measured for stop_tolerance
CONTENT_MASK_GAIN = 10.0  # content loss weight where a content mask is white, relative to where it is black
LAPLACIAN_POOL = 4  # px: Li et al. 2017 average-pool 4x4 before the Laplacian (lapstyle's default, lap_layers 2)
FACES = ("auto", "off")
TEMPORAL_WEIGHT = 200.0  # measured: docs/video.md#temporal-weight
FRAME_ITERATIONS_DIVISOR = 4  # frames after the first: iterations / this (measured: docs/video.md#temporal-weight)


def _parse_frames(raw: str) -> str:
    """`START:END`, either side may be empty; kept as text (normalised) so the job key reads it plainly."""
    if not raw.strip():
        return ""
    start_text, sep, end_text = raw.strip().partition(":")
    if not sep:
        raise OptionError(f"{raw!r} is not START:END (e.g. 0:48, or 100: for frame 100 to the end)")
    try:
        start = int(start_text) if start_text.strip() else 0
        end = int(end_text) if end_text.strip() else None
    except ValueError:
        raise OptionError(f"{raw!r}: START and END must be whole frame numbers, e.g. 0:48") from None
    if start < 0 or (end is not None and end <= start):
        raise OptionError(f"{raw!r}: need 0 <= START < END")
    return f"{start}:{'' if end is None else end}"


OPTIONS: dict[str, Option] = {
    opt.name: opt
    for opt in [
        Option("size", 512, _parse_number(int), "Long side of the output in pixels.", _range(16, 16384), "PX"),
        Option(
            "iterations",
            150,
            _parse_number(int),
            "Optimiser iterations per scale (the only scale when size <= min_size).",
            _range(1, 100000),
            "N",
        ),
        Option(
            "min_size",
            256,
            _parse_number(int),
            "Coarse-to-fine: start at this long side and grow by ~sqrt(2) up to size (0: one scale).",
            lambda value: None if value == 0 else _range(16, 16384)(value),
            "PX",
        ),
        Option(
            "scale_iterations",
            100,
            _parse_number(int),
            "Iterations at the first (smallest) scale when there are several (0: as many as iterations).",
            lambda value: None if not value else _range(1, 100000)(value),
            "N",
        ),
        Option(
            "optimizer",
            "lbfgs",
            _choice("lbfgs", "adam"),
            "lbfgs (fewer iterations to a good result) or adam (cheaper per iteration, steadier).",
            metavar="lbfgs|adam",
        ),
        Option(
            "learning_rate",
            None,
            _parse_number(float),
            "Step size (default: 1.0 for L-BFGS, 0.02 for Adam on [0, 1] pixels).",
            lambda value: None if value is None else _range(1e-6, 100)(value),
            "LR",
        ),
        Option(
            "content_weight",
            1.0,
            _parse_number(float),
            "Weight of the content loss (alpha).",
            _range(0, None),
        ),
        Option("style_weight", 100.0, _parse_number(float), "Weight of the style loss (beta).", _range(0, None)),
        Option("tv_weight", 10.0, _parse_number(float), "Weight of the total-variation loss.", _range(0, None)),
        Option(
            "laplacian_weight",
            0.0,
            _parse_number(float),
            "Weight of the structure term (Li et al. 2017): the output's Laplacian against the content's, both "
            "after laplacian_pool average pooling; keeps outlines and features the strokes would eat (0: off).",
            _range(0, None),
        ),
        Option(
            "laplacian_pool",
            LAPLACIAN_POOL,
            _parse_number(int),
            "Average pooling (px) before the structure term's Laplacian: larger compares coarser structure.",
            _range(1, 64),
            "PX",
        ),
        Option(
            "content_layers",
            ("relu4_2",),
            _parse_layers,
            "Content layers, comma-separated.",
            metavar="LAYERS",
        ),
        Option(
            "style_layers",
            STYLE_LAYERS,
            _parse_layers,
            "Style layers, comma-separated.",
            metavar="LAYERS",
        ),
        Option(
            "style_layer_weights",
            (),
            lambda raw: () if not raw.strip() else parse_weight_list(raw),
            "Per-style-layer weights, one per style layer (default: equal). Normalised to sum to 1.",
            metavar="W,W,...",
        ),
        Option(
            "style_scale",
            1.0,
            _parse_number(float),
            "Style image size relative to the output's long side: below 1 gives larger brush strokes' detail.",
            _range(0.05, 8),
            "S",
        ),
        Option(
            "color",
            "auto",
            _choice(*COLORS),
            "Colours: style (the painting's), luminance (style the brightness only, keep the content's colours), "
            "transfer (recolour the style to the content's palette first, keep its strokes), auto (the painting's, "
            "unless its tones are far from the content's, as a near-black photo's are from daylight: then transfer).",
            metavar="|".join(COLORS),
        ),
        Option(
            "preserve_color",
            False,
            _parse_bool,
            "Same as --color luminance (kept for older manifests).",
            metavar="BOOL",
        ),
        Option(
            "style_loss",
            "gram",
            _choice("gram", "moments"),
            "gram (Gatys et al.) or moments: feature means and covariances matched by the Wasserstein-2 distance.",
            metavar="gram|moments",
        ),
        Option(
            "average",
            "none",
            _choice("none", "ema"),
            "Output the lowest-loss iterate (none) or a bias-corrected exponential moving average of the iterates.",
            metavar="none|ema",
        ),
        Option(
            "stop_tolerance",
            0.005,
            _parse_number(float),
            "A scale stops when its loss improved by less than this fraction over the last "
            f"{STOP_WINDOW} iterations (0: run every iteration).",
            _range(0, 1),
            "TOL",
        ),
        Option(
            "style_masks",
            (),
            _parse_paths,
            "One greyscale mask per style, ';'-separated in the order of the styles: white is where that style goes.",
            metavar="MASK;MASK",
            separator=";",
        ),
        Option(
            "content_mask",
            "",
            str.strip,
            f"A greyscale mask: where it is white the content holds {CONTENT_MASK_GAIN:g}x more (a face, a sign).",
            metavar="MASK",
        ),
        Option(
            "faces",
            "off",
            _choice(*FACES),
            "auto: find frontal faces in the content (an LBP cascade, offline) and hold the content there "
            "face_weight x more, as a content_mask would; a content_mask given wins. off: no detection. The default "
            "is off until the portrait panel has judged auto.",
            metavar="|".join(FACES),
        ),
        Option(
            "face_weight",
            CONTENT_MASK_GAIN,
            _parse_number(float),
            "With faces=auto: how much more the content holds on a found face than elsewhere (1: no more).",
            _range(1, 1000),
        ),
        Option("init", "content", _parse_init, "Start from: content, noise, or an image file.", metavar="INIT"),
        Option("pooling", "max", _choice("max", "avg"), "VGG pooling layers.", metavar="max|avg"),
        Option("seed", 0, _parse_number(int), "Random seed (noise init).", _range(0, 2**63 - 1)),
        # Video rows (content a clip or a folder of frames); image rows ignore them. See batchstyle.video.
        Option(
            "temporal_weight",
            TEMPORAL_WEIGHT,
            _parse_number(float),
            "Video: weight of the temporal loss against the previous output warped by the optical flow "
            "(0: every frame stylized on its own, and it flickers).",
            _range(0, None),
        ),
        Option(
            "frame_iterations",
            None,
            _parse_number(int),
            "Video: iterations for each frame after the first, which starts from the previous one warped "
            f"(default: iterations / {FRAME_ITERATIONS_DIVISOR}, at least 1; with temporal_weight 0 every frame "
            "gets all scales and iterations).",
            lambda value: None if value is None else _range(1, 100000)(value),
            "N",
        ),
        Option(
            "frames",
            "",
            _parse_frames,
            "Video: only frames START:END (0-based, END excluded), e.g. 0:48.",
            metavar="START:END",
        ),
        Option("every", 1, _parse_number(int), "Video: every N-th frame only (a preview).", _range(1, 10000), "N"),
        Option(
            "bit_depth",
            8,
            _parse_bit_depth,
            "Bits per channel of the output: 16 (PNG and TIFF only) keeps the optimiser's smooth gradations "
            "for printing and grading.",
            metavar="8|16",
        ),
    ]
}


@dataclass(frozen=True)
class Settings:
    """Every option resolved for one job: command-line defaults overlaid by the row's own values."""

    size: int
    iterations: int
    min_size: int
    scale_iterations: int | None
    optimizer: str
    learning_rate: float | None
    content_weight: float
    style_weight: float
    tv_weight: float
    laplacian_weight: float
    laplacian_pool: int
    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    style_layer_weights: tuple[float, ...]
    style_scale: float
    color: str
    preserve_color: bool
    style_loss: str
    average: str
    stop_tolerance: float
    style_masks: tuple[str, ...]
    content_mask: str
    faces: str
    face_weight: float
    init: str
    pooling: str
    seed: int
    temporal_weight: float
    frame_iterations: int | None
    frames: str
    every: int
    bit_depth: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def step_size(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1.0 if self.optimizer == "lbfgs" else 0.02

    def later_frame_iterations(self) -> int:
        """Iterations of a video frame after the first (one scale, at the output size)."""
        if self.frame_iterations is not None:
            return self.frame_iterations
        return max(1, self.iterations // FRAME_ITERATIONS_DIVISOR)

    def frame_span(self) -> tuple[int, int | None]:
        """`frames` as (start, end or None)."""
        if not self.frames:
            return 0, None
        start, _, end = self.frames.partition(":")
        return int(start), int(end) if end else None

    def normalised_style_layer_weights(self) -> tuple[float, ...]:
        weights = self.style_layer_weights or (1.0,) * len(self.style_layers)
        total = sum(weights)
        return tuple(w / total for w in weights)


def settings_problem(settings: Settings) -> str | None:
    """Cross-option checks that no single cell can make."""
    if settings.style_layer_weights and len(settings.style_layer_weights) != len(settings.style_layers):
        return (
            f"style_layer_weights has {len(settings.style_layer_weights)} values for "
            f"{len(settings.style_layers)} style layers: give one weight per layer"
        )
    return None


def default_values() -> dict[str, Any]:
    return {name: opt.default for name, opt in OPTIONS.items()}


def option_values(given: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every option's value: `base` (default: the table's defaults) overlaid by `given`, each given value parsed
    and checked as a manifest cell is. None leaves an option unset. Errors name the option."""
    values = dict(default_values() if base is None else base)
    for name, raw in given.items():
        option = OPTIONS.get(name)
        if option is None:
            close = difflib.get_close_matches(name, OPTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise OptionError(f"unknown option {name!r}{hint}", name)
        if raw is None:
            continue
        try:
            values[name] = option.coerce(raw)
        except OptionError as exc:
            raise OptionError(str(exc), name) from None
    return values


def make_settings(values: dict[str, Any]) -> Settings:
    """Settings with one spelling per meaning: preserve_color=true becomes color=luminance, so an old manifest's row
    and a new one that asks the same get the same job key."""
    values = {name: values[name] for name in OPTIONS}
    if values["preserve_color"]:
        values["color"], values["preserve_color"] = "luminance", False
    return Settings(**values)
