"""SampleTarWriter, the one tar writer: its digest is the file's, it publishes atomically, its
bytes are reproducible, and webdataset (and every stage's reader) reads what it writes."""

from __future__ import annotations

import hashlib
import tarfile

import pytest
import torch

from latentforge import formats, storage
from latentforge.precompute.writer import ShardWriter
from latentforge.tar_samples import iter_shard
from latentforge.tar_writer import TAR_MODE, SampleTarWriter


def _samples(count: int = 3) -> list[dict]:
    return [{"__key__": f"00000000{i}", "txt": f"caption {i}".encode(), "json": b'{"i": %d}' % i,
             "jpg": bytes(range(i, 256)) * 9} for i in range(count)]


def _write(uri: str, samples: list[dict]):
    with SampleTarWriter(uri) as tar:
        for sample in samples:
            tar.write(sample)
    return tar.digest


def test_digest_is_the_sha256_and_size_of_the_bytes_on_disk(tmp_path) -> None:
    digest = _write(str(tmp_path / "00000.tar"), _samples())
    data = (tmp_path / "00000.tar").read_bytes()
    assert digest.sha256 == hashlib.sha256(data).hexdigest() and digest.size == len(data)
    assert digest.size % 10240 == 0  # a whole tar record: nothing was left unwritten


def test_same_samples_give_the_same_bytes(tmp_path) -> None:
    a, b = _write(str(tmp_path / "a" / "x.tar"), _samples()), _write(str(tmp_path / "b" / "x.tar"), _samples())
    assert a == b and (tmp_path / "a" / "x.tar").read_bytes() == (tmp_path / "b" / "x.tar").read_bytes()
    with tarfile.open(tmp_path / "a" / "x.tar") as tar:  # fixed headers: no clock, no user of this machine
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", TAR_MODE)}
    assert not any(m.pax_headers for m in members)


def test_an_error_mid_write_publishes_nothing(tmp_path) -> None:
    uri = str(tmp_path / "out" / "00000.tar")
    with pytest.raises(ValueError, match="bytes"):
        with SampleTarWriter(uri) as tar:
            tar.write(_samples(1)[0])
            tar.write({"__key__": "000000001", "txt": 5})  # not bytes: webdataset refuses it
    assert list((tmp_path / "out").iterdir()) == []  # neither the tar nor its temp file
    with pytest.raises(ValueError, match="aborted"):
        tar.close()


def test_abort_removes_the_temp_and_keeps_an_older_tar(tmp_path) -> None:
    uri = str(tmp_path / "00000.tar")
    old = _write(uri, _samples(1))
    tar = SampleTarWriter(uri)
    tar.write(_samples(2)[1])
    assert len(list(tmp_path.iterdir())) == 2  # the old tar and the new one's temp
    tar.abort()
    tar.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["00000.tar"]
    assert storage.sha256_file(uri) == old.sha256


def test_webdataset_reads_the_samples_back(tmp_path) -> None:
    import webdataset as wds

    samples = _samples()
    _write(str(tmp_path / "00000.tar"), samples)
    back = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")} for s in back] == samples
    assert [dict(s, __key__=k) for k, s in iter_shard(str(tmp_path / "00000.tar"))] == samples


def test_precompute_records_the_hash_of_the_tar_it_wrote(tmp_path) -> None:
    writer = ShardWriter(str(tmp_path), "00003", "fp32", input_sha256="x")
    for i in range(2):
        writer.add({"key": f"00003000{i}", "status": "ok", "text_length": 2, "meta": '{"conditions": {"a": 1}}',
                    "caption": "c", "latent": torch.zeros(4, 2, 2).numpy(), "text": torch.ones(5, 8).numpy(),
                    "pooled": torch.ones(8).numpy()})
    record = writer.finish()
    assert record.sha256 == storage.sha256_file(writer.uri) and record.size == storage.size(writer.uri)
    members = dict(iter_shard(writer.uri))
    assert sorted(members["000030001"]) == ["cond.json", "json", "latent.npy", "pooled.npy", "text.npy", "txt"]
    assert formats.decode_npy(members["000030001"]["text.npy"]).shape == (2, 8)
