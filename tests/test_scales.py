"""Coarse-to-fine scales, warm starts, the kept iterate, intermediate saves, and per-iteration losses in the ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cli, compute_targets, optimize_one, write_manifest

from batchstyle.images import is_temp_file, load_image, read_metadata
from batchstyle.model.optimize import upsample
from batchstyle.model.pixels import image_to_tensor
from batchstyle.model.scales import scale_sizes
from batchstyle.model.weights import SOURCES
from batchstyle.options import default_values, make_settings
from batchstyle.run.ledger import read_records, unpack_history

FAST = ("--model", "random", "--device", "cpu", "-q")


@pytest.mark.parametrize(
    ("min_size", "size", "expected"),
    [
        (256, 512, [256, 362, 512]),
        (256, 1024, [256, 362, 512, 724, 1024]),
        (512, 2048, [512, 724, 1024, 1448, 2048]),
        (300, 512, [300, 392, 512]),
        (0, 512, [512]),
        (512, 512, [512]),
        (600, 512, [512]),
    ],
)
def test_scale_sequence_grows_by_about_sqrt2(min_size: int, size: int, expected: list[int]) -> None:
    sizes = scale_sizes(min_size, size)
    assert sizes == expected
    for a, b in zip(sizes, sizes[1:]):
        assert 1.2 < b / a <= math.sqrt(2) + 0.01


def test_warm_start_keeps_the_image_upsampled() -> None:
    y, x = torch.meshgrid(torch.linspace(0, 1, 12), torch.linspace(0, 1, 16), indexing="ij")
    coarse = torch.stack([x, y, (x * y) ** 0.5])[None] * 0.8 + 0.1  # a smooth picture, as a coarse scale's result is
    fine = upsample(coarse, torch.zeros(1, 3, 24, 32))
    assert fine.shape == (1, 3, 24, 32)
    back = torch.nn.functional.avg_pool2d(fine, 2)
    assert (back - coarse).abs().max() < 0.02, "downsampling the warm start gives back the coarse image"


def test_a_warm_start_is_where_the_optimisation_begins() -> None:
    weights = SOURCES["random"].load()
    settings = make_settings({**default_values(), "iterations": 1, "style_layers": ("relu1_1",)})
    from batchstyle.model.features import VGGFeatures

    model = VGGFeatures(weights.arch, weights.state_dict, weights.preprocess, ("relu1_1", "relu4_2"))
    gen = torch.Generator().manual_seed(1)
    content, style, start = (torch.rand(1, 3, 24, 24, generator=gen) for _ in range(3))
    targets = compute_targets(model, content, [style], [1.0], ("relu4_2",), ("relu1_1",))
    outcome = optimize_one(model, content, targets, settings, start=start)
    # One L-BFGS step from `start` is tiny: the result is near the warm start, not near the content.
    assert (outcome.image - start).abs().mean() < (outcome.image - content).abs().mean() / 4


def test_the_lowest_loss_iterate_is_kept() -> None:
    weights = SOURCES["random"].load()
    from batchstyle.model.features import VGGFeatures

    model = VGGFeatures(weights.arch, weights.state_dict, weights.preprocess, ("relu1_1", "relu2_1", "relu4_2"))
    gen = torch.Generator().manual_seed(2)
    content, style = torch.rand(1, 3, 32, 32, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    values = {**default_values(), "iterations": 12, "style_layers": ("relu1_1", "relu2_1"), "style_weight": 1e4}
    # Adam with a huge step overshoots: its last iterate is far from its best.
    settings = make_settings({**values, "optimizer": "adam", "learning_rate": 0.5})
    targets = compute_targets(model, content, [style], [1.0], ("relu4_2",), ("relu1_1", "relu2_1"))
    outcome = optimize_one(model, content, targets, settings)
    totals = [h.total for h in outcome.history]
    assert outcome.losses.total == pytest.approx(min([*totals, outcome.losses.total]))
    assert outcome.losses.total <= totals[-1]
    assert outcome.kept_iteration == totals.index(min(totals)) or outcome.kept_iteration == settings.iterations


def test_multi_scale_run_records_its_scales_and_one_loss_per_iteration(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,min_size,scale_iterations",
        "in/photo.png,in/painting.png,multi.png,24,5",
        "in/photo.png,in/painting.png,single.png,,",
    )
    result = cli("run", manifest, *FAST, "--size", "48", "--iterations", "3")
    assert result.exit_code == 0, result.output
    records = {r.output: r for r in read_records(tmp_path / "m")[0]}
    multi, single = records["multi.png"], records["single.png"]
    scales = json.loads(multi.params)["scales"]
    assert [max(w, h) for w, h, _ in scales] == [24, 34, 48]
    assert [n for _, _, n in scales] == [5, 3, 3]
    assert multi.iterations == 11 and single.iterations == 3
    assert [len(v) for v in unpack_history(multi.history).values()] == [11, 11, 11]
    assert [len(v) for v in unpack_history(single.history).values()] == [3, 3, 3]
    assert json.loads(read_metadata(tmp_path / "m" / "multi.png")["batchstyle:params"])["scales"] == scales
    assert load_image(tmp_path / "m" / "multi.png").size == (48, 36)
    assert len(multi.targets.split(" | ")) == 3, "each scale has its own targets"


def test_loss_history_is_recorded_and_read_back(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "in/photo.png,in/painting.png")
    # fp32: in bf16 the content's own features differ from its fp32 targets by bf16's rounding (~1e-4).
    assert cli("run", manifest, *FAST, "--size", "32", "--iterations", "6", "--precision", "fp32").exit_code == 0
    [record] = read_records(tmp_path / "m")[0]
    history = unpack_history(record.history)
    assert list(history) == ["content", "style", "tv"] and len(history["content"]) == 6
    assert history["content"][0] < 1e-6, "iteration 0 starts from the content: no content loss yet"
    assert (history["style"] > 0).all() and (history["tv"] > 0).all()
    as_json = json.loads(cli("status", tmp_path / "m", "--json").stdout)["rows"][0]
    assert "history" not in as_json
    assert record.as_dict(history=True)["history"]["style"] == pytest.approx(history["style"].tolist())


def test_save_every_writes_iterates_a_rerun_never_takes_for_outputs(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(tmp_path / "m.csv", "content,style,output", "in/photo.png,in/painting.png,out.png")
    assert cli("run", manifest, *FAST, "--size", "32", "--iterations", "6", "--save-every", "2").exit_code == 0
    folder = tmp_path / "m" / "out.iterates"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["scale0-iter00002.png", "scale0-iter00004.png", "scale0-iter00006.png"]
    assert not any(is_temp_file(p) for p in folder.iterdir())
    first, last = (image_to_tensor(load_image(folder / n)) for n in (names[0], names[-1]))
    assert (first - last).abs().max() > 0, "iterates are snapshots along the way, not copies"
    # Remove the finished output: the rerun must redo the row, not take an iterate for it.
    (tmp_path / "m" / "out.png").unlink()
    again = cli("run", manifest, *FAST, "--size", "32", "--iterations", "6", "--save-every", "2")
    assert again.exit_code == 0 and "done         1" in again.stdout, again.stdout
    assert [r.output for r in read_records(tmp_path / "m")[0]] == ["out.png"]


def test_an_out_of_memory_row_fails_alone_saying_what_to_lower(tmp_path: Path) -> None:
    """A real allocation failure: the run gets a 6 GiB address-space limit and one row far too large for it."""
    import resource
    import subprocess
    import sys

    from conftest import make_painting, make_photo

    make_photo(tmp_path / "in" / "photo.png", 400, 300)
    make_painting(tmp_path / "in" / "painting.png")
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,size",
        "in/photo.png,in/painting.png,big.png,3000",
        "in/photo.png,in/painting.png,small.png,32",
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchstyle",
            "run",
            str(manifest),
            *FAST,
            "--iterations",
            "2",
            "--min-size",
            "0",
            "--targets",
            "torch",
        ],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "row 1: out of memory at size 3000" in proc.stdout and "lower size" in proc.stdout
    assert (tmp_path / "m" / "small.png").is_file() and not (tmp_path / "m" / "big.png").exists()
    records = {r.output: r for r in read_records(tmp_path / "m")[0]}
    assert records["big.png"].status == "failed" and records["small.png"].status == "done"
