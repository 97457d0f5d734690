"""Numbers that are not finite (nan, inf, -inf, and 1e400, which a float reads as inf) are refused wherever a float
option is given: a manifest cell, a weight list, a command-line flag, a keyword of the Python facade. No range check
would catch nan (every comparison with it is false), and a nan weight turns every iterate's loss into nan."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import cli, write_manifest
from PIL import Image

from batchstyle import StyleTransfer, run_manifest
from batchstyle.options import FINITE_FIX, OPTIONS, OptionError
from batchstyle.run.ledger import read_records

NOT_FINITE = ["nan", "inf", "-inf", "1e400", "NaN", "Infinity"]


def _float_options() -> list[str]:
    """The options whose values are floats or lists of them, found by what they parse a number to, so an option
    added later is held to the rule without being listed here."""
    found = []
    for name, option in OPTIONS.items():
        try:
            value = option.from_text("0.5")
        except OptionError:
            continue
        if isinstance(value, float) or (isinstance(value, tuple) and value and isinstance(value[0], float)):
            found.append(name)
    return found


def test_the_float_options_are_found() -> None:
    found = _float_options()
    assert {"style_weight", "tv_weight", "content_weight", "learning_rate", "style_layer_weights"} <= set(found)
    assert "size" not in found and "seed" not in found


@pytest.mark.parametrize("name", _float_options())
@pytest.mark.parametrize("raw", NOT_FINITE)
def test_every_float_option_refuses_a_number_that_is_not_finite(name: str, raw: str) -> None:
    with pytest.raises(OptionError, match=re.escape(FINITE_FIX)) as caught:
        OPTIONS[name].from_text(raw)
    assert "not a finite number" in str(caught.value)


def test_check_names_the_row_line_column_and_fix_of_each_bad_value(tmp_path: Path, images: dict[str, Path]) -> None:
    """Row 2 spans lines 3-4 (a quoted cell with a line break), so every later row's line is its number + 2."""
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,style_weight,tv_weight,style_blend_weights,style_layer_weights",
        "in/photo.png,in/painting.png,good.png,,,,",
        'in/photo.png,in/painting.png,weights.png,,,,"1,1,',
        '1,1,nan"',
        "in/photo.png,in/painting.png,a.png,nan,,,",
        "in/photo.png,in/painting.png,b.png,inf,,,",
        "in/photo.png,in/painting.png,c.png,,1e400,,",
        "in/photo.png,in/painting.png;in/painting2.png,d.png,,,0.5;-inf,",
    )
    result = cli("check", manifest)
    assert result.exit_code == 1, result.output
    expected = {
        (2, 3, "style_layer_weights"): "'nan' is not a finite number; give a finite number for each weight",
        (3, 5, "style_weight"): "'nan' is not a finite number; give a finite number, e.g. 100",
        (4, 6, "style_weight"): "'inf' is not a finite number; give a finite number, e.g. 100",
        (5, 7, "tv_weight"): "'1e400' is not a finite number; give a finite number, e.g. 10",
        (6, 8, "style_blend_weights"): "'-inf' is not a finite number; give a finite number for each weight",
    }
    for (row, line, column), message in expected.items():
        where = f"{manifest}, row {row} (line {line}), column {column}: "
        assert re.search(rf"^{re.escape(where)}.*{re.escape(message)}", result.stdout, re.MULTILINE), result.stdout
    assert "row 1 " not in result.stdout
    assert "6 rows: 1 ok, 5 with problems" in result.stdout


def test_run_does_the_good_row_and_fails_the_bad_one(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output,style_weight",
        "in/photo.png,in/painting.png,good.png,",
        "in/photo.png,in/painting.png,bad.png,nan",
    )
    fast = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "2", "-q")
    result = cli("run", manifest, *fast, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1, result.output
    out = tmp_path / "m"
    with Image.open(out / "good.png") as good:
        assert good.size == (32, 24)
    assert not (out / "bad.png").exists()
    records = {r.row: r for r in read_records(out)[0]}
    assert records[1].status == "done"
    assert records[2].status == "failed"
    assert "row 2 (line 3), column style_weight: 'nan' is not a finite number" in records[2].error


@pytest.mark.parametrize(
    ("flag", "raw", "example"),
    [("--style-weight", "nan", "100"), ("--tv-weight", "1e400", "10"), ("--temporal-weight", "-inf", "200")],
)
def test_a_flag_that_is_not_finite_is_a_usage_error(tmp_path: Path, flag: str, raw: str, example: str) -> None:
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "in/photo.png,in/painting.png")
    for command in ("check", "run"):
        result = cli(command, manifest, flag, raw)
        assert result.exit_code == 2, result.output
        message = f"'{raw}' is not a finite number; {FINITE_FIX}, e.g. {example}"
        assert re.search(rf"Invalid value for '?{flag}'?: {re.escape(message)}", result.output), result.output
    assert not (tmp_path / "m").exists()


def test_the_facade_refuses_a_number_that_is_not_finite(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "in/photo.png,in/painting.png")
    with pytest.raises(OptionError, match="'inf' is not a finite number") as caught:
        run_manifest(manifest, model="random", devices="cpu", size=32, style_weight=float("inf"))
    assert caught.value.option == "style_weight"
    assert not (tmp_path / "m").exists()

    st = StyleTransfer(model="random", device="cpu", cache_dir=tmp_path / "cache")
    for name, value in (("style_weight", float("nan")), ("tv_weight", 1e400), ("style_layer_weights", [1, 1, 1e400])):
        with pytest.raises(OptionError, match=re.escape(FINITE_FIX)) as caught:
            st.stylize(images["photo"], images["painting"], size=32, iterations=1, **{name: value})
        assert caught.value.option == name
