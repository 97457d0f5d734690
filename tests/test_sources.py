"""Rows from folders, globs and bucket prefixes, without a CSV (`run --content ... --style ...`, `batchstyle
manifest`), through the CLI as a user types it, on real small photos: a nightly folder whose new photos alone are
done, globs and --pair, names that never clash, the CSV that runs the same rows, and a bucket prefix as --content."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import Result
from conftest import cli, make_painting, make_photo

from batchstyle.images import read_metadata
from batchstyle.run.ledger import LEDGER_NAME, read_records

FAST = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "2", "-q")


def counts(result: Result) -> dict[str, int]:
    """The summary's counts: `done 2`, `skipped 3`, `failed 0`."""
    return {name: int(n) for name, n in re.findall(r"^(done|skipped|failed)\s+(\d+)$", result.output, re.MULTILINE)}


def stamps(folder: Path) -> dict[str, int]:
    """Every output's name below `folder` and its mtime in ns: an output redone gets a new one."""
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))}


def keys(folder: Path) -> dict[str, str]:
    return {name: read_metadata(folder / name)["batchstyle:key"] for name in stamps(folder)}


@pytest.fixture
def night(tmp_path: Path) -> Path:
    """photos/ with three photos of different sizes, and a painting beside it."""
    for k, (w, h) in enumerate([(48, 36), (40, 56), (36, 36)]):
        make_photo(tmp_path / "photos" / f"p{k}.png", w, h, seed=k)
    make_painting(tmp_path / "painting.png")
    return tmp_path


def test_a_folder_against_a_painting_then_only_the_new_photos(night: Path) -> None:
    out = night / "out"
    command = ("run", "--content", night / "photos", "--style", night / "painting.png", "--out", out, *FAST)
    first = cli(*command)
    assert first.exit_code == 0, first.output
    assert counts(first) == {"done": 3, "skipped": 0, "failed": 0}
    before = stamps(out)
    assert sorted(before) == [f"p{k}-painting.png" for k in range(3)]

    # Tomorrow's photos arrive: the same command does those two and leaves last night's three as they are.
    make_photo(night / "photos" / "p3.png", 44, 30, seed=3)
    make_photo(night / "photos" / "p4.jpg", 30, 44, seed=4)
    (night / "photos" / "notes.txt").write_text("not a photo")
    again = cli(*command)
    assert again.exit_code == 0, again.output
    assert counts(again) == {"done": 2, "skipped": 3, "failed": 0}
    after = stamps(out)
    assert sorted(after) == [f"p{k}-painting.png" for k in range(5)]
    assert {name: after[name] for name in before} == before, "an output of last night was written again"
    records = read_records(out)[0]
    assert sorted(r.output for r in records if r.status == "done") == sorted(after)
    # The ledger's key of each row is the one its file carries: the skipped rows were recognised, not guessed.
    assert {r.output: r.key for r in records} == keys(out)


def test_globs_and_pair(night: Path) -> None:
    make_painting(night / "paintings" / "a.png", seed=2)
    make_painting(night / "paintings" / "b.png", seed=3)
    out = night / "paired"
    # --pair: the first photo with the first painting, in sorted order; the glob leaves p2 out only by its name.
    paired = cli(
        "run", "--content", f"{night}/photos/p[01].png", "--style", f"{night}/paintings/*.png", "--pair", "--out", out,
        *FAST,
    )  # fmt: skip
    assert paired.exit_code == 0, paired.output
    assert sorted(stamps(out)) == ["p0-a.png", "p1-b.png"]
    records = read_records(out)[0]
    assert {Path(r.content or "").name for r in records} == {"p0.png", "p1.png"}

    # Counts --pair cannot match: refused before any work, with both counts and the way out.
    unmatched = cli(
        "run", "--content", night / "photos", "--style", f"{night}/paintings/*.png", "--pair", "--out",
        night / "unmatched", *FAST,
    )  # fmt: skip
    assert unmatched.exit_code == 2
    assert "--content found 3 files and --style 2" in unmatched.output and "drop --pair" in unmatched.output
    assert "Traceback" not in unmatched.output and not (night / "unmatched").exists()

    # Every content with every style, and a glob that finds nothing named with its pattern.
    every = cli("manifest", "--content", f"{night}/photos/*.png", "--style", f"{night}/paintings/")
    assert every.exit_code == 0, every.output
    assert len(every.output.splitlines()) == 1 + 3 * 2
    nothing = cli("run", "--content", f"{night}/photos/*.jpeg", "--style", night / "painting.png", "--out", out)
    assert nothing.exit_code == 2 and f"--content '{night}/photos/*.jpeg' finds no image" in nothing.output


def test_one_stem_in_two_folders_gets_two_names_and_a_real_clash_is_refused(night: Path) -> None:
    make_photo(night / "photos" / "nested" / "p0.png", 40, 30, seed=9)
    out = night / "out"
    both = cli(
        "run", "--content", night / "photos" / "p0.png", "--content", night / "photos" / "nested" / "p0.png",
        "--style", night / "painting.png", "--out", out, *FAST,
    )  # fmt: skip
    assert both.exit_code == 0, both.output
    # Named below the folder the patterns share: the nested photo keeps its folder.
    assert sorted(stamps(out)) == ["nested/p0-painting.png", "p0-painting.png"]
    assert keys(out)["nested/p0-painting.png"] != keys(out)["p0-painting.png"]
    glob = cli("manifest", "--content", f"{night}/photos/**/*.png", "--style", night / "painting.png")
    assert "nested/p0-painting.png" in glob.output and "\n" + str(night / "photos" / "p0.png") in glob.output

    # p0.png and P0.jpg would both write p0-painting.png (one name on a case-insensitive disk): refused, no work.
    make_photo(night / "photos" / "P0.jpg", 40, 30, seed=8)
    clash = cli("run", "--content", night / "photos", "--style", night / "painting.png", "--out", night / "c", *FAST)
    assert clash.exit_code == 2
    assert "P0.jpg" in clash.output and "p0.png" in clash.output and "'p0-painting.png'" in clash.output
    assert not (night / "c").exists()


def test_the_manifest_command_writes_the_csv_that_runs_the_same_rows(night: Path) -> None:
    out = night / "out"
    flags = ("--content", night / "photos", "--style", night / "painting.png", "--style-weight", "50")
    folder = cli("run", *flags, "--out", out, *FAST)
    assert folder.exit_code == 0 and counts(folder)["done"] == 3, folder.output
    before = stamps(out)

    csv = night / "jobs" / "night.csv"
    written = cli("manifest", *flags, "--out", out, "-o", csv)
    assert written.exit_code == 0 and f"wrote {csv}: 3 rows" in written.output, written.output
    lines = csv.read_text().splitlines()
    assert lines[0] == "content,style,output,style_weight"
    assert lines[1] == "../photos/p0.png,../painting.png,p0-painting.png,50.0"  # relative to the CSV's folder

    # The CSV run into the same folder: the same outputs and the same job keys, so every row is skipped.
    from_csv = cli("run", csv, "--out", out, *FAST)
    assert from_csv.exit_code == 0, from_csv.output
    assert counts(from_csv) == {"done": 0, "skipped": 3, "failed": 0}
    assert stamps(out) == before

    # And from standard output, with absolute paths, for a CSV kept elsewhere.
    shown = cli("manifest", *flags)
    assert shown.output.splitlines()[1] == f"{night}/photos/p0.png,{night}/painting.png,p0-painting.png,50.0"


def test_a_bucket_prefix_as_content(s3: object, night: Path) -> None:
    s3.create_bucket(Bucket="photos")  # type: ignore[attr-defined]
    for k in range(2):
        s3.upload_file(str(night / "photos" / f"p{k}.png"), "photos", f"night/p{k}.png")  # type: ignore[attr-defined]
    s3.put_object(Bucket="photos", Key="night/readme.txt", Body=b"not a photo")  # type: ignore[attr-defined]
    s3.put_object(Bucket="photos", Key="night/old/p9.png", Body=b"in a sub-prefix")  # type: ignore[attr-defined]
    out = night / "out"
    command = ("run", "--content", "s3://photos/night/", "--style", night / "painting.png", "--out", out, *FAST)
    first = cli(*command)
    assert first.exit_code == 0, first.output
    assert sorted(stamps(out)) == ["p0-painting.png", "p1-painting.png"]
    records = read_records(out)[0]
    assert sorted(r.content for r in records) == ["s3://photos/night/p0.png", "s3://photos/night/p1.png"]

    s3.upload_file(str(night / "photos" / "p2.png"), "photos", "night/p2.png")  # type: ignore[attr-defined]
    before = stamps(out)
    again = cli(*command)
    assert counts(again) == {"done": 1, "skipped": 2, "failed": 0}, again.output
    assert {name: stamps(out)[name] for name in before} == before
    assert (out / LEDGER_NAME).is_file()

    # The folder's report draws each photo from the bucket (its staged copy), shown by its URL.
    report = cli("report", out)
    assert report.exit_code == 0, report.output
    page = (out / "report.html").read_text(encoding="utf-8")
    for k in range(3):
        drawn = (
            f'<figure class="content" title="s3://photos/night/p{k}.png"><img class="thumb" alt="content" src="data:'
        )
        assert drawn in page

    # A glob under a prefix: the objects it matches, named as the prefix's would be.
    glob = cli("manifest", "--content", "s3://photos/night/p[02].png", "--style", night / "painting.png")
    assert glob.exit_code == 0, glob.output
    assert [line.split(",")[0] for line in glob.output.splitlines()[1:]] == [
        "s3://photos/night/p0.png",
        "s3://photos/night/p2.png",
    ]
    assert glob.output.splitlines()[1].endswith(",p0-painting.png")

    missing = cli("run", "--content", "s3://no-such-bucket/night/", "--style", night / "painting.png", "--out", out)
    assert missing.exit_code == 2 and "s3://no-such-bucket/night/" in missing.output, missing.output
    assert "Traceback" not in missing.output
