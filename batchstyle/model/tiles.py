"""Any output size in bounded memory: the objective, its exact gradient and the targets, evaluated tile by tile.

The Gatys loss and its gradient decompose exactly over tiles. Content and TV losses are sums over positions. A style
loss depends on the features only through each layer's Gram matrix G = sum_p F_p F_p^T / N (and mean, for the
moments loss), so once G is known its gradient at one position, dL/dF_p = (dL/dG + dL/dG^T) F_p / N, needs F_p alone.
One iteration is therefore two passes over the tiles:

    pixels (B, 3, H, W), whole: the optimiser's, untouched
      | tiles: own regions on a grid aligned to the total stride S of the deepest tap, each read with a halo
      v        (layout.halo: at least the receptive field, a multiple of S), clipped at the image's edges
    pass 1, no graph kept:  tile -> trunk -> each layer's own positions -> sums of m F F^T and m F per mask region
                            (style), content and TV shares                     => exact loss values, and from the
                            global Grams and means (small), dL/dG and dL/dmean by autograd
    pass 2, per tile:       trunk forward+backward of the surrogate  sum_p F_p^T A F_p + dL/dmean . F_p / N
                            (+ content and TV shares), A = sym(dL/dG) / N: its gradient is the true one
                            -> the tile's pixel gradient, halo included, added into the whole image's

Why the pieces agree with the untiled network exactly (checked by tests/test_tiles.py to 1e-4): tile origins and
the halo are multiples of S, so every pooling window of a tile is one of the whole image's; a tile that reaches the
image's edge is clipped there and sees the very zero padding and ceil-mode last window the whole image does; a tile
edge inside the image sees zeros that spoil a band narrower than the halo; and only positions of the tile's own
region count at each layer (a layer of stride s owns rows y0/s .. y1/s), so every position counts once.

The optimiser sees the whole image and nothing of this (`TiledObjective` overrides only `Objective.gradient` and
the value); memory is the whole image's few vectors (pixels, gradient, L-BFGS history) plus one tile's network.
`choose_tiling` chooses the tiling from a budget (with `memory`'s model), `tiled_targets` computes targets the same way.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchstyle.model.features import VGGFeatures
from batchstyle.model.layout import deepest, halo, layer_shape, stride
from batchstyle.model.losses import region_weights
from batchstyle.model.memory import MIN_PAIRS, bytes_per_float, cpu_budget, network_bytes, scale_bytes
from batchstyle.model.optimize import TERMS, Objective
from batchstyle.model.targets import Targets
from batchstyle.options import Settings


@dataclass(frozen=True)
class Tile:
    """One tile: the region it owns and the larger region it reads, as (top, bottom, left, right) pixel bounds."""

    own: tuple[int, int, int, int]
    read: tuple[int, int, int, int]

    def owned(self, layer_stride: int) -> tuple[slice, slice, slice, slice]:
        """At a layer of this stride: the own positions in the tile's feature map, then in the whole image's.

        Both region bounds are multiples of the stride, except an edge at the image's far side, where ceil-mode
        pooling gives the last, partial window its own position: rounding up counts it, once."""
        y0, y1, x0, x1 = self.own
        ry0, _, rx0, _ = self.read
        s = layer_stride
        gy0, gy1, gx0, gx1 = y0 // s, -(-y1 // s), x0 // s, -(-x1 // s)
        oy, ox = ry0 // s, rx0 // s
        return slice(gy0 - oy, gy1 - oy), slice(gx0 - ox, gx1 - ox), slice(gy0, gy1), slice(gx0, gx1)


def tile_grid(height: int, width: int, tile: int, margin: int, step: int) -> list[Tile]:
    """Tiles of `tile` px (rounded down to a multiple of `step`, the deepest tap's stride) covering the image, each
    read with `margin` px more on every side that the image has."""
    size = max(step, tile // step * step)
    tiles = []
    for y0 in range(0, height, size):
        for x0 in range(0, width, size):
            y1, x1 = min(height, y0 + size), min(width, x0 + size)
            read = (max(0, y0 - margin), min(height, y1 + margin), max(0, x0 - margin), min(width, x1 + margin))
            tiles.append(Tile((y0, y1, x0, x1), read))
    return tiles


class _Quadratic(torch.autograd.Function):
    """sum_p F_p^T (sum_k m_kp A_k) F_p per image, for symmetric A_k: the Gram surrogate, with a one-product backward
    (2 sum_k m_kp A_k F_p, kept from the forward) where autograd through A F and the product would run three."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, coefficients: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        # flat (B, C, n) fp32, coefficients (B, K, C, C) symmetric, masks (B, K, n) or None (K = 1)
        mixed = torch.zeros_like(flat)
        for k in range(coefficients.shape[1]):
            product = torch.bmm(coefficients[:, k], flat)
            mixed += product if masks is None else product * masks[:, k, None, :]
        ctx.save_for_backward(mixed)
        return (flat * mixed).sum(dim=(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mixed,) = ctx.saved_tensors
        return 2 * mixed * grad[:, None, None], None, None


@dataclass(frozen=True)
class _Layer:
    """What a style layer's share needs: its stride, its region weights at its size (None: no masks), their areas."""

    stride: int
    regions: torch.Tensor | None  # (B, K, h, w)
    area: torch.Tensor  # (B, K): the region's weight summed over the whole layer (h * w without masks)


class TiledObjective(Objective):
    """`Objective` with the value and gradient gathered over tiles of `tile` px; see the module's docstring.

    Extra terms (a video frame's temporal loss) are per-pixel and image-sized, as the pixels themselves are: they
    are evaluated on the whole image, untiled.
    """

    def __init__(
        self,
        model: VGGFeatures,
        targets: Targets,
        settings: Settings,
        autocast: torch.dtype | None = None,
        extra: Mapping[str, nn.Module] | None = None,
        *,
        tile: int,
        devices: Sequence[torch.device] = (),
    ) -> None:
        super().__init__(model, targets, settings, autocast, extra)
        last = deepest(model.arch, model.taps)
        self.step, self.margin, self.tile = stride(last), halo(model.arch, last), tile
        self._layers: dict[tuple[int, int, int], dict[str, _Layer]] = {}
        self._kept: tuple[Tile, torch.Tensor, dict[str, torch.Tensor]] | None = None  # pass 1's last tile, with graph
        # More devices the tiles are dealt to, each with a copy of this objective (network and targets; no extra
        # terms, which stay whole on this one), made when first used.
        self._spread = (targets, settings, autocast, tuple(torch.device(d) for d in devices))
        self._copies: list[TiledObjective] | None = None

    def _style_layers(self, pixels: torch.Tensor) -> dict[str, _Layer]:
        """Per style layer, the region weights and areas at the layer's whole size: computed as the untiled loss
        computes them (area averaging of the whole mask), then only sliced per tile. Once per image size."""
        b, _, height, width = pixels.shape
        if (b, height, width) not in self._layers:
            layers = {}
            for name, loss in self.style.items():
                _, h, w = layer_shape(self.model.arch, name, height, width)
                if loss.masks is None:
                    layers[name] = _Layer(stride(name), None, torch.full((b, 1), float(h * w), device=pixels.device))
                else:
                    regions = region_weights(loss.masks, pixels.new_empty(0, 0, h, w))
                    layers[name] = _Layer(stride(name), regions, regions.flatten(2).sum(dim=2).clamp(min=1e-8))
            self._layers = {(b, height, width): layers}
        return self._layers[(b, height, width)]

    def _tiles(self, pixels: torch.Tensor) -> list[Tile]:
        h, w = pixels.shape[-2:]
        return tile_grid(h, w, self.tile, self.margin, self.step)

    def _shares(self) -> list[TiledObjective]:
        """This objective and its copies on the other devices: each computes the tiles dealt to it."""
        if self._copies is None:
            targets, settings, autocast, devices = self._spread
            self._copies = [
                TiledObjective(_model_on(self.model, d), _targets_on(targets, d), settings, autocast, tile=self.tile)
                for d in devices
            ]
        return [self, *self._copies]

    def _deal(self, pixels: torch.Tensor, work: Callable[..., Any]) -> list[Any]:
        """`work(share, its pixels, its tiles)` on every share, concurrently when there are several (one thread a
        device: the kernels run while Python waits), tile k going to share k mod n. Results in share order."""
        shares, tiles = self._shares(), self._tiles(pixels)
        if len(shares) == 1:
            return [work(self, pixels, tiles)]
        jobs = [(s, pixels.to(s.device), tiles[k :: len(shares)]) for k, s in enumerate(shares)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(lambda job: work(*job), jobs))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _read(pixels: torch.Tensor, tile: Tile) -> torch.Tensor:
        ry0, ry1, rx0, rx1 = tile.read
        return pixels[..., ry0:ry1, rx0:rx1]

    def _content_share(self, name: str, feats: torch.Tensor, tile: Tile) -> torch.Tensor:
        """The tile's share of a content layer's loss: its own positions' squared error over the whole layer's mean."""
        loss = self.content[name]
        ty, tx, gy, gx = tile.owned(stride(name))
        own = feats[..., ty, tx].to(torch.promote_types(feats.dtype, torch.float32))
        diff = (own - loss.target[..., gy, gx]).square()
        count = loss.target[0].numel()
        if loss.weights is None:
            return diff.flatten(1).sum(dim=1) / (count * loss.norm)
        mean_weight = loss.weights.flatten(1).mean(dim=1)
        weighted = (diff * loss.weights[..., gy, gx]).flatten(1).sum(dim=1)
        return weighted / (count * mean_weight * loss.norm)

    @staticmethod
    def _tv_share(read: torch.Tensor, tile: Tile, height: int, width: int) -> torch.Tensor:
        """The tile's share of TV: the differences from its own pixels to their right and lower neighbours (read
        from the halo across a tile border; none past the image's edge)."""
        y0, y1, x0, x1 = tile.own
        ry0, _, rx0, _ = tile.read
        oy0, oy1, ox0, ox1 = y0 - ry0, y1 - ry0, x0 - rx0, x1 - rx0
        cx, cy = min(x1, width - 1) - rx0, min(y1, height - 1) - ry0  # last left / upper member of a pair, +1
        dx = read[..., oy0:oy1, ox0 + 1 : cx + 1] - read[..., oy0:oy1, ox0:cx]
        dy = read[..., oy0 + 1 : cy + 1, ox0:ox1] - read[..., oy0:cy, ox0:ox1]
        channels = read.shape[1]
        return dx.flatten(1).square().sum(dim=1) / (channels * height * (width - 1)) + dy.flatten(1).square().sum(
            dim=1
        ) / (channels * (height - 1) * width)

    @staticmethod
    def _own_flat(layer: _Layer, feats: torch.Tensor, tile: Tile) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A style layer's own positions as (B, C, n) fp32, and their region weights (B, K, n)."""
        ty, tx, gy, gx = tile.owned(layer.stride)
        own = feats[..., ty, tx]
        b, c = own.shape[:2]
        flat = own.reshape(b, c, -1).to(torch.promote_types(own.dtype, torch.float32))
        if layer.regions is None:
            return flat, None
        return flat, layer.regions[..., gy, gx].reshape(b, layer.regions.shape[1], -1).to(flat.dtype)

    def _gather(
        self, pixels: torch.Tensor, keep: bool = False
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Pass 1: every style layer's global Gram and mean per region, and the content and TV losses. `keep`: each
        share keeps its last tile's graph for pass 2 (see `_gather_tiles`)."""
        parts = self._deal(pixels, lambda share, own, tiles: share._gather_tiles(own, tiles, keep))
        here = pixels.device
        sums, content, tv = parts[0]
        for other_sums, other_content, other_tv in parts[1:]:
            for name, (gram, mean) in other_sums.items():
                sums[name][0] += gram.to(here)
                sums[name][1] += mean.to(here)
            content += other_content.to(here)
            tv += other_tv.to(here)
        layers = self._style_layers(pixels)
        stats = {
            name: (g / layers[name].area[..., None, None], m / layers[name].area[..., None])
            for name, (g, m) in sums.items()
        }
        return stats, content, tv

    def _gather_tiles(
        self, pixels: torch.Tensor, tiles: Sequence[Tile], keep: bool = False
    ) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Pass 1 over some tiles: the sums of m F F^T and m F per style layer and region, content and TV shares.

        With `keep` the last tile runs with its graph, kept for pass 2 to start from: a forward fewer per iteration
        (pass 1 is a forward of every tile, half of what pass 2 costs on a CPU, so with 2 tiles this saves a sixth
        of the iteration), in the memory pass 2 holds anyway for one tile."""
        b, _, height, width = pixels.shape
        layers = self._style_layers(pixels)
        sums: dict[str, list[torch.Tensor]] = {}
        content = pixels.new_zeros(b)
        tv = pixels.new_zeros(b)
        self._kept = None
        for k, tile in enumerate(tiles):
            last = keep and k == len(tiles) - 1
            read = self._read(pixels, tile)
            with torch.set_grad_enabled(last):
                if last:
                    read = read.clone().requires_grad_(True)
                kept = self.model(read)
            if last:
                self._kept = (tile, read, kept)
            feats = {name: value.detach() for name, value in kept.items()}
            del kept
            for name in self.content:
                content += self.content_layer_weight * self._content_share(name, feats[name], tile)
            for name in self.style:
                flat, regions = self._own_flat(layers[name], feats[name], tile)
                if regions is None:
                    gram, mean = torch.bmm(flat, flat.transpose(1, 2))[:, None], flat.sum(dim=2)[:, None]
                else:
                    weighted = flat[:, None] * regions[:, :, None]  # (B, K, C, n)
                    gram = weighted @ flat[:, None].transpose(2, 3)
                    mean = weighted.sum(dim=3)
                if name in sums:
                    sums[name][0] += gram
                    sums[name][1] += mean
                else:
                    sums[name] = [gram, mean]
            tv += self._tv_share(read.detach(), tile, height, width)
            del feats
        return sums, content, tv  # sums empty for a share dealt no tiles

    def _style_values(
        self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor, need_grad: bool
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
        """The style loss (B,) from the global statistics and, when asked, its gradient with respect to them."""
        style = like.new_zeros(like.shape[0])
        grads: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, loss in self.style.items():
            gram, mean = stats[name]
            with torch.enable_grad():
                gram = gram.detach().requires_grad_(need_grad)
                mean = mean.detach().requires_grad_(need_grad)
                value = self.style_layer_weights[name] * loss.from_moments(
                    gram, mean if loss.kind == "moments" else None
                )
                if need_grad:
                    wants = (gram, mean) if loss.kind == "moments" else (gram,)
                    found = torch.autograd.grad(value.sum(), wants)
                    grads[name] = (found[0], found[1] if loss.kind == "moments" else None)
            style = style + value.detach()
        return style, grads

    def _surrogate_gradient(
        self,
        source: torch.Tensor,
        tiles: Sequence[Tile],
        coefficients: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    ) -> torch.Tensor:
        """Pass 2 over some tiles: the surrogate's pixel gradient, each tile's (halo included) added in place."""
        a, b, c = (self.weights[name] for name in TERMS)
        height, width = source.shape[-2:]
        layers = self._style_layers(source)
        grad = torch.zeros_like(source)
        kept, self._kept = self._kept, None
        if kept is not None:  # pass 1's last tile first: its graph is here already
            tiles = [kept[0], *(tile for tile in tiles if tile != kept[0])]
        for tile in tiles:
            with torch.enable_grad():
                if kept is not None and tile == kept[0]:
                    _, read, feats = kept
                    kept = None
                else:
                    read = self._read(source, tile).clone().requires_grad_(True)
                    feats = self.model(read)
                surrogate = read.new_zeros(read.shape[0])
                if a:
                    for name in self.content:
                        surrogate = surrogate + a * self.content_layer_weight * self._content_share(
                            name, feats[name], tile
                        )
                if b:
                    for name, (coefficient, d_mean) in coefficients.items():
                        flat, regions = self._own_flat(layers[name], feats[name], tile)
                        surrogate = surrogate + b * _Quadratic.apply(flat, coefficient, regions)
                        if d_mean is not None:
                            scale = d_mean / layers[name].area[..., None]  # (B, K, C)
                            if regions is None:
                                term = (flat * scale[:, 0, :, None]).sum(dim=(1, 2))
                            else:
                                term = torch.einsum("bkc,bcn,bkn->b", scale, flat, regions)
                            surrogate = surrogate + b * term
                if c:
                    surrogate = surrogate + c * self._tv_share(read, tile, height, width)
                del feats
                # No tiled term depends on the tile when content, style and tv all weigh 0 (a row steered by an
                # extra term alone): its gradient is then 0, and backward() would raise on a graphless surrogate.
                if surrogate.requires_grad:
                    surrogate.sum().backward()
            if read.grad is not None:
                ry0, ry1, rx0, rx1 = tile.read
                grad[..., ry0:ry1, rx0:rx1] += read.grad
        return grad

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The losses, exactly as `Objective.forward` gives them, from one pass over the tiles; no graph."""
        with torch.no_grad():
            stats, content, tv = self._gather(pixels)
            style, _ = self._style_values(stats, pixels, need_grad=False)
            terms = {"content": content, "style": style, "tv": tv, **self.extra_terms(pixels)}
            return self.total(terms), terms

    def gradient(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pass 1 for the global statistics and the values, pass 2 for the gradient, left in `pixels.grad`."""
        stats, content, tv = self._gather(pixels.detach(), keep=True)
        style, grads = self._style_values(stats, pixels, need_grad=True)
        layers = self._style_layers(pixels)
        # The surrogate's coefficients: sym(dL/dG) / area, so that sum_p m_p F_p^T A F_p over all tiles has the
        # gradient of L; dL/dmean / area likewise for the means.
        coefficients = {
            name: ((d_gram + d_gram.transpose(-1, -2)) / 2 / layers[name].area[..., None, None], d_mean)
            for name, (d_gram, d_mean) in grads.items()
        }
        source = pixels.detach()

        def gradient_of(share: TiledObjective, own: torch.Tensor, tiles: Sequence[Tile]) -> torch.Tensor:
            there = own.device
            moved = {n: (g.to(there), m.to(there) if m is not None else None) for n, (g, m) in coefficients.items()}
            return share._surrogate_gradient(own, tiles, moved)

        parts = self._deal(source, gradient_of)
        grad = parts[0]
        for part in parts[1:]:
            grad += part.to(grad.device)
        pixels.grad = grad
        terms = {"content": content, "style": style, "tv": tv}
        if self.extra:
            with torch.enable_grad():
                extra = self.extra_terms(pixels)
                self.total(extra).sum().backward()
            terms.update({name: value.detach() for name, value in extra.items()})
        return self.total(terms), terms


def _model_on(model: VGGFeatures, device: torch.device) -> VGGFeatures:
    """A copy of the network (in the precision it runs in) on another device, without its cached lowered copies."""
    copied = copy.deepcopy(model)
    copied.__dict__.pop("_lowered", None)
    return copied.to(device)


def _targets_on(targets: Targets, device: torch.device) -> Targets:
    """A copy of `targets` on another device."""

    def moved(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return {name: tensor.to(device) for name, tensor in value.items()}
        return value

    return Targets(**{f.name: moved(getattr(targets, f.name)) for f in dataclasses.fields(targets)})


TiledObjectiveFactory = Callable[..., Objective]


def tiled(tile: int, devices: Sequence[torch.device] = ()) -> TiledObjectiveFactory:
    """What `optimize_batch(objective=...)` takes: an Objective evaluated over tiles of `tile` px, spread over
    `devices` beside its own when given."""

    def make(*args: Any, **kwargs: Any) -> Objective:
        return TiledObjective(*args, **kwargs, tile=tile, devices=devices)

    return make


# --- the tiling that fits a budget (`memory.scale_bytes` says what a scale needs) -----------------------------

PREFERRED_TILE = 768  # px: a 768 px tile reads 928 px, 1.46x its area; the L-BFGS history gives way to it
MIN_TILE = 128  # px: below this the halo is most of what a tile computes (a 128 px tile reads 288 px, 5x its area)


@dataclass(frozen=True)
class MemoryPolicy:
    """A worker's memory: `budget` bytes a row may use (None: no limit known), and `tile`: None to choose, 0 to force
    untiled, or a tile size in px to force. `scratch` is the folder an L-BFGS history too large for the budget is
    kept in (a run's output folder; None: the system's temporary folder). `devices`: more devices a tiled scale's
    tiles are dealt to, beside the worker's own."""

    budget: int | None = None
    tile: int | None = None
    scratch: Path | None = None
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tiling:
    """What one scale runs with: `tile` px (0: untiled), `history` L-BFGS pairs kept in `store` (`memory.STORES`),
    the predicted peak bytes (of the worker's own device), and how many devices compute the tiles."""

    tile: int
    history: int
    predicted: int
    store: str = "fp32"
    devices: int = 1  # the tiles are dealt to this many devices (`MemoryPolicy.devices` and the worker's own)


def choose_tiling(
    policy: MemoryPolicy,
    arch: str,
    content_layers: Sequence[str],
    style_layers: Sequence[str],
    width: int,
    height: int,
    batch: int = 1,
    history: int = 100,
    regions: int = 0,
) -> Tiling:
    """How to run one scale within `policy.budget`: untiled with `history` L-BFGS pairs when that fits; else tiled,
    the history cut to what fits beside a PREFERRED_TILE tile (never below MIN_PAIRS: in bf16 when those do not fit
    in fp32, in a file when they do not fit in bf16), then the largest tile that fits beside it. A forced tile
    (`policy.tile`) is taken as given, its history fitted the same way. What fits nowhere runs with tiles whose
    network takes a quarter of the budget."""

    def cost(tile: int, pairs: int, store: str = "fp32") -> int:
        return scale_bytes(arch, content_layers, style_layers, width, height, batch, pairs, tile, regions, store)

    budget = policy.budget
    if policy.tile == 0 or (policy.tile is None and (budget is None or cost(0, history) <= budget)):
        return Tiling(0, history, cost(0, history))
    last = deepest(arch, (*content_layers, *style_layers))
    step = stride(last)
    smallest = max(step, MIN_TILE // step * step)
    forced = policy.tile
    largest = -(-max(width, height) // step) * step
    pairs, store = history, "fp32"
    if budget is not None:
        # Pairs beyond 5 cost little convergence (5 pairs ended 2% above 100 at 256 px), smaller tiles cost
        # time in halo: the history gets what is left beside a PREFERRED_TILE tile, in fp32 while MIN_PAIRS fit, in
        # bf16 while they fit so, else in a file, where they cost no memory (docs/large-outputs.md#the-l-bfgs-history).
        spare = budget - cost(forced or min(largest, max(smallest, PREFERRED_TILE)), 0)
        floats = batch * 2 * 3 * width * height  # per pair
        store = next((s for s in ("fp32", "bf16") if spare >= MIN_PAIRS * floats * bytes_per_float(s)), "file")
        # A file's pairs are read twice a step: MIN_PAIRS keep that within what the page cache can serve.
        pairs = MIN_PAIRS if store == "file" else min(history, spare // (floats * bytes_per_float(store)))
    if forced:
        return Tiling(forced, pairs, cost(forced, pairs, store), store)
    candidates = range(largest, smallest - 1, -step)
    # Tiles as large as fit: fewer of them read less halo twice over (pass 1 and pass 2). Where none does (the
    # image-sized vectors alone overflow), tiles whose network takes a quarter of the budget: the smallest would
    # save little memory there and cost up to 5x the time in halo.
    fitting = [t for t in candidates if budget is None or cost(t, pairs, store) <= budget]
    if not fitting:
        quarter = (budget or 0) // 4
        fitting = [t for t in candidates if batch * network_bytes(arch, last, width, height, t) <= quarter]
        fitting = fitting or [smallest]
    tile = fitting[0]
    return Tiling(tile, pairs, cost(tile, pairs, store), store)


def default_budget(device: torch.device) -> int:
    """A worker's budget when none is given: the device's free memory on a GPU, `memory.cpu_budget` on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return cpu_budget()


# --- targets, tile by tile ---------------------------------------------------------------------------------------


@torch.no_grad()
def tiled_targets(
    model: VGGFeatures, pixels: torch.Tensor, content_layers: Sequence[str], style_layers: Sequence[str], tile: int
) -> dict[str, torch.Tensor]:
    """What a target graph outputs (content_<layer>, gram_<layer>, mean_<layer>; see `export.TargetGraph`) for
    images too large to run whole: the content features put together from the tiles' own positions, the Grams and
    means summed over them. `model` taps at least these layers, in fp32."""
    b, _, height, width = pixels.shape
    last = deepest(model.arch, model.taps)
    tiles = tile_grid(height, width, tile, halo(model.arch, last), stride(last))
    out: dict[str, torch.Tensor] = {}
    for name in content_layers:
        out[f"content_{name}"] = pixels.new_empty(b, *layer_shape(model.arch, name, height, width))
    sums: dict[str, list[torch.Tensor]] = {}
    for piece in tiles:
        ry0, ry1, rx0, rx1 = piece.read
        feats = model(pixels[..., ry0:ry1, rx0:rx1])
        for name in content_layers:
            ty, tx, gy, gx = piece.owned(stride(name))
            out[f"content_{name}"][..., gy, gx] = feats[name][..., ty, tx].float()
        for name in style_layers:
            ty, tx, _, _ = piece.owned(stride(name))
            own = feats[name][..., ty, tx]
            flat = own.reshape(b, own.shape[1], -1).float()
            gram, total = torch.bmm(flat, flat.transpose(1, 2)), flat.sum(dim=2)
            if name in sums:
                sums[name][0] += gram
                sums[name][1] += total
            else:
                sums[name] = [gram, total]
    for name in style_layers:
        _, h, w = layer_shape(model.arch, name, height, width)
        out[f"gram_{name}"] = sums[name][0] / (h * w)
        out[f"mean_{name}"] = sums[name][1] / (h * w)
    return out
