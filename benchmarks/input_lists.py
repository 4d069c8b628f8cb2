"""Input URL lists: a CSV (and JSONL.gz) against the same rows as parquet, planning + reading every shard.

    python benchmarks/input_lists.py                       # 1,000,000 rows, 1,000 rows per shard
    python benchmarks/input_lists.py --rows 100000 --samples-per-shard 500

What the ingest driver and its shard tasks do with the input, without downloading: `input_plan`
(parquet: the footer; text: one parse that writes the Arrow copy the shards read), then
`read_rows` + `split_record` for every shard in order, one process. Rows look like LAION's
(URL, caption, width, height). The parquet file is written twice: with a row group per shard
(the layout the text copy gets, best case for parquet) and with pyarrow's default row groups
(up to 1 M rows a group, which every shard then decodes in full; `--parquet-default-groups`).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO))

from latentforge.ingest.config import IngestConfig  # noqa: E402
from latentforge.ingest.inputs import discard_index, input_plan, read_rows, split_record  # noqa: E402
from tests.harness.url_lists import write_rows  # noqa: E402


def laion_like_rows(count: int) -> list[dict]:
    return [{"url": f"https://images.example.com/{i % 997}/{i:09d}.jpg?w=640",
             "caption": f"a photo of item {i}, taken outdoors, with \"quotes\" and, commas",
             "width": str(320 + i % 640), "height": str(240 + i % 480)} for i in range(count)]


def plan_and_read(input_path: Path, output: Path, samples_per_shard: int) -> dict:
    """Seconds to plan the input and read every shard's rows; rows read as a check."""
    config = IngestConfig(input=str(input_path), output=str(output), samples_per_shard=samples_per_shard)
    started = time.perf_counter()
    plan = input_plan(config)
    planned = time.perf_counter()
    rows = 0
    for start in range(0, plan.total_rows, samples_per_shard):
        for _, record in read_rows(plan, start, start + samples_per_shard):
            split_record(plan, record)
            rows += 1
    done = time.perf_counter()
    discard_index(str(output))
    return {"plan_s": round(planned - started, 2), "read_s": round(done - planned, 2),
            "total_s": round(done - started, 2), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--parquet-default-groups", action="store_true",
                        help="also time a parquet file with pyarrow's default row groups (slow: every "
                             "shard decodes the whole group)")
    args = parser.parse_args()
    rows = laion_like_rows(args.rows)
    results: dict = {"rows": args.rows, "samples_per_shard": args.samples_per_shard,
                     "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="lf-bench-inputs-") as tmp:
        inputs = {"parquet_group_per_shard": write_rows(Path(tmp, "a.parquet"), rows,
                                                        row_group_size=args.samples_per_shard),
                  "csv": write_rows(Path(tmp, "c.csv"), rows),
                  "jsonl_gz": write_rows(Path(tmp, "d.jsonl.gz"), rows)}
        if args.parquet_default_groups:
            inputs["parquet_default_groups"] = write_rows(Path(tmp, "b.parquet"), rows)
        del rows
        for name, path in inputs.items():
            results[name] = {"bytes": path.stat().st_size, **plan_and_read(path, Path(tmp, "out"),
                                                                           args.samples_per_shard)}
            print(name, results[name], file=sys.stderr, flush=True)
    best = results["parquet_group_per_shard"]["total_s"]
    results["csv_vs_parquet"] = round(results["csv"]["total_s"] / best, 2)
    results["jsonl_gz_vs_parquet"] = round(results["jsonl_gz"]["total_s"] / best, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
