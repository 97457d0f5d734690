"""Planning without a network: shards partition a manifest exactly, batches group only rows that can share a
forward pass, the scheduler keeps a style on one worker, and --devices names the slots."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_painting, make_photo, write_manifest

from batchstyle.errors import RunError
from batchstyle.manifest import read_manifest
from batchstyle.model.memory import FIXED_BYTES, batch_that_fits, lbfgs_history, scale_bytes
from batchstyle.model.tiles import MemoryPolicy, choose_tiling
from batchstyle.model.weights import SOURCES
from batchstyle.options import default_values
from batchstyle.run.config import RunConfig
from batchstyle.run.devices import parse_devices
from batchstyle.run.plan import Job, Shard, ShardError, make_batches, parse_shard, plan
from batchstyle.run.resources import (
    STALL_BASE_SECONDS,
    auto_batch_size,
    default_stall_timeout,
    iteration_seconds,
    stall_timeout,
)
from batchstyle.run.scheduler import Scheduler


def _jobs(tmp_path: Path, *rows: str, header: str = "content,style,output") -> tuple[list[Job], dict]:
    folder = tmp_path / "in"
    make_photo(folder / "a.png", 48, 36)
    make_photo(folder / "b.png", 48, 36, seed=2)
    make_photo(folder / "tall.png", 36, 48, seed=3)
    make_painting(folder / "s1.png")
    make_painting(folder / "s2.png", seed=4)
    manifest = read_manifest(write_manifest(tmp_path / "m.csv", header, *rows), default_values() | {"size": 32})
    jobs, failed = plan(manifest, SOURCES["random"])
    assert not failed and not manifest.problems
    return jobs, manifest.image_sizes


# --- shards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_rows_exactly(count: int) -> None:
    rows = range(1, 23)
    owners = {n: [i for i in range(count) if Shard(i, count).holds(n)] for n in rows}
    assert all(len(found) == 1 for found in owners.values())
    sizes = [sum(1 for n in rows if Shard(i, count).holds(n)) for i in range(count)]
    assert max(sizes) - min(sizes) <= 1


def test_appending_rows_never_moves_a_row_to_another_shard() -> None:
    before = {n: next(i for i in range(4) if Shard(i, 4).holds(n)) for n in range(1, 11)}
    after = {n: next(i for i in range(4) if Shard(i, 4).holds(n)) for n in range(1, 31)}
    assert all(after[n] == shard for n, shard in before.items())


def test_parse_shard_forms() -> None:
    assert parse_shard("1/4", {}) == Shard(1, 4)
    assert parse_shard(None, {}) is None
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(3, 4)
    # Arrays numbered from 1 (--array=1-4): the minimum is subtracted.
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_shard(None, env) == Shard(3, 4)
    assert parse_shard("auto/5", {"JOB_COMPLETION_INDEX": "2"}) == Shard(2, 5)
    assert parse_shard("auto/4", env) == Shard(3, 4)
    # JOB_COMPLETION_INDEX alone does not say how many shards there are: not sharded unless asked.
    assert parse_shard(None, {"JOB_COMPLETION_INDEX": "2"}) is None


@pytest.mark.parametrize(
    ("text", "env", "says"),
    [
        ("4/4", {}, "outside 0..3"),
        ("-1/4", {}, "outside 0..3"),
        ("1", {}, "no '/'"),
        ("a/4", {}, "not a whole number"),
        ("1/0", {}, "at least 1"),
        ("1/x", {}, "whole number"),
        ("auto/4", {}, "neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX"),
        ("auto/2", {"JOB_COMPLETION_INDEX": "2"}, "outside 0..1"),
    ],
)
def test_bad_shards_say_the_accepted_forms(text: str, env: dict[str, str], says: str) -> None:
    with pytest.raises(ShardError, match=says) as error:
        parse_shard(text, env)
    assert "--shard I/N" in str(error.value)


# --- batches ---------------------------------------------------------------------------------------------------


def test_batches_hold_only_rows_of_the_same_size_and_settings(tmp_path: Path) -> None:
    jobs, sizes = _jobs(
        tmp_path,
        "in/a.png,in/s1.png,1.png,",
        "in/b.png,in/s2.png,2.png,",
        "in/tall.png,in/s1.png,3.png,",  # another shape
        "in/a.png,in/s1.png,4.png,0.5",  # another style scale
        "in/b.png,in/s1.png,5.png,",
        header="content,style,output,style_scale",
    )
    batches = make_batches(jobs, 4, sizes)
    rows = [sorted(j.row.number for j in b) for b in batches]
    assert sorted(rows) == [[1, 2, 5], [3], [4]]
    # Manifest order of first rows, so the first outputs appear first.
    assert [min(b) for b in rows] == sorted(min(b) for b in rows)
    assert make_batches(jobs, 1, sizes) == [[j] for j in jobs]
    # At most batch_size per batch, and the rows sharing style s1 fill a batch together.
    two = [sorted(j.row.number for j in b) for b in make_batches(jobs, 2, sizes)]
    assert [1, 5] in two and [2] in two


VGG19_DEFAULTS = (("relu4_2",), ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"))


def test_auto_batch_size_is_the_most_images_that_fit_the_budget_untiled() -> None:
    """The model tiling decides by (`memory.scale_bytes`) and the same budget: a batch it picks never tiles."""
    w, h, pairs = 512, 384, lbfgs_history(3 * 512 * 384)
    one = scale_bytes("vgg19", *VGG19_DEFAULTS, w, h, history=pairs) - FIXED_BYTES
    # 512x384 on VGG-19 with 100 L-BFGS pairs: a few hundred MB of activations and ~470 MB of history per image.
    assert 500e6 < one < 2e9
    three = scale_bytes("vgg19", *VGG19_DEFAULTS, w, h, batch=3, history=pairs)
    assert batch_that_fits(three, "vgg19", *VGG19_DEFAULTS, w, h, pairs) == 3
    assert batch_that_fits(three - 1, "vgg19", *VGG19_DEFAULTS, w, h, pairs) == 2
    assert choose_tiling(MemoryPolicy(three), "vgg19", *VGG19_DEFAULTS, w, h, batch=3, history=pairs).tile == 0
    assert batch_that_fits(one // 2, "vgg19", *VGG19_DEFAULTS, w, h, pairs) == 1  # never none
    assert batch_that_fits(80 << 30, "vgg19", *VGG19_DEFAULTS, w, h, pairs) == 8  # beyond 8 a GPU is saturated


def test_auto_batch_size_fits_the_largest_row_in_the_smallest_gpu_slot(tmp_path: Path) -> None:
    rows = ("in/a.png,in/s1.png,a.png,32", "in/b.png,in/s1.png,b.png,64")
    jobs, sizes = _jobs(tmp_path, *rows, header="content,style,output,size")
    arch, s = SOURCES["random"].arch, jobs[1].settings  # the larger row (64x48) decides
    two = scale_bytes(arch, s.content_layers, s.style_layers, 64, 48, batch=2, history=lbfgs_history(3 * 64 * 48))
    budgets = {"cuda:0": 8 << 30, "cuda:1": two}
    assert auto_batch_size(["cuda:0", "cuda:1"], budgets, jobs, sizes, arch) == 2
    assert auto_batch_size(["cuda:0"], budgets, jobs, sizes, arch) == 8
    assert auto_batch_size(["cuda:0", "cpu"], {**budgets, "cpu": 8 << 30}, jobs, sizes, arch) == 1  # a CPU: 1
    assert auto_batch_size(["cuda:2"], budgets, jobs, sizes, arch) == 1  # no budget known


def test_default_stall_timeout_is_minutes_beyond_the_slowest_expected_iteration(tmp_path: Path) -> None:
    jobs, sizes = _jobs(
        tmp_path,
        "in/a.png,in/s1.png,big.png,2048",  # 4:3, so 2048x1536 at its last scale
        "in/tall.png,in/s1.png,small.png,512",
        header="content,style,output,size",
    )
    big, small = (iteration_seconds(job, sizes, "vgg16") for job in jobs)
    # Never below the 2-core CPU's 38.5 s and 1.7 s per iteration (docs/benchmarks.md#cost-per-row), not far above.
    assert 38.5 <= big < 1.2 * 38.5 and 1.7 <= small < big / 10
    assert default_stall_timeout(jobs, sizes, "vgg16") == pytest.approx(STALL_BASE_SECONDS + 3 * big)
    # A batch of 4 iterates 4 times slower; two workers sharing one CPU each twice slower.
    assert default_stall_timeout(jobs, sizes, "vgg16", batch_size=4, sharing=2) == pytest.approx(180 + 24 * big)
    # VGG-19 has more convolutions before relu5_1; a content of unknown size counts as a square.
    assert 1.2 < iteration_seconds(jobs[0], sizes, "vgg19") / big < 1.3
    assert iteration_seconds(jobs[0], {}, "vgg16") == pytest.approx(big * 4 / 3, rel=0.01)
    assert default_stall_timeout([], sizes, "vgg16") == STALL_BASE_SECONDS
    # What a run uses: the default, the timeout asked for, or none at all with 0; CPU slots share the cores.
    assert stall_timeout(RunConfig(), ["cpu"], jobs, sizes, "vgg16", 1) == pytest.approx(180 + 3 * big)
    assert stall_timeout(RunConfig(), ["cpu", "cpu"], jobs, sizes, "vgg16", 1) == pytest.approx(180 + 6 * big)
    assert stall_timeout(RunConfig(stall_timeout=42), ["cpu"], jobs, sizes, "vgg16", 1) == 42
    assert stall_timeout(RunConfig(stall_timeout=0), ["cpu"], jobs, sizes, "vgg16", 1) is None


# --- scheduling ------------------------------------------------------------------------------------------------


def test_scheduler_keeps_a_style_on_the_worker_that_has_it(tmp_path: Path) -> None:
    jobs, sizes = _jobs(
        tmp_path,
        "in/a.png,in/s1.png,1.png",
        "in/b.png,in/s2.png,2.png",
        "in/tall.png,in/s1.png,3.png",
        "in/a.png,in/s2.png,4.png",
        "in/b.png,in/s1.png,5.png",
    )
    scheduler = Scheduler(make_batches(jobs, 1, sizes))
    first = scheduler.next_for(0)
    second = scheduler.next_for(1)
    assert first is not None and second is not None
    assert first[0].row.number == 1
    # Slot 1 takes the other style rather than row 3, which shares slot 0's.
    assert second[0].row.number == 2
    scheduler.finished(0)
    assert [j.row.number for j in scheduler.next_for(0) or []] == [3]
    scheduler.finished(1)
    assert [j.row.number for j in scheduler.next_for(1) or []] == [4]
    scheduler.finished(0)
    assert [j.row.number for j in scheduler.next_for(0) or []] == [5]
    assert scheduler.next_for(1) is None


def test_rows_back_from_a_dead_worker_go_first_and_alone(tmp_path: Path) -> None:
    jobs, sizes = _jobs(tmp_path, "in/a.png,in/s1.png,1.png", "in/b.png,in/s1.png,2.png", "in/a.png,in/s2.png,3.png")
    scheduler = Scheduler(make_batches(jobs, 2, sizes))
    batch = scheduler.next_for(0)
    assert batch is not None and len(batch) == 2
    scheduler.again(batch)
    assert [len(b) for b in scheduler.queue] == [1, 1, 1]
    assert [b[0].row.number for b in scheduler.queue[:2]] == [1, 2]


# --- devices ---------------------------------------------------------------------------------------------------


def test_devices_name_the_worker_slots() -> None:
    assert parse_devices("auto", gpus=0, mps=False) == ["cpu"]
    assert parse_devices("auto", gpus=2, mps=False) == ["cuda:0", "cuda:1"]
    assert parse_devices("all", gpus=3, mps=False) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("cpu,cpu", gpus=0, mps=False) == ["cpu", "cpu"]
    assert parse_devices("cuda:1, cuda", gpus=2, mps=False) == ["cuda:1", "cuda:0"]
    with pytest.raises(RunError, match="sees none"):
        parse_devices("all", gpus=0, mps=False)
    with pytest.raises(RunError, match="sees 2 GPU"):
        parse_devices("cuda:2", gpus=2, mps=False)
    with pytest.raises(RunError, match="not supported"):
        parse_devices("xpu", gpus=0, mps=False)
