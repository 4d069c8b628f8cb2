"""Input reading: formats, directories/globs, column flags, failures before any download."""

from __future__ import annotations

import functools
import gzip

import pytest

from latentforge.ingest import inputs
from latentforge.ingest.inputs import InputError, read_rows, split_record
from tests.harness.url_lists import CountingFileSystem, counting_uri, rows_for, write_rows

ROWS = rows_for([f"http://example.com/{i}.jpg" for i in range(7)], extra_a=list(range(7)),
                extra_b=[f"b{i}" for i in range(7)])


@pytest.fixture
def plan_input(tmp_path):
    """`inputs.plan_input` with an index dir of this test's own (text files are copied there)."""
    return functools.partial(inputs.plan_input, index_dir=str(tmp_path / "index"))


@pytest.mark.parametrize("name", ["in.parquet", "in.csv", "in.tsv", "in.jsonl", "in.csv.gz", "in.tsv.gz",
                                  "in.jsonl.gz"])
def test_formats(tmp_path, plan_input, name: str) -> None:
    path = write_rows(tmp_path / name, ROWS)
    plan = plan_input(str(path), "url", "caption")
    assert plan.total_rows == 7 and plan.extra_cols == ["extra_a", "extra_b"]
    got = list(read_rows(plan, 2, 5))
    assert [i for i, _ in got] == [2, 3, 4]
    url, caption, expected, extra = split_record(plan, got[0][1])
    assert (url, caption, expected) == ("http://example.com/2.jpg", "caption 2", None)
    assert str(extra["extra_a"]) == "2" and extra["extra_b"] == "b2"


def test_directory_and_glob_concatenate_in_name_order(tmp_path, plan_input) -> None:
    write_rows(tmp_path / "d" / "part-1.parquet", ROWS[3:], row_group_size=2)
    write_rows(tmp_path / "d" / "part-0.csv", ROWS[:3])
    (tmp_path / "d" / "README.txt").write_text("not an input")
    for uri in (str(tmp_path / "d"), str(tmp_path / "d" / "part-*"), f"file://{tmp_path / 'd'}"):
        plan = plan_input(uri, "url", "caption")
        assert [f.rows for f in plan.files] == [3, 4]
        assert [r["url"] for _, r in read_rows(plan, 0, 7)] == [r["url"] for r in ROWS]
        assert [i for i, _ in read_rows(plan, 2, 6)] == [2, 3, 4, 5]


def test_laion_columns_by_flag(tmp_path, plan_input) -> None:
    path = write_rows(tmp_path / "laion.parquet", rows_for(["http://e.com/a.jpg"], url_col="URL",
                                                           caption_col="TEXT", WIDTH=[10]))
    with pytest.raises(InputError, match="missing column.*url"):
        plan_input(str(path), "url", "caption")
    plan = plan_input(str(path), "URL", "TEXT")
    url, caption, _, extra = split_record(plan, next(read_rows(plan, 0, 1))[1])
    assert url == "http://e.com/a.jpg" and caption == "caption 0" and extra == {"WIDTH": 10}


def test_hash_column(tmp_path, plan_input) -> None:
    path = write_rows(tmp_path / "h.jsonl", rows_for(["http://e.com/a.jpg"], sha=["ABC"]))
    plan = plan_input(str(path), "url", "caption", hash_col="sha")
    assert split_record(plan, next(read_rows(plan, 0, 1))[1])[2] == "abc"


def test_missing_caption_column_is_refused_unless_disabled(tmp_path, plan_input) -> None:
    path = write_rows(tmp_path / "u.csv", [{"url": "http://e.com/a.jpg"}])
    with pytest.raises(InputError, match="caption"):
        plan_input(str(path), "url", "caption")
    assert plan_input(str(path), "url", None).total_rows == 1


@pytest.mark.parametrize("content,match", [
    (b"", "no rows"),
    (b"url,caption\n", "no rows"),
    (b"PAR1garbagegarbage", "cannot read"),
])
def test_empty_and_unreadable(tmp_path, plan_input, content: bytes, match: str) -> None:
    path = tmp_path / ("in.parquet" if content.startswith(b"PAR1") else "in.csv")
    path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        plan_input(str(path), "url", "caption")


def test_bad_gzip_and_missing_path(tmp_path, plan_input) -> None:
    (tmp_path / "in.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="cannot read"):
        plan_input(str(tmp_path / "in.jsonl.gz"), "url", "caption")
    with pytest.raises(InputError, match="does not exist"):
        plan_input(str(tmp_path / "nope.parquet"), "url", "caption")
    (tmp_path / "bad.jsonl").write_bytes(gzip.compress(b"x") + b"\n")
    with pytest.raises(InputError):
        plan_input(str(tmp_path / "bad.jsonl"), "url", "caption")


def test_job_fails_before_any_download(tmp_path, http_server) -> None:
    from jobs.download_images import main

    url = http_server.image("/a.jpg")
    path = write_rows(tmp_path / "in.csv", [{"link": url, "caption": "x"}])
    code = main(["--input", str(path), "--output", str(tmp_path / "out"), "--allow-private-network",
                 "--no-mlflow", "--no-progress"])
    assert code == 2
    assert http_server.requests == []
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["--input", str(empty), "--output", str(tmp_path / "out"), "--no-mlflow"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(path), "--output", str(tmp_path / "out"), "--samples-per-shard", "0"])
    assert exc.value.code == 2


@pytest.mark.parametrize("name", ["in.csv", "in.tsv.gz", "in.jsonl", "in.jsonl.gz"])
def test_text_lists_are_parsed_once_for_all_shards(tmp_path, name: str) -> None:
    # 40 shards of 50 rows: reading each shard by scanning from row 0 would read the file ~20 times.
    rows = rows_for([f"http://e.com/{i}.jpg" for i in range(2000)], n=list(range(2000)))
    path = write_rows(tmp_path / name, rows)
    CountingFileSystem.bytes_read.clear()
    plan = inputs.plan_input(counting_uri(path), "url", "caption", index_dir=str(tmp_path / "index"), index_rows=50)
    got = [row for start in range(0, 2000, 50) for row in read_rows(plan, start, start + 50)]
    assert CountingFileSystem.bytes_read[str(path.resolve())] <= 1.05 * path.stat().st_size
    expected = rows if "jsonl" in name else [{k: str(v) for k, v in r.items()} for r in rows]
    assert got == list(enumerate(expected))


def test_text_records_are_what_the_rows_say(tmp_path, plan_input) -> None:
    # Quoted newlines, blank lines, short and long rows, a padded and a repeated header name.
    text = 'url, caption ,x,x\nhttp://a/1,"two\nlines",1,2\n\n"http://a/2",short\nhttp://a/3,c,3,4,5\n \n'
    (tmp_path / "in.csv").write_text(text, newline="")
    plan = plan_input(str(tmp_path / "in.csv"), "url", "caption", index_rows=2)
    assert plan.total_rows == 4 and plan.extra_cols == ["x"]
    assert [r for _, r in read_rows(plan, 0, 4)] == [
        {"url": "http://a/1", "caption": "two\nlines", "x": "2"}, {"url": "http://a/2", "caption": "short", "x": ""},
        {"url": "http://a/3", "caption": "c", "x": "4"}, {"url": " ", "caption": "", "x": ""}]
    (tmp_path / "in.jsonl").write_text('{"url": "u", "caption": null}\n\n  \n[1]\r\n{"url": "ü", "n": {"a": [1]}}')
    plan = plan_input(str(tmp_path / "in.jsonl"), "url", "caption", index_rows=2)
    assert list(read_rows(plan, 1, 3)) == [(1, {}), (2, {"url": "ü", "n": {"a": [1]}})]


def test_refused_text_input_leaves_no_index(tmp_path, plan_input) -> None:
    write_rows(tmp_path / "d" / "a.csv", ROWS)
    write_rows(tmp_path / "d" / "b.jsonl", [{"link": "http://e.com/x.jpg", "caption": "x"}])
    with pytest.raises(InputError, match="b.jsonl: missing column"):
        plan_input(str(tmp_path / "d"), "url", "caption")
    assert not (tmp_path / "index").exists()
