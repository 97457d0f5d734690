"""The Python facade: `StyleTransfer.stylize` gives a one-row `batchstyle run`'s pixels; `run_manifest` runs one."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, write_manifest
from PIL import Image

from batchstyle import StyleTransfer, run_manifest
from batchstyle.errors import RunError
from batchstyle.images import load_image
from batchstyle.model.graph import graph_spec
from batchstyle.model.stylize import Inputs, Stylizer
from batchstyle.options import OptionError, default_values, make_settings
from batchstyle.run.config import RUN_SETTINGS
from batchstyle.run.ledger import read_records
from batchstyle.run.messages import WorkerSpec
from batchstyle.run.worker import Worker

# Coarse-to-fine on purpose (scales 24, 34, 48): the facade must run the same scale loop a row does.
OPTIONS = {"size": 48, "min_size": 24, "iterations": 3, "scale_iterations": 4, "seed": 3}


# fp32, not auto: `auto` is decided by timing once per cache, and the run below has a cache of its own, so under CPU
# load the two could measure different precisions and differ by far more than rounding.
@pytest.fixture(scope="module")
def transfer(tmp_path_factory: pytest.TempPathFactory) -> StyleTransfer:
    return StyleTransfer(
        model="random", device="cpu", precision="fp32", cache_dir=tmp_path_factory.mktemp("facade-cache")
    )


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_facade_gives_a_one_row_runs_pixels(
    transfer: StyleTransfer, images: dict[str, Path], tmp_path: Path
) -> None:
    manifest = write_manifest(
        tmp_path / "one.csv", "content,style,output", f"{images['photo']},{images['painting']},o.png"
    )
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in OPTIONS.items()]
    # Its own target cache: the run computes its targets (with ONNX Runtime) rather than reading the facade's.
    fixed = ("--model", "random", "--device", "cpu", "--precision", "fp32", "-q")
    result = cli("run", manifest, *fixed, "--cache-dir", tmp_path / "c", *flags)
    assert result.exit_code == 0, result.output
    from_run = _pixels(Image.open(tmp_path / "one" / "o.png"))

    from_python = _pixels(transfer.stylize(images["photo"], [images["painting"]], **OPTIONS))
    assert from_python.shape == from_run.shape == (36, 48, 3)
    assert np.abs(from_python - from_run).max() <= 1
    # And the style did something: the output is not the content.
    assert np.abs(from_python - _pixels(Image.open(images["photo"]))).mean() > 1


def test_stylize_takes_paths_and_pil_images_alike(transfer: StyleTransfer, images: dict[str, Path]) -> None:
    by_path = transfer.stylize(str(images["photo"]), images["painting"], **OPTIONS)
    # A PIL image with alpha is flattened the way a file would be; these have none, so the pixels must match.
    by_image = transfer.stylize(
        Image.open(images["photo"]), [Image.open(images["painting"]).convert("RGBA")], **OPTIONS
    )
    assert by_path.size == by_image.size == (48, 36)
    assert np.abs(_pixels(by_path) - _pixels(by_image)).max() <= 1


def test_stylize_reports_progress_and_refuses_bad_options(transfer: StyleTransfer, images: dict[str, Path]) -> None:
    seen: list[tuple[int, int]] = []
    transfer.stylize(images["photo"], images["painting"], progress=lambda i, n, losses: seen.append((i, n)), **OPTIONS)
    assert seen[0] == (1, 10) and seen[-1] == (10, 10)  # 4 + 3 + 3 iterations over three scales
    with pytest.raises(OptionError, match="did you mean style_weight"):
        transfer.stylize(images["photo"], images["painting"], style_weigth=10)
    with pytest.raises(OptionError, match="at least 16"):
        transfer.stylize(images["photo"], images["painting"], size=8)


def test_run_manifest_returns_the_summary_and_writes_the_ledger(images: dict[str, Path], tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style",
        f"{images['photo']},{images['painting']}",
        f"{images['photo2']},{tmp_path / 'missing.png'}",
    )
    summary = run_manifest(manifest, out=tmp_path / "out", model="random", devices="cpu", size=32, iterations=2)
    assert summary.counts() == {"done": 1, "skipped": 0, "failed": 1}
    assert summary.exit_code == 1 and "missing.png" in summary.failed[2]
    records, _ = read_records(tmp_path / "out")
    assert {r.row: r.status for r in records} == {1: "done", 2: "failed"}
    again = run_manifest(manifest, out=tmp_path / "out", model="random", devices="cpu", size=32, iterations=2)
    assert again.skipped == [1]
    with pytest.raises(TypeError, match="unknown setting"):
        run_manifest(manifest, out=tmp_path / "out", modle="random")


def test_the_facade_returns_16_bit_pixels_when_asked(tmp_path: Path) -> None:
    from conftest import make_painting, make_photo

    content, style = make_photo(tmp_path / "c.png", 32, 24), make_painting(tmp_path / "s.png", 32, 32)
    st = StyleTransfer(model="random", device="cpu", cache_dir=tmp_path / "cache")
    deep = st.stylize(content, style, size=32, iterations=3, min_size=0, bit_depth=16)
    flat = st.stylize(content, style, size=32, iterations=3, min_size=0)
    assert deep.dtype == np.uint16 and deep.shape == (24, 32, 3)
    assert np.abs(deep / 257.0 - np.asarray(flat)).max() <= 0.5 + 1e-6  # the same picture, finer levels


def test_a_worker_and_the_facade_build_the_same_stylizer(images: dict[str, Path], tmp_path: Path) -> None:
    """Both go through `model.build.build_stylizer`: for the same settings, the same stylizer, to the last pixel."""
    cache = tmp_path / "cache"
    facade = StyleTransfer(
        model="random", device="cpu", cache_dir=cache, targets="torch", max_memory="1GiB", tile=0
    ).stylizer
    spec = WorkerSpec(
        model="random",
        cache_dir=cache,
        device="cpu",
        targets="torch",
        precision="auto",  # as the engine hands it to a slot: the worker's factory decides, as the facade's does
        max_memory=1 << 30,
        tile=0,
    )
    worker = Worker.build(spec, warn=lambda text: None).stylizer
    settings = make_settings(default_values() | {"size": 32, "min_size": 0, "iterations": 3})

    def built(stylizer: Stylizer) -> tuple[object, ...]:
        backend = stylizer.targets.backend(graph_spec(stylizer.weights.source, settings))
        store = stylizer.targets
        return (
            stylizer.weights.sha256,
            stylizer.device,
            stylizer.precision,
            stylizer.memory,
            store.precision,
            store.cache is not None,
            type(backend),
        )

    assert built(facade) == built(worker)
    item = Inputs(content=load_image(images["photo"]), styles=[load_image(images["painting"])])
    (a,), (b,) = facade.stylize([item], settings), worker.stylize([item], settings)
    assert torch.equal(a.image, b.image)


def test_the_facade_takes_the_run_settings_it_shares_by_name_and_default() -> None:
    """The table marks which run settings `StyleTransfer` takes; its signature keeps their names and defaults."""
    parameters = inspect.signature(StyleTransfer).parameters
    shared = {name: setting for name, setting in RUN_SETTINGS.items() if setting.facade}
    assert set(shared) == set(parameters) & set(RUN_SETTINGS)
    assert {name: parameters[name].default for name in shared} == {name: s.default for name, s in shared.items()}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("precision", "fp16", "--precision 'fp16': give one of auto, fp32, tf32, bf16"),
        ("max_memory", "1x", "--max-memory '1x': give a size"),
        ("tile", -1, "--tile -1: give a tile size in pixels, or 0 for untiled"),
    ],
)
def test_the_facade_refuses_a_run_setting_as_the_flag_does(name: str, value: object, message: str) -> None:
    with pytest.raises(RunError, match=message):
        StyleTransfer(model="random", device="cpu", **{name: value})
