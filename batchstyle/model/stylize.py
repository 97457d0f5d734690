"""One stylization end to end, for every caller: the model layer's single entry point.

    StyleTransfer.stylize (facade)   Worker.run_batch (a row)   bench iteration/memory   bench quality
                 \\                          |                          |                     /
                  +------------> Stylizer.stylize(inputs, settings, hooks) <-----------------+
                                   for each scale of scales.scale_plan(settings), coarse to fine:
                                       pixels at this size (luminance-only, or the styles recoloured)
                                       targets: TargetStore (target cache, else ONNX Runtime or torch)
                                       start: the previous scale upsampled | Inputs.start | settings.init
                                       optimize.optimize_batch: Objective (+ extra terms), L-BFGS/Adam,
                                           the lowest-loss iterate kept; hooks.on_iteration, on_snapshot
                                   colour put back -> Stylized per image

A batch is several images of one size and one `Settings`, optimised in one forward/backward but each with the
result it would get alone (see `optimize.optimize_batch`), so the same call serves a lone image and a batch of rows.

Where video and tiles plug in, without a second path: a video frame passes `Inputs.start` (the previous output
warped by the flow) and an extra loss term through `extra_terms` (the temporal loss); tiling changes only how
`Objective.gradient` evaluates the value and gradient, and the optimiser still sees a whole image.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from batchstyle.faces import Face, face_mask, find_faces
from batchstyle.images import output_size, resize_long_side
from batchstyle.model.cache import TargetCache
from batchstyle.model.colour import TONE_SIZE, auto_colour, match_colours
from batchstyle.model.features import VGGFeatures
from batchstyle.model.graph import GraphSpec, graph_spec
from batchstyle.model.memory import lbfgs_history
from batchstyle.model.optimize import Losses, Objective, optimize_batch, upsample
from batchstyle.model.pixels import image_to_tensor, luminance_image, recombine_color
from batchstyle.model.precision import Decision
from batchstyle.model.scales import scale_plan, style_long_side
from batchstyle.model.targets import Targets, TargetStore, TorchBackend, stack_targets, style_targets
from batchstyle.model.tiles import MemoryPolicy, Tiling, choose_tiling, tiled, tiled_targets
from batchstyle.model.weights import Weights
from batchstyle.options import CONTENT_MASK_GAIN, Settings

COLOUR_SPACE = "oklab"  # where color=transfer matches the styles' colours to the content's


def pixels_digest(image: Image.Image) -> str:
    """A target-cache address for an image that has no file: its decoded pixels (files use their bytes' sha256)."""
    digest = hashlib.sha256(f"pixels:{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class Inputs:
    """One image's inputs, decoded to RGB. The ids address the target cache; they default to the pixels' digest
    (a row passes its files' sha256, so every process and run finds the same entries)."""

    content: Image.Image
    styles: Sequence[Image.Image]
    blend: Sequence[float] = ()  # one weight per style; empty: equal
    init: Image.Image | None = None  # the start when settings.init names an image
    style_masks: Sequence[Image.Image] = ()  # one per style (spatial control), any size: white is where it goes
    content_mask: Image.Image | None = None  # white is where the content holds more
    start: torch.Tensor | None = None  # (1, 3, H, W) in [0, 1], any size: overrides settings.init (a video frame)
    content_id: str = ""
    style_ids: Sequence[str] = ()
    # Under color=auto, "style" or "transfer" per style, decided by the caller (a clip decides on its first frame, so
    # the palette never flips mid-clip); empty: decided from this content (`style_colours`).
    colours: Sequence[str] = ()
    # Under faces=auto, the faces to hold the content on, found by the caller; None: looked for in this content.
    faces: Sequence[Face] | None = None

    def __post_init__(self) -> None:
        if not self.styles:
            raise ValueError("a stylization needs at least one style image")
        self.blend = tuple(self.blend) or (1.0,) * len(self.styles)
        if len(self.blend) != len(self.styles):
            raise ValueError(f"{len(self.blend)} blend weights for {len(self.styles)} styles")
        if self.style_masks and len(self.style_masks) != len(self.styles):
            raise ValueError(f"{len(self.style_masks)} style masks for {len(self.styles)} styles: give one each")
        self.content_id = self.content_id or pixels_digest(self.content)
        self.style_ids = tuple(self.style_ids) or tuple(pixels_digest(s) for s in self.styles)


@dataclass
class Hooks:
    """What a caller hears while a stylization runs. Iterations count across scales, so one bar covers it all."""

    on_iteration: Callable[[int, list[Losses]], None] | None = None  # iteration, one Losses per image
    on_scale: Callable[[int, tuple[int, int], int], None] | None = None  # scale index, (w, h), its iterations
    on_snapshot: Callable[[int, int, torch.Tensor], None] | None = None  # scale, iteration, (B, 3, H, W) images
    snapshot_every: int = 0


# (scale, contents) -> loss terms by name, each a module pixels -> (B,) unweighted, weighted by its {name}_weight option
ExtraTerms = Callable[[int, torch.Tensor], Mapping[str, nn.Module]]


@dataclass
class Stylized:
    """One image's result: the kept iterate of the last scale with its colour put back, and how it got there."""

    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    losses: Losses
    history: list[Losses] = field(default_factory=list)  # every iteration's losses, across scales
    scales: list[tuple[int, int, int]] = field(default_factory=list)  # (width, height, iterations done) per scale
    stops: list[str] = field(default_factory=list)  # per scale, why it stopped: "iterations" or "converged"
    kept_iteration: int = 0  # at the last scale: which iterate was kept (0 the start, iterations the last)
    targets: str = ""  # where each scale's targets came from, e.g. "content=hit style=miss | ..."
    tilings: list[Tiling] = field(default_factory=list)  # per scale: the tile size (0: untiled), L-BFGS pairs
    colours: tuple[str, ...] = ()  # per style, how its colours were taken: style | luminance | transfer
    faces: tuple[Face, ...] | None = None  # under faces=auto, the faces the content held on; None: not looked for

    @property
    def iterations(self) -> int:
        return sum(iterations for _, _, iterations in self.scales)


@dataclass
class _Scale:
    """One scale's pixels and targets for one image."""

    content: torch.Tensor  # what is optimised towards: the content, or its luminance under color=luminance
    original: torch.Tensor  # the content in colour, for putting the colour back
    init: torch.Tensor | None
    targets: Targets
    hits: str


class Stylizer:
    """The weights on one device, a trunk per tap set, and where targets come from: everything a stylization
    needs that outlives one image. Cheap to call many times; the trunks and the target store stay warm."""

    def __init__(
        self,
        weights: Weights,
        device: torch.device,
        targets: TargetStore,
        precision: str = "fp32",
        memory: MemoryPolicy | None = None,
    ) -> None:
        self.weights = weights
        self.device = device
        self.targets = targets
        self.precision = precision
        self.precision_decision: Decision | None = None  # how `auto` chose `precision` (`model.build`)
        self.memory = memory or MemoryPolicy()  # the budget every scale is fitted in, tiled where it must be
        self._trunks: dict[tuple[tuple[str, ...], str], VGGFeatures] = {}

    @classmethod
    def local(
        cls,
        weights: Weights,
        device: torch.device,
        precision: str = "fp32",
        cache: TargetCache | None = None,
        memory: MemoryPolicy | None = None,
    ) -> Stylizer:
        """Targets computed with torch on the stylization's own device, kept in `cache` when one is given: the
        set-up of the Python facade and the benchmarks (a run's workers use ONNX Runtime graphs exported first)."""
        store = TargetStore(lambda graph: TorchBackend(weights, graph, device), cache)
        return cls(weights, device, store, precision, memory)

    def tiling(self, items: Sequence[Inputs], settings: Settings, size: int) -> Tiling:
        """How a scale of this long side runs within the memory budget: untiled if it fits, else tiled."""
        w, h = output_size(*items[0].content.size, size)
        regions = len(items[0].style_masks) + (items[0].content_mask is not None or bool(items[0].faces))
        history = lbfgs_history(3 * w * h) if settings.optimizer == "lbfgs" else 0
        s = settings
        chosen = choose_tiling(
            self.memory, self.weights.arch, s.content_layers, s.style_layers, w, h, len(items), history, regions
        )
        if chosen.tile:
            chosen = dataclasses.replace(chosen, devices=1 + len(self.memory.devices))
        return chosen if settings.optimizer == "lbfgs" else dataclasses.replace(chosen, history=0)

    def trunk(self, settings: Settings) -> VGGFeatures:
        taps = tuple(dict.fromkeys((*settings.content_layers, *settings.style_layers)))
        key = (taps, settings.pooling)
        if key not in self._trunks:
            w = self.weights
            # Channels-last is cuDNN's tensor-core layout, and oneDNN's too: ~8% off every iteration on CPU as well.
            self._trunks[key] = VGGFeatures(
                w.arch, w.state_dict, w.preprocess, taps, settings.pooling, channels_last=True
            ).to(self.device)
        return self._trunks[key]

    def graph(self, settings: Settings) -> GraphSpec:
        return graph_spec(self.weights.source, settings)

    def provider(self, settings: Settings) -> str:
        """What computed this settings' targets here: an ONNX Runtime provider, torch:<device>, or 'cache'."""
        return self.targets.provider(self.graph(settings))

    def scale_targets(self, item: Inputs, settings: Settings, size: int) -> tuple[torch.Tensor, Targets]:
        """One image's content pixels and targets at one long side: what the objective at that scale is built of."""
        tile = self.tiling([item], settings, size).tile
        scale = self._scale(item, settings, self.graph(settings), size, tile, _colours(item, settings))
        return scale.content, scale.targets

    def _scale(
        self, item: Inputs, s: Settings, spec: GraphSpec, size: int, tile: int, colours: Sequence[str]
    ) -> _Scale:
        """`tile` > 0: targets computed tile by tile with torch (`tiles.tiled_targets`), within the budget the
        optimisation is; the same values as the target graph's to float rounding, so cached under the same key.
        `colours`: per style, style | luminance | transfer (`style_colours`)."""
        dev = self.device
        content = image_to_tensor(resize_long_side(item.content, size)).to(dev)
        h, w = content.shape[-2:]
        style_size = style_long_side(size, s.style_scale)
        styles = [image_to_tensor(resize_long_side(style, style_size)).to(dev) for style in item.styles]
        init = image_to_tensor(item.init).to(dev) if item.init is not None else None
        original, content_variant = content, "rgb"
        variants = ["rgb"] * len(styles)
        if s.color == "luminance":
            # Luminance-only transfer (Gatys et al. 2016): style the Y channel, keep the content's chroma.
            styles = [luminance_image(style, match=content) for style in styles]
            content = luminance_image(content)
            init = luminance_image(init) if init is not None else None
            content_variant = "luma"
            variants = [f"luma-matched:{item.content_id}:{w}x{h}"] * len(styles)
        for k, colour in enumerate(colours):
            if colour == "transfer":
                # The style in the content's palette; the content itself, and so its targets, stay as they are.
                styles[k] = match_colours(styles[k], content, COLOUR_SPACE)
                variants[k] = f"colours-of:{item.content_id}:{w}x{h}:{COLOUR_SPACE}"
        compute = None
        if tile:
            trunk = self.trunk(s)
            compute = lambda pixels: tiled_targets(trunk, pixels, s.content_layers, s.style_layers, tile)  # noqa: E731
        get = self.targets.get
        content_targets, content_hit = get(spec, "content", item.content_id, content_variant, content, compute)
        found, style_hits = [], []
        for digest, variant, pixels in zip(item.style_ids, variants, styles):
            got, hit = get(spec, "style", digest, variant, pixels, compute)
            found.append(got)
            style_hits.append(hit)
        masks = _masks(item.style_masks, (w, h), dev) if item.style_masks else None
        weights = None
        if item.content_mask is not None:
            weights = 1 + (CONTENT_MASK_GAIN - 1) * _masks([item.content_mask], (w, h), dev)
        elif item.faces:
            weights = 1 + (s.face_weight - 1) * torch.from_numpy(face_mask(item.faces, w, h)).to(dev)[None, None]
        grams, means, shares, masks = style_targets(found, item.blend, s.style_layers, masks)
        targets = Targets(content_targets, grams, means, shares, masks, weights)
        hits = f"content={_hit(content_hit)} style={','.join(_hit(h) for h in style_hits)}"
        return _Scale(content, original, init, targets, hits)

    def stylize(
        self,
        items: Sequence[Inputs],
        settings: Settings,
        hooks: Hooks | None = None,
        plan: Sequence[tuple[int, int]] | None = None,
        extra_terms: ExtraTerms | None = None,
    ) -> list[Stylized]:
        """Stylizes a batch of images of one output size under one `Settings`: one `Stylized` per image, in order.

        `plan` overrides the (long side, iterations) per scale that `settings` implies (a benchmark that runs the
        last scale longer); `extra_terms` adds loss terms by name per scale (a video frame's "temporal"), and every
        `Losses` of the result, its history's included, then carries them beside content, style and tv.
        """
        if not items:
            return []
        hooks = hooks or Hooks()
        items = [_with_faces(item, settings) for item in items]
        spec = self.graph(settings)
        trunk = self.trunk(settings)
        scales_plan = list(plan) if plan is not None else scale_plan(settings)
        image: torch.Tensor | None = None
        histories: list[list[Losses]] = [[] for _ in items]
        hits: list[list[str]] = [[] for _ in items]
        scales: list[list[tuple[int, int, int]]] = [[] for _ in items]
        stops: list[list[str]] = [[] for _ in items]
        done_before = 0
        per_image: list[_Scale] = []
        outcomes = []
        tilings: list[Tiling] = []
        colours = [_colours(item, settings) for item in items]
        for k, (size, iterations) in enumerate(scales_plan):
            tiling = self.tiling(items, settings, size)
            tilings.append(tiling)
            per_image = [
                self._scale(item, settings, spec, size, tiling.tile, chosen) for item, chosen in zip(items, colours)
            ]
            contents = torch.cat([p.content for p in per_image])
            h, w = contents.shape[-2:]
            if hooks.on_scale is not None:
                hooks.on_scale(k, (w, h), iterations)
            if image is not None:
                starts: torch.Tensor | None = upsample(image, contents)
            elif any(item.start is not None for item in items):
                starts = torch.cat(
                    [
                        upsample(item.start.to(self.device), p.content)
                        if item.start is not None
                        else p.init
                        if p.init is not None
                        else p.content
                        for item, p in zip(items, per_image)
                    ]
                )
            else:
                starts = None
            outcomes = optimize_batch(
                trunk,
                contents,
                stack_targets([p.targets for p in per_image]),
                dataclasses.replace(settings, size=size, iterations=iterations),
                [p.init for p in per_image],
                None if hooks.on_iteration is None else _offset(hooks.on_iteration, done_before),
                starts=starts,
                on_snapshot=None
                if hooks.on_snapshot is None
                else _recoloured(hooks.on_snapshot, k, per_image, settings),
                snapshot_every=hooks.snapshot_every,
                precision=self.precision,
                extra=extra_terms(k, contents) if extra_terms is not None else None,
                objective=tiled(tiling.tile, [torch.device(d) for d in self.memory.devices])
                if tiling.tile
                else Objective,
                history_pairs=tiling.history,
                history_store=tiling.store,
                history_folder=self.memory.scratch,
            )
            image = torch.cat([o.image for o in outcomes])
            for b, (outcome, p) in enumerate(zip(outcomes, per_image)):
                histories[b] += outcome.history
                hits[b].append(p.hits)
                scales[b].append((w, h, outcome.iterations))
                stops[b].append(outcome.stop)
            done_before += max(outcome.iterations for outcome in outcomes)
        results = []
        for item, p, outcome, history, found, done, why, chosen in zip(
            items, per_image, outcomes, histories, hits, scales, stops, colours
        ):
            final = recombine_color(outcome.image, p.original) if settings.color == "luminance" else outcome.image
            results.append(
                Stylized(
                    final,
                    outcome.losses,
                    history,
                    done,
                    why,
                    outcome.kept_iteration,
                    " | ".join(found),
                    list(tilings),
                    chosen,
                    None if item.faces is None else tuple(item.faces),
                )
            )
        return results


def style_colours(
    color: str, content: Image.Image, styles: Sequence[Image.Image], masks: Sequence[Image.Image] = ()
) -> tuple[str, ...]:
    """How each style's colours are taken: `color` itself, or under color=auto "transfer" for a style whose tones
    are far from the content's (`colour.auto_colour`; with style masks, the content under that style's mask) and
    "style" for the rest. Measured on the whole images at TONE_SIZE, once per image, so every scale (and every tile)
    of it makes the same choice."""
    if color != "auto":
        return (color,) * len(styles)
    measured = image_to_tensor(resize_long_side(content, TONE_SIZE))
    h, w = measured.shape[-2:]
    where = _masks(masks, (w, h), measured.device).split(1, dim=1) if masks else [None] * len(styles)
    return tuple(
        auto_colour(measured, image_to_tensor(resize_long_side(style, TONE_SIZE)), region)
        for style, region in zip(styles, where)
    )


def _with_faces(item: Inputs, settings: Settings) -> Inputs:
    """`item` with the faces its content holds on: under faces=auto those the caller found, else those found here,
    once for every scale; none looked for under faces=off or where a content_mask is given (the user's mask wins)."""
    if settings.faces != "auto" or item.content_mask is not None:
        return dataclasses.replace(item, faces=None) if item.faces is not None else item
    if item.faces is not None:
        return item
    return dataclasses.replace(item, faces=find_faces(item.content))


def _colours(item: Inputs, settings: Settings) -> tuple[str, ...]:
    return tuple(item.colours) or style_colours(settings.color, item.content, item.styles, item.style_masks)


def _offset(callback: Callable[[int, list[Losses]], None], before: int) -> Callable[[int, list[Losses]], None]:
    return lambda iteration, losses: callback(before + iteration, losses)


def _recoloured(
    callback: Callable[[int, int, torch.Tensor], None], scale: int, per_image: list[_Scale], settings: Settings
) -> Callable[[int, torch.Tensor], None]:
    """Snapshots as the output would look: with the content's colour back under color=luminance."""

    def snapshot(iteration: int, pixels: torch.Tensor) -> None:
        if settings.color == "luminance":
            pixels = torch.cat([recombine_color(x, p.original) for x, p in zip(pixels.split(1), per_image)])
        callback(scale, iteration, pixels)

    return snapshot


def _masks(images: Sequence[Image.Image], size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Greyscale masks at the output's (w, h) as (1, K, H, W) in [0, 1]; resized afresh at every scale."""
    planes = [
        image_to_tensor(image.convert("L").convert("RGB").resize(size, Image.Resampling.BOX))[:, :1] for image in images
    ]
    return torch.cat(planes, dim=1).to(device)


def _hit(flag: bool) -> str:
    return "hit" if flag else "miss"
