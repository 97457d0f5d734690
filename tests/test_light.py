"""Light commands stay light: each runs in a fresh interpreter and must leave torch and onnxruntime unimported.

Importing torch costs a light command about two seconds and 600 MB before it does anything; a module-level
`import torch` anywhere on a light command's import path brings that back, and only a fresh process can tell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_photo, write_manifest

from batchstyle.run.ledger import Ledger

HEAVY = ("torch", "onnxruntime")

# Runs the click group in this fresh interpreter, then prints which heavy modules it left imported and its exit code.
PROBE = """
import json, sys
from batchstyle.cli import main
try:
    main(sys.argv[1:], prog_name="batchstyle")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"heavy": [m for m in HEAVY if m in sys.modules], "code": code}))
""".replace("HEAVY", repr(HEAVY))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest and an output folder with a ledger holding one done row: what check, status and report read."""
    root = tmp_path_factory.mktemp("light")
    make_photo(root / "in" / "photo.png")
    make_photo(root / "in" / "painting.png", 40, 40, seed=2)
    manifest = write_manifest(root / "night.csv", "content,style,output", "in/photo.png,in/painting.png,a.png")
    out = root / "night"
    output = make_photo(out / "a.png")
    with Ledger(out) as ledger:
        run_id = ledger.start_run(manifest, [], "random", "random:vgg16:seed0")
        ledger.mark_pending(output, row=1, content="in/photo.png", styles="in/painting.png", key="k", run_id=run_id)
        ledger.mark_running(output, run_id=run_id, device="cpu", model="random", weights="random:vgg16:seed0")
        ledger.mark_finished(output, status="done", seconds=1.0, iterations=2, total_loss=1.0, precision="bf16")
        ledger.finish_run(run_id, {"done": 1})
    return root


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["check", "night.csv"],
        ["status", "night"],
        ["status", "night", "--json"],
        ["cache", "info"],
        ["weights", "list"],
        ["report", "night"],
    ],
    ids=lambda args: " ".join(args),
)
def test_a_light_command_imports_neither_torch_nor_onnxruntime(folder: Path, args: list[str]) -> None:
    env = {**os.environ, "BATCHSTYLE_CACHE": str(folder / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["code"] == 0, proc.stdout + proc.stderr
    assert probe["heavy"] == [], f"batchstyle {' '.join(args)} imported {probe['heavy']}"


def test_planning_a_run_imports_no_torch_once_its_graph_is_exported(tmp_path: Path) -> None:
    """`bench plan` is `run` up to its first row handed out, in this process; it exports the graph in a process of
    its own first (as a machine's first run does), after which the parent reads, keys, records and batches every
    row without torch: most of planning's memory on a 200,000-row manifest was torch's (docs/benchmarks.md)."""
    env = {**os.environ, "BATCHSTYLE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "bench", "plan", "--rows", "40"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["code"] == 0, proc.stdout + proc.stderr
    assert "40 rows" in proc.stdout and "torch not imported" in proc.stdout, proc.stdout
    assert probe["heavy"] == [], f"planning imported {probe['heavy']}"
    assert any((tmp_path / "cache" / "onnx").glob("*.onnx")), "the graph was not exported into the cache"
