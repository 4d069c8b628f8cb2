"""One shard's files, manifests, resume and --retry-reasons bookkeeping (no Ray: fast)."""

from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq
import pytest

from latentforge import manifest as mf
from latentforge.ingest.config import IngestConfig
from latentforge.ingest.inputs import input_plan
from latentforge.ingest.shards import process_shard
from latentforge.ingest.state import open_state
from tests.harness.http_server import make_image, realistic_jpeg_pool
from tests.harness.url_lists import pool_rows, rows_for, write_rows


def config_for(tmp_path, **overrides) -> IngestConfig:
    base = dict(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), samples_per_shard=4,
                allow_private_network=True, image_size=32, timeout_s=3, retries=0, mlflow=False,
                progress=False, threads_per_shard=4)
    base.update(overrides)
    return IngestConfig(**base)


def run_local(config: IngestConfig) -> dict:
    """The driver's loop without Ray: what pipelines.ingest does, shard by shard."""
    plan = input_plan(config)
    state = open_state(config, plan)
    todo = state.pending_base() + (state.retry_descriptors(config.retry_reasons) if config.retry_reasons else [])
    for descriptor in todo:
        state.record(process_shard(descriptor, config, plan))
    return mf.read_manifest(config.output, "ingest").to_dict()


def tar_members(path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def all_keys(out) -> list[str]:
    manifest = mf.read_manifest(str(out), "ingest")
    keys = []
    for shard in manifest.shards:
        keys += [n.split(".")[0] for n in tar_members(out / f"{shard.name}.tar") if n.endswith(".jpg")]
    return sorted(keys)


@pytest.fixture
def ten_rows(tmp_path, http_server):
    http_server.set_pool(realistic_jpeg_pool(4))
    rows = pool_rows(http_server, 10, extra_n=list(range(10)), key=["clash"] * 10)
    rows[1]["url"] = http_server.route("/gone", status=404)
    rows[6]["url"] = http_server.route("/html", kind="html")
    write_rows(tmp_path / "in.parquet", rows)
    return rows


def test_shard_files_keys_and_metadata(tmp_path, ten_rows) -> None:
    config = config_for(tmp_path)
    manifest = run_local(config)
    out = tmp_path / "out"
    assert [s["name"] for s in manifest["shards"]] == ["00000", "00001", "00002"]
    assert manifest["counts"] == {"rows": 10, "samples": 8, "shards": 3, "retried": 0, "ok": 8,
                                  "http_4xx": 1, "not_image": 1}
    names = tar_members(out / "00000.tar")
    assert names == [f"00000000{i}.{ext}" for i in (0, 2, 3) for ext in ("jpg", "json", "txt")]
    with tarfile.open(out / "00000.tar") as tar:  # plain ustar members: no per-member pax header
        assert all(m.mtime == 0 and not m.pax_headers for m in tar.getmembers())
    with tarfile.open(out / "00001.tar") as tar:
        meta = json.loads(tar.extractfile("000010000.json").read())
        caption = tar.extractfile("000010000.txt").read().decode()
    assert meta["key"] == "000010000" and caption == "caption 4" == meta["caption"]  # reserved name wins
    assert meta["extra_n"] == 4 and meta["url"] == ten_rows[4]["url"]
    assert (meta["width"], meta["height"]) == (32, 32) and len(meta["sha256"]) == 64
    assert meta["original_width"] > 32
    ledger = pq.read_table(out / "00001.parquet").to_pylist()
    assert [r["key"] for r in ledger] == ["000010000", "000010001", "000010002", "000010003"]
    assert [r["row"] for r in ledger] == [4, 5, 6, 7]
    assert ledger[2]["status"] == "not_image" and ledger[2]["error"]
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["counts"] == {"http_4xx": 1, "ok": 3} and stats["row_range"] == [0, 4]
    assert manifest["config"]["samples_per_shard"] == 4 and manifest["stage"] == "ingest"


def test_rerun_skips_finished_shards_and_tars_are_deterministic(tmp_path, ten_rows, http_server) -> None:
    config = config_for(tmp_path)
    first = run_local(config)
    http_server.reset_requests()
    assert run_local(config)["shards"] == first["shards"]
    assert http_server.requests == []
    again = config_for(tmp_path, output=str(tmp_path / "out2"))
    assert [s["sha256"] for s in run_local(again)["shards"]] == [s["sha256"] for s in first["shards"]]


def test_different_samples_per_shard_is_refused(tmp_path, ten_rows, http_server, capsys) -> None:
    from jobs.download_images import main

    run_local(config_for(tmp_path))
    with pytest.raises(mf.ManifestError, match="samples_per_shard"):
        run_local(config_for(tmp_path, samples_per_shard=5))
    http_server.reset_requests()
    code = main(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                 "--samples-per-shard", "5", "--allow-private-network", "--no-mlflow", "--no-progress"])
    assert code == 2 and "samples_per_shard: 4 -> 5" in capsys.readouterr().err
    assert http_server.requests == []


def test_tar_cut_at_member_boundary_is_redone(tmp_path, ten_rows, http_server) -> None:
    config = config_for(tmp_path)
    run_local(config)
    out = tmp_path / "out"
    # Cut 00001.tar after its first sample: still a valid tar, just missing members.
    with tarfile.open(out / "00001.tar") as tar:
        members = tar.getmembers()
    cut = members[3].offset  # start of the second sample's header
    data = (out / "00001.tar").read_bytes()
    (out / "00001.tar").write_bytes(data[:cut] + b"\0" * 1024)
    with tarfile.open(out / "00001.tar") as tar:
        assert len(tar.getnames()) == 3  # a reader would happily take it
    http_server.reset_requests()
    manifest = run_local(config)
    assert len(http_server.requests) == 4  # exactly shard 1's rows were fetched again
    assert len(tar_members(out / "00001.tar")) == 9
    assert manifest["counts"]["samples"] == 8


def test_unlisted_files_are_never_trusted(tmp_path, ten_rows, http_server) -> None:
    config = config_for(tmp_path)
    run_local(config)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]  # as if killed before shards 1, 2 were recorded
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".00001.tar.tmp-deadbeef0000").write_bytes(b"half a tar")
    http_server.reset_requests()
    final = run_local(config)
    assert len(http_server.requests) == 6
    assert not list(out.glob("*.tmp-*")) and not list(out.glob(".*tmp*"))
    assert final["counts"]["rows"] == 10 and all_keys(out) == sorted(
        f"{i // 4:05d}{i % 4:04d}" for i in range(10) if i not in (1, 6))


def test_retry_reasons_refetch_only_failed_rows(tmp_path, http_server) -> None:
    http_server.set_pool(realistic_jpeg_pool(2))
    rows = pool_rows(http_server, 9)
    flaky = {2: "/flaky-a", 5: "/flaky-b", 7: "/flaky-c"}
    for i, path in flaky.items():
        rows[i]["url"] = http_server.image(path, fail_times=1, fail_status=503)
    rows[8]["url"] = http_server.route("/gone", status=404)
    write_rows(tmp_path / "in.parquet", rows)
    config = config_for(tmp_path)
    first = run_local(config)
    assert first["counts"]["http_5xx"] == 3 and first["counts"]["ok"] == 5

    http_server.reset_requests()
    retry = config_for(tmp_path, retry_reasons=["http_5xx", "timeout", "dns"])
    second = run_local(retry)
    assert sorted(r.path for r in http_server.requests) == sorted(flaky.values())  # nothing else fetched
    assert [s["name"] for s in second["shards"]][-1] == "00003"  # a new shard after the 3 base shards
    assert second["counts"] == {"rows": 9, "samples": 8, "shards": 4, "retried": 3, "ok": 8, "http_4xx": 1}
    ledger = pq.read_table(tmp_path / "out" / "00003.parquet").to_pylist()
    assert [(r["key"], r["retry_of"], r["row"], r["status"]) for r in ledger] == [
        ("000030000", "000000002", 2, "ok"), ("000030001", "000010001", 5, "ok"), ("000030002", "000010003", 7, "ok")]
    keys = all_keys(tmp_path / "out")
    assert len(keys) == len(set(keys)) == 8
    # a second identical retry run has nothing left to do
    http_server.reset_requests()
    assert run_local(retry)["counts"] == second["counts"] and http_server.requests == []


def test_hash_verification(tmp_path, http_server) -> None:
    import hashlib

    body = make_image("jpeg")
    good = hashlib.sha256(body).hexdigest()
    url = http_server.image("/a.jpg")
    write_rows(tmp_path / "in.parquet", rows_for([url, url], sha=[good, "0" * 64]))
    manifest = run_local(config_for(tmp_path, hash_col="sha"))
    assert manifest["counts"]["ok"] == 1 and manifest["counts"]["hash_mismatch"] == 1


def test_exception_mid_shard_leaves_no_visible_file(tmp_path, ten_rows, monkeypatch) -> None:
    from latentforge.ingest import shards

    config = config_for(tmp_path)
    plan = input_plan(config)
    open_state(config, plan)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shards.pq, "write_table", boom)
    with pytest.raises(RuntimeError):
        process_shard({"shard": 0, "kind": "range", "start": 0, "end": 4}, config, plan)
    visible = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert visible in (["manifest.json"], ["00000.tar", "manifest.json"])  # the tar is complete if present
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]
    assert mf.read_manifest(str(tmp_path / "out"), "ingest").shards == []


def test_worker_stdout_and_stderr_survive_the_resizer_threads(tmp_path, http_server) -> None:
    # img2dataset's Resizer points fds 1 and 2 at /dev/null around every image; from 64 threads
    # the dup/dup2 calls interleave and can leave a worker's output silenced for good.
    import os

    http_server.set_pool(realistic_jpeg_pool(8))
    write_rows(tmp_path / "in.parquet", pool_rows(http_server, 600))
    config = config_for(tmp_path, samples_per_shard=600, threads_per_shard=64, max_per_host=64)
    before = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
    assert run_local(config)["counts"]["ok"] == 600
    assert [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)] == before


@pytest.mark.parametrize("name", ["in.csv", "in.jsonl.gz"])
def test_text_input_shards_equal_the_parquet_inputs(tmp_path, http_server, name: str) -> None:
    # The same url/caption rows as parquet and as text: byte-identical tars, ledgers and manifests' shards.
    http_server.set_pool(realistic_jpeg_pool(3))
    rows = pool_rows(http_server, 11)
    rows[5]["url"] = http_server.route("/gone", status=404)
    write_rows(tmp_path / "in.parquet", rows)
    write_rows(tmp_path / name, rows)
    reference = run_local(config_for(tmp_path, output=str(tmp_path / "ref")))
    manifest = run_local(config_for(tmp_path, input=str(tmp_path / name)))
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert len(manifest["shards"]) == 3 and manifest["counts"] == reference["counts"]
    for shard in reference["shards"]:
        ledger, expected = (pq.read_table(tmp_path / d / f"{shard['name']}.parquet") for d in ("out", "ref"))
        assert ledger.drop_columns(["seconds"]).equals(expected.drop_columns(["seconds"]))


def test_a_fresh_worker_writes_the_same_tar_without_importing_torch(tmp_path, http_server) -> None:
    """A new worker process's shard code (the warm-up, then one shard) imports neither torch nor
    webdataset's package (which imports torch: 1-2 CPU-seconds per worker before its first shard),
    writes the tar byte for byte as webdataset's package does here, and a later
    `import webdataset` in that process still gets the whole package."""
    import subprocess
    import sys

    import webdataset  # the reference run below writes through the package as imported normally

    http_server.set_pool(realistic_jpeg_pool(3))
    write_rows(tmp_path / "in.parquet", pool_rows(http_server, 4))
    reference = run_local(config_for(tmp_path, output=str(tmp_path / "ref")))["shards"][0]["sha256"]
    config = config_for(tmp_path)
    code = ("import hashlib, sys\n"
            "from latentforge.ingest.config import IngestConfig\n"
            "from latentforge.ingest.inputs import input_plan\n"
            "from latentforge.ingest.shards import process_shard, warm_worker\n"
            f"config = IngestConfig(**{config.__dict__!r})\n"
            "warm_worker(config)\n"
            "record = process_shard({'shard': 0, 'kind': 'range', 'start': 0, 'end': 4}, config, input_plan(config))\n"
            "print(record['sha256'], record['samples'], 'torch' in sys.modules, 'webdataset' in sys.modules)\n"
            "import webdataset\n"
            "print(hasattr(webdataset, 'WebDataset'), 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [reference, "4", "False", "False", "True", "True"]
    assert hasattr(webdataset, "TarWriter")
