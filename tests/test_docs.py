"""The documentation stays true to the code: generated pages current, every link and anchor resolving, the site
building with --strict, and code comments pointing at sections that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
from markdown.extensions.toc import slugify

from batchstyle import docs
from batchstyle.cli import main as cli_main
from batchstyle.options import OPTIONS

ROOT = docs.ROOT
DOCS = docs.DOCS
# A pointer into the site from code: docs/PAGE.md, optionally with #anchor.
DOC_REFERENCE = re.compile(r"docs/([\w./-]+?\.md)(?:#([\w-]+))?")
FENCE = re.compile(r"^(```|~~~)")


def _anchors(page: Path) -> set[str]:
    """The ids the toc extension gives the page's headings (code blocks skipped: a `# comment` is not a heading)."""
    anchors, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            anchors.add(slugify(heading.group(1).replace("`", ""), "-"))
    return anchors


def _sources() -> list[Path]:
    return sorted([*ROOT.joinpath("batchstyle").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")])


def test_the_generated_reference_pages_are_current() -> None:
    stale = docs.stale_pages()
    assert not stale, f"stale generated pages {stale}: run `{docs.REFRESH}` and commit docs/reference/"


def test_the_options_page_has_every_option_and_the_cli_page_every_flag() -> None:
    options = docs.options_page()
    for name, option in OPTIONS.items():  # the video ones (temporal_weight, frames, ...) included
        row = next((line for line in options.splitlines() if line.startswith(f"| {docs._code(name)} |")), None)
        assert row, f"option {name} missing from the options page"
        assert docs._cell(option.help) in row
    cli = docs.cli_page()
    run = cli_main.commands["run"]
    ctx = click.Context(run, info_name="run")
    assert "## batchstyle run\n" in cli and "## batchstyle bench memory\n" in cli
    for param in run.get_params(ctx):
        if isinstance(param, click.Option) and param.name != "help":
            assert param.opts[0] in cli, f"batchstyle run {param.opts[0]} missing from the CLI page"


def test_code_comments_point_at_doc_sections_that_exist() -> None:
    checked = 0
    for source in _sources():
        if source.name in ("docs.py", "test_docs.py"):  # they speak of references; they hold none
            continue
        text = source.read_text(encoding="utf-8")
        where = source.relative_to(ROOT)
        assert "README" not in text, (
            f"{where} points at the README, which is a front page now: point at docs/PAGE.md#anchor instead"
        )
        for match in DOC_REFERENCE.finditer(text):
            page, anchor = DOCS / match.group(1), match.group(2)
            assert page.is_file(), f"{where}: {match.group(0)} names no page under docs/"
            assert anchor is None or anchor in _anchors(page), f"{where}: {match.group(0)}: no such heading"
            checked += 1
    assert checked >= 10  # the references this test was written for; fewer means the pattern stopped matching


def test_the_architecture_page_maps_every_module() -> None:
    page = (DOCS / "architecture.md").read_text(encoding="utf-8")
    for folder in ("batchstyle", "batchstyle/run", "batchstyle/model"):
        for module in sorted(ROOT.joinpath(folder).glob("*.py")):
            if not module.name.startswith("__"):
                assert f"| `{module.stem}` |" in page, f"{folder}/{module.name}: add a line to docs/architecture.md"


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    # CI runs exactly the README's test command (.ci/run says so): the two may not drift apart.
    ci_command = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert f"```bash\n{ci_command}\n```" in readme


def test_the_site_builds_with_strict_links_and_renders_the_api(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", "mkdocs.yml", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="batchstyle.api.StyleTransfer"' in api and 'id="batchstyle.api.run_manifest"' in api
    assert (site / "images" / "gallery-preview.jpg").stat().st_size > 0
