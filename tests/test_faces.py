"""faces=auto: faces found offline in the content, a soft content mask over each, recorded; a user's mask wins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, make_painting, write_manifest
from PIL import Image

from batchstyle.faces import Face, face_mask, find_faces
from batchstyle.images import read_metadata
from batchstyle.model.stylize import Inputs, Stylizer
from batchstyle.model.weights import SOURCES
from batchstyle.options import default_values, make_settings
from batchstyle.run.ledger import read_records

skimage_data = pytest.importorskip("skimage.data")


def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


def landscape(width: int = 480, height: int = 320) -> Image.Image:
    """A sky graded to a horizon over rough ground: no face anywhere."""
    gen = np.random.default_rng(0)
    y = np.linspace(0, 1, height)[:, None, None]
    sky = np.array([90, 140, 220]) * (1 - 0.4 * y) + np.zeros((1, width, 1))
    ground = np.array([70, 110, 40]) + gen.normal(0, 25, (height, width, 3))
    pixels = np.where(y > 0.55, ground, sky)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def test_the_astronauts_face_is_found_and_nothing_in_a_landscape_or_the_coffee() -> None:
    (face,) = find_faces(astronaut())
    # Her face: eyes near (0.40-0.48, 0.19), mouth near (0.44, 0.28) of the 512 px photo.
    assert face.x < 0.40 and face.x + face.width > 0.48
    assert face.y < 0.19 and face.y + face.height > 0.28
    assert face.width < 0.3  # the face, not the whole portrait
    assert find_faces(landscape()) == ()
    assert find_faces(Image.fromarray(skimage_data.coffee())) == ()


def test_the_mask_holds_the_face_and_fades_out_around_it() -> None:
    face = Face(0.4, 0.2, 0.2, 0.2)
    mask = face_mask([face], 100, 100)
    assert mask.shape == (100, 100) and mask.dtype == np.float32
    assert mask[31, 50] == 1.0  # the box's centre, the ellipse a little lower
    assert mask[5, 5] == 0.0 and mask[95, 50] == 0.0
    ring = mask[31, 50:]
    assert np.all(np.diff(ring) <= 0) and 0 < ring[12] < 1  # soft, no edge
    assert face_mask([], 10, 10).max() == 0.0


@pytest.fixture(scope="module")
def stylizer() -> Stylizer:
    return Stylizer.local(SOURCES["random"].load(), torch.device("cpu"))


BASE = default_values() | {"size": 48, "min_size": 0, "iterations": 4}


def run(stylizer: Stylizer, item: Inputs, **options: object):  # noqa: ANN201
    (out,) = stylizer.stylize([item], make_settings(BASE | options))
    return out


def test_faces_auto_holds_the_content_on_the_face_and_records_it(stylizer: Stylizer) -> None:
    style = [Image.fromarray(skimage_data.coffee())]
    off = run(stylizer, Inputs(astronaut(), style))
    auto = run(stylizer, Inputs(astronaut(), style), faces="auto")
    assert off.faces is None
    assert auto.faces is not None and len(auto.faces) == 1
    assert not torch.equal(off.image, auto.image)
    # No face found: nothing changes, to the bit.
    plain = run(stylizer, Inputs(landscape(), style))
    searched = run(stylizer, Inputs(landscape(), style), faces="auto")
    assert searched.faces == ()
    assert torch.equal(plain.image, searched.image)


def test_a_users_content_mask_wins_over_the_faces_found(stylizer: Stylizer) -> None:
    style = [Image.fromarray(skimage_data.coffee())]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 40, 64, 64))  # the lower part: not the face
    given = run(stylizer, Inputs(astronaut(), style, content_mask=mask))
    both = run(stylizer, Inputs(astronaut(), style, content_mask=mask), faces="auto")
    assert both.faces is None  # not even looked for
    assert torch.equal(given.image, both.image)


def test_a_run_records_the_faces_in_the_ledger_and_the_metadata_and_draws_them(tmp_path: Path) -> None:
    content = tmp_path / "portrait.png"
    astronaut().resize((256, 256)).save(content)
    make_painting(tmp_path / "style.png")
    manifest = write_manifest(tmp_path / "m.csv", "content,style,faces", "portrait.png,style.png,auto")
    out = tmp_path / "out"
    result = cli("run", manifest, "--out", out, "--model", "random", "--size", 32, "--min-size", 0, "--iterations", 2)
    assert result.exit_code == 0, result.output
    (record,), _ = read_records(out)
    found = json.loads(record.params)["faces_found"]
    assert len(found) == 1 and 0.3 < found[0][0] < 0.4
    meta = json.loads(read_metadata(out / record.output)["batchstyle:params"])
    assert meta["faces_found"] == found and meta["faces"] == "auto"
    report = cli("report", out)
    assert report.exit_code == 0, report.output
    assert "1 face" in (out / "report.html").read_text()
