"""The pixel loop with the real vgg16-hed weights at tens of pixels: losses fall, the style's statistics transfer,
and runs are reproducible from their seed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_painting, make_photo

from batchstyle.features import VGGFeatures, build
from batchstyle.images import image_to_tensor, load_image
from batchstyle.optimize import Losses, Objective, Outcome, stylize
from batchstyle.options import Settings, default_values, make_settings
from batchstyle.targets import compute_targets
from batchstyle.weights import Weights

GRAM_LAYERS = ("relu1_1", "relu2_1", "relu3_1")


def _settings(**overrides: Any) -> Settings:
    # Loss weights spelled out, so these tests do not move with the CLI's defaults.
    values = default_values() | {"content_weight": 1.0, "style_weight": 100.0, "tv_weight": 10.0, "seed": 0}
    return make_settings(values | overrides)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, torch.Tensor]:
    folder = tmp_path_factory.mktemp("pictures")
    content = image_to_tensor(load_image(make_photo(folder / "photo.png", 32, 24)))
    style = image_to_tensor(load_image(make_painting(folder / "painting.png", 32, 32)))
    return content, style


def _run(weights: Weights, pictures: tuple[torch.Tensor, torch.Tensor], settings: Settings) -> tuple[Outcome, Any]:
    content, style = pictures
    taps = tuple(dict.fromkeys(settings.content_layers + settings.style_layers))
    model = build(weights, taps, settings.pooling)
    targets = compute_targets(model, content, [style], [1.0], settings.content_layers, settings.style_layers)
    calls: list[tuple[int, Losses]] = []
    outcome = stylize(model, content, targets, settings, on_iteration=lambda i, losses: calls.append((i, losses)))
    return outcome, (model, targets, calls)


@pytest.fixture(scope="module")
def lbfgs_run(hed_weights: Weights, pictures: tuple[torch.Tensor, torch.Tensor]) -> tuple[Outcome, Any]:
    return _run(hed_weights, pictures, _settings(optimizer="lbfgs", iterations=15))


def _relative_gram_distance(model: VGGFeatures, image: torch.Tensor, style: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        feats, style_feats = model(image), model(style)
    out = {}
    for layer in GRAM_LAYERS:
        a, b = feats[layer][0].flatten(1).double(), style_feats[layer][0].flatten(1).double()
        gram_a, gram_b = a @ a.T / a.shape[1], b @ b.T / b.shape[1]
        out[layer] = float((gram_a - gram_b).norm() / gram_b.norm())
    return out


def test_lbfgs_reduces_the_loss_and_records_each_iteration(lbfgs_run: tuple[Outcome, Any]) -> None:
    outcome, (_, _, calls) = lbfgs_run
    assert outcome.iterations == 15
    assert len(outcome.history) == 15
    assert [i for i, _ in calls] == list(range(1, 16))
    assert [losses for _, losses in calls] == outcome.history
    first = outcome.history[0]
    assert first.style > 0
    assert outcome.losses.total < 0.5 * first.total
    assert outcome.losses.style < 0.5 * first.style


def test_reported_losses_are_the_objective_of_the_returned_image(
    lbfgs_run: tuple[Outcome, Any], pictures: tuple[torch.Tensor, torch.Tensor]
) -> None:
    outcome, (model, targets, _) = lbfgs_run
    settings = _settings(optimizer="lbfgs", iterations=15)
    with torch.no_grad():
        total, content, style, tv = Objective(model, targets, settings)(outcome.image)
    assert outcome.losses.total == pytest.approx(float(total), rel=1e-4)
    assert outcome.losses.content == pytest.approx(float(content), rel=1e-4)
    assert outcome.losses.style == pytest.approx(float(style), rel=1e-4)
    assert outcome.losses.tv == pytest.approx(float(tv), rel=1e-4)
    assert outcome.losses.total == pytest.approx(
        1.0 * outcome.losses.content + 100.0 * outcome.losses.style + 10.0 * outcome.losses.tv, rel=1e-4
    )


def test_output_is_an_image_in_range(
    lbfgs_run: tuple[Outcome, Any], pictures: tuple[torch.Tensor, torch.Tensor]
) -> None:
    outcome, _ = lbfgs_run
    content, _ = pictures
    image = outcome.image
    assert image.shape == content.shape and image.dtype == torch.float32
    assert not image.requires_grad
    assert torch.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1
    assert (image - content).abs().mean() > 0.01  # it did move away from the content it started from


def test_style_statistics_transfer(lbfgs_run: tuple[Outcome, Any], pictures: tuple[torch.Tensor, torch.Tensor]) -> None:
    outcome, (model, _, _) = lbfgs_run
    content, style = pictures
    before = _relative_gram_distance(model, content, style)
    after = _relative_gram_distance(model, outcome.image, style)
    for layer in GRAM_LAYERS:
        assert after[layer] < 0.6 * before[layer], (layer, before[layer], after[layer])


def test_adam_reduces_the_loss(hed_weights: Weights, pictures: tuple[torch.Tensor, torch.Tensor]) -> None:
    outcome, (_, _, calls) = _run(hed_weights, pictures, _settings(optimizer="adam", iterations=15))
    assert len(outcome.history) == 15 and len(calls) == 15
    assert outcome.losses.total < 0.5 * outcome.history[0].total
    assert outcome.image.min() >= 0 and outcome.image.max() <= 1


# Shallow layers for the reproducibility checks: the trunk stops at relu2_2, so each run costs little.
SHALLOW = {"content_layers": ("relu2_2",), "style_layers": ("relu1_1", "relu2_1"), "iterations": 3}


def test_runs_are_reproducible_from_the_seed(hed_weights: Weights, pictures: tuple[torch.Tensor, torch.Tensor]) -> None:
    first, _ = _run(hed_weights, pictures, _settings(init="noise", seed=1, **SHALLOW))
    again, _ = _run(hed_weights, pictures, _settings(init="noise", seed=1, **SHALLOW))
    assert torch.equal(first.image, again.image)
    assert first.history == again.history

    other_seed, _ = _run(hed_weights, pictures, _settings(init="noise", seed=2, **SHALLOW))
    assert (first.image - other_seed.image).abs().mean() > 0.05
    assert first.history[0].total != other_seed.history[0].total

    from_content, _ = _run(hed_weights, pictures, _settings(init="content", seed=1, **SHALLOW))
    assert (first.image - from_content.image).abs().mean() > 0.05
    assert from_content.history[0].content == 0.0  # starting at the content image, content loss starts at zero
    assert first.history[0].content > 0.0


def test_init_image_is_resized_to_the_content(
    hed_weights: Weights, pictures: tuple[torch.Tensor, torch.Tensor]
) -> None:
    content, style = pictures
    settings = _settings(init="style.png", **{**SHALLOW, "iterations": 1})
    model = build(hed_weights, ("relu1_1", "relu2_1", "relu2_2"))
    targets = compute_targets(model, content, [style], [1.0], settings.content_layers, settings.style_layers)
    outcome = stylize(model, content, targets, settings, init_image=style)
    assert outcome.image.shape == content.shape
    with pytest.raises(ValueError, match="needs its image"):
        stylize(model, content, targets, settings)
