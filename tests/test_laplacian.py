"""The structure term (Li et al. 2017's Laplacian loss): its value, its gradient, and that tiles, batches and a
weight of 0 leave it as it must be."""

from __future__ import annotations

import pytest
import torch
from conftest import compute_targets, smooth_image

from batchstyle.model.features import VGGFeatures
from batchstyle.model.losses import LAPLACIAN_FLOOR, LaplacianLoss, laplacian
from batchstyle.model.optimize import Objective, optimize_batch, structure_terms
from batchstyle.model.tiles import TiledObjective
from batchstyle.options import default_values, make_settings

HEIGHT, WIDTH = 70, 90  # neither a multiple of the pool nor of the network's stride


def blocks(values: list[list[float]], pool: int, rows: int, cols: int) -> torch.Tensor:
    """A (1, 3, rows, cols) image whose pool x pool blocks are flat, block (i, j) summing to values[i][j] over the
    three channels (split 1:2:3 between them), cut to rows x cols (a partial last block keeps its value)."""
    grid = torch.tensor(values, dtype=torch.float64)
    full = grid.repeat_interleave(pool, 0).repeat_interleave(pool, 1)[:rows, :cols]
    return torch.stack([full / 6, 2 * full / 6, 3 * full / 6])[None]


@pytest.mark.parametrize("rows, cols", [(8, 12), (7, 10)])  # whole blocks; partial last blocks (ceil pooling)
def test_the_laplacian_and_the_loss_have_their_closed_form(rows: int, cols: int) -> None:
    """Pooled to 2 x 3 blocks [[a, b, c], [d, e, f]], with the border repeated: the Laplacian at a is
    4a - a (above, repeated) - a (left, repeated) - b - d = 2a - b - d, and so on."""
    a, b, c, d, e, f = 1.0, 3.0, 0.5, 2.0, 0.0, 1.5
    image = blocks([[a, b, c], [d, e, f]], 4, rows, cols)
    expected = torch.tensor(
        [[2 * a - b - d, 3 * b - a - c - e, 2 * c - b - f], [2 * d - a - e, 3 * e - b - d - f, 2 * f - c - e]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(laplacian(image, 4)[0, 0], expected)

    other = blocks([[a, b, c], [d, e + 1.0, f]], 4, rows, cols)  # one block brighter by 1
    # The Laplacian changes by +3 at e and -1 at each of its three neighbours b, d, f: 9 + 3 over 6 positions.
    loss = LaplacianLoss(image, 4)
    norm = max(float(expected.square().mean()), LAPLACIAN_FLOOR)
    torch.testing.assert_close(loss(other), torch.tensor([12 / 6 / norm], dtype=torch.float64), rtol=1e-6, atol=0)
    assert float(loss(image)) < 1e-12  # the target is kept in float32


def test_a_flat_content_is_compared_against_the_floor_not_nothing() -> None:
    flat = torch.full((1, 3, 16, 16), 0.4)
    bumped = flat.clone()
    bumped[..., 4:8, 4:8] += 1 / 255
    value = float(LaplacianLoss(flat, 4)(bumped))
    # One 4x4 block one level brighter in each channel: the pooled sum rises 3/255 there, the Laplacian 12/255 at
    # the block and -3/255 at its four neighbours, over 16 positions, relative to (1/255)^2.
    assert value == pytest.approx((144 + 4 * 9) / 16, rel=1e-3)


def test_the_gradient_is_the_losss_own() -> None:
    gen = torch.Generator().manual_seed(0)
    content = torch.rand(2, 3, 9, 11, generator=gen, dtype=torch.float64)
    pixels = torch.rand(2, 3, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = LaplacianLoss(content, 2).double()
    assert torch.autograd.gradcheck(lambda x: loss(x), (pixels,), eps=1e-6, atol=1e-7)


def test_tiled_equals_untiled_and_a_batch_keeps_its_images_apart(trunk: VGGFeatures) -> None:
    settings = make_settings(default_values() | {"laplacian_weight": 50.0, "laplacian_pool": 4})
    contents = smooth_image(HEIGHT, WIDTH, 1, batch=2)
    style = smooth_image(64, 64, 2)
    targets = compute_targets(trunk, contents, [style], [1.0], settings.content_layers, settings.style_layers)
    pixels = smooth_image(HEIGHT, WIDTH, 3, batch=2)

    def evaluate(objective: Objective) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        x = pixels.clone().requires_grad_(True)
        total, terms = objective.gradient(x)
        assert x.grad is not None
        return total, terms, x.grad

    extra = structure_terms(settings, contents)
    whole = evaluate(Objective(trunk, targets, settings, extra=extra))
    tiled = evaluate(TiledObjective(trunk, targets, settings, extra=extra, tile=32))
    assert list(whole[1]) == ["content", "style", "tv", "laplacian"] == list(tiled[1])
    assert whole[1]["laplacian"].min() > 0
    torch.testing.assert_close(tiled[1]["laplacian"], whole[1]["laplacian"], rtol=1e-6, atol=0)
    torch.testing.assert_close(tiled[0], whole[0], rtol=1e-5, atol=0)
    assert float((tiled[2] - whole[2]).norm() / whole[2].norm()) <= 1e-4

    # Image 1 of the batch, alone: the same value and, through the whole objective, the same gradient.
    lone = compute_targets(trunk, contents[1:], [style], [1.0], settings.content_layers, settings.style_layers)
    x = pixels[1:].clone().requires_grad_(True)
    _, terms = Objective(trunk, lone, settings, extra=structure_terms(settings, contents[1:])).gradient(x)
    torch.testing.assert_close(terms["laplacian"], whole[1]["laplacian"][1:], rtol=1e-6, atol=0)


def test_the_term_joins_the_history_by_name_only_when_weighed(trunk: VGGFeatures) -> None:
    content = smooth_image(40, 48, 1)
    style = smooth_image(40, 40, 2)
    base = default_values() | {"iterations": 3, "size": 48, "min_size": 0}
    outcomes = {}
    for weight in (0.0, 20.0):
        settings = make_settings(base | {"laplacian_weight": weight})
        targets = compute_targets(trunk, content, [style], [1.0], settings.content_layers, settings.style_layers)
        (outcomes[weight],) = optimize_batch(trunk, content, targets, settings, [None])
    assert list(outcomes[0.0].history[0]) == ["content", "style", "tv"]
    assert list(outcomes[20.0].history[0]) == ["content", "style", "tv", "laplacian"]
    assert structure_terms(make_settings(base), content) == {}
    assert not torch.equal(outcomes[0.0].image, outcomes[20.0].image)
