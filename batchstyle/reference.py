"""A plain reference implementation of Gatys, Ecker & Bethge, to measure batchstyle's own loop against.

`reference_stylize` is written the textbook way (the paper plus the PyTorch tutorial idiom) and deliberately shares
none of batchstyle's loss modules or loop: its own Gram matrix and loss arithmetic, targets taken under
`torch.no_grad()`, and ONE `torch.optim.LBFGS(max_iter=iterations)` call driven by a closure, with no line search.
It comes in the two textbook ways of keeping pixels in [0, 1]: `clamp="end"`, the paper's plain loop, clamps once
at the end; `clamp="every"`, as the PyTorch tutorial does, also clamps the pixels in place at the start of every
closure evaluation ("correct the values of updated input image"). Only the VGG trunk (`VGGFeatures`: same weights,
preprocessing and pooling) is shared, so both paths optimise the same objective:

    total = content_weight * content + style_weight * style + tv_weight * tv
    content = mean over content layers of  mean((F - P)^2) / (mean(P^2) + eps)
    style   = sum over style layers of  w_l * mean((G(F) - G(S))^2) / (mean(G(S)^2) + eps),  sum(w_l) = 1
    G(F)    = F F^T / (H W)  (fp32),   tv = mean(dx^2) + mean(dy^2)

`quality_figures` runs one row through both and scores both final images with the same evaluator (batchstyle's
`Objective`), so the numbers are comparable; `format_quality` prints them as a table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchstyle.images import load_image, resize_long_side
from batchstyle.model.features import VGGFeatures
from batchstyle.model.optimize import Objective
from batchstyle.model.pixels import image_to_tensor
from batchstyle.model.scales import style_long_side
from batchstyle.model.stylize import Hooks, Inputs, Stylizer
from batchstyle.model.weights import Weights
from batchstyle.options import Settings, default_values, make_settings

EPS = 1e-8  # the same guard as batchstyle.model.losses, so a zero target gives the same (finite) loss


# --- the reference's own loss arithmetic -------------------------------------------------------------------------


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision values are summed in fp32 (a Gram sum overflows fp16); fp32 and fp64 are left as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def reference_gram(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C): F F^T / (H W), accumulated in at least fp32."""
    b, c, h, w = features.shape
    f = _wide(features).reshape(b, c, h * w)
    return torch.einsum("bip,bjp->bij", f, f) / (h * w)


def relative_mse(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error divided by the target's mean square (plus EPS): shape (B,)."""
    value, target = _wide(value), _wide(target)
    error = ((value - target) ** 2).reshape(value.shape[0], -1).mean(dim=1)
    energy = (target**2).reshape(target.shape[0], -1).mean(dim=1)
    return error / (energy + EPS)


def reference_tv(pixels: torch.Tensor) -> torch.Tensor:
    """Squared total variation, per image: mean of squared horizontal plus vertical neighbour differences."""
    b = pixels.shape[0]
    dx = pixels[:, :, :, 1:] - pixels[:, :, :, :-1]
    dy = pixels[:, :, 1:, :] - pixels[:, :, :-1, :]
    return (dx**2).reshape(b, -1).mean(dim=1) + (dy**2).reshape(b, -1).mean(dim=1)


@dataclass(frozen=True)
class ReferenceTargets:
    content: dict[str, torch.Tensor]  # layer -> feature map of the content image
    style: dict[str, torch.Tensor]  # layer -> Gram matrix of the style image


def reference_targets(
    model: VGGFeatures, content: torch.Tensor, style: torch.Tensor, settings: Settings
) -> ReferenceTargets:
    with torch.no_grad():
        content_feats = model(content)
        style_feats = model(style)
        return ReferenceTargets(
            content={name: content_feats[name].detach().clone() for name in settings.content_layers},
            style={name: reference_gram(style_feats[name]).detach() for name in settings.style_layers},
        )


def reference_losses(
    model: VGGFeatures, pixels: torch.Tensor, targets: ReferenceTargets, settings: Settings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, content, style, tv), each of shape (B,), for `pixels` against `targets`."""
    feats = model(pixels)
    zero = pixels.new_zeros(pixels.shape[0])
    content = zero
    for name, target in targets.content.items():
        content = content + relative_mse(feats[name], target) / len(targets.content)
    raw = settings.style_layer_weights or (1.0,) * len(settings.style_layers)
    layer_weights = {name: w / sum(raw) for name, w in zip(settings.style_layers, raw)}
    style = zero
    for name, target in targets.style.items():
        style = style + layer_weights[name] * relative_mse(reference_gram(feats[name]), target)
    tv = reference_tv(pixels)
    total = settings.content_weight * content + settings.style_weight * style + settings.tv_weight * tv
    return total, content, style, tv


# --- the reference loop ------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_init(content: torch.Tensor, settings: Settings) -> torch.Tensor:
    """The starting image: the content, or uniform noise from the row's seed (as batchstyle draws it)."""
    if settings.init == "content":
        return content.detach().clone()
    if settings.init == "noise":
        gen = torch.Generator().manual_seed(settings.seed)
        return torch.rand(content.shape, generator=gen).to(content.device)
    raise ValueError(f"the reference loop starts from content or noise, not {settings.init!r}")


@dataclass(frozen=True)
class ReferenceRun:
    image: torch.Tensor  # (1, 3, H, W), clamped to [0, 1]
    last_iterate: torch.Tensor  # the same before the clamp: where the optimiser itself ended
    seconds_per_iteration: float
    evaluations: int  # closure evaluations, i.e. iterations done (L-BFGS may stop early on its tolerances)
    totals: tuple[float, ...]  # the total loss at every evaluation, unclamped iterates


CLAMPS = ("end", "every")


def reference_run(
    model: VGGFeatures, content: torch.Tensor, style: torch.Tensor, settings: Settings, clamp: str = "end"
) -> ReferenceRun:
    """`reference_stylize` with its bookkeeping. The time covers the initial image, the optimiser and its one
    `step` call, and the final clamp; target computation is left out (batchstyle's `stylize` gets its targets)."""
    if settings.optimizer != "lbfgs":
        raise ValueError("the reference loop is L-BFGS only")
    if clamp not in CLAMPS:
        raise ValueError(f"the reference clamps at the end or at every evaluation, not {clamp!r}")
    targets = reference_targets(model, content, style, settings)
    device = content.device
    torch.manual_seed(settings.seed)
    _sync(device)
    start = time.perf_counter()
    x = reference_init(content, settings).requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], lr=settings.step_size(), max_iter=settings.iterations, history_size=100)
    totals: list[float] = []

    def closure() -> torch.Tensor:
        if clamp == "every":
            with torch.no_grad():
                x.clamp_(0, 1)
        optimizer.zero_grad()
        total = reference_losses(model, x, targets, settings)[0].sum()
        total.backward()
        totals.append(total.item())
        return total

    optimizer.step(closure)
    with torch.no_grad():
        image = x.detach().clamp(0, 1)
    _sync(device)
    seconds = time.perf_counter() - start
    return ReferenceRun(image, x.detach(), seconds / max(1, len(totals)), len(totals), tuple(totals))


def reference_stylize(
    model: VGGFeatures, content: torch.Tensor, style: torch.Tensor, settings: Settings, clamp: str = "end"
) -> tuple[torch.Tensor, float]:
    """Gatys et al. the textbook way: (final image clamped to [0, 1], wall seconds per closure evaluation).

    `model` must tap `settings.content_layers` and `settings.style_layers`. Starts from the content (or seeded
    noise), runs ONE `LBFGS(lr=settings.step_size(), max_iter=settings.iterations, history_size=100)` call with
    no line search, and clamps once at the end (`clamp="end"`) or before every evaluation too (`"every"`).
    """
    run = reference_run(model, content, style, settings, clamp)
    return run.image, run.seconds_per_iteration


# --- the comparison ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathFigures:
    """One path's final image as scored by batchstyle's `Objective`, and its speed."""

    content: float
    style: float
    tv: float
    total: float
    seconds_per_iteration: float
    iterations: int  # iterations actually done (the reference's closure evaluations)


@dataclass(frozen=True)
class QualityFigures:
    size: tuple[int, int]  # (width, height) of the output
    batchstyle: PathFigures
    reference: PathFigures
    loss_ratio: float  # batchstyle total / reference total: below 1 means batchstyle fits the objective better
    time_ratio: float  # batchstyle s/iteration / reference s/iteration
    kept_iteration: int  # which iterate batchstyle kept (its lowest-loss one; iterations = the last)
    # The reference's last iterate before its final clamp, scored alike (not an image anyone gets), and the share of
    # its values outside [0, 1]: what the clamp moves. Measured (chelsea x strokes, 256 px, 100 iterations): 6.9% of
    # the values, from -0.55 to 1.39; unclamped it scored content 1.278 / style 0.0060, where batchstyle's image is
    # (1.308 / 0.0059), and the clamp took it to 1.176 / 0.0155: a little content back for 2.6x the style loss.
    reference_unclamped: PathFigures
    reference_outside: float
    tutorial: PathFigures  # the reference clamping before every evaluation, as the PyTorch tutorial does


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


def _score(
    objective: Objective, image: torch.Tensor, seconds: float, iterations: int, clamp: bool = True
) -> PathFigures:
    with torch.no_grad():
        total, terms = objective(image.clamp(0, 1) if clamp else image)
    content, style, tv = (terms[name].sum() for name in ("content", "style", "tv"))
    c, s, t, tot = torch.stack([content, style, tv, total.sum()]).double().cpu().tolist()
    return PathFigures(c, s, t, tot, seconds, iterations)


def _warm_up(model: VGGFeatures, like: torch.Tensor) -> None:
    """Forward and backward at the row's size, untimed: the first passes at a new size pay for oneDNN/cuDNN
    kernel selection and the allocator's first requests, and whichever path ran first would be charged for them
    (measured: 0.34 s/iteration on the first 30-iteration run of a fresh model at 256 px, 0.30 thereafter)."""
    for _ in range(2):
        x = like.detach().clone().requires_grad_(True)
        sum(f.float().square().mean() for f in model(x).values()).backward()


def quality_figures(
    weights: Weights,
    content_path: str | Path,
    style_path: str | Path,
    size: int,
    iterations: int,
    device: str = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> QualityFigures:
    """One row through batchstyle (`Stylizer.stylize`, one scale) and through `reference_stylize`, same everything
    (weights, layers, layer weights, loss weights, size, init, iterations), both final images scored by the same
    `Objective` under no_grad on the clamped pixels.

    Timing, treated alike for both: target computation is excluded from both; each path's own set-up inside the
    timed call is included (batchstyle: its `stylize` call from its targets on -- initial image, objective and optimiser
    construction, the iterations, the lowest-loss bookkeeping and its one final no-grad evaluation; reference: the
    initial image, the optimiser, its `step` call and the final clamp). Seconds per iteration = that wall time /
    iterations (the reference's closure evaluations). The two runs are sequential (batchstyle first), so on a shared
    machine a change of load between them moves `time_ratio`; the losses repeat exactly for a given thread count.
    Both are timed after an untimed warm-up of the shared network at the row's size, so neither pays for it.
    `overrides` replaces default options (e.g. `init`, `seed`, loss weights); the optimiser is always L-BFGS.
    """
    dev = torch.device(device)
    values = (
        default_values()
        | {"size": size, "iterations": iterations}
        | dict(overrides or {})
        | {"optimizer": "lbfgs", "min_size": 0}
    )
    settings = make_settings(values)
    stylizer = Stylizer.local(weights, dev)
    item = Inputs(load_image(Path(content_path)), [load_image(Path(style_path))])
    content, targets = stylizer.scale_targets(item, settings, size)
    style_img = resize_long_side(item.styles[0], style_long_side(size, settings.style_scale))
    style = image_to_tensor(style_img).to(dev)
    model = stylizer.trunk(settings)

    _warm_up(model, content)
    started: list[float] = []

    def optimisation_starts(*_: object) -> None:
        _sync(dev)
        started.append(time.perf_counter())

    (outcome,) = stylizer.stylize([item], settings, Hooks(on_scale=optimisation_starts))
    _sync(dev)
    ours_seconds = (time.perf_counter() - started[0]) / settings.iterations

    ref = reference_run(model, content, style, settings)

    evaluator = Objective(model, targets, settings).to(dev)
    ours = _score(evaluator, outcome.image, ours_seconds, settings.iterations)
    theirs = _score(evaluator, ref.image, ref.seconds_per_iteration, ref.evaluations)
    unclamped = _score(evaluator, ref.last_iterate, ref.seconds_per_iteration, ref.evaluations, clamp=False)
    outside = float(((ref.last_iterate < 0) | (ref.last_iterate > 1)).float().mean())
    tut = reference_run(model, content, style, settings, clamp="every")
    tutorial = _score(evaluator, tut.image, tut.seconds_per_iteration, tut.evaluations)
    h, w = content.shape[-2:]
    return QualityFigures(
        size=(w, h),
        batchstyle=ours,
        reference=theirs,
        loss_ratio=_ratio(ours.total, theirs.total),
        time_ratio=_ratio(ours.seconds_per_iteration, theirs.seconds_per_iteration),
        kept_iteration=outcome.kept_iteration,
        reference_unclamped=unclamped,
        reference_outside=outside,
        tutorial=tutorial,
    )


def format_quality(fig: QualityFigures) -> str:
    """A small aligned table: batchstyle and the two reference loops by loss term and seconds per iteration, and
    batchstyle's ratio to each."""
    columns = ("content", "style", "tv", "total", "s/iteration")

    def cells(p: PathFigures) -> list[float]:
        return [p.content, p.style, p.tv, p.total, p.seconds_per_iteration]

    ours, theirs, tutorial = cells(fig.batchstyle), cells(fig.reference), cells(fig.tutorial)
    ratios = [_ratio(a, b) for a, b in zip(ours, theirs)]
    ratios[3], ratios[4] = fig.loss_ratio, fig.time_ratio
    rows = (
        ("batchstyle", ours),
        ("reference", theirs),
        ("ratio", ratios),
        ("tutorial", tutorial),
        ("ratio", [_ratio(a, b) for a, b in zip(ours, tutorial)]),
    )
    label = max(len(name) for name, _ in rows)
    width = 12
    lines = [" " * label + "".join(f"{c:>{width}}" for c in columns)]
    for name, row in rows:
        lines.append(f"{name:<{label}}" + "".join(f"{v:>{width}.4g}" for v in row))
    w, h = fig.size
    raw = fig.reference_unclamped
    lines.append(
        f"{w}x{h} px, {fig.batchstyle.iterations} iterations (reference: {fig.reference.iterations} evaluations); "
        f"batchstyle kept iterate {fig.kept_iteration}; ratio = batchstyle / the row above; reference: the paper's "
        "loop, clamped once at the end; tutorial: the same clamping before every evaluation, as the PyTorch "
        "tutorial does"
    )
    lines.append(
        f"the reference's last iterate before its final clamp: content {raw.content:.4g}, style {raw.style:.4g}, "
        f"total {raw.total:.4g}, with {100 * fig.reference_outside:.1f}% of its values outside [0, 1]"
    )
    return "\n".join(lines)
