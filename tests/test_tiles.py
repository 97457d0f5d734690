"""Tiled evaluation: the same loss values and gradients as the whole image's, the same optimised image, and the
automatic choice of when to tile."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import cli, compute_targets, optimize_one, smooth_image, write_manifest
from PIL import Image

from batchstyle.images import load_image
from batchstyle.model.export import target_graph
from batchstyle.model.features import VGGFeatures, copy_module
from batchstyle.model.graph import graph_spec
from batchstyle.model.layout import halo, stride
from batchstyle.model.losses import gram_matrix
from batchstyle.model.memory import (
    FIXED_BYTES,
    IMAGE_VECTORS,
    available_memory,
    lbfgs_history,
    network_bytes,
    scale_bytes,
)
from batchstyle.model.optimize import Objective
from batchstyle.model.stylize import Inputs, Stylizer
from batchstyle.model.targets import Targets, stack_targets, style_targets
from batchstyle.model.tiles import (
    MIN_TILE,
    PREFERRED_TILE,
    MemoryPolicy,
    TiledObjective,
    choose_tiling,
    tile_grid,
    tiled,
    tiled_targets,
)
from batchstyle.model.weights import SOURCES
from batchstyle.options import default_values, make_settings
from batchstyle.run.config import parse_size
from batchstyle.run.ledger import read_records

HEIGHT, WIDTH = 117, 150  # neither a multiple of the total stride 16: the last pooling windows are partial


def masked_targets(trunk: VGGFeatures, content: torch.Tensor, settings) -> Targets:  # noqa: ANN001
    """Two styles, each with its region: the left and the right of the image, overlapping in a soft band."""
    styles = [smooth_image(64, 80, 11), smooth_image(72, 64, 12)]
    with torch.no_grad():
        found = []
        for style in styles:
            feats = trunk(style)
            found.append(
                {f"gram_{n}": gram_matrix(feats[n]) for n in settings.style_layers}
                | {f"mean_{n}": feats[n].float().mean(dim=(2, 3)) for n in settings.style_layers}
            )
        content_feats = trunk(content)
    ramp = torch.linspace(0, 1, content.shape[-1]).clamp(0.3, 0.7).sub(0.3).div(0.4)
    left = (1 - ramp).expand(1, 1, content.shape[-2], -1)
    masks = torch.cat([left, 1 - left], dim=1)
    grams, means, shares, masks = style_targets(found, (1.0, 1.0), settings.style_layers, masks)
    weights = 1 + 9 * (torch.arange(content.shape[-2]) < content.shape[-2] // 3).float().view(1, 1, -1, 1)
    content_t = {n: content_feats[n].float() for n in settings.content_layers}
    return Targets(content_t, grams, means, shares, masks, weights.expand(1, 1, -1, content.shape[-1]).contiguous())


def gradients(objective: Objective, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = pixels.clone().requires_grad_(True)
    total, terms = objective.gradient(pixels)
    return torch.stack([total, *terms.values()]), pixels.grad.clone()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "style_loss, masked, dtype, spread",
    [
        ("gram", False, torch.float32, ()),
        ("moments", False, torch.float32, ()),
        ("gram", True, torch.float32, ()),
        # Tiles dealt to two more copies of the objective (as to two more GPUs; here the same CPU), in threads.
        ("gram", True, torch.float32, ("cpu", "cpu")),
        ("moments", False, torch.float32, ("cpu", "cpu")),
        # Guided moments in float64: there the untiled gradient itself is not defined to 1e-4 by fp32 features. Its
        # 142-position regions at relu4_1 leave R cov R (the Wasserstein cross term) with eigenvalues of 4e-8 that
        # fp32 rounding of the Gram (~5e-5 after R) swamps, so fp32 and float64 features give untiled gradients
        # 50x their size apart (measured); in float64 tiled and untiled agree to 2e-6.
        ("moments", True, torch.float64, ()),
    ],
)
def test_tiled_values_and_gradient_equal_the_whole_images(
    trunk: VGGFeatures, style_loss: str, masked: bool, dtype: torch.dtype, spread: tuple[str, ...]
) -> None:
    settings = make_settings({**default_values(), "style_loss": style_loss, "tv_weight": 10.0})
    content = smooth_image(HEIGHT, WIDTH, 1)
    if masked:
        targets = masked_targets(trunk, content, settings)
    else:
        style = smooth_image(96, 96, 2)
        targets = compute_targets(trunk, content, [style], [1.0], settings.content_layers, settings.style_layers)
    trunk = copy_module(trunk).to(dtype)
    pixels = smooth_image(HEIGHT, WIDTH, 3).to(dtype)  # not the content: every loss and its gradient are far from 0
    whole_values, whole_grad = gradients(Objective(trunk, targets, settings), pixels)
    tiled_objective = TiledObjective(trunk, targets, settings, tile=48, devices=spread)
    assert len(tile_grid(HEIGHT, WIDTH, 48, tiled_objective.margin, tiled_objective.step)) == 12  # 3 x 4 tiles
    tiled_values, tiled_grad = gradients(tiled_objective, pixels)
    assert relative(tiled_grad, whole_grad) <= 1e-4
    assert torch.allclose(tiled_values, whole_values, rtol=1e-5, atol=0)
    assert whole_values.min() > 0  # every loss counted, content and TV included
    with torch.no_grad():  # the value alone, as the kept iterate is chosen by
        total, terms = tiled_objective(pixels)
        assert torch.allclose(torch.stack([total, *terms.values()]), whole_values, rtol=1e-5, atol=0)
    assert len(tiled_objective._shares()) == 1 + len(spread)


def test_a_batch_tiled_keeps_its_images_apart(trunk: VGGFeatures) -> None:
    settings = make_settings(default_values())
    content = smooth_image(HEIGHT, WIDTH, 1, batch=2)
    style = smooth_image(96, 96, 2)
    one = compute_targets(trunk, content[:1], [style], [1.0], settings.content_layers, settings.style_layers)
    two = compute_targets(trunk, content[1:], [style], [1.0], settings.content_layers, settings.style_layers)
    targets = stack_targets([one, two])
    pixels = smooth_image(HEIGHT, WIDTH, 3, batch=2)
    whole_values, whole_grad = gradients(Objective(trunk, targets, settings), pixels)
    tiled_values, tiled_grad = gradients(TiledObjective(trunk, targets, settings, tile=64), pixels)
    for b in range(2):
        assert relative(tiled_grad[b], whole_grad[b]) <= 1e-4
    assert torch.allclose(tiled_values, whole_values, rtol=1e-5, atol=0)


class _Grey(torch.nn.Module):
    """An extra term the pixels alone decide, standing in for a video frame's temporal loss."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - 0.5).square().flatten(1).mean(dim=1)


def test_a_row_steered_by_an_extra_term_alone_tiles_like_the_whole_image(trunk: VGGFeatures) -> None:
    """Content, style and tv all weighing 0 leave no tiled term depending on a tile: the tiles add a zero gradient
    (they raised on a graphless backward) and the extra term's is the whole gradient, as untiled."""
    settings = make_settings(
        {**default_values(), "content_weight": 0.0, "style_weight": 0.0, "tv_weight": 0.0, "temporal_weight": 1.0}
    )
    content = smooth_image(HEIGHT, WIDTH, 1)
    targets = compute_targets(
        trunk, content, [smooth_image(96, 96, 2)], [1.0], settings.content_layers, settings.style_layers
    )
    pixels = smooth_image(HEIGHT, WIDTH, 3)
    extra = {"temporal": _Grey()}
    whole_values, whole_grad = gradients(Objective(trunk, targets, settings, extra=extra), pixels)
    tiled_values, tiled_grad = gradients(TiledObjective(trunk, targets, settings, extra=extra, tile=48), pixels)
    assert whole_grad.abs().max() > 0
    assert torch.equal(tiled_grad, whole_grad)
    assert torch.allclose(tiled_values, whole_values, rtol=1e-5, atol=0)


def test_the_halo_is_needed_and_tiles_align_to_the_stride(trunk: VGGFeatures) -> None:
    """Without its halo a tile gives another gradient: what gives the exactness test its meaning."""
    assert (halo("vgg16", "relu5_1"), stride("relu5_1")) == (80, 16)
    settings = make_settings(default_values())
    content = smooth_image(HEIGHT, WIDTH, 1)
    targets = compute_targets(
        trunk, content, [smooth_image(96, 96, 2)], [1.0], settings.content_layers, settings.style_layers
    )
    pixels = smooth_image(HEIGHT, WIDTH, 3)
    _, whole_grad = gradients(Objective(trunk, targets, settings), pixels)
    short = TiledObjective(trunk, targets, settings, tile=48)
    short.margin = 16
    _, short_grad = gradients(short, pixels)
    assert relative(short_grad, whole_grad) > 1e-2
    assert [t.own[:2] for t in tile_grid(117, 20, 40, 80, 16)] == [(0, 32), (32, 64), (64, 96), (96, 117)]


def test_a_few_tiled_iterations_give_the_untiled_image(trunk: VGGFeatures) -> None:
    settings = make_settings({**default_values(), "iterations": 5, "size": WIDTH})
    content = smooth_image(HEIGHT, WIDTH, 1)
    targets = compute_targets(
        trunk, content, [smooth_image(96, 96, 2)], [1.0], settings.content_layers, settings.style_layers
    )
    whole = optimize_one(trunk, content, targets, settings)
    tiled_run = optimize_one(trunk, content, targets, settings, objective=tiled(64))
    assert (tiled_run.image - whole.image).abs().max() <= 1 / 255
    assert tiled_run.kept_iteration == whole.kept_iteration
    assert tiled_run.losses.total == pytest.approx(whole.losses.total, rel=1e-4)
    adam = dataclasses.replace(settings, optimizer="adam")
    assert (
        optimize_one(trunk, content, targets, adam, objective=tiled(64)).image
        - optimize_one(trunk, content, targets, adam).image
    ).abs().max() <= 1 / 255


# --- the automatic choice ---------------------------------------------------------------------------------------

LAYERS = (("relu4_2",), ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"))


def test_a_row_that_fits_is_left_untiled_and_one_that_does_not_is_tiled_as_large_as_fits() -> None:
    gib = 1 << 30
    small = choose_tiling(MemoryPolicy(3 * gib), "vgg16", *LAYERS, 512, 384, history=100)
    assert small.tile == 0 and small.history == 100
    big = choose_tiling(MemoryPolicy(3 * gib), "vgg16", *LAYERS, 3072, 2304, history=lbfgs_history(3 * 3072 * 2304))
    assert big.tile > 0 and big.tile % 16 == 0 and big.predicted <= 3 * gib
    assert scale_bytes("vgg16", *LAYERS, 3072, 2304, history=big.history) > 3 * gib  # untiled would not fit
    # as large as fit: one stride more would not
    assert scale_bytes("vgg16", *LAYERS, 3072, 2304, history=big.history, tile=big.tile + 16) > 3 * gib
    assert choose_tiling(MemoryPolicy(None), "vgg16", *LAYERS, 8192, 6144, history=5).tile == 0  # no budget known


def test_forced_tiles_and_forced_untiled_win_over_the_budget() -> None:
    gib = 1 << 30
    assert choose_tiling(MemoryPolicy(gib // 100, tile=0), "vgg16", *LAYERS, 2048, 1536, history=14).tile == 0
    forced = choose_tiling(MemoryPolicy(64 * gib, tile=256), "vgg16", *LAYERS, 512, 384, history=100)
    assert (forced.tile, forced.history) == (256, 100)


def test_a_tight_budget_shortens_the_lbfgs_history_before_it_shrinks_tiles_below_the_smallest() -> None:
    budget = 8 << 30
    chosen = choose_tiling(MemoryPolicy(budget), "vgg16", *LAYERS, 4096, 3072, history=100)
    assert 5 < chosen.history < 100 and chosen.tile > MIN_TILE and chosen.predicted <= budget
    assert chosen.store == "fp32"
    # Where nothing fits: 5 pairs in a file, and tiles whose network takes a quarter of the budget; predicted over it.
    least = choose_tiling(MemoryPolicy(1 << 30), "vgg16", *LAYERS, 4096, 3072, history=100)
    assert (least.history, least.store) == (5, "file") and least.predicted > 1 << 30
    assert network_bytes("vgg16", "relu5_1", 4096, 3072, least.tile) <= 1 << 28
    assert network_bytes("vgg16", "relu5_1", 4096, 3072, least.tile + 16) > 1 << 28


def test_a_history_that_does_not_fit_in_fp32_goes_to_bf16_then_to_a_file() -> None:
    w, h = 8192, 6144
    beside = scale_bytes("vgg16", *LAYERS, w, h, tile=PREFERRED_TILE)  # a preferred tile and the image's vectors
    pair_fp32 = 2 * 4 * 3 * w * h
    roomy = choose_tiling(MemoryPolicy(beside + 7 * pair_fp32), "vgg16", *LAYERS, w, h, history=100)
    assert (roomy.history, roomy.store) == (7, "fp32")
    half = choose_tiling(MemoryPolicy(beside + 3 * pair_fp32), "vgg16", *LAYERS, w, h, history=100)
    assert (half.history, half.store) == (6, "bf16")  # 6 bf16 pairs in the room of 3 fp32 ones
    assert half.predicted <= beside + 3 * pair_fp32
    disk = choose_tiling(MemoryPolicy(beside + 2 * pair_fp32), "vgg16", *LAYERS, w, h, history=100)
    assert (disk.history, disk.store) == (5, "file")
    assert disk.predicted == scale_bytes("vgg16", *LAYERS, w, h, tile=disk.tile)  # the file costs no memory
    assert disk.tile >= PREFERRED_TILE  # the room the history would have taken goes to the tiles


def test_the_memory_model_is_the_measured_one_within_a_quarter() -> None:
    """The figures the model was fitted to (docs/large-outputs.md#the-memory-model): one untiled gradient's memory, in a
    fresh process, at 512x384 and 1024x768; the network is all of it there."""
    for (w, h), measured_mib in (((512, 384), 342), ((1024, 768), 1584)):
        network = scale_bytes("vgg16", *LAYERS, w, h)
        vectors = 4 * ((IMAGE_VECTORS + 6) * 3 * w * h + 512 * (h // 8) * (w // 8)) + FIXED_BYTES
        assert 0.75 <= measured_mib * 2**20 / (network - vectors) <= 1.25


def test_tiled_targets_equal_the_target_graphs(trunk: VGGFeatures) -> None:
    settings = make_settings(default_values())
    pixels = smooth_image(HEIGHT, WIDTH, 4)
    whole = target_graph(SOURCES["random"].load(), graph_spec(SOURCES["random"], settings))(pixels)
    names = graph_spec(SOURCES["random"], settings).output_names
    tiles = tiled_targets(trunk, pixels, settings.content_layers, settings.style_layers, 48)
    for name, value in zip(names, whole):
        assert relative(tiles[name], value) <= 1e-5, name


@pytest.mark.parametrize("text, size", [("3GiB", 3 << 30), ("800MB", 800_000_000), ("1.5G", 1_500_000_000)])
def test_max_memory_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_run_records_its_tiling_in_the_ledger(tmp_path, images) -> None:  # noqa: ANN001
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "in/photo.png,in/painting.png")
    out = tmp_path / "out"
    common = ("--out", out, "--model", "random", "--device", "cpu", "--size", 48, "--min-size", 0)
    assert cli("run", manifest, *common, "--iterations", 2, "-q", "--tile", 32).exit_code == 0
    (record,) = read_records(out)[0]
    assert json.loads(record.params)["tiling"] == [[32, 100, "fp32", 1]]
    assert cli("run", manifest, *common, "--iterations", 2, "-q", "--max-memory", "2GiB", "--force").exit_code == 0
    (record,) = read_records(out)[0]
    assert json.loads(record.params)["tiling"] == [[0, 100, "fp32", 1]]
    assert json.loads(record.params)["memory_budget"] == 2 << 30
    assert "--max-memory '1x': give a size" in cli("run", manifest, *common, "--max-memory", "1x").output


def test_spread_tiles_runs_one_worker_that_deals_tiles_to_every_device(tmp_path, images) -> None:  # noqa: ANN001
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "in/photo.png,in/painting.png")
    common = ("--model", "random", "--size", 48, "--min-size", 0, "--iterations", 2, "--tile", 32, "-q")
    alone = cli("run", manifest, *common, "--out", tmp_path / "alone", "--devices", "cpu")
    spread = cli("run", manifest, *common, "--out", tmp_path / "spread", "--devices", "cpu,cpu", "--spread-tiles")
    assert alone.exit_code == 0 and spread.exit_code == 0, spread.output
    (one,), (two,) = read_records(tmp_path / "alone")[0], read_records(tmp_path / "spread")[0]
    assert two.device == "cpu"  # one worker, not one per listed device
    assert json.loads(two.params)["tiling"] == [[32, 100, "fp32", 2]]  # its tiles dealt to both
    pictures = [
        np.asarray(Image.open(tmp_path / out / r.output), dtype=np.int16)
        for out, r in (("alone", one), ("spread", two))
    ]
    assert np.abs(pictures[0] - pictures[1]).max() <= 1
    refused = cli("run", manifest, *common, "--out", tmp_path / "x", "--spread-tiles", "--workers-per-device", 2)
    assert refused.exit_code != 0 and "--spread-tiles runs one worker" in refused.output


def test_a_spread_tiled_objective_copies_a_bf16_trunk_in_its_precision(trunk: VGGFeatures) -> None:
    settings = make_settings(default_values())
    content, style = smooth_image(HEIGHT, WIDTH, 1), smooth_image(96, 96, 2)
    targets = compute_targets(trunk, content, [style], [1.0], settings.content_layers, settings.style_layers)
    pixels = smooth_image(HEIGHT, WIDTH, 3)
    alone = TiledObjective(trunk, targets, settings, torch.bfloat16, tile=48)
    spread = TiledObjective(trunk, targets, settings, torch.bfloat16, tile=48, devices=("cpu",))
    (_, grad_alone), (_, grad_spread) = gradients(alone, pixels), gradients(spread, pixels)
    assert spread._shares()[1].model.conv_dtype == torch.bfloat16
    # The same tiles in the same precision, summed in another order; and each share's last tile comes from a forward
    # with its graph kept (oneDNN's training kernels), where alone that tile ran without: bf16 rounding apart.
    assert relative(grad_spread, grad_alone) <= 4e-3


def test_a_tiled_stylization_is_the_untiled_one_across_scales_with_colour_kept(images) -> None:  # noqa: ANN001
    """Through `Stylizer`: targets tiled too, two scales, luminance-only transfer."""
    weights = SOURCES["random"].load()
    settings = make_settings(
        {**default_values(), "size": 96, "min_size": 64, "iterations": 3, "scale_iterations": 3, "color": "luminance"}
    )
    item = Inputs(load_image(images["photo2"]), [load_image(images["painting"])])
    results = {}
    for tile in (0, 32):
        stylizer = Stylizer.local(weights, torch.device("cpu"), memory=MemoryPolicy(None, tile))
        (results[tile],) = stylizer.stylize([item], settings)
    assert len(results[32].scales) == 3
    assert {t.tile for t in results[32].tilings} == {32} and {t.tile for t in results[0].tilings} == {0}
    # Nine L-BFGS steps amplify the tiles' rounding, most where a projected step puts pixels on a bound: measured,
    # 1.7 levels at most, 0.3% of values beyond one level, 0.17 levels on average.
    diff = (results[32].image - results[0].image).abs()
    assert diff.max() <= 3 / 255 and diff.mean() <= 0.5 / 255


def test_workers_on_one_machine_share_its_default_budget() -> None:
    from batchstyle.run.config import RunConfig
    from batchstyle.run.resources import memory_budgets

    shared = memory_budgets(RunConfig(), ["cpu", "cpu"])["cpu"]
    assert shared == pytest.approx(0.6 * available_memory() / 2, rel=0.05)
    assert memory_budgets(RunConfig(max_memory=3 << 30), ["cpu", "cpu"]) == {"cpu": 3 << 30}
    assert memory_budgets(RunConfig(backend="ray"), ["ray"]) == {}  # an actor asks its own node
