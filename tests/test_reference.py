"""The reference loop: its own Gram and losses agree with batchstyle's independent ones, it lowers the objective,
and the quality comparison reports numbers that are consistent with themselves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compute_targets, make_painting, make_photo

from batchstyle.images import load_image
from batchstyle.model.features import VGGFeatures
from batchstyle.model.losses import ContentLoss, StyleLoss, TVLoss, gram_matrix
from batchstyle.model.optimize import Objective, initial_image
from batchstyle.model.pixels import image_to_tensor
from batchstyle.model.weights import IMAGENET, Weights, random_state_dict
from batchstyle.options import Settings, default_values, make_settings
from batchstyle.reference import (
    QualityFigures,
    format_quality,
    quality_figures,
    reference_gram,
    reference_init,
    reference_losses,
    reference_run,
    reference_stylize,
    reference_targets,
    reference_tv,
    relative_mse,
)


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _settings(**overrides: Any) -> Settings:
    values = default_values() | {"content_weight": 1.0, "style_weight": 100.0, "tv_weight": 10.0, "seed": 0}
    return make_settings(values | overrides)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reference")
    return {"content": make_photo(folder / "photo.png", 32, 24), "style": make_painting(folder / "paint.png", 32, 32)}


def _tensors(pictures: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    return image_to_tensor(load_image(pictures["content"])), image_to_tensor(load_image(pictures["style"]))


def _model(weights_arch: str, state: dict[str, torch.Tensor], preprocess: Any, settings: Settings) -> VGGFeatures:
    taps = tuple(dict.fromkeys((*settings.content_layers, *settings.style_layers)))
    return VGGFeatures(weights_arch, state, preprocess, taps, settings.pooling)


# --- independent implementations agreeing ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_agrees_with_losses_module(dtype: torch.dtype) -> None:
    features = _rand(2, 6, 5, 7, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(reference_gram(features), gram_matrix(features), rtol=tol, atol=tol)


def test_half_precision_gram_is_accumulated_in_fp32() -> None:
    features = (_rand(1, 4, 16, 16, dtype=torch.float32) * 100).half()
    gram = reference_gram(features)
    assert gram.dtype == torch.float32 and torch.isfinite(gram).all()
    torch.testing.assert_close(gram, gram_matrix(features))


def test_content_style_and_tv_losses_agree_with_losses_module() -> None:
    value, target = _rand(3, 4, 6, 5, seed=1), _rand(1, 4, 6, 5, seed=2)
    torch.testing.assert_close(relative_mse(value, target), ContentLoss(target.double())(value), rtol=1e-6, atol=0)
    target_gram = gram_matrix(_rand(1, 4, 6, 5, seed=3))
    torch.testing.assert_close(
        relative_mse(reference_gram(value), target_gram), StyleLoss(target_gram)(value), rtol=1e-6, atol=0
    )
    pixels = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(reference_tv(pixels), TVLoss()(pixels))


def test_objective_agrees_with_batchstyle_objective() -> None:
    """Whole objective, uneven style-layer weights and two content layers: both paths see the same function."""
    settings = _settings(
        content_layers=("relu3_1", "relu4_2"),
        style_layers=("relu1_1", "relu2_1", "relu3_1"),
        style_layer_weights=(3.0, 1.0, 0.5),
        tv_weight=5.0,
    )
    model = _model("vgg16", random_state_dict("vgg16"), IMAGENET, settings)
    gen = torch.Generator().manual_seed(5)
    content, style, pixels = (torch.rand(1, 3, 24, 32, generator=gen) for _ in range(3))
    ours = Objective(
        model, compute_targets(model, content, [style], [1.0], settings.content_layers, settings.style_layers), settings
    )
    theirs_targets = reference_targets(model, content, style, settings)
    with torch.no_grad():
        total, terms = ours(pixels)
        expected = (total, terms["content"], terms["style"], terms["tv"])
        got = reference_losses(model, pixels, theirs_targets, settings)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(expected[2]) > 0 and float(expected[1]) > 0


def test_noise_init_matches_batchstyle() -> None:
    content = torch.rand(1, 3, 10, 12)
    for init in ("content", "noise"):
        settings = _settings(init=init, seed=7)
        torch.testing.assert_close(reference_init(content, settings), initial_image(init, content, 7, None))
    with pytest.raises(ValueError, match="content or noise"):
        reference_init(content, _settings(init="picture.png"))


# --- the reference loop ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reference_loop_lowers_the_objective(hed_weights: Weights, pictures: dict[str, Path]) -> None:
    content, style = _tensors(pictures)
    settings = _settings(iterations=12)
    model = _model(hed_weights.arch, hed_weights.state_dict, hed_weights.preprocess, settings)
    run = reference_run(model, content, style, settings)
    assert 1 <= run.evaluations <= 12 and len(run.totals) == run.evaluations
    assert run.image.shape == content.shape
    assert float(run.image.min()) >= 0.0 and float(run.image.max()) <= 1.0
    assert torch.equal(run.image, run.last_iterate.clamp(0, 1))  # the clamp is the only step between them
    targets = reference_targets(model, content, style, settings)
    with torch.no_grad():
        start = float(reference_losses(model, content, targets, settings)[0])
        end = float(reference_losses(model, run.image, targets, settings)[0])
    assert run.totals[0] == pytest.approx(start, rel=1e-5)
    assert end < 0.8 * start
    image, seconds = reference_stylize(model, content, style, settings)
    assert image.shape == content.shape and seconds > 0


@pytest.mark.slow
def test_the_tutorial_reference_clamps_before_every_evaluation(hed_weights: Weights, pictures: dict[str, Path]) -> None:
    """With clamping at the end only, the iterates leave [0, 1]; clamped before every evaluation, as the PyTorch
    tutorial does, every evaluated image is inside, so only the last step (never evaluated) can leave it."""
    content, style = _tensors(pictures)
    settings = _settings(iterations=12)
    model = _model(hed_weights.arch, hed_weights.state_dict, hed_weights.preprocess, settings)
    plain = reference_run(model, content, style, settings)
    assert ((plain.last_iterate < 0) | (plain.last_iterate > 1)).any()
    tutorial = reference_run(model, content, style, settings, clamp="every")
    assert tutorial.totals != plain.totals  # the clamp changed what was evaluated
    assert tutorial.totals[-1] < 0.8 * tutorial.totals[0]
    with pytest.raises(ValueError, match="every evaluation"):
        reference_run(model, content, style, settings, clamp="never")


def test_reference_is_lbfgs_only(pictures: dict[str, Path]) -> None:
    content, style = _tensors(pictures)
    settings = _settings(optimizer="adam", iterations=2)
    model = _model("vgg16", random_state_dict("vgg16"), IMAGENET, settings)
    with pytest.raises(ValueError, match="L-BFGS"):
        reference_run(model, content, style, settings)


# --- the comparison -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def figures(hed_weights: Weights, pictures: dict[str, Path]) -> QualityFigures:
    return quality_figures(hed_weights, pictures["content"], pictures["style"], size=32, iterations=10)


@pytest.mark.slow
def test_quality_figures_are_consistent(figures: QualityFigures) -> None:
    d = default_values()
    assert figures.size == (32, 24)
    for path in (figures.batchstyle, figures.reference, figures.tutorial):
        recomposed = d["content_weight"] * path.content + d["style_weight"] * path.style + d["tv_weight"] * path.tv
        assert path.total == pytest.approx(recomposed, rel=1e-5, abs=1e-9)
        assert path.total > 0 and path.seconds_per_iteration > 0
        assert all(math.isfinite(v) for v in (path.content, path.style, path.tv))
    assert figures.batchstyle.iterations == 10 and 1 <= figures.reference.iterations <= 10
    assert figures.loss_ratio == pytest.approx(figures.batchstyle.total / figures.reference.total)
    assert figures.time_ratio == pytest.approx(
        figures.batchstyle.seconds_per_iteration / figures.reference.seconds_per_iteration
    )
    assert 0 <= figures.kept_iteration <= 10
    raw = figures.reference_unclamped
    recomposed = d["content_weight"] * raw.content + d["style_weight"] * raw.style + d["tv_weight"] * raw.tv
    assert raw.total == pytest.approx(recomposed, rel=1e-5, abs=1e-9)
    assert 0 <= figures.reference_outside <= 1


@pytest.mark.slow
def test_quality_figures_score_both_images_with_the_same_objective(figures: QualityFigures) -> None:
    """Both fit the same objective from the same start with L-BFGS; batchstyle keeps its lowest-loss iterate where
    the reference clamps its last one, so batchstyle is never worse. Measured 0.78 here (0.77 to 0.92 over 5, 10 and
    20 iterations and three seeds; the losses repeat exactly for a thread count), so the lower bound sits below all
    of them. batchstyle at 5 iterations against the reference's 10 is 1.34: an optimiser making half the progress
    fails the upper bound."""
    assert 0.6 < figures.loss_ratio <= 1.0


@pytest.mark.slow
def test_format_quality_has_both_rows(figures: QualityFigures) -> None:
    text = format_quality(figures)
    lines = text.splitlines()
    assert lines[0].split() == ["content", "style", "tv", "total", "s/iteration"]
    assert [line.split()[0] for line in lines[1:6]] == ["batchstyle", "reference", "ratio", "tutorial", "ratio"]
    assert all(len(line.split()) == 6 for line in lines[1:6])
    assert len({len(line) for line in lines[:6]}) == 1  # aligned
    assert f"{figures.tutorial.content:.4g}" in lines[4]
    assert f"{figures.batchstyle.content / figures.tutorial.content:.4g}" in lines[5]
    assert f"{figures.loss_ratio:.4g}" in lines[3]
    assert f"{100 * figures.reference_outside:.1f}% of its values outside [0, 1]" in lines[-1]
