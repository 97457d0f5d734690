"""ONNX export of the target graph: dynamic shapes, metadata, self-validation, exporter fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import cli

from batchstyle.model import export
from batchstyle.model.export import export_graph, target_graph, validate
from batchstyle.model.graph import ExportError, GraphSpec, graph_matches
from batchstyle.model.weights import SOURCES

# A short layer set keeps the export small and quick; the full default set is exercised by test_targets.
SPEC = GraphSpec("random", SOURCES["random"].sha256, ("relu2_2",), ("relu1_1", "relu2_1"), "max", "imagenet-rgb")


@pytest.fixture(scope="module")
def random_weights():
    return SOURCES["random"].load()


@pytest.fixture(scope="module")
def exported(random_weights, tmp_path_factory) -> export.ExportResult:
    return export_graph(random_weights, SPEC, tmp_path_factory.mktemp("export"))


def test_export_validates_at_two_sizes_with_batch_over_one(exported: export.ExportResult) -> None:
    assert {shape[0] for shape in exported.errors} == {1, 2}
    assert len({shape[2:] for shape in exported.errors}) == 2
    for errors in exported.errors.values():
        assert set(errors) == set(SPEC.output_names)
        assert max(errors.values()) <= export.TOLERANCE
    onnx.checker.check_model(str(exported.path), full_check=True)


def test_export_has_dynamic_axes_named_outputs_and_metadata(exported: export.ExportResult) -> None:
    model = onnx.load(str(exported.path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == "pixels"
    assert dims[1].dim_value == 3
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1), "batch, height and width must be symbolic"
    assert [o.name for o in model.graph.output] == SPEC.output_names
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["batchstyle.model"] == "random"
    assert meta["batchstyle.weights_sha256"] == SOURCES["random"].sha256
    assert meta["batchstyle.style_layers"] == "relu1_1,relu2_1"
    assert meta["batchstyle.content_layers"] == "relu2_2"
    assert "H W" in meta["batchstyle.gram_normalisation"]
    assert '"bgr": false' in meta["batchstyle.preprocessing"]
    assert meta["batchstyle.exporter"] == exported.exporter
    assert exported.path.name == SPEC.filename()
    assert "random" in exported.path.name and "c2_2" in exported.path.name and "s1_1-2_1" in exported.path.name


def test_an_exported_graph_takes_plain_pixels_of_any_size(exported: export.ExportResult, random_weights) -> None:
    """Outside batchstyle: RGB in [0, 1], odd sizes, batch 3; same numbers as PyTorch."""
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    pixels = torch.rand(3, 3, 37, 53, generator=torch.Generator().manual_seed(3))
    got = session.run(None, {"pixels": pixels.numpy()})
    with torch.no_grad():
        expected = target_graph(random_weights, SPEC)(pixels)
    for out, ref in zip(got, expected):
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_validation_rejects_a_graph_that_disagrees_with_pytorch(
    exported: export.ExportResult, random_weights, tmp_path: Path
) -> None:
    model = onnx.load(str(exported.path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(weight).copy()
    values *= 1.01  # a 1% change in one conv: well beyond the 1e-4 tolerance
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        validate(tampered, target_graph(random_weights, SPEC), SPEC)


def test_legacy_exporter_also_produces_a_valid_graph(random_weights, tmp_path: Path) -> None:
    result = export_graph(random_weights, SPEC, tmp_path, exporters=("legacy",))
    assert result.exporter == "legacy"
    assert max(max(e.values()) for e in result.errors.values()) <= export.TOLERANCE


def test_falls_back_to_the_next_exporter_and_says_why(random_weights, tmp_path: Path, monkeypatch) -> None:
    def broken(graph, spec, path):  # noqa: ANN001, ANN202 - stands in for an exporter that crashes
        path.write_bytes(b"not onnx")
        raise RuntimeError("exporter crashed")

    monkeypatch.setitem(export.EXPORTERS, "broken", broken)
    result = export_graph(random_weights, SPEC, tmp_path, exporters=("broken", "legacy"))
    assert result.exporter == "legacy"
    assert "exporter crashed" in (result.fallback_reason or "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [SPEC.filename()], "no temp file may stay behind"


def test_every_exporter_failing_is_an_error(random_weights, tmp_path: Path, monkeypatch) -> None:
    def broken(graph, spec, path):  # noqa: ANN001, ANN202
        raise RuntimeError("nope")

    monkeypatch.setitem(export.EXPORTERS, "broken", broken)
    with pytest.raises(ExportError, match="every exporter failed"):
        export_graph(random_weights, SPEC, tmp_path, exporters=("broken",))
    assert not any(tmp_path.iterdir())


def test_graph_matches_only_the_same_weights_and_layers(exported: export.ExportResult) -> None:
    assert graph_matches(exported.path, SPEC)
    assert not graph_matches(exported.path, GraphSpec("random", "sha256:other", SPEC.content_layers, SPEC.style_layers))
    assert not graph_matches(exported.path, GraphSpec("random", SPEC.weights_sha256, ("relu2_1",), SPEC.style_layers))
    assert not graph_matches(exported.path.with_name("missing.onnx"), SPEC)


def test_export_command_prints_errors_per_size(tmp_path: Path) -> None:
    result = cli(
        "export",
        "--model",
        "random",
        "--out",
        tmp_path,
        "--content-layers",
        "relu2_2",
        "--style-layers",
        "relu1_1,relu2_1",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / SPEC.filename()).is_file()
    assert "input 2x3x64x48: max" in result.output and "input 1x3x40x72: max" in result.output


def test_export_command_rejects_a_layer_the_model_lacks(tmp_path: Path) -> None:
    result = cli("export", "--model", "random", "--out", tmp_path, "--style-layers", "relu5_4")
    assert result.exit_code == 2
    assert "relu5_4" in result.output
