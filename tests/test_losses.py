"""Losses against direct computations written here, their gradients against the analytic ones and gradcheck,
per-image independence, and the weighted objective that combines them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compute_targets

from batchstyle.model import losses
from batchstyle.model.features import VGGFeatures
from batchstyle.model.losses import ContentLoss, StyleLoss, TVLoss, gram_matrix
from batchstyle.model.optimize import Objective
from batchstyle.model.temporal import TemporalLoss
from batchstyle.model.tiles import TiledObjective, tile_grid
from batchstyle.model.weights import IMAGENET, random_state_dict
from batchstyle.options import default_values, make_settings


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gram_loops(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix by an explicit loop over channel pairs, in float64."""
    b, c, h, w = features.shape
    f = features.double()
    out = torch.empty(b, c, c, dtype=torch.float64)
    for n in range(b):
        for i in range(c):
            for j in range(c):
                out[n, i, j] = (f[n, i] * f[n, j]).sum() / (h * w)
    return out


def _gram_einsum(features: torch.Tensor) -> torch.Tensor:
    f = features.double()
    return torch.einsum("bihw,bjhw->bij", f, f) / (f.shape[2] * f.shape[3])


def _relative_mse(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((value - target)^2) / (mean(target^2) + eps), one number per image."""
    dims = tuple(range(1, value.dim()))
    return ((value - target) ** 2).mean(dim=dims) / ((target**2).mean(dim=dims) + losses.EPS)


def _tv_numpy(pixels: np.ndarray) -> np.ndarray:
    """Squared total variation by loops: mean squared horizontal plus mean squared vertical neighbour differences."""
    b, c, h, w = pixels.shape
    out = np.zeros(b)
    for n in range(b):
        sx = sum(
            (pixels[n, k, i, j + 1] - pixels[n, k, i, j]) ** 2 for k in range(c) for i in range(h) for j in range(w - 1)
        )
        sy = sum(
            (pixels[n, k, i + 1, j] - pixels[n, k, i, j]) ** 2 for k in range(c) for i in range(h - 1) for j in range(w)
        )
        out[n] = sx / (c * h * (w - 1)) + sy / (c * (h - 1) * w)
    return out


# --- gram_matrix ------------------------------------------------------------------------------------------------


def test_gram_matrix_matches_pairwise_loop_with_batch() -> None:
    feats = _rand(3, 4, 5, 6)
    gram = gram_matrix(feats)
    assert gram.shape == (3, 4, 4)
    torch.testing.assert_close(gram.double(), _gram_loops(feats), rtol=1e-5, atol=1e-6)
    # At float32's tolerances: the Gram is summed in float32, and float64's (1e-7) failed by 3e-7 on a 2-core CPU.
    torch.testing.assert_close(gram, _gram_einsum(feats).float())
    # Each image's Gram depends on that image only.
    torch.testing.assert_close(gram[1:2], gram_matrix(feats[1:2]))


def test_gram_matrix_is_independent_of_image_size_for_a_tiled_texture() -> None:
    tile = _rand(1, 3, 4, 4)
    torch.testing.assert_close(gram_matrix(tile.repeat(1, 1, 3, 2)), gram_matrix(tile))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_matrix_of_half_precision_input_is_fp32(dtype: torch.dtype) -> None:
    feats = (_rand(2, 8, 6, 6) * 4).to(dtype)
    gram = gram_matrix(feats)
    assert gram.dtype == torch.float32
    # Computed in fp32 from the half-precision values: matches the float64 reference to fp32 accuracy, far
    # tighter than an fp16/bf16 accumulation would.
    torch.testing.assert_close(gram.double(), _gram_loops(feats.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_large_bf16_gram_is_summed_in_fp32_chunk_by_chunk(channels_last: bool) -> None:
    """Past GRAM_CHUNK positions a bf16 Gram on the CPU is summed a chunk at a time, each converted to fp32: the same
    fp32 Gram as one conversion of the whole, to fp32 rounding, without the whole fp32 copy."""
    feats = (_rand(2, 8, 100, 120) * 4).to(torch.bfloat16)  # 12,000 positions: two chunks
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    assert losses.GRAM_CHUNK < 100 * 120
    gram = gram_matrix(feats)
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram.double(), _gram_loops(feats.float()), rtol=1e-5, atol=1e-5)


def test_a_bf16_gram_backward_stays_bf16_and_close_to_fp32s() -> None:
    """Under bf16 the Gram's gradient is computed in bf16, as the convolutions' gradients around it are: within
    bf16's rounding of the fp32 computation, and in the features' dtype and layout."""
    feats = (_rand(1, 16, 24, 20) * 4).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weights = _rand(1, 16, 16)
    ours = feats.detach().clone().requires_grad_(True)
    (gram_matrix(ours) * weights).sum().backward()
    exact = feats.detach().double().requires_grad_(True)
    (gram_matrix(exact) * weights.double()).sum().backward()
    assert ours.grad.dtype == torch.bfloat16 and ours.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours.grad.double(), exact.grad, rtol=2e-2, atol=2e-2 * exact.grad.abs().max().item())


def _gram_backward_both_ways(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dF of sum(W * Gram(F)) through gram_matrix's own backward and through autograd of plain operations."""
    ours = features.detach().clone().requires_grad_(True)
    (gram_matrix(ours) * weights).sum().backward()
    plain = features.detach().clone().requires_grad_(True)
    b, c, h, w = plain.shape
    flat = plain.reshape(b, c, h * w)
    (torch.bmm(flat, flat.transpose(1, 2)) / (h * w) * weights).sum().backward()
    return ours.grad, plain.grad


def test_gram_backward_equals_autograds() -> None:
    feats = _rand(2, 3, 4, 5, seed=30, dtype=torch.float64)
    weights = _rand(2, 3, 3, seed=31, dtype=torch.float64)  # not symmetric: both halves of dG + dG^T matter
    ours, plain = _gram_backward_both_ways(feats, weights)
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(gram_matrix, (feats.clone().requires_grad_(True),))


def test_gram_backward_keeps_channels_last() -> None:
    feats = _rand(2, 6, 4, 5, seed=32).contiguous(memory_format=torch.channels_last)
    weights = _rand(2, 6, 6, seed=33)
    ours, plain = _gram_backward_both_ways(feats, weights)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    # The convolution before it runs channels_last, so its incoming gradient is channels_last too: no conversion.
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()


def test_gram_backward_of_bf16_features_is_bf16() -> None:
    feats = _rand(1, 4, 3, 3, seed=34).to(torch.bfloat16).requires_grad_(True)
    gram = gram_matrix(feats)
    assert gram.dtype == torch.float32
    gram.sum().backward()
    assert feats.grad.dtype == torch.bfloat16
    expected = 2 * feats.detach().float().reshape(4, 9).sum(0, keepdim=True).expand(4, 9) / 9
    torch.testing.assert_close(feats.grad.float().reshape(4, 9), expected, rtol=1e-2, atol=1e-2)


# --- values -----------------------------------------------------------------------------------------------------


def test_content_loss_value() -> None:
    target, x = _rand(2, 3, 4, 5, seed=1), _rand(2, 3, 4, 5, seed=2)
    loss = ContentLoss(target)(x)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, _relative_mse(x, target))
    assert torch.all(ContentLoss(target)(target) == 0)


def test_style_loss_value() -> None:
    style_feats, x = _rand(2, 4, 5, 5, seed=3), _rand(2, 4, 6, 3, seed=4)
    target_gram = _gram_loops(style_feats)
    loss = StyleLoss(target_gram.float())(x)
    assert loss.shape == (2,)
    expected = _relative_mse(_gram_loops(x), target_gram)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_tv_loss_value() -> None:
    pixels = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(5))
    loss = TVLoss()(pixels)
    assert loss.shape == (2,)
    np.testing.assert_allclose(loss.numpy(), _tv_numpy(pixels.double().numpy()), rtol=1e-5)
    assert torch.all(TVLoss()(torch.full((1, 3, 4, 4), 0.3)) == 0)


# --- gradients --------------------------------------------------------------------------------------------------


def test_content_loss_gradient_is_analytic() -> None:
    target, x = _rand(1, 3, 4, 5, seed=6), _rand(1, 3, 4, 5, seed=7).requires_grad_(True)
    ContentLoss(target)(x).sum().backward()
    n, norm = target.numel(), (target**2).mean() + losses.EPS
    torch.testing.assert_close(x.grad, 2 * (x.detach() - target) / (n * norm))


def test_style_loss_gradient_is_analytic() -> None:
    c, h, w = 4, 3, 5
    target_gram = _gram_loops(_rand(1, c, h, w, seed=8)).float()
    x = _rand(1, c, h, w, seed=9).requires_grad_(True)
    StyleLoss(target_gram)(x).sum().backward()
    # L = sum((G - T)^2) / (C^2 norm) with G = F F^T / HW and T symmetric  =>  dL/dF = 4 (G - T) F / (C^2 norm HW).
    f = x.detach().reshape(c, h * w)
    g = f @ f.T / (h * w)
    norm = (target_gram[0] ** 2).mean() + losses.EPS
    expected = 4 * (g - target_gram[0]) @ f / (c * c * norm * h * w)
    torch.testing.assert_close(x.grad, expected.reshape(1, c, h, w), rtol=1e-4, atol=1e-6)


def test_tv_loss_gradient_is_analytic() -> None:
    c, h, w = 2, 4, 5
    x = _rand(1, c, h, w, seed=10).requires_grad_(True)
    TVLoss()(x).sum().backward()
    p = x.detach()
    expected = torch.zeros_like(p)
    dx = (p[..., :, 1:] - p[..., :, :-1]) * 2 / (c * h * (w - 1))
    dy = (p[..., 1:, :] - p[..., :-1, :]) * 2 / (c * (h - 1) * w)
    expected[..., :, 1:] += dx
    expected[..., :, :-1] -= dx
    expected[..., 1:, :] += dy
    expected[..., :-1, :] -= dy
    torch.testing.assert_close(x.grad, expected)


def _content_fn(target: torch.Tensor):  # noqa: ANN202
    loss = ContentLoss(target)
    return lambda x: loss(x)


def _style_fn(target: torch.Tensor):  # noqa: ANN202
    loss = StyleLoss(gram_matrix(target))
    return lambda x: loss(x)


# The losses compute in fp32 (`.float()`, so that fp16/bf16 features are accumulated precisely), which also
# downcasts float64 input. A float64 gradcheck therefore needs a finite-difference step and tolerances sized for
# fp32 arithmetic; the analytic-gradient tests above are the tight check.
FP32_GRADCHECK = {"eps": 1e-3, "atol": 2e-4, "rtol": 1e-3}


@pytest.mark.parametrize("make", [_content_fn, _style_fn], ids=["content", "style"])
def test_feature_losses_pass_gradcheck_on_float64_input(make) -> None:  # noqa: ANN001
    target = _rand(2, 3, 3, 4, seed=11, dtype=torch.float64)
    x = _rand(2, 3, 3, 4, seed=12, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(make(target), (x,), **FP32_GRADCHECK)


@pytest.mark.parametrize("make", [_content_fn, _style_fn], ids=["content", "style"])
def test_feature_losses_gradcheck_at_float64_precision(make) -> None:  # noqa: ANN001
    target = _rand(1, 2, 3, 3, seed=13, dtype=torch.float64)
    x = _rand(1, 2, 3, 3, seed=14, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(make(target), (x,))


def test_tv_loss_passes_gradcheck_in_float64() -> None:
    x = _rand(2, 3, 4, 3, seed=15, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(TVLoss(), (x,))


# --- per-image independence -------------------------------------------------------------------------------------


def test_losses_of_a_batch_equal_each_image_alone() -> None:
    x = _rand(2, 4, 5, 6, seed=16)
    content_t = _rand(2, 4, 5, 6, seed=17)
    style_t = gram_matrix(_rand(2, 4, 7, 7, seed=18))
    batch = ContentLoss(content_t)(x), StyleLoss(style_t)(x), TVLoss()(x)
    for i in range(2):
        alone = (
            ContentLoss(content_t[i : i + 1])(x[i : i + 1]),
            StyleLoss(style_t[i : i + 1])(x[i : i + 1]),
            TVLoss()(x[i : i + 1]),
        )
        for whole, single in zip(batch, alone):
            torch.testing.assert_close(whole[i : i + 1], single)


def test_one_target_shared_by_a_batch_keeps_images_independent() -> None:
    target = _rand(1, 4, 5, 6, seed=19)
    x = _rand(2, 4, 5, 6, seed=20).requires_grad_(True)
    for loss in (ContentLoss(target), StyleLoss(gram_matrix(target)), TVLoss()):
        values = loss(x)
        assert values.shape == (2,)
        torch.testing.assert_close(values[1:], loss(x[1:]))
        # Image 0's loss has no gradient through image 1.
        (grad,) = torch.autograd.grad(values[0], x)
        assert grad[0].abs().sum() > 0
        assert torch.all(grad[1] == 0)


# --- the objective ----------------------------------------------------------------------------------------------


def test_objective_weights_losses_and_normalises_layer_weights() -> None:
    content_layers = ("relu2_2", "relu1_1")
    style_layers = ("relu1_1", "relu2_1", "relu3_1")
    layer_weights = (1.0, 3.0, 6.0)
    settings = make_settings(
        default_values()
        | {
            "content_weight": 2.5,
            "style_weight": 40.0,
            "tv_weight": 7.0,
            "content_layers": content_layers,
            "style_layers": style_layers,
            "style_layer_weights": layer_weights,
        }
    )
    model = VGGFeatures("vgg16", random_state_dict("vgg16", seed=3), IMAGENET, (*content_layers, *style_layers))
    gen = torch.Generator().manual_seed(21)
    content, style = torch.rand(1, 3, 16, 20, generator=gen), torch.rand(1, 3, 24, 24, generator=gen)
    targets = compute_targets(model, content, [style], [1.0], content_layers, style_layers)
    pixels = torch.rand(2, 3, 16, 20, generator=gen)

    total, terms = Objective(model, targets, settings)(pixels)
    assert list(terms) == ["content", "style", "tv"]
    c, s, t = terms.values()

    with torch.no_grad():
        feats, content_feats, style_feats = model(pixels), model(content), model(style)
    exp_c = sum(_relative_mse(feats[n], content_feats[n]) for n in content_layers) / len(content_layers)
    exp_s = sum(
        (w / sum(layer_weights)) * _relative_mse(_gram_einsum(feats[n]), _gram_einsum(style_feats[n])).float()
        for n, w in zip(style_layers, layer_weights)
    )
    exp_t = torch.from_numpy(_tv_numpy(pixels.double().numpy())).float()
    for got, expected in ((c, exp_c), (s, exp_s), (t, exp_t)):
        assert got.shape == (2,)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(total, 2.5 * exp_c + 40.0 * exp_s + 7.0 * exp_t, rtol=1e-4, atol=1e-6)
    # The per-layer style terms really differ, so a wrong (e.g. unnormalised or uniform) weighting would show.
    per_layer = [float(_relative_mse(_gram_einsum(feats[n]), _gram_einsum(style_feats[n]))[0]) for n in style_layers]
    assert max(per_layer) > 1.2 * min(per_layer)


def test_an_extra_term_is_named_weighted_by_its_option_and_summed_as_before() -> None:
    """A named extra term (a video frame's temporal loss) comes back unweighted under its name, weighted by the
    option named after it; the total is the positional objective's to the bit: a change of representation only."""
    layers = ("relu1_1", "relu2_1")
    settings = make_settings(
        default_values()
        | {"content_weight": 2.5, "style_weight": 40.0, "tv_weight": 7.0, "temporal_weight": 300.0}
        | {"content_layers": layers[1:], "style_layers": layers}
    )
    model = VGGFeatures("vgg16", random_state_dict("vgg16", seed=3), IMAGENET, layers)
    gen = torch.Generator().manual_seed(4)
    content, style, previous = (torch.rand(2, 3, 16, 20, generator=gen) for _ in range(3))
    mask = (torch.rand(2, 1, 16, 20, generator=gen) > 0.3).float()
    targets = compute_targets(model, content, [style], [1.0], layers[1:], layers)
    pixels = torch.rand(2, 3, 16, 20, generator=gen)
    temporal = TemporalLoss(previous, mask)
    objective = Objective(model, targets, settings, extra={"temporal": temporal})

    total, terms = objective(pixels)

    assert list(terms) == ["content", "style", "tv", "temporal"]
    torch.testing.assert_close(terms["temporal"], (mask * (pixels - previous) ** 2).mean(dim=(1, 2, 3)))
    c, s, t, m = terms.values()
    assert torch.equal(total, 2.5 * c + 40.0 * s + 7.0 * t + 300.0 * m)  # the sum as it was written before names
    pixels.requires_grad_(True)
    value, detached = objective.gradient(pixels)
    assert torch.equal(value, total) and all(torch.equal(detached[n], terms[n]) for n in terms)
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="sharpness_weight"):
        Objective(model, targets, settings, extra={"sharpness": temporal})
    with pytest.raises(ValueError, match="own"):
        Objective(model, targets, settings, extra={"tv": temporal})


def test_a_tiled_objective_gives_the_extra_term_by_name_as_the_whole_image_does() -> None:
    """Tiles change how content, style and tv are gathered, never the names or the extra terms (evaluated whole)."""
    layers = ("relu1_1", "relu2_1")
    settings = make_settings(
        default_values() | {"temporal_weight": 300.0, "content_layers": layers[1:], "style_layers": layers}
    )
    model = VGGFeatures("vgg16", random_state_dict("vgg16", seed=3), IMAGENET, layers)
    gen = torch.Generator().manual_seed(6)
    content, style, previous, pixels = (torch.rand(1, 3, 40, 56, generator=gen) for _ in range(4))
    targets = compute_targets(model, content, [style], [1.0], layers[1:], layers)
    extra = {"temporal": TemporalLoss(previous, torch.ones(1, 1, 40, 56))}
    whole = Objective(model, targets, settings, extra=extra)
    tiled = TiledObjective(model, targets, settings, extra=extra, tile=24)
    assert len(tile_grid(40, 56, 24, tiled.margin, tiled.step)) > 1
    grads = []
    for objective in (whole, tiled):
        x = pixels.clone().requires_grad_(True)
        total, terms = objective.gradient(x)
        assert list(terms) == ["content", "style", "tv", "temporal"]
        grads.append((total, terms, x.grad))
    (total, terms, grad), (tiled_total, tiled_terms, tiled_grad) = grads
    assert torch.equal(tiled_terms["temporal"], terms["temporal"])
    for name in terms:
        torch.testing.assert_close(tiled_terms[name], terms[name], rtol=1e-5, atol=0)
    torch.testing.assert_close(tiled_total, total, rtol=1e-5, atol=0)
    torch.testing.assert_close(tiled_grad, grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        value, by_name = tiled(pixels)
    torch.testing.assert_close(value, tiled_total, rtol=1e-6, atol=0)
    assert list(by_name) == list(terms)
