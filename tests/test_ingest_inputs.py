"""Input reading: formats, directories/globs, column flags, failures before any download."""

from __future__ import annotations

import gzip

import pytest

from latentforge.ingest.inputs import InputError, plan_input, read_rows, split_record
from tests.harness.url_lists import rows_for, write_rows

ROWS = rows_for([f"http://example.com/{i}.jpg" for i in range(7)], extra_a=list(range(7)),
                extra_b=[f"b{i}" for i in range(7)])


@pytest.mark.parametrize("name", ["in.parquet", "in.csv", "in.tsv", "in.jsonl", "in.csv.gz", "in.tsv.gz",
                                  "in.jsonl.gz"])
def test_formats(tmp_path, name: str) -> None:
    path = write_rows(tmp_path / name, ROWS)
    plan = plan_input(str(path), "url", "caption")
    assert plan.total_rows == 7 and plan.extra_cols == ["extra_a", "extra_b"]
    got = list(read_rows(plan, 2, 5))
    assert [i for i, _ in got] == [2, 3, 4]
    url, caption, expected, extra = split_record(plan, got[0][1])
    assert (url, caption, expected) == ("http://example.com/2.jpg", "caption 2", None)
    assert str(extra["extra_a"]) == "2" and extra["extra_b"] == "b2"


def test_directory_and_glob_concatenate_in_name_order(tmp_path) -> None:
    write_rows(tmp_path / "d" / "part-1.parquet", ROWS[3:], row_group_size=2)
    write_rows(tmp_path / "d" / "part-0.csv", ROWS[:3])
    (tmp_path / "d" / "README.txt").write_text("not an input")
    for uri in (str(tmp_path / "d"), str(tmp_path / "d" / "part-*"), f"file://{tmp_path / 'd'}"):
        plan = plan_input(uri, "url", "caption")
        assert [f.rows for f in plan.files] == [3, 4]
        assert [r["url"] for _, r in read_rows(plan, 0, 7)] == [r["url"] for r in ROWS]
        assert [i for i, _ in read_rows(plan, 2, 6)] == [2, 3, 4, 5]


def test_laion_columns_by_flag(tmp_path) -> None:
    path = write_rows(tmp_path / "laion.parquet", rows_for(["http://e.com/a.jpg"], url_col="URL",
                                                           caption_col="TEXT", WIDTH=[10]))
    with pytest.raises(InputError, match="missing column.*url"):
        plan_input(str(path), "url", "caption")
    plan = plan_input(str(path), "URL", "TEXT")
    url, caption, _, extra = split_record(plan, next(read_rows(plan, 0, 1))[1])
    assert url == "http://e.com/a.jpg" and caption == "caption 0" and extra == {"WIDTH": 10}


def test_hash_column(tmp_path) -> None:
    path = write_rows(tmp_path / "h.jsonl", rows_for(["http://e.com/a.jpg"], sha=["ABC"]))
    plan = plan_input(str(path), "url", "caption", hash_col="sha")
    assert split_record(plan, next(read_rows(plan, 0, 1))[1])[2] == "abc"


def test_missing_caption_column_is_refused_unless_disabled(tmp_path) -> None:
    path = write_rows(tmp_path / "u.csv", [{"url": "http://e.com/a.jpg"}])
    with pytest.raises(InputError, match="caption"):
        plan_input(str(path), "url", "caption")
    assert plan_input(str(path), "url", None).total_rows == 1


@pytest.mark.parametrize("content,match", [
    (b"", "no rows"),
    (b"url,caption\n", "no rows"),
    (b"PAR1garbagegarbage", "cannot read"),
])
def test_empty_and_unreadable(tmp_path, content: bytes, match: str) -> None:
    path = tmp_path / ("in.parquet" if content.startswith(b"PAR1") else "in.csv")
    path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        plan_input(str(path), "url", "caption")


def test_bad_gzip_and_missing_path(tmp_path) -> None:
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
