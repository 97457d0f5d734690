"""The artist's controls in the model layer: guided Grams, the moments loss, colour transfer, EMA, the stop rule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import cli, make_painting, make_photo, write_manifest
from PIL import Image

from batchstyle.images import load_image
from batchstyle.model.colour import TONE_GAP, colour_moments, match_colours, oklab_to_srgb, srgb_to_oklab, tone_gap
from batchstyle.model.losses import StyleLoss, gram_matrix, masked_moments, sqrtm_psd, wasserstein2
from batchstyle.model.optimize import EMA_DECAY, converged
from batchstyle.model.pixels import image_to_tensor
from batchstyle.model.stylize import Hooks, Inputs, Stylizer, style_colours
from batchstyle.model.weights import SOURCES
from batchstyle.options import default_values, make_settings
from batchstyle.panel import SAMPLES


def _features(seed: int, shape: tuple[int, ...] = (2, 6, 5, 7)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- guided Gram matrices ---------------------------------------------------------------------------------------


def test_the_guided_gram_under_an_all_white_mask_is_the_plain_gram() -> None:
    feats = _features(0)
    gram, mean = masked_moments(feats, torch.ones(2, 1, 5, 7, dtype=torch.float64))
    torch.testing.assert_close(gram[:, 0], gram_matrix(feats))
    torch.testing.assert_close(mean[:, 0], feats.mean(dim=(2, 3)))
    target = gram_matrix(_features(1))
    plain = StyleLoss(target)(feats)
    guided = StyleLoss(target, masks=torch.ones(2, 1, 20, 28, dtype=torch.float64))(feats)
    torch.testing.assert_close(guided, plain)


def test_a_guided_gram_sees_only_its_region() -> None:
    feats = _features(2)
    left = torch.zeros(2, 1, 5, 7, dtype=torch.float64)
    left[..., :3] = 1
    gram, _ = masked_moments(feats, left)
    torch.testing.assert_close(gram[:, 0], gram_matrix(feats[..., :3]))


def test_two_masked_styles_each_take_their_half(hed_weights, tmp_path: Path) -> None:
    """A real small optimisation: the left half ends closer to the left style's Gram than to the right's, and the
    right half the other way round."""
    content = load_image(make_photo(tmp_path / "c.png", 64, 48))
    stripes = load_image(make_painting(tmp_path / "s1.png", 48, 48, seed=1))
    flat = Image.new("RGB", (48, 48), (40, 160, 60)).convert("RGB")
    left = Image.new("L", (64, 48), 0)
    left.paste(255, (0, 0, 32, 48))
    right = Image.eval(left, lambda v: 255 - v)
    settings = make_settings(
        {**default_values(), "size": 64, "min_size": 0, "iterations": 30, "style_weight": 1e4, "content_weight": 0.1}
        | {"style_layers": ("relu1_1", "relu2_1"), "content_layers": ("relu2_2",)}
    )
    stylizer = Stylizer.local(hed_weights, torch.device("cpu"))
    item = Inputs(content, [stripes, flat], style_masks=[left, right])
    (result,) = stylizer.stylize([item], settings)
    trunk = stylizer.trunk(settings)
    with torch.no_grad():
        out = trunk(result.image)["relu1_1"]
        targets = [gram_matrix(trunk(image_to_tensor(s.resize((48, 48))))["relu1_1"]) for s in (stripes, flat)]
    half = out.shape[-1] // 2
    for region, own, other in ((out[..., :half], 0, 1), (out[..., half:], 1, 0)):
        gram = gram_matrix(region)
        assert (gram - targets[own]).norm() < (gram - targets[other]).norm()


# --- the moments (W2) loss --------------------------------------------------------------------------------------


def test_the_moments_loss_is_zero_exactly_when_means_and_covariances_match() -> None:
    feats = _features(3, (1, 4, 6, 6)).float()
    gram, mean = masked_moments(feats, torch.ones(1, 1, 6, 6))
    same = StyleLoss(gram, mean, "moments")(feats)
    assert same.abs().item() < 1e-5  # float32 rounding of a trace of four terms near 1
    other = StyleLoss(gram, mean, "moments")(feats * 1.3 + 0.1)
    assert other.item() > 1e-3
    # The same covariance with another mean: only the mean term is left.
    shifted = StyleLoss(gram, mean, "moments")
    assert shifted(feats + 0.5).item() > 0


def test_wasserstein2_of_gaussians_matches_the_closed_form_for_diagonal_covariances() -> None:
    mean, target_mean = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    cov, target_cov = torch.diag(torch.tensor([4.0, 1.0])).double(), torch.diag(torch.tensor([1.0, 9.0])).double()
    expected = 1.0 + (2 - 1) ** 2 + (1 - 3) ** 2  # |m - m_t|^2 + sum (sqrt(a) - sqrt(b))^2
    got = wasserstein2(mean, cov, target_mean, sqrtm_psd(target_cov))
    assert math.isclose(got.item(), expected, rel_tol=1e-9)


def test_the_moments_loss_gradient_is_checked() -> None:
    target = _features(4, (1, 3, 4, 4))
    gram, mean = masked_moments(target, torch.ones(1, 1, 4, 4, dtype=torch.float64))
    loss = StyleLoss(gram, mean, "moments").double()
    feats = _features(5, (1, 3, 4, 4)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: loss(f), (feats,))


def test_the_matrix_square_root_and_its_gradient() -> None:
    a = _features(6, (1, 4, 4))[0]
    spd = a @ a.mT + 0.1 * torch.eye(4, dtype=torch.float64)
    root = sqrtm_psd(spd)
    torch.testing.assert_close(root @ root, spd)
    # eigh reads one triangle, so the check goes through a symmetric parametrisation, as the losses use it.
    assert torch.autograd.gradcheck(lambda x: sqrtm_psd((x + x.mT) / 2), (spd.clone().requires_grad_(True),))


# --- colour transfer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["oklab", "rgb"])
def test_colour_transfer_matches_mean_and_covariance(space: str, tmp_path: Path) -> None:
    style = image_to_tensor(load_image(make_painting(tmp_path / "s.png", 40, 40)))
    content = image_to_tensor(load_image(make_photo(tmp_path / "c.png", 48, 36)))
    moved = match_colours(style, content, space)
    to = srgb_to_oklab if space == "oklab" else (lambda x: x)
    got_mean, got_cov = colour_moments(to(moved.double()))
    want_mean, want_cov = colour_moments(to(content.double()))
    # Within what clamping to the gamut costs (the painting's saturated strokes leave it in RGB).
    torch.testing.assert_close(got_mean, want_mean, atol=0.02, rtol=0)
    torch.testing.assert_close(got_cov, want_cov, atol=0.025, rtol=0)


def test_oklab_round_trips() -> None:
    rgb = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(oklab_to_srgb(srgb_to_oklab(rgb)), rgb)


def test_color_auto_recolours_only_a_style_whose_tones_are_far_from_the_contents() -> None:
    """The panel's finding, on its own images: the near-black deep field is far from a daylight portrait, the
    strokes are not."""
    face, strokes, deep_field = (load_image(SAMPLES / name) for name in ("astronaut.jpg", "strokes.png", "hubble.jpg"))
    as_tensor = [image_to_tensor(image.resize((64, 64))) for image in (face, strokes, deep_field)]
    assert tone_gap(as_tensor[0], as_tensor[0]) == 0
    assert tone_gap(as_tensor[0], as_tensor[2]) == pytest.approx(tone_gap(as_tensor[2], as_tensor[0]))
    assert tone_gap(as_tensor[0], as_tensor[1]) < TONE_GAP < tone_gap(as_tensor[0], as_tensor[2])
    assert style_colours("auto", face, [strokes, deep_field]) == ("style", "transfer")
    assert style_colours("style", face, [strokes, deep_field]) == ("style", "style")
    # The gallery's masked row keeps both paintings' palettes: the deep field in the sky, the fiery strokes on the pad.
    rocket, sky, ground = (load_image(SAMPLES / n) for n in ("rocket.jpg", "rocket-sky.png", "rocket-ground.png"))
    assert style_colours("auto", rocket, [deep_field, strokes], [sky, ground]) == ("style", "style")


def test_color_auto_compares_a_masked_style_with_the_content_under_its_mask() -> None:
    """Left half the deep field itself, right half the portrait: the deep field painted over the left keeps its own
    palette, over the right it is recoloured."""
    face, deep_field = (load_image(SAMPLES / name).resize((64, 64)) for name in ("astronaut.jpg", "hubble.jpg"))
    content = Image.new("RGB", (128, 64))
    content.paste(deep_field, (0, 0))
    content.paste(face, (64, 0))
    left = Image.new("L", (128, 64))
    left.paste(255, (0, 0, 64, 64))
    right = Image.eval(left, lambda v: 255 - v)
    assert style_colours("auto", content, [deep_field, deep_field], [left, right]) == ("style", "transfer")


def test_color_auto_makes_exactly_what_the_choice_it_records_makes() -> None:
    weights = SOURCES["random"].load()
    values = {**default_values(), "size": 24, "min_size": 0, "iterations": 3}
    face, strokes, deep_field = (load_image(SAMPLES / name) for name in ("astronaut.jpg", "strokes.png", "hubble.jpg"))
    stylizer = Stylizer.local(weights, torch.device("cpu"))

    def run(style: Image.Image, color: str) -> tuple[torch.Tensor, tuple[str, ...]]:
        (out,) = stylizer.stylize([Inputs(face, [style])], make_settings(values | {"color": color}))
        return out.image, out.colours

    for style, chosen, other in ((deep_field, "transfer", "style"), (strokes, "style", "transfer")):
        auto, colours = run(style, "auto")
        assert colours == (chosen,)
        torch.testing.assert_close(auto, run(style, chosen)[0], rtol=0, atol=0)
        assert (auto - run(style, other)[0]).abs().max() > 0.05


# --- EMA and the stop rule ----------------------------------------------------------------------------------------


def test_ema_is_bias_corrected(tmp_path: Path) -> None:
    """average=ema outputs sum_k decay^(n-k) x_k / sum_k decay^(n-k) over the iterates x_1..x_n: after two steps
    (decay x1 + x2) / (1 + decay), not the uncorrected (1 - decay) (decay x1 + x2), which would be nearly black."""
    weights = SOURCES["random"].load()
    values = {**default_values(), "size": 24, "min_size": 0, "iterations": 2, "optimizer": "adam"}
    values |= {"style_layers": ("relu1_1",), "content_layers": ("relu1_2",), "learning_rate": 0.05}
    content = load_image(make_photo(tmp_path / "c.png", 24, 18))
    style = load_image(make_painting(tmp_path / "s.png", 24, 24))
    stylizer = Stylizer.local(weights, torch.device("cpu"))
    iterates: list[torch.Tensor] = []
    hooks = Hooks(on_snapshot=lambda scale, k, pixels: iterates.append(pixels.clone()), snapshot_every=1)
    stylizer.stylize([Inputs(content, [style])], make_settings(values), hooks)
    (averaged,) = stylizer.stylize([Inputs(content, [style])], make_settings(values | {"average": "ema"}))
    x1, x2 = iterates
    assert (x2 - x1).abs().max() > 1e-3  # two different iterates, so the weights matter
    torch.testing.assert_close(averaged.image, (EMA_DECAY * x1 + x2) / (1 + EMA_DECAY))
    assert averaged.kept_iteration == 2


def test_the_stop_rule_uses_the_running_minimum() -> None:
    assert not converged([10.0] * 5, window=10, tolerance=0.01)  # too few iterations to judge
    flat = [10.0] * 12
    assert converged(flat, window=10, tolerance=0.01)
    improving = [10.0 - 0.5 * k for k in range(12)]
    assert not converged(improving, window=10, tolerance=0.01)
    assert not converged(flat, window=10, tolerance=0.0)  # 0 disables it


def test_a_scale_stops_when_its_loss_stops_improving(tmp_path: Path) -> None:
    content = make_photo(tmp_path / "in" / "c.png", 32, 24)
    style = make_painting(tmp_path / "in" / "s.png", 32, 32)
    manifest = write_manifest(tmp_path / "m.csv", "content,style,output", "in/c.png,in/s.png,o.png")
    assert content.is_file() and style.is_file()
    flags = ("--model", "random", "--device", "cpu", "-q", "--size", "32", "--iterations", "300")
    result = cli("run", manifest, *flags, "--stop-tolerance", "0.05")
    assert result.exit_code == 0, result.output
    from batchstyle.run.ledger import read_records

    (record,) = read_records(tmp_path / "m")[0]
    assert record.iterations < 300
    import json

    assert json.loads(record.params)["stops"] == ["converged"]


# --- check ------------------------------------------------------------------------------------------------------


def test_check_names_mask_problems(tmp_path: Path) -> None:
    make_photo(tmp_path / "c.png")
    make_painting(tmp_path / "s.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,style_masks,content_mask",
        "c.png,s.png;s.png,mask.png,",
        "c.png,s.png,missing.png,",
        "c.png,s.png,mask.png,nowhere.png",
    )
    result = cli("check", manifest)
    assert result.exit_code == 1
    assert "row 1 (line 2), column style_masks: 1 mask for 2 style images" in result.output
    assert "row 2 (line 3), column style_masks" in result.output and "missing.png" in result.output
    assert "row 3 (line 4), column content_mask" in result.output and "nowhere.png" in result.output


# --- the panel --------------------------------------------------------------------------------------------------


def test_bench_panel_writes_its_cells_and_contact_sheet(tmp_path: Path) -> None:
    def panel(subject: str, iterations: int) -> Image.Image:
        """One run over `subject`'s row (the package's samples), and the contact sheet it leaves, in grey."""
        result = cli(
            "bench", "panel", "--model", "random", "--device", "cpu", "--size", "24", "--out", tmp_path / "panel",
            "--only", subject, "--set", f"iterations={iterations}", "--set", "min_size=0", "--images", tmp_path / "no",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / "panel" / "panel.png") as sheet:
            return sheet.convert("L")

    first = panel("portrait", 2)
    # Without the development images the panel is the package's samples: portrait x strokes and x photo texture.
    assert sorted(p.name for p in (tmp_path / "panel").glob("*--*.png")) == [
        "portrait--photo-texture.png",
        "portrait--strokes.png",
    ]
    assert first.width > 400 and first.height > 400
    # Rows of 220 px thumbnails, 34 px captions and 6 px gaps under a 20 px title; the photographs' column first.
    portrait_row = (232, 286, first.width, 546)  # the portrait's cells
    animal_row = (232, 546, first.width, 806)  # the animal's
    assert first.crop(animal_row).getextrema() == (255, 255)
    # A second run over another subject, same options: its sheet shows the first run's cells too.
    both = panel("animal", 2)
    assert both.crop(portrait_row).tobytes() == first.crop(portrait_row).tobytes()
    assert both.crop(animal_row).getextrema()[0] < 200
    # Other options: the earlier cells are not this panel's, so they are left off its sheet.
    other = panel("animal", 3)
    assert other.crop(portrait_row).getextrema() == (255, 255)
    assert other.crop(animal_row).getextrema()[0] < 200
    bad = cli("bench", "panel", "--model", "random", "--set", "style_weigth=3", "--out", tmp_path / "p2")
    assert bad.exit_code == 2 and "style_weight" in bad.output
