"""Ingest stage parts: URL+caption lists -> WebDataset shards (no Ray here; see pipelines.ingest).

- `config`   `IngestConfig`, the stage's typed config
- `inputs`   reading parquet/csv/tsv/jsonl (.gz) inputs, validation before any download, row ranges
- `safety`   SSRF rules: schemes, address classes in every spelling, redirect re-checks
- `download` one URL -> bytes with a total deadline, size cap, retries, per-host cap, opt-outs
- `images`   bomb check, format allow-list, RGB normalisation, img2dataset's resizer
- `shards`   one shard's work: concurrent downloads -> tar + ledger + stats, written atomically
- `state`    manifest bookkeeping: finished shards, resume, `--retry-reasons` planning, totals
"""
