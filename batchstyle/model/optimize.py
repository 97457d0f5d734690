"""The pixel optimisation loop: the image is the only parameter; the network and the targets stay fixed.

L-BFGS is stepped one iteration per call (its history lives in the optimiser state across calls), so every
iteration costs exactly one forward+backward, and progress, interruption and per-iteration losses come for free.
Images of one size are optimised as a batch, one forward+backward for all, each image still getting the result it
would get alone: the losses are per image, Adam is elementwise and L-BFGS is kept per image (`BatchLBFGS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar, cast

import torch
from torch import nn

from batchstyle.model.features import VGGFeatures
from batchstyle.model.history import pair_store
from batchstyle.model.losses import ContentLoss, LaplacianLoss, StyleLoss, TVLoss
from batchstyle.model.memory import lbfgs_history
from batchstyle.model.numerics import NETWORK_PRECISIONS
from batchstyle.model.targets import Targets
from batchstyle.options import STOP_WINDOW, Settings

TERMS = ("content", "style", "tv")  # the terms every objective has, in the order they are summed and shown


@dataclass(frozen=True)
class Losses(Mapping[str, float]):
    """One iterate's losses for one image: each term by name, unweighted (content, style, tv, then the extra terms
    such as a video frame's temporal), and the weighted total the optimiser minimised. Keyed by name, so a new term
    reaches the history, the ledger, the report's curves and the progress events without a tuple to widen anywhere;
    each term's weight is the option named after it (`term_weights`)."""

    terms: dict[str, float]
    total: float

    def __getitem__(self, name: str) -> float:
        return self.terms[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self.terms)

    def as_dict(self) -> dict[str, float]:
        """The terms and the total in one flat, JSON-ready mapping: what progress events and metadata carry."""
        return {**self.terms, "total": self.total}


def term_weights(settings: Settings, names: Iterable[str]) -> dict[str, float]:
    """Each term's weight: the option named after it (content_weight, style_weight, tv_weight, temporal_weight),
    which is also how the report reads a row's weights back from its recorded parameters."""
    weights = {}
    for name in names:
        weight = getattr(settings, f"{name}_weight", None)
        if not isinstance(weight, (int, float)):
            raise ValueError(f"loss term {name!r} has no weight: Settings needs a {name}_weight option")
        weights[name] = float(weight)
    return weights


@dataclass
class Outcome:
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]: the lowest-loss iterate, or the average of the iterates
    iterations: int  # done: fewer than asked for when the scale stopped on stop_tolerance
    losses: Losses  # of that image
    history: list[Losses] = field(default_factory=list)
    kept_iteration: int = 0  # which iterate was kept (0 = the start, iterations = the last or the average)
    stop: str = "iterations"  # why the scale stopped: "iterations" (all were done) or "converged"


class LossNotFinite(ArithmeticError):
    """Some images' losses went NaN or infinite: their pixels are garbage from there on, so no result of theirs may
    be written. `images` maps each such image's place in the batch to which terms did, in words; the others' losses
    are finite and they can be run again without it."""

    def __init__(self, when: str, images: dict[int, str]) -> None:
        self.when = when
        self.images = images
        super().__init__(f"the loss is not finite {when}: " + "; ".join(images.values()))

    def describe(self, image: int) -> str:
        return (
            f"the loss is not finite {self.when}: {self.images[image]}; nothing was written for it. Lower the "
            "weights: each term times its weight, and the steps taken from its gradient, must stay within float32 "
            "(3.4e38)"
        )


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def non_finite_terms(losses: Losses, weights: Mapping[str, float]) -> str | None:
    """Which of an image's terms went non-finite, in words; None when its total is finite. A weight so large that
    weight x term overflows float32 (style_weight=1e38: the terms are finite, their weighted sum infinite) is named
    as such: it is what the user has to change."""
    if math.isfinite(losses.total) and all(math.isfinite(value) for value in losses.values()):
        return None
    bad = [f"{name} is {value}" for name, value in losses.items() if not math.isfinite(value)]
    if not bad:
        bad = [
            f"{name}_weight {weights[name]:g} x {name} {value:.3g} overflows float32"
            for name, value in losses.items()
            if name in weights and abs(weights[name] * value) > FLOAT32_MAX
        ]
    return ", ".join(bad) or f"the weighted total is {losses.total}"


OnIteration = Callable[[int, Losses], None]
OnBatchIteration = Callable[[int, list[Losses]], None]  # one Losses per image of the batch

_Loss = TypeVar("_Loss", bound=nn.Module)


class _LossDict(nn.ModuleDict, Generic[_Loss]):
    """An nn.ModuleDict of one kind of loss by layer name, that says so to the checker: a plain one's items are
    nn.Module, whose attributes read as "Tensor | Module", which left every use of a loss's buffers and methods
    (the tiled objective's, `model.tiles`) unchecked."""

    def __init__(self, losses: Mapping[str, _Loss]) -> None:
        super().__init__(losses)

    def __getitem__(self, key: str) -> _Loss:
        return cast(_Loss, super().__getitem__(key))

    def items(self) -> ItemsView[str, _Loss]:
        return cast("ItemsView[str, _Loss]", super().items())


class Objective(nn.Module):
    """content_weight * content + style_weight * style + tv_weight * TV (+ extra terms), with per-layer weights; one
    value per image.

    `extra` terms, by name, are modules mapping the pixels to one unweighted value per image (a video frame's
    "temporal" loss), weighted like the others by the option named after them (`term_weights`); they count in the
    total, which the optimiser minimises and the kept iterate is chosen by. The objective gives its terms by name,
    so the losses recorded and shown are whatever terms it has.
    """

    def __init__(
        self,
        model: VGGFeatures,
        targets: Targets,
        settings: Settings,
        autocast: torch.dtype | None = None,
        extra: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        extra = dict(extra or {})
        if clash := set(extra) & set(TERMS):
            raise ValueError(f"extra loss terms may not reuse the names {sorted(clash)}: every term needs its own")
        # The network alone in low precision: Gram sums and loss means over ~1e5 terms stay in fp32. A copy of the
        # trunk with its convolutions in that dtype computes exactly what autocast would, without recasting every
        # weight on every forward.
        self.model = model.lowered(autocast) if autocast is not None else model
        self.content = _LossDict({name: ContentLoss(t, targets.content_weights) for name, t in targets.content.items()})
        self.style = _LossDict(
            {
                name: StyleLoss(
                    targets.grams[name],
                    targets.means[name],
                    settings.style_loss,
                    targets.style_masks,
                    targets.style_weights,
                )
                for name in targets.grams
            }
        )
        self.tv = TVLoss()
        self.content_layer_weight = 1.0 / max(1, len(self.content))
        self.style_layer_weights = dict(zip(settings.style_layers, settings.normalised_style_layer_weights()))
        self.weights = term_weights(settings, (*TERMS, *extra))  # by term name, in the order they are summed
        self.autocast = autocast
        self.extra = nn.ModuleDict(extra)

    def total(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of `terms` (name -> (B,)), added one at a time in their order: content, style and tv
        first, as `a * content + b * style + c * tv (+ extra)` always was, so the totals are the same to the bit."""
        weighted = [self.weights[name] * value for name, value in terms.items()]
        total = weighted[0]
        for value in weighted[1:]:
            total = total + value
        return total

    def extra_terms(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The extra terms of `pixels`, unweighted, by name: per-pixel and image-sized, never tiled."""
        return {name: term(pixels) for name, term in self.extra.items()}

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total (B,) and every term (B,) by name, unweighted: content, style, tv, then the extra terms."""
        feats = self.model(pixels)
        content = sum(self.content_layer_weight * loss(feats[name]) for name, loss in self.content.items())
        style = sum(self.style_layer_weights[name] * loss(feats[name]) for name, loss in self.style.items())
        zero = pixels.new_zeros(pixels.shape[0])
        content = content if isinstance(content, torch.Tensor) else zero
        style = style if isinstance(style, torch.Tensor) else zero
        terms = {"content": content, "style": style, "tv": self.tv(pixels), **self.extra_terms(pixels)}
        return self.total(terms), terms

    def gradient(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The losses of `pixels` (detached, one per image), with their gradient left in `pixels.grad`.

        The one place an iteration evaluates the objective: evaluating it another way (tile by tile, with global
        statistics gathered first) means overriding this, and the optimiser and everything around it stay as
        they are.
        """
        pixels.grad = None
        total, terms = self(pixels)
        total.sum().backward()
        return total.detach(), {name: value.detach() for name, value in terms.items()}


def structure_terms(settings: Settings, contents: torch.Tensor) -> dict[str, nn.Module]:
    """The terms the content pixels themselves are the target of, by name: the Laplacian structure term when its
    weight is not 0. With weight 0 there is no term at all, so the objective, its graph and its results are what they
    were before the term existed, to the bit."""
    if not settings.laplacian_weight:
        return {}
    return {"laplacian": LaplacianLoss(contents, settings.laplacian_pool)}


def initial_image(init: str, content: torch.Tensor, seed: int, init_image: torch.Tensor | None) -> torch.Tensor:
    if init == "content":
        return content.clone()
    if init == "noise":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(content.shape, generator=gen).to(content.device, content.dtype)
    if init_image is None:
        raise ValueError(f"init {init!r} needs its image")
    return torch.nn.functional.interpolate(init_image, size=content.shape[-2:], mode="bicubic").clamp(0, 1)


class BatchLBFGS(torch.optim.Optimizer):
    """L-BFGS over a (B, ...) tensor as B independent L-BFGS runs, one iteration per `step`.

    Per image it is `torch.optim.LBFGS(lr=lr, max_iter=1, history_size=history_size)` stepped once per iteration:
    the first step is scaled by min(1, 1/|g|_1); a pair (s, y) joins the image's history only if y.s > 1e-10,
    dropping its oldest when full; H0 = y.s / y.y from its latest pair; no line search; no step while the direction
    is not a descent (g.d > -tolerance_change); and an image whose gradient is within tolerance_grad of zero is left
    exactly as it is, its state included. One L-BFGS over the concatenation would instead mix the images'
    curvature, so a batch would give each image another result than running it alone.

    Everything stays on the device: per-image branches are masks, so `step` never waits for the device (no `.item()`)
    and the loop around it can run ahead of the GPU. The two-loop recursion is done on coefficients, not vectors:
    the inner products among stored pairs are kept in small (B, h, h) matrices, updated as pairs arrive, and the
    recursion becomes two triangular solves. That reads the history twice per step in two batched matmuls, as many
    bytes as torch's two loops, but in a few kernels rather than 4h small ones, whatever each image's own history
    order, so the images' ring buffers need not line up.

    The state is B * (2h + 5) image-sized vectors: the (s, y) pairs, the last direction and gradient, and the
    step's g, y and s. `store` keeps the pairs in fp32 beside the image, in bf16, or in a file in `folder`
    (`history.py`): at the largest sizes the pairs are most of the memory.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        lr: float = 1.0,
        history_size: int = 100,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        store: str = "fp32",
        folder: Path | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        if pixels.dim() < 1 or pixels.shape[0] < 1:
            raise ValueError("BatchLBFGS needs a (B, ...) tensor with B >= 1")
        if not pixels.is_contiguous():
            raise ValueError("BatchLBFGS needs a contiguous tensor: it steps each image through a flat view")
        defaults = {
            "lr": lr,
            "history_size": history_size,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
        }
        super().__init__([pixels], defaults)
        b, n, h = pixels.shape[0], pixels[0].numel(), history_size
        self.batch, self.numel, self.history_size = b, n, h
        self.bounds = bounds
        # Image b's pair in slot k is rows b*2h + 2k (s) and b*2h + 2k + 1 (y) of the store (history.py: fp32 or bf16
        # on the device, or a file); a pair not taken in goes to its scratch row, so storing is an index, not a branch.
        self._store = pair_store(store, b, h, n, pixels.detach(), folder)
        self._scratch = self._store.scratch
        self._base = torch.arange(b, device=pixels.device) * (2 * h)
        self._slots = torch.arange(h, device=pixels.device)
        self._stamp = torch.full((b, h), -1, dtype=torch.long, device=pixels.device)  # step a slot was written; -1
        self._sy = pixels.new_zeros(b, h, h)  # s_i . y_j between stored pairs, by slot
        self._yy = pixels.new_zeros(b, h, h)  # y_i . y_j
        self._rho = pixels.new_zeros(b, h)  # 1 / (s_i . y_i); 0 for an empty slot, which then contributes nothing
        self._h_diag = pixels.new_ones(b)
        self._d = pixels.new_zeros(b, n)
        self._t = pixels.new_zeros(b)
        self._prev_grad = pixels.new_zeros(b, n)
        self._vectors = pixels.new_empty(b, 3, n)  # g, y, s of the current step
        self._started = torch.zeros(b, dtype=torch.bool, device=pixels.device)
        self._steps = 0

    def stored_pairs(self) -> torch.Tensor:
        """(B,) how many (s, y) pairs each image holds: steps whose pair failed y.s > 1e-10 add none."""
        return (self._stamp >= 0).sum(dim=1)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One L-BFGS iteration per image from the gradient already in `.grad` (or the one `closure` computes)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        (pixels,) = group["params"]
        lr, tolerance_grad, tolerance_change = group["lr"], group["tolerance_grad"], group["tolerance_change"]
        b, n, h = self.batch, self.numel, self.history_size
        grad = pixels.grad.reshape(b, n) if pixels.grad is not None else pixels.new_zeros(b, n)

        active = grad.abs().amax(dim=1) > tolerance_grad  # the others are at an optimum: torch returns untouched
        first = ~self._started
        vectors = self._vectors
        g, y, s = vectors.unbind(1)
        g.copy_(grad)
        torch.sub(grad, self._prev_grad, out=y)
        torch.mul(self._d, self._t[:, None], out=s)

        # Slots fill from 0 up (an empty slot is taken before an old one is dropped) and every step stores at most
        # one pair, so only the first min(h, steps) slots can hold one: known here without asking the device, it
        # keeps the work proportional to the pairs held, as in torch's loops, while the history fills up.
        m = max(1, min(h, self._steps))
        # Every stored vector (s_0, y_0, s_1, ...) against g, y and s in one pass over the history, before the new
        # pair replaces a slot.
        old = self._store.dots(m, vectors).view(b, m, 2, 3)
        own = torch.bmm(vectors, vectors.transpose(1, 2))  # (b, 3, 3)
        ys, yy, sg, yg = own[:, 1, 2], own[:, 1, 1], own[:, 2, 0], own[:, 1, 0]

        store = active & self._started & (ys > 1e-10)
        slot = self._stamp.argmin(dim=1)  # an empty slot if there is one, else the oldest pair (dropped)
        row_s = torch.where(store, self._base + 2 * slot, self._scratch)
        self._store.write(row_s, torch.where(store, row_s + 1, self._scratch), s, y)
        new = (self._slots[:m] == slot[:, None]) & store[:, None]  # (b, m): the slot each storing image writes
        row, col = new[:, :, None], new[:, None, :]
        both = row & col
        sy = self._sy[:, :m, :m]
        sy = torch.where(col, old[:, :, 0, 1, None], sy)  # s_i . y_new
        sy = torch.where(row, old[:, None, :, 1, 2], sy)  # s_new . y_j
        self._sy[:, :m, :m] = torch.where(both, ys[:, None, None], sy)
        yy_new = old[:, :, 1, 1]  # y_i . y_new
        yy_m = torch.where(col, yy_new[:, :, None], self._yy[:, :m, :m])
        yy_m = torch.where(row, yy_new[:, None, :], yy_m)
        self._yy[:, :m, :m] = torch.where(both, yy[:, None, None], yy_m)
        self._rho[:, :m] = torch.where(new, 1.0 / ys[:, None], self._rho[:, :m])
        self._stamp[:, :m] = torch.where(new, self._steps, self._stamp[:, :m])
        self._h_diag = torch.where(store, ys / yy, self._h_diag)
        s_dot_g = torch.where(new, sg[:, None], old[:, :, 0, 0])
        y_dot_g = torch.where(new, yg[:, None], old[:, :, 1, 0])

        # The two-loop recursion in chronological order (empty slots first, with rho 0). With q = -g - sum a_j y_j,
        # loop one, a_i = rho_i s_i.q from the newest down, is the upper triangular system (I + rho U) a = -rho S g,
        # U_ij = s_i.y_j for j newer than i; loop two, c_i = a_i - rho_i y_i.r from the oldest up, is lower
        # triangular in U^T. The direction is then H q + sum c_i s_i.
        order = self._stamp[:, :m].argsort(dim=1)
        rows_c, cols_c = order[:, :, None].expand(b, m, m), order[:, None, :].expand(b, m, m)
        rho = self._rho[:, :m].gather(1, order)
        upper = self._sy[:, :m, :m].gather(1, rows_c).gather(2, cols_c).triu(1)
        yy_c = self._yy[:, :m, :m].gather(1, rows_c).gather(2, cols_c)
        h_diag = self._h_diag
        solve = torch.linalg.solve_triangular
        alpha = solve(
            rho[:, :, None] * upper, (-rho * s_dot_g.gather(1, order))[:, :, None], upper=True, unitriangular=True
        )
        y_dot_q = -y_dot_g.gather(1, order)[:, :, None] - torch.bmm(yy_c, alpha)
        rhs = alpha - (rho * h_diag[:, None])[:, :, None] * y_dot_q
        coef = solve(rho[:, :, None] * upper.transpose(1, 2), rhs, upper=False, unitriangular=True)
        by_slot = torch.zeros(b, m, 2, device=grad.device, dtype=grad.dtype)
        by_slot[:, :, 0].scatter_(1, order, coef[:, :, 0])
        by_slot[:, :, 1].scatter_(1, order, -h_diag[:, None] * alpha[:, :, 0])
        # For an image's first step (empty history, H0 = 1) this is exactly -g.
        d = self._store.combine(m, by_slot.view(b, 2 * m), -h_diag[:, None] * grad)

        t = torch.where(first, (1.0 / grad.abs().sum(dim=1)).clamp(max=1.0) * lr, torch.full_like(self._t, lr))
        descent = torch.bmm(grad[:, None, :], d[:, :, None]).view(b) <= -tolerance_change
        flat = pixels.view(b, n)
        flat.addcmul_(d, torch.where(active & descent, t, 0.0)[:, None])
        if self.bounds is not None:
            # A projected step: the pixels are put back inside the bounds, and the direction kept for the next pair
            # is the displacement actually taken. Clamping after an unbounded step (what torch's LBFGS plus a clamp
            # does) stores s = t d while the pixels moved less, so y no longer measures the curvature along s. A
            # style that drives many pixels to a bound (the Hubble deep field, nearly black) then gets directions
            # from wrong pairs: measured, chelsea x Hubble at 256 px went from a total loss of 5.2 to 406 in one
            # step at iteration 123, and at 512 px its scale never recovered (total 3.1e4 against 2.0 for Starry
            # Night). Where no pixel meets a bound this is exactly the unbounded step.
            correction = s  # s was stored above: its buffer is free
            torch.sub(flat.clamp(*self.bounds), flat, out=correction)
            flat.add_(correction)
            d = d.addcdiv_(correction, torch.where(t > 0, t, 1.0)[:, None])

        self._d = torch.where(active[:, None], d, self._d)
        self._t = torch.where(active, t, self._t)
        self._prev_grad.copy_(torch.where(active[:, None], grad, self._prev_grad))
        self._started |= active
        self._steps += 1
        return loss


def upsample(image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The previous scale's result at the next scale's size: the warm start of coarse-to-fine."""
    return torch.nn.functional.interpolate(image, size=like.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


LOSS_CHUNK = 20  # iterations between host copies of the losses on an asynchronous device
EMA_DECAY = 0.9  # average=ema: each iterate's weight decays by this per iteration (about the last 10 count)


def converged(best: Sequence[float], window: int, tolerance: float) -> bool:
    """The stop rule: the lowest loss so far improved by less than `tolerance` (relative) over the last `window`
    iterations. The running minimum, not the loss itself: L-BFGS without a line search has uphill steps, which must
    neither stop a scale that is still improving nor keep one going that is not."""
    if tolerance <= 0 or len(best) <= window:
        return False
    before, now = best[-1 - window], best[-1]
    return (before - now) <= tolerance * abs(before)


def optimize_batch(
    model: VGGFeatures,
    contents: torch.Tensor,
    targets: Targets,
    settings: Settings,
    init_images: Sequence[torch.Tensor | None] | None = None,
    on_iteration: OnBatchIteration | None = None,
    starts: torch.Tensor | None = None,
    on_snapshot: Callable[[int, torch.Tensor], None] | None = None,
    snapshot_every: int = 0,
    precision: str = "fp32",
    extra: Mapping[str, nn.Module] | None = None,
    objective: Callable[..., Objective] = Objective,
    history_pairs: int | None = None,
    history_store: str = "fp32",
    history_folder: Path | None = None,
) -> list[Outcome]:
    """Optimises B images of one size in one forward/backward per iteration; one Outcome per image.

    Each image's result is the one it would get alone (up to float rounding): the losses are per image and summed
    only for backward, so no image's gradient involves another's, Adam is elementwise, and L-BFGS is per image
    (`BatchLBFGS`). Each image keeps its own lowest-loss iterate, not simply the last: L-BFGS without a line search
    and Adam can both end on a step that went uphill, and the lowest-loss image is by definition the best fit to the
    targets (averaging late iterates would blur exactly the texture the style loss asks for).

    With `settings.average` "ema" the result is instead the bias-corrected exponential moving average of the
    iterates (crowsonkb's style-transfer-pytorch averages Adam's). With `settings.stop_tolerance` an image stops
    once its lowest loss improves by less than that fraction over STOP_WINDOW iterations: it is frozen (its pixels
    and its optimiser state stay as they are, so a batched image still gets its lone result) and the scale ends
    when every image has stopped.

    `starts` (B, 3, H, W) overrides `settings.init` (a warm start from a coarser scale); `init_images` gives each
    image its init image when `settings.init` names one. `on_iteration(k, losses)` gets iterate k-1's losses, one
    per image, and `on_snapshot` every `snapshot_every`-th iterate as a (B, 3, H, W) tensor.

    Nothing inside an iteration waits for the device: losses and the best iterates are kept on it, and the losses
    reach the host (and `on_iteration`) after every iteration on the CPU but in chunks of LOSS_CHUNK on a GPU, where
    a copy per iteration would stall the queue of kernels each time. `precision` "tf32" is the caller's cuDNN flag
    and changes nothing here; "bf16" runs the network's convolutions in bf16 (as autocast would, see
    `VGGFeatures.lowered`), the Grams, losses and optimiser staying fp32.

    `extra` adds loss terms by name (`Objective`), after the structure term (`structure_terms`) where
    `settings.laplacian_weight` asks for it; every `Losses` then carries them, each iteration's included.
    `objective` builds the objective from (model, targets, settings, autocast, extra): `tiles.tiled(px)` evaluates
    it tile by tile in bounded memory. `history_pairs` is each image's L-BFGS pairs (default `lbfgs_history`), kept in
    `history_store` (`memory.STORES`; a "file" in `history_folder`, default the system's temporary folder).
    """
    if precision not in NETWORK_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(NETWORK_PRECISIONS)}")
    batch, device = contents.shape[0], contents.device
    torch.manual_seed(settings.seed)
    autocast = torch.bfloat16 if precision == "bf16" else None
    extra = {**structure_terms(settings, contents), **(extra or {})}
    evaluate = objective(model, targets, settings, autocast, extra).to(device)
    if starts is not None:
        if starts.shape != contents.shape:
            raise ValueError(f"starts {tuple(starts.shape)} do not match contents {tuple(contents.shape)}")
        first = starts
    else:
        inits = list(init_images) if init_images is not None else [None] * batch
        if len(inits) != batch:
            raise ValueError(f"{len(inits)} init images for a batch of {batch}")
        # Image by image, so that image b's noise is exactly the noise a lone run with the same seed starts from.
        first = torch.cat(
            [initial_image(settings.init, contents[b : b + 1], settings.seed, inits[b]) for b in range(batch)]
        )
    pixels = first.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    lr = settings.step_size()
    if settings.optimizer == "lbfgs":
        pairs = history_pairs if history_pairs is not None else lbfgs_history(pixels[0].numel())
        optimizer: torch.optim.Optimizer = BatchLBFGS(
            pixels, lr=lr, history_size=pairs, store=history_store, folder=history_folder, bounds=(0.0, 1.0)
        )
    else:
        optimizer = torch.optim.Adam([pixels], lr=lr)

    iterations = settings.iterations
    chunk = 1 if device.type == "cpu" else LOSS_CHUNK
    recorded: torch.Tensor | None = None  # (iterations, terms + 1, B): iterate k's terms, then its total
    names: list[str] = []  # the terms, in the objective's order: fixed by its first evaluation
    best_total = torch.full((batch,), math.inf, device=device)
    best_iteration = torch.zeros(batch, dtype=torch.long, device=device)
    best_image = pixels.detach().clone()
    history: list[list[Losses]] = [[] for _ in range(batch)]
    running_best: list[list[float]] = [[] for _ in range(batch)]  # lowest total so far, per image, on the host
    stopped_at: list[int | None] = [None] * batch  # the iteration an image converged at
    frozen = torch.zeros(batch, dtype=torch.bool, device=device)
    average = settings.average == "ema"
    ema = torch.zeros_like(best_image) if average else None
    ema_steps = torch.zeros(batch, device=device)

    def flush(upto: int) -> None:
        done = len(history[0])
        if recorded is None or upto <= done:
            return
        for k, row in enumerate(recorded[done:upto].cpu().tolist(), start=done):
            losses = [Losses({name: row[j][b] for j, name in enumerate(names)}, row[-1][b]) for b in range(batch)]
            # Checked here, where the losses reach the host anyway (every iteration on a CPU, every LOSS_CHUNK on a
            # GPU): a check on the device would wait for it each iteration.
            check_finite(losses, f"at iteration {k + 1} of {iterations} at {settings.size} px")
            for b in range(batch):
                if stopped_at[b] is not None:
                    continue
                history[b].append(losses[b])
                running_best[b].append(min(losses[b].total, running_best[b][-1] if running_best[b] else math.inf))
                if converged(running_best[b], STOP_WINDOW, settings.stop_tolerance):
                    stopped_at[b] = k + 1
            if on_iteration is not None:
                on_iteration(k + 1, losses)

    def check_finite(losses: list[Losses], when: str) -> None:
        bad = {b: what for b, loss in enumerate(losses) if (what := non_finite_terms(loss, evaluate.weights))}
        if bad:
            raise LossNotFinite(when, bad)

    def result_images() -> torch.Tensor:
        if ema is None:
            return pixels.detach()
        corrected = ema / (1 - EMA_DECAY ** ema_steps.clamp(min=1))[:, None, None, None]
        return torch.where((ema_steps > 0)[:, None, None, None], corrected, pixels.detach())

    done = 0
    for i in range(iterations):
        if any(b is not None for b in stopped_at):
            frozen = torch.tensor([b is not None for b in stopped_at], device=device)
            if bool(frozen.all()):
                break
        total, terms = evaluate.gradient(pixels)
        with torch.no_grad():
            values = torch.stack([*terms.values(), total])
            if recorded is None:
                names = list(terms)
                recorded = values.new_empty(iterations, len(names) + 1, batch)
            recorded[i] = values
            # The losses are of the iterate before this step: recorded[k] is the loss of iterate k.
            improved = (total < best_total) & ~frozen
            best_total = torch.where(improved, total, best_total)
            best_iteration = torch.where(improved, i, best_iteration)
            best_image = torch.where(improved[:, None, None, None], pixels, best_image)
            before = pixels.detach().clone() if bool(frozen.any()) else None
            if before is not None and pixels.grad is not None:
                pixels.grad[frozen] = 0  # BatchLBFGS leaves an image with a zero gradient, and its state, untouched
        optimizer.step()
        with torch.no_grad():
            pixels.clamp_(0, 1)
            if before is not None:
                pixels.copy_(torch.where(frozen[:, None, None, None], before, pixels))  # Adam has momentum
            if ema is not None:
                live = (~frozen)[:, None, None, None]
                ema.copy_(torch.where(live, EMA_DECAY * ema + (1 - EMA_DECAY) * pixels, ema))
                ema_steps += (~frozen).float()
        done = i + 1
        if (i + 1) % chunk == 0:
            flush(i + 1)
        if on_snapshot is not None and snapshot_every and (i + 1) % snapshot_every == 0:
            flush(i + 1)  # progress is never behind the snapshots it reports
            on_snapshot(i + 1, result_images())
    flush(done)

    with torch.no_grad():
        final_images = result_images()
        total, terms = evaluate(final_images)
        keep_last = (total <= best_total) | torch.tensor(average, device=device)
        images = torch.where(keep_last[:, None, None, None], final_images, best_image)
        final = torch.stack([*terms.values(), total]).cpu().tolist()
    last_losses = [Losses({name: v[b] for name, v in zip(terms, final)}, final[-1][b]) for b in range(batch)]
    check_finite(last_losses, f"after the last iteration ({done}) at {settings.size} px")
    outcomes = []
    for b, (last, kept) in enumerate(zip(keep_last.tolist(), best_iteration.tolist())):
        image = images[b : b + 1]
        converged_at = stopped_at[b]
        ran = done if converged_at is None else converged_at
        stop = "iterations" if converged_at is None else "converged"
        if last or not history[b]:
            outcomes.append(Outcome(image, ran, last_losses[b], history[b], ran, stop))
        else:
            outcomes.append(Outcome(image, ran, history[b][kept], history[b], kept, stop))
    return outcomes
