"""The Python facade: one image with `StyleTransfer.stylize`, a whole manifest with `run_manifest`.

Both are thin: `stylize` is the model layer's `Stylizer.stylize` (the call a worker makes for a row, so a one-row
`batchstyle run` with the same options gives the same pixels), and `run_manifest` is the engine `batchstyle run`
drives. Options are the manifest's own names and values (`size=512`, `style_weight=1e3`, `preserve_color=True`),
checked by the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from batchstyle.images import load_image, to_rgb
from batchstyle.manifest import read_manifest
from batchstyle.model.build import build_stylizer
from batchstyle.model.optimize import Losses
from batchstyle.model.pixels import tensor_to_deep, tensor_to_image
from batchstyle.model.scales import scale_plan
from batchstyle.model.stylize import Hooks, Inputs
from batchstyle.model.weights import resolve, sha256_file
from batchstyle.options import OPTIONS, OptionError, make_settings, option_values, settings_problem
from batchstyle.run.config import RUN_SETTINGS, RunConfig
from batchstyle.run.devices import pick_device
from batchstyle.run.engine import RunSummary, run
from batchstyle.run.progress import Events, Silent, Terminal

ImageInput = str | Path | Image.Image
Progress = Callable[[int, int, Losses], None]  # iteration (across scales), total iterations, that iterate's losses


def _decoded(image: ImageInput, role: str) -> tuple[Image.Image, str]:
    """RGB pixels and their target-cache address: a file's sha256 (what a manifest run uses), else the pixels'."""
    if isinstance(image, Image.Image):
        rgb = to_rgb(image, f"the {role} image")
        return rgb, ""
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        return load_image(path), sha256_file(path)
    raise TypeError(f"{role}: give a path or a PIL image, not {type(image).__name__}")


def _name(image: ImageInput, label: str) -> str:
    return f"<{label}>" if isinstance(image, Image.Image) else str(Path(image).expanduser().resolve())


class StyleTransfer:
    """Weights on a device, ready to stylize images one call at a time.

    `model`, `device`, `precision` and `targets` mean what `batchstyle run --model/--devices/--precision/--targets`
    mean (`device` is one device: auto, cpu, cuda, cuda:N). Targets come from where a run's come from, ONNX Runtime
    on a graph exported on first use, and are kept in the content-addressed cache runs use (`cache_dir`, default
    $BATCHSTYLE_CACHE). That is what makes `stylize` give a one-row run's pixels: L-BFGS amplifies even the last-bit
    differences between ONNX Runtime's and torch's targets (measured: up to 95 of 255 levels apart after 60
    iterations at 128 px), so the same targets are needed, not merely equivalent ones; a run's workers build their
    stylizers with the same factory (`model.build.build_stylizer`), so nothing else can differ. `max_memory` (bytes, or
    "3GiB") and `tile` mean what `batchstyle run --max-memory/--tile` mean: an image that would not fit is
    optimised in tiles, exactly. `tile_devices` (e.g. ["cuda:1", "cuda:2"]) are more devices its tiles are dealt
    to, as `batchstyle run --spread-tiles` deals them to every device after the first.
    """

    def __init__(
        self,
        model: str = "auto",
        device: str = "auto",
        precision: str = "auto",
        cache_dir: str | Path | None = None,
        targets: str = "ort",
        max_memory: str | int | None = None,
        tile: int | None = None,
        tile_devices: Sequence[str] = (),
    ) -> None:
        # Checked, and read from their written forms ("3GiB"), as `batchstyle run`'s flags and `run_manifest`'s are.
        config = RunConfig.from_values(
            {
                "model": model,
                "precision": precision,
                "cache_dir": cache_dir,
                "targets": targets,
                "max_memory": max_memory,
                "tile": tile,
            }
        )
        source, self.model_reason = resolve(config.model, config.cache)
        dev = pick_device(device)
        self.messages: list[str] = []  # what a run would print: the targets' provider, fallbacks
        self.stylizer = build_stylizer(
            source.load(config.cache),
            dev,
            config.cache,
            config.precision,
            self.messages.append,
            targets=config.targets,
            export=True,
            max_memory=config.max_memory,
            tile=config.tile,
            tile_devices=tile_devices,
            shared_cache=config.cache_url,
        )

    @property
    def model(self) -> str:
        return self.stylizer.weights.source.name

    @property
    def device(self) -> torch.device:
        return self.stylizer.device

    def stylize(
        self,
        content: ImageInput,
        styles: ImageInput | Sequence[ImageInput],
        *,
        style_blend_weights: Sequence[float] = (),
        progress: Progress | None = None,
        **options: Any,
    ) -> Image.Image | np.ndarray:
        """`content` in the style of `styles` (one, or several mixed by `style_blend_weights`), as an RGB image.

        `options` are the manifest's options by name (`size`, `iterations`, `min_size`, `style_weight`, ...), with
        the same defaults; an unknown name or a bad value raises `OptionError` naming it. `init` may name an image
        file. `progress(iteration, total, losses)` is called after every iteration. With `bit_depth=16` the result
        is an (H, W, 3) uint16 array instead (Pillow has no 16-bit RGB image), for `images.save_image_atomic`,
        OpenCV or tifffile.
        """
        # Masks may be PIL images too: they go to the model layer as pixels, and the settings keep a name for each.
        style_masks = options.pop("style_masks", None) or ()
        style_masks = [style_masks] if isinstance(style_masks, (str, Path, Image.Image)) else list(style_masks)
        content_mask = options.pop("content_mask", None)
        options["style_masks"] = tuple(_name(mask, f"style mask {k + 1}") for k, mask in enumerate(style_masks))
        options["content_mask"] = _name(content_mask, "content mask") if content_mask is not None else None
        settings = make_settings(option_values(options))
        problem = settings_problem(settings)
        if problem:
            raise OptionError(problem, "style_layer_weights")
        style_list = [styles] if isinstance(styles, (str, Path, Image.Image)) else list(styles)
        pixels, content_id = _decoded(content, "content")
        decoded = [_decoded(style, "style") for style in style_list]
        init = None
        if settings.init not in ("content", "noise"):
            init = load_image(Path(settings.init).expanduser())
        if style_masks and len(style_masks) != len(style_list):
            raise OptionError(
                f"{len(style_masks)} style masks for {len(style_list)} styles: give one each", "style_masks"
            )
        item = Inputs(
            content=pixels,
            style_masks=[_decoded(mask, "style mask")[0] for mask in style_masks],
            content_mask=_decoded(content_mask, "content mask")[0] if content_mask is not None else None,
            styles=[image for image, _ in decoded],
            blend=tuple(style_blend_weights),
            init=init,
            content_id=content_id,
            style_ids=tuple(digest for _, digest in decoded) if all(d for _, d in decoded) else (),
        )
        hooks = Hooks()
        if progress is not None:
            total = sum(iterations for _, iterations in scale_plan(settings))
            hooks.on_iteration = lambda iteration, losses: progress(iteration, total, losses[0])
        (result,) = self.stylizer.stylize([item], settings, hooks)
        return tensor_to_deep(result.image) if settings.bit_depth == 16 else tensor_to_image(result.image)


def run_manifest(
    path: str | Path,
    out: str | Path | None = None,
    *,
    fmt: str = "png",
    quiet: bool = True,
    events: Events | None = None,
    **settings: Any,
) -> RunSummary:
    """Runs a manifest as `batchstyle run` does and returns its summary (`.counts()`, `.failed`, `.exit_code`).

    `settings` mixes run-level settings (`model`, `devices`, `batch_size`, `force`, `retries`, ...: the fields of
    `RunConfig`, in the CLI's forms) and option defaults for every row (`size`, `style_weight`, ...), which a
    row's own cells override. Progress goes to the terminal only when `quiet=False`, or to your `events` sink.
    An unusable manifest or setting raises `UnusableInput` (a failing row does not: it is in the summary).
    """
    unknown = sorted(name for name in settings if name not in OPTIONS and name not in RUN_SETTINGS)
    if unknown:
        raise TypeError(
            f"run_manifest got unknown setting {', '.join(unknown)}: use option names ({', '.join(OPTIONS)}) "
            f"or run settings ({', '.join(RUN_SETTINGS)})"
        )
    options = {name: value for name, value in settings.items() if name in OPTIONS}
    config = RunConfig.from_values({name: value for name, value in settings.items() if name in RUN_SETTINGS})
    manifest = read_manifest(Path(path), option_values(options), Path(out) if out is not None else None, fmt)
    sink = events if events is not None else (Silent() if quiet else Terminal())
    return run(manifest, config, sink)
