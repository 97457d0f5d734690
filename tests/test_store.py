"""Manifests, inputs and outputs in buckets, against a real S3-protocol server (moto's, on 127.0.0.1) started here:
the client, its requests and the server's answers are the real ones; only the store is local."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SECRET, cli, make_painting, make_photo, write_manifest

from batchstyle.images import read_metadata
from batchstyle.run.ledger import LEDGER_NAME, read_records, read_runs
from batchstyle.store import StoreError, join, names, scrub, stage, work_dir
from batchstyle.version import ALGORITHM_VERSION

pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

FAST = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "2", "-q")


def _upload(client: object, bucket: str, key: str, path: Path) -> None:
    client.upload_file(str(path), bucket, key)  # type: ignore[attr-defined]


@pytest.fixture
def night(s3: object, tmp_path: Path) -> str:
    """A manifest of three rows in a bucket, its inputs beside it (one by its own URL, in another bucket)."""
    s3.create_bucket(Bucket="night")  # type: ignore[attr-defined]
    s3.create_bucket(Bucket="paintings")  # type: ignore[attr-defined]
    local = tmp_path / "made"
    for k in range(3):
        _upload(s3, "night", f"photos/c{k}.png", make_photo(local / f"c{k}.png", 40, 32, seed=k))
    _upload(s3, "paintings", "s0.png", make_painting(local / "s0.png"))
    rows = "content,style\n" + "".join(f"photos/c{k}.png,s3://paintings/s0.png\n" for k in range(3))
    s3.put_object(Bucket="night", Key="night.csv", Body=rows.encode())  # type: ignore[attr-defined]
    return "s3://night/night.csv"


def _objects(client: object, bucket: str, prefix: str = "") -> dict[str, bytes]:
    found = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])  # type: ignore[attr-defined]
    return {
        item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()  # type: ignore[attr-defined]
        for item in found
    }


def _keys(client: object, bucket: str, prefix: str = "") -> list[str]:
    """The objects' names under `prefix`, without their bodies: what a test polls while a run puts objects."""
    found = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])  # type: ignore[attr-defined]
    return [item["Key"] for item in found]


def _key_of(data: bytes, tmp_path: Path) -> str:
    copy = tmp_path / "copy.png"
    copy.write_bytes(data)
    return read_metadata(copy)["batchstyle:key"]


def test_relative_cells_resolve_against_the_manifests_url() -> None:
    assert join("s3://b/runs/night.csv", "photos/a.png") == "s3://b/runs/photos/a.png"
    assert join("s3://b/runs/night.csv", "../shared/s.png") == "s3://b/shared/s.png"
    assert join("s3://b/runs/night.csv", "gs://other/s.png") == "gs://other/s.png"
    assert scrub("https://user:pw@host:8443/a/b.png?X-Amz-Signature=abc#f") == "https://host:8443/a/b.png"


def test_a_cause_names_a_missing_frame_403_as_missing_and_quotes_no_signature() -> None:
    """The cause goes into the ledger and the row's error: a missing object whose name holds 403 is missing, not
    denied (a shared cache's miss, not its failure), and an HTTP client's error quoting a signed URL is scrubbed."""
    from batchstyle.store import NO_SUCH_OBJECT, _cause

    assert _cause(FileNotFoundError("night/out/walk.mp4.frames/frame-000403.png")) == (NO_SUCH_OBJECT, False)
    assert _cause(FileNotFoundError("night/photos/403.png")) == (NO_SUCH_OBJECT, False)
    refused = FileNotFoundError("https://h/b/k.png")  # as fsspec's HTTP client raises a 403: chained
    refused.__cause__ = OSError("403, message='Forbidden'")
    assert _cause(refused)[0].startswith("access denied")
    assert _cause(OSError("GET https://h/b/k.png?X-Amz-Signature=abc: 403 Forbidden"))[0].startswith("access denied")
    busy, transient = _cause(OSError(f"503 ServiceUnavailable for https://h/b/k.png?X-Amz-Signature={SECRET}"))
    assert transient and "https://h/b/k.png" in busy and SECRET not in busy and "X-Amz" not in busy


def test_no_credential_in_a_url_on_the_command_line_reaches_the_ledger(tmp_path: Path) -> None:
    """The ledger keeps the command line a run was started with: a signed URL's query or a user:password@ in it
    would be a credential on disk, read by `status`, reports and the live page."""
    from batchstyle.manifest import read_manifest
    from batchstyle.options import default_values
    from batchstyle.run.config import RunConfig
    from batchstyle.run.engine import run

    make_photo(tmp_path / "p.png")
    make_painting(tmp_path / "s.png")
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "p.png,s.png")
    signed = f"https://reader:{SECRET}@host:9000/in/night.csv?X-Amz-Signature={SECRET}&X-Amz-Credential=AKIA"
    argv = ("batchstyle", "run", "m.csv", f"--style={signed}", "--content", signed)
    values = default_values() | {"size": 32, "iterations": 2, "min_size": 0}
    summary = run(read_manifest(manifest, values, tmp_path / "out"), RunConfig(model="random", argv=argv))
    assert summary.exit_code == 0
    ledger = (tmp_path / "out" / LEDGER_NAME).read_bytes()
    assert SECRET.encode() not in ledger and b"X-Amz" not in ledger
    assert b"https://host:9000/in/night.csv" in ledger  # the URL itself is kept, for the record


def test_a_manifest_inputs_and_outputs_in_buckets(night: str, s3: object, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    result = cli("run", night, "--out", "s3://night/out/", "--ledger", ledger, *FAST)
    assert result.exit_code == 0, result.output
    outputs = _objects(s3, "night", "out/")
    assert sorted(outputs) == [f"out/c{k}-s0.png" for k in range(3)]
    records = read_records(ledger)[0]
    assert {r.output: r.status for r in records} == {f"c{k}-s0.png": "done" for k in range(3)}
    for record in records:  # each object is the finished output its ledger row names
        assert _key_of(outputs["out/" + record.output], tmp_path) == record.key
    assert "s3://night/out/" in result.output and str(ledger) in result.output
    # No credential anywhere: the ledger, the outputs' metadata, what was printed.
    assert SECRET not in result.output
    assert all(SECRET.encode() not in data for data in outputs.values())
    assert all(SECRET.encode() not in f.read_bytes() for f in ledger.iterdir() if f.is_file())
    assert [run["manifest"] for run in read_runs(ledger).values()] == [night]  # its URL, not the staged copy
    # Nothing left in the ledger's folder but the ledger: each output went up and its local copy went.
    assert not list(ledger.glob("*.png"))

    again = cli("run", night, "--out", "s3://night/out/", "--ledger", ledger, *FAST)
    assert again.exit_code == 0 and "skipped      3" in again.output, again.output

    # The ledger lost: a rerun recovers the three outputs from the bucket (their keys), redoing none.
    for file in ledger.iterdir():
        file.unlink()
    recovered = cli("run", night, "--out", "s3://night/out/", "--ledger", ledger, *FAST)
    assert recovered.exit_code == 0 and "skipped      3" in recovered.output, recovered.output
    assert _objects(s3, "night", "out/") == outputs


def test_the_default_out_is_beside_the_manifest_and_the_ledger_in_the_cache(night: str, s3: object) -> None:
    result = cli("run", night, *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(_objects(s3, "night", "night/")) == [f"night/c{k}-s0.png" for k in range(3)]
    assert (work_dir("s3://night/night/") / LEDGER_NAME).is_file()


def test_a_url_cache_dir_shares_targets_and_graphs_between_machines(
    night: str, s3: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two machines sharing no folder (two local caches) and one --cache-dir URL: what the first computed (the
    targets, the exported graph) the second fetches rather than computes; each keeps a local copy in its own cache."""
    s3.create_bucket(Bucket="cache")  # type: ignore[attr-defined]
    runs = {}

    def run_on(machine: str) -> None:
        monkeypatch.setenv("BATCHSTYLE_CACHE", str(tmp_path / machine))
        ledger = tmp_path / f"ledger-{machine}"
        out = f"s3://night/out-{machine}/"
        loud = [arg for arg in FAST if arg != "-q"]  # the run's messages say whether it exported the graph
        result = cli("run", night, "--out", out, "--ledger", ledger, "--cache-dir", "s3://cache/bs/", *loud)
        assert result.exit_code == 0, result.output
        runs[machine] = result.output, {r.row: r.targets for r in read_records(ledger)[0]}

    run_on("first")
    run_on("second")
    shared = sorted(_objects(s3, "cache", "bs/"))
    graphs = [key for key in shared if key.startswith("bs/onnx/")]
    # Under the algorithm's version, which the file's name leaves out: two versions never meet at one name.
    assert len(graphs) == 1 and graphs[0].startswith(f"bs/onnx/{ALGORITHM_VERSION}/") and graphs[0].endswith(".onnx")
    assert (tmp_path / "second" / "onnx" / Path(graphs[0]).name).is_file()
    entries = [key for key in shared if key.startswith("bs/targets/")]
    assert len(entries) == 4 and all(key.endswith(".safetensors") for key in entries)  # 3 contents, 1 style
    assert "exporting the target graph" in runs["first"][0]
    assert "exporting the target graph" not in runs["second"][0]
    assert set(runs["first"][1].values()) != {"content=hit style=hit"}
    assert set(runs["second"][1].values()) == {"content=hit style=hit"}, runs["second"][1]
    assert len(list((tmp_path / "second" / "targets").glob("*/*.safetensors"))) == 4  # its own local copies

    # A graph in the store that is not what its name says is never used: the third machine exports its own and puts
    # it in the other's place.
    s3.put_object(Bucket="cache", Key=graphs[0], Body=b"not a graph")  # type: ignore[attr-defined]
    run_on("third")
    assert "exporting the target graph" in runs["third"][0]
    local = (tmp_path / "third" / "onnx" / Path(graphs[0]).name).read_bytes()
    assert _objects(s3, "cache", graphs[0])[graphs[0]] == local

    # Other commands keep their cache in a folder: a URL there is refused, not taken as a folder named "s3:".
    refused = cli("cache", "info", "--cache-dir", "s3://cache/bs/")
    assert refused.exit_code == 2 and "a URL cache is shared by `batchstyle run`" in refused.output


def test_the_folder_forms_listing_gives_staging_the_etags_so_no_object_is_asked_for_twice(
    s3: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--content s3://many/photos/` lists the prefix to find its photos; staging them then takes their ETags and
    sizes from that listing rather than a HEAD each, names each copy as a HEAD would have, and tomorrow's rerun (the
    photos already here) fetches nothing. Requests counted in moto's own request log."""
    from batchstyle.manifest import read_manifest
    from batchstyle.options import default_values
    from batchstyle.sources import find_rows

    s3.create_bucket(Bucket="many")  # type: ignore[attr-defined]
    for k in range(5):
        _upload(s3, "many", f"photos/p{k}.png", make_photo(tmp_path / "made" / f"p{k}.png", 16, 12, seed=k))
    _upload(s3, "many", "style.png", make_painting(tmp_path / "made" / "style.png", 16, 16))

    def requests(verb: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if f'"{verb} /many/' in r.getMessage()]

    def plan() -> dict[str, Path]:
        sources = find_rows(["s3://many/photos/"], ["s3://many/style.png"])
        assert sorted(sources.listed) == [*(f"s3://many/photos/p{k}.png" for k in range(5)), "s3://many/style.png"]
        out = tmp_path / "out"
        manifest = read_manifest(
            sources.label, default_values(), out, source_table=sources.table, listed=sources.listed
        )
        assert not manifest.problems
        return {source: path for path, source in manifest.sources.items()}

    with caplog.at_level(logging.INFO, logger="werkzeug"):
        first = plan()
        # One HEAD: --style names an object, and finding it is asking for it; staging asks for nothing more.
        assert len(requests("HEAD")) == 1 and "/many/style.png" in requests("HEAD")[0], requests("HEAD")
        assert len([r for r in requests("GET") if "/photos/p" in r or "/style.png" in r]) == 6
        caplog.clear()
        again = plan()
        assert len(requests("HEAD")) == 1 and [r for r in requests("GET") if ".png" in r] == [], requests("GET")
    assert first == again
    assert stage("s3://many/photos/p0.png") == first["s3://many/photos/p0.png"]  # a HEAD names the copy alike
    assert first["s3://many/photos/p0.png"].read_bytes() == (tmp_path / "made" / "p0.png").read_bytes()


def test_a_missing_bucket_and_a_denied_key_are_named_with_their_url(night: str, s3: object, tmp_path: Path) -> None:
    # The server denies one photo by the bucket's policy: that row fails with its URL and the cause; the rest run.
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::night/photos/c1*"}
        ],
    }
    s3.put_bucket_policy(Bucket="night", Policy=json.dumps(policy))  # type: ignore[attr-defined]
    checked = cli("check", night, "--out", "s3://night/out/")
    assert checked.exit_code == 1, checked.output
    assert "row 2" in checked.output and "s3://night/photos/c1.png" in checked.output
    assert "access denied" in checked.output and "Traceback" not in checked.output
    assert "1 with problems" in checked.output
    with pytest.raises(StoreError, match="access denied"):
        stage("s3://night/photos/c1.png")
    with pytest.raises(StoreError, match="no such object"):
        stage("s3://night/photos/c9.png")
    assert names("s3://night/nothing-here/") == frozenset()

    missing = cli("run", "s3://no-such-bucket/night.csv", *FAST)
    assert missing.exit_code == 2
    assert "s3://no-such-bucket/night.csv" in missing.output and "the bucket does not exist" in missing.output
    assert "Traceback" not in missing.output

    out = cli("run", night, "--out", "s3://no-such-bucket/out/", "--ledger", tmp_path / "l", *FAST)
    assert out.exit_code == 2, out.output
    assert "s3://no-such-bucket/out" in out.output and "the bucket does not exist" in out.output


def test_a_run_killed_mid_way_loses_nothing_and_redoes_nothing(night: str, s3: object, tmp_path: Path) -> None:
    ledger, log = tmp_path / "ledger", tmp_path / "log.jsonl"
    args = [sys.executable, "-m", "batchstyle", "run", night, "--out", "s3://night/out/", "--ledger", str(ledger)]
    args += [*FAST[:-3], "--iterations", "60", "-q", "--log-json", str(log)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while not any('"done"' in line for line in (log.read_text().splitlines() if log.is_file() else [])):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no row finished"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _objects(s3, "night", "out/")
    assert before, "a row was done before the kill"
    for data in before.values():  # every object under an output's name is a whole image
        _key_of(data, tmp_path)
    rerun = cli("run", night, "--out", "s3://night/out/", "--ledger", ledger, *FAST[:-3], "--iterations", "60", "-q")
    assert rerun.exit_code == 0, rerun.output
    after = _objects(s3, "night", "out/")
    assert sorted(after) == [f"out/c{k}-s0.png" for k in range(3)]
    assert all(after[name] == data for name, data in before.items()), "a finished output was redone"
    assert f"skipped {len(before):>6}" in rerun.output


@pytest.fixture
def two_nodes(s3: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """A Ray cluster of two nodes on this machine, one CPU each (so one actor each), started after the S3 fixture
    has put the credentials in the environment, which Ray hands on to the actors. Each node has a staging folder
    and a cache of its own ($BATCHSTYLE_STAGING, $BATCHSTYLE_CACHE in its raylet's environment): nothing an actor
    reads or writes is in a folder the driver uses."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # another module's Ray (tests/test_engine.py's, one node)
        ray.shutdown()
    nodes = {name: tmp_path / f"node-{name}" for name in ("a", "b")}
    # A short temp dir: Ray's sockets live there and AF_UNIX paths stop at 107 bytes. RAY_TMPDIR also keeps the
    # cluster's address file out of /tmp/ray, where any other Ray on this machine would find it.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.mkdir(os.path.join(temp, "ray"))
    monkeypatch.setenv("RAY_TMPDIR", temp)
    cluster = Cluster()
    for folder in nodes.values():
        env = {"BATCHSTYLE_STAGING": str(folder / "staging"), "BATCHSTYLE_CACHE": str(folder / "cache")}
        extra = {"include_dashboard": False} if not cluster.head_node else {}
        cluster.add_node(num_cpus=1, env_vars=env, object_store_memory=80 * 1024**2, **extra)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    # Two nodes of one CPU: RayPool places one actor on each.
    assert [node["Resources"].get("CPU") for node in ray.nodes() if node["Alive"]] == [1.0, 1.0]
    yield nodes
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.is_dir() else []


def test_a_ray_run_with_two_actors_and_no_shared_folder(
    two_nodes: dict[str, Path], night: str, s3: object, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    # fp32: no precision probe per actor; no --cache-dir: each actor uses its node's own cache.
    result = cli(
        "run", night, "--out", "s3://night/out/", "--ledger", ledger, "--backend", "ray", "--precision", "fp32",
        *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    outputs = _objects(s3, "night", "out/")
    assert sorted(outputs) == [f"out/c{k}-s0.png" for k in range(3)]
    records = read_records(ledger)[0]
    assert {r.status for r in records} == {"done"} and len(records) == 3
    assert all((r.device or "").startswith("ray:") for r in records), [r.device for r in records]
    assert {r.content for r in records} == {f"s3://night/photos/c{k}.png" for k in range(3)}
    for record in records:  # each object is whole and is the output its ledger row names
        assert _key_of(outputs["out/" + record.output], tmp_path) == record.key
    assert sorted(p.name for p in _files(ledger) if p.suffix == ".png") == []

    # The actors read their inputs from their own nodes' staging folders and wrote their outputs there before the
    # put (the local copies gone once put); the driver's own staging folder is only what it read to plan.
    staged = [path.name for node in two_nodes.values() for path in _files(node / "staging")]
    assert {f"c{k}.png" for k in range(3)} <= set(staged) and "s0.png" in staged, staged
    assert not [p for node in two_nodes.values() for p in _files(node / "staging" / "outputs")]
    # Each node that ran rows kept its targets in its own cache; the driver's cache holds no actor's targets.
    working = [node for node in two_nodes.values() if _files(node / "staging")]
    for node in working:
        assert _files(node / "cache" / "targets"), _files(node / "cache")

    again = cli("run", night, "--out", "s3://night/out/", "--ledger", ledger, "--backend", "ray", *FAST)
    assert again.exit_code == 0 and "skipped      3" in again.output, again.output


@pytest.mark.slow
def test_a_clip_in_two_chunks_on_two_ray_nodes_is_assembled_from_the_store(
    two_nodes: dict[str, Path], s3: object, tmp_path: Path
) -> None:
    """The clip's two chunks run on Ray actors, each node with a staging folder of its own, and each frame is put as
    it is made; the driver shares no folder with either node: it fetches every frame back from the store to
    assemble the video, and puts it."""
    pytest.importorskip("av")
    from test_video import make_clip

    s3.create_bucket(Bucket="night")  # type: ignore[attr-defined]
    _upload(s3, "night", "in/pan.mp4", make_clip(tmp_path / "made" / "pan.mp4", frames=16, audio=False))
    _upload(s3, "night", "in/s.png", make_painting(tmp_path / "made" / "s.png"))
    s3.put_object(Bucket="night", Key="clip.csv", Body=b"content,style\nin/pan.mp4,in/s.png\n")  # type: ignore[attr-defined]
    ledger = tmp_path / "ledger"
    args = ("run", "s3://night/clip.csv", "--out", "s3://night/out/", "--ledger", ledger, "--backend", "ray")
    args += ("--clip-chunks", "2")
    result = cli(*args, "--precision", "fp32", *CLIP)
    assert result.exit_code == 0, result.output
    objects = _objects(s3, "night", "out/")
    [record] = read_records(ledger)[0]
    assert record.status == "done" and (record.device or "").startswith("ray:")
    assert _probe(objects["out/pan-s.mp4"], tmp_path) == (16, record.key)
    assert len([name for name in objects if "/lead-" in name]) == 4, "one chunk a node, the second with a lead-in"
    # The nodes that made frames staged the clip themselves, and keep no frame once it was put; the driver's own
    # staging folder never held one, so the video was assembled from what it fetched back.
    working = [node for node in two_nodes.values() if _files(node / "staging")]
    assert working and all("pan.mp4" in [p.name for p in _files(node / "staging")] for node in working)
    assert not [p for node in two_nodes.values() for p in _files(node / "staging" / "outputs")]
    again = cli(*args, *CLIP)
    assert again.exit_code == 0 and "skipped      1" in again.output, again.output


def test_bench_store_times_local_and_store_runs_and_plans_a_listing(s3: object) -> None:
    s3.create_bucket(Bucket="bench")  # type: ignore[attr-defined]
    args = ("--rows", "2", "--size", "32", "--iterations", "2", "--repeats", "1", "--plan-rows", "5")
    result = cli("bench", "store", "s3://bench/scratch/", *args)
    assert result.exit_code == 0, result.output
    assert re.search(r"^store over local: [+-]\d+\.\d% per row", result.output, re.MULTILINE), result.output
    assert "5 objects from a bucket listing" in result.output
    keys = list(_objects(s3, "bench", "scratch/"))
    # The timed store run's two outputs were put, whole, beside the inputs it read (warm-up's too).
    assert len([key for key in keys if "/out1/" in key]) == 2 and len([k for k in keys if "/out0/" in k]) == 2
    assert len([key for key in keys if "/photos/p" in key and "bench-plan-" in key]) == 5

    refused = cli("bench", "store", "/tmp/not-a-store")
    assert refused.exit_code == 2 and "give a store's URL prefix" in refused.output
    missing = cli("bench", "store", "s3://no-such-bucket/x/")
    assert missing.exit_code == 2 and "the bucket does not exist" in missing.output


def test_save_every_with_a_url_out_puts_each_iterate_beside_the_output(night: str, s3: object, tmp_path: Path) -> None:
    """Each iterate is written in the node's staging area and put to `<output stem>.iterates/` under the out prefix,
    one put each; an iterate that cannot be put fails its row, as one that cannot be written does."""
    ledger = tmp_path / "ledger"
    result = cli("run", night, "--out", "s3://night/out/", "--ledger", ledger, *FAST, "--save-every", "1")
    assert result.exit_code == 0, result.output
    objects = _objects(s3, "night", "out/")
    for k in range(3):
        iterates = sorted(name for name in objects if name.startswith(f"out/c{k}-s0.iterates/"))
        assert len(iterates) >= 2, sorted(objects)
        assert all(re.fullmatch(r".*/scale\d+-iter\d{5}\.png", name) for name in iterates), iterates
        copy = tmp_path / "iterate.png"
        copy.write_bytes(objects[iterates[-1]])  # whole: it opens, and says what it is
        assert read_metadata(copy)["batchstyle:iterate"].startswith("scale ")
        assert f"out/c{k}-s0.png" in objects
    assert not _files(tmp_path / "staging" / "outputs"), "the local copy of each iterate goes once it is put"
    assert not list(ledger.rglob("*.iterates"))

    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::night/out2/c1-*"}
        ],
    }
    s3.put_bucket_policy(Bucket="night", Policy=json.dumps(policy))  # type: ignore[attr-defined]
    denied = cli("run", night, "--out", "s3://night/out2/", "--ledger", tmp_path / "l2", *FAST, "--save-every", "1")
    assert denied.exit_code == 1, denied.output
    assert "row 2: cannot put an iterate to s3://night/out2/c1-s0.iterates/scale" in denied.output
    assert "access denied" in denied.output and "Traceback" not in denied.output
    stored = _objects(s3, "night", "out2/")
    assert "out2/c0-s0.png" in stored and "out2/c2-s0.png" in stored and "out2/c1-s0.png" not in stored


CLIP = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "4", "--min-size", "0", "-q")


def _probe(data: bytes, tmp_path: Path, name: str = "clip.mp4") -> tuple[int, str | None]:
    """(frames, job key) of a video object's bytes."""
    from batchstyle.video import clip_key, probe_clip

    copy = tmp_path / "probed" / name
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(data)
    return probe_clip(copy).frames, clip_key(copy)


@pytest.mark.slow
def test_a_clip_with_a_url_out_is_put_whole_and_a_rerun_or_a_lost_ledger_skips_it(s3: object, tmp_path: Path) -> None:
    """A clip read from the bucket, in two chunks: each frame is put to `<output>.frames/` as it is written, the
    parent fetches them back to assemble the video and puts it in one put, and the row is done only then. The video
    carries its job key, so a rerun after the ledger is lost recovers it."""
    pytest.importorskip("av")
    from test_video import make_clip

    s3.create_bucket(Bucket="night")  # type: ignore[attr-defined]
    _upload(s3, "night", "in/pan.mp4", make_clip(tmp_path / "made" / "pan.mp4", frames=16, audio=False))
    make_painting(tmp_path / "s.png")
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "s3://night/in/pan.mp4,s.png")
    ledger = tmp_path / "ledger"
    args = ("run", manifest, "--out", "s3://night/out/", "--ledger", ledger, *CLIP, "--clip-chunks", "2")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    objects = _objects(s3, "night", "out/")
    [record] = read_records(ledger)[0]
    assert record.status == "done" and record.output == "pan-s.mp4"
    assert _probe(objects["out/pan-s.mp4"], tmp_path) == (16, record.key)
    frames = sorted(name for name in objects if name.startswith("out/pan-s.mp4.frames/"))
    assert [n for n in frames if "/frame-" in n] == [f"out/pan-s.mp4.frames/frame-{i:06d}.png" for i in range(16)]
    assert [n for n in frames if "/lead-" in n] == [f"out/pan-s.mp4.frames/lead-{i:06d}.png" for i in range(4, 8)]
    assert len(objects) == 1 + 16 + 4
    # No copy left on this node: the frames and the video went once put; nothing in the ledger's folder either.
    assert not _files(tmp_path / "staging" / "outputs")
    assert not [p for p in _files(ledger) if p.suffix in (".png", ".mp4")]

    again = cli(*args)
    assert again.exit_code == 0 and "skipped      1" in again.output, again.output
    for file in ledger.iterdir():
        file.unlink()
    recovered = cli(*args)
    assert recovered.exit_code == 0 and "skipped      1" in recovered.output, recovered.output
    assert _objects(s3, "night", "out/") == objects


@pytest.mark.slow
def test_a_frame_folder_output_with_a_url_out_is_an_object_a_frame(s3: object, tmp_path: Path) -> None:
    """A frame folder as content gives a folder of frames: each frame put under the output's prefix, in order, before
    the row is recorded done. The folder is there once its last frame is, so a rerun skips it; with the ledger lost
    it is assembled again from the stored frames (none stylized again), and replaces the folder whole."""
    s3.create_bucket(Bucket="night")  # type: ignore[attr-defined]
    for k in range(3):
        make_photo(tmp_path / "walk" / f"f{k:03d}.png", 40, 32, seed=k)
    make_painting(tmp_path / "s.png")
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "walk,s.png")
    ledger = tmp_path / "ledger"
    args = ("run", manifest, "--out", "s3://night/out/", "--ledger", ledger, *CLIP)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    objects = _objects(s3, "night", "out/")
    [record] = read_records(ledger)[0]
    assert record.status == "done" and record.output == "walk-s"
    folder = [f"out/walk-s/frame-{i:06d}.png" for i in range(3)]
    assert sorted(name for name in objects if name.startswith("out/walk-s/")) == folder
    assert all(_key_of(objects[name], tmp_path) == record.key for name in folder)
    assert sorted(name for name in objects if name.startswith("out/walk-s.frames/")) == [
        f"out/walk-s.frames/frame-{i:06d}.png" for i in range(3)
    ]
    assert not _files(tmp_path / "staging" / "outputs")

    again = cli(*args)
    assert again.exit_code == 0 and "skipped      1" in again.output, again.output

    s3.put_object(Bucket="night", Key="out/walk-s/frame-000009.png", Body=b"an older, longer assembly's")  # type: ignore[attr-defined]
    for file in ledger.iterdir():
        file.unlink()
    redone = cli(*args, "--log-json", tmp_path / "log.jsonl")
    assert redone.exit_code == 0 and "done         1" in redone.output, redone.output
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"] == "iteration"], "a frame was stylized again"
    after = _objects(s3, "night", "out/")
    assert "out/walk-s/frame-000009.png" not in after
    assert {name: data for name, data in after.items() if ".frames/" in name} == {
        name: data for name, data in objects.items() if ".frames/" in name
    }


@pytest.mark.slow
def test_a_clip_killed_mid_run_resumes_from_the_stored_frames_and_never_shows_a_partial_video(
    s3: object, tmp_path: Path
) -> None:
    pytest.importorskip("av")
    from PIL import Image, PngImagePlugin
    from test_video import make_clip

    s3.create_bucket(Bucket="night")  # type: ignore[attr-defined]
    make_clip(tmp_path / "long.mp4", frames=24, audio=False)
    make_painting(tmp_path / "s.png")
    manifest = write_manifest(tmp_path / "m.csv", "content,style,output", "long.mp4,s.png,clip.mp4")
    ledger = tmp_path / "ledger"
    args = ["run", str(manifest), "--out", "s3://night/out/", "--ledger", str(ledger), *CLIP]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchstyle", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    try:
        while len([key for key in _keys(s3, "night", "out/") if "/frame-" in key]) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no frame was put"
            assert "out/clip.mp4" not in _keys(s3, "night", "out/")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _objects(s3, "night", "out/")
    assert "out/clip.mp4" not in before, "no video before every frame is done"
    assert 4 <= len(before) < 24
    # A finished frame marked in the store: the rerun must take it as it is, not make it again.
    name = sorted(before)[1]
    copy = tmp_path / "marked.png"
    copy.write_bytes(before[name])
    with Image.open(copy) as image:
        info = PngImagePlugin.PngInfo()
        for key, value in image.text.items():
            info.add_text(key, value)
        info.add_text("test:untouched", "1")
        image.save(copy, pnginfo=info)
    s3.put_object(Bucket="night", Key=name, Body=copy.read_bytes())  # type: ignore[attr-defined]
    rerun = cli(*args)
    assert rerun.exit_code == 0, rerun.output
    after = _objects(s3, "night", "out/")
    assert _probe(after["out/clip.mp4"], tmp_path)[0] == 24
    assert len([n for n in after if n.startswith("out/clip.mp4.frames/frame-")]) == 24
    marked = tmp_path / "marked-after.png"
    marked.write_bytes(after[name])
    assert read_metadata(marked).get("test:untouched") == "1", "a finished frame was made again"


def _figures(page: str) -> dict[tuple[str, str], str]:
    """Each thumbnail cell of the report's rows by (role, where it is shown to be): its data URI, or its
    placeholder's word."""
    found = {}
    for role, title, uri, word in re.findall(
        r'<figure class="(content|style|output)" title="([^"]*)">'
        r'(?:<img class="thumb" alt="[^"]*" src="(data:image/jpeg;base64,[^"]+)">|<div class="placeholder">([^<]*))',
        page,
    ):
        found[(role, title.split(": ")[0])] = uri or word
    return found


def _decodes(uri: str) -> bool:
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2], validate=True))) as image:
        image.load()
        return image.height > 0


def test_a_report_of_a_run_into_a_bucket_is_put_beside_its_outputs(night: str, s3: object, tmp_path: Path) -> None:
    """`run --report` and `batchstyle report URL`: the ledger is local, the outputs and inputs are read from the
    store, and both files are put under the output prefix; an output or input gone since shows as such, a file the
    report did not write is never replaced, and a signed URL's query never reaches the page."""
    from botocore.config import Config

    signer = __import__("boto3").client("s3", config=Config(signature_version="s3v4"))
    _upload(s3, "paintings", "s1.png", make_painting(tmp_path / "made" / "s1.png", seed=4))
    signed = signer.generate_presigned_url("get_object", Params={"Bucket": "paintings", "Key": "s1.png"})
    assert "X-Amz-Signature=" in signed
    rows = "content,style\n" + "".join(f"photos/c{k}.png,s3://paintings/s0.png\n" for k in range(3))
    s3.put_object(Bucket="night", Key="night.csv", Body=(rows + f"photos/c0.png,{signed}\n").encode())  # type: ignore[attr-defined]
    ledger = tmp_path / "ledger"

    result = cli("run", night, "--out", "s3://night/out/", "--ledger", ledger, "--report", *FAST)
    assert result.exit_code == 0, result.output
    assert "report: s3://night/out/report.html  contact sheet: s3://night/out/contact-sheet.png" in result.output
    objects = _objects(s3, "night", "out/")
    assert sorted(objects) == sorted(
        ["out/contact-sheet.png", "out/report.html", "out/c0-s1.png", *(f"out/c{k}-s0.png" for k in range(3))]
    )
    assert objects["out/report.html"] == (ledger / "report.html").read_bytes()  # built locally, put whole
    assert read_metadata(ledger / "contact-sheet.png")["Software"] == "batchstyle report"
    page = objects["out/report.html"].decode()
    figures = _figures(page)
    for k in range(3):  # every output and every input in a bucket drawn from its object
        assert _decodes(figures[("output", f"s3://night/out/c{k}-s0.png")])
        assert _decodes(figures[("content", f"s3://night/photos/c{k}.png")])
    assert _decodes(figures[("style", "s3://paintings/s0.png")])
    assert _decodes(figures[("output", "s3://night/out/c0-s1.png")])
    # The signed style was read by the run; the ledger kept its URL without the signature, which no longer opens it.
    assert figures[("style", signed.split("?")[0])] == "unreadable"
    for text in (page, result.output):
        assert "X-Amz-" not in text and "Signature" not in text and SECRET not in text

    # An output and a photo deleted since: placeholders, not a crash. The report command finds the same ledger.
    s3.delete_object(Bucket="night", Key="out/c1-s0.png")  # type: ignore[attr-defined]
    s3.delete_object(Bucket="night", Key="photos/c2.png")  # type: ignore[attr-defined]
    again = cli("report", "s3://night/out/", "--ledger", ledger)
    assert again.exit_code == 0, again.output
    assert "wrote s3://night/out/contact-sheet.png and s3://night/out/report.html" in again.output
    figures = _figures(_objects(s3, "night", "out/report.html")["out/report.html"].decode())
    assert figures[("output", "s3://night/out/c1-s0.png")] == "missing"
    assert figures[("content", "s3://night/photos/c2.png")] == "missing"
    assert _decodes(figures[("output", "s3://night/out/c2-s0.png")])

    # An object of someone else's under the page's name is not replaced; nor is a ledger missing found elsewhere.
    s3.put_object(Bucket="night", Key="out/report.html", Body=b"<html>mine</html>")  # type: ignore[attr-defined]
    refused = cli("report", "s3://night/out/", "--ledger", ledger)
    assert refused.exit_code == 2, refused.output
    assert "s3://night/out/report.html is not a report batchstyle wrote" in refused.output
    assert _objects(s3, "night", "out/report.html")["out/report.html"] == b"<html>mine</html>"
    nowhere = cli("report", "s3://night/elsewhere/")
    assert nowhere.exit_code == 2 and "s3://night/elsewhere/ has no batchstyle-ledger.sqlite" in nowhere.output
    folder = cli("report", tmp_path, "--ledger", ledger)
    assert folder.exit_code == 2 and "--ledger names the ledger folder of a run whose OUT is a URL" in folder.output
