"""ONNX export of the forward-only target graph (content features and style Gram matrices), self-validated.

The graph takes plain RGB pixels in [0, 1] (preprocessing is baked in) with dynamic batch, height and width, so any
ONNX consumer can compute batchstyle's targets. An export that ONNX Runtime does not reproduce within tolerance is an
error: a graph that silently disagrees with PyTorch would poison every target computed from it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from batchstyle.model.features import VGGFeatures
from batchstyle.model.graph import INPUT_NAME, ExportError, GraphSpec
from batchstyle.model.losses import gram_matrix
from batchstyle.model.weights import Weights

TOLERANCE = 1e-4
VALIDATION_SHAPES = ((2, 3, 64, 48), (1, 3, 40, 72))


class TargetGraph(nn.Module):
    """pixels -> (content feature maps..., style Grams..., style means...), in GraphSpec.output_names order: the
    Gram (second moment) and the mean give a style's covariance too, so both style losses share these targets."""

    def __init__(self, features: VGGFeatures, content_layers: Sequence[str], style_layers: Sequence[str]) -> None:
        super().__init__()
        self.features = features
        self.content_layers = tuple(content_layers)
        self.style_layers = tuple(style_layers)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.features(pixels)
        content = [feats[name].float() for name in self.content_layers]
        grams = [gram_matrix(feats[name]) for name in self.style_layers]
        means = [feats[name].float().mean(dim=(2, 3)) for name in self.style_layers]
        return (*content, *grams, *means)


def target_graph(weights: Weights, spec: GraphSpec) -> TargetGraph:
    taps = (*spec.content_layers, *spec.style_layers)
    features = VGGFeatures(weights.arch, weights.state_dict, weights.preprocess, taps, spec.pooling)
    return TargetGraph(features, spec.content_layers, spec.style_layers).eval()


def _export_dynamo(graph: TargetGraph, spec: GraphSpec, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=16, max=16384)
    width = torch.export.Dim("width", min=16, max=16384)
    example = torch.rand(2, 3, 64, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=spec.output_names,
            dynamic_shapes={"pixels": {0: batch, 2: height, 3: width}},
            verbose=False,
        )
    assert program is not None  # None only from the legacy exporter (dynamo=False)
    program.save(str(path))


def _export_legacy(graph: TargetGraph, spec: GraphSpec, path: Path) -> None:
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    for name in spec.output_names:
        axes[name] = {0: "batch", 2: "fheight", 3: "fwidth"} if name.startswith("content_") else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.rand(2, 3, 64, 48),),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=spec.output_names,
            dynamic_axes=axes,
            opset_version=17,
        )


EXPORTERS: dict[str, Callable[[TargetGraph, GraphSpec, Path], None]] = {
    "dynamo": _export_dynamo,
    "legacy": _export_legacy,
}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str
    errors: dict[tuple[int, ...], dict[str, float]]  # input shape -> output name -> worst relative error
    fallback_reason: str | None = None


def validate(path: Path, graph: TargetGraph, spec: GraphSpec) -> dict[tuple[int, ...], dict[str, float]]:
    """Full onnx.checker pass, then ONNX Runtime against PyTorch at two image sizes; raises past TOLERANCE."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker rejected the graph: {exc}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors: dict[tuple[int, ...], dict[str, float]] = {}
    gen = torch.Generator().manual_seed(0)
    for shape in VALIDATION_SHAPES:
        pixels = torch.rand(*shape, generator=gen)
        with torch.no_grad():
            expected = graph(pixels)
        got = session.run(spec.output_names, {INPUT_NAME: pixels.numpy()})
        errors[shape] = {}
        for name, ref, out in zip(spec.output_names, expected, got):
            if not isinstance(out, np.ndarray):  # run's other kinds (sparse, sequence, map) are none of this graph's
                raise ExportError(f"{path}: output {name} is a {type(out).__name__}, not a dense tensor")
            if tuple(out.shape) != tuple(ref.shape):
                raise ExportError(f"{path}: output {name} has shape {out.shape}, PyTorch gives {tuple(ref.shape)}")
            worst = float((torch.from_numpy(out) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            errors[shape][name] = worst
    bad = {(s, n): e for s, errs in errors.items() for n, e in errs.items() if not e <= TOLERANCE}
    if bad:
        listing = ", ".join(f"{n} at {s}: {e:.2e}" for (s, n), e in bad.items())
        raise ExportError(f"{path}: ONNX Runtime disagrees with PyTorch beyond {TOLERANCE:g}: {listing}")
    return errors


def export_graph(
    weights: Weights,
    spec: GraphSpec,
    out_dir: Path,
    exporters: Sequence[str] = ("dynamo", "legacy"),
    log: Callable[[str], None] = lambda text: None,
) -> ExportResult:
    """Exports with the first exporter that works and validates, writing the file atomically."""
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / spec.filename()
    graph = target_graph(weights, spec)
    failures: list[str] = []
    for name in exporters:
        tmp = out_dir / f".{final.name}.tmp-{os.getpid()}"
        try:
            log(f"exporting {final.name} with the {name} exporter")
            EXPORTERS[name](graph, spec, tmp)
            model = onnx.load(str(tmp))
            del model.metadata_props[:]
            for key, value in spec.metadata(weights, name).items():
                model.metadata_props.add(key=key, value=value)
            onnx.save(model, str(tmp))
            errors = validate(tmp, graph, spec)
        except Exception as exc:  # noqa: BLE001 - try the next exporter, report all failures if none works
            failures.append(f"{name}: {exc.__class__.__name__}: {exc}")
            log(f"the {name} exporter failed: {failures[-1][:300]}")
            tmp.unlink(missing_ok=True)
            continue
        os.replace(tmp, final)
        return ExportResult(final, name, errors, "; ".join(failures) or None)
    raise ExportError(f"every exporter failed for {final.name}: " + " | ".join(failures))
