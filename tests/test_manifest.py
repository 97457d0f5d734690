"""Tests for batchstyle.manifest: parsing a CSV manifest into rows, and every problem it reports, by row and column.

Everything here is real files in tmp_path: images made by conftest's helpers, manifests written as text or bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MALFORMED, make_photo, write_manifest

from batchstyle.manifest import ManifestError, Problem, default_out_dir, read_manifest
from batchstyle.options import STYLE_LAYERS, default_values

HEADER = "content,style,output"


def read(path: Path, out_dir: Path | None = None, fmt: str = "png", **overrides: object):
    defaults = default_values()
    defaults.update(overrides)
    return read_manifest(path, defaults, out_dir, fmt)


def only_problem(manifest) -> Problem:
    assert len(manifest.problems) == 1, [str(p) for p in manifest.problems]
    return manifest.problems[0]


# --- parsing -----------------------------------------------------------------------------------------------------


def test_paths_are_relative_to_the_manifest_folder_not_the_working_directory(
    tmp_path: Path, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "jobs"
    sub.mkdir()
    path = write_manifest(sub / "night.csv", HEADER, "../in/photo.png,../in/painting.png,")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    manifest = read(path)

    assert manifest.problems == []
    (row,) = manifest.rows
    assert row.content.resolve() == images["photo"].resolve()
    assert [s.resolve() for s in row.styles] == [images["painting"].resolve()]
    # Default output folder: beside the manifest, named after it.
    assert manifest.out_dir == sub / "night" == default_out_dir(path)
    assert row.output == sub / "night" / "photo-painting.png"


def test_relative_manifest_path_from_its_own_folder(
    tmp_path: Path, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_manifest(tmp_path / "m.csv", HEADER, "in/photo.png,in/painting.png,")
    monkeypatch.chdir(tmp_path)
    manifest = read(Path("m.csv"))
    assert manifest.problems == []
    assert manifest.rows[0].content.resolve() == images["photo"].resolve()


def test_out_dir_and_format_given(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(
        tmp_path / "m.csv", HEADER, "in/photo.png,in/painting.png,", "in/photo.png,in/painting2.png,x.tif"
    )
    manifest = read(path, out_dir=tmp_path / "outs", fmt="jpg")
    assert manifest.problems == []
    assert [r.output for r in manifest.rows] == [tmp_path / "outs" / "photo-painting.jpg", tmp_path / "outs" / "x.tif"]


def test_defaults_overlaid_by_cells_and_empty_cell_means_default(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,iterations,style_weight,preserve_color,content_layers,optimizer",
        'in/photo.png,in/painting.png,a.png,3,5e4,yes,"relu1_1,relu2_1",ADAM',
        "in/photo.png,in/painting.png,b.png,,,,,",
        "in/photo.png,in/painting.png,c.png,  ,\t,,,",
    )
    manifest = read(path, iterations=7, style_weight=10.0)
    assert manifest.problems == []
    a, b, c = manifest.rows
    assert a.values["iterations"] == 3
    assert a.values["style_weight"] == 5e4
    assert a.values["preserve_color"] is True
    assert a.values["content_layers"] == ("relu1_1", "relu2_1")
    assert a.values["optimizer"] == "adam"
    for row in (b, c):
        # The command line's defaults where the cell is empty or blank, the table's where neither says anything.
        assert row.values["iterations"] == 7
        assert row.values["style_weight"] == 10.0
        assert row.values["preserve_color"] is False
        assert row.values["content_layers"] == ("relu4_2",)
        assert row.values["optimizer"] == "lbfgs"
        assert row.values["style_layers"] == STYLE_LAYERS
    # The cells did not leak into the defaults shared by the other rows.
    assert a.values is not b.values


def test_several_styles_with_blend_weights(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(
        tmp_path / "m.csv",
        "content,style,style_blend_weights",
        "in/photo.png, in/painting.png ; in/painting2.png ,0.7;0.3",
        "in/photo.png,in/painting.png;in/painting2.png,",
        "in/photo.png,in/painting.png;,",
    )
    manifest = read(path)
    assert manifest.problems == []
    blended, equal, single = manifest.rows
    assert blended.styles == (tmp_path / "in" / "painting.png", tmp_path / "in" / "painting2.png")
    assert blended.blend == (0.7, 0.3)
    assert equal.blend == (1.0, 1.0)
    assert single.styles == (tmp_path / "in" / "painting.png",)
    assert single.blend == (1.0,)
    # Generated names carry every style; the two blended rows share one and are told apart by row number.
    assert blended.output.name == "photo-painting+painting2-row1.png"
    assert equal.output.name == "photo-painting+painting2-row2.png"
    assert single.output.name == "photo-painting.png"


def test_comments_and_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(
        tmp_path / "m.csv",
        HEADER,
        "# a comment, with a comma",
        "",
        "   ",
        ",,",
        "in/photo.png,in/painting.png,a.png",
        "  # indented comment",
        "in/photo.png,in/missing.png,b.png",
    )
    manifest = read(path)
    assert manifest.total_rows == 2
    assert [(r.number, r.line) for r in manifest.rows] == [(1, 6)]
    problem = only_problem(manifest)
    assert (problem.row, problem.line, problem.column) == (2, 8, "style")


def test_bom_crlf_and_header_case_are_tolerated(tmp_path: Path, images: dict[str, Path]) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffContent , STYLE,Iterations\r\nin/photo.png,in/painting.png,4\r\n".encode())
    manifest = read(path)
    assert manifest.problems == []
    (row,) = manifest.rows
    assert row.content == tmp_path / "in" / "photo.png"
    assert row.values["iterations"] == 4


def test_init_image_relative_to_the_manifest(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,init",
        "in/photo.png,in/painting.png,a.png,in/photo2.jpg",
        "in/photo.png,in/painting.png,b.png,Noise",
        "in/photo.png,in/painting.png,c.png,in/nope.png",
    )
    manifest = read(path)
    a, b = manifest.rows
    assert a.init_image == tmp_path / "in" / "photo2.jpg"
    assert b.init_image is None and b.values["init"] == "noise"
    problem = only_problem(manifest)
    assert (problem.row, problem.column) == (3, "init")
    assert "nope.png" in problem.message


# --- row problems ------------------------------------------------------------------------------------------------


def test_problem_str_names_manifest_row_line_and_column(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(tmp_path / "m.csv", HEADER, "# skip", "in/photo.png,in/missing.png,")
    problem = only_problem(read(path))
    text = str(problem)
    assert text.startswith(f"{path}, row 1 (line 3), column style: ")
    assert "missing.png" in text and "no such file" in text


@pytest.mark.parametrize(
    ("columns", "cells", "column", "expected"),
    [
        ("", "in/missing.png,in/painting.png", "content", ["missing.png", "no such file"]),
        ("", "in/photo.png,in/painting.png;in/missing.png", "style", ["missing.png", "no such file"]),
        ("", "in/corrupt.png,in/painting.png", "content", ["corrupt.png", "cannot be read as an image"]),
        ("", "in/photo.png,in/corrupt.png", "style", ["corrupt.png", "cannot be read as an image"]),
        (
            "",
            "in,in/painting.png",
            "content",
            ["corrupt.png cannot be read as an image", "re-export the frame"],
        ),  # a frame folder
        ("", ",in/painting.png", "content", ["empty"]),
        ("", "in/photo.png, ; ", "style", ["empty"]),
        (",iterations", "in/photo.png,in/painting.png,lots", "iterations", ["'lots' is not an integer"]),
        (",size", "in/photo.png,in/painting.png,8", "size", ["'8' must be at least 16"]),
        (",size", "in/photo.png,in/painting.png,32.5", "size", ["'32.5' is not an integer"]),
        (",iterations", "in/photo.png,in/painting.png,0", "iterations", ["'0' must be at least 1"]),
        (",style_weight", "in/photo.png,in/painting.png,-1", "style_weight", ["'-1' must be at least 0"]),
        (",style_scale", "in/photo.png,in/painting.png,9", "style_scale", ["'9' must be at most 8"]),
        (",content_weight", "in/photo.png,in/painting.png,heavy", "content_weight", ["'heavy' is not a number"]),
        (",preserve_color", "in/photo.png,in/painting.png,maybe", "preserve_color", ["'maybe' is not a yes/no"]),
        (",optimizer", "in/photo.png,in/painting.png,sgd", "optimizer", ["'sgd' is not one of lbfgs, adam"]),
        (",content_layers", "in/photo.png,in/painting.png,relu9_9", "content_layers", ["unknown layer relu9_9"]),
        (",style_layers", 'in/photo.png,in/painting.png,"relu1_1,conv1_1"', "style_layers", ["unknown layer conv1_1"]),
        (",style_layers", 'in/photo.png,in/painting.png,"relu1_1,relu1_1"', "style_layers", ["listed twice"]),
        (
            ",style_blend_weights",
            "in/photo.png,in/painting.png;in/painting2.png,0.7;0.2;0.1",
            "style_blend_weights",
            ["3 weights for 2 style images"],
        ),
        (
            ",style_blend_weights",
            "in/photo.png,in/painting.png,0.7;x",
            "style_blend_weights",
            ["not a list of numbers"],
        ),
        (",style_blend_weights", "in/photo.png,in/painting.png,0", "style_blend_weights", ["not all zero"]),
        (
            ",style_layers,style_layer_weights",
            'in/photo.png,in/painting.png,"relu1_1,relu2_1",1;2;3',
            "style_layer_weights",
            ["style_layer_weights has 3 values for 2 style layers"],
        ),
        (
            ",style_layer_weights",
            "in/photo.png,in/painting.png,1;1",
            "style_layer_weights",
            ["2 values for 5 style layers"],
        ),
        (",output", "in/photo.png,in/painting.png,out.gif", "output", ["'out.gif' has no supported extension"]),
        (",output", "in/photo.png,in/painting.png,noext", "output", ["'noext' has no supported extension"]),
        (",output", "in/photo.png,in/painting.png,../escape.png", "output", ["outside the output folder"]),
        (",output", "in/photo.png,in/painting.png,sub/../../escape.png", "output", ["outside the output folder"]),
    ],
)
def test_row_problem_names_row_and_column(
    tmp_path: Path, images: dict[str, Path], columns: str, cells: str, column: str, expected: list[str]
) -> None:
    (tmp_path / "in" / "corrupt.png").write_text("this is not a PNG file\n")
    path = write_manifest(
        tmp_path / "m.csv",
        "content,style" + columns,
        "in/photo.png,in/painting.png" + "," * columns.count(","),
        "in/photo.png,in/painting2.png" + "," * columns.count(","),
        cells,
    )
    manifest = read(path)
    problems = list(manifest.problems)
    assert problems, "the bad row was accepted"
    assert {p.row for p in problems} == {3}, [str(p) for p in problems]
    assert column in {p.column for p in problems}
    text = "\n".join(str(p) for p in problems)
    assert f"row 3 (line 4), column {column}: " in text
    for part in expected:
        assert part in text
    # The good rows are still planned; the bad one is not.
    assert [r.number for r in manifest.rows] == [1, 2]
    assert manifest.problem_rows().keys() == {3}


def test_absolute_output_outside_the_folder(tmp_path: Path, images: dict[str, Path]) -> None:
    target = tmp_path / "elsewhere" / "x.png"
    path = write_manifest(tmp_path / "m.csv", HEADER, f"in/photo.png,in/painting.png,{target}")
    problem = only_problem(read(path))
    assert (problem.row, problem.column) == (1, "output")
    assert "outside the output folder" in problem.message and str(target) in problem.message


def test_output_in_a_subfolder_is_fine(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(tmp_path / "m.csv", HEADER, "in/photo.png,in/painting.png,a/b/c.webp")
    manifest = read(path)
    assert manifest.problems == []
    assert manifest.rows[0].output == tmp_path / "m" / "a" / "b" / "c.webp"


def test_every_problem_of_a_row_is_reported(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,iterations,size",
        "in/nothere.png,in/gone.png,x.gif,abc,8",
    )
    manifest = read(path)
    assert sorted(p.column for p in manifest.problems) == ["content", "iterations", "output", "size", "style"]
    assert all(p.row == 1 and p.line == 2 for p in manifest.problems)
    assert manifest.rows == []


def test_cross_option_problem_reported_alongside_other_problems(tmp_path: Path, images: dict[str, Path]) -> None:
    """A row with a missing file and mismatched style_layer_weights shows both, so one `check` finds everything."""
    path = write_manifest(
        tmp_path / "m.csv",
        "content,style,style_layer_weights",
        "in/photo.png,in/gone.png,1;2",
    )
    columns = sorted(p.column for p in read(path).problems)
    assert columns == ["style", "style_layer_weights"]


def test_a_missing_file_is_checked_once_and_reported_for_every_row(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(
        tmp_path / "m.csv", HEADER, "in/photo.png,in/gone.png,a.png", "in/photo.png,in/gone.png,b.png"
    )
    manifest = read(path)
    assert [(p.row, p.column) for p in manifest.problems] == [(1, "style"), (2, "style")]


# --- outputs: duplicates and generated names ---------------------------------------------------------------------


def test_duplicate_explicit_outputs_name_both_rows(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(
        tmp_path / "m.csv",
        HEADER,
        "in/photo.png,in/painting.png,same.png",
        "in/photo2.jpg,in/painting.png,other.png",
        "in/photo.png,in/painting2.png,./same.png",
    )
    manifest = read(path)
    problem = only_problem(manifest)
    assert (problem.row, problem.line, problem.column) == (3, 4, "output")
    assert "row 1" in problem.message and "same.png" in problem.message
    assert [r.number for r in manifest.rows] == [1, 2]


@pytest.mark.parametrize(("first", "second"), [("A.png", "a.png"), ("Night/Out.PNG", "night/out.png")])
def test_outputs_differing_only_in_letter_case_clash_on_every_platform(
    tmp_path: Path, images: dict[str, Path], first: str, second: str
) -> None:
    """One file on Windows and macOS: refused on Linux too, so a manifest checked here runs the same there."""
    path = write_manifest(
        tmp_path / "m.csv", HEADER, f"in/photo.png,in/painting.png,{first}", f"in/photo.png,in/painting2.png,{second}"
    )
    manifest = read(path)
    problem = only_problem(manifest)
    assert (problem.row, problem.line, problem.column) == (2, 3, "output")
    assert f"output {second!r} differs from row 1's {first!r} only in letter case" in problem.message
    assert [r.number for r in manifest.rows] == [1]


def test_generated_names_differing_only_in_letter_case_get_their_row_number(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    # Photo.png sits in another folder so that the test means the same on a case-insensitive filesystem.
    make_photo(tmp_path / "in" / "upper" / "Photo.png")
    path = write_manifest(
        tmp_path / "m.csv",
        HEADER,
        "in/photo.png,in/painting.png,",
        "in/upper/Photo.png,in/painting.png,",
        "in/photo.png,in/painting2.png,",
        "in/photo2.jpg,in/painting.png,PHOTO2-Painting.png",
        "in/photo2.jpg,in/painting.png,",
    )
    manifest = read(path)
    assert manifest.problems == []
    assert {r.number: r.output.name for r in manifest.rows} == {
        1: "photo-painting-row1.png",
        2: "Photo-painting-row2.png",
        3: "photo-painting2.png",
        4: "PHOTO2-Painting.png",
        5: "photo2-painting-row5.png",
    }


def test_colliding_generated_names_get_their_row_number(tmp_path: Path, images: dict[str, Path]) -> None:
    path = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,iterations",
        "in/photo.png,in/painting.png,,3",
        "in/photo.png,in/painting.png,,4",
        "in/photo2.jpg,in/painting.png,,",
        "in/photo2.jpg,in/painting2.png,,",
        "in/photo.png,in/painting2.png,,",
        "in/photo2.jpg,in/painting2.png,photo-painting2.png,",
    )
    manifest = read(path)
    assert manifest.problems == []
    names = {r.number: r.output.name for r in manifest.rows}
    assert names == {
        1: "photo-painting-row1.png",
        2: "photo-painting-row2.png",
        3: "photo2-painting.png",
        4: "photo2-painting2.png",
        # Collides with row 6's explicit name, so the generated one gives way.
        5: "photo-painting2-row5.png",
        6: "photo-painting2.png",
    }
    assert len({r.output for r in manifest.rows}) == len(manifest.rows)


@pytest.mark.parametrize("explicit", ["photo-painting-row2.png", "Photo-Painting-ROW2.png"])
def test_renamed_generated_name_never_lands_on_an_explicit_output(
    tmp_path: Path, images: dict[str, Path], explicit: str
) -> None:
    """Two rows must never write the same file, even when an explicit name looks like a renamed generated one."""
    path = write_manifest(
        tmp_path / "m.csv",
        HEADER,
        f"in/photo.png,in/painting.png,{explicit}",
        "in/photo.png,in/painting.png,",
        "in/photo.png,in/painting.png,",
    )
    manifest = read(path)
    outputs = [r.output for r in manifest.rows]
    assert len(set(outputs)) == len(outputs), outputs
    assert {r.number: r.output.name for r in manifest.rows} == {
        1: explicit,
        3: "photo-painting-row3.png",
    }
    problem = only_problem(manifest)
    assert (problem.row, problem.column) == (2, "output")
    assert "row 1" in problem.message and "photo-painting-row2.png" in problem.message


# --- manifest-level errors ---------------------------------------------------------------------------------------


def manifest_error(path: Path) -> str:
    with pytest.raises(ManifestError) as caught:
        read(path)
    message = str(caught.value)
    assert str(path) in message
    return message


def test_missing_manifest(tmp_path: Path) -> None:
    assert "no such manifest file" in manifest_error(tmp_path / "nope.csv")


def test_directory_as_manifest(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    assert "is a folder, and holds no .csv file; give the manifest CSV file's path" in manifest_error(
        tmp_path / "dir.csv"
    )


def test_binary_manifest(tmp_path: Path, images: dict[str, Path]) -> None:
    """A PNG saved as .csv: its first NUL byte is on line 3 (after \\x89PNG\\r\\n\\x1a\\n)."""
    path = tmp_path / "image.csv"
    path.write_bytes(images["photo"].read_bytes())
    message = manifest_error(path)
    assert message.startswith(f"{path}, line 3: byte 0x00 at column 1 (file offset 8) is a NUL byte")
    assert "no text at all (an image or a spreadsheet saved as .csv)" in message


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_manifest_is_refused_naming_the_line(tmp_path: Path, images: dict[str, Path], name: str) -> None:
    data, line, parts = MALFORMED[name]
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    message = manifest_error(path)
    assert message.startswith(f"{path}, line {line}: "), message
    for part in parts:
        assert part in message
    assert message.count("; ") >= 1, "what is wrong; how to fix it"


def test_a_cell_spanning_lines_in_closed_quotes_is_fine(tmp_path: Path, images: dict[str, Path]) -> None:
    """Closed quotes may hold commas and line breaks; a row spanning lines is named by the line it starts on, and a
    later row keeps its own line number."""
    path = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,style_layers",
        'in/photo.png,in/painting.png,a.png,"relu1_1,',
        'relu2_1"',
        'in/photo.png,in/painting.png,"b "".png",',
    )
    manifest = read(path)
    assert manifest.problems == []
    a, b = manifest.rows
    assert a.values["style_layers"] == ("relu1_1", "relu2_1")
    assert a.line == 2
    assert (b.line, b.output.name) == (4, 'b ".png')


def test_empty_manifest(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert "empty" in manifest_error(path)


@pytest.mark.parametrize(
    ("header", "missing"),
    [("content,output", "style"), ("style", "content"), ("image,painting", "content or style")],
)
def test_header_without_content_or_style(tmp_path: Path, header: str, missing: str) -> None:
    path = write_manifest(tmp_path / "m.csv", header, "a.png,b.png")
    message = manifest_error(path)
    assert f"has no {missing} column" in message
    assert header in message


def test_unknown_column_with_suggestion(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", "content,style,iteratons,xyzzy", "a.png,b.png,3,4")
    message = manifest_error(path)
    assert "unknown column" in message
    assert "'iteratons' (did you mean iterations?)" in message
    assert "'xyzzy'" in message
    assert "known columns:" in message and "style_blend_weights" in message


def test_duplicated_column(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", "content,style,Iterations,iterations", "a.png,b.png,3,4")
    assert "column iterations appears twice" in manifest_error(path)


@pytest.mark.parametrize("rows", [(), ("# only a comment", "", ",")])
def test_header_but_no_rows(tmp_path: Path, rows: tuple[str, ...]) -> None:
    path = write_manifest(tmp_path / "m.csv", "content,style", *rows)
    assert "has a header but no rows" in manifest_error(path)


def test_an_image_too_thin_for_the_network_is_a_row_problem(tmp_path: Path) -> None:
    """1000x50 at 256 px would be 256x13: four poolings leave nothing at relu5_1. Found by `check`, not mid-run."""
    from PIL import Image

    Image.new("RGB", (1000, 50), "gray").save(tmp_path / "strip.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "style.png")
    manifest = write_manifest(
        tmp_path / "m.csv", "content,style,size,min_size", "strip.png,style.png,256,0", "strip.png,style.png,400,0"
    )
    result = read_manifest(manifest, default_values())
    [problem] = result.problems
    assert problem.row == 1 and problem.column == "content"
    assert "256x13" in problem.message and "raise size or min_size" in problem.message
    assert [row.number for row in result.rows] == [2]


def test_trailing_empty_cells_are_not_extra_cells(tmp_path: Path, images: dict[str, Path]) -> None:
    """Spreadsheets write `a,b,` for a row whose last cells are empty; that is no row with too many cells."""
    path = write_manifest(tmp_path / "m.csv", "content,style", f"{images['photo']},{images['painting']},,")
    manifest = read_manifest(path, default_values())
    assert manifest.problems == []
    assert len(manifest.rows) == 1
