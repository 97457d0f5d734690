"""From validated manifest rows to work: keyed jobs, the batches they can share, and a shard's slice of them.

Everything here is decided before any network is loaded, so it is cheap, deterministic and the same in every
process: the parent plans, workers only execute.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchstyle.errors import UnusableInput
from batchstyle.images import output_size
from batchstyle.manifest import Manifest, Row
from batchstyle.model.layout import layer_names
from batchstyle.model.scales import scale_plan
from batchstyle.model.weights import WeightSource, sha256_file
from batchstyle.options import Settings, make_settings
from batchstyle.version import ALGORITHM_VERSION
from batchstyle.video import frame_files, select


@dataclass(frozen=True)
class ClipPart:
    """Which of a clip row's selected frames one job stylizes: positions [first, end) of the selection, of which
    [first, start) are a lead-in (the overlap with the chunk before, blended into it when the clip is assembled)."""

    total: int  # frames in the clip's file or folder (what the selection is taken from)
    first: int
    start: int
    end: int
    chunk: int = 0
    chunks: int = 1

    @property
    def frames(self) -> int:
        return self.end - self.first


@dataclass(frozen=True, slots=True)
class Job:
    row: Row
    settings: Settings
    key: str
    content_digest: str
    style_digests: tuple[str, ...]
    clip: ClipPart | None = None  # a video row (or one chunk of it)

    @property
    def output(self) -> Path:
        return self.row.output

    def scales(self) -> list[tuple[int, int]]:
        """(long side, iterations) per scale, coarse to fine."""
        return list(_scales(self.settings))

    @property
    def total_iterations(self) -> int:
        return sum(iterations for _, iterations in self.scales())


@functools.lru_cache(maxsize=256)
def _scales(settings: Settings) -> tuple[tuple[int, int], ...]:
    """Asked of every job by the stall timeout, the shape profile and the bars: once per distinct settings."""
    return tuple(scale_plan(settings))


def split_clip(job: Job, chunks: int, overlap: int = 0) -> list[Job]:
    """One job per chunk of a clip row's frames, each but the first starting `overlap` frames early; chunks shorter
    than MIN_CHUNK_FRAMES are not worth their lead-in, so a short clip stays whole."""
    assert job.clip is not None
    frames = job.clip.end - job.clip.start
    chunks = max(1, min(chunks, frames // MIN_CHUNK_FRAMES))
    if chunks == 1:
        return [job]
    bounds = [job.clip.start + frames * k // chunks for k in range(chunks + 1)]
    parts = []
    for k in range(chunks):
        first = max(job.clip.start, bounds[k] - (overlap if k else 0))
        parts.append(
            dataclasses.replace(
                job, clip=ClipPart(job.clip.total, first, bounds[k], bounds[k + 1], chunk=k, chunks=chunks)
            )
        )
    return parts


MIN_CHUNK_FRAMES = 8  # a chunk of fewer frames spends too much of its time on its lead-in and first frame


def _file_digest(path: Path, memo: dict[Path, str]) -> str:
    if path not in memo:
        if path.is_dir():  # a folder of frames: its frames' names and bytes, in order
            digest = hashlib.sha256(b"frames:")
            for frame in frame_files(path):
                digest.update(f"{frame.name}:{sha256_file(frame)};".encode())
            memo[path] = digest.hexdigest()
        else:
            memo[path] = sha256_file(path)
    return memo[path]


_PARAMS = "\0params\0"  # stands in for the options' JSON, spliced into the key's material (no path holds a NUL)
_PARAMS_JSON = json.dumps(_PARAMS)


def job_key(
    row: Row,
    settings: Settings,
    source: WeightSource,
    memo: dict[Path, str] | None = None,
    params: dict[tuple[Settings, Path | None], str] | None = None,
) -> str:
    """Hash of everything that determines the output: input bytes, options, weights and algorithm version.

    Paths are left out on purpose (moving a folder must not redo a night's work), file contents are in. `memo` keeps
    the files' digests, `params` the options' JSON, across the rows of one plan: encoding every option for every row
    was most of keying 200,000 rows.
    """
    memo = {} if memo is None else memo
    params = {} if params is None else params
    options = params.get((settings, row.init_image))
    if options is None:
        options = params[settings, row.init_image] = json.dumps(_params(row, settings, memo), sort_keys=True)
    material = {
        "algorithm": ALGORITHM_VERSION,
        "content": _file_digest(row.content, memo),
        "styles": [_file_digest(s, memo) for s in row.styles],
        "blend": list(row.blend),
        "params": _PARAMS,
        "model": {"arch": source.arch, "weights": source.sha256, "preprocess": source.preprocess.name},
        "format": row.output.suffix.lower(),
    }
    text = json.dumps(material, sort_keys=True).replace(_PARAMS_JSON, options, 1)
    return hashlib.sha256(text.encode()).hexdigest()


def _params(row: Row, settings: Settings, memo: dict[Path, str]) -> dict[str, Any]:
    """The options as the key holds them: files by their bytes, never their paths."""
    params = settings.as_dict()
    if row.init_image is not None:
        params["init"] = "file:" + _file_digest(row.init_image, memo)
    params["style_masks"] = ["file:" + _file_digest(Path(mask), memo) for mask in settings.style_masks]
    if settings.content_mask:
        params["content_mask"] = "file:" + _file_digest(Path(settings.content_mask), memo)
    return params


def plan(manifest: Manifest, source: WeightSource) -> tuple[list[Job], dict[int, str]]:
    """Keyed jobs for the manifest's valid rows; rows that cannot work with this model fail here, alone."""
    memo: dict[Path, str] = {}
    params: dict[tuple[Settings, Path | None], str] = {}
    jobs, failed = [], {}
    known = layer_names(source.arch)
    # One Settings per options dict, not per row: rows with the same option cells share one dict (read_manifest),
    # which stays alive with its rows while they are planned, so its id names it.
    shared: dict[int, Settings] = {}
    digests: dict[tuple[Path, ...], tuple[str, ...]] = {}  # the styles' digests, one tuple per set of styles
    for row in manifest.rows:
        settings = shared.get(id(row.values))
        if settings is None:
            settings = shared[id(row.values)] = make_settings(row.values)
        missing = [name for name in (*settings.content_layers, *settings.style_layers) if name not in known]
        if missing:
            failed[row.number] = (
                f"row {row.number} ({row.content.name}): model {source.name} ({source.arch}) has no layer "
                f"{', '.join(missing)}; "
                "use layers it has (VGG-16 stops at relu5_3) or --model vgg19"
            )
            continue
        try:
            key = job_key(row, settings, source, memo, params)
        except OSError as exc:  # an input gone or unreadable since the manifest was checked: this row's failure
            what = Path(exc.filename).name if exc.filename else row.content.name
            failed[row.number] = (
                f"row {row.number}: cannot read {what}: {exc.strerror or exc}; it was there when the manifest was "
                "checked: put it back, or fix the row"
            )
            continue
        clip = None
        if row.content in manifest.clips:
            total = manifest.clips[row.content].frames
            selected = len(select(total, settings.frame_span(), settings.every))
            clip = ClipPart(total, 0, 0, selected)
        style_digests = digests.get(row.styles)
        if style_digests is None:
            style_digests = digests[row.styles] = tuple(memo[p] for p in row.styles)
        jobs.append(Job(row, settings, key, memo[row.content], style_digests, clip))
    return jobs, failed


# -- batches -------------------------------------------------------------------------------------------------------


def batch_key(job: Job, sizes: Mapping[Path, tuple[int, int]]) -> tuple[object, ...] | None:
    """Jobs with equal keys can share one forward/backward: same settings and the same pixel grid at every scale.

    None when the content's size is unknown (it was not checked), which keeps such a job in a batch of its own.
    """
    if job.row.content not in sizes or job.clip is not None:  # a clip's frames go one after another
        return None
    w, h = sizes[job.row.content]
    # Every scale's grid, not just the last: 1000x302 and 1001x303 agree at 512 px but not at 362.
    return (_batch_settings(job.settings), tuple(output_size(w, h, size) for size, _ in _scales(job.settings)))


@functools.lru_cache(maxsize=256)
def _batch_settings(settings: Settings) -> tuple[tuple[str, str], ...]:
    """The settings as a batch key compares them, worked out once per distinct settings rather than per row."""
    return tuple(sorted((k, repr(v)) for k, v in settings.as_dict().items()))


def make_batches(jobs: Sequence[Job], batch_size: int, sizes: Mapping[Path, tuple[int, int]]) -> list[list[Job]]:
    """Groups jobs into batches of at most `batch_size`, rows sharing a style next to each other.

    Batches come in manifest order of their first row, so a run's first outputs are the manifest's first rows;
    within a batch key, rows with the same style fill the same batch, so its targets are computed once and stay
    warm (the scheduler also hands a worker the batches sharing its last style).
    """
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].style_digests, i))
    groups: dict[object, list[Job]] = {}
    for i in order:
        key = batch_key(jobs[i], sizes) if batch_size > 1 else None
        groups.setdefault(key if key is not None else ("alone", i), []).append(jobs[i])
    batches = [group[k : k + batch_size] for group in groups.values() for k in range(0, len(group), batch_size)]
    return sorted(batches, key=lambda b: min(j.row.number for j in b))


# -- shards --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, row_number: int) -> bool:
        """Round-robin by row number: every shard gets an even share, and appending rows to a manifest never moves
        an existing row to another shard (its ledger would lose sight of it)."""
        return (row_number - 1) % self.count == self.index

    @property
    def ledger_suffix(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


class ShardError(UnusableInput):
    """A --shard value (or scheduler variable) that names no slice; the message says the accepted forms."""


def parse_shard(text: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """`I/N` (0-based I), `auto/N`, or nothing; `auto` and nothing read the scheduler's own variables.

    SLURM job arrays give SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (IDs may start at SLURM_ARRAY_TASK_MIN);
    Kubernetes indexed Jobs give JOB_COMPLETION_INDEX but not the count, so there `--shard auto/N` is needed.
    """
    env = os.environ if environ is None else environ
    forms = "use --shard I/N with 0 <= I < N (e.g. --shard 0/4), or --shard auto/N under SLURM or Kubernetes"
    if text is None:
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            return _slurm_shard(env, None, forms)
        return None
    index_text, sep, count_text = text.partition("/")
    if not sep:
        raise ShardError(f"--shard {text!r} has no '/': {forms}")
    try:
        count = int(count_text)
    except ValueError:
        raise ShardError(f"--shard {text!r}: N must be a whole number; {forms}") from None
    if count < 1:
        raise ShardError(f"--shard {text!r}: N must be at least 1; {forms}")
    if index_text.strip().lower() == "auto":
        if "SLURM_ARRAY_TASK_ID" in env:
            return _slurm_shard(env, count, forms)
        if "JOB_COMPLETION_INDEX" in env:
            return _checked(env["JOB_COMPLETION_INDEX"], count, "JOB_COMPLETION_INDEX", forms)
        raise ShardError(f"--shard {text!r}: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set; {forms}")
    return _checked(index_text, count, "--shard", forms)


def _slurm_shard(env: Mapping[str, str], count: int | None, forms: str) -> Shard:
    try:
        task, low = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        total = count if count is not None else int(env["SLURM_ARRAY_TASK_COUNT"])
    except ValueError:
        raise ShardError(f"the SLURM_ARRAY_TASK_* variables are not whole numbers; {forms}") from None
    return _checked(str(task - low), total, "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN", forms)


def _checked(index_text: str, count: int, origin: str, forms: str) -> Shard:
    try:
        index = int(index_text)
    except ValueError:
        raise ShardError(f"{origin} {index_text!r} is not a whole number; {forms}") from None
    if not 0 <= index < count:
        raise ShardError(f"{origin} gives shard {index} of {count}, outside 0..{count - 1}; {forms}")
    return Shard(index, count)
