"""The `batchstyle` command: a thin click layer, each command opening one object and calling one method.

Exit codes: 0 every row done, 1 some row failed, 2 the manifest or the command line is unusable (found before any
work is done). Errors reach the user as click exceptions: every `UnusableInput` the library raises becomes
`Unusable` (exit 2) in one place, the group's `invoke`, and a ledger that cannot be written mid-run (a full disk)
becomes `Failed` (exit 1) there too.

Light commands stay light: `--help`, `check`, `status`, `cache info`, `weights list` and `report` import neither
torch nor onnxruntime (a test holds them to it), so this module imports only torch-free modules at the top and
everything that computes (the engine, the devices, export, the benchmarks) inside the commands that need it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from batchstyle.errors import UnusableInput
from batchstyle.model import weights
from batchstyle.model.numerics import PRECISIONS
from batchstyle.options import OPTIONS, OptionError, make_settings, option_values
from batchstyle.run.config import CACHE_FOLDER_HELP, RUN_SETTINGS, RunConfig
from batchstyle.run.ledger import LedgerWriteError
from batchstyle.version import __version__

if TYPE_CHECKING:
    from batchstyle.manifest import Manifest


class Unusable(click.ClickException):
    """Nothing was run: the input or the command line must change (exit 2)."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class Failed(Unusable):
    """The command ran and did not succeed (exit 1)."""

    exit_code = 1


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UnusableInput as exc:
            raise Unusable(str(exc)) from exc
        except LedgerWriteError as exc:
            # Mid-run (a full disk): finished outputs stay and the same command resumes; one line, no traceback.
            raise Failed(str(exc)) from exc


OUTPUT_FORMATS = ("png", "jpg", "webp", "tif")  # --format of `run`, `check` and `manifest`: one list for all


def _path_or_url(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | str | None:
    """A URL as given (a Path would fold its `//`), anything else as a path."""
    from batchstyle.store import is_url

    return value if value is None or is_url(value) else Path(value)


def _cache_folder(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """Every command but `run` reads and writes its cache here: a URL (a Path would fold it to `s3:/...`, a folder)
    is refused, naming where one is taken."""
    from batchstyle.store import is_url, local_path

    if value is not None and is_url(value) and not value.lower().startswith("file://"):
        raise click.BadParameter(f"{value}: a URL cache is shared by `batchstyle run`; give a folder here")
    return None if value is None else Path(local_path(value)).expanduser()


# Every command's cache folder; for `run` it is also a run setting, whose record gives the help.
CACHE_DIR = click.option("--cache-dir", metavar="DIRECTORY", callback=_cache_folder, help=CACHE_FOLDER_HELP)
# `run`'s: a folder or a store URL, read by the run settings table (`RunConfig.cache_dir`).
RUN_CACHE_DIR = click.option(
    "--cache-dir", metavar="DIRECTORY|URL", callback=_path_or_url, help=RUN_SETTINGS["cache_dir"].help
)


def _option_decorators(func: Any) -> Any:
    """Every option of the table as a flag; unset flags stay None so the table's defaults apply."""
    for name, option in reversed(OPTIONS.items()):
        flag = "--" + name.replace("_", "-")
        default = option.to_text(option.default)
        # Options without a printable default (learning rate, scale iterations, layer weights) say it in their help.
        help_text = f"{option.help} [default: {default}]" if default else option.help
        if isinstance(option.default, bool):
            func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(func)
        else:
            func = click.option(flag, name, default=None, metavar=option.metavar, help=help_text)(func)
    return func


def _run_flags(func: Any) -> Any:
    """Every run setting that has a flag, as its record in `RUN_SETTINGS` says. Click passes the values on as
    written; `RunConfig.from_values` reads and checks them, as it does `run_manifest`'s keywords."""
    for setting in reversed([setting for setting in RUN_SETTINGS.values() if setting.flag]):
        if isinstance(setting.default, bool):
            func = click.option(
                setting.flag_name, setting.name, is_flag=True, default=setting.default, help=setting.help
            )(func)
            continue
        func = click.option(
            setting.flag_name,
            *setting.aliases,
            setting.name,
            type=click.STRING,  # not a type inferred from the default: the table reads the text ("auto" batches)
            default=setting.default,
            show_default=setting.default is not None,
            metavar=setting.metavar,
            help=setting.help,
        )(func)
    return func


def _option_values(given: dict[str, Any]) -> dict[str, Any]:
    try:
        values = option_values(given)
    except OptionError as exc:
        raise click.BadParameter(str(exc), param_hint="--" + (exc.option or "").replace("_", "-")) from None
    # On the command line a path means what the shell means: relative to here, not to the manifest.
    here = lambda path: str(Path(path).expanduser().resolve())  # noqa: E731
    if values["init"] not in ("content", "noise"):
        values["init"] = here(values["init"])
    values["style_masks"] = tuple(here(mask) for mask in values["style_masks"])
    if values["content_mask"]:
        values["content_mask"] = here(values["content_mask"])
    return values


def _split(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A command's parameters -> (option values of the table, everything else)."""
    options = {name: params.pop(name) for name in list(params) if name in OPTIONS}
    return options, params


def _source_flags(func: Any) -> Any:
    """The folder form: rows from files, folders, globs and bucket prefixes rather than a CSV (batchstyle.sources)."""
    func = click.option(
        "--pair",
        is_flag=True,
        help="Match the contents to the styles in sorted order, the first with the first, rather than every content "
        "with every style.",
    )(func)
    func = click.option(
        "--style",
        "styles",
        multiple=True,
        metavar="PATTERN",
        help="Style images, as --content finds them (images only); repeat the flag for more.",
    )(func)
    func = click.option(
        "--content",
        "contents",
        multiple=True,
        metavar="PATTERN",
        help="Content images or videos instead of a MANIFEST: a file, a folder (the images in it), a glob "
        "('photos/**/*.jpg', quoted) or a bucket prefix (s3://bucket/photos/); repeat the flag for more.",
    )(func)
    return func


def _common(func: Any) -> Any:
    func = _source_flags(func)
    func = click.option(
        "--format",
        "fmt",
        default="png",
        show_default=True,
        type=click.Choice(OUTPUT_FORMATS),
        help="Format of outputs whose row gives no output name.",
    )(func)
    func = click.option(
        "--out",
        "out_dir",
        callback=_path_or_url,
        help="Output folder or URL prefix (s3://bucket/out/) [default: beside the manifest, named after it].",
    )(func)
    func = click.argument("manifest_path", metavar="[MANIFEST]", required=False, callback=_path_or_url)(func)
    return _option_decorators(func)


def _serve_address(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    """`8080` or `0.0.0.0:8080` (`[::1]:8080`) -> (host, port); the host defaults to this machine only."""
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{value!r}: give a port (8080), or HOST:PORT (0.0.0.0:8080)")
    return host, int(port)


def _read(
    manifest_path: Path | str | None,
    out_dir: Path | str | None,
    fmt: str,
    options: dict[str, Any],
    found: tuple[tuple[str, ...], tuple[str, ...], bool] = ((), (), False),
    ledger_dir: Path | None = None,
) -> Manifest:
    """MANIFEST's rows, or the folder form's (`found`: --content, --style, --pair)."""
    from batchstyle.manifest import read_manifest

    contents, styles, pair = found
    if manifest_path is None and not (contents or styles):
        raise click.UsageError("give a MANIFEST, or --content and --style (files, folders, globs or bucket prefixes)")
    if manifest_path is None:
        from batchstyle.sources import find_rows

        if out_dir is None:
            raise click.UsageError("--content and --style need --out: the folder for the outputs and their ledger")
        sources = find_rows(contents, styles, pair, fmt, out_dir if isinstance(out_dir, Path) else None)
        return read_manifest(
            sources.label,
            _option_values(options),
            out_dir,
            fmt,
            source_table=sources.table,
            ledger_dir=ledger_dir,
            listed=sources.listed,
        )
    if contents or styles or pair:
        raise click.UsageError("give a MANIFEST or --content and --style, not both")
    return read_manifest(manifest_path, _option_values(options), out_dir, fmt, ledger_dir=ledger_dir)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="batchstyle")
def main() -> None:
    """Batch neural style transfer (Gatys, Ecker & Bethge) over CSV manifests."""


@main.command()
@_common
def check(
    manifest_path: Path | None,
    out_dir: Path | None,
    fmt: str,
    contents: tuple[str, ...],
    styles: tuple[str, ...],
    pair: bool,
    **options: Any,
) -> None:
    """Validate MANIFEST (or the rows --content and --style find) without loading the network: every problem, by
    row."""
    manifest = _read(manifest_path, out_dir, fmt, options, (contents, styles, pair))
    for problem in manifest.problems:
        click.echo(str(problem))
    bad = len(manifest.problem_rows())
    click.echo(
        f"{manifest.total_rows} rows: {manifest.total_rows - bad} ok, {bad} with problems; outputs to "
        f"{manifest.out_dir}"
    )
    click.get_current_context().exit(1 if manifest.problems else 0)


@main.command()
@_common
@_run_flags
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; only the summary and errors.")
@click.option(
    "--log-json",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append machine-readable JSON-lines events to FILE.",
)
@click.option("--report", "make_report", is_flag=True, help="Write contact-sheet.png and report.html at the end.")
@click.option(
    "--serve",
    "serve_at",
    metavar="[HOST:]PORT",
    callback=_serve_address,
    help="Serve the live page and /metrics (as `batchstyle serve`) while the run lasts, on 127.0.0.1 unless "
    "HOST is given; PORT 0: any free port. The URL is printed once.",
)
@RUN_CACHE_DIR
def run(
    manifest_path: Path | None,
    out_dir: Path | None,
    fmt: str,
    contents: tuple[str, ...],
    styles: tuple[str, ...],
    pair: bool,
    quiet: bool,
    log_json: Path | None,
    make_report: bool,
    serve_at: tuple[str, int] | None,
    **params: Any,
) -> None:
    """Stylize every row of MANIFEST, or every --content with every --style (`--content 'photos/*.jpg' --style
    paintings/ --out night/`), skipping rows already done: rerun it and only new photos are done."""
    from batchstyle.run import engine
    from batchstyle.run.progress import Fanout, JsonLog, Silent, Terminal
    from batchstyle.store import scrub

    options, settings = _split(params)
    config = RunConfig.from_values({**settings, "argv": sys.argv})
    manifest = _read(manifest_path, out_dir, fmt, options, (contents, styles, pair), config.ledger)
    if manifest.out_url is None and config.ledger is not None:
        raise Unusable("--ledger moves the ledger of a run whose --out is a URL; a folder's ledger stays in it")
    sinks: list[Any] = [] if quiet else [Terminal()]
    try:
        log_handle = open(log_json, "a", encoding="utf-8") if log_json else None  # noqa: SIM115
    except OSError as exc:
        raise Unusable(f"cannot write the --log-json file {log_json}: {exc.strerror}") from None
    if log_handle:
        sinks.append(JsonLog(log_handle))
    server = None
    if serve_at is not None:
        from batchstyle.serve import start_server

        try:
            server = start_server(manifest.out_dir, *serve_at, thread=True)
        except UnusableInput:
            if log_handle:
                log_handle.close()
            raise
        click.echo(f"live page: {server.url}  metrics: {server.url}metrics", err=True)
    try:
        summary = engine.run(manifest, config, Fanout(*sinks) if sinks else Silent())
    except KeyboardInterrupt as exc:
        click.echo("\ninterrupted: finished rows are kept; run the same command again to resume", err=True)
        raise click.exceptions.Exit(128 + getattr(exc, "signum", 2)) from None
    finally:
        if log_handle:
            log_handle.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    counts = summary.counts()
    click.echo("\n" + "\n".join(f"{name:<8}{count:>6}" for name, count in counts.items()))
    if summary.stopped:
        click.echo("stopped before the end: run the same command again to do the rest", err=True)
    for number, error in sorted(summary.failed.items()):
        click.echo(f"  row {number}: {error}")
    where = f"{scrub(manifest.out_url)}  (ledger in {summary.out_dir})" if manifest.out_url else summary.out_dir
    click.echo(f"outputs: {where}  (model {summary.model})")
    if make_report:
        from batchstyle.report import write_report

        files = write_report(summary.out_dir, out_url=manifest.out_url)
        click.echo(
            f"report: {files.html_url or files.html}  contact sheet: {files.contact_sheet_url or files.contact_sheet}"
        )
    raise click.exceptions.Exit(summary.exit_code)


@main.command("manifest")
@_source_flags
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The output folder the CSV will be run with: files inside it are outputs, not inputs.",
)
@click.option(
    "--format",
    "fmt",
    default="png",
    show_default=True,
    type=click.Choice(OUTPUT_FORMATS),
    help="Format of the outputs named (videos keep their container).",
)
@click.option(
    "--output",
    "-o",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the CSV here, its paths relative to its folder [default: standard output, with absolute paths].",
)
@_option_decorators
def manifest_command(
    contents: tuple[str, ...],
    styles: tuple[str, ...],
    pair: bool,
    out_dir: Path | None,
    fmt: str,
    csv_path: Path | None,
    **options: Any,
) -> None:
    """Write the CSV that `batchstyle run --content ... --style ...` runs, to edit it or run it later: one row per
    content and style, each option flag given a column."""
    from batchstyle.sources import find_rows, manifest_text

    sources = find_rows(contents, styles, pair, fmt, out_dir)
    values = _option_values(options)
    given = {name: values[name] for name, raw in options.items() if raw is not None}
    text = manifest_text(sources, given, lambda name, value: OPTIONS[name].to_text(value), csv_path and csv_path.parent)
    if csv_path is None:
        click.echo(text, nl=False)
        return
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise Unusable(f"cannot write {csv_path}: {exc.strerror}") from None
    click.echo(f"wrote {csv_path}: {len(sources.table[1])} rows")


def _out_dir(target: Path) -> Path:
    """An output folder, or a manifest standing for its default output folder."""
    from batchstyle.manifest import default_out_dir

    return default_out_dir(target) if target.suffix.lower() == ".csv" else target


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the ledger as JSON.")
@click.option("--all", "all_rows", is_flag=True, help="Include rows no longer in the latest run's manifest.")
def status(target: Path, as_json: bool, all_rows: bool) -> None:
    """Summarise the ledger of an output folder (or of a manifest's default output folder)."""
    from batchstyle.run import ledger

    out_dir = _out_dir(target)
    try:
        records, last_run = ledger.read_records(out_dir, all_rows)
    except FileNotFoundError as exc:
        raise Unusable(str(exc)) from None
    counts = ledger.summarise(records)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "out_dir": str(out_dir),
                    "counts": counts,
                    "last_run": last_run,
                    "rows": [r.as_dict() for r in records],
                },
                indent=2,
            )
        )
        return
    click.echo(f"{out_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for r in records:
        losses = f"loss {r.total_loss:.4g}" if r.total_loss is not None else ""
        if r.frames:  # a clip: one row, with its frames finished so far
            losses = f"{r.frames_done or 0}/{r.frames} frames  {losses}".rstrip()
        seconds = f"{r.seconds:.1f}s" if r.seconds is not None else ""
        line = f"  row {r.row if r.row is not None else '?':>4}  {r.status:<8} {r.output:<40} {seconds:>8} {losses}"
        click.echo(line.rstrip())
        if r.error:
            click.echo(f"        {r.error}")


@main.command()
@click.argument("target", metavar="OUT")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to serve on; 0: any free port (the URL printed says which).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 lets every machine that reaches this one "
    "see the page and the outputs' thumbnails.",
)
def serve(target: str, port: int, host: str) -> None:
    """Serve a live page of OUT's rows (an output folder, a manifest standing for its default folder, or a URL --out
    of a run on this machine) and /metrics for Prometheus, read from its ledger, until Ctrl-C."""
    from batchstyle.run.ledger import ledger_files
    from batchstyle.serve import start_server
    from batchstyle.store import is_url, work_dir

    out_dir = work_dir(target) if is_url(target) else _out_dir(Path(target))
    server = start_server(out_dir, host, port)
    waiting = "" if ledger_files(out_dir) else " (no ledger there yet: the page waits for a run to start)"
    click.echo(f"serving {out_dir.resolve()}{waiting}", err=True)
    click.echo(f"live page: {server.url}  metrics: {server.url}metrics  (Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@main.group("weights")
def weights_group() -> None:
    """The VGG weight sources."""


@weights_group.command("list")
@CACHE_DIR
def weights_list(cache_dir: Path | None) -> None:
    """Every weight source: architecture, preprocessing, whether cached, origin and licence."""
    for source in weights.SOURCES.values():
        cached = "cached" if source.is_cached(cache_dir) else "not cached"
        click.echo(f"{source.name:<10} {source.arch:<6} {source.preprocess.name:<13} {cached:<11} {source.description}")
        click.echo(f"{'':<10} from {source.origin}; licence: {source.licence}")


@weights_group.command("fetch")
@click.argument("name")
@CACHE_DIR
def weights_fetch(name: str, cache_dir: Path | None) -> None:
    """Download and verify weights NAME into the cache."""
    if name not in weights.SOURCES:
        raise click.BadParameter(f"use one of {', '.join(weights.SOURCES)}", param_hint="NAME")
    try:
        weights.SOURCES[name].fetch(cache_dir)
    except weights.WeightsError as exc:
        raise Failed(str(exc)) from None
    click.echo(f"{name}: cached")


@main.group()
def bench() -> None:
    """Benchmarks that print figures measured on this machine."""


@bench.command("iteration")
@click.option("--model", default="vgg16-hed", show_default=True)
@click.option("--sizes", default="256,512", show_default=True, help="Long sides to measure, comma-separated.")
@click.option("--batch", "batches", default="1,4", show_default=True, help="Batch sizes to measure, comma-separated.")
@click.option("--optimizer", default="lbfgs", show_default=True, type=click.Choice(["lbfgs", "adam"]))
@click.option("--iterations", default=10, show_default=True, help="Timed iterations per size (median).")
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--precisions",
    "--precision",
    "precisions",
    default="auto",
    show_default=True,
    metavar="LIST",
    help=f"Precisions to measure, comma-separated ({', '.join(PRECISIONS)}); auto: fp32 and bf16 on a CPU, fp32, "
    "tf32 and bf16 on CUDA, fp32 on an Apple GPU. fp32 is always measured: its floor is the yardstick.",
)
@CACHE_DIR
def bench_iteration(
    model: str,
    sizes: str,
    batches: str,
    optimizer: str,
    iterations: int,
    device: str,
    precisions: str,
    cache_dir: Path | None,
) -> None:
    """Seconds per optimisation iteration beside the floor (one bare forward+backward of the same trunk, same size,
    same batch, same precision) and beside the fp32 floor, and per image."""
    from batchstyle.bench import format_iteration, iteration_figures, iteration_header, precisions_to_measure
    from batchstyle.model.precision import decide
    from batchstyle.run import devices

    source, _ = weights.resolve(model, cache_dir)
    loaded = source.load(cache_dir)
    dev = devices.pick_device(device)
    try:
        measured = precisions_to_measure(dev, precisions)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--precisions") from None
    auto = decide(loaded, dev, "auto", cache_dir or weights.default_cache_dir())
    click.echo(
        f"model {source.name} ({source.arch}), device {dev}, {torch_threads()} threads, {optimizer}; "
        f"--precision auto: {auto.describe()}"
    )
    click.echo(iteration_header())
    for long_side in (int(s) for s in sizes.split(",")):
        for batch in (int(b) for b in batches.split(",")):
            fp32_floor = None
            for precision in measured:
                fig = iteration_figures(loaded, long_side, optimizer, iterations, str(dev), batch, precision)
                fp32_floor = fp32_floor or fig.floor_seconds
                click.echo(format_iteration(fig, fp32_floor))


@bench.command("throughput")
@click.option("--model", default="vgg16-hed", show_default=True)
@click.option("--rows", default=8, show_default=True, help="Rows of the generated manifest.")
@click.option("--size", default=256, show_default=True, help="Long side of every row.")
@click.option("--iterations", default=50, show_default=True, help="Iterations per row.")
@click.option("--workers", default="1,2", show_default=True, help="Worker counts to compare, comma-separated.")
@click.option("--device", default="cpu", show_default=True, help="Device each worker runs on (cpu or cuda:N).")
@click.option(
    "--precisions",
    default="auto",
    show_default=True,
    help="--precision of each run, comma-separated, run in turn for each worker count (e.g. auto,fp32).",
)
@CACHE_DIR
def bench_throughput(
    model: str,
    rows: int,
    size: int,
    iterations: int,
    workers: str,
    device: str,
    precisions: str,
    cache_dir: Path | None,
) -> None:
    """Images per hour of a whole run (start-up included) with 1, 2, ... worker processes on one device, and
    seconds per iteration of its rows, in each precision asked for: `--precisions auto,fp32` shows whether the
    precision `auto` measured is faster than fp32 on this machine, side by side."""
    import torch

    from batchstyle.bench import throughput_figures
    from batchstyle.model.precision import decide

    cache = cache_dir or weights.default_cache_dir()
    source, _ = weights.resolve(model, cache)
    asked = [name.strip() for name in precisions.split(",") if name.strip()]
    if "auto" in asked:  # decided before any timed run, so no run pays for the measurement
        decision = decide(source.load(cache), torch.device(device), "auto", cache)
        click.echo(f"--precision auto: {decision.describe()}")
    click.echo(f"model {source.name}, {rows} rows at {size} px, {iterations} iterations each, device {device}")
    click.echo(f"{'workers':>7} {'precision':>9} {'ran in':>7} {'seconds':>9} {'images/hour':>12} {'s/iteration':>11}")
    for count in (int(w) for w in workers.split(",")):
        for precision in asked:
            fig = throughput_figures(source.name, cache, count, rows, size, iterations, device, precision=precision)
            click.echo(
                f"{count:>7} {precision:>9} {','.join(fig.precisions):>7} {fig.seconds:>9.1f} "
                f"{fig.images_per_hour:>12.1f} {fig.seconds_per_iteration:>11.3f}"
            )


@bench.command("plan")
@click.option("--rows", default=200_000, show_default=True, help="Rows of the generated manifest.")
@click.option("--model", default="random", show_default=True, help="Model the rows are planned for.")
@CACHE_DIR
def bench_plan(rows: int, model: str, cache_dir: Path | None) -> None:
    """Seconds and peak memory of reading a large manifest and of planning it (keys, ledger rows, batches) up to
    the first row handed out; no row is optimised. The manifest and its output folder go to a temporary folder."""
    import tempfile

    from batchstyle.bench_plan import plan_figures

    with tempfile.TemporaryDirectory(prefix="batchstyle-bench-plan-") as folder:
        fig = plan_figures(rows, Path(folder), model, cache_dir)
    torch = "imported" if fig.torch_imported else "not imported"
    click.echo(
        f"{fig.rows} rows (process at {fig.start_mb:.0f} MB before reading: interpreter, batchstyle; torch {torch})"
    )
    click.echo(f"{'phase':<8} {'seconds':>8} {'peak RSS MB':>12} {'over start':>11}")
    phases = (("read", fig.read_seconds, fig.read_peak_mb), ("plan", fig.plan_seconds, fig.plan_peak_mb))
    for phase, seconds, peak in phases:
        click.echo(f"{phase:<8} {seconds:>8.1f} {peak:>12.0f} {peak - fig.start_mb:>11.0f}")


@bench.command("store")
@click.argument("url", metavar="URL")
@click.option("--rows", type=click.IntRange(min=1), default=4, show_default=True, help="Rows of each timed run.")
@click.option("--size", type=click.IntRange(min=16), default=256, show_default=True, help="Long side of the rows.")
@click.option("--iterations", type=click.IntRange(min=1), default=10, show_default=True, help="Iterations a row.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs of each kind.")
@click.option(
    "--plan-rows",
    type=click.IntRange(min=0),
    default=10_000,
    show_default=True,
    help="Objects listed and planned from the store (0: skip that part).",
)
@click.option("--model", default="random", show_default=True, help="Model the rows run with.")
@CACHE_DIR
def bench_store(
    url: str, rows: int, size: int, iterations: int, repeats: int, plan_rows: int, model: str, cache_dir: Path | None
) -> None:
    """Seconds per row of whole runs with inputs and outputs in a store (URL, a prefix it may write under) against
    the same rows from local files, and the seconds to list, read and plan --plan-rows objects from a prefix. It
    starts no server: the store's client finds it as a run would (AWS_ENDPOINT_URL, credentials)."""
    from batchstyle.bench_store import GOAL, listing_figures, store_figures
    from batchstyle.store import StoreError, check_writable, is_url, scrub

    if not is_url(url) or url.lower().startswith(("file://", "http://", "https://")):
        raise Unusable(f"{url}: give a store's URL prefix it may write under, e.g. s3://bucket/bench/")
    try:
        check_writable(url)
    except StoreError as exc:
        raise Unusable(str(exc)) from None
    click.echo(f"store {scrub(url)}; {rows} rows at {size} px, {iterations} iterations, model {model}")
    fig = store_figures(url, rows, size, iterations, repeats, model, cache_dir, lambda text: click.echo(f"  {text}"))
    click.echo(f"{'inputs and outputs':<20} {'s/row (median)':>14} {'runs (s)':>24}")
    for name, per_row, runs in (
        ("local files", fig.local_per_row, fig.local_seconds),
        ("store", fig.store_per_row, fig.store_seconds),
    ):
        click.echo(f"{name:<20} {per_row:>14.3f} {' '.join(f'{s:.2f}' for s in runs):>24}")
    verdict = "within" if fig.overhead <= GOAL else "over"
    click.echo(f"store over local: {fig.overhead:+.1%} per row ({verdict} the {GOAL:.0%} goal)")
    if plan_rows:
        listing = listing_figures(url, plan_rows, model, cache_dir)
        click.echo(
            f"{listing.rows} objects from a bucket listing: listed {listing.list_seconds:.1f} s, read (each staged) "
            f"{listing.read_seconds:.1f} s, planned {listing.plan_seconds:.1f} s, "
            f"{listing.list_seconds + listing.read_seconds + listing.plan_seconds:.1f} s to the first row"
        )


@bench.command("device")
@click.option(
    "--devices",
    "--device",
    "devices_text",
    default="auto",
    show_default=True,
    help="The device to measure (the first named); whole runs use every one named (auto: every GPU).",
)
@click.option(
    "--model",
    default="vgg19",
    show_default=True,
    help="Weights; VGG-19 falls back to random-vgg19 (same cost) where its weights cannot be fetched.",
)
@click.option(
    "--size", type=click.IntRange(min=16), default=None, help="Long side [default: 512 on a GPU, 128 on a CPU]."
)
@click.option(
    "--iterations",
    type=click.IntRange(min=2),
    default=None,
    help="Iterations of the one-image figure [default: 500 on a GPU, 20 on a CPU]; whole runs take a fifth a scale.",
)
@click.option("--batch", "batches", default=None, help="Batch sizes of the iteration table [default: 1,4; 1 on a CPU].")
@click.option("--timed", type=click.IntRange(min=1), default=None, help="Iterations timed per line [default: 10; 3].")
@click.option(
    "--rows", type=click.IntRange(min=1), default=None, help="Rows of the generated manifest [default: 4 a GPU]."
)
@click.option(
    "--peak-tflops",
    type=float,
    default=None,
    help="The device's peak TFLOP/s at the precision auto runs, where the built-in table does not know the device.",
)
@click.option(
    "--budget",
    type=float,
    default=450.0,
    show_default=True,
    help="Seconds; sections not started by then are skipped, saying so (TensorRT needs 150 left).",
)
@CACHE_DIR
def bench_device(
    devices_text: str,
    model: str,
    size: int | None,
    iterations: int | None,
    batches: str | None,
    timed: int | None,
    rows: int | None,
    peak_tflops: float | None,
    budget: float,
    cache_dir: Path | None,
) -> None:
    """Every figure of one device in one run: seconds per iteration in fp32, TF32 and bf16 beside the floors, one
    whole image and its share of the device's peak, images per hour at batch 1 and auto, cudnn.benchmark, whole runs
    on one and on every device, and targets through ONNX Runtime (CUDA, TensorRT fp32/fp16) against torch. On a CPU
    it prints what makes sense there and says what it skipped and why."""
    from batchstyle.bench import DeviceBenchOptions, device_report
    from batchstyle.run import devices

    options = DeviceBenchOptions(
        slots=list(dict.fromkeys(devices.parse_devices(devices_text))),
        model=model,
        cache_dir=cache_dir or weights.default_cache_dir(),
        size=size,
        iterations=iterations,
        batches=tuple(int(b) for b in batches.split(",")) if batches else None,
        timed=timed,
        rows=rows,
        peak_tflops=peak_tflops,
        budget=budget,
    )
    skipped = device_report(options, click.echo)
    if skipped:
        click.echo(f"\nskipped {len(skipped)}:\n" + "\n".join(f"  {line}" for line in skipped))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@bench.command("targets")
@click.option("--model", default="vgg16-hed", show_default=True)
@click.option("--sizes", default="256,512", show_default=True, help="Long sides to measure, comma-separated.")
@click.option("--rows", default=8, show_default=True, help="Rows of the repeated-style manifest.")
@click.option("--styles", default=2, show_default=True, help="Distinct styles those rows share.")
@click.option("--device", default="auto", show_default=True)
@CACHE_DIR
def bench_targets(model: str, sizes: str, rows: int, styles: int, device: str, cache_dir: Path | None) -> None:
    """Seconds for one row's targets with ONNX Runtime and with torch, and what the target cache saves."""
    from batchstyle.bench import cache_figures, target_figures
    from batchstyle.run import devices

    source, _ = weights.resolve(model, cache_dir)
    loaded = source.load(cache_dir)
    dev = str(devices.pick_device(device))
    cache = cache_dir or weights.default_cache_dir()
    click.echo(f"model {source.name}, device {dev}, {torch_threads()} threads; one row = content + one style")
    click.echo(f"{'size':>10} {'torch s':>9} {'ort s':>9} {'ort/torch':>9}  provider")
    for long_side in (int(s) for s in sizes.split(",")):
        fig = target_figures(loaded, long_side, cache, device=dev)
        w, h = fig.size
        ort = (
            f"{fig.ort_seconds:>9.4f} {fig.ort_seconds / fig.torch_seconds:>9.3f}"
            if fig.ort_seconds
            else "    (no onnxruntime)"
        )
        click.echo(f"{f'{w}x{h}':>10} {fig.torch_seconds:>9.4f} {ort}  {fig.ort_provider or ''}")
    long_side = int(sizes.split(",")[0])
    cf = cache_figures(loaded, long_side, rows, styles, device=dev)
    click.echo(
        f"\n{rows} rows sharing {styles} styles at {long_side} px, targets only:\n"
        f"  no cache:            {cf.uncached_seconds:8.3f} s ({2 * rows} computations)\n"
        f"  first run, cached:   {cf.first_run_seconds:8.3f} s ({cf.computed_first} computations)\n"
        f"  rerun, all cached:   {cf.rerun_seconds:8.3f} s ({cf.computed_rerun} computations)\n"
        f"  saved by the cache:  {cf.uncached_seconds - cf.first_run_seconds:8.3f} s on the first run, "
        f"{cf.uncached_seconds - cf.rerun_seconds:.3f} s on a rerun"
    )


@main.command("export")
@click.option("--model", default="auto", show_default=True, help="Weights to export (see `batchstyle weights list`).")
@click.option("--out", "out_dir", default="export", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--content-layers", default=None, metavar="LAYERS", help="[default: relu4_2]")
@click.option("--style-layers", default=None, metavar="LAYERS", help="[default: relu1_1,...,relu5_1]")
@click.option("--pooling", default="max", show_default=True, type=click.Choice(["max", "avg"]))
@click.option(
    "--exporter",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "dynamo", "legacy"]),
    help="auto tries torch.onnx's dynamo exporter, then the legacy TorchScript one.",
)
@CACHE_DIR
def export_command(
    model: str,
    out_dir: Path,
    content_layers: str | None,
    style_layers: str | None,
    pooling: str,
    exporter: str,
    cache_dir: Path | None,
) -> None:
    """Export the target graph (features + Gram matrices, pixels in) to ONNX and validate it against PyTorch."""
    from batchstyle.model.export import export_graph
    from batchstyle.model.graph import ExportError, graph_spec
    from batchstyle.model.layout import layer_names

    values = _option_values({"content_layers": content_layers, "style_layers": style_layers, "pooling": pooling})
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise Unusable("validating an export needs onnxruntime: pip install 'batchstyle[cpu]'") from None
    try:
        source, reason = weights.resolve(model, cache_dir)
        loaded = source.load(cache_dir)
        spec = graph_spec(source, make_settings(values))
        missing = [n for n in (*spec.content_layers, *spec.style_layers) if n not in layer_names(source.arch)]
        if missing:
            raise click.BadParameter(f"{source.arch} has no layer {', '.join(missing)}", param_hint="layers")
        exporters = ("dynamo", "legacy") if exporter == "auto" else (exporter,)
        result = export_graph(loaded, spec, out_dir, exporters, log=lambda text: click.echo(text, err=True))
    except (weights.WeightsError, ExportError) as exc:
        raise Failed(str(exc)) from None
    click.echo(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB) with the {result.exporter} exporter")
    if result.fallback_reason:
        click.echo(f"  (fell back: {result.fallback_reason[:300]})")
    click.echo("ONNX Runtime vs PyTorch, worst relative error per output:")
    for shape, errors in result.errors.items():
        worst = max(errors.values())
        detail = ", ".join(f"{name} {err:.1e}" for name, err in errors.items())
        click.echo(f"  input {'x'.join(map(str, shape))}: max {worst:.1e} ({detail})")


@main.group()
def cache() -> None:
    """The target cache (content features and style Grams, content-addressed)."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True)
@CACHE_DIR
def cache_info(as_json: bool, cache_dir: Path | None) -> None:
    """Entries, size and hit counts."""
    from batchstyle.model.cache import TargetCache

    store = TargetCache(cache_dir or weights.default_cache_dir())
    info = store.info()
    store.close()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: {info['entries']} entries, {info['bytes'] / 1e6:.1f} MB, {info['hits']} hits")
    for role, r in sorted(info["by_role"].items()):
        click.echo(f"  {role:<8} {r['entries']:>6} entries {r['bytes'] / 1e6:>9.1f} MB {r['hits']:>7} hits")


@cache.command("clear")
@CACHE_DIR
def cache_clear(cache_dir: Path | None) -> None:
    """Delete every cached target (weights and exported graphs stay)."""
    from batchstyle.model.cache import TargetCache

    store = TargetCache(cache_dir or weights.default_cache_dir())
    removed = store.clear()
    store.close()
    click.echo(f"removed {removed} cached targets")


@bench.command("memory")
@click.option("--model", default="vgg16-hed", show_default=True)
@click.option("--sizes", default="512,1024,2048", show_default=True, help="Output long sides, comma-separated.")
@click.option("--min-size", default=256, show_default=True, help="First scale of the multi-scale runs.")
@click.option(
    "--iterations",
    default=3,
    show_default=True,
    help="Iterations at coarser scales; the final scale runs until the L-BFGS history is full.",
)
@click.option(
    "--final-iterations",
    type=click.IntRange(min=0),
    default=0,
    help="Iterations at the final scale instead (1 is enough for the largest sizes).",
)
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="The budget auto rows are fitted in, as for run [default: as run's, 60% of the available memory].",
)
@click.option(
    "--tilings",
    default="auto",
    show_default=True,
    help="Rows per size, comma-separated: auto (as the budget chooses, as run does), untiled (skipped where the "
    "memory model says it would not fit this machine), or a tile size in px.",
)
@CACHE_DIR
def bench_memory(
    model: str,
    sizes: str,
    min_size: int,
    iterations: int,
    final_iterations: int,
    max_memory: str | None,
    tilings: str,
    cache_dir: Path | None,
) -> None:
    """Peak memory (CPU) and seconds per iteration per output size and tiling, single-scale and coarse-to-fine, each
    in a fresh process."""
    import torch

    from batchstyle.bench import memory_figures, untiled_bytes
    from batchstyle.model.memory import available_memory
    from batchstyle.model.tiles import MemoryPolicy, default_budget

    kinds = [k.strip() for k in tilings.split(",") if k.strip()]
    for kind in kinds:
        if kind not in ("auto", "untiled") and not kind.isdigit():
            raise click.BadParameter(f"{kind!r} is not auto, untiled or a tile size in px", param_hint="--tilings")
    budget = RUN_SETTINGS["max_memory"].read(max_memory) if max_memory else default_budget(torch.device("cpu"))
    cache = cache_dir or weights.default_cache_dir()
    final = f"{final_iterations} iterations" if final_iterations else "until its L-BFGS history is full"
    click.echo(
        f"model {model}, CPU, {torch_threads()} threads, final scale run {final}, auto rows' budget "
        f"{budget / 2**30:.1f} GiB"
    )
    click.echo(
        f"{'size':>6} {'scales':<28} {'final scale':<30} {'peak MiB':>9} {'working MiB':>11} {'predicted':>9} "
        f"{'MiB/Mpx':>8} {'s/it (last)':>11}"
    )
    for long_side in (int(s) for s in sizes.split(",")):
        for kind in kinds:
            tile = None if kind == "auto" else 0 if kind == "untiled" else int(kind)
            need = untiled_bytes(model, cache, long_side)
            if kind == "untiled" and need > 0.9 * available_memory():
                click.echo(f"{long_side:>6} untiled would need {need / 2**30:.1f} GiB, more than is free here: skipped")
                continue
            memory = MemoryPolicy(budget if kind == "auto" else None, tile)
            for min_ in dict.fromkeys((0, min_size)):  # --min-size 0 measures single-scale only
                fig = memory_figures(model, cache, long_side, min_, iterations, memory, final_iterations)
                mpx = long_side * (long_side * 3 // 4) / 1e6
                scales = ",".join(map(str, fig.scales))
                click.echo(
                    f"{long_side:>6} {scales:<28} {fig.tiling:<30} {fig.peak_mib:>9.0f} {fig.working_mib:>11.0f} "
                    f"{fig.predicted_mib:>9.0f} {fig.working_mib / mpx:>8.0f} {fig.seconds_per_iteration:>11.2f}"
                )


def _sample_pair(content: Path | None, style: Path | None, flag: str) -> tuple[Path, Path]:
    """A benchmark's content (or clip, given as `flag`) and style, by default the cat and the strokes of the
    checkout's samples; an installed package has no samples, and then both must be given."""
    from batchstyle.panel import SAMPLES

    content, style = content or SAMPLES / "chelsea.jpg", style or SAMPLES / "strokes.png"
    if not (content.exists() and style.is_file()):
        raise click.UsageError(f"no sample images here: pass {flag} and --style")
    return content, style


@bench.command("quality")
@click.option("--model", default="vgg16-hed", show_default=True)
@click.option(
    "--content",
    "content_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="[default: manifests/samples/chelsea.jpg in a checkout]",
)
@click.option(
    "--style",
    "style_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="[default: manifests/samples/strokes.png in a checkout]",
)
@click.option("--size", default=256, show_default=True)
@click.option("--iterations", default=100, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@CACHE_DIR
def bench_quality(
    model: str,
    content_path: Path | None,
    style_path: Path | None,
    size: int,
    iterations: int,
    device: str,
    cache_dir: Path | None,
) -> None:
    """batchstyle's loop against a plain reference loop from the paper: final losses and time per iteration."""
    from batchstyle.reference import format_quality, quality_figures

    content_path, style_path = _sample_pair(content_path, style_path, "--content")
    source, _ = weights.resolve(model, cache_dir)
    figures = quality_figures(source.load(cache_dir), content_path, style_path, size, iterations, device)
    click.echo(f"model {source.name}, {size} px, {iterations} L-BFGS iterations, device {device}")
    click.echo(format_quality(figures))


@bench.command("panel")
@click.option("--model", default="vgg16-hed", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--size", default=512, show_default=True, help="Long side of every cell.")
@click.option(
    "--images",
    "images_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder with the development photos and paintings [default: ../shared/images beside the checkout].",
)
@click.option("--out", "out_dir", default="panel", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--only", default="", help="Comma-separated labels: cells whose subject or style is one of them.")
@click.option("--set", "assignments", multiple=True, metavar="OPTION=VALUE", help="An option for every cell.")
@CACHE_DIR
def bench_panel(
    model: str,
    device: str,
    size: int,
    images_dir: Path | None,
    out_dir: Path,
    only: str,
    assignments: tuple[str, ...],
    cache_dir: Path | None,
) -> None:
    """Stylize the panel (six kinds of subject x four kinds of style) and write its contact sheet, panel.png."""
    from batchstyle.api import StyleTransfer
    from batchstyle.panel import panel_files, run_panel

    options: dict[str, Any] = {"size": size}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep:
            raise click.BadParameter(f"{assignment!r} is not OPTION=VALUE", param_hint="--set")
        options[name.strip().replace("-", "_")] = value
    _option_values(options)  # every name and value checked before anything runs
    default_images = Path(__file__).resolve().parents[2] / "shared" / "images"
    images = images_dir or (default_images if default_images.is_dir() else None)
    labels = {label.strip() for label in only.split(",") if label.strip()}
    contents, styles = panel_files(images)
    click.echo(f"{len(contents)} subjects x {len(styles)} styles; development images: {images or 'none found'}")
    transfer = StyleTransfer(model=model, device=device, cache_dir=cache_dir)
    sheet = run_panel(
        transfer,
        out_dir,
        options,
        images,
        only=lambda c, st: not labels or c in labels or st in labels,
        on_cell=lambda cell: click.echo(
            f"{cell.content:>10} x {cell.style:<14} {cell.seconds:7.1f} s  {cell.iterations:4d} it  "
            f"loss {cell.total_loss:.4g}"
        ),
    )
    click.echo(f"wrote {sheet}")


@main.command()
@click.argument("target", metavar="OUT")
@click.option("--all", "all_rows", is_flag=True, help="Include rows no longer in the latest run's manifest.")
@click.option(
    "--ledger",
    "ledger_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the ledger of a run with a URL OUT is, when it was run with --ledger DIR [default: that URL's "
    "folder in the cache, as the run put it].",
)
def report(target: str, all_rows: bool, ledger_dir: Path | None) -> None:
    """Write contact-sheet.png and report.html (self-contained) into OUT, from its ledger: an output folder, a
    manifest standing for its default folder, or a URL prefix (s3://bucket/out/) a run on this machine wrote to,
    whose outputs are read from the store and the two files put beside them."""
    from batchstyle.report import write_report
    from batchstyle.store import is_url, local_path, work_dir

    out_url = target if is_url(target) and not target.lower().startswith("file://") else None
    if out_url is None and ledger_dir is not None:
        raise Unusable("--ledger names the ledger folder of a run whose OUT is a URL; a folder's ledger stays in it")
    out_dir = _out_dir(Path(local_path(target))) if out_url is None else ledger_dir or work_dir(out_url)
    try:
        files = write_report(out_dir, all_rows, out_url=out_url)
    except FileNotFoundError as exc:
        raise Unusable(str(exc)) from None
    if files.html_url is None:
        click.echo(f"wrote {files.contact_sheet} and {files.html}")
    else:
        click.echo(f"wrote {files.contact_sheet_url} and {files.html_url} (built in {out_dir})")


@bench.command("video")
@click.option("--model", default="vgg16-hed", show_default=True)
@click.option(
    "--clip",
    "clip_path",
    type=click.Path(exists=True, path_type=Path),
    help="A video, a frame folder, or a still to pan and zoom over [default: manifests/samples/chelsea.jpg].",
)
@click.option(
    "--style",
    "style_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="[default: manifests/samples/strokes.png in a checkout]",
)
@click.option("--frames", default=12, show_default=True)
@click.option("--size", default=192, show_default=True)
@click.option("--iterations", default=100, show_default=True, help="Iterations of every independent frame.")
@click.option(
    "--temporal-weight",
    "weights_text",
    default="0,200",
    show_default=True,
    help="Variants' temporal weights: 0 is independent frames, any other a coherent variant.",
)
@click.option(
    "--frame-iterations",
    "later_text",
    default="",
    help="Iterations of coherent frames after the first, comma-separated [default: the option's default].",
)
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write every variant's frames here (with --chunks, the joined clip's).",
)
@click.option(
    "--chunks",
    is_flag=True,
    help="Instead of the variants, run the clip as two coherent chunks with the run's overlap (the first "
    "coherent --temporal-weight and --frame-iterations): temporal error at the border against the rest.",
)
@click.option("--device", default="cpu", show_default=True)
@CACHE_DIR
def bench_video(
    model: str,
    clip_path: Path | None,
    style_path: Path | None,
    frames: int,
    size: int,
    iterations: int,
    weights_text: str,
    later_text: str,
    keep: Path | None,
    chunks: bool,
    device: str,
    cache_dir: Path | None,
) -> None:
    """Temporal error (flicker) and seconds per frame: independent frames against coherent ones (Ruder et al.)."""
    import torch

    from batchstyle.bench_video import chunk_figures, clip_frames, video_figures, video_header
    from batchstyle.images import load_image
    from batchstyle.options import default_values, make_settings

    clip_path, style_path = _sample_pair(clip_path, style_path, "--clip")
    try:
        coherent = [float(w) for w in weights_text.split(",") if w.strip()]
        laters: list[int | None] = [int(n) for n in later_text.split(",") if n.strip()] or [None]
    except ValueError:
        raise click.UsageError("--temporal-weight and --frame-iterations take comma-separated numbers") from None
    settings = make_settings(default_values() | {"size": size, "iterations": iterations, "min_size": 0})
    source, _ = weights.resolve(model, cache_dir)
    variants = [(w, n) for w in coherent for n in (laters if w > 0 else [None])]
    clip = clip_frames(clip_path, frames)
    click.echo(
        f"model {source.name}, {len(clip)} frames of {clip_path.name} at {size} px, {iterations} iterations a "
        f"still, device {device}; temporal error in 8-bit levels over consistent pixels"
    )
    loaded, style = source.load(cache_dir), load_image(style_path)
    if chunks:
        from batchstyle.run.engine import CLIP_OVERLAP

        weight = next((w for w in coherent if w > 0), 200.0)
        coherent_settings = dataclasses.replace(settings, temporal_weight=weight, frame_iterations=laters[0])
        chunk_figures(loaded, torch.device(device), clip, style, coherent_settings, CLIP_OVERLAP, keep, say=click.echo)
        return
    click.echo(video_header())
    video_figures(loaded, torch.device(device), clip, style, settings, variants, keep, say=click.echo)
